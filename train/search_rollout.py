"""The real run: the policy searches through the vector env, plugged into :func:`searchgym.train.loop.train`.

This module wires the parts built elsewhere — datasets and the vector env (``env``), the generation
backends and ``run_episodes`` (``policy``), the index or server (``retriever``) — into a
:class:`~searchgym.train.loop.RolloutFunc` and a :class:`~searchgym.train.loop.DevEvalFunc`, and runs a whole
training job
from a :class:`~searchgym.train.config.TrainConfig`.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from searchgym import paths
from searchgym.env import QAExample, SearchVectorEnv, load_dataset
from searchgym.errors import SearchgymError
from searchgym.policy.generation import Generator, SamplingParams, TransformersGenerator
from searchgym.policy.models import (
    DEFAULT_POLICY,
    Policy,
    default_policy_path,
    load_policy,
    tiny_random_model,
)
from searchgym.policy.rollout import TokenBudgets, run_episodes
from searchgym.policy.trajectory import Trajectory
from searchgym.retriever.base import Retriever
from searchgym.retriever.index import IndexSpec, ensure_index, load_retriever
from searchgym.train.config import RetrieverConfig, TrainConfig
from searchgym.train.loop import TrainResult, resolve_device, seed_everything, train
from searchgym.train.lora import merged_state
from searchgym.train.warmstart import warm_started_policy

WIKI_MINI_BM25 = paths.CACHE_DIR / "indexes" / "wiki-mini-bm25"
"""The BM25 index of the bundled wiki-mini that runs without a configured retriever use (built once)."""
TINY_RANDOM = "tiny-random-llama"
"""``model.path`` of a tiny randomly initialised model with the SmolLM2 tokenizer (smoke tests)."""


def open_retriever(config: RetrieverConfig) -> Retriever:
    """The configured index or server; by default BM25 over the bundled wiki-mini, built once and cached."""
    if config.url is not None:
        return load_retriever(config.url)
    if config.index is not None:
        if not Path(config.index).is_dir():
            raise SearchgymError(
                f"retriever.index={config.index} does not exist: build it with "
                f"`searchgym index --out {config.index}`, or set retriever.index=null for BM25 over wiki-mini"
            )
        return load_retriever(config.index)
    ensure_index(IndexSpec(corpus=paths.WIKI_MINI_CORPUS, out=WIKI_MINI_BM25, method="bm25", progress=False))
    return load_retriever(WIKI_MINI_BM25)


def token_budgets(config: TrainConfig) -> TokenBudgets:
    """The rollout's token budgets: a turn's tokens from ``rollout``, an observation's from ``env``."""
    return TokenBudgets(
        max_prompt_tokens=config.rollout.max_prompt_tokens,
        max_turn_tokens=config.rollout.max_new_tokens,
        max_observation_tokens=config.env.max_observation_tokens,
        max_context_tokens=config.rollout.max_context_tokens,
    )


@dataclass(slots=True)
class SearchRollout:
    """A :class:`~searchgym.train.loop.RolloutFunc` over the search env.

    With vLLM the engine is made once and receives the trained weights before each rollout; with
    transformers the trained model itself generates. Sampling is seeded by the run's seed and the step,
    so a resumed run samples what the uninterrupted one would have.
    """

    config: TrainConfig
    vector_env: SearchVectorEnv
    generator: Generator | None = None

    def __call__(
        self,
        policy_model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        examples: Sequence[QAExample],
        step: int,
    ) -> list[Trajectory]:
        """Run one search episode per example with the current policy."""
        sampling = SamplingParams(
            max_new_tokens=self.config.rollout.max_new_tokens,
            temperature=self.config.rollout.temperature,
            top_p=self.config.rollout.top_p,
            seed=self.config.system.seed * 1_000_003 + step,
        )
        return run_episodes(
            self._generator(policy_model, tokenizer),
            self.vector_env,
            examples,
            sampling=sampling,
            budgets=token_budgets(self.config),
        )

    def _generator(self, policy_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Generator:
        if self.generator is None:
            return TransformersGenerator(Policy(policy_model, tokenizer, name=self.config.model.path))
        load_weights = getattr(self.generator, "load_weights", None)
        if load_weights is not None:
            load_weights(merged_state(policy_model))
        return self.generator


@dataclass(slots=True)
class SearchDevEval:
    """A :class:`~searchgym.train.loop.DevEvalFunc`: greedy search episodes on dev questions, mean EM."""

    config: TrainConfig
    examples: Sequence[QAExample]
    vector_env: SearchVectorEnv

    def __call__(
        self, policy_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, step: int
    ) -> dict[str, float]:
        """Mean ``em``, ``f1``, ``cover_em``, ``searches`` and ``answered`` over the dev questions."""
        generator = TransformersGenerator(Policy(policy_model, tokenizer, name=self.config.model.path))
        episodes = run_episodes(
            generator,
            self.vector_env,
            self.examples,
            sampling=dev_sampling(self.config),
            budgets=token_budgets(self.config),
        )
        return dev_scores(episodes)


def dev_sampling(config: TrainConfig) -> SamplingParams:
    """Greedy decoding with the rollout's turn length: how the dev questions are answered."""
    return SamplingParams(max_new_tokens=config.rollout.max_new_tokens, temperature=0.0)


def dev_scores(episodes: Sequence[Trajectory]) -> dict[str, float]:
    """Mean ``em``, ``f1``, ``cover_em``, ``reward``, ``searches`` and ``answered`` of dev episodes."""
    scores = {
        name: _mean([t.info.get(name) for t in episodes]) for name in ("em", "f1", "cover_em", "reward")
    }
    scores["searches"] = _mean([sum(turn.action_type == "search" for turn in t.turns) for t in episodes])
    scores["answered"] = _mean([float(t.terminated) for t in episodes])
    return scores


def _mean(values: Sequence[float | None]) -> float:
    known = [float(v) for v in values if v is not None]
    return sum(known) / len(known) if known else math.nan


def load_training_policy(config: TrainConfig) -> Policy:
    """The initial policy in float32 on the configured device (autocast gives bf16 compute)."""
    device = resolve_device(config.system.device)
    if config.model.path == TINY_RANDOM:
        policy = tiny_random_model(seed=config.system.seed)
        # transformers wraps PreTrainedModel.to in functools.wraps, which mypy reads as an unbound function.
        policy.model.to(device)  # type: ignore[arg-type]
        return policy
    return load_policy(config.model.path, device=device, dtype=torch.float32)


def make_generator(config: TrainConfig) -> Generator | None:
    """The vLLM engine for ``rollout.backend=vllm`` (None: the trained model generates itself)."""
    if config.rollout.backend != "vllm":
        return None
    from searchgym.policy.vllm_backend import VLLMGenerator  # vllm loads here only

    model = default_policy_path() if config.model.path == DEFAULT_POLICY else config.model.path
    return VLLMGenerator(
        model,
        max_model_len=config.rollout.max_context_tokens,
        gpu_memory_utilization=config.rollout.vllm_gpu_memory_utilization,
        seed=config.system.seed,
    )


def starting_policy(
    config: TrainConfig, train_examples: Sequence[QAExample], dev_examples: Sequence[QAExample]
) -> tuple[Policy, Callable[[int], SearchVectorEnv], SearchDevEval]:
    """What every search run starts from: the policy (warm-started when configured), its envs, dev eval.

    Sets the torch threads and the seed first. The single-process trainer goes on with all three; the Ray
    trainer calls this for the warm-start only and starts its actors from the folder it leaves.

    Returns:
        The policy, a factory of vector envs over the configured retriever, and the dev evaluation.
    """
    if config.system.torch_threads is not None:
        torch.set_num_threads(config.system.torch_threads)
    seed_everything(config.system.seed)
    policy = load_training_policy(config)
    retriever = open_retriever(config.retriever)

    def vector_env(num_envs: int) -> SearchVectorEnv:
        return SearchVectorEnv(
            num_envs=num_envs,
            dataset=None,
            retriever=retriever,
            config=config.env,
            tokenizer=policy.tokenizer,
        )

    dev_eval = SearchDevEval(config, dev_examples, vector_env(min(len(dev_examples), config.dev.batch_size)))
    if config.warmstart.examples > 0:
        policy = warm_started_policy(
            config,
            policy,
            make_env=vector_env,
            budgets=token_budgets(config),
            train_examples=train_examples,
            dev_eval=dev_eval,
        )
    return policy, vector_env, dev_eval


def run_search_training(config: TrainConfig) -> TrainResult:
    """The whole job of ``searchgym train``: load data, policy and retriever, train, evaluate on dev."""
    train_examples = load_dataset(config.data.train, limit=config.data.train_limit)
    dev_examples = load_dataset(config.data.dev, limit=config.data.dev_limit)
    policy, vector_env, dev_eval = starting_policy(config, train_examples, dev_examples)
    rollout = SearchRollout(config, vector_env(config.trajectories_per_step), make_generator(config))
    return train(
        config,
        policy=policy.model,
        tokenizer=policy.tokenizer,
        rollout=rollout,
        train_examples=train_examples,
        dev_eval=dev_eval,
    )
