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
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np
from gymnasium.vector import AutoresetMode

from searchgym.env import EnvConfig, QAExample, SearchVectorEnv
from searchgym.env.search_env import as_example
from searchgym.policy.async_rollout import (
    DEFAULT_SEARCH_WAIT_S,
    BatchingTurnEngine,
    TurnEngine,
    run_episodes_async,
)
from searchgym.policy.budgets import RolloutError, RolloutMode, TokenBudgets
from searchgym.policy.episode import SEED_STRIDE, EpisodeState, default_group_id, encode_checked_prompt
from searchgym.policy.generation import Generator, SamplingParams, TransformersGenerator
from searchgym.policy.models import Policy
from searchgym.policy.trajectory import Timings, Trajectory

__all__ = ["RolloutError", "RolloutMode", "TokenBudgets", "default_group_id", "run_episodes"]


def run_episodes(
    policy: Generator | Policy | TurnEngine,
    vector_env: SearchVectorEnv,
    examples: Sequence[QAExample | Mapping[str, Any]],
    *,
    sampling: SamplingParams | None = None,
    budgets: TokenBudgets | None = None,
    group_ids: Sequence[str] | None = None,
    mode: RolloutMode = "lockstep",
    search_wait_s: float = DEFAULT_SEARCH_WAIT_S,
) -> list[Trajectory]:
    """Run one episode per example, at most ``vector_env.num_envs`` at a time, and return their trajectories.

    Both modes keep the same books (ids as sampled, masks, sampler log-probs, budgets); they differ in
    scheduling, and so in which turns share a generation call and which searches share a retriever call.

    Args:
        policy: a generation backend, or a loaded ``Policy`` (run with the transformers backend); in
            ``async`` mode also a :class:`~searchgym.policy.async_rollout.TurnEngine` (vLLM's async
            engine), while a ``Generator`` is served by a
            :class:`~searchgym.policy.async_rollout.BatchingTurnEngine`.
        vector_env: the env, in ``AutoresetMode.DISABLED`` (its default); give it the policy's tokenizer
            so that its observation budget counts the same tokens.
        examples: QA examples or FlashRAG records; repeat an example to sample it several times.
        sampling: sampling parameters; the env's stop strings (``</search>``, ``</answer>``, each tool's
            closing tag, or ``</tool_call>`` in the Hermes format) are added to its ``stop``;
            a seed makes the run reproducible (each generation call gets its own seed from it).
        budgets: token budgets (see the module docstring).
        group_ids: one id per example for GRPO groups; by default the example id, prefixed by the
            example's source when it has one (``"nq/test:42"``).
        mode: ``lockstep`` or ``async`` (see :data:`RolloutMode`).
        search_wait_s: ``async`` only: how long a search waits for others to share its retriever call.

    Raises:
        RolloutError: the vector env autoresets, a prompt exceeds ``max_prompt_tokens``,
            ``group_ids`` does not match ``examples``, or the mode is unknown.
    """
    if isinstance(policy, Policy):
        policy = TransformersGenerator(policy)
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
    sampling, budgets = sampling or SamplingParams(), budgets or TokenBudgets()
    # The env's format decides where a turn ends (</tool_call> for Hermes, each tool's closing tag).
    sampling = replace(sampling, stop=tuple(dict.fromkeys((*sampling.stop, *vector_env.stop))))
    if mode == "async":
        engine = policy if hasattr(policy, "generate_turn") else BatchingTurnEngine(policy)
        return run_episodes_async(
            cast(TurnEngine, engine),
            vector_env,
            parsed,
            group_ids,
            sampling=sampling,
            budgets=budgets,
            search_wait_s=search_wait_s,
        )
    if mode != "lockstep":
        raise RolloutError(f"rollout mode {mode!r}: use 'lockstep' or 'async'")
    if not hasattr(policy, "generate"):
        raise RolloutError("a TurnEngine runs async rollouts only: pass mode='async'")
    generator = cast(Generator, policy)
    run = _RunSettings(sampling, budgets, vector_env.config)
    trajectories: list[Trajectory] = []
    for start in range(0, len(parsed), vector_env.num_envs):
        chunk = slice(start, start + vector_env.num_envs)
        trajectories.extend(_run_batch(generator, vector_env, parsed[chunk], list(group_ids[chunk]), run))
    return trajectories


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
        return replace(self.sampling, seed=self.sampling.seed + (self.calls - 1) * SEED_STRIDE)


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
            [episode.context for episode in running],
            run.next_sampling(),
            max_new_tokens=[episode.room(run.budgets) for episode in running],
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
            ended = bool(terminated[episode.slot] or truncated[episode.slot])
            episode.record_step(
                generation,
                text,
                observations[episode.slot],
                dict(vector_env.final_infos[episode.slot] or {}) if ended else _info_at(infos, episode.slot),
                ended=ended,
                tokenizer=generator.tokenizer,
                budgets=run.budgets,
                env_config=run.env_config,
            )
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
) -> list[EpisodeState]:
    """Reset the first ``len(examples)`` sub-envs on the examples and encode their prompts."""
    reset_mask = np.zeros(vector_env.num_envs, dtype=np.bool_)
    reset_mask[: len(examples)] = True
    prompts, _ = vector_env.reset(options={"examples": examples, "reset_mask": reset_mask})
    tools = vector_env.tool_schemas if run.env_config.tool_format == "hermes" else None
    return [
        EpisodeState(
            example=example,
            group_id=group_id,
            slot=slot,
            prompt_ids=encode_checked_prompt(
                generator.tokenizer,
                prompts[slot],
                example,
                budgets=run.budgets,
                env_config=run.env_config,
                tools=tools,
            ),
        )
        for slot, (example, group_id) in enumerate(zip(examples, group_ids, strict=True))
    ]


def _with_room(episodes: list[EpisodeState], run: _RunSettings) -> list[EpisodeState]:
    """The running episodes, after ending those whose context has no room for another token."""
    for episode in episodes:
        if not episode.done and episode.room(run.budgets) < 1:
            episode.end_on_budget("context_budget", run.env_config)
    return [episode for episode in episodes if not episode.done]


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
