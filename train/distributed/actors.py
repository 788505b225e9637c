"""The three kinds of actor of a Ray run, as plain classes: a learner, a rollout worker, a retrieval replica.

:mod:`searchgym.train.distributed.groups` starts them with ``ray.remote``; nothing here imports ray, so each
class also runs in-process. A learner actor holds the single-process run's
:class:`~searchgym.train.learner.LocalLearner` and a rollout worker its
:class:`~searchgym.train.search_rollout.SearchRollout`, each built from the same config, so that they start
from the weights, optimizer and random state one process would.
"""

import dataclasses
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

from searchgym.env import QAExample
from searchgym.policy.generation import SamplingParams
from searchgym.policy.trajectory import Trajectory
from searchgym.retriever.base import Passage, Retriever
from searchgym.train.build import (
    load_training_policy,
    make_engine,
    open_retriever,
    vector_envs,
)
from searchgym.train.checkpoint import TrainerState
from searchgym.train.config import RetrieverConfig, TrainConfig
from searchgym.train.learner import LearnerStep, LocalLearner
from searchgym.train.search_rollout import SearchRollout
from searchgym.train.weight_sync import WeightBroadcast

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


def worker_sampling(sampling: SamplingParams, *, index: int, num_workers: int) -> SamplingParams:
    """The sampling of rollout worker ``index``: its own random stream, spawned from the step's seed.

    A lone worker keeps the single-process run's seed, so that it samples the same episodes; several
    workers draw independent streams (a shared seed would give every worker the same random numbers,
    row for row). Greedy or unseeded sampling is left as it is.
    """
    if sampling.seed is None or num_workers == 1:
        return sampling
    seed = int(np.random.SeedSequence([sampling.seed, index]).generate_state(1)[0])
    return dataclasses.replace(sampling, seed=seed)


class LearnerActor:
    """One data-parallel learner: a :class:`~searchgym.train.learner.LocalLearner` of rank ``rank``.

    Args:
        config: the run's settings.
        rank: this learner's rank; rank 0 writes checkpoints and the final model and serves the weights.
        cpus: CPUs reserved for it.
    """

    def __init__(self, config: TrainConfig, *, rank: int, cpus: float) -> None:
        limit_threads(config, cpus)
        self.rank = rank
        self.learner = LocalLearner(config, load_training_policy(config))

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
        device = self.learner.device
        if device.type == "cuda":
            torch.cuda.set_device(0)  # Ray shows an actor only its own GPUs, numbered from 0
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://{address}:{port}",
            rank=self.rank,
            world_size=world_size,
            timeout=_GROUP_TIMEOUT,
        )
        self.learner.join_data_parallel()

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        """The policy's tokenizer (the driver renders sample episodes with it)."""
        return self.learner.tokenizer

    def join_weight_broadcast(self, *, address: str, port: int, world_size: int) -> None:
        """Open the weight-sync group with the rollout workers, as its sender (rank 0, hosting the store)."""
        self.weights = WeightBroadcast(
            address=address, port=port, rank=0, world_size=world_size, device=self.learner.device
        )

    def broadcast_weights(self, dtype: str | None) -> int:
        """Send the policy's weights to the rollout workers in ``dtype`` ("bfloat16", ...); the bytes sent."""
        return self.weights.send(
            self.learner.policy_state(), dtype=None if dtype is None else getattr(torch, dtype)
        )

    def step(self, trajectories: Sequence[Trajectory]) -> LearnerStep:
        """This learner's share of the step (see :meth:`LocalLearner.step`)."""
        return self.learner.step(trajectories)

    def policy_state(self) -> dict[str, np.ndarray | torch.Tensor]:
        """The policy's weights on the CPU, for the rollout workers (see :func:`shareable_weights`)."""
        return shareable_weights(self.learner.policy_state())

    def strategy(self) -> str:
        """How this learner holds its models: ``replicate`` or ``shard``."""
        return self.learner.strategy

    def gather_policy(self) -> None:
        """Take part in gathering the sharded policy's whole weights, which learner 0 sends or serves."""
        self.learner.policy_state()

    def save(self, state: TrainerState) -> Path:
        """Write a checkpoint: replicated, rank 0 alone (the others hold the same); sharded, every rank."""
        return self.learner.save(state)

    def load(self, path: Path, *, restore_rng: bool) -> TrainerState:
        """Load a checkpoint (see :meth:`LocalLearner.load`)."""
        return self.learner.load(path, restore_rng=restore_rng)

    def export(self, target: Path) -> Path:
        """Write the policy as a plain Hugging Face model folder (sharded: every rank takes part)."""
        return self.learner.export(target)


class RolloutWorker:
    """Generates its slice of every batch with a :class:`~searchgym.train.search_rollout.SearchRollout`.

    The worker holds its own copy of the policy (or a vLLM engine) and a vector env over the retrieval
    replicas (or its own retriever).

    Args:
        config: the run's settings.
        index: this worker's rank among the rollout workers.
        num_workers: how many rollout workers there are (each samples its own random stream).
        retriever: the retrieval replicas' client, or None to open ``config.retriever`` here.
        cpus: CPUs reserved for it.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        index: int,
        num_workers: int,
        retriever: Retriever | None,
        cpus: float,
    ) -> None:
        limit_threads(config, cpus)
        self.index, self.num_workers = index, num_workers
        engine = make_engine(config)
        policy = None if engine is not None else load_training_policy(config)
        tokenizer = engine.tokenizer if engine is not None else policy.tokenizer  # type: ignore[union-attr]
        retriever = retriever if retriever is not None else open_retriever(config.retriever)
        self.rollout = SearchRollout(
            policy=policy,
            make_env=vector_envs(config, retriever, tokenizer),
            budgets=config.token_budgets,
            engine=engine,
            mode=config.rollout.mode,
            search_wait_s=config.rollout.search_wait_s,
        )

    def whereabouts(self) -> Whereabouts:
        """Where this worker runs."""
        return whereabouts()

    def load_weights(self, state: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Take the learner's updated weights (as :func:`shareable_weights` sends them)."""
        self.rollout.load_weights(weight_tensors(state))

    def join_weight_broadcast(self, *, address: str, port: int, world_size: int) -> None:
        """Join learner 0's weight-sync group (this worker's rank in it is its index + 1)."""
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.weights = WeightBroadcast(
            address=address, port=port, rank=self.index + 1, world_size=world_size, device=device
        )

    def receive_weights(self) -> int:
        """Load learner 0's weights bucket by bucket as they arrive; the bytes received."""
        return self.weights.receive(lambda bucket: self.rollout.load_weights(dict(bucket), partial=True))

    def run(
        self, examples: Sequence[QAExample], *, sampling: SamplingParams, step: int, batch_size: int
    ) -> list[Trajectory]:
        """One episode per example, sampled with this worker's stream of ``sampling``."""
        own = worker_sampling(sampling, index=self.index, num_workers=self.num_workers)
        self.rollout.submit(examples, sampling=own, step=step, batch_size=batch_size)
        return self.rollout.collect()


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
