"""The ``searchgym`` command: one entry point, one subcommand per use.

Each package contributes its subcommands through an ``add_*_command(subparsers)`` function that only
declares arguments; the heavy imports (torch, faiss, vllm, ray) happen inside the handlers, so
``searchgym --help`` stays instant.
"""

import argparse
import os
import sys

from searchgym import __version__
from searchgym.errors import SearchgymError
from searchgym.eval.cli import add_eval_command
from searchgym.retriever.cli import add_index_command, add_serve_command
from searchgym.train.cli import add_export_command, add_train_command
from searchgym.viewer.cli import add_view_command


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, every subcommand included."""
    parser = argparse.ArgumentParser(
        prog="searchgym",
        description="Train language models to search and reason with reinforcement learning.",
    )
    parser.add_argument("--version", action="version", version=f"searchgym {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_index_command(subparsers)
    add_serve_command(subparsers)
    add_eval_command(subparsers)
    add_train_command(subparsers)
    add_export_command(subparsers)
    add_view_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; user errors print one line and exit with 2.

    A reader that goes away early (``searchgym train --help | head``) ends the command quietly, as it
    ends ``cat`` or ``git log``, instead of with a ``BrokenPipeError`` traceback.
    """
    try:
        args = build_parser().parse_args(argv)
        try:
            return args.run(args) or 0
        except SearchgymError as error:
            print(f"searchgym {args.command}: error: {error}", file=sys.stderr)
            return 2
    except BrokenPipeError:
        _silence_stdout()
        return 141  # what a shell reports for a command ended by SIGPIPE (128 + 13)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not raise a second BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
