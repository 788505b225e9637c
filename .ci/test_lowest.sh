#!/usr/bin/env bash
# The lower end of setup.cfg's transformers range, tested cheaply: policy/generation.py drives DynamicCache
# itself, so the policy tests run again with the lowest transformers in the range. pip plans what it would
# change in .venv to get that release (transformers and the few packages it needs at other versions), those
# go into a throwaway folder put in front of .venv on PYTHONPATH, and .venv itself is left as it is.
# Run as `make test-lowest`. `python -m pytest` imports searchgym from this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
TORCH=${TORCH:-torch==2.13.0}
LOWEST=${LOWEST:-transformers==5.17.0}
FOLDER=.cache/lowest
rm -rf "$FOLDER"
mkdir -p "$FOLDER"
trap 'rm -rf "$FOLDER"' EXIT

"$BIN/pip" install -q --dry-run --report "$FOLDER/plan.json" "$LOWEST" "$TORCH"
"$BIN/python" - "$FOLDER/plan.json" > "$FOLDER/requirements.txt" <<'PY'
import json
import sys

for item in json.load(open(sys.argv[1]))["install"]:
    print(f"{item['metadata']['name']}=={item['metadata']['version']}")
PY
echo "in front of .venv: $(tr '\n' ' ' < "$FOLDER/requirements.txt")"
"$BIN/pip" install -q --no-deps --target "$FOLDER/site" -r "$FOLDER/requirements.txt"
export PYTHONPATH=$FOLDER/site
"$BIN/python" -c "import sys, transformers as t; sys.exit(None if '$LOWEST' == f'transformers=={t.__version__}' else t.__file__)"
"$BIN/python" -m pytest -p no:cacheprovider tests/test_policy_generation.py tests/test_policy_logprobs.py \
    tests/test_policy_models.py tests/test_policy_rollout.py
