"""``make demo``: SmolLM2-135M learns to search wiki-mini with BM25 on a CPU, then a before/after table.

The job is ``searchgym train --config configs/demo.yaml`` (a supervised warm-start on protocol traces, then
GRPO; see the preset's comments); this module runs it and prints, from the run folder, the dev scores of
the untrained policy, after the warm-start and after RL, and the training reward of each step.
Extra arguments are config overrides (``python -m searchgym.demo total_steps=8``).
"""

import json
import logging
import sys
import time
from pathlib import Path

from searchgym.errors import SearchgymError
from searchgym.paths import CONFIGS_DIR
from searchgym.train.config import TrainConfig, load_config
from searchgym.train.warmstart import WARMSTART_REPORT

DEMO_CONFIG = CONFIGS_DIR / "demo.yaml"
# (label, key in the dev scores, format)
DEV_COLUMNS = (
    ("dev EM", "em", "{:.1%}"),
    ("dev F1", "f1", "{:.1%}"),
    ("valid answers", "answered", "{:.0%}"),
    ("searches / question", "searches", "{:.2f}"),
)


def dev_scores_by_stage(run_dir: Path) -> dict[str, dict[str, float]]:
    """Dev scores of the untrained policy (when a warm-start ran), at RL step 0 and after the last step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    dev_rows = [row for row in rows if any(key.startswith("dev/") for key in row)]
    if not dev_rows:
        raise SearchgymError(f"{run_dir}/metrics.jsonl has no dev scores: set dev.before_training=true")

    def scores(row: dict[str, float]) -> dict[str, float]:
        return {key.removeprefix("dev/"): value for key, value in row.items() if key.startswith("dev/")}

    stages = {}
    warm_start = run_dir / WARMSTART_REPORT
    if warm_start.exists() and "dev_untrained" in (report := json.loads(warm_start.read_text())):
        stages["untrained"] = report["dev_untrained"]
    stages["after warm-start" if stages else "untrained"] = scores(dev_rows[0])
    stages[f"after RL (step {dev_rows[-1]['step']})"] = scores(dev_rows[-1])
    return stages


def train_rewards(run_dir: Path) -> list[float]:
    """The mean training reward of each RL step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["rollout/reward"] for row in rows if "rollout/reward" in row]


def summary_table(run_dir: Path) -> str:
    """The dev scores by stage as a markdown table, and the reward curve in one line."""
    stages = dev_scores_by_stage(run_dir)
    lines = [
        "| | " + " | ".join(stages) + " |",
        "|---" * (len(stages) + 1) + "|",
    ]
    for label, key, form in DEV_COLUMNS:
        cells = [form.format(scores[key]) if key in scores else "-" for scores in stages.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    rewards = train_rewards(run_dir)
    lines.append(f"\ntrain reward per RL step: {' '.join(f'{reward:.3f}' for reward in rewards)}")
    return "\n".join(lines)


def eval_command(config: TrainConfig) -> str:
    """The ``searchgym eval`` command of a run's final policy on its whole dev set, as it was trained."""
    from searchgym.train.build import WIKI_MINI_BM25

    if config.retriever.url is not None:
        retriever = f"--retriever-url {config.retriever.url}"
    else:
        retriever = f"--index {config.retriever.index or WIKI_MINI_BM25}"
    return (
        f"searchgym eval --model {config.run_dir / 'final'} --train-config {config.run_dir} {retriever} "
        f"--benchmarks {config.data.dev}"
    )


def main(overrides: list[str]) -> int:
    """Train with the demo preset and print the summary; returns the process exit status."""
    from searchgym.train.run import run_training  # torch and transformers load here

    logging.basicConfig(level=logging.INFO, format="demo: %(message)s")
    config = load_config(DEMO_CONFIG, overrides)
    started = time.perf_counter()
    result = run_training(config)
    minutes = (time.perf_counter() - started) / 60
    print(f"\nSmolLM2-135M-Instruct on wiki-mini, first {config.data.dev_limit} dev questions, greedy:\n")
    print(summary_table(result.run_dir))
    print(f"\n{minutes:.1f} min; run folder: {result.run_dir} (metrics.jsonl, curves.png, samples/, final/)")
    print(f"every dev question, with the protocol it was trained on:\n  {eval_command(config)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SearchgymError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        sys.exit(2)
