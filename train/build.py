"""The parts of a search run, made from its config: retriever, policy, engine, vector envs, budgets.

Both the single-process run (:mod:`searchgym.train.run`) and the Ray actors build their parts here, so a
learner or rollout worker starts from exactly what one process would.
"""

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from searchgym import paths
from searchgym.env import SearchVectorEnv
from searchgym.errors import SearchgymError
from searchgym.policy.models import (
    DEFAULT_POLICY,
    Policy,
    default_policy_path,
    load_policy,
    tiny_random_model,
)

# vllm itself loads only when an engine is made
from searchgym.policy.vllm_backend import VLLMAsyncEngine, VLLMGenerator
from searchgym.retriever.base import Retriever
from searchgym.retriever.index import IndexSpec, ensure_index, load_retriever
from searchgym.runtime import resolve_device
from searchgym.train.config import RetrieverConfig, TrainConfig

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


def vector_envs(
    config: TrainConfig, retriever: Retriever, tokenizer: PreTrainedTokenizerBase
) -> Callable[[int], SearchVectorEnv]:
    """A maker of vector envs of any size over ``retriever``, counting budgets in the policy's tokens."""

    def make_env(num_envs: int) -> SearchVectorEnv:
        return SearchVectorEnv(
            num_envs=num_envs, dataset=None, retriever=retriever, config=config.env, tokenizer=tokenizer
        )

    return make_env


def load_training_policy(config: TrainConfig) -> Policy:
    """The initial policy in float32 on the configured device (autocast gives bf16 compute)."""
    device = resolve_device(config.system.device)
    if config.model.path == TINY_RANDOM:
        policy = tiny_random_model(seed=config.system.seed)
        # transformers wraps PreTrainedModel.to in functools.wraps, which mypy reads as an unbound function.
        policy.model.to(device)  # type: ignore[arg-type]
        return policy
    return load_policy(config.model.path, device=device, dtype=torch.float32)


def make_engine(config: TrainConfig) -> VLLMGenerator | VLLMAsyncEngine | None:
    """The vLLM engine for ``rollout.backend=vllm`` (None: the trained model generates itself).

    With ``rollout.mode=async`` it is vLLM's asynchronous engine, which batches the turns of the episodes
    in flight token by token.
    """
    if config.rollout.backend != "vllm":
        return None
    model = default_policy_path() if config.model.path == DEFAULT_POLICY else config.model.path
    if config.rollout.mode == "async":
        return VLLMAsyncEngine(
            model,
            max_model_len=config.rollout.max_context_tokens,
            gpu_memory_utilization=config.rollout.vllm_gpu_memory_utilization,
            seed=config.system.seed,
        )
    return VLLMGenerator(
        model,
        max_model_len=config.rollout.max_context_tokens,
        gpu_memory_utilization=config.rollout.vllm_gpu_memory_utilization,
        seed=config.system.seed,
    )
