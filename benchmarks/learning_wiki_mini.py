"""Does SmolLM2-135M learn to search wiki-mini? Train with a preset; compare with its one-shot RAG baseline.

Trains with ``configs/demo.yaml`` and the recipe of docs/benchmarks.md's "Learning on wiki-mini" (``RECIPE``:
GRPO on 2 questions x 4 samples a step, the trainer's dev set the first 32 dev questions, scored before the
warm-start, before RL and after the last step), plus any ``key=value`` overrides; then runs ``searchgym eval
--mode rag`` with the untrained model on the same dev questions and the same top-k. Prints the dev table by
stage (untrained, after warm-start, after RL, RAG baseline), the per-step training curve (reward, response
tokens, searches) and the wall time, and draws the curves to ``--plot``.

    .venv/bin/python benchmarks/learning_wiki_mini.py --plot docs/learning_wiki_mini.png
"""

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from searchgym.demo import DEMO_CONFIG
from searchgym.env import load_dataset
from searchgym.train.build import WIKI_MINI_BM25
from searchgym.train.config import TrainConfig, load_config
from searchgym.train.run import run_training
from searchgym.train.warmstart import WARMSTART_REPORT

RECIPE = (
    "total_steps=4",
    "algorithm.name=grpo",
    "rollout.samples_per_prompt=4",
    "rollout.temperature=0.7",
    "batch.prompts_per_step=2",
    "batch.mini_batch_prompts=2",
    "system.torch_threads=1",
    "data.dev_limit=32",
    "dev.before_training=true",
)
"""The 2026-11-21 runs' settings where they differ from today's demo preset (overrides come after them)."""
DEV_COLUMNS = (
    ("dev EM", "em", "{:.1%}"),
    ("dev F1", "f1", "{:.1%}"),
    ("valid answers", "answered", "{:.0%}"),
)


def dev_scores_by_stage(run_dir: Path) -> dict[str, dict[str, float]]:
    """The trainer's dev scores of the untrained policy, at RL step 0 and after the last step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    dev_rows = [row for row in rows if any(key.startswith("dev/") for key in row)]

    def scores(row: dict[str, float]) -> dict[str, float]:
        return {key.removeprefix("dev/"): value for key, value in row.items() if key.startswith("dev/")}

    stages = {}
    report = json.loads((run_dir / WARMSTART_REPORT).read_text())
    if "dev_untrained" in report:
        stages["untrained"] = report["dev_untrained"]
    stages["after warm-start"] = scores(dev_rows[0])
    stages[f"after RL (step {dev_rows[-1]['step']})"] = scores(dev_rows[-1])
    return stages


def summary_table(run_dir: Path) -> str:
    """The dev scores by stage as a markdown table."""
    stages = dev_scores_by_stage(run_dir)
    lines = ["| | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for label, key, form in DEV_COLUMNS:
        cells = [form.format(scores[key]) if key in scores else "-" for scores in stages.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rag_baseline(config: TrainConfig, out: Path) -> dict[str, float]:
    """The untrained model's one-shot RAG scores on the run's dev questions (``searchgym eval --mode rag``).

    The trainer evaluates the first ``data.dev_limit`` dev questions, while ``eval --limit`` samples; the
    same questions are written to a file for the baseline.
    """
    questions = out / "dev_questions.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    with questions.open("w") as file:
        for example in load_dataset(config.data.dev, limit=config.data.dev_limit):
            record = {
                "id": example.id,
                "question": example.question,
                "golden_answers": example.golden_answers,
            }
            file.write(json.dumps(record) + "\n")
    if config.retriever.url is not None:
        retriever = ["--retriever-url", config.retriever.url]
    else:
        retriever = ["--index", config.retriever.index or str(WIKI_MINI_BM25)]
    command = [
        *(sys.executable, "-m", "searchgym", "eval", "--mode", "rag", "--no-progress"),
        *("--benchmarks", str(questions), *retriever, "--topk", str(config.env.topk)),
        *("--max-new-tokens", str(config.rollout.max_new_tokens), "--out", str(out / "rag")),
    ]
    subprocess.run(command, check=True)
    return json.loads((out / "rag" / "results.json").read_text())["average"]


def step_curves(run_dir: Path) -> list[dict[str, float]]:
    """The metrics rows of the RL steps (those with a training reward)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "rollout/reward" in row]


def plot(run_dir: Path, rag: dict[str, float], target: Path) -> None:
    """Training reward, response tokens and searches per step; dev EM by stage beside the RAG baseline."""
    rows = step_curves(run_dir)
    steps = [row["step"] for row in rows]
    stages = dev_scores_by_stage(run_dir)
    figure, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for axis, key, title in zip(
        axes[:3],
        ("rollout/reward", "rollout/response_tokens", "rollout/searches"),
        ("train reward (F1)", "response tokens / episode", "searches / episode"),
        strict=True,
    ):
        axis.plot(steps, [row[key] for row in rows], marker="o")
        axis.set_title(title)
        axis.set_xlabel("RL step")
    names = [*stages, "RAG baseline"]
    axes[3].bar(names, [100 * s["em"] for s in stages.values()] + [100 * rag["exact_match"]])
    axes[3].set_title("dev EM (%)")
    axes[3].tick_params(axis="x", labelrotation=20)
    figure.tight_layout()
    figure.savefig(target, dpi=90)


def main() -> None:
    """Train, evaluate the baseline, print and plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    parser.add_argument("--run-dir", default="runs/bench/learning_wiki_mini")
    parser.add_argument("--plot", type=Path, default=None, help="write the curves to this PNG")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = load_config(DEMO_CONFIG, [f"logging.run_dir={args.run_dir}", *RECIPE, *args.overrides])
    if config.dev.every == 0:  # the "after RL" column: dev after the last step
        config = dataclasses.replace(config, dev=dataclasses.replace(config.dev, every=config.total_steps))
    started = time.perf_counter()
    run_training(config)
    print(f"\ntraining job (warm-start, RL, dev evaluations): {(time.perf_counter() - started) / 60:.1f} min")
    rag = rag_baseline(config, config.run_dir / "baseline")
    print(f"\n{summary_table(config.run_dir)}")
    print(
        f"RAG baseline (untrained, top-{config.env.topk}): EM {rag['exact_match']:.1%}, F1 {rag['f1']:.1%}, "
        f"valid answers {rag['valid_answer_rate']:.0%}"
    )
    print("\nstep | reward | response tokens | searches | answered")
    for row in step_curves(config.run_dir):
        print(
            f"{row['step']:4.0f} | {row['rollout/reward']:.3f} | {row['rollout/response_tokens']:15.1f} | "
            f"{row['rollout/searches']:8.2f} | {row['rollout/answered']:.2f}"
        )
    if args.plot is not None:
        plot(config.run_dir, rag, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
