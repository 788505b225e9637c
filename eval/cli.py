"""``searchgym eval``: EM / F1 tables for a checkpoint and its baselines, and side-by-side comparisons.

Only arguments are declared here; torch, transformers and the retriever backends are imported by the
handler, so ``searchgym --help`` stays instant.
"""

import argparse
import re
import sys
from pathlib import Path

from searchgym.errors import SearchgymError
from searchgym.eval.config import (
    BACKENDS,
    DEFAULT_TURN_TOKENS,
    MODES,
    SEARCH_R1_BENCHMARKS,
    EvalConfig,
    training_protocol,
)
from searchgym.eval.report import COMPARABLE_METRICS, compare_runs, format_run_table
from searchgym.policy.budgets import TokenBudgets

DEFAULT_BENCHMARKS = "wiki-mini-dev"
RUNS_DIR = Path("runs") / "eval"


def add_eval_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``searchgym eval``."""
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model (EM / F1 per dataset) in agent, rag or direct mode, or compare finished runs",
        description=(
            "Evaluate a policy on QA benchmarks with the training parser and reward code, and print a "
            "table with one column per dataset. A run directory keeps predictions.jsonl, results.json and "
            "results.md; running the same command again resumes an interrupted run."
        ),
    )
    what = parser.add_argument_group("what to evaluate")
    what.add_argument("--model", help="model folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    what.add_argument(
        "--benchmarks",
        default=DEFAULT_BENCHMARKS,
        help=(
            "comma-separated dataset names, files (FlashRAG .jsonl, Search-R1 .parquet: a merged one gives "
            "one column per data_source) or folders (FlashRAG's <root>/nq/test.jsonl layout, datasets' "
            f"save_to_disk); 'all' is {','.join(SEARCH_R1_BENCHMARKS)} (default: {DEFAULT_BENCHMARKS})"
        ),
    )
    what.add_argument(
        "--mode",
        default="agent",
        help=(
            "agent (the search policy), rag or direct; several, comma-separated (agent,rag,direct), evaluate "
            "the model and its baselines in one command (default: agent)"
        ),
    )
    what.add_argument("--limit", type=int, help="questions per dataset, sampled with --seed (default: all)")
    what.add_argument("--seed", type=int, default=0, help="sampling seed of --limit (default: 0)")
    what.add_argument("--exclude", type=Path, help="file of example ids to leave out, one per line")
    search = parser.add_argument_group("retrieval (agent and rag modes)")
    where = search.add_mutually_exclusive_group()
    where.add_argument("--index", type=Path, help="index folder built by `searchgym index`")
    where.add_argument("--retriever-url", help="URL of a running `searchgym serve` (or Search-R1 server)")
    search.add_argument(
        "--train-config",
        type=Path,
        help=(
            "evaluate with the protocol the policy was trained on: a training config or run folder "
            "(its config.yaml) gives the prompt, turns, searches, top-k, observation budget and tokens "
            "per turn; the flags below override it"
        ),
    )
    search.add_argument("--topk", type=int, help="passages per search (default: 3)")
    search.add_argument("--max-turns", type=int, help="turns per question in agent mode (default: 4)")
    decoding = parser.add_argument_group("decoding (greedy)")
    decoding.add_argument("--backend", choices=BACKENDS, default="hf", help="transformers (hf) or vllm")
    decoding.add_argument("--max-new-tokens", type=int, help="tokens per turn (default: 500)")
    decoding.add_argument(
        "--batch-size", type=int, default=32, help="questions decoded together (default: 32)"
    )
    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, help=f"run directory (default: {RUNS_DIR}/<model>-<mode>)")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")
    compare = parser.add_argument_group("comparing finished runs")
    compare.add_argument(
        "--compare", nargs="+", type=Path, metavar="RUN_DIR", help="print these runs side by side"
    )
    compare.add_argument(
        "--metric",
        choices=COMPARABLE_METRICS,
        default="exact_match",
        help="metric of --compare (default: EM)",
    )
    compare.add_argument(
        "--reported",
        nargs="+",
        default=(),
        metavar="ROW",
        help="Search-R1 paper rows to add: all, a model (qwen2.5-7b) or one row (qwen2.5-3b/rag)",
    )
    parser.set_defaults(run=run_eval_command)


def run_eval_command(args: argparse.Namespace) -> int:
    """Compare finished runs, or evaluate (one run per mode) and print the tables."""
    if args.compare:
        print(compare_runs(args.compare, metric=args.metric, reported=args.reported))
        return 0
    from searchgym.eval.runner import run_evaluations  # torch and transformers load here, not at --help

    modes = parse_list(args.mode, everything=MODES)
    if not modes:
        raise SearchgymError(f"no mode given: set --mode to one or more of {', '.join(MODES)}")
    configs = [config_from_args(args, mode) for mode in modes]
    run_dirs = [run_dir_for(args.out, config, several=len(configs) > 1) for config in configs]
    for results in run_evaluations(configs, run_dirs, show_progress=not args.no_progress):
        print(format_run_table(results) + "\n")
    if len(configs) > 1 or args.reported:
        print(compare_runs(run_dirs, reported=args.reported))
    print(f"run directories: {', '.join(map(str, run_dirs))}", file=sys.stderr)
    return 0


def config_from_args(args: argparse.Namespace, mode: str) -> EvalConfig:
    """The settings of one mode's run from the command line (validated by :class:`EvalConfig`).

    Protocol settings come from the flags given, then from ``--train-config`` (all of its episode protocol:
    prompt style and template, turns, searches, top-k, token budgets), then from the defaults.
    """
    from dataclasses import replace

    from searchgym.env.config import EnvConfig  # gymnasium loads here, not at --help
    from searchgym.env.data import expand_benchmarks

    trained = args.train_config is not None
    env, budgets = training_protocol(args.train_config) if trained else (EnvConfig(), TokenBudgets())
    if not trained:
        budgets = replace(budgets, max_turn_tokens=DEFAULT_TURN_TOKENS)
    if args.max_turns is not None:  # the search budget follows: one search in every turn but the last
        env = replace(env, max_turns=args.max_turns, max_searches=args.max_turns - 1)
    if args.topk is not None:
        env = replace(env, topk=args.topk)
    if args.max_new_tokens is not None:
        budgets = replace(budgets, max_turn_tokens=args.max_new_tokens)
    return EvalConfig(
        benchmarks=expand_benchmarks(parse_list(args.benchmarks, everything=SEARCH_R1_BENCHMARKS)),
        model=args.model,
        mode=mode,
        retriever_url=args.retriever_url,
        index=str(args.index) if args.index else None,
        env=env,
        budgets=budgets,
        infer_prompt_style=not trained,
        limit=args.limit,
        seed=args.seed,
        exclude=str(args.exclude) if args.exclude else None,
        backend=args.backend,
        batch_size=args.batch_size,
    )


def parse_list(spec: str, *, everything: tuple[str, ...]) -> tuple[str, ...]:
    """Split a comma-separated list; ``all`` stands for ``everything``; duplicates are dropped.

    >>> parse_list("hotpotqa, all", everything=SEARCH_R1_BENCHMARKS)
    ('hotpotqa', 'nq', 'triviaqa', 'popqa', '2wikimultihopqa', 'musique', 'bamboogle')
    """
    names: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        for name in everything if item == "all" else (item,) if item else ():
            if name not in names:
                names.append(name)
    return tuple(names)


def run_dir_for(out: Path | None, config: EvalConfig, *, several: bool) -> Path:
    """``--out`` for one run, ``--out/<mode>`` for several; by default ``runs/eval/<model>-<mode>``.

    The default is stable, so the same command finds its own run again and resumes it.
    """
    if out is not None:
        return out / config.mode if several else out
    model = Path(config.model).name if config.model else "smollm2-135m-instruct"
    return RUNS_DIR / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', model)}-{config.mode}"
