import argparse
import doctest
from types import SimpleNamespace

import pytest
import yaml

import searchgym.eval.cli
import searchgym.eval.config
import searchgym.eval.selection
from searchgym.errors import SearchgymError
from searchgym.eval.config import EvalConfig, dataset_label, training_protocol
from searchgym.eval.selection import check_unique_ids, read_id_file, select_examples


@pytest.mark.parametrize("module", [searchgym.eval.cli, searchgym.eval.config, searchgym.eval.selection])
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
        ({"prompt_template": "no placeholder"}, "must contain {question} exactly once"),
        ({"max_turns": 2, "max_searches": 2}, "the last turn is reserved for the answer"),
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
    agent = EvalConfig(benchmarks=("nq",), mode="agent", index="idx")
    retrained = EvalConfig.from_dict(agent.to_dict() | {"prompt_template": "Q: {question}"})
    assert agent.changed_settings(retrained) == ["prompt_template"]
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


@pytest.fixture
def training_run(tmp_path):
    """A run folder whose config.yaml trained a short protocol."""
    run = tmp_path / "run"
    run.mkdir()
    env = {"max_turns": 2, "max_searches": 1, "topk": 2, "max_observation_tokens": 128}
    config = {"env": {**env, "prompt_template": "Q: {question}"}, "rollout": {"max_new_tokens": 32}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_the_training_protocol_comes_from_a_run_folder_or_its_config_file(training_run):
    expected = {
        "topk": 2,
        "max_turns": 2,
        "max_searches": 1,
        "max_observation_tokens": 128,
        "prompt_template": "Q: {question}",
        "max_new_tokens": 32,
    }
    assert training_protocol(training_run) == expected
    assert training_protocol(training_run / "config.yaml") == expected


def eval_args(*argv):
    parser = argparse.ArgumentParser()
    searchgym.eval.cli.add_eval_command(parser.add_subparsers())
    return parser.parse_args(["eval", "--index", "idx", *argv])


def test_flags_override_the_training_protocol_which_overrides_the_defaults(training_run):
    default = searchgym.eval.cli.config_from_args(eval_args(), "agent")
    assert (default.topk, default.max_turns, default.max_new_tokens, default.prompt_template) == (
        3,
        4,
        500,
        None,
    )
    trained = searchgym.eval.cli.config_from_args(eval_args("--train-config", str(training_run)), "agent")
    assert (trained.topk, trained.max_turns, trained.max_searches, trained.max_new_tokens) == (2, 2, 1, 32)
    assert (trained.max_observation_tokens, trained.prompt_template) == (128, "Q: {question}")
    flagged = searchgym.eval.cli.config_from_args(
        eval_args("--train-config", str(training_run), "--topk", "5", "--max-turns", "4"), "agent"
    )
    # More turns than the training had: the search budget becomes the default (every turn but the last).
    assert (flagged.topk, flagged.max_turns, flagged.max_searches, flagged.max_new_tokens) == (5, 4, None, 32)


def test_a_missing_training_config_is_a_clear_error(tmp_path):
    with pytest.raises(SearchgymError, match="no training config there"):
        searchgym.eval.cli.config_from_args(eval_args("--train-config", str(tmp_path)), "agent")
