#!/usr/bin/env bash
# GRPO, RLOO and Dr. GRPO, each with dynamic sampling, on wiki-mini with the same budget: the 32-episode
# recipe of docs/benchmarks.md (configs/demo.yaml's warm-start, then 12 steps of 4 questions x 8 samples at
# temperature 1.0). Each final policy, and the warm-started one they all start from (same seed, same data),
# is evaluated on all 250 dev questions with the training protocol; `searchgym eval --compare` then pairs
# them question by question.
#
#     bash benchmarks/estimators_wiki_mini.sh [OUT_DIR] [ESTIMATOR ...]
set -euo pipefail
out=${1:-runs/bench/estimators}
shift $(($# > 0 ? 1 : 0))
if [[ $# -gt 0 ]]; then estimators=("$@"); else estimators=(grpo rloo dr_grpo); fi
python=${PYTHON:-.venv/bin/python}
index=$("$python" -c "from searchgym.train.build import WIKI_MINI_BM25; print(WIKI_MINI_BM25)")
evaluate() {  # MODEL OUT
    "$python" -m searchgym eval --model "$1" --train-config configs/demo.yaml --index "$index" \
        --out "$2" --no-progress 2>&1 | tail -n 4
}
# The first estimator's run warm-starts; the others start from its warm-started policy (the same weights
# the warm-start would give them again), so all three are paired from one start.
start_from=()
for name in "${estimators[@]}"; do
    echo "== $name: training"
    start=$(date +%s)
    "$python" -m searchgym train --config configs/demo.yaml logging.run_dir="$out/$name" total_steps=12 \
        batch.prompts_per_step=4 batch.mini_batch_prompts=4 rollout.samples_per_prompt=8 \
        rollout.temperature=1.0 system.torch_threads=2 dev.every=0 dev.before_training=false \
        algorithm.name="$name" algorithm.dynamic_sampling=true "${start_from[@]}" 2>&1 | tail -n 6
    start_from=(model.path="$out/${estimators[0]}/warmstart" warmstart.examples=0)
    echo "   trained in $(($(date +%s) - start)) s"
    evaluate "$out/$name/final" "$out/$name/eval"
done
if [[ ! -d "$out/warmstart-eval" ]]; then
    echo "== the warm-started policy"
    evaluate "$out/${estimators[0]}/warmstart" "$out/warmstart-eval"
fi
