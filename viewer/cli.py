"""``searchgym view``: serve the viewer over run folders (Flask loads in the handler, not at --help)."""

import argparse
import contextlib
import sys
from pathlib import Path

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 8765


def add_view_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``searchgym view``."""
    parser = subparsers.add_parser(
        "view",
        help="browse the episodes, curves and comparisons of training and eval runs in a local web page",
        description=(
            "Serve a read-only web page over run folders: the episodes of a training run (by step, from "
            "samples/episodes.jsonl) or of an eval run (predictions.jsonl), with filters; one episode turn "
            "by turn with its passages, reward parts and tokens; two runs or two steps side by side; and "
            "a training run's curves. Files are indexed once and followed as they grow."
        ),
    )
    parser.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="run folders of searchgym train or searchgym eval (or folders whose sub-folders are runs)",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument(
        "--host",
        default=LOOPBACK,
        help=f"address to listen on (default: {LOOPBACK}, this machine only; the page has no login)",
    )
    parser.add_argument("--threads", type=int, default=4, help="request threads (default: 4)")
    parser.set_defaults(run=run_view_command)


def run_view_command(args: argparse.Namespace) -> int:
    """Index the runs and serve the pages until interrupted."""
    import waitress  # imported here: `searchgym --help` stays instant

    from searchgym.viewer.app import create_app
    from searchgym.viewer.runs import find_runs

    runs = find_runs(args.run_dirs)
    for run in runs:
        run.episodes.refresh()
        count = len(run.episodes.summaries)
        print(f"run {run.number}: {run.label} ({run.kind}, {count} episodes)", file=sys.stderr)
    if args.host not in (LOOPBACK, "localhost", "::1"):
        print(
            f"searchgym view: warning: listening on {args.host}: anyone who can reach it can read these runs",
            file=sys.stderr,
        )
    print(f"searchgym view: http://{args.host}:{args.port}/ (Ctrl-C stops)", file=sys.stderr)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how the viewer is stopped
        waitress.serve(create_app(runs), host=args.host, port=args.port, threads=args.threads, _quiet=True)
    return 0
