"""Stability watches: warn when a run drifts towards a known failure, and say when to roll back.

The failures are those users of Search-R1 report: collapse of the reward (7B instruct models, GRPO),
responses that shrink to nothing, entropy collapse, a policy running away from its reference, updates so
large that most tokens hit the clip, and rewards that come back NaN. Each watch compares one number of the
step with a threshold of :class:`~searchgym.train.config.GuardConfig`; a step that trips any watch is "bad".
"""

import math
from dataclasses import dataclass

from searchgym.train.config import GuardConfig


@dataclass(frozen=True, slots=True)
class StepHealth:
    """The numbers of one training step that the guards watch.

    Attributes:
        reward: mean outcome reward of the step's episodes (NaN when every reward is missing).
        response_length: mean policy tokens per episode.
        entropy: mean token entropy of the policy on its own samples.
        kl: mean per-token KL to the reference, or None without a reference.
        clip_fraction: share of policy tokens whose ratio was clipped.
        missing_reward_fraction: share of episodes whose reward could not be computed.
        skipped_steps: optimizer steps skipped for a non-finite loss or gradient.
    """

    reward: float
    response_length: float
    entropy: float
    kl: float | None
    clip_fraction: float
    missing_reward_fraction: float
    skipped_steps: int


@dataclass(frozen=True, slots=True)
class GuardReport:
    """What the guards concluded about a step.

    Attributes:
        warnings: one sentence per tripped watch (what happened and what to try).
        bad_streak: bad steps in a row, this one included (0 when this step was fine).
        roll_back: the streak reached ``rollback_after``: restore the last healthy checkpoint.
    """

    warnings: tuple[str, ...]
    bad_streak: int
    roll_back: bool


class Guards:
    """Moving averages of reward and length, and the streak of bad steps; resumable via ``state_dict``."""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.reward_average: float | None = None
        self.best_reward_average = -math.inf
        self.length_average: float | None = None
        self.longest_length_average = 0.0
        self.bad_streak = 0

    def check(self, health: StepHealth) -> GuardReport:
        """Update the averages with this step and report the watches it trips."""
        warnings = [*self._trend_warnings(health), *self._threshold_warnings(health)]
        self.bad_streak = self.bad_streak + 1 if warnings else 0
        rollback_after = self.config.rollback_after
        roll_back = rollback_after > 0 and self.bad_streak >= rollback_after
        return GuardReport(warnings=tuple(warnings), bad_streak=self.bad_streak, roll_back=roll_back)

    def _trend_warnings(self, health: StepHealth) -> list[str]:
        warnings = []
        if math.isfinite(health.reward):
            self.reward_average = self._smooth(self.reward_average, health.reward)
            self.best_reward_average = max(self.best_reward_average, self.reward_average)
            if (
                self.best_reward_average > 0
                and self.reward_average < self.config.min_reward_ratio * self.best_reward_average
            ):
                warnings.append(
                    f"reward collapsing: its moving average {self.reward_average:.3f} is below "
                    f"{self.config.min_reward_ratio:g} x its best {self.best_reward_average:.3f}; "
                    "lower optim.actor_lr or raise kl.coef"
                )
        self.length_average = self._smooth(self.length_average, health.response_length)
        self.longest_length_average = max(self.longest_length_average, self.length_average)
        if self.length_average < self.config.min_length_ratio * self.longest_length_average:
            warnings.append(
                f"responses shrinking: {self.length_average:.1f} tokens on average, below "
                f"{self.config.min_length_ratio:g} x the longest average {self.longest_length_average:.1f}"
            )
        return warnings

    def _threshold_warnings(self, health: StepHealth) -> list[str]:
        config, warnings = self.config, []
        if health.entropy < config.min_entropy:
            warnings.append(
                f"entropy collapse: {health.entropy:.4f} < guards.min_entropy={config.min_entropy:g}; "
                "raise algorithm.entropy_coef or the sampling temperature"
            )
        if health.kl is not None and health.kl > config.max_kl:
            warnings.append(
                f"policy far from its reference: KL {health.kl:.4f} > guards.max_kl={config.max_kl:g}; "
                "raise kl.coef or lower optim.actor_lr"
            )
        if health.clip_fraction > config.max_clip_fraction:
            warnings.append(
                f"updates too large: {health.clip_fraction:.1%} of tokens clipped "
                f"(> guards.max_clip_fraction={config.max_clip_fraction:g}); lower optim.actor_lr"
            )
        if health.missing_reward_fraction > config.max_missing_reward_fraction:
            warnings.append(
                f"{health.missing_reward_fraction:.1%} of rewards missing (masked from the update); "
                "check the reward inputs (gold answers) and the env's info"
            )
        if health.skipped_steps > 0:
            warnings.append(
                f"{health.skipped_steps} optimizer step(s) skipped for a non-finite loss or gradient; "
                "consider system.dtype=float32 or a lower learning rate"
            )
        return warnings

    def _smooth(self, average: float | None, value: float) -> float:
        if average is None:
            return value
        return self.config.smoothing * average + (1 - self.config.smoothing) * value

    def state_dict(self) -> dict[str, float]:
        """The running statistics, JSON-ready (NaN marks an average not started yet)."""
        return {
            "reward_average": math.nan if self.reward_average is None else self.reward_average,
            "best_reward_average": self.best_reward_average,
            "length_average": math.nan if self.length_average is None else self.length_average,
            "longest_length_average": self.longest_length_average,
            "bad_streak": float(self.bad_streak),
        }

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore what ``state_dict`` returned."""
        self.reward_average = None if math.isnan(state["reward_average"]) else state["reward_average"]
        self.best_reward_average = state["best_reward_average"]
        self.length_average = None if math.isnan(state["length_average"]) else state["length_average"]
        self.longest_length_average = state["longest_length_average"]
        self.bad_streak = int(state["bad_streak"])
