"""Per-trajectory (asynchronous) rollouts: every episode advances on its own, nobody waits for a batch.

Lock-step rollouts (:func:`searchgym.policy.rollout.run_episodes` with ``mode="lockstep"``) generate a turn
for every running episode, then search for all of them, so each turn of the batch waits for its slowest
episode, and the next batch of episodes waits for the longest one. Here each episode is a coroutine that
asks for its next turn as soon as its own search has returned, and a new episode takes a sub-env as soon
as one is free. Two batchers keep the engine and the retriever busy with batches all the same:

- a :class:`TurnEngine` serves the turns: :class:`BatchingTurnEngine` calls a synchronous ``Generator``
  (transformers, or vLLM's ``LLM``) on every turn that is waiting whenever its previous call has
  returned (a continuous batcher at turn granularity); ``searchgym.policy.vllm_backend.VLLMAsyncEngine``
  hands each turn to vLLM's asynchronous engine, which batches at token granularity;
- a :class:`ToolCallBatcher` gathers the tool calls of the episodes in flight for at most ``search_wait_s``
  (or while its previous call runs) into one call per tool (one retriever call for all their searches),
  as the retrieval server's micro-batcher does.

Generation and retrieval run in worker threads, so an episode's search overlaps the others' generation.
The books of an episode (ids, masks, sampler log-probs, budgets) are those of the lock-step rollout
(:class:`searchgym.policy.episode.EpisodeState`): with the same samples the trajectories are the same.
What differs is sampling under a seed: the transformers engine seeds each call, and which turns share a
call depends on timing, so seeded async samples are reproducible only with an engine that seeds each
request (vLLM's: request ``i`` of the run gets the seed of its episode and turn).
"""

import asyncio
import threading
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar, cast

from transformers import PreTrainedTokenizerBase

from searchgym.env import EnvConfig, QAExample, SearchVectorEnv
from searchgym.env.search_env import SearchEnv
from searchgym.env.tools import Tool, ToolRequest, ToolResult, call_batched
from searchgym.policy.budgets import TokenBudgets
from searchgym.policy.episode import SEED_STRIDE, EpisodeState, encode_checked_prompt
from searchgym.policy.generation import Generation, Generator, SamplingParams
from searchgym.policy.trajectory import Timings, Trajectory

T = TypeVar("T")

DEFAULT_SEARCH_WAIT_S = 0.005
"""How long the first search of a retriever call waits for others to join it."""


class TurnEngine(Protocol):
    """Generates one episode's next turn; many may be awaited at once, and the engine batches them.

    Attributes:
        busy_s: seconds, since the engine was made, during which it was generating (a rollout's
            generation time is the difference over the rollout).
    """

    busy_s: float

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The policy's tokenizer."""
        ...

    async def generate_turn(
        self, prompt: Sequence[int], params: SamplingParams, *, max_new_tokens: int
    ) -> Generation:
        """Continue ``prompt`` by at most ``max_new_tokens`` tokens, sampled with ``params`` (own seed)."""
        ...


_SETTLE_YIELDS = 8
"""Event-loop turns a batcher lets pass before it takes its batch: an episode whose turn or search has
just returned needs one to record it and ask again, one whose sub-env was just freed needs two or three."""


async def _settle() -> None:
    """Let the coroutines that can run reach their next wait, so that a batch takes every ready request."""
    for _ in range(_SETTLE_YIELDS):
        await asyncio.sleep(0)


class BatchingTurnEngine:
    """A continuous batcher, at turn granularity, over a synchronous ``Generator``.

    While one ``generate`` call runs (in a worker thread), the turns that become ready wait; when it
    returns, the next call takes all of them. A call is seeded with the seed of its first request (the
    generator draws one random stream per call).

    Args:
        generator: the backend (transformers, vLLM's synchronous engine, a scripted fake).

    Attributes:
        busy_s: seconds the generator spent in its calls.
        calls: how many turns each call generated.
    """

    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self._waiting: list[tuple[tuple[Sequence[int], SamplingParams, int], asyncio.Future[Generation]]] = []
        self._runner: asyncio.Task[None] | None = None
        self.busy_s = 0.0
        self.calls: list[int] = []

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The generator's tokenizer."""
        return self.generator.tokenizer

    async def generate_turn(
        self, prompt: Sequence[int], params: SamplingParams, *, max_new_tokens: int
    ) -> Generation:
        """Wait for the next call that includes this turn (see the class docstring)."""
        future: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
        self._waiting.append(((prompt, params, max_new_tokens), future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._serve())
        return await future

    async def _serve(self) -> None:
        await _settle()
        while self._waiting:
            batch, self._waiting = self._waiting, []
            prompts = [prompt for (prompt, _, _), _ in batch]
            params = batch[0][0][1]
            limits = [limit for (_, _, limit), _ in batch]
            started = time.perf_counter()
            try:
                generations = await asyncio.to_thread(
                    self.generator.generate, prompts, params, max_new_tokens=limits
                )
            except Exception as error:  # handed to the episodes that asked, which re-raise it
                for _, future in batch:
                    future.set_exception(error)
                continue
            finally:
                self.busy_s += time.perf_counter() - started
            self.calls.append(len(batch))
            for (_, future), generation in zip(batch, generations, strict=True):
                future.set_result(generation)
            await _settle()


class ToolCallBatcher:
    """Gathers the tool calls of the episodes in flight into batched calls, one per tool.

    The first call of a batch waits at most ``wait_s`` for others (and any that arrive while a batch
    runs go in the next one); each batch runs in a worker thread through
    :func:`searchgym.env.tools.call_batched` (ONE call per tool, the retriever included), so a failed call
    fails its requests, not the run.

    Args:
        tools: the env's tools by name (shared by its sub-envs).
        wait_s: the longest the first call of a batch is held back for a fuller batch.

    Attributes:
        busy_s: seconds spent in tool calls.
        calls: the requests of each batch.
    """

    def __init__(self, tools: Mapping[str, Tool], *, wait_s: float = DEFAULT_SEARCH_WAIT_S) -> None:
        self.tools, self.wait_s = tools, wait_s
        self._waiting: list[tuple[ToolRequest, asyncio.Future[ToolResult]]] = []
        self._runner: asyncio.Task[None] | None = None
        self.busy_s = 0.0
        self.calls: list[list[ToolRequest]] = []

    async def call(self, request: ToolRequest) -> ToolResult:
        """The result of ``request``, called with the others of its batch."""
        future: asyncio.Future[ToolResult] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._serve())
        return await future

    async def _serve(self) -> None:
        await asyncio.sleep(self.wait_s)
        while self._waiting:
            batch, self._waiting = self._waiting, []
            requests = [request for request, _ in batch]
            self.calls.append(requests)
            started = time.perf_counter()
            results = await asyncio.to_thread(call_batched, self.tools, requests)
            self.busy_s += time.perf_counter() - started
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)
            await _settle()


@dataclass(frozen=True, slots=True)
class _Settings:
    sampling: SamplingParams
    budgets: TokenBudgets
    env_config: EnvConfig

    def turn_sampling(self, episode_index: int, turn: int) -> SamplingParams:
        """Episode ``episode_index``'s sampling at ``turn``: a seed of its own when the run is seeded."""
        if self.sampling.seed is None:
            return self.sampling
        return replace(self.sampling, seed=self.sampling.seed + episode_index * SEED_STRIDE + turn)


def run_episodes_async(
    engine: TurnEngine,
    vector_env: SearchVectorEnv,
    examples: Sequence[QAExample],
    group_ids: Sequence[str],
    *,
    sampling: SamplingParams,
    budgets: TokenBudgets,
    search_wait_s: float = DEFAULT_SEARCH_WAIT_S,
) -> list[Trajectory]:
    """Run one episode per example, at most ``vector_env.num_envs`` in flight, each at its own pace.

    Use :func:`searchgym.policy.rollout.run_episodes` with ``mode="async"``, which checks the inputs;
    this is its asynchronous half. Trajectories come back in the order of ``examples``; all of them share
    one :class:`~searchgym.policy.trajectory.Timings` (the engine's and the retriever's busy seconds,
    which overlap, and the wall time left beside them).
    """
    searches = ToolCallBatcher(vector_env.envs[0].tools, wait_s=search_wait_s)
    settings = _Settings(sampling, budgets, vector_env.config)
    started, busy_before = time.perf_counter(), engine.busy_s
    episodes = _run_coroutine(_run_all(engine, searches, vector_env.envs, examples, group_ids, settings))
    total = time.perf_counter() - started
    generation = engine.busy_s - busy_before
    timings = Timings(
        generation=generation,
        retrieval=searches.busy_s,
        bookkeeping=max(0.0, total - generation - searches.busy_s),
    )
    return [episode.to_trajectory(timings) for episode in episodes]


async def _run_all(
    engine: TurnEngine,
    searches: ToolCallBatcher,
    envs: Sequence[SearchEnv],
    examples: Sequence[QAExample],
    group_ids: Sequence[str],
    settings: _Settings,
) -> list[EpisodeState]:
    free: asyncio.Queue[int] = asyncio.Queue()
    for slot in range(len(envs)):
        free.put_nowait(slot)

    async def episode(index: int) -> EpisodeState:
        slot = await free.get()
        try:
            return await _run_one(engine, searches, envs[slot], slot, index, examples, group_ids, settings)
        finally:
            free.put_nowait(slot)

    # gather starts the episodes in order, so the first free sub-envs go to the first examples.
    return list(await asyncio.gather(*(episode(index) for index in range(len(examples)))))


async def _run_one(
    engine: TurnEngine,
    searches: ToolCallBatcher,
    env: SearchEnv,
    slot: int,
    index: int,
    examples: Sequence[QAExample],
    group_ids: Sequence[str],
    settings: _Settings,
) -> EpisodeState:
    """One episode on ``env``, turn by turn: generate, search if the env asks to, record."""
    example = examples[index]
    prompt, _ = env.reset(options={"example": example})
    episode = EpisodeState(
        example=example,
        group_id=group_ids[index],
        slot=slot,
        prompt_ids=encode_checked_prompt(
            engine.tokenizer,
            prompt,
            example,
            budgets=settings.budgets,
            env_config=settings.env_config,
            tools=env.tool_schemas if settings.env_config.tool_format == "hermes" else None,
        ),
    )
    while not episode.done:
        room = episode.room(settings.budgets)
        if room < 1:
            episode.end_on_budget("context_budget", settings.env_config)
            break
        params = settings.turn_sampling(index, len(episode.turns))
        generation = await engine.generate_turn(episode.context, params, max_new_tokens=room)
        # One sequence of ids decodes to one str (transformers declares str | list[str]).
        text = cast(str, engine.tokenizer.decode(generation.token_ids))
        request = env.begin_step(text)
        result = None if request is None else await searches.call(request)
        observation, _, terminated, truncated, info = env.finish_step(result)
        episode.record_step(
            generation,
            text,
            observation,
            info,
            ended=terminated or truncated,
            tokenizer=engine.tokenizer,
            budgets=settings.budgets,
            env_config=settings.env_config,
        )
    return episode


def _run_coroutine(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to its end on a fresh event loop (in a thread of its own if this one runs a loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = asyncio.run(coroutine)
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name="async-rollout")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return cast(T, outcome["value"])
