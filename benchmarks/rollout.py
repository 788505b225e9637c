"""Rollout speed: SmolLM2 search-agent episodes on wiki-mini dev with in-process BM25.

For each batch size, one batch of episodes (the first dev questions) runs through ``run_episodes``
after a short warm-up; it prints episodes/s, policy tokens/s and where the time went (generation,
retrieval, bookkeeping = everything else: env steps, tokenizing observations, decoding actions).

    .venv/bin/python benchmarks/rollout.py --backend transformers [--batch-sizes 8 32]
    .venv-vllm/bin/python benchmarks/rollout.py --backend vllm [--batch-sizes 8 32]

Lock-step against asynchronous (per-trajectory) episodes on a mix of short and long episodes:

    .venv/bin/python benchmarks/rollout.py --modes lockstep async --mixed 16 128 --episodes 32 \
        --batch-sizes 8 [--model tiny]

``--mixed SHORT LONG`` gives every other question a turn budget of SHORT new tokens and the others LONG
(the model's own samples, cut at that many tokens as a turn budget cuts them), so that a lock-step batch
waits for its long episodes; ``--episodes`` runs that many questions through ``batch`` sub-envs.
``--model tiny`` uses the tiny random model of the tests instead of SmolLM2 (fast, not representative
of a real model's cost per token); ``--model DIR`` a trained policy's folder (``runs/demo/final``: the
demo's policy, which searches, with ``--train-config runs/demo`` for the protocol it was trained with).

With ``--backend vllm`` both modes run on vLLM's async engine (``VLLMAsyncEngine``): lock-step sends each
turn of the batch as requests in flight together; async sends every episode's turn the moment its
search returns, and vLLM's scheduler batches them token by token.

The vLLM run needs the retriever's packages in the vllm environment as well:
``.venv-vllm/bin/pip install bm25s numba PyStemmer pyarrow tqdm``. The BM25 index is built once under
``searchgym.paths.CACHE_DIR`` and reused.
"""

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from transformers import PreTrainedTokenizerBase

from searchgym import paths
from searchgym.env import EnvConfig, SearchVectorEnv, load_dataset
from searchgym.eval.config import training_protocol
from searchgym.policy.async_rollout import TurnEngine
from searchgym.policy.generation import (
    Generation,
    Generator,
    SamplingParams,
    TransformersGenerator,
    token_limits,
)
from searchgym.policy.models import default_policy_path, load_policy, tiny_random_model
from searchgym.policy.rollout import RolloutMode, TokenBudgets, run_episodes
from searchgym.policy.trajectory import Trajectory
from searchgym.retriever.base import Retriever
from searchgym.retriever.index import IndexSpec, ensure_index, load_retriever


@dataclass(frozen=True)
class Figures:
    """What one measured batch gives."""

    episodes: int
    wall_s: float
    policy_tokens: int
    observation_tokens: int
    generation_s: float
    retrieval_s: float
    bookkeeping_s: float
    turns: float
    searches: float
    answered: float


class MixedTurnBudgets:
    """A generator whose turns are cut at SHORT tokens for every other question and LONG for the rest.

    The ids are the backend's own samples; only the per-prompt token limit differs, as a turn budget
    would set it, so that episodes differ in cost the way short and long episodes do.
    """

    def __init__(self, generator: Generator, short_questions: set[str], short: int, long: int) -> None:
        self.generator, self.short_questions, self.short, self.long = generator, short_questions, short, long

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The backend's tokenizer."""
        return self.generator.tokenizer

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        """The backend's turns, each cut at its question's turn budget (or the room it has left)."""
        rooms = token_limits(len(prompts), params, max_new_tokens)
        limits = [min(room, self._limit(prompt)) for prompt, room in zip(prompts, rooms, strict=True)]
        return self.generator.generate(prompts, params, max_new_tokens=limits)

    def _limit(self, prompt: Sequence[int]) -> int:
        # The question sits in the first few hundred tokens of the context (the prompt is never cut).
        head = str(self.tokenizer.decode(list(prompt[:400])))
        return self.short if any(question in head for question in self.short_questions) else self.long


class MixedTurnBudgetsEngine(MixedTurnBudgets):
    """The same cut for an engine that also takes single turns (vLLM's async engine), turn by turn."""

    async def generate_turn(
        self, prompt: Sequence[int], params: SamplingParams, *, max_new_tokens: int
    ) -> Generation:
        """One turn of an async rollout, cut at its question's turn budget."""
        limit = min(max_new_tokens, self._limit(prompt))
        return await cast(TurnEngine, self.generator).generate_turn(prompt, params, max_new_tokens=limit)

    @property
    def busy_s(self) -> float:
        """The engine's generation seconds."""
        return cast(TurnEngine, self.generator).busy_s


def make_generator(backend: str, kv_cache_gib: float, max_context: int, model: str = "smollm2") -> Generator:
    if backend == "transformers":
        policy = (
            tiny_random_model() if model == "tiny" else load_policy(None if model == "smollm2" else model)
        )
        return TransformersGenerator(policy, max_batch_size=64)
    from searchgym.policy.vllm_backend import VLLMAsyncEngine

    return VLLMAsyncEngine(
        default_policy_path() if model == "smollm2" else model,
        dtype="float32",
        max_model_len=max_context,
        kv_cache_memory_bytes=int(kv_cache_gib * 2**30),
        seed=0,
    )


def bm25_wiki_mini() -> Retriever:
    index = paths.CACHE_DIR / "indexes" / "wiki-mini-bm25"
    ensure_index(IndexSpec(corpus=paths.WIKI_MINI_CORPUS, out=index, method="bm25", progress=False))
    return load_retriever(index)


def measure(
    generator: Generator,
    retriever: Retriever,
    batch_size: int,
    args: argparse.Namespace,
    mode: RolloutMode = "lockstep",
) -> Figures:
    config = EnvConfig(max_turns=args.max_turns, max_searches=args.max_turns - 1, topk=3)
    budgets = TokenBudgets(max_turn_tokens=args.max_turn_tokens, max_context_tokens=args.max_context)
    if args.train_config:
        config, budgets = training_protocol(args.train_config)
    vector_env = SearchVectorEnv(
        num_envs=batch_size, dataset=None, retriever=retriever, config=config, tokenizer=generator.tokenizer
    )
    examples = load_dataset("wiki-mini-dev")[: args.episodes or batch_size]
    if args.mixed:
        short, long = args.mixed
        mixed = MixedTurnBudgetsEngine if hasattr(generator, "generate_turn") else MixedTurnBudgets
        generator = mixed(generator, {e.question for e in examples[::2]}, short, long)
    sampling = SamplingParams(max_new_tokens=budgets.max_turn_tokens, temperature=args.temperature, seed=0)
    started = time.perf_counter()
    trajectories = run_episodes(
        generator,
        vector_env,
        examples,
        sampling=sampling,
        budgets=budgets,
        mode=mode,
    )
    return summarize(trajectories, time.perf_counter() - started)


def summarize(trajectories: list[Trajectory], wall_s: float) -> Figures:
    batches = {id(t.timings): t.timings for t in trajectories}.values()  # lock-step: one per chunk
    count = len(trajectories)
    return Figures(
        episodes=count,
        wall_s=wall_s,
        policy_tokens=sum(t.num_policy_tokens for t in trajectories),
        observation_tokens=sum(len(t.response_ids) - t.num_policy_tokens for t in trajectories),
        generation_s=sum(t.generation for t in batches),
        retrieval_s=sum(t.retrieval for t in batches),
        bookkeeping_s=sum(t.bookkeeping for t in batches),
        turns=sum(len(t.turns) for t in trajectories) / count,
        searches=sum(turn.action_type == "search" for t in trajectories for turn in t.turns) / count,
        answered=sum(t.outcome.answered for t in trajectories) / count,
    )


def report(backend: str, batch_size: int, figures: Figures) -> str:
    share = 100 / figures.wall_s
    return (
        f"| {backend} | {batch_size} | {figures.episodes / figures.wall_s:.3f} | "
        f"{figures.policy_tokens / figures.wall_s:.1f} | {figures.generation_s * share:.1f}% | "
        f"{figures.retrieval_s * share:.2f}% | {figures.bookkeeping_s * share:.2f}% | "
        f"{figures.turns:.2f} | {figures.searches:.2f} | {figures.answered:.2f} | {figures.wall_s:.1f} |"
    )


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-turn-tokens", type=int, default=256)
    parser.add_argument("--max-context", type=int, default=4096)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (transformers backend)")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0, help="vLLM's KV cache (CPU)")
    parser.add_argument("--modes", nargs="+", choices=["lockstep", "async"], default=["lockstep"])
    parser.add_argument("--mixed", type=int, nargs=2, metavar=("SHORT", "LONG"), help="turn budgets")
    parser.add_argument("--episodes", type=int, default=0, help="questions per run (0: one batch)")
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny or a model folder")
    parser.add_argument(
        "--train-config",
        help="a run folder or preset: its episode protocol (prompt, turns, budgets) replaces --max-turns "
        "and --max-turn-tokens, as `searchgym eval --train-config` does",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # The generator first: vLLM 0.32's CPU start-up fails once numba (BM25's backend) has been imported.
    generator = make_generator(args.backend, args.kv_cache_gib, args.max_context, args.model)
    retriever = bm25_wiki_mini()
    warm_up = generator.tokenizer.encode("Hello", add_special_tokens=False)
    generator.generate([warm_up], SamplingParams(max_new_tokens=4, temperature=0.0))
    print(
        "| backend | batch | episodes/s | policy tokens/s | generation | retrieval | bookkeeping "
        "| turns/episode | searches/episode | answered | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for batch_size in args.batch_sizes:
        for mode in args.modes:
            figures = measure(generator, retriever, batch_size, args, cast(RolloutMode, mode))
            print(report(f"{args.backend} {mode}", batch_size, figures), flush=True)
    if hasattr(generator, "close"):  # vLLM's async engine: stop its core process before exiting
        generator.close()


if __name__ == "__main__":
    main()
