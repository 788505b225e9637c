"""The token budgets and the schedule of episodes: plain settings, light to import (configs embed them)."""

from dataclasses import dataclass
from typing import Literal

from searchgym.errors import SearchgymError


class RolloutError(SearchgymError):
    """A rollout cannot run with these settings or inputs."""


RolloutMode = Literal["lockstep", "async"]
"""``lockstep``: every turn of a batch generates together, then searches together, and the next batch
starts when its slowest episode ends; ``async``: each episode goes on as soon as its own search returns and
a new one starts as soon as a sub-env is free (:mod:`searchgym.policy.async_rollout`)."""


@dataclass(frozen=True, slots=True)
class TokenBudgets:
    """Token limits of one episode, in the policy's tokens.

    Attributes:
        max_prompt_tokens: the longest prompt (chat template included); longer is an error, never a cut.
        max_turn_tokens: new tokens the policy may write in one turn.
        max_observation_tokens: the longest observation appended after a turn.
        max_context_tokens: prompt plus response; must not exceed the backend's context (vLLM's
            ``max_model_len``).
    """

    max_prompt_tokens: int = 1024
    max_turn_tokens: int = 512
    max_observation_tokens: int = 640
    max_context_tokens: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_turn_tokens", "max_observation_tokens", "max_context_tokens"):
            if getattr(self, name) < 1:
                raise RolloutError(f"{name}={getattr(self, name)}: set it to 1 or more")
        if self.max_prompt_tokens >= self.max_context_tokens:
            raise RolloutError(
                f"max_prompt_tokens={self.max_prompt_tokens} leaves no room in max_context_tokens="
                f"{self.max_context_tokens}: raise max_context_tokens or lower max_prompt_tokens"
            )
