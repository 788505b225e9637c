"""The supervised warm-start: protocol traces from the real env, policy-token NLL, reuse, demo table."""

import json
from pathlib import Path

import pytest

from searchgym.cli import build_parser
from searchgym.demo import dev_scores_by_stage, eval_command, summary_table
from searchgym.env import SearchVectorEnv, load_dataset
from searchgym.eval.cli import config_from_args
from searchgym.paths import CONFIGS_DIR
from searchgym.train.build import load_training_policy, open_retriever
from searchgym.train.config import RetrieverConfig, WarmStartConfig, load_config
from searchgym.train.run import run_training
from searchgym.train.warmstart import WARMSTART_DIR, WARMSTART_REPORT, protocol_traces, supervised_warm_start

TINY = CONFIGS_DIR / "tiny.yaml"


@pytest.fixture(scope="module")
def traces_and_policy():
    config = load_config(TINY, ["rollout.max_new_tokens=16"])
    policy = load_training_policy(config)
    examples = load_dataset("wiki-mini-train", limit=4)
    vector_env = SearchVectorEnv(
        num_envs=4,
        dataset=None,
        retriever=open_retriever(RetrieverConfig()),
        config=config.env,
        tokenizer=policy.tokenizer,
    )
    traces = protocol_traces(policy.tokenizer, vector_env, examples, budgets=config.token_budgets)
    return traces, policy, examples


def test_traces_search_for_the_question_then_answer_with_the_gold(traces_and_policy) -> None:
    traces, policy, examples = traces_and_policy
    for trace, example in zip(traces, examples, strict=True):
        assert [turn.action_type for turn in trace.turns] == ["search", "answer"]
        assert trace.turns[0].query == example.question
        assert trace.outcome.em == 1.0 and trace.outcome.answered
        policy_text = policy.tokenizer.decode(
            [token for token, mask in zip(trace.response_ids, trace.loss_mask, strict=True) if mask]
        )
        assert (
            policy_text
            == f"<search> {example.question} </search><answer> {example.golden_answers[0]} </answer>"
        )
        observation = policy.tokenizer.decode(
            [token for token, mask in zip(trace.response_ids, trace.loss_mask, strict=True) if not mask]
        )
        assert "<information>" in observation


def test_warm_start_lowers_the_policy_token_loss(traces_and_policy) -> None:
    traces, policy, _ = traces_and_policy
    result = supervised_warm_start(
        policy.model,
        traces,
        WarmStartConfig(examples=4, epochs=8, lr=3e-3, batch_size=4),
        pad_token_id=policy.tokenizer.pad_token_id or 0,
        seed=0,
    )
    assert len(result.losses) == 8
    assert result.losses[-1] < 0.7 * result.losses[0]


def test_a_run_records_the_warm_start_reuses_it_and_the_demo_table_shows_three_stages(tmp_path: Path) -> None:
    overrides = [f"logging.run_dir={tmp_path}", "warmstart.examples=4", "warmstart.batch_size=4"]
    overrides += ["logging.plots=false", "logging.tensorboard=false"]
    run_training(load_config(TINY, [*overrides, "total_steps=1"]))
    report = json.loads((tmp_path / WARMSTART_REPORT).read_text())
    assert report["traces"] == 4 and len(report["losses"]) == 1
    assert set(report["dev_untrained"]) >= {"em", "f1", "answered", "searches"}
    assert (tmp_path / WARMSTART_DIR / "config.json").exists()

    stages = dev_scores_by_stage(tmp_path)
    assert list(stages) == ["untrained", "after warm-start", "after RL (step 1)"]
    assert "train reward per RL step:" in summary_table(tmp_path)

    # The demo's closing hint evaluates the final policy with the protocol it was trained on.
    config = load_config(TINY, [*overrides, "total_steps=1"])
    hint = build_parser().parse_args(eval_command(config).split()[1:])
    evaluated = config_from_args(hint, "agent")
    assert evaluated.model == str(tmp_path / "final") and evaluated.benchmarks == (config.data.dev,)
    assert evaluated.env == config.env and evaluated.budgets == config.token_budgets
    assert evaluated.max_new_tokens == config.rollout.max_new_tokens

    # A second run in the same folder resumes: the saved warm-start is loaded, not trained again.
    (tmp_path / WARMSTART_REPORT).write_text(json.dumps(report | {"losses": ["marker"]}))
    run_training(load_config(TINY, [*overrides, "total_steps=2"]))
    assert json.loads((tmp_path / WARMSTART_REPORT).read_text())["losses"] == ["marker"]
