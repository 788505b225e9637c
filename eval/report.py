"""Run files and tables: ``predictions.jsonl``, ``results.json``, the markdown tables and the paper's numbers.

A run directory holds ``run.json`` (the settings, written before the first question), ``predictions.jsonl``
(one :class:`~searchgym.eval.records.Prediction` per line, appended batch by batch so a killed run can
resume) and, at
the end, ``results.json`` and ``results.md``. Tables put datasets in columns, like the Search-R1 paper.
"""

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

from searchgym import __version__
from searchgym.errors import SearchgymError
from searchgym.eval.config import EvalConfig
from searchgym.eval.metrics import AVERAGE, DatasetMetrics, macro_average, summarize
from searchgym.eval.records import Prediction

RUN_FILE = "run.json"
PREDICTIONS_FILE = "predictions.jsonl"
RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
REPORTED_FILE = Path(__file__).with_name("search_r1_reported.yaml")
MISSING = "–"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """How one metric is labelled and printed."""

    field: str
    label: str
    digits: int


METRICS = (
    MetricSpec("exact_match", "EM", 3),
    MetricSpec("cover_exact_match", "cover-EM", 3),
    MetricSpec("f1", "F1", 3),
    MetricSpec("valid_answer_rate", "valid answer", 3),
    MetricSpec("mean_searches", "searches / question", 2),
    MetricSpec("mean_turns", "turns / question", 2),
    MetricSpec("mean_response_tokens", "response tokens / question", 1),
    MetricSpec("gold_recall", "gold-passage recall", 3),
    MetricSpec("num_examples", "questions", 0),
    MetricSpec("num_errors", "errors", 0),
)
METRIC_BY_NAME = {spec.field: spec for spec in METRICS}
COMPARABLE_METRICS = ("exact_match", "cover_exact_match", "f1", "valid_answer_rate", "mean_searches")


@dataclass(frozen=True, slots=True)
class RunResults:
    """Everything ``results.json`` holds.

    Attributes:
        config: the run's settings.
        per_dataset: metrics per dataset, in the order of ``config.benchmarks``.
        average: the macro average over ``per_dataset``.
        seconds: wall-clock seconds spent generating and retrieving in this process (a resumed run counts
            only its own part).
        questions_per_second: questions finished by this process per second.
    """

    config: EvalConfig
    per_dataset: list[DatasetMetrics]
    average: DatasetMetrics
    seconds: float
    questions_per_second: float

    @classmethod
    def from_predictions(
        cls, config: EvalConfig, predictions: Iterable[Prediction], *, seconds: float, num_new: int
    ) -> Self:
        """Aggregate the predictions of the run's datasets (predictions of other datasets are ignored).

        Raises:
            ValueError: a dataset of ``config.benchmarks`` has no prediction.
        """
        by_dataset = summarize(predictions)
        missing = [name for name in config.dataset_labels if name not in by_dataset]
        if missing:
            raise ValueError(f"no predictions for {missing}")
        per_dataset = [by_dataset[name] for name in config.dataset_labels]
        speed = num_new / seconds if seconds > 0 else 0.0
        return cls(config, per_dataset, macro_average(per_dataset), seconds, speed)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of ``results.json``."""
        return {
            "searchgym_version": __version__,
            "config": self.config.to_dict(),
            "datasets": {m.dataset: asdict(m) for m in self.per_dataset},
            AVERAGE: asdict(self.average),
            "seconds": self.seconds,
            "questions_per_second": self.questions_per_second,
        }

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> Self:
        """Rebuild from ``to_dict`` output."""
        return cls(
            config=EvalConfig.from_dict(document["config"]),
            per_dataset=[DatasetMetrics.from_dict(row) for row in document["datasets"].values()],
            average=DatasetMetrics.from_dict(document[AVERAGE]),
            seconds=document["seconds"],
            questions_per_second=document["questions_per_second"],
        )


@dataclass(frozen=True, slots=True)
class TableRow:
    """One row of a comparison table: a label and one value per dataset it covers."""

    label: str
    values: dict[str, float]


@dataclass(frozen=True, slots=True)
class ReportedRow:
    """One row of the Search-R1 paper's tables (see ``search_r1_reported.yaml`` for the source).

    Attributes:
        name: ``<model>/<method>``, e.g. ``qwen2.5-7b/rag``.
        table: the paper's table number.
        exact_match: EM per dataset.
        average: the average as printed in the paper.
        note: a remark on the row's numbers, if any.
    """

    name: str
    table: int
    exact_match: dict[str, float]
    average: float
    note: str | None = None


# ---------------------------------------------------------------------------------------------- run files
def write_json_atomic(path: Path, document: dict[str, Any]) -> None:
    """Write JSON so that a reader never sees half a file: a temporary file, then a rename."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def write_run_files(run_dir: Path, results: RunResults) -> None:
    """Write ``results.json`` and ``results.md`` (the table printed on the console)."""
    write_json_atomic(run_dir / RESULTS_FILE, results.to_dict())
    (run_dir / TABLE_FILE).write_text(format_run_table(results) + "\n", encoding="utf-8")


def load_results(run_dir: Path) -> RunResults:
    """Read a finished run's ``results.json``.

    Raises:
        SearchgymError: the directory has no readable ``results.json``.
    """
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise SearchgymError(f"{path} not found: is {run_dir} a finished `searchgym eval` run directory?")
    try:
        return RunResults.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise SearchgymError(f"{path} is not a searchgym results file ({error})") from error


class PredictionsWriter:
    """Appends predictions to ``predictions.jsonl``, flushed after every batch so a kill loses at most one."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, predictions: Iterable[Prediction]) -> None:
        """Append one JSON line per prediction and flush."""
        for prediction in predictions:
            self._file.write(json.dumps(prediction.to_dict(), ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def read_predictions(path: Path, *, repair: bool = False) -> list[Prediction]:
    """Read ``predictions.jsonl``; drop a last line cut off by a kill (cut it off too if ``repair``).

    Raises:
        SearchgymError: a complete line is not a prediction record.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    complete_end = data.rfind(b"\n") + 1
    if repair and complete_end < len(data):
        with path.open("r+b") as file:
            file.truncate(complete_end)
    predictions = []
    for number, line in enumerate(data[:complete_end].split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            predictions.append(Prediction.from_dict(json.loads(line.decode("utf-8"))))
        except (ValueError, TypeError, AttributeError, RecursionError) as error:  # bad UTF-8 is a ValueError
            raise SearchgymError(
                f"{path}, line {number}, is not a prediction record ({error}); "
                "fix or delete that line, or start a new run with another --out"
            ) from error
    return predictions


# ---------------------------------------------------------------------------------------------- tables
def format_value(value: float | None, digits: int) -> str:
    """A table cell: fixed digits, or a dash for a missing value."""
    if value is None:
        return MISSING
    return f"{value:.{digits}f}" if digits else str(round(value))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table, first column left-aligned and the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_run_table(results: RunResults) -> str:
    """One run: a row per metric, a column per dataset and the average, like the paper's tables."""
    columns = [*results.per_dataset, results.average]
    header = ["metric", *(m.dataset for m in results.per_dataset), "avg"]
    rows = [
        [spec.label, *(format_value(getattr(m, spec.field), spec.digits) for m in columns)]
        for spec in METRICS
    ]
    config = results.config
    title = (
        f"**{config.model or 'SmolLM2-135M-Instruct (embedded)'}**, mode {config.mode}, "
        f"{results.questions_per_second:.2f} questions/s"
    )
    return title + "\n\n" + markdown_table(header, rows)


def run_row(label: str, results: RunResults, metric: str) -> TableRow:
    """A comparison row holding one metric of every dataset of a run."""
    return TableRow(label, {m.dataset: getattr(m, metric) for m in results.per_dataset})


def format_comparison(rows: Sequence[TableRow], *, metric: str = "exact_match") -> str:
    """Several runs (and paper rows) side by side: a row each, a column per dataset, then the average.

    The columns are the datasets of the rows in order of first appearance, except that rows marked as
    references (paper rows, whose label starts with ``paper:``) never add a column. A row's average is the
    mean over the shown columns, and is left blank when the row lacks one of them.
    """
    datasets: list[str] = []
    for row in rows:
        if not row.label.startswith("paper:"):
            datasets += [name for name in row.values if name not in datasets]
    spec = METRIC_BY_NAME[metric]
    cells = []
    for row in rows:
        shown = [row.values.get(name) for name in datasets]
        complete = [value for value in shown if value is not None]
        average = sum(complete) / len(complete) if complete and len(complete) == len(shown) else None
        cells.append([row.label, *(format_value(v, spec.digits) for v in [*shown, average])])
    return f"{spec.label}\n\n" + markdown_table(["run", *datasets, "avg"], cells)


# ---------------------------------------------------------------------------------------------- the paper
def load_reported(path: Path = REPORTED_FILE) -> list[ReportedRow]:
    """The Search-R1 paper's EM rows from the bundled file (or another file of the same layout)."""
    document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    datasets = document["datasets"]
    return [
        ReportedRow(
            name=row["name"],
            table=row["table"],
            exact_match=dict(zip(datasets, row["em"], strict=True)),
            average=row["average"],
            note=row.get("note"),
        )
        for row in document["rows"]
    ]


def select_reported(rows: Sequence[ReportedRow], selectors: Sequence[str]) -> list[ReportedRow]:
    """The rows named by ``selectors``: a full name (``qwen2.5-7b/rag``), a model (``qwen2.5-7b``) or ``all``.

    Raises:
        SearchgymError: a selector matches no row; the message lists the valid ones.
    """
    chosen: list[ReportedRow] = []
    for selector in selectors:
        found = [row for row in rows if selector in ("all", row.name, row.name.split("/")[0])]
        if not found:
            models = sorted({row.name.split("/")[0] for row in rows})
            raise SearchgymError(
                f"no reported row matches {selector!r}: use all, a model ({', '.join(models)}) "
                f"or a full row name such as {rows[0].name}"
            )
        chosen += [row for row in found if row not in chosen]
    return chosen


def reported_table_rows(rows: Sequence[ReportedRow]) -> list[TableRow]:
    """Comparison rows for paper numbers, labelled ``paper: <name>``."""
    return [TableRow(f"paper: {row.name}", row.exact_match) for row in rows]


def compare_runs(
    run_dirs: Sequence[Path], *, metric: str = "exact_match", reported: Sequence[str] = ()
) -> str:
    """The comparison table of finished runs, with the chosen paper rows below them (EM only).

    Two runs of the same questions are also paired question by question (EM, cover-EM or F1), with a
    sign test of the questions each got right that the other did not.

    Raises:
        SearchgymError: a directory is not a finished run, a metric is unknown, or paper rows are asked
            for another metric than EM (the paper reports EM only).
    """
    if metric not in COMPARABLE_METRICS:
        choices = ", ".join(COMPARABLE_METRICS)
        raise SearchgymError(f"unknown metric {metric!r} to compare: choose one of {choices}")
    if reported and metric != "exact_match":
        raise SearchgymError("the paper reports EM only: drop --reported or compare --metric exact_match")
    paper_rows = reported_table_rows(select_reported(load_reported(), reported)) if reported else []
    rows = []
    for run_dir in run_dirs:
        results = load_results(Path(run_dir))
        rows.append(run_row(f"{Path(run_dir).name} ({results.config.mode})", results, metric))
    table = format_comparison([*rows, *paper_rows], metric=metric)
    if len(run_dirs) != 2 or metric not in PAIRED_METRICS:
        return table
    before, after = run_dirs
    paired = paired_comparison(before, after, metric=metric)
    if paired is None:
        return table
    return table + "\n\n" + format_paired(paired, str(before), str(after), metric=metric)


# ---------------------------------------------------------------------------------------------- paired
PAIRED_METRICS = ("exact_match", "cover_exact_match", "f1")
"""Per-question scores: these can be compared question by question."""


@dataclass(frozen=True, slots=True)
class PairedComparison:
    """Two runs on the same questions, question by question.

    Attributes:
        questions: questions both runs answered.
        gained: questions the second run scored higher on.
        lost: questions it scored lower on.
        p_value: two-sided exact sign test of ``gained`` against ``lost`` (ties dropped): how likely so
            lopsided a split is when neither run is better.
    """

    questions: int
    gained: int
    lost: int
    p_value: float


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: P(a split at least this uneven) under Binomial(wins + losses, 1/2)."""
    trials = wins + losses
    tail = sum(math.comb(trials, k) for k in range(min(wins, losses) + 1)) / 2**trials
    return min(1.0, 2 * tail)


def paired_comparison(before: Path, after: Path, *, metric: str = "exact_match") -> PairedComparison | None:
    """Score changes from run ``before`` to run ``after`` on the questions both answered (None: none).

    Raises:
        SearchgymError: the metric has no per-question score.
    """
    if metric not in PAIRED_METRICS:
        raise SearchgymError(
            f"{metric} has no per-question score: pair on one of {', '.join(PAIRED_METRICS)}"
        )

    def scores(run_dir: Path) -> dict[tuple[str, str], float]:
        predictions = read_predictions(Path(run_dir) / PREDICTIONS_FILE)
        return {(p.dataset, p.example_id): getattr(p, metric) for p in predictions}

    first, second = scores(before), scores(after)
    shared = first.keys() & second.keys()
    if not shared:
        return None
    gained = sum(second[key] > first[key] for key in shared)
    lost = sum(second[key] < first[key] for key in shared)
    return PairedComparison(len(shared), gained, lost, sign_test(gained, lost))


def format_paired(comparison: PairedComparison, before: str, after: str, *, metric: str) -> str:
    """One line: how many questions each run won over the other, and the sign test."""
    label = METRIC_BY_NAME[metric].label
    return (
        f"paired {label}, {after} against {before}, {comparison.questions} questions: "
        f"{comparison.gained} better, {comparison.lost} worse "
        f"(two-sided sign test p = {comparison.p_value:.2g})"
    )
