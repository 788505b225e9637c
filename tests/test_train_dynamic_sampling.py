"""DAPO's dynamic sampling: the group filter, the drawing bookkeeping, and the loop drawing more prompts."""

import math
from pathlib import Path

from train_fixtures import run_toy

from searchgym.env.outcome import EpisodeOutcome
from searchgym.policy.trajectory import Trajectory
from searchgym.train.dynamic_sampling import fill_with_informative_groups, keep_informative_groups


def episodes(group_rewards: dict[str, list[float | None]]) -> list[Trajectory]:
    return [
        Trajectory(
            example_id=group,
            group_id=group,
            prompt_ids=[1],
            response_ids=[2],
            loss_mask=[1],
            turn_index=[0],
            outcome=EpisodeOutcome(answer=None, end_reason="answered", reward=reward),
        )
        for group, rewards in group_rewards.items()
        for reward in rewards
    ]


def rewards_of(trajectories: list[Trajectory]) -> list[tuple[str, float | None]]:
    return [(t.group_id, t.reward) for t in trajectories]


def test_groups_of_equal_rewards_are_dropped() -> None:
    drawn = episodes({"a": [1.0, 1.0], "b": [0.0, 1.0], "c": [0.0, None, 0.0], "d": [math.nan, 1.0, 0.0]})
    kept, dropped = keep_informative_groups(drawn)
    # a: all right; c: all (valid) wrong; b and d differ (d's NaN is not a reward, but 1 and 0 are).
    assert rewards_of(kept)[:2] == [("b", 0.0), ("b", 1.0)]
    assert [group for group, _ in rewards_of(kept)] == ["b", "b", "d", "d", "d"]
    assert dropped == 2


class ScriptedDraws:
    """A rollout that returns prepared batches one after the other and counts its calls."""

    def __init__(self, *batches: dict[str, list[float | None]]) -> None:
        self.batches = list(batches)
        self.calls = 0

    def __call__(self) -> list[Trajectory]:
        self.calls += 1
        return episodes(self.batches[self.calls - 1])


def test_drawing_goes_on_until_the_batch_is_full_and_trims_the_excess() -> None:
    draw = ScriptedDraws(
        {"a": [1.0, 1.0], "b": [0.0, 1.0]},
        {"c": [0.0, 0.0], "d": [0.0, 0.0]},
        {"e": [1.0, 0.0], "f": [0.0, 1.0]},
    )
    sample = fill_with_informative_groups(draw, target_groups=2, max_draws=5)
    assert draw.calls == 3
    assert [t.group_id for t in sample.trajectories] == ["b", "b", "e", "e"]  # f is beyond the target
    assert len(sample.drawn) == 12
    assert sample.metrics() == {
        "rollout/draws": 3.0,
        "rollout/kept_groups": 2.0,
        "rollout/dropped_groups": 3.0,
    }


def test_the_cap_on_draws_trains_on_what_it_has() -> None:
    draw = ScriptedDraws({"a": [1.0, 0.0], "b": [1.0, 1.0]}, {"c": [0.0, 0.0]}, {"d": [1.0, 0.0]})
    sample = fill_with_informative_groups(draw, target_groups=2, max_draws=2)
    assert draw.calls == 2 and [t.group_id for t in sample.trajectories] == ["a", "a"]
    assert (sample.kept_groups, sample.dropped_groups) == (1, 2)


def test_without_any_informative_group_the_last_draw_is_kept_whole() -> None:
    draw = ScriptedDraws({"a": [1.0, 1.0]}, {"b": [0.0, 0.0]})
    sample = fill_with_informative_groups(draw, target_groups=1, max_draws=2)
    assert [t.group_id for t in sample.trajectories] == ["b", "b"] and sample.kept_groups == 0


def test_the_loop_draws_more_prompts_and_logs_how_many(tmp_path: Path) -> None:
    result = run_toy(
        tmp_path,
        "algorithm.name=grpo",
        "kl.coef=0",
        "algorithm.dynamic_sampling=true",
        "algorithm.dynamic_sampling_max_draws=3",
        "total_steps=2",
        "dev.every=0",
        "dev.before_training=false",
        "checkpoint.every=0",
        "checkpoint.export_final=false",
    )
    for row in result.history:
        assert 1 <= row["rollout/draws"] <= 3
        assert row["rollout/kept_groups"] <= 4  # batch.prompts_per_step
        # Every drawn group is either kept or dropped (kept groups may come from any draw).
        assert row["rollout/dropped_groups"] + row["rollout/kept_groups"] <= 4 * row["rollout/draws"]
