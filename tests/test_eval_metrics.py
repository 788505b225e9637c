import doctest
import re

import pytest
from eval_fixtures import prediction

import searchgym.eval.metrics
from searchgym.errors import SearchgymError
from searchgym.eval.config import SEARCH_R1_BENCHMARKS
from searchgym.eval.metrics import AVERAGE, dataset_metrics, gold_passage_recall, macro_average, summarize
from searchgym.eval.report import load_reported, select_reported


def test_doctests_pass():
    assert doctest.testmod(searchgym.eval.metrics).failed == 0


@pytest.mark.parametrize(
    ("retrieved", "gold", "expected"),
    [
        ([], ["1"], 0.0),
        ([["1", "2"]], ["1"], 1.0),
        ([["5"], ["2", "9"]], ["1", "2"], 0.5),
        ([["2"], ["2"]], ["1", "2", "2"], 0.5),  # a duplicate id counts once on both sides
        ([["1"], ["3"], ["2"]], ["1", "2", "3"], 1.0),
    ],
)
def test_gold_passage_recall(retrieved, gold, expected):
    assert gold_passage_recall(retrieved, gold) == expected


def test_gold_passage_recall_needs_gold_ids():
    with pytest.raises(ValueError, match="empty"):
        gold_passage_recall([["1"]], [])


def test_dataset_metrics_are_exact_means():
    rows = [
        prediction("a", em=1.0, f1=1.0, cover=1.0, searches=2, turns=3, tokens=30, gold_recall=1.0),
        prediction("b", em=0.0, f1=0.5, cover=1.0, searches=1, turns=2, tokens=20, gold_recall=0.5),
        prediction("c", em=0.0, f1=0.0, cover=0.0, answer=None, searches=0, turns=4, tokens=40),
        prediction("d", em=0.0, answer=None, searches=1, turns=1, tokens=10, error="retriever down"),
    ]
    metrics = dataset_metrics("nq", rows)
    assert metrics.num_examples == 4
    assert metrics.exact_match == 0.25
    assert metrics.f1 == 0.375
    assert metrics.cover_exact_match == 0.5
    assert metrics.valid_answer_rate == 0.5
    assert metrics.mean_searches == 1.0
    assert metrics.mean_turns == 2.5
    assert metrics.mean_response_tokens == 25.0
    assert metrics.gold_recall == 0.75  # over the two questions whose gold ids are known
    assert metrics.num_errors == 1


def test_gold_recall_is_none_when_no_gold_ids_are_known():
    assert dataset_metrics("nq", [prediction("a", em=1.0)]).gold_recall is None


def test_dataset_metrics_refuse_an_empty_dataset():
    with pytest.raises(ValueError, match="no predictions"):
        dataset_metrics("nq", [])


def test_summarize_groups_by_dataset_in_order_of_appearance():
    rows = [
        prediction("1", dataset="popqa", em=1.0),
        prediction("2", dataset="nq", em=0.0),
        prediction("3", dataset="popqa", em=0.0),
    ]
    per_dataset = summarize(rows)
    assert list(per_dataset) == ["popqa", "nq"]
    assert per_dataset["popqa"].exact_match == 0.5
    assert per_dataset["popqa"].num_examples == 2
    assert per_dataset["nq"].exact_match == 0.0


def test_macro_average_weights_each_dataset_once():
    big = dataset_metrics("nq", [prediction(str(i), em=1.0, gold_recall=1.0) for i in range(9)])
    small = dataset_metrics("bamboogle", [prediction("x", dataset="bamboogle", em=0.0, error="boom")])
    average = macro_average([big, small])
    assert average.dataset == AVERAGE
    assert average.exact_match == 0.5  # not 0.9: the paper's "Avg." is a mean over datasets
    assert average.num_examples == 10
    assert average.num_errors == 1
    assert average.gold_recall == 1.0  # the dataset without gold ids does not count


def test_macro_average_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        macro_average([])


def test_reported_file_covers_the_seven_benchmarks_and_its_averages_add_up():
    rows = load_reported()
    assert len({row.name for row in rows}) == len(rows)
    for row in rows:
        assert tuple(row.exact_match) == SEARCH_R1_BENCHMARKS
        assert all(0.0 <= value <= 1.0 for value in row.exact_match.values())
        mean = sum(row.exact_match.values()) / len(row.exact_match)
        if row.note is None:  # a row whose printed average is off says so in its note
            assert mean == pytest.approx(row.average, abs=6e-4), row.name


def test_select_reported_by_model_by_name_and_all():
    rows = load_reported()
    by_model = select_reported(rows, ["qwen2.5-3b"])
    assert by_model and all(row.name.startswith("qwen2.5-3b/") for row in by_model)
    assert [row.name for row in select_reported(rows, ["qwen2.5-7b/rag"])] == ["qwen2.5-7b/rag"]
    assert select_reported(rows, ["qwen2.5-7b/rag"])[0].exact_match["nq"] == 0.349
    assert len(select_reported(rows, ["all", "qwen2.5-7b"])) == len(rows)


def test_select_reported_lists_the_valid_names_on_a_typo():
    with pytest.raises(SearchgymError, match=re.escape("qwen2.5-3b, qwen2.5-7b")):
        select_reported(load_reported(), ["qwen-7b"])
