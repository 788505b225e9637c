"""``make demo``: SmolLM2-135M learns to search wiki-mini with BM25 on a CPU, then a paired before/after.

The job is ``searchgym train --config configs/demo.yaml`` (a supervised warm-start on protocol traces, then
GRPO-family RL on the outcome reward; see the preset's comments), in a fixed time. The warm-started policy
is evaluated on the dev questions first, with the protocol it was trained on; what that evaluation takes
tells how long the final one will, so RL gets what is left of ``--minutes`` (``max_minutes``) and stops
at the last step that fits. The final policy is then evaluated the same way (both runs land in
``<run>/eval/``), and the demo prints the two scores side by side, the questions RL turned right and wrong
with the sign test of that split, and the training reward of each RL step.
Extra arguments are config overrides (``python -m searchgym.demo --minutes 0 total_steps=7`` trains
exactly 7 steps, whatever they take).
"""

import argparse
import dataclasses
import json
import logging
import shutil
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

logger = logging.getLogger(__name__)
DEMO_CONFIG = CONFIGS_DIR / "demo.yaml"
DEMO_MINUTES = 14.0
"""The demo's time on a 2-core CPU, a minute under the 15 it is meant to fit in."""
FINAL_EVAL_MARGIN = 1.15
"""The final evaluation is budgeted at this multiple of the warm-start's: its answers and searches differ."""
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


def stage_eval_dir(config: TrainConfig, stage: str) -> Path:
    """Where the evaluation of ``<run>/<stage>`` is written: ``<run>/eval/<stage>``."""
    return config.run_dir / "eval" / stage


def evaluate_stage(config: TrainConfig, stage: str) -> "RunResults":
    """Evaluate ``<run>/<stage>`` into :func:`stage_eval_dir` (resumed or reused when it is there)."""
    from searchgym.eval.runner import run_evaluation

    if stage == WARMSTART_DIR and not (config.run_dir / WARMSTART_DIR).is_dir():
        raise SearchgymError(
            f"{config.run_dir} has no {WARMSTART_DIR}/: the demo needs warmstart.examples > 0"
        )
    return run_evaluation(stage_eval_config(config, stage), stage_eval_dir(config, stage))


def demo_report(config: TrainConfig, warm_start: "RunResults", final: "RunResults") -> DemoReport:
    """Pair the two stages' evaluations question by question, with the run's training rewards."""
    from searchgym.eval.report import paired_comparison

    paired = paired_comparison(*(stage_eval_dir(config, stage) for stage in STAGES))
    assert paired is not None  # the same questions, by construction
    return DemoReport(warm_start, final, paired, train_rewards(config.run_dir))


def evaluate_stages(config: TrainConfig) -> DemoReport:
    """Evaluate the warm-started and the final policy of a finished run and pair them question by question.

    A second call resumes or reuses the evaluations in ``<run>/eval/`` (each is an ordinary eval run).
    """
    return demo_report(config, *(evaluate_stage(config, stage) for stage in STAGES))


def rl_minutes(minutes: float, elapsed_s: float, warm_start_eval_s: float) -> float:
    """What ``minutes`` leave RL after ``elapsed_s`` and a final evaluation like the warm-start's.

    Never 0, which would mean no limit: with no time left RL still runs its first two steps.
    """
    left_s = minutes * 60.0 - elapsed_s - FINAL_EVAL_MARGIN * warm_start_eval_s
    return max(left_s / 60.0, 1e-3)


def run_demo(config: TrainConfig, minutes: float) -> DemoReport:
    """Warm-start, evaluate, train RL in the time left of ``minutes`` (0: all ``total_steps``), evaluate.

    A run folder where the demo finished is only reported again. An interrupted one is resumed: the
    saved warm-start, evaluations and checkpoints are reused, and RL gets the time left again.
    """
    from searchgym.env import load_dataset
    from searchgym.eval.report import RESULTS_FILE
    from searchgym.train.run import run_training, starting_policy  # torch and transformers load here

    final_eval = stage_eval_dir(config, "final")
    if (final_eval / RESULTS_FILE).is_file():
        return evaluate_stages(config)
    started = time.monotonic()
    starting_policy(
        config,
        load_dataset(config.data.train, limit=config.data.train_limit),
        load_dataset(config.data.dev, limit=config.data.dev_limit),
    )  # saved in <run>/warmstart/, where the training run below picks it up
    evaluating = time.monotonic()
    warm_start = evaluate_stage(config, WARMSTART_DIR)
    if minutes > 0:
        now = time.monotonic()
        limit = rl_minutes(minutes, now - started, now - evaluating)
        logger.info("RL gets %.1f of the demo's %g minutes", limit, minutes)
        config = dataclasses.replace(config, max_minutes=limit)
    if run_training(config).history:
        shutil.rmtree(final_eval, ignore_errors=True)  # an interrupted evaluation of an older final policy
    return demo_report(config, warm_start, evaluate_stage(config, "final"))


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


def main(argv: list[str]) -> int:
    """Run the demo and print the summary; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m searchgym.demo", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--minutes",
        type=float,
        default=DEMO_MINUTES,
        help="the whole demo's time; RL gets what the rest leaves (0: train all total_steps)",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="demo: %(message)s")
    config = load_config(DEMO_CONFIG, args.overrides)
    started = time.perf_counter()
    report = run_demo(config, args.minutes)
    questions = report.paired.questions
    print(f"\nSmolLM2-135M-Instruct on wiki-mini, {questions} dev questions, greedy, as trained:\n")
    print(summary_table(report))
    print(
        f"\n{(time.perf_counter() - started) / 60:.1f} min; run folder: {config.run_dir} (metrics.jsonl, "
        "curves.png, samples/, warmstart/, final/, eval/)"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SearchgymError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        sys.exit(2)
