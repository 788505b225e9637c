"""Stability watches: each failure mode trips its warning, healthy steps trip none, roll-back after N."""

import dataclasses
import math

import pytest

from searchgym.train.config import GuardConfig
from searchgym.train.guards import Guards, StepHealth

HEALTHY = StepHealth(
    reward=0.5,
    response_length=100.0,
    entropy=1.0,
    kl=0.01,
    clip_fraction=0.05,
    missing_reward_fraction=0.0,
    skipped_steps=0,
)


def test_healthy_steps_trip_nothing() -> None:
    guards = Guards(GuardConfig(rollback_after=2))
    for _ in range(5):
        report = guards.check(HEALTHY)
        assert report.warnings == () and report.bad_streak == 0 and not report.roll_back


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ({"entropy": 0.01}, "entropy collapse"),
        ({"kl": 2.0}, "far from its reference"),
        ({"clip_fraction": 0.6}, "updates too large"),
        ({"missing_reward_fraction": 0.5}, "rewards missing"),
        ({"skipped_steps": 1}, "non-finite"),
    ],
)
def test_each_threshold_watch_warns(change: dict, phrase: str) -> None:
    report = Guards(GuardConfig()).check(dataclasses.replace(HEALTHY, **change))
    assert len(report.warnings) == 1 and phrase in report.warnings[0]


def test_reward_collapse_and_shrinking_responses_are_seen_in_the_moving_averages() -> None:
    guards = Guards(GuardConfig(smoothing=0.5, min_reward_ratio=0.5, min_length_ratio=0.5))
    guards.check(dataclasses.replace(HEALTHY, reward=0.8, response_length=200.0))
    first_drop = guards.check(dataclasses.replace(HEALTHY, reward=0.0, response_length=20.0))
    assert first_drop.warnings == ()  # averages 0.4 and 110: at the thresholds, not below
    second_drop = guards.check(dataclasses.replace(HEALTHY, reward=0.0, response_length=20.0))
    assert any("reward collapsing" in w for w in second_drop.warnings)
    assert any("responses shrinking" in w for w in second_drop.warnings)


def test_missing_rewards_do_not_move_the_reward_average() -> None:
    guards = Guards(GuardConfig())
    guards.check(HEALTHY)
    guards.check(dataclasses.replace(HEALTHY, reward=math.nan, missing_reward_fraction=1.0))
    assert guards.reward_average == HEALTHY.reward


def test_roll_back_after_the_configured_streak_and_state_round_trip() -> None:
    guards = Guards(GuardConfig(rollback_after=3))
    bad = dataclasses.replace(HEALTHY, entropy=0.0)
    assert [guards.check(bad).roll_back for _ in range(3)] == [False, False, True]
    restored = Guards(GuardConfig(rollback_after=3))
    restored.load_state_dict(guards.state_dict())
    assert restored.bad_streak == 3 and restored.state_dict() == guards.state_dict()
    assert restored.check(HEALTHY).bad_streak == 0


def test_roll_back_is_off_by_default() -> None:
    guards = Guards(GuardConfig())
    bad = dataclasses.replace(HEALTHY, entropy=0.0)
    assert not any(guards.check(bad).roll_back for _ in range(10))
