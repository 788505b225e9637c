"""The training loop end to end on the toy task: it learns, resumes exactly, logs, guards and exports."""

import functools
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from train_fixtures import (
    SimulatedCrash,
    TargetTokenRollout,
    run_toy,
    tiny_model,
    tiny_tokenizer,
    toy_config,
    toy_examples,
)
from transformers import AutoModelForCausalLM

from searchgym.errors import SearchgymError
from searchgym.policy.models import Policy
from searchgym.train import loop
from searchgym.train.checkpoint import CheckpointManager, read_trainer_state, step_dir_name
from searchgym.train.config import RUN_CONFIG_FILE, load_config
from searchgym.train.learner import LocalLearner
from searchgym.train.loop import ExampleSampler, train
from searchgym.train.tracking import read_metrics

FIXTURES = Path(__file__).parent / "train_fixtures.py"
# The killed run imports this checkout's searchgym, not whichever one the environment installed.
CHECKOUT_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def learn(
    run_dir: Path, *overrides: str, rollout: TargetTokenRollout | None = None
) -> list[dict[str, float]]:
    """The metrics of each step of a 20-step run on the toy task (target token emitted by the policy)."""
    config = toy_config(
        run_dir,
        "total_steps=20",
        "optim.actor_lr=3e-3",
        "optim.critic_lr=3e-3",
        "algorithm.entropy_coef=0",
        "checkpoint.every=0",
        "checkpoint.export_final=false",
        "dev.every=0",
        "dev.before_training=false",
        "logging.samples_every=0",
        *overrides,
    )
    result = train(
        config,
        learner=LocalLearner(config, Policy(tiny_model(), tiny_tokenizer(), name="tiny")),
        rollout=rollout or TargetTokenRollout(),
        tokenizer=tiny_tokenizer(),
        train_examples=toy_examples(16),
    )
    return result.history


def rewards(history: list[dict[str, float]]) -> list[float]:
    return [row["rollout/reward"] for row in history]


def test_ppo_learns_to_emit_the_rewarded_token(tmp_path: Path) -> None:
    history = learn(
        tmp_path,
        "batch.prompts_per_step=8",
        "batch.mini_batch_prompts=4",
        "batch.micro_batch_size=4",
        "kl.coef=0",
    )
    # A random policy writes the target in about 16% of episodes (4 tokens, 24 words).
    assert_learns(history)


def test_grpo_learns_to_emit_the_rewarded_token(tmp_path: Path) -> None:
    history = learn(
        tmp_path,
        "algorithm.name=grpo",
        "rollout.samples_per_prompt=4",
        "batch.prompts_per_step=4",
        "batch.mini_batch_prompts=2",
        "batch.micro_batch_size=4",
        "kl.placement=loss",
        "kl.estimator=low_var_kl",
    )
    assert_learns(history)


def assert_learns(history: list[dict[str, float]]) -> None:
    """From below 0.35 (the first three steps) to above 0.8 (the last three) mean reward."""
    reward = rewards(history)
    assert mean(reward[:3]) < 0.35, reward
    assert mean(reward[-3:]) > 0.8, reward


GROUPS_OF_FOUR = (
    "rollout.samples_per_prompt=4",
    "batch.prompts_per_step=4",
    "batch.mini_batch_prompts=2",
    "batch.micro_batch_size=4",
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        # The KL stays in the reward: summed over the episode (rloo), per token (reinforce_pp).
        ["algorithm.name=rloo", "kl.coef=0.001", "kl.placement=reward"],
        ["algorithm.name=reinforce_pp", "kl.coef=0.001", "kl.placement=reward"],
        ["algorithm.name=dr_grpo", "kl.coef=0.001", "kl.placement=loss", "kl.estimator=low_var_kl"],
    ],
    ids=["rloo", "reinforce_pp", "dr_grpo"],
)
def test_every_estimator_learns_to_emit_the_rewarded_token(tmp_path: Path, overrides: list[str]) -> None:
    assert_learns(learn(tmp_path, *GROUPS_OF_FOUR, *overrides))


@pytest.mark.slow
def test_grpo_with_dapo_options_learns(tmp_path: Path) -> None:
    history = learn(
        tmp_path,
        *GROUPS_OF_FOUR,
        "algorithm.name=grpo",
        "kl.coef=0",
        "algorithm.clip_eps_high=0.28",
        "algorithm.dual_clip=3",
        "algorithm.dynamic_sampling=true",
        "algorithm.overlong_buffer_tokens=13",  # limit 2 turns x 8 tokens: 4 tokens pay 1/13
    )
    assert_learns(history)
    assert max(row["rollout/draws"] for row in history) > 1  # all-equal groups were dropped and replaced


@pytest.mark.slow
def test_truncated_importance_sampling_learns_from_a_perturbed_sampler(tmp_path: Path) -> None:
    # The sampler draws at temperature 1.5 while the trainer scores at 1: a deliberate, large mismatch.
    history = learn(
        tmp_path,
        *GROUPS_OF_FOUR,
        "algorithm.name=grpo",
        "kl.coef=0",
        "algorithm.truncated_is_cap=2",
        rollout=TargetTokenRollout(temperature=1.5),
    )
    assert_learns(history)
    # Measured: a gap of 0.03 at the start (the random policy is near uniform, where temperature matters
    # little) that grows to about 0.7 as the policy sharpens; an exact sampler shows < 1e-4 (below).
    first, last = history[0], history[-1]
    assert first["sampler/logprob_gap_mean"] > 0.01 and first["sampler/kl"] > 1e-4
    assert last["sampler/logprob_gap_mean"] > 5 * first["sampler/logprob_gap_mean"]
    assert all("actor/is_weight" in row for row in history)


def test_an_exact_sampler_shows_no_gap(tmp_path: Path) -> None:
    # On-policy GRPO (one optimizer step): the gap is measured on the update's own forward pass.
    row = learn(
        tmp_path,
        *GROUPS_OF_FOUR,
        "batch.mini_batch_prompts=4",
        "algorithm.name=grpo",
        "kl.coef=0",
        "total_steps=1",
    )[0]
    assert row["sampler/logprob_gap_max"] < 1e-4 and row["sampler/kl"] < 1e-8


def comparable(rows: list[dict]) -> list[dict]:
    """Metrics without wall-clock timings, which differ between any two runs."""
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def test_crash_and_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    straight_policy = tiny_model()
    straight = run_toy(tmp_path / "straight", policy=straight_policy)

    with pytest.raises(SimulatedCrash):
        run_toy(tmp_path / "resumed", rollout=TargetTokenRollout(crash_at_step=3))
    assert [row["step"] for row in read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == [0, 1, 2]
    resumed_policy = tiny_model()
    resumed = run_toy(tmp_path / "resumed", policy=resumed_policy)

    assert [row["step"] for row in resumed.history] == [3, 4]
    straight_rows = read_metrics(straight.run_dir / "metrics.jsonl")
    assert comparable(read_metrics(resumed.run_dir / "metrics.jsonl")) == comparable(straight_rows)
    for a, b in zip(straight_policy.parameters(), resumed_policy.parameters(), strict=True):
        assert torch.equal(a, b)
    assert straight_rows[-1]["actor/optimizer_steps"] == 2  # two mini-batches per step: the update happened


def test_kill_9_and_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = run_toy(tmp_path / "straight")
    killed = subprocess.run(
        [sys.executable, str(FIXTURES), str(tmp_path / "resumed"), "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env=CHECKOUT_ENV,
    )
    assert killed.returncode == -9, killed.stderr
    run_toy(tmp_path / "resumed")
    resumed_rows = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert comparable(resumed_rows) == comparable(read_metrics(straight.run_dir / "metrics.jsonl"))


def test_run_folder_holds_logs_samples_checkpoints_and_an_hf_export(tmp_path: Path) -> None:
    overrides = ("logging.tensorboard=true", "logging.plots=true", "checkpoint.keep_last=2")
    result = run_toy(tmp_path, *overrides)
    assert load_config(result.run_dir / RUN_CONFIG_FILE) == toy_config(tmp_path, *overrides)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4]
    assert "dev/em" in rows[0] and "dev/em" in rows[-1]
    for name in ("rollout/reward", "rollout/searches", "actor/entropy", "critic/value_loss", "experience/kl"):
        assert name in rows[1], name
    for phase in ("rollout", "experience", "update", "generation", "retrieval"):
        assert f"time/{phase}" in rows[1], phase
    sample = (result.run_dir / "samples" / "step_00000004.txt").read_text()
    assert "== policy turn 0" in sample and "== observation turn 0" in sample and "w7 w3" in sample
    assert list((result.run_dir / "tensorboard").iterdir())
    assert (result.run_dir / "curves.png").stat().st_size > 10_000
    kept = CheckpointManager(result.run_dir / "checkpoints", keep_last=2).checkpoints()
    assert [path.name for path in kept] == [step_dir_name(3), step_dir_name(4)]
    assert result.final_model is not None
    exported = AutoModelForCausalLM.from_pretrained(result.final_model)
    assert (result.final_model / "tokenizer.json").is_file()
    assert exported.config.vocab_size == len(tiny_tokenizer())


def test_dev_every_0_evaluates_nothing_not_even_after_the_last_step(tmp_path: Path) -> None:
    result = run_toy(tmp_path, "dev.every=0", "dev.before_training=false")
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert not any(key.startswith("dev/") or key == "time/dev_eval" for row in rows for key in row)


def test_missing_rewards_are_counted_and_do_not_stop_training(tmp_path: Path) -> None:
    rollout = TargetTokenRollout(missing_reward_ids=["q0", "q1"])
    result = run_toy(tmp_path, "total_steps=2", "dev.every=0", rollout=rollout)
    missing = [row["rollout/missing_rewards"] for row in result.history if "rollout/missing_rewards" in row]
    assert sum(missing) > 0
    assert all(row["actor/skipped_steps"] == 0 for row in result.history if "actor/skipped_steps" in row)


def test_guards_roll_back_to_the_last_healthy_checkpoint(tmp_path: Path) -> None:
    # The first step samples from the reference policy itself (KL 0); every later one has drifted further
    # than the threshold allows, so the second bad step in a row triggers the roll-back.
    result = run_toy(
        tmp_path,
        "total_steps=4",
        "guards.max_kl=1e-6",
        "guards.rollback_after=2",
        "checkpoint.keep_last=1",
        "dev.every=0",
    )
    by_step = {int(row["step"]): row for row in result.history}
    assert by_step[1]["guards/warnings"] == 0
    assert by_step[2]["guards/bad_streak"] == 1
    assert by_step[3]["guards/rolled_back_to"] == 1
    # Step 3 ends on the restored weights (healthy); step 4 drifts again. keep_last=1 keeps the newest
    # checkpoint and, beside it, the newest healthy one.
    checkpoints = CheckpointManager(tmp_path / "checkpoints", keep_last=1).checkpoints()
    states = [read_trainer_state(path) for path in checkpoints]
    assert [(state.step, state.healthy) for state in states] == [(3, True), (4, False)]


def test_interrupted_checkpoint_writes_are_ignored(tmp_path: Path) -> None:
    run_toy(tmp_path, "total_steps=2", "dev.every=0")
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    half_written = tmp_path / "checkpoints" / f".{step_dir_name(3)}.tmp-999"
    half_written.mkdir()
    (half_written / "models.pt").write_bytes(b"truncated")
    assert manager.latest() == tmp_path / "checkpoints" / step_dir_name(2)


def test_example_sampler_resumes_mid_epoch() -> None:
    examples = toy_examples(5)
    sampler = ExampleSampler(examples, seed=3, shuffle=True)
    first = sampler.take(3)
    state = sampler.state_dict()
    rest = sampler.take(6)
    resumed = ExampleSampler(examples, seed=3, shuffle=True)
    resumed.load_state_dict(state)
    assert resumed.take(6) == rest
    assert {e.id for e in first + rest[:2]} == {e.id for e in examples}  # every question once per epoch


def test_bfloat16_autocast_with_activation_checkpointing_trains(tmp_path: Path) -> None:
    result = run_toy(tmp_path, "system.dtype=bfloat16", "model.gradient_checkpointing=true", "total_steps=2")
    last = result.history[-1]
    assert last["actor/optimizer_steps"] == 2 and last["actor/skipped_steps"] == 0
    assert last["critic/optimizer_steps"] == 2 and last["critic/skipped_steps"] == 0


def test_a_fresh_run_refuses_a_folder_with_old_checkpoints(tmp_path: Path) -> None:
    run_toy(tmp_path, "total_steps=1", "dev.every=0")
    with pytest.raises(SearchgymError, match="checkpoints of an earlier run"):
        run_toy(tmp_path, "total_steps=1", "dev.every=0", "checkpoint.resume=false")


OVERLAP = ("rollout.max_staleness=1", "dev.every=0", "checkpoint.every=2", "total_steps=6")


class RecordingLearner(LocalLearner):
    """A LocalLearner that notes each step in its rollout's event list."""

    def __init__(self, config, policy, events) -> None:
        super().__init__(config, policy)
        self.events = events

    def step(self, trajectories):
        self.events.append(("learn", 0))
        return super().step(trajectories)


def run_recorded(run_dir: Path, *overrides: str):
    config = toy_config(run_dir, "dev.before_training=false", *overrides)
    rollout = TargetTokenRollout()
    learner = RecordingLearner(config, Policy(tiny_model(), tiny_tokenizer(), name="tiny"), rollout.events)
    result = train(
        config, learner=learner, rollout=rollout, tokenizer=tiny_tokenizer(), train_examples=toy_examples(6)
    )
    return rollout.events, result.history


def test_staleness_0_submits_each_step_after_the_previous_update(tmp_path: Path) -> None:
    events, history = run_recorded(tmp_path, "total_steps=2", "dev.every=0")
    assert events == [
        ("sync", 0),
        *[("submit", 1), ("collect", 0), ("learn", 0), ("sync", 0)],
        *[("submit", 2), ("collect", 0), ("learn", 0), ("sync", 0)],
    ]
    assert [row["rollout/staleness"] for row in history] == [0.0, 0.0]


def test_overlap_submits_the_next_step_before_learning_and_drains_on_checkpoint_steps(tmp_path: Path) -> None:
    events, history = run_recorded(tmp_path, *OVERLAP)
    # Step 1 learns while step 2 generates with the initial weights; step 2 checkpoints, so nothing is in
    # flight across it and step 3 is generated with step 2's weights; and so on, until step 6, the last.
    assert events == [
        ("sync", 0),
        *[("submit", 1), ("collect", 0), ("submit", 2), ("learn", 0), ("sync", 0)],
        *[("collect", 0), ("learn", 0), ("sync", 0)],
        *[("submit", 3), ("collect", 0), ("submit", 4), ("learn", 0), ("sync", 0)],
        *[("collect", 0), ("learn", 0), ("sync", 0)],
        *[("submit", 5), ("collect", 0), ("submit", 6), ("learn", 0), ("sync", 0)],
        *[("collect", 0), ("learn", 0), ("sync", 0)],
    ]
    assert [row["rollout/staleness"] for row in history] == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert all(row["actor/optimizer_steps"] == 2 for row in history)


def test_overlap_with_two_steps_of_staleness(tmp_path: Path) -> None:
    _, history = run_recorded(
        tmp_path, "rollout.max_staleness=2", "dev.every=0", "checkpoint.every=0", "total_steps=4"
    )
    # Only the last step checkpoints: step 1 submits steps 2 and 3 with the initial weights, step 2
    # submits step 4 with step 1's weights.
    assert [row["rollout/staleness"] for row in history] == [0.0, 1.0, 2.0, 2.0]


def test_kill_9_mid_overlap_and_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = run_toy(tmp_path / "straight", *OVERLAP)
    # Step 4's request is submitted while step 3 learns: the kill lands in the middle of the overlap.
    killed = subprocess.run(
        [sys.executable, str(FIXTURES), str(tmp_path / "resumed"), "4", *OVERLAP],
        capture_output=True,
        text=True,
        timeout=300,
        env=CHECKOUT_ENV,
    )
    assert killed.returncode == -9, killed.stderr
    assert [row["step"] for row in read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == [0, 1, 2]
    run_toy(tmp_path / "resumed", *OVERLAP)
    resumed_rows = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    straight_rows = read_metrics(straight.run_dir / "metrics.jsonl")
    assert [row["step"] for row in resumed_rows] == [0, 1, 2, 3, 4, 5, 6]
    assert comparable(resumed_rows) == comparable(straight_rows)
    assert [row["rollout/staleness"] for row in straight_rows[1:]] == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]


class FakeClock:
    """Seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TimedRollout(TargetTokenRollout):
    """The toy rollout, where step k's episodes take ``step_s[k - 1]`` seconds of ``clock`` (or the last)."""

    def __init__(self, clock: FakeClock, step_s: Sequence[float]) -> None:
        super().__init__()
        self.clock, self.step_s = clock, step_s

    def submit(self, examples, *, sampling, step, batch_size) -> None:
        super().submit(examples, sampling=sampling, step=step, batch_size=batch_size)
        if sampling.temperature > 0:
            self.clock.now += self.step_s[min(step, len(self.step_s)) - 1]


def run_timed(monkeypatch, run_dir: Path, *overrides: str, step_s: Sequence[float] = (10.0,)):
    """A toy run whose steps take ``step_s`` seconds of a fake clock; returns the result and events."""
    clock = FakeClock()
    monkeypatch.setattr(loop, "TimeLimit", functools.partial(loop.TimeLimit, clock=clock))
    rollout = TimedRollout(clock, step_s)
    return run_toy(run_dir, "dev.every=0", *overrides, rollout=rollout), rollout.events


def test_max_minutes_ends_the_run_at_the_last_step_that_fits(tmp_path: Path, monkeypatch) -> None:
    # 60 s at 10 s a step: after step 1 has been timed, steps 2 to 6 fit and step 6 is the last.
    result, _ = run_timed(monkeypatch, tmp_path, "total_steps=10", "max_minutes=1", "checkpoint.every=0")
    assert result.steps == 6
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4, 5, 6]
    assert read_trainer_state(CheckpointManager(tmp_path / "checkpoints", keep_last=1).latest()).step == 6
    assert result.final_model is not None and (result.final_model / "config.json").is_file()


def test_steps_that_fit_are_paced_at_the_mean_step_with_room_for_the_slowest() -> None:
    clock = FakeClock()
    limit = loop.TimeLimit(minutes=2.0, clock=clock)
    assert limit.steps_that_fit() is None  # nothing timed yet
    for took in (10.0, 30.0):
        with limit.step():
            clock.now += took
    # 80 s left; a mean step of 20 s, and 10 s kept for one step of 30: (80 - 10) // 20.
    assert limit.steps_that_fit() == 3
    clock.now += 80.0
    assert limit.steps_that_fit() == 0
    assert loop.TimeLimit(minutes=0.0, clock=clock).steps_that_fit() is None
    instant = loop.TimeLimit(minutes=1.0, clock=clock)
    with instant.step():  # a step the clock could not see: no pace to estimate from
        pass
    assert instant.steps_that_fit() is None
    quick = loop.TimeLimit(minutes=1.0, clock=clock)
    with quick.step():
        clock.now += 0.5
    assert quick.steps_that_fit() == 119  # sub-second steps are paced too: 59.5 s left at 0.5 s a step


def test_the_last_step_moves_later_when_steps_turn_out_faster(tmp_path: Path, monkeypatch) -> None:
    # After step 1 (30 s) only steps up to 4 seem to fit in 120 s; at 10 s a step after it, step 7 does.
    result, _ = run_timed(
        monkeypatch, tmp_path, "total_steps=10", "max_minutes=2", "checkpoint.every=0", step_s=(30.0, 10.0)
    )
    assert result.steps == 7


def test_a_time_limit_that_is_not_reached_changes_nothing(tmp_path: Path, monkeypatch) -> None:
    result, _ = run_timed(monkeypatch, tmp_path, "total_steps=4", "max_minutes=1")
    assert result.steps == 4


def test_the_first_two_steps_run_even_without_time_left(tmp_path: Path, monkeypatch) -> None:
    result, _ = run_timed(monkeypatch, tmp_path, "total_steps=4", "max_minutes=0.01", step_s=(60.0,))
    assert result.steps == 2


def test_a_run_stopped_by_its_time_limit_resumes_to_total_steps_as_if_never_stopped(
    tmp_path: Path, monkeypatch
) -> None:
    straight = run_toy(tmp_path / "straight", "dev.every=0", "total_steps=8", "checkpoint.every=0")
    stopped, _ = run_timed(
        monkeypatch, tmp_path / "resumed", "total_steps=8", "max_minutes=0.5", "checkpoint.every=0"
    )
    assert stopped.steps == 3
    resumed = run_toy(tmp_path / "resumed", "dev.every=0", "total_steps=8", "checkpoint.every=0")
    assert [row["step"] for row in resumed.history] == [4, 5, 6, 7, 8]
    assert comparable(read_metrics(tmp_path / "resumed" / "metrics.jsonl")) == comparable(
        read_metrics(straight.run_dir / "metrics.jsonl")
    )


def test_with_overlap_no_request_is_submitted_beyond_the_last_step_that_fits(
    tmp_path: Path, monkeypatch
) -> None:
    # Two steps of staleness: step 1 submits steps 2 and 3 too, and is timed at 30 s (each request advances
    # the clock as it is submitted). At step 2 no step fits in the 15 s left, but step 3 is in flight: it
    # runs, as the last, and nothing is submitted after it.
    result, events = run_timed(
        monkeypatch,
        tmp_path,
        "total_steps=10",
        "max_minutes=0.75",
        "checkpoint.every=0",
        "rollout.max_staleness=2",
    )
    assert [step for event, step in events if event == "submit" and step > 0] == [1, 2, 3]
    assert result.steps == 3
    assert read_trainer_state(CheckpointManager(tmp_path / "checkpoints", keep_last=1).latest()).step == (
        result.steps
    )
