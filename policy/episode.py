"""One episode being collected, shared by the lock-step and the asynchronous rollouts.

Both rollouts keep the same books: the policy's ids exactly as sampled (mask 1, with the sampler's
log-probs), the observation ids tokenized once (mask 0), and the same token budgets, so that their
trajectories differ only in how episodes are scheduled, never in what an episode holds.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from searchgym.env import EnvConfig, QAExample
from searchgym.env.outcome import EndReason, EpisodeOutcome
from searchgym.env.search_env import score_episode
from searchgym.policy.budgets import RolloutError, TokenBudgets
from searchgym.policy.generation import Generation
from searchgym.policy.models import encode_prompt
from searchgym.policy.trajectory import Timings, Trajectory, TurnRecord

SEED_STRIDE = 1 << 20
"""Seeds of successive generation calls (or episodes) are this far apart, so that per-request seeds derived
from them (vLLM seeds request i with seed + i) never repeat across the calls of a run."""


def default_group_id(example: QAExample) -> str:
    """The example's id, prefixed by its source, so that ids repeated across datasets stay apart."""
    return f"{example.source}:{example.id}" if example.source else example.id


def encode_checked_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    example: QAExample,
    *,
    budgets: TokenBudgets,
    env_config: EnvConfig,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """The prompt's ids (chat template applied for chat prompts, with ``tools`` for Hermes); never truncated.

    Raises:
        RolloutError: the prompt has more than ``max_prompt_tokens`` tokens.
    """
    prompt_ids = encode_prompt(tokenizer, prompt, chat=env_config.prompt_style == "chat", tools=tools)
    if len(prompt_ids) > budgets.max_prompt_tokens:
        raise RolloutError(
            f"the prompt of example {example.id!r} has {len(prompt_ids)} tokens, more than "
            f"max_prompt_tokens={budgets.max_prompt_tokens}: raise max_prompt_tokens (prompts are "
            "never truncated) or shorten the prompt template"
        )
    return prompt_ids


@dataclass(slots=True)
class EpisodeState:
    """One episode being collected: its tokens so far and what the env last said."""

    example: QAExample
    group_id: str
    slot: int
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    turn_index: list[int] = field(default_factory=list)
    logprobs: list[float] | None = field(default_factory=list)
    turns: list[TurnRecord] = field(default_factory=list)
    tool_calls: dict[str, int] = field(default_factory=dict)
    outcome: EpisodeOutcome | None = None

    @property
    def context_length(self) -> int:
        """Prompt and response tokens so far."""
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def context(self) -> list[int]:
        """What the policy continues at its next turn."""
        return [*self.prompt_ids, *self.response_ids]

    @property
    def done(self) -> bool:
        """Whether the episode has its outcome."""
        return self.outcome is not None

    def room(self, budgets: TokenBudgets) -> int:
        """Tokens the episode's next turn may generate."""
        return min(budgets.max_turn_tokens, budgets.max_context_tokens - self.context_length)

    def add_turn(
        self, generation: Generation, text: str, info: Mapping[str, Any], observation_ids: list[int]
    ) -> None:
        """Append a turn: the policy's tokens (mask 1) and the observation's (mask 0), and its record."""
        turn = len(self.turns)
        policy_count, observation_count = len(generation.token_ids), len(observation_ids)
        self.response_ids += [*generation.token_ids, *observation_ids]
        self.loss_mask += [1] * policy_count + [0] * observation_count
        self.turn_index += [turn] * (policy_count + observation_count)
        if self.logprobs is not None and generation.logprobs is not None:
            self.logprobs += [*generation.logprobs, *[0.0] * observation_count]
        else:
            self.logprobs = None
        self.turns.append(
            TurnRecord(
                action_type=str(info.get("action_type", "invalid")),
                text=text,
                query=info.get("query"),
                retrieved_ids=tuple(info.get("retrieved_ids") or ()),
                num_policy_tokens=policy_count,
                num_observation_tokens=observation_count,
            )
        )
        if info.get("action_type") in ("search", "tool") and info.get("tool"):
            self.tool_calls[info["tool"]] = self.tool_calls.get(info["tool"], 0) + 1

    def record_step(
        self,
        generation: Generation,
        text: str,
        observation: str,
        info: Mapping[str, Any],
        *,
        ended: bool,
        tokenizer: PreTrainedTokenizerBase,
        budgets: TokenBudgets,
        env_config: EnvConfig,
    ) -> None:
        """Record what the env made of a turn: the end of the episode, or the turn and its observation."""
        if ended:
            self.add_turn(generation, text, info, [])
            self.outcome = info["outcome"]
        else:
            self.continue_with(
                generation,
                text,
                observation,
                info,
                tokenizer=tokenizer,
                budgets=budgets,
                env_config=env_config,
            )

    def continue_with(
        self,
        generation: Generation,
        text: str,
        observation: str,
        info: Mapping[str, Any],
        *,
        tokenizer: PreTrainedTokenizerBase,
        budgets: TokenBudgets,
        env_config: EnvConfig,
    ) -> None:
        """Record a turn the env did not end: append its observation, or end the episode if it overflows."""
        observation_ids = tokenizer.encode(observation, add_special_tokens=False)
        context_after = self.context_length + len(generation.token_ids) + len(observation_ids)
        over_budget: EndReason | None = None
        if len(observation_ids) > budgets.max_observation_tokens:
            over_budget = "observation_budget"
        elif context_after > budgets.max_context_tokens:
            over_budget = "context_budget"
        if over_budget is None:
            self.add_turn(generation, text, info, observation_ids)
        else:
            self.add_turn(generation, text, info, [])
            self.end_on_budget(over_budget, env_config)

    def end_on_budget(self, reason: EndReason, env_config: EnvConfig) -> None:
        """End an episode the env still runs, scored as the env scores an episode without an answer.

        The sub-env is left as it is: the next episode on it resets it.
        """
        self.outcome = score_episode(
            self.example,
            answer=None,
            end_reason=reason,
            retrieved_ids=tuple(passage_id for turn in self.turns for passage_id in turn.retrieved_ids),
            retrieved_texts=(),
            well_formed=False,
            num_turns=len(self.turns),
            tool_calls=self.tool_calls,
            config=env_config,
        )

    def to_trajectory(self, timings: Timings) -> Trajectory:
        """The finished episode as a trajectory."""
        assert self.outcome is not None  # the rollouts run until every episode has its outcome
        return Trajectory(
            example_id=self.example.id,
            group_id=self.group_id,
            prompt_ids=self.prompt_ids,
            response_ids=self.response_ids,
            loss_mask=self.loss_mask,
            turn_index=self.turn_index,
            outcome=self.outcome,
            sampler_logprobs=self.logprobs,
            turns=self.turns,
            timings=timings,
        )
