"""Per-question scores aggregated into per-dataset metrics, and the average across datasets.

The per-question scores (EM, cover-EM, F1) are computed once, by the training reward code, and stored in
each :class:`~searchgym.eval.records.Prediction`; this module only averages them, so a table can always be
rebuilt
from a ``predictions.jsonl`` file.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from statistics import fmean

from searchgym.eval.records import Prediction

AVERAGE = "average"


@dataclass(frozen=True, slots=True)
class DatasetMetrics:
    """The metrics of one dataset (or their average across datasets).

    Attributes:
        dataset: the dataset name, or ``"average"`` for the macro average.
        num_examples: questions scored (summed over datasets for the average).
        exact_match: mean EM.
        cover_exact_match: mean cover-EM (a gold answer contained in the prediction).
        f1: mean token F1.
        valid_answer_rate: share of questions that got a parseable ``<answer>``.
        mean_searches: searches per question.
        mean_turns: generation turns per question.
        mean_response_tokens: generated tokens per question (observations excluded).
        gold_recall: mean share of gold passages retrieved, over the questions whose gold ids are known;
            None when no question has them or nothing was retrieved.
        num_errors: questions whose episode ended abnormally (they score 0).
    """

    dataset: str
    num_examples: int
    exact_match: float
    cover_exact_match: float
    f1: float
    valid_answer_rate: float
    mean_searches: float
    mean_turns: float
    mean_response_tokens: float
    gold_recall: float | None
    num_errors: int

    @classmethod
    def from_dict(cls, row: dict) -> "DatasetMetrics":
        """Rebuild from ``dataclasses.asdict`` output (as stored in ``results.json``)."""
        return cls(**{f.name: row[f.name] for f in fields(cls)})


def gold_passage_recall(retrieved_ids: Iterable[Iterable[str]], gold_ids: Sequence[str]) -> float:
    """Share of the gold passages that appear anywhere among the retrieved ones.

    >>> gold_passage_recall([["3", "7"], ["9", "1"]], ["1", "2"])
    0.5
    """
    gold = set(gold_ids)
    if not gold:
        raise ValueError("gold_ids is empty: recall is undefined")
    seen = {doc_id for ids in retrieved_ids for doc_id in ids}
    return len(gold & seen) / len(gold)


def dataset_metrics(dataset: str, predictions: Sequence[Prediction]) -> DatasetMetrics:
    """Average the scores of one dataset's predictions.

    Raises:
        ValueError: ``predictions`` is empty.
    """
    if not predictions:
        raise ValueError(f"no predictions for dataset {dataset!r}")
    recalls = [p.gold_recall for p in predictions if p.gold_recall is not None]
    return DatasetMetrics(
        dataset=dataset,
        num_examples=len(predictions),
        exact_match=fmean(p.exact_match for p in predictions),
        cover_exact_match=fmean(p.cover_exact_match for p in predictions),
        f1=fmean(p.f1 for p in predictions),
        valid_answer_rate=fmean(float(p.prediction is not None) for p in predictions),
        mean_searches=fmean(p.num_searches for p in predictions),
        mean_turns=fmean(p.num_turns for p in predictions),
        mean_response_tokens=fmean(p.num_response_tokens for p in predictions),
        gold_recall=fmean(recalls) if recalls else None,
        num_errors=sum(p.error is not None for p in predictions),
    )


def summarize(predictions: Iterable[Prediction]) -> dict[str, DatasetMetrics]:
    """Per-dataset metrics, keyed by dataset name in order of first appearance."""
    by_dataset: dict[str, list[Prediction]] = {}
    for prediction in predictions:
        by_dataset.setdefault(prediction.dataset, []).append(prediction)
    return {name: dataset_metrics(name, rows) for name, rows in by_dataset.items()}


def macro_average(per_dataset: Sequence[DatasetMetrics]) -> DatasetMetrics:
    """The unweighted mean over datasets, as the Search-R1 paper's "Avg." column.

    Each dataset counts once whatever its size; question counts and error counts are summed.

    Raises:
        ValueError: ``per_dataset`` is empty.
    """
    if not per_dataset:
        raise ValueError("no datasets to average")
    recalls = [m.gold_recall for m in per_dataset if m.gold_recall is not None]
    return DatasetMetrics(
        dataset=AVERAGE,
        num_examples=sum(m.num_examples for m in per_dataset),
        exact_match=fmean(m.exact_match for m in per_dataset),
        cover_exact_match=fmean(m.cover_exact_match for m in per_dataset),
        f1=fmean(m.f1 for m in per_dataset),
        valid_answer_rate=fmean(m.valid_answer_rate for m in per_dataset),
        mean_searches=fmean(m.mean_searches for m in per_dataset),
        mean_turns=fmean(m.mean_turns for m in per_dataset),
        mean_response_tokens=fmean(m.mean_response_tokens for m in per_dataset),
        gold_recall=fmean(recalls) if recalls else None,
        num_errors=sum(m.num_errors for m in per_dataset),
    )
