"""DAPO's dynamic sampling: keep the groups whose rewards differ; draw more prompts until the batch is full.

Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", section 3.2. A group
whose samples all scored alike (all right, or all wrong) has zero advantage under every group-relative
estimator: it adds nothing but tokens to the loss denominator. With ``algorithm.dynamic_sampling`` the
training loop draws rollout batches until ``batch.prompts_per_step`` informative groups are collected, at
most ``algorithm.dynamic_sampling_max_draws`` times, through :func:`fill_with_informative_groups`.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from searchgym.policy.trajectory import Trajectory
from searchgym.train.algorithms import informative_groups


def keep_informative_groups(trajectories: Sequence[Trajectory]) -> tuple[list[Trajectory], int]:
    """The episodes of the groups whose valid rewards are not all equal, in order; and how many groups fell.

    A missing or non-finite reward does not count (see :func:`searchgym.train.algorithms.informative_groups`).
    """
    rewards = [t.reward if t.reward is not None and math.isfinite(t.reward) else None for t in trajectories]
    scores = torch.tensor([0.0 if reward is None else reward for reward in rewards])
    valid = torch.tensor([reward is not None for reward in rewards])
    group_ids = [t.group_id for t in trajectories]
    keep = informative_groups(scores, group_ids, valid=valid).tolist()
    kept = [t for t, k in zip(trajectories, keep, strict=True) if k]
    dropped = len(set(group_ids)) - len({t.group_id for t in kept})
    return kept, dropped


@dataclass(frozen=True, slots=True)
class DynamicSample:
    """The episodes one step trains on, and what it took to collect them.

    Attributes:
        trajectories: the kept groups' episodes (at most the target number of groups), in drawing order.
            When no draw produced any informative group, the last draw's episodes unfiltered (the update
            then finds no signal in group-relative advantages, and skips its step).
        drawn: every episode sampled this step, kept or not (rollout statistics describe the policy, not
            the filter).
        draws: rollout batches drawn.
        kept_groups: groups in ``trajectories`` (0 in the fallback above).
        dropped_groups: groups drawn and dropped for equal rewards.
    """

    trajectories: list[Trajectory]
    drawn: list[Trajectory]
    draws: int
    kept_groups: int
    dropped_groups: int

    def metrics(self) -> dict[str, float]:
        """``rollout/draws``, ``rollout/kept_groups``, ``rollout/dropped_groups``."""
        return {
            "rollout/draws": float(self.draws),
            "rollout/kept_groups": float(self.kept_groups),
            "rollout/dropped_groups": float(self.dropped_groups),
        }


def fill_with_informative_groups(
    draw: Callable[[], list[Trajectory]], *, target_groups: int, max_draws: int
) -> DynamicSample:
    """Call ``draw`` (one rollout batch of fresh prompts) until ``target_groups`` informative groups are kept.

    Args:
        draw: samples the next prompts' groups with the current policy (the loop's rollout call).
        target_groups: groups the step wants (``batch.prompts_per_step``).
        max_draws: calls of ``draw`` at most; the step then trains on the groups it has.

    The same prompt drawn twice (a small dataset wraps around) forms two groups here; they share a group
    id, so the advantage estimators pool their samples.
    """
    kept: list[list[Trajectory]] = []
    drawn: list[Trajectory] = []
    dropped, draws, last = 0, 0, []
    while draws < max_draws and len(kept) < target_groups:
        last = draw()
        draws += 1
        drawn.extend(last)
        informative, fell = keep_informative_groups(last)
        dropped += fell
        kept.extend(_groups_in_order(informative))
    kept = kept[:target_groups]
    if not kept:
        return DynamicSample(last, drawn, draws, kept_groups=0, dropped_groups=dropped)
    trajectories = [t for group in kept for t in group]
    return DynamicSample(trajectories, drawn, draws, kept_groups=len(kept), dropped_groups=dropped)


def _groups_in_order(trajectories: Sequence[Trajectory]) -> list[list[Trajectory]]:
    """The episodes split by group id, groups in first-seen order."""
    groups: dict[str, list[Trajectory]] = {}
    for trajectory in trajectories:
        groups.setdefault(trajectory.group_id, []).append(trajectory)
    return list(groups.values())
