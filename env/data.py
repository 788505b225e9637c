"""QA datasets: FlashRAG files and folders, Search-R1 parquet files, ``datasets`` folders, bundled sets.

What a Search-R1 or FlashRAG user already has on disk loads as it is:

- a FlashRAG file ``<root>/nq/test.jsonl`` (one record ``{"id", "question", "golden_answers", ...}`` a line);
- a FlashRAG folder ``<root>/`` holding ``nq/``, ``triviaqa/``, ... each with ``train/dev/test.jsonl``;
- a Search-R1 ``.parquet`` file (``scripts/data_process/*.py``); a merged one (``qa_search_test_merge.py``)
  holds several ``data_source`` values, each selected as ``test.parquet#nq``;
- a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``), in either schema.

:func:`expand_benchmarks` turns each of these into one entry per benchmark (a table column of ``eval``).
"""

import gzip
import json
import os
from collections.abc import Iterator, Mapping, Sequence
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
SOURCE_SEPARATOR = "#"  # "test.parquet#nq": the rows of a merged Search-R1 file (or folder) from nq
# The split a folder is evaluated on when several are there: Search-R1's choice (test, else dev, else train).
SPLIT_PREFERENCE = ("test", "dev", "validation", "val", "train")
_FLASHRAG_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
_SAVED_DATASET_FILE = "dataset_info.json"  # in every folder `datasets` writes with save_to_disk
_SAVED_DATASET_DICT_FILE = "dataset_dict.json"


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
    """The examples of a bundled dataset (by name), a file or a ``datasets`` folder (by path), in order.

    Args:
        name_or_path: a name from :func:`dataset_names`; a FlashRAG ``.jsonl`` / ``.jsonl.gz`` file; a
            Search-R1 ``.parquet`` file, optionally with ``#source`` to keep one ``data_source``; or a
            folder written by ``datasets``' ``save_to_disk`` (a ``DatasetDict`` gives its test split, else
            dev, else train).
        limit: keep only the first ``limit`` examples.

    Raises:
        DatasetError: unknown name, missing file, unsupported suffix or a malformed record.
    """
    path, source = _split_source(name_or_path)
    if not path.exists():
        if isinstance(name_or_path, str) and os.sep not in name_or_path and not path.suffix:
            path = bundled_dataset_path(name_or_path)
        if not path.exists():
            raise DatasetError(
                f"dataset file {path} does not exist; bundled names: {', '.join(dataset_names())}"
            )
    if path.is_dir():
        path = _one_benchmark(path)
    if path.is_dir():
        examples = load_saved_dataset(path, limit=limit, source=source)
    elif source is not None and path.suffix != ".parquet":
        raise DatasetError(
            f"{name_or_path}: '{SOURCE_SEPARATOR}source' selects rows of a .parquet file or a folder"
        )
    elif path.name.endswith((".jsonl", ".jsonl.gz")):
        examples = load_flashrag_jsonl(path, limit=limit)
    elif path.suffix == ".parquet":
        examples = load_search_r1_parquet(path, limit=limit, source=source)
    else:
        raise DatasetError(
            f"{path}: unsupported file type; use .jsonl, .jsonl.gz (FlashRAG), .parquet (Search-R1) or a "
            "folder written by datasets' save_to_disk"
        )
    if not examples:
        raise DatasetError(f"{name_or_path} holds no examples")
    return examples


def expand_benchmarks(specs: Sequence[str]) -> tuple[str, ...]:
    """One entry per benchmark: folders and merged files are opened up, everything else kept as given.

    - a Search-R1 parquet file becomes ``file#source`` per ``data_source``, in order of first appearance
      (the merged ``test.parquet`` holds nq, triviaqa, ... whose ids repeat across sources);
    - a FlashRAG folder becomes its datasets' split files (``root/nq/test.jsonl``, ...; test, else dev, else
      train), and a FlashRAG dataset folder (``root/nq``) its split file;
    - a ``datasets`` ``DatasetDict`` folder becomes its split folder (test, else dev, else train), and a
      saved ``Dataset`` with several ``data_source`` values is split like a parquet file.

    Raises:
        DatasetError: a folder that holds none of these layouts.
    """
    expanded: list[str] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            candidates = _folder_benchmarks(path)
        elif path.suffix == ".parquet" and path.is_file():
            candidates = [path]
        else:
            expanded.append(spec)
            continue
        for benchmark in candidates:
            is_table = benchmark.suffix == ".parquet" or (benchmark / _SAVED_DATASET_FILE).is_file()
            sources = _data_sources(benchmark) if is_table else []
            expanded += [f"{benchmark}{SOURCE_SEPARATOR}{source}" for source in sources] or [str(benchmark)]
    return tuple(expanded)


def _split_source(name_or_path: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """``"test.parquet#nq"`` -> (``test.parquet``, ``"nq"``); a path without a selector has source None."""
    text = os.fspath(name_or_path)
    head, separator, source = text.rpartition(SOURCE_SEPARATOR)
    if separator and source and head and not Path(text).exists():
        return Path(head), source
    return Path(text), None


def _data_sources(path: Path) -> list[str]:
    """The ``data_source`` values of a parquet file or a saved ``Dataset`` folder, in order of appearance."""
    if path.is_dir():
        return _sources_of(_saved_rows(path))
    import pyarrow.parquet as pq

    if "data_source" not in pq.read_schema(path).names:
        return []
    column = pq.read_table(path, columns=["data_source"]).column("data_source").to_pylist()
    return [str(source) for source in dict.fromkeys(column) if source is not None]


def _one_benchmark(folder: Path) -> Path:
    found = _folder_benchmarks(folder)
    if len(found) > 1:
        names = ", ".join(path.parent.name for path in found)
        raise DatasetError(f"{folder} holds several datasets ({names}): load one of them, e.g. {found[0]}")
    return found[0]


def _folder_benchmarks(folder: Path) -> list[Path]:
    if (folder / _SAVED_DATASET_FILE).is_file():
        return [folder]
    if (folder / _SAVED_DATASET_DICT_FILE).is_file():
        return [
            folder / _preferred_split(folder, [child.name for child in folder.iterdir() if child.is_dir()])
        ]
    if _split_files(folder):
        return [_split_file(folder)]
    datasets = sorted(child for child in folder.iterdir() if child.is_dir() and _split_files(child))
    if not datasets:
        raise DatasetError(
            f"{folder} holds no QA data: expected FlashRAG's layout (<root>/nq/test.jsonl, ...), a dataset "
            "folder with train/dev/test.jsonl, or a folder written by datasets' save_to_disk"
        )
    return [_split_file(dataset) for dataset in datasets]


def _split_files(folder: Path) -> dict[str, Path]:
    """``{"test": folder/test.jsonl, ...}`` for the split files FlashRAG names by split."""
    found: dict[str, Path] = {}
    for child in folder.iterdir():
        for suffix in _FLASHRAG_SUFFIXES:
            split = child.name.removesuffix(suffix)
            if child.is_file() and child.name.endswith(suffix) and split in SPLIT_PREFERENCE:
                found.setdefault(split, child)
    return found


def _split_file(folder: Path) -> Path:
    files = _split_files(folder)
    return files[_preferred_split(folder, list(files))]


def _preferred_split(folder: Path, splits: list[str]) -> str:
    for split in SPLIT_PREFERENCE:
        if split in splits:
            return split
    if len(splits) == 1:
        return splits[0]
    raise DatasetError(
        f"{folder}: which split to use? it has {sorted(splits)}, none of {', '.join(SPLIT_PREFERENCE)}; "
        "give the split's path instead"
    )


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


def load_search_r1_parquet(
    path: str | os.PathLike[str], *, limit: int | None = None, source: str | None = None
) -> list[QAExample]:
    """Examples of a parquet file made by Search-R1's data scripts (``scripts/data_process/*.py``).

    Gold answers come from ``reward_model.ground_truth.target``, the source from ``data_source``; the
    question from the ``question`` column, or else from the prompt's last ``Question:`` line. The id is
    the ``id`` column, or ``{data_source}_{split}_{index}`` from ``extra_info``, or the row number. A parquet
    file of FlashRAG records (``question``, ``golden_answers``) reads too.

    Args:
        path: the file.
        limit: keep only the first ``limit`` examples (after ``source`` selected its rows).
        source: keep only the rows whose ``data_source`` is this (a merged file holds several).

    Raises:
        DatasetError: the file lacks the columns above, or no row has ``source``.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    return _examples(pq.read_table(path).to_pylist(), where=str(path), source=source, limit=limit)


def load_saved_dataset(
    path: str | os.PathLike[str], *, limit: int | None = None, source: str | None = None
) -> list[QAExample]:
    """Examples of a folder written by ``datasets``' ``save_to_disk``, in FlashRAG's or Search-R1's schema.

    Args:
        path: the folder (a ``DatasetDict`` gives its test split, else dev, else train).
        limit: keep only the first ``limit`` examples (after ``source`` selected its rows).
        source: keep only the rows whose ``data_source`` is this.

    Raises:
        DatasetError: ``datasets`` is not installed, the folder is not a saved dataset, a record is
            malformed, or no row has ``source``.
    """
    path = Path(path)
    return _examples(_saved_rows(path), where=str(path), source=source, limit=limit)


def _saved_rows(path: Path) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as error:
        raise DatasetError(
            f"{path} is a folder written by datasets' save_to_disk: `pip install datasets` to read it"
        ) from error
    try:
        saved = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise DatasetError(f"{path} is not a folder written by datasets' save_to_disk ({error})") from error
    if isinstance(saved, datasets.DatasetDict):
        saved = saved[_preferred_split(path, list(saved))]
    return saved.to_list()


def _examples(
    rows: list[dict[str, Any]], *, where: str, source: str | None, limit: int | None
) -> list[QAExample]:
    if source is not None:
        available = _sources_of(rows)
        rows = [row for row in rows if row.get("data_source") == source]
        if not rows:
            raise DatasetError(
                f"{where} has no rows with data_source {source!r}; it has {available or 'none'}"
            )
        where += SOURCE_SEPARATOR + source
    if limit is not None:
        rows = rows[:limit]
    return [_from_row(row, where=f"{where}:row {index}", row_number=index) for index, row in enumerate(rows)]


def _sources_of(rows: list[dict[str, Any]]) -> list[str]:
    """The distinct ``data_source`` values, in order of first appearance."""
    return [
        str(source) for source in dict.fromkeys(row.get("data_source") for row in rows) if source is not None
    ]


def _from_row(row: Mapping[str, Any], *, where: str, row_number: int) -> QAExample:
    """A Search-R1 row (its answers under ``reward_model``) or a FlashRAG record."""
    if "reward_model" in row or "golden_answers" not in row:
        return _from_search_r1_row(row, where=where, row_number=row_number)
    return QAExample.from_record(row, where=where, default_id=str(row_number))


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
