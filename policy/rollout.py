"""Multi-turn rollouts: the policy generates, the env searches and answers back, tokens are kept exactly.

Each turn generates for the running episodes in one batch, gives each decoded action to its sub-env
(the vector env sends every search of the step to the retriever in one call), and appends the tokens
of the observation it returns. The policy's tokens are the sampler's ids as generated, never decoded
and re-tokenized; only the observations are tokenized, once, when they are appended.

Token budgets (all in the policy's tokens):

- ``max_prompt_tokens``: a prompt is never truncated; a longer one is an error naming the setting.
- ``max_turn_tokens``: new tokens per turn (a turn cut by it goes to the env as it is).
- ``max_observation_tokens``: an observation longer than this ends the episode as truncated
  (give the env the policy's tokenizer and an equal or smaller ``max_observation_tokens`` so that it
  trims documents to fit instead).
- ``max_context_tokens``: prompt and response together; when the next turn has no room, or an
  observation does not fit, the episode ends as truncated.

An episode that a budget ends is scored as the env scores one without an answer, and its outcome
says which budget in ``end_reason`` (``"context_budget"`` or ``"observation_budget"``).
"""

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
from gymnasium.vector import AutoresetMode

from searchgym.env import EnvConfig, QAExample, SearchVectorEnv
from searchgym.env.outcome import EndReason, EpisodeOutcome
from searchgym.env.search_env import as_example, score_episode
from searchgym.policy.budgets import RolloutError, TokenBudgets
from searchgym.policy.generation import Generation, Generator, SamplingParams, TransformersGenerator
from searchgym.policy.models import Policy, encode_prompt
from searchgym.policy.trajectory import Timings, Trajectory, TurnRecord

# Seeds of successive generation calls are this far apart, so that per-request seeds derived from them
# (vLLM seeds request i with seed + i) never repeat across the calls of a run.
_SEED_STRIDE = 1 << 20


def run_episodes(
    policy: Generator | Policy,
    vector_env: SearchVectorEnv,
    examples: Sequence[QAExample | Mapping[str, Any]],
    *,
    sampling: SamplingParams | None = None,
    budgets: TokenBudgets | None = None,
    group_ids: Sequence[str] | None = None,
) -> list[Trajectory]:
    """Run one episode per example, ``vector_env.num_envs`` at a time, and return their trajectories.

    Args:
        policy: a generation backend, or a loaded ``Policy`` (run with the transformers backend).
        vector_env: the env, in ``AutoresetMode.DISABLED`` (its default); give it the policy's tokenizer
            so that its observation budget counts the same tokens.
        examples: QA examples or FlashRAG records; repeat an example to sample it several times.
        sampling: sampling parameters; the env's stop strings (``</search>``, ``</answer>``, each tool's
            closing tag, or ``</tool_call>`` in the Hermes format) are added to its ``stop``;
            a seed makes the run reproducible (each generation call gets its own seed from it).
        budgets: token budgets (see the module docstring).
        group_ids: one id per example for GRPO groups; by default the example id, prefixed by the
            example's source when it has one (``"nq/test:42"``).

    Raises:
        RolloutError: the vector env autoresets, a prompt exceeds ``max_prompt_tokens``, or
            ``group_ids`` does not match ``examples``.
    """
    generator = TransformersGenerator(policy) if isinstance(policy, Policy) else policy
    if vector_env.autoreset_mode != AutoresetMode.DISABLED:
        raise RolloutError(
            f"the vector env autoresets ({vector_env.autoreset_mode.value}): create it with "
            "autoreset_mode=AutoresetMode.DISABLED so that each episode is collected once"
        )
    parsed = [as_example(example) for example in examples]
    if group_ids is None:
        group_ids = [default_group_id(example) for example in parsed]
    elif len(group_ids) != len(parsed):
        raise RolloutError(f"{len(group_ids)} group ids for {len(parsed)} examples: give one per example")
    sampling = sampling or SamplingParams()
    # The env's format decides where a turn ends (</tool_call> for Hermes, each tool's closing tag).
    sampling = replace(sampling, stop=tuple(dict.fromkeys((*sampling.stop, *vector_env.stop))))
    run = _RunSettings(sampling, budgets or TokenBudgets(), vector_env.config)
    trajectories: list[Trajectory] = []
    for start in range(0, len(parsed), vector_env.num_envs):
        chunk = slice(start, start + vector_env.num_envs)
        trajectories.extend(_run_batch(generator, vector_env, parsed[chunk], list(group_ids[chunk]), run))
    return trajectories


def default_group_id(example: QAExample) -> str:
    """The example's id, prefixed by its source, so that ids repeated across datasets stay apart."""
    return f"{example.source}:{example.id}" if example.source else example.id


@dataclass(slots=True)
class _RunSettings:
    sampling: SamplingParams
    budgets: TokenBudgets
    env_config: EnvConfig
    calls: int = 0

    def next_sampling(self) -> SamplingParams:
        """The sampling parameters of the next generation call: a fresh seed each call when seeded."""
        self.calls += 1
        if self.sampling.seed is None:
            return self.sampling
        return replace(self.sampling, seed=self.sampling.seed + (self.calls - 1) * _SEED_STRIDE)


@dataclass(slots=True)
class _Episode:
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
        return len(self.prompt_ids) + len(self.response_ids)

    def add_turn(
        self, generation: Generation, text: str, info: dict[str, Any], observation_ids: list[int]
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

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def to_trajectory(self, timings: Timings) -> Trajectory:
        assert self.outcome is not None  # the batch loop runs until every episode has its outcome
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


def _run_batch(
    generator: Generator,
    vector_env: SearchVectorEnv,
    examples: list[QAExample],
    group_ids: list[str],
    run: _RunSettings,
) -> list[Trajectory]:
    """Collect the episodes of at most ``num_envs`` examples, turn by turn until all have ended."""
    started = time.perf_counter()
    generation_s = retrieval_s = 0.0
    episodes = _start_episodes(generator, vector_env, examples, group_ids, run)
    while running := _with_room(episodes, run):
        generation_started = time.perf_counter()
        generations = generator.generate(
            [[*episode.prompt_ids, *episode.response_ids] for episode in running],
            run.next_sampling(),
            max_new_tokens=[_room(episode, run.budgets) for episode in running],
        )
        generation_s += time.perf_counter() - generation_started
        # One sequence of ids decodes to one str (transformers declares str | list[str], for batches too).
        texts = [cast(str, generator.tokenizer.decode(generation.token_ids)) for generation in generations]
        actions = [""] * vector_env.num_envs
        for episode, text in zip(running, texts, strict=True):
            actions[episode.slot] = text
        observations, _, terminated, truncated, infos = vector_env.step(actions)
        retrieval_s += _retrieval_seconds(infos)
        for episode, generation, text in zip(running, generations, texts, strict=True):
            if terminated[episode.slot] or truncated[episode.slot]:
                final_info = dict(vector_env.final_infos[episode.slot] or {})
                episode.add_turn(generation, text, final_info, [])
                episode.outcome = final_info["outcome"]
            else:
                step_info = _info_at(infos, episode.slot)
                _continue(episode, generation, text, observations[episode.slot], step_info, generator, run)
    total_s = time.perf_counter() - started
    timings = Timings(
        generation=generation_s, retrieval=retrieval_s, bookkeeping=total_s - generation_s - retrieval_s
    )
    return [episode.to_trajectory(timings) for episode in episodes]


def _start_episodes(
    generator: Generator,
    vector_env: SearchVectorEnv,
    examples: list[QAExample],
    group_ids: list[str],
    run: _RunSettings,
) -> list[_Episode]:
    """Reset the first ``len(examples)`` sub-envs on the examples and encode their prompts."""
    reset_mask = np.zeros(vector_env.num_envs, dtype=np.bool_)
    reset_mask[: len(examples)] = True
    prompts, _ = vector_env.reset(options={"examples": examples, "reset_mask": reset_mask})
    chat = run.env_config.prompt_style == "chat"
    tools = vector_env.tool_schemas if run.env_config.tool_format == "hermes" else None
    episodes = []
    for slot, (example, group_id) in enumerate(zip(examples, group_ids, strict=True)):
        prompt_ids = encode_prompt(generator.tokenizer, prompts[slot], chat=chat, tools=tools)
        if len(prompt_ids) > run.budgets.max_prompt_tokens:
            raise RolloutError(
                f"the prompt of example {example.id!r} has {len(prompt_ids)} tokens, more than "
                f"max_prompt_tokens={run.budgets.max_prompt_tokens}: raise max_prompt_tokens (prompts are "
                "never truncated) or shorten the prompt template"
            )
        episodes.append(_Episode(example=example, group_id=group_id, slot=slot, prompt_ids=prompt_ids))
    return episodes


def _room(episode: _Episode, budgets: TokenBudgets) -> int:
    """Tokens the episode's next turn may generate."""
    return min(budgets.max_turn_tokens, budgets.max_context_tokens - episode.context_length)


def _with_room(episodes: list[_Episode], run: _RunSettings) -> list[_Episode]:
    """The running episodes, after ending those whose context has no room for another token."""
    for episode in episodes:
        if not episode.done and _room(episode, run.budgets) < 1:
            _end_on_budget(episode, "context_budget", run)
    return [episode for episode in episodes if not episode.done]


def _continue(
    episode: _Episode,
    generation: Generation,
    text: str,
    observation: str,
    info: dict[str, Any],
    generator: Generator,
    run: _RunSettings,
) -> None:
    """Record a turn the env did not end: append its observation, or end the episode if it does not fit."""
    observation_ids = generator.tokenizer.encode(observation, add_special_tokens=False)
    context_after = episode.context_length + len(generation.token_ids) + len(observation_ids)
    over_budget: EndReason | None = None
    if len(observation_ids) > run.budgets.max_observation_tokens:
        over_budget = "observation_budget"
    elif context_after > run.budgets.max_context_tokens:
        over_budget = "context_budget"
    if over_budget is None:
        episode.add_turn(generation, text, info, observation_ids)
    else:
        episode.add_turn(generation, text, info, [])
        _end_on_budget(episode, over_budget, run)


def _end_on_budget(episode: _Episode, reason: EndReason, run: _RunSettings) -> None:
    """End an episode the env still runs, scored as the env scores an episode without an answer.

    The sub-env is left as it is: later steps of this batch give it an empty action (no search) and
    ignore what it returns, and the next batch resets it.
    """
    episode.outcome = score_episode(
        episode.example,
        answer=None,
        end_reason=reason,
        retrieved_ids=tuple(passage_id for turn in episode.turns for passage_id in turn.retrieved_ids),
        retrieved_texts=(),
        well_formed=False,
        num_turns=len(episode.turns),
        tool_calls=episode.tool_calls,
        config=run.env_config,
    )


def _info_at(infos: Mapping[str, Any], index: int) -> dict[str, Any]:
    """Sub-env ``index``'s entries of a Gymnasium vector info (``key -> array`` with ``_key`` masks)."""
    entry = {}
    for key, values in infos.items():
        if key.startswith("_") or not infos[f"_{key}"][index]:
            continue
        value = values[index]
        entry[key] = value.item() if isinstance(value, np.generic) else value
    return entry


def _retrieval_seconds(infos: Mapping[str, Any]) -> float:
    """Wall time of the step's one retriever call (every search of the step reports the same call)."""
    if "retrieval_latency_s" not in infos:
        return 0.0
    latencies = infos["retrieval_latency_s"][infos["_retrieval_latency_s"]]
    return float(latencies.max()) if len(latencies) else 0.0
