import argparse
import dataclasses
import doctest
from types import SimpleNamespace

import pytest
import yaml

import searchgym.eval.cli
import searchgym.eval.config
import searchgym.eval.selection
from searchgym.env.config import EnvConfig
from searchgym.errors import SearchgymError
from searchgym.eval.config import EvalConfig, dataset_label, training_protocol
from searchgym.eval.selection import check_unique_ids, read_id_file, select_examples
from searchgym.policy.budgets import TokenBudgets


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
    other = dataclasses.replace(config, env=dataclasses.replace(config.env, topk=5), seed=1)
    assert config.changed_settings(other) == ["seed", "env.topk"]
    agent = EvalConfig(benchmarks=("nq",), mode="agent", index="idx")
    retrained = dataclasses.replace(agent, env=EnvConfig(prompt_template="Q: {question}"))
    assert EvalConfig.from_dict(retrained.to_dict()) == retrained
    assert agent.changed_settings(retrained) == ["env.prompt_template"]
    # Retrieval settings cannot change a direct run's predictions: adding an index resumes it.
    direct = EvalConfig(benchmarks=("nq",), mode="direct")
    shorter = EvalConfig(
        benchmarks=("nq",), mode="direct", index="idx", env=EnvConfig(max_turns=2, max_searches=1)
    )
    assert direct.changed_settings(shorter) == []


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
    """A run folder whose config.yaml trained a short protocol for a base model (plain prompts)."""
    run = tmp_path / "run"
    run.mkdir()
    env = {
        "max_turns": 2,
        "max_searches": 1,
        "topk": 2,
        "max_observation_tokens": 128,
        "prompt_style": "plain",
    }
    rollout = {"max_new_tokens": 32, "max_prompt_tokens": 300, "max_context_tokens": 900}
    config = {"env": {**env, "prompt_template": "Q: {question}"}, "rollout": rollout}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_the_training_protocol_comes_from_a_run_folder_or_its_config_file(training_run):
    env = EnvConfig(
        max_turns=2,
        max_searches=1,
        topk=2,
        max_observation_tokens=128,
        prompt_style="plain",
        prompt_template="Q: {question}",
    )
    budgets = TokenBudgets(
        max_prompt_tokens=300, max_turn_tokens=32, max_observation_tokens=128, max_context_tokens=900
    )
    assert training_protocol(training_run) == (env, budgets)
    assert training_protocol(training_run / "config.yaml") == (env, budgets)


def eval_args(*argv):
    parser = argparse.ArgumentParser()
    searchgym.eval.cli.add_eval_command(parser.add_subparsers())
    return parser.parse_args(["eval", "--index", "idx", *argv])


def test_flags_override_the_training_protocol_which_overrides_the_defaults(training_run):
    default = searchgym.eval.cli.config_from_args(eval_args(), "agent")
    assert (default.env.topk, default.env.max_turns, default.max_new_tokens, default.env.prompt_template) == (
        3,
        4,
        500,
        None,
    )
    assert default.infer_prompt_style and default.env_for("plain").prompt_style == "plain"
    trained = searchgym.eval.cli.config_from_args(eval_args("--train-config", str(training_run)), "agent")
    assert (trained.env.topk, trained.env.max_turns, trained.env.max_searches, trained.max_new_tokens) == (
        2,
        2,
        1,
        32,
    )
    assert (trained.env.max_observation_tokens, trained.env.prompt_template) == (128, "Q: {question}")
    # Every protocol field comes along: a policy trained on plain prompts is evaluated on plain prompts,
    # whatever its tokenizer suggests, with the training's prompt and context budgets.
    assert not trained.infer_prompt_style and trained.env_for("chat").prompt_style == "plain"
    assert (trained.budgets.max_prompt_tokens, trained.budgets.max_context_tokens) == (300, 900)
    flagged = searchgym.eval.cli.config_from_args(
        eval_args("--train-config", str(training_run), "--topk", "5", "--max-turns", "4"), "agent"
    )
    # More turns than the training had: the search budget becomes one in every turn but the last.
    assert (flagged.env.topk, flagged.env.max_turns, flagged.env.max_searches, flagged.max_new_tokens) == (
        5,
        4,
        3,
        32,
    )


def test_a_bad_protocol_flag_is_a_clear_error():
    with pytest.raises(SearchgymError, match="topk=0: set topk to 1 or more"):
        searchgym.eval.cli.config_from_args(eval_args("--topk", "0"), "agent")


def test_a_missing_training_config_is_a_clear_error(tmp_path):
    with pytest.raises(SearchgymError, match="no training config there"):
        searchgym.eval.cli.config_from_args(eval_args("--train-config", str(tmp_path)), "agent")
