"""QA datasets: FlashRAG jsonl files, the bundled sets by name, and Search-R1's parquet files."""

import gzip
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from searchgym import paths
from searchgym.errors import SearchgymError

WIKI_MINI_SETS = {"wiki-mini-train": "train.jsonl", "wiki-mini-dev": "dev.jsonl"}
BENCHMARKS = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
_CORE_KEYS = frozenset({"id", "question", "golden_answers", "source", "gold_doc_ids"})
# Search-R1's templates end with "Question: {question}\n"; used when a parquet file has no question column.
_SEARCH_R1_QUESTION_MARK = "Question:"


class DatasetError(SearchgymError):
    """A QA dataset is missing, unknown or malformed."""


@dataclass(frozen=True, slots=True)
class QAExample:
    """One question with its gold answers (FlashRAG / Search-R1 format).

    Attributes:
        id: unique within its dataset.
        question: the question text, verbatim.
        golden_answers: every accepted answer; empty when unknown (rewards are then None, with a reason).
        source: the dataset it came from (``"popqa/test"``, a Search-R1 ``data_source``), when known.
        gold_doc_ids: corpus ids of the supporting passages, when known.
        extra: every other field of the record, kept as read.
    """

    id: str
    question: str
    golden_answers: tuple[str, ...]
    source: str | None = None
    gold_doc_ids: tuple[str, ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @classmethod
    def from_record(
        cls, record: Mapping[str, Any], *, where: str, default_id: str | None = None
    ) -> "QAExample":
        """Build from a FlashRAG record ``{"id", "question", "golden_answers", ...}``.

        A single answer string is accepted for ``golden_answers``, and numbers are turned into strings.

        Args:
            record: the parsed record.
            where: where it was read, for error messages (``"file.jsonl:12"``).
            default_id: the id to use when the record has none.

        Raises:
            DatasetError: a required field is missing or has the wrong type.
        """
        question = record.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DatasetError(f"{where}: needs a non-empty 'question' string (keys found: {sorted(record)})")
        raw_id = record.get("id", default_id)
        if raw_id is None:
            raise DatasetError(f"{where}: needs an 'id'")
        if "golden_answers" not in record:
            raise DatasetError(
                f"{where}: needs 'golden_answers', a list of strings (keys found: {sorted(record)})"
            )
        gold_doc_ids = record.get("gold_doc_ids")
        return cls(
            id=str(raw_id),
            question=question,
            golden_answers=_answer_strings(record["golden_answers"], where=where),
            source=None if record.get("source") is None else str(record["source"]),
            gold_doc_ids=None if gold_doc_ids is None else tuple(str(doc_id) for doc_id in gold_doc_ids),
            extra={key: value for key, value in record.items() if key not in _CORE_KEYS},
        )

    def to_record(self) -> dict[str, Any]:
        """The FlashRAG record of this example (``from_record(to_record())`` gives it back)."""
        record: dict[str, Any] = {
            "id": self.id,
            "question": self.question,
            "golden_answers": list(self.golden_answers),
        }
        if self.source is not None:
            record["source"] = self.source
        if self.gold_doc_ids is not None:
            record["gold_doc_ids"] = list(self.gold_doc_ids)
        return record | dict(self.extra)


def dataset_names() -> list[str]:
    """The bundled datasets that :func:`load_dataset` knows by name."""
    return [*WIKI_MINI_SETS, *BENCHMARKS]


def bundled_dataset_path(name: str) -> Path:
    """The file of a bundled dataset under ``searchgym.paths.DATA_DIR``.

    Raises:
        DatasetError: the name is not one of :func:`dataset_names`.
    """
    if name in WIKI_MINI_SETS:
        return paths.QA_DIR / WIKI_MINI_SETS[name]
    if name in BENCHMARKS:
        return paths.BENCHMARK_DIR / f"{name}.jsonl"
    raise DatasetError(
        f"unknown dataset {name!r}: use one of {', '.join(dataset_names())}, "
        "or the path of a .jsonl, .jsonl.gz or .parquet file"
    )


def load_dataset(name_or_path: str | os.PathLike[str], *, limit: int | None = None) -> list[QAExample]:
    """The examples of a bundled dataset (by name) or of a file (by path), in file order.

    Args:
        name_or_path: a name from :func:`dataset_names`, or a FlashRAG ``.jsonl`` / ``.jsonl.gz`` file,
            or a Search-R1 ``.parquet`` file.
        limit: keep only the first ``limit`` examples.

    Raises:
        DatasetError: unknown name, missing file, unsupported suffix or a malformed record.
    """
    path = Path(name_or_path)
    if not path.exists():
        if isinstance(name_or_path, str) and os.sep not in name_or_path and not path.suffix:
            path = bundled_dataset_path(name_or_path)
        if not path.exists():
            raise DatasetError(
                f"dataset file {path} does not exist; bundled names: {', '.join(dataset_names())}"
            )
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        examples = load_flashrag_jsonl(path, limit=limit)
    elif path.suffix == ".parquet":
        examples = load_search_r1_parquet(path, limit=limit)
    else:
        raise DatasetError(
            f"{path}: unsupported file type; use .jsonl, .jsonl.gz (FlashRAG) or .parquet (Search-R1)"
        )
    if not examples:
        raise DatasetError(f"{path} holds no examples")
    return examples


def load_flashrag_jsonl(path: str | os.PathLike[str], *, limit: int | None = None) -> list[QAExample]:
    """Examples of a FlashRAG jsonl file (gzip-compressed when the name ends in ``.gz``).

    Raises:
        DatasetError: a line is not a JSON object or misses a required field.
    """
    path = Path(path)
    examples: list[QAExample] = []
    for line_number, record in _read_jsonl(path):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(
            QAExample.from_record(
                record, where=f"{path}:{line_number}", default_id=f"{path.stem}-{line_number}"
            )
        )
    return examples


def load_search_r1_parquet(path: str | os.PathLike[str], *, limit: int | None = None) -> list[QAExample]:
    """Examples of a parquet file made by Search-R1's data scripts (``scripts/data_process/*.py``).

    Gold answers come from ``reward_model.ground_truth.target``, the source from ``data_source``; the
    question from the ``question`` column, or else from the prompt's last ``Question:`` line. The id is
    the ``id`` column, or ``{data_source}_{split}_{index}`` from ``extra_info``, or the row number.

    Raises:
        DatasetError: the file lacks the columns above.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    rows = pq.read_table(path).to_pylist()
    if limit is not None:
        rows = rows[:limit]
    return [
        _from_search_r1_row(row, where=f"{path}:row {index}", row_number=index)
        for index, row in enumerate(rows)
    ]


def _from_search_r1_row(row: Mapping[str, Any], *, where: str, row_number: int) -> QAExample:
    ground_truth = (row.get("reward_model") or {}).get("ground_truth") or {}
    if "target" not in ground_truth:
        raise DatasetError(
            f"{where}: needs reward_model.ground_truth.target (Search-R1 format); found {sorted(row)}"
        )
    source = row.get("data_source")
    record = {
        key: value
        for key, value in row.items()
        if key not in {"prompt", "reward_model", "data_source", "golden_answers"}
    }
    record |= {
        "id": row.get("id", _search_r1_id(row, row_number)),
        "question": row.get("question") or _question_from_prompt(row.get("prompt"), where=where),
        "golden_answers": ground_truth["target"],
        "source": source,
    }
    return QAExample.from_record(record, where=where)


def _search_r1_id(row: Mapping[str, Any], row_number: int) -> str:
    extra_info = row.get("extra_info") or {}
    if "index" in extra_info:
        return f"{row.get('data_source', 'data')}_{extra_info.get('split', 'split')}_{extra_info['index']}"
    return str(row_number)


def _question_from_prompt(prompt: Any, *, where: str) -> str:
    messages = prompt if isinstance(prompt, list) else []
    contents = [message.get("content") or "" for message in messages if isinstance(message, Mapping)]
    text = contents[-1] if contents else ""
    _, marker, question = text.rpartition(_SEARCH_R1_QUESTION_MARK)
    if not marker or not question.strip():
        raise DatasetError(
            f"{where}: no 'question' column and no '{_SEARCH_R1_QUESTION_MARK}' line in the prompt; "
            "add a 'question' column to the file"
        )
    return question.strip()


def _answer_strings(value: Any, *, where: str) -> tuple[str, ...]:
    if isinstance(value, str | int | float):
        return (str(value),)
    if isinstance(value, list | tuple) and all(isinstance(item, str | int | float) for item in value):
        return tuple(str(item) for item in value)
    raise DatasetError(f"{where}: 'golden_answers' must be a list of strings, got {type(value).__name__}")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"{path}:{line_number}: not valid JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise DatasetError(
                    f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}"
                )
            yield line_number, record
