"""What a batch of episodes says about the policy, and where its time went: the loop's episode metrics."""

import math
from collections.abc import Sequence

import numpy as np

from searchgym.policy.trajectory import Trajectory

DEV_METRICS = ("em", "f1", "cover_em", "reward", "searches", "answered")
"""The episode means a dev evaluation reports (``dev/<name>``)."""


def episode_means(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Means over the episodes of a batch, from their outcomes and tokens.

    ``reward`` averages the usable (present and finite) rewards and ``missing_rewards`` counts the others;
    ``em``, ``f1`` and ``cover_em`` average the episodes that have them and are left out when none has.
    """
    outcomes = [t.outcome for t in trajectories]
    rewards = [o.reward for o in outcomes if o.reward is not None and math.isfinite(o.reward)]
    means = {
        "reward": float(np.mean(rewards)) if rewards else math.nan,
        "missing_rewards": float(len(outcomes) - len(rewards)),
        "policy_tokens": float(np.mean([t.num_policy_tokens for t in trajectories])),
        "response_tokens": float(np.mean([len(t.response_ids) for t in trajectories])),
        "searches": float(np.mean([o.num_searches for o in outcomes])),
        "turns": float(np.mean([o.num_turns for o in outcomes])),
        "answered": float(np.mean([o.answered for o in outcomes])),
        "truncated": float(np.mean([not o.answered for o in outcomes])),
    }
    for name in ("em", "f1", "cover_em"):
        scored = [value for o in outcomes if (value := getattr(o, name)) is not None]
        if scored:
            means[name] = float(np.mean(scored))
    return means


def rollout_timings(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """``time/generation`` and ``time/retrieval`` summed over the rollout's episode batches; the longest one.

    Episodes generated together share one :class:`~searchgym.policy.trajectory.Timings`, counted once. With
    several rollout workers the sums are worker-seconds, and ``time/rollout_slowest_batch`` (each worker runs
    one batch a step) is what the step waited for; ``time/rollout`` minus it is the cost of dispatching.
    """
    batches = {id(t.timings): t.timings for t in trajectories}.values()
    return {
        "time/generation": sum(timings.generation for timings in batches),
        "time/retrieval": sum(timings.retrieval for timings in batches),
        "time/rollout_slowest_batch": max(t.generation + t.retrieval + t.bookkeeping for t in batches),
    }
