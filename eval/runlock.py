"""One writer per run directory: a lock file holding the writer's host and pid.

Two ``searchgym eval`` processes appending to one ``predictions.jsonl`` would each answer every question
the other has not yet written, and both copies would be counted. The lock refuses the second process at
once. A lock left by a process that died (kill -9, a crash) is stale: on the same host, a pid that no
longer runs is detected and the lock taken over; a lock from another host (a shared file system) is never
taken over automatically: the message says which file to delete.
"""

import contextlib
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from searchgym.errors import SearchgymError

LOCK_FILE = ".lock"
_WRITE_GRACE_S = 5.0  # an unreadable lock younger than this is being written, not stale


class RunLockedError(SearchgymError):
    """Another live process writes the run directory."""


class RunLock:
    """Holds ``run_dir/.lock`` from ``__enter__`` (or :meth:`acquire`) to ``__exit__``.

    Args:
        run_dir: the run directory; created if missing.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._owner = f"{socket.gethostname()} {os.getpid()}"
        self._held = False

    def acquire(self) -> None:
        """Take the lock, replacing a stale one.

        Raises:
            RunLockedError: a live process holds it.
            SearchgymError: the directory cannot be written (read-only, no permission).
        """
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for _ in range(2):  # a second try after removing a stale lock
                if self._create():
                    self._held = True
                    return
                holder = self._holder()
                if holder is None and self._just_created():
                    holder = ("another process", "starting")  # it is writing its pid right now
                if holder is not None and not _is_stale(holder):
                    raise RunLockedError(
                        f"{self.run_dir} is being written by process {holder[1]} on {holder[0]} "
                        f"(lock file {self.path}): wait for it to finish or choose another --out; if that "
                        "process no longer runs, delete the lock file"
                    )
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        except OSError as error:  # a read-only folder, no permission, a full disk
            reason = error.strerror or str(error)
            message = f"cannot write to {self.run_dir} ({reason}): choose another --out"
            raise SearchgymError(message) from error
        raise RunLockedError(f"{self.path} keeps reappearing: another process is starting in {self.run_dir}")

    def release(self) -> None:
        """Remove the lock file if this process holds it."""
        if self._held and self._holder() == tuple(self._owner.split(" ", 1)):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._held = False

    def _create(self) -> bool:
        try:
            descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w") as handle:
            handle.write(self._owner + "\n")
        return True

    def _just_created(self) -> bool:
        try:
            return time.time() - self.path.stat().st_mtime < _WRITE_GRACE_S
        except FileNotFoundError:
            return False

    def _holder(self) -> tuple[str, str] | None:
        """(host, pid) from the lock file; None when it is gone or unreadable (e.g. half written)."""
        try:
            host, _, pid = self.path.read_text().strip().partition(" ")
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        return (host, pid) if host and pid.isdigit() else None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()


def _is_stale(holder: tuple[str, str]) -> bool:
    host, pid = holder
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's process: cannot be checked from here
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it runs, as another user
    return False
