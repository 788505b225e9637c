#!/usr/bin/env bash
# The real trainer on a GPU: `searchgym train` of the tiny preset on CUDA (PPO in fp32, GRPO in bf16),
# a resume from its checkpoint, and `searchgym export` of a mid-run checkpoint. Each run's tail and the
# last metrics row are printed; any failure stops the script with its exit status.
#
#     bash benchmarks/cuda_train_check.sh [OUT_DIR] [DEVICE] [EXTRA KEY=VALUE ...]
#
# DEVICE defaults to cuda; `bash benchmarks/cuda_train_check.sh /tmp/check cpu` is the dry run here.
# Extra overrides apply to every run (e.g. learner.strategy=shard).
set -euo pipefail
out=${1:-runs/cuda-check}
device=${2:-cuda}
shift $(($# > 2 ? 2 : $#))
python=${PYTHON:-python3}
train() {
    local name=$1
    shift
    echo "== $name"
    "$python" -m searchgym train --config configs/tiny.yaml system.device="$device" \
        logging.run_dir="$out/$name" "$@" 2>&1 | tail -n 3
    "$python" - "$out/$name/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
last = rows[-1]
keys = ("step", "rollout/reward", "actor/policy_loss", "actor/grad_norm", "critic/value_loss", "time/learn")
print(f"   {len(rows)} rows; last:", {key: last[key] for key in keys if key in last})
EOF
}
train ppo-fp32 algorithm.name=ppo system.dtype=float32 "$@"
# Same folder, one more step: resumes from the step-2 checkpoint.
train ppo-fp32 algorithm.name=ppo system.dtype=float32 total_steps=3 "$@"
train grpo-bf16 algorithm.name=grpo kl.placement=loss kl.estimator=low_var_kl system.dtype=bfloat16 "$@"
echo "== export of a mid-run checkpoint"
first=$(ls -d "$out"/ppo-fp32/checkpoints/step_* | head -n 1)
"$python" -m searchgym export "$first" --out "$out/exported" 2>&1 | tail -n 2
ls "$out/exported"
