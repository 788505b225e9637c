"""``make demo``: SmolLM2-135M learns to search wiki-mini with BM25 on a CPU, then a paired before/after.

The job is ``searchgym train --config configs/demo.yaml`` (a supervised warm-start on protocol traces, then
GRPO-family RL on the outcome reward; see the preset's comments). This module runs it, then evaluates the
warm-started and the final policy on the dev questions with the protocol they were trained on (both runs
land in ``<run>/eval/``), and prints their scores side by side, the questions RL turned right and wrong
with the sign test of that split, and the training reward of each RL step.
Extra arguments are config overrides (``python -m searchgym.demo total_steps=8``).
"""

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from searchgym.errors import SearchgymError
from searchgym.paths import CONFIGS_DIR
from searchgym.train.config import TrainConfig, load_config
from searchgym.train.warmstart import WARMSTART_DIR

if TYPE_CHECKING:
    from searchgym.eval.config import EvalConfig
    from searchgym.eval.report import PairedComparison, RunResults

DEMO_CONFIG = CONFIGS_DIR / "demo.yaml"
EVAL_BATCH_SIZE = 64
"""Questions decoded together in the demo's evaluations (on the 2-core box 15% faster than 32)."""
STAGES = ("warmstart", "final")
"""The policies the demo compares: the run folder's warm-started policy and its final one."""
# (label, DatasetMetrics field, format)
COLUMNS = (
    ("EM", "exact_match", "{:.1%}"),
    ("F1", "f1", "{:.1%}"),
    ("valid answers", "valid_answer_rate", "{:.0%}"),
    ("searches / question", "mean_searches", "{:.2f}"),
)


@dataclass(frozen=True, slots=True)
class DemoReport:
    """What the demo prints: both policies' dev scores, their pairing and the RL rewards."""

    warm_start: "RunResults"
    final: "RunResults"
    paired: "PairedComparison"
    rewards: list[float]
    """The mean training reward of each RL step."""


def stage_eval_config(config: TrainConfig, stage: str) -> "EvalConfig":
    """The evaluation of ``<run>/<stage>`` on the run's dev set, with the protocol the run trained with."""
    from searchgym.env.data import expand_benchmarks
    from searchgym.eval.config import EvalConfig
    from searchgym.train.build import WIKI_MINI_BM25

    index = None if config.retriever.url else str(config.retriever.index or WIKI_MINI_BM25)
    return EvalConfig(
        benchmarks=expand_benchmarks((config.data.dev,)),
        model=str(config.run_dir / stage),
        mode="agent",
        retriever_url=config.retriever.url,
        index=index,
        env=config.env,
        budgets=config.token_budgets,
        infer_prompt_style=False,
        limit=config.data.dev_limit,
        batch_size=EVAL_BATCH_SIZE,
    )


def train_rewards(run_dir: Path) -> list[float]:
    """The mean training reward of each RL step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [row["rollout/reward"] for row in rows if row.get("rollout/reward") is not None]


def evaluate_stages(config: TrainConfig) -> DemoReport:
    """Evaluate the warm-started and the final policy of a finished run and pair them question by question.

    A second call resumes or reuses the evaluations in ``<run>/eval/`` (each is an ordinary eval run).
    """
    from searchgym.eval.report import paired_comparison
    from searchgym.eval.runner import run_evaluation

    if not (config.run_dir / WARMSTART_DIR).is_dir():
        raise SearchgymError(
            f"{config.run_dir} has no {WARMSTART_DIR}/: the demo needs warmstart.examples > 0"
        )
    runs = {stage: config.run_dir / "eval" / stage for stage in STAGES}
    results = {stage: run_evaluation(stage_eval_config(config, stage), runs[stage]) for stage in STAGES}
    paired = paired_comparison(runs["warmstart"], runs["final"])
    assert paired is not None  # the same questions, by construction
    return DemoReport(results["warmstart"], results["final"], paired, train_rewards(config.run_dir))


def summary_table(report: DemoReport) -> str:
    """The two policies' dev scores as a markdown table, the paired EM split, and the reward curve."""
    stages = {"after warm-start": report.warm_start, f"after RL ({len(report.rewards)} steps)": report.final}
    lines = ["| | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for label, field, form in COLUMNS:
        cells = [form.format(getattr(results.average, field)) for results in stages.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    paired = report.paired
    lines += [
        "",
        f"EM, question by question: RL turned {paired.gained} wrong answers right and {paired.lost} right "
        f"ones wrong (two-sided sign test p = {paired.p_value:.2g}, {paired.questions} questions)",
        f"train reward per RL step: {' '.join(f'{reward:.3f}' for reward in report.rewards)}",
    ]
    return "\n".join(lines)


def main(overrides: list[str]) -> int:
    """Train with the demo preset, evaluate both stages and print the summary; returns the exit status."""
    from searchgym.train.run import run_training  # torch and transformers load here

    logging.basicConfig(level=logging.INFO, format="demo: %(message)s")
    config = load_config(DEMO_CONFIG, overrides)
    started = time.perf_counter()
    result = run_training(config)
    trained = time.perf_counter()
    report = evaluate_stages(config)
    finished = time.perf_counter()
    questions = report.paired.questions
    print(f"\nSmolLM2-135M-Instruct on wiki-mini, {questions} dev questions, greedy, as trained:\n")
    print(summary_table(report))
    print(
        f"\n{(finished - started) / 60:.1f} min (training {(trained - started) / 60:.1f}, evaluation "
        f"{(finished - trained) / 60:.1f}); run folder: {result.run_dir} (metrics.jsonl, curves.png, "
        "samples/, warmstart/, final/, eval/)"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SearchgymError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        sys.exit(2)
