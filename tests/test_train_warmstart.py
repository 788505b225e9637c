"""The supervised warm-start: protocol traces from the real env, policy-token NLL, reuse, demo table."""

import json
from pathlib import Path

import pytest

from searchgym.demo import FINAL_EVAL_MARGIN, evaluate_stages, rl_minutes, run_demo, summary_table
from searchgym.env import SearchVectorEnv, load_dataset
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


def test_a_run_records_and_reuses_its_warm_start_and_the_demo_pairs_it_with_the_final(tmp_path: Path) -> None:
    overrides = [f"logging.run_dir={tmp_path}", "warmstart.examples=4", "warmstart.batch_size=4"]
    overrides += ["logging.plots=false", "logging.tensorboard=false"]
    run_training(load_config(TINY, [*overrides, "total_steps=1"]))
    report = json.loads((tmp_path / WARMSTART_REPORT).read_text())
    assert report["traces"] == 4 and len(report["losses"]) == 1
    assert set(report["dev_untrained"]) >= {"em", "f1", "answered", "searches"}
    assert (tmp_path / WARMSTART_DIR / "config.json").exists()

    # The demo then scores the warm-started and the final policy on the same dev questions and pairs them.
    config = load_config(TINY, [*overrides, "total_steps=1"])
    demo = evaluate_stages(config)
    assert demo.paired.questions == config.data.dev_limit
    assert demo.paired.gained + demo.paired.lost <= demo.paired.questions
    assert demo.warm_start.config.model == str(tmp_path / WARMSTART_DIR)
    assert demo.final.config.model == str(tmp_path / "final")
    for results in (demo.warm_start, demo.final):
        assert results.config.env == config.env and results.config.budgets == config.token_budgets
    table = summary_table(demo)
    assert "| EM |" in table and "sign test p =" in table and "train reward per RL step:" in table

    # A second run in the same folder resumes: the saved warm-start is loaded, not trained again.
    (tmp_path / WARMSTART_REPORT).write_text(json.dumps(report | {"losses": ["marker"]}))
    run_training(load_config(TINY, [*overrides, "total_steps=2"]))
    assert json.loads((tmp_path / WARMSTART_REPORT).read_text())["losses"] == ["marker"]


def test_the_demo_gives_rl_the_time_its_evaluations_leave(tmp_path: Path) -> None:
    overrides = [f"logging.run_dir={tmp_path}", "warmstart.examples=4", "warmstart.batch_size=4"]
    overrides += ["logging.plots=false", "logging.tensorboard=false", "total_steps=4"]
    # A demo of a few seconds: no time is left for RL after the warm-start's evaluation, so it runs the
    # two steps that always run, not all four, and the final policy is evaluated and paired.
    report = run_demo(load_config(TINY, overrides), minutes=0.01)
    assert len(report.rewards) == 2
    assert report.paired.questions == report.final.average.num_examples > 0
    assert (tmp_path / "eval" / "warmstart" / "results.json").is_file()
    # Run again in the same folder, the finished demo is reported as it was, not trained further.
    metrics = (tmp_path / "metrics.jsonl").read_text()
    again = run_demo(load_config(TINY, overrides), minutes=0.01)
    assert again.rewards == report.rewards and again.paired == report.paired
    assert (tmp_path / "metrics.jsonl").read_text() == metrics


def test_rl_minutes_leave_room_for_a_final_evaluation_like_the_first() -> None:
    assert rl_minutes(14.0, elapsed_s=120.0, warm_start_eval_s=100.0) == pytest.approx(
        (840.0 - 120.0 - FINAL_EVAL_MARGIN * 100.0) / 60.0
    )
    assert rl_minutes(1.0, elapsed_s=120.0, warm_start_eval_s=100.0) > 0  # 0 would mean no limit
