"""The ``searchgym`` entry point itself: what every subcommand shares."""

import os
import subprocess
import sys

from searchgym.paths import REPO_ROOT


def test_a_reader_that_stops_early_ends_the_command_quietly() -> None:
    # `searchgym train --help | head` with the reader already gone: every write to stdout fails with EPIPE.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "searchgym", "train", "--help"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            cwd=REPO_ROOT,
        )
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 141


def test_help_still_prints_in_full() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "searchgym", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    for command in ("index", "serve", "eval", "train"):
        assert command in result.stdout
