"""A JSONL file indexed once by byte offsets: summaries in memory, whole records read one at a time.

A run can hold 100k episodes of several kB each, so the viewer never loads a whole file per request:
the file is scanned once (and then only the bytes appended since), each complete line's offset is kept
with a small summary, and an episode page reads its one line back with a positioned read.
"""

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from searchgym.errors import SearchgymError

Summary = TypeVar("Summary")


@dataclass(frozen=True, slots=True)
class LineProblem:
    """A complete line that could not be read as a record (it is skipped, and the page says so)."""

    line: int
    message: str


class RecordNotFound(SearchgymError):
    """No record starts at the line asked for."""


class JsonlIndex(Generic[Summary]):
    """The records of a JSONL file that may still be growing (a running job appends to it).

    A last line without its newline is a record still being written (or cut by a kill): it is left out
    until it is complete. A complete line that is not a JSON object is reported in :attr:`problems`.
    When the file shrinks (a resumed run cut it), it is indexed again from the start.

    Args:
        path: the JSONL file.
        summarize: builds the in-memory summary of a record from its parsed object and its line number;
            raises ``KeyError``, ``TypeError`` or ``ValueError`` for a line that is not such a record.
        head_until: where the fields ``summarize`` needs end, when every record puts them first: the
            first top-level key after them, as it is written (``b', "prompt": '``). Indexing then parses
            each line's head only, not its bulk (a training sample's tokens are most of its bytes); a
            line without it is parsed whole.
    """

    def __init__(
        self,
        path: Path,
        summarize: Callable[[dict[str, Any], int], Summary],
        *,
        head_until: bytes | None = None,
    ) -> None:
        self.path = path
        self._summarize = summarize
        self._head_until = head_until
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.summaries: list[Summary] = []
        self.problems: list[LineProblem] = []
        self._offsets: list[tuple[int, int]] = []  # (offset, length) of each summarized line
        self._position_of_line: dict[int, int] = {}
        self._indexed_bytes = 0
        self._lines_seen = 0
        self.bytes_read = 0
        """Bytes read from the file so far, indexing and records together (what the tests bound)."""

    def refresh(self) -> None:
        """Index the lines appended since the last call (all of them the first time)."""
        with self._lock:
            size = self.path.stat().st_size if self.path.is_file() else 0
            if size < self._indexed_bytes:
                self._reset()
            if size == self._indexed_bytes:
                return
            with self.path.open("rb") as handle:
                handle.seek(self._indexed_bytes)
                for raw in handle:
                    self.bytes_read += len(raw)
                    if not raw.endswith(b"\n"):
                        break  # a line still being written: indexed once it is complete
                    self._add_line(raw)

    def _add_line(self, raw: bytes) -> None:
        offset, self._indexed_bytes = self._indexed_bytes, self._indexed_bytes + len(raw)
        self._lines_seen += 1
        if not raw.strip():
            return
        try:
            record = self._parse_head(raw)
            if not isinstance(record, dict):
                raise TypeError(f"a JSON {type(record).__name__}, not an object")
            summary = self._summarize(record, self._lines_seen)
        except (ValueError, KeyError, TypeError) as error:
            self.problems.append(LineProblem(self._lines_seen, f"{type(error).__name__}: {error}"))
            return
        self._position_of_line[self._lines_seen] = len(self.summaries)
        self.summaries.append(summary)
        self._offsets.append((offset, len(raw)))

    @property
    def version(self) -> tuple[int, int]:
        """Changes whenever the indexed records do (for caches of what is computed from them)."""
        return (id(self.summaries), self._indexed_bytes)

    def _parse_head(self, raw: bytes) -> Any:
        # Inside a JSON string a quote is escaped, so the unescaped key can only be the top-level one.
        cut = raw.find(self._head_until) if self._head_until is not None else -1
        if cut > 0:
            try:
                return json.loads(raw[:cut] + b"}")
            except ValueError:
                pass
        return json.loads(raw)

    def summary_at_line(self, line: int) -> Summary:
        """The summary of the record on ``line`` (1-based).

        Raises:
            RecordNotFound: no record is on that line.
        """
        return self.summaries[self._position(line)]

    def read(self, line: int) -> dict[str, Any]:
        """The full record on ``line`` (1-based), read from the file alone.

        Raises:
            RecordNotFound: no record is on that line.
            ValueError: the line is not a JSON object (its head was, when indexed; or the file changed).
        """
        offset, length = self._offsets[self._position(line)]
        with self.path.open("rb") as handle:
            raw = os.pread(handle.fileno(), length, offset)
        self.bytes_read += len(raw)
        record = json.loads(raw)
        if not isinstance(record, dict):
            raise ValueError(f"a JSON {type(record).__name__}, not an object")
        return record

    def _position(self, line: int) -> int:
        position = self._position_of_line.get(line)
        if position is None:
            raise RecordNotFound(f"{self.path.name} has no record on line {line}")
        return position
