r"""Streaming reader for NQ-style corpora (``.jsonl`` or ``.jsonl.gz``, one JSON object a line).

Two row layouts are accepted, both as Search-R1 and FlashRAG users have them:
``{"id": "12", "contents": "\"Title\"\ntext"}`` (DPR wiki-18) and
``{"id": "12", "title": "Title", "text": "text"}``.
Rows are read one at a time, so a 21M-line wiki-18 file is never held in memory; a malformed row stops the
read with its line number instead of a stack trace deep inside an indexer. Ids must be unique (``"1"`` and
``1`` are the same id): a repeated id would make one id name several passages, so the read fails at its end
naming both lines (8 bytes a document are kept to find them).
"""

import gzip
import hashlib
import json
import zlib
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from searchgym.errors import SearchgymError

CORPUS_SUFFIXES = (".jsonl", ".jsonl.gz")
_PROGRESS_EVERY = 1000  # documents between progress-bar updates


class CorpusError(SearchgymError):
    """A corpus file that is missing, unreadable or has a malformed row."""


@dataclass(frozen=True, slots=True)
class Document:
    """One corpus row, normalised to the DPR wiki-18 layout.

    Attributes:
        id: the row id, always a string (integer ids are converted).
        contents: ``"Title"`` on the first line, the text after it.
    """

    id: str
    contents: str


def parse_row(row: Any) -> Document:
    """Normalise one decoded JSON row to a :class:`Document`.

    Raises:
        ValueError: the row is not an object with an id and either ``contents`` or ``title`` and ``text``.
    """
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if "id" not in row:
        raise ValueError(f"no 'id' key (keys: {sorted(row)})")
    doc_id = row["id"]
    if isinstance(doc_id, bool) or not isinstance(doc_id, str | int):
        raise ValueError(f"'id' must be a string or an integer, got {doc_id!r}")
    if isinstance(row.get("contents"), str):
        document = Document(str(doc_id), row["contents"])
    elif isinstance(row.get("title"), str) and isinstance(row.get("text"), str):
        document = Document(str(doc_id), f'"{row["title"]}"\n{row["text"]}')
    else:
        raise ValueError(f"expected a string 'contents', or string 'title' and 'text' (keys: {sorted(row)})")
    for name, text in (("id", document.id), ("text", document.contents)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:  # JSON allows "\ud800"; UTF-8, and every index, does not
            raise ValueError(
                f"its {name} holds an unpaired surrogate ({text[error.start]!r} at character {error.start})"
            ) from None
    return document


class CorpusReader:
    """Iterates over the documents of one corpus file, tracking how far into the file it has read.

    Args:
        path: a ``.jsonl`` or ``.jsonl.gz`` file.

    Raises:
        CorpusError: the file does not exist or has another suffix.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CorpusError(f"corpus file {self.path} does not exist")
        if not self.path.name.endswith(CORPUS_SUFFIXES):
            raise CorpusError(f"corpus file {self.path} must end with .jsonl or .jsonl.gz")
        self.size_bytes = self.path.stat().st_size
        self.bytes_read = 0

    def __iter__(self) -> Iterator[Document]:
        """Yield each document in file order.

        Raises:
            CorpusError: a row is malformed or not UTF-8, or the gzip stream is corrupt; the message names
                the line. Also raised for a file without any document.
        """
        line_number = documents = 0
        id_hashes = array("q")  # hash(id) of every document, in order
        with self.path.open("rb") as raw:
            compressed = self.path.name.endswith(".gz")
            stream: Iterable[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
            try:
                for line_number, line in enumerate(stream, start=1):
                    self.bytes_read = raw.tell()
                    if line.strip():
                        documents += 1
                        document = self._parse_line(line, line_number)
                        id_hashes.append(hash(document.id))
                        yield document
            except (OSError, EOFError, zlib.error) as error:
                raise CorpusError(
                    f"{self.path}, line {line_number + 1}: cannot be read ({error}); the file must be "
                    "JSON lines, gzip-compressed or not"
                ) from error
        if documents == 0:
            raise CorpusError(f"corpus file {self.path} has no documents")
        self._check_unique_ids(id_hashes)

    def _check_unique_ids(self, id_hashes: "array[int]") -> None:
        """Raise on the first repeated id; equal hashes are confirmed by reading their ids again."""
        hashes = np.frombuffer(id_hashes, dtype=np.int64)
        order = np.argsort(hashes, kind="stable")
        same = hashes[order[1:]] == hashes[order[:-1]]
        if not same.any():
            return
        suspects = set(order[1:][same].tolist()) | set(order[:-1][same].tolist())
        first_line: dict[str, int] = {}
        for position, (line_number, doc_id) in enumerate(self._ids_with_lines()):
            if position not in suspects:
                continue
            if doc_id in first_line:
                raise CorpusError(
                    f"{self.path}, line {line_number}: id {doc_id!r} was already used on line "
                    f'{first_line[doc_id]}; ids must be unique ("1" and 1 are the same id), or searches '
                    "return different passages under one id"
                )
            first_line[doc_id] = line_number

    def _ids_with_lines(self) -> Iterator[tuple[int, str]]:
        with self.path.open("rb") as raw:
            compressed = self.path.name.endswith(".gz")
            stream: Iterable[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
            for line_number, line in enumerate(stream, start=1):
                if line.strip():
                    yield line_number, self._parse_line(line, line_number).id

    def _parse_line(self, line: bytes, line_number: int) -> Document:
        try:
            return parse_row(json.loads(line.decode("utf-8")))
        except UnicodeDecodeError as error:
            reason = f"not UTF-8 ({error.reason} at byte {error.start})"
        except json.JSONDecodeError as error:
            reason = f"not valid JSON ({error.msg} at column {error.colno})"
        except RecursionError:
            reason = "nested too deeply to be a corpus row"
        except ValueError as error:
            reason = str(error)
        raise CorpusError(
            f"{self.path}, line {line_number}: {reason}; each line must be one JSON object such as "
            '{"id": "1", "contents": "\\"Title\\"\\ntext"} or {"id": "1", "title": "...", "text": "..."}'
        )


def read_corpus(
    path: str | Path, *, progress: bool = False, desc: str = "reading corpus"
) -> Iterator[Document]:
    """Stream the documents of ``path``, optionally with a progress bar over the file's bytes.

    The bar counts bytes of the file as stored (compressed bytes for ``.gz``), so its total and ETA are
    right without a first pass to count lines.
    """
    reader = CorpusReader(path)
    if not progress:
        yield from reader
        return
    with tqdm(total=reader.size_bytes, unit="B", unit_scale=True, desc=desc) as bar:
        for count, document in enumerate(reader, start=1):
            if count % _PROGRESS_EVERY == 0:
                bar.set_postfix(documents=count, refresh=False)
                bar.update(reader.bytes_read - bar.n)
            yield document
        bar.update(reader.size_bytes - bar.n)


def file_sha256(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes (the corpus checksum a manifest records)."""
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def batched(documents: Iterable[Document], size: int) -> Iterator[list[Document]]:
    """Group a document stream into lists of ``size`` (the last may be shorter)."""
    batch: list[Document] = []
    for document in documents:
        batch.append(document)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
