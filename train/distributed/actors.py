"""The three kinds of actor of a Ray run, as plain classes: a learner, a rollout worker, a retrieval replica.

:mod:`searchgym.train.distributed.groups` starts them with ``ray.remote``; nothing here imports ray, so each
class
also runs in-process. Every actor rebuilds its part from the same
:class:`~searchgym.train.config.TrainConfig` as
the single-process trainer does, so that learners start from the same weights, optimizer and random
state as :func:`searchgym.train.loop.train` would.
"""

import os
import socket
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from searchgym.env import QAExample, SearchVectorEnv
from searchgym.policy.generation import Generator, SamplingParams, TransformersGenerator
from searchgym.policy.rollout import run_episodes
from searchgym.policy.trajectory import Trajectory
from searchgym.policy.vllm_backend import VLLMGenerator  # vllm itself loads only when an engine is made
from searchgym.retriever.base import Passage, Retriever
from searchgym.train.batch import collate
from searchgym.train.checkpoint import CheckpointManager, TrainerState, export_hf_model
from searchgym.train.config import RetrieverConfig, TrainConfig
from searchgym.train.distributed.data_parallel import SINGLE_PROCESS, DataParallel, TorchDataParallel
from searchgym.train.guards import StepHealth
from searchgym.train.learner import build_optimizers, make_experience, update
from searchgym.train.loop import (
    PhaseTimer,
    experience_metrics,
    pad_token_id,
    resolve_device,
    seed_everything,
    step_health,
)
from searchgym.train.lora import merged_state
from searchgym.train.models import build_train_models
from searchgym.train.search_rollout import load_training_policy, make_generator, open_retriever, token_budgets

_GROUP_TIMEOUT = timedelta(minutes=30)
"""How long a learner waits in a collective before torch.distributed gives up on the others."""


def limit_threads(config: TrainConfig, cpus: float) -> None:
    """One torch thread per reserved CPU (``system.torch_threads`` when set): actors share their node."""
    torch.set_num_threads(config.system.torch_threads or max(1, int(cpus)))


@dataclass(frozen=True, slots=True)
class Whereabouts:
    """Where an actor runs, for messages about it.

    Attributes:
        pid: its process id.
        host: its node's host name.
    """

    pid: int
    host: str

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}"


def whereabouts() -> Whereabouts:
    """Where the calling process runs."""
    return Whereabouts(pid=os.getpid(), host=socket.gethostname())


def worker_seed(seed: int, step: int, *, index: int, num_workers: int) -> int:
    """The sampling seed of rollout worker ``index`` at ``step``.

    A lone worker uses the single-process trainer's seed
    (:class:`searchgym.train.search_rollout.SearchRollout`),
    so that it samples the same episodes; several workers draw independent streams spawned from it (a
    shared seed would give every worker the same random numbers, row for row).
    """
    step_seed = seed * 1_000_003 + step
    if num_workers == 1:
        return step_seed
    return int(np.random.SeedSequence([step_seed, index]).generate_state(1)[0])


def shareable_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray | torch.Tensor]:
    """A state dict as numpy arrays on the CPU, which Ray's object store hands to readers without a copy.

    Pickled torch tensors are copied on the way in and again on the way out (about 8 times slower for
    SmolLM2-135M's 540 MB); a dtype numpy lacks (bfloat16) goes as a tensor.
    """
    return {
        name: tensor.detach().cpu() if tensor.dtype == torch.bfloat16 else tensor.detach().cpu().numpy()
        for name, tensor in state_dict.items()
    }


def weight_tensors(weights: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors over :func:`shareable_weights`' arrays, without a copy: read them, never write them."""
    with warnings.catch_warnings():
        # The store's arrays are read-only; the tensors are only copied from (by load_state_dict).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {name: torch.as_tensor(value) for name, value in weights.items()}


@dataclass(frozen=True, slots=True)
class LearnerStep:
    """What the learners report after one step (the same on every learner).

    Attributes:
        metrics: ``experience/``, ``actor/``, ``critic/``, ``optim/`` and ``time/`` metrics of the step.
        health: the numbers the guards watch.
    """

    metrics: dict[str, float]
    health: StepHealth


class Learner:
    """One data-parallel learner: policy, critic and reference, their optimizers, rank ``rank`` of the group.

    Args:
        config: the run's settings.
        rank: this learner's rank; rank 0 writes checkpoints and the final model and serves the weights.
        cpus: CPUs reserved for it.
    """

    def __init__(self, config: TrainConfig, *, rank: int, cpus: float) -> None:
        limit_threads(config, cpus)
        self.config, self.rank = config, rank
        self.device = resolve_device(config.system.device)
        policy = load_training_policy(config)
        # Seeded after loading and before the critic's head is made, as the single-process run does.
        seed_everything(config.system.seed)
        self.tokenizer = policy.tokenizer
        self.models = build_train_models(
            policy.model,
            with_reference=config.uses_reference,
            with_critic=config.uses_critic,
            gradient_checkpointing=config.model.gradient_checkpointing,
            lora=config.model.lora,
        )
        self.optimizers = build_optimizers(self.models, config)
        self.checkpoints = CheckpointManager(
            config.run_dir / "checkpoints", keep_last=config.checkpoint.keep_last
        )
        self.data_parallel: DataParallel = SINGLE_PROCESS

    def whereabouts(self) -> Whereabouts:
        """Where this learner runs."""
        return whereabouts()

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free port on it, for the process group's rank 0 to listen on."""
        import ray  # only rank 0 is asked, and only inside a Ray actor

        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, *, address: str, port: int, world_size: int) -> None:
        """Join the learners' process group and take rank 0's weights (as DDP does when it wraps a model)."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":
            torch.cuda.set_device(0)  # Ray shows an actor only its own GPUs, numbered from 0
        dist.init_process_group(
            backend,
            init_method=f"tcp://{address}:{port}",
            rank=self.rank,
            world_size=world_size,
            timeout=_GROUP_TIMEOUT,
        )
        self.data_parallel = TorchDataParallel(device=self.device)
        for model in (self.models.policy, self.models.critic, self.models.reference):
            if model is not None:
                for tensor in [*model.parameters(), *model.buffers()]:
                    dist.broadcast(tensor.data, src=0)

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        """The policy's tokenizer (the driver renders sample episodes with it)."""
        return self.tokenizer

    def step(self, trajectories: Sequence[Trajectory]) -> LearnerStep:
        """Experience and update on the step's episodes: this learner's share, then the group's step."""
        timer = PhaseTimer()
        with timer.phase("experience"):
            batch = collate(trajectories, pad_token_id=pad_token_id(self.tokenizer), device=self.device)
            experience = make_experience(self.models, batch, self.config, data_parallel=self.data_parallel)
        with timer.phase("update"):
            stats = update(
                self.models, self.optimizers, experience, self.config, data_parallel=self.data_parallel
            )
        metrics = experience_metrics(experience, self.config) | stats.to_metrics()
        metrics |= {"optim/actor_lr": self.optimizers.actor.param_groups[0]["lr"]}
        return LearnerStep(
            metrics=metrics | timer.metrics(), health=step_health(batch, experience, stats, self.config)
        )

    def policy_state(self) -> dict[str, np.ndarray | torch.Tensor]:
        """The policy's weights on the CPU, for the rollout workers (see :func:`shareable_weights`)."""
        return shareable_weights(merged_state(self.models.policy))

    def save(self, state: TrainerState) -> Path:
        """Write a checkpoint (rank 0; the other learners hold the same weights and optimizer states)."""
        return self.checkpoints.save(models=self.models, optimizers=self.optimizers, state=state)

    def load(self, path: Path, *, restore_rng: bool) -> TrainerState:
        """Load a checkpoint's weights and optimizer states (and random generators with ``restore_rng``)."""
        return self.checkpoints.load(
            path, models=self.models, optimizers=self.optimizers, restore_rng=restore_rng
        )

    def export(self, target: Path) -> Path:
        """Write the policy as a plain Hugging Face model folder."""
        return export_hf_model(self.models.policy, self.tokenizer, target)


class RolloutWorker:
    """Generates episodes with its own copy of the policy, over its own vector env.

    Args:
        config: the run's settings.
        index: this worker's rank among the rollout workers.
        num_workers: how many rollout workers there are (each samples its own random stream).
        max_episodes: the most episodes it is given per step (the size of its vector env).
        retriever: the retrieval replicas' client, or None to open ``config.retriever`` here.
        cpus: CPUs reserved for it.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        index: int,
        num_workers: int,
        max_episodes: int,
        retriever: Retriever | None,
        cpus: float,
    ) -> None:
        limit_threads(config, cpus)
        self.config, self.index, self.num_workers = config, index, num_workers
        engine = make_generator(config)  # a vLLM engine, or None: transformers generation
        self.vllm = engine if isinstance(engine, VLLMGenerator) else None
        self.policy = None if self.vllm is not None else load_training_policy(config)
        self.retriever = retriever if retriever is not None else open_retriever(config.retriever)
        self.vector_env = self._vector_env(max_episodes)
        self._dev_envs: dict[int, SearchVectorEnv] = {}

    @property
    def generator(self) -> Generator:
        """The vLLM engine, or transformers generation with this worker's copy of the policy."""
        if self.vllm is not None:
            return self.vllm
        assert self.policy is not None  # made in __init__ whenever there is no vLLM engine
        return TransformersGenerator(self.policy)

    def whereabouts(self) -> Whereabouts:
        """Where this worker runs."""
        return whereabouts()

    def load_weights(self, state: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Take the learner's updated weights (as :func:`shareable_weights` sends them)."""
        tensors = weight_tensors(state)
        if self.vllm is not None:
            self.vllm.load_weights(tensors)
        else:
            assert self.policy is not None
            self.policy.model.load_state_dict(tensors)

    def rollout(self, examples: Sequence[QAExample], step: int) -> list[Trajectory]:
        """Sample one episode per example with the rollout's settings, seeded by the step and this worker.

        One worker samples what the single-process trainer samples; several draw distinct streams.
        """
        rollout = self.config.rollout
        sampling = SamplingParams(
            max_new_tokens=rollout.max_new_tokens,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            seed=worker_seed(self.config.system.seed, step, index=self.index, num_workers=self.num_workers),
        )
        return run_episodes(
            self.generator, self.vector_env, examples, sampling=sampling, budgets=token_budgets(self.config)
        )

    def episodes(self, examples: Sequence[QAExample], sampling: SamplingParams) -> list[Trajectory]:
        """One episode per example with ``sampling`` (the dev evaluation's greedy decoding)."""
        size = min(len(examples), self.config.dev.batch_size)
        if size not in self._dev_envs:
            self._dev_envs[size] = self._vector_env(size)
        return run_episodes(
            self.generator,
            self._dev_envs[size],
            examples,
            sampling=sampling,
            budgets=token_budgets(self.config),
        )

    def _vector_env(self, num_envs: int) -> SearchVectorEnv:
        return SearchVectorEnv(
            num_envs=num_envs,
            dataset=None,
            retriever=self.retriever,
            config=self.config.env,
            tokenizer=self.generator.tokenizer,
        )


class RetrieverReplica:
    """One copy of the index (``config.index``, BM25 over wiki-mini by default), counting what it serves.

    Args:
        config: the run's retriever settings.
    """

    def __init__(self, config: RetrieverConfig) -> None:
        self.retriever = open_retriever(config)
        self.calls = 0
        self.queries = 0

    def whereabouts(self) -> Whereabouts:
        """Where this replica runs."""
        return whereabouts()

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        """The retriever's answer (see :class:`searchgym.retriever.base.Retriever`)."""
        self.calls += 1
        self.queries += len(queries)
        return self.retriever.search(queries, k)

    def served(self) -> tuple[int, int]:
        """``(calls, queries)`` served so far."""
        return self.calls, self.queries
