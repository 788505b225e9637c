import doctest
from types import SimpleNamespace

import pytest

import eval.cli
import eval.config
import eval.selection
from eval.config import EvalConfig, dataset_label
from eval.selection import check_unique_ids, read_id_file, select_examples
from searchgym.errors import SearchgymError


@pytest.mark.parametrize("module", [eval.cli, eval.config, eval.selection])
def test_doctests_pass(module):
    assert doctest.testmod(module).failed == 0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"benchmarks": ()}, "no benchmark given"),
        ({"mode": "cot"}, "unknown mode 'cot'"),
        ({"backend": "tgi"}, "unknown backend 'tgi'"),
        ({"mode": "agent"}, "give --index DIR"),
        ({"mode": "rag", "index": "a", "retriever_url": "http://b"}, "not both"),
        ({"topk": 0}, "topk must be at least 1"),
        ({"limit": -3}, "--limit must be at least 1"),
        ({"benchmarks": ("a/nq.jsonl", "b/nq.parquet")}, "share a table column name"),
    ],
)
def test_config_refuses_bad_settings_with_what_to_do(settings, message):
    with pytest.raises(SearchgymError, match=message):
        EvalConfig(**{"benchmarks": ("nq",), "mode": "direct"} | settings)


def test_config_round_trips_and_names_the_settings_that_change_predictions():
    config = EvalConfig(benchmarks=("nq", "data/mine.jsonl.gz"), mode="rag", index="idx", limit=50)
    assert EvalConfig.from_dict(config.to_dict()) == config
    assert config.dataset_labels == ("nq", "mine")
    assert dataset_label("x/y/questions.parquet") == "questions"
    assert config.changed_settings(EvalConfig.from_dict(config.to_dict() | {"batch_size": 1})) == []
    assert config.changed_settings(EvalConfig.from_dict(config.to_dict() | {"benchmarks": ["nq"]})) == []
    other = EvalConfig.from_dict(config.to_dict() | {"topk": 5, "seed": 1})
    assert config.changed_settings(other) == ["seed", "topk"]
    # Retrieval settings cannot change a direct run's predictions: adding an index resumes it.
    direct = EvalConfig(benchmarks=("nq",), mode="direct")
    assert (
        direct.changed_settings(EvalConfig(benchmarks=("nq",), mode="direct", index="idx", max_turns=2)) == []
    )


def examples(count):
    return [SimpleNamespace(id=f"q{i}") for i in range(count)]


def test_sampling_is_seeded_keeps_file_order_and_excludes_first():
    pool = examples(50)
    first = select_examples(pool, limit=10, seed=1)
    assert [e.id for e in first] == [e.id for e in select_examples(pool, limit=10, seed=1)]
    assert [e.id for e in first] != [e.id for e in select_examples(pool, limit=10, seed=2)]
    assert [int(e.id[1:]) for e in first] == sorted(int(e.id[1:]) for e in first)
    kept = select_examples(pool, exclude={"q0", "q1"}, limit=48, seed=0)
    assert len(kept) == 48 and {"q0", "q1"}.isdisjoint(e.id for e in kept)
    assert select_examples(pool, limit=None) == pool


def test_id_file_ignores_comments_and_blank_lines(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("# overlap with training\nq1\n\n  q2  # from hotpotqa\n", encoding="utf-8")
    assert read_id_file(path) == {"q1", "q2"}


def test_repeated_ids_are_refused():
    with pytest.raises(SearchgymError, match="'q1' occurs more than once"):
        check_unique_ids("mine", [*examples(2), SimpleNamespace(id="q1")])
