"""How an episode ended and what it scored: one frozen record, made by the env, read by every layer above."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from searchgym.env.rewards import RewardBreakdown

EndReason = Literal[
    "answered", "max_turns", "retriever_error", "tool_error", "context_budget", "observation_budget"
]
"""``answered``: the policy gave an answer; ``max_turns``: the last turn passed without one;
``retriever_error`` / ``tool_error``: a search or another tool failed; ``context_budget`` /
``observation_budget``: the rollout's token budget ended the episode (see :mod:`searchgym.policy.rollout`)."""


@dataclass(frozen=True, slots=True)
class EpisodeOutcome:
    """The end of one episode.

    Attributes:
        answer: the final answer's text, or None when the episode ended without one.
        end_reason: why the episode ended.
        reward: the scalar reward, or None when it could not be computed (masked from the update).
        reward_error: why the reward is None.
        reward_parts: outcome, shaping and search cost, or None with the reward.
        reward_functions: each configured reward function's value (``env.reward_fn``), by its spec.
        tool_cost: what the calls of tools other than search cost (``env.tool_costs``), already subtracted.
        em: exact match of the answer (None with the reward).
        f1: token F1 of the answer.
        cover_em: whether a gold answer appears in the answer.
        num_searches: searches carried out.
        tool_calls: calls carried out per tool (``{"search": 2, "calculator": 1}``).
        num_turns: policy turns taken.
        well_formed: every action was valid and the episode ended with an answer.
        error: the retriever's error, when one ended the episode.
        retrieved_ids: corpus ids of every passage shown, in order.
    """

    answer: str | None
    end_reason: EndReason
    reward: float | None
    reward_error: str | None = None
    reward_parts: RewardBreakdown | None = None
    reward_functions: Mapping[str, float] = field(default_factory=dict)
    tool_cost: float = 0.0
    em: float | None = None
    f1: float | None = None
    cover_em: float | None = None
    num_searches: int = 0
    tool_calls: Mapping[str, int] = field(default_factory=dict)
    num_turns: int = 0
    well_formed: bool = False
    error: str | None = None
    retrieved_ids: tuple[str, ...] = ()

    @property
    def answered(self) -> bool:
        """Whether the policy answered (Gymnasium's ``terminated``; otherwise the episode was truncated)."""
        return self.end_reason == "answered"

    def info_entries(self) -> dict[str, Any]:
        """The flat entries of the env's last ``info`` (documented in :class:`~searchgym.env.SearchEnv`)."""
        parts = self.reward_parts
        return {
            "answer": self.answer,
            "end_reason": self.end_reason,
            "error": self.error,
            "episode_retrieved_ids": self.retrieved_ids,
            "em": self.em,
            "f1": self.f1,
            "cover_em": self.cover_em,
            "reward": self.reward,
            "reward_error": self.reward_error,
            "reward_outcome": None if parts is None else parts.outcome,
            "reward_shaping": None if parts is None else parts.shaping,
            "reward_search_cost": None if parts is None else parts.search_cost,
            "reward_tool_cost": self.tool_cost,
            "reward_parts": dict(self.reward_functions),
            "tool_calls": dict(self.tool_calls),
            "outcome": self,
        }
