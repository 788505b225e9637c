"""The ``ray`` section of the training config: which parts run as Ray actors, how many, and on what."""

import importlib.util
from dataclasses import dataclass
from typing import Literal

from searchgym.train.config_io import ConfigError


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    """Scaling out with Ray: rollout workers, retrieval replicas and data-parallel learners as actors."""

    enabled: bool = False
    """Run the parts below as Ray actors (`pip install searchgym[ray]`); false trains in this one process."""
    address: str = "local"
    """`local` starts a Ray cluster inside this run (this machine only); `auto` joins the cluster that
    `ray start` runs here; or a cluster address such as `ray://head-node:10001`."""
    num_rollout_workers: int = 1
    """Actors that generate episodes, each with its own copy of the policy and a slice of every batch."""
    num_retriever_replicas: int = 1
    """Retrieval actors serving retriever.index (BM25 over wiki-mini by default), taken in turn by the
    rollout workers; 0: every rollout worker opens retriever.index or retriever.url itself."""
    num_learners: int = 1
    """Data-parallel learners (torch.distributed: gloo on CPU, NCCL on GPU); each computes its share of
    every mini-batch and they sum their gradients, so the update is that of one learner on the batch."""
    cpus_per_rollout_worker: float = 1.0
    """CPUs reserved for each rollout worker (also its torch threads unless system.torch_threads is set)."""
    gpus_per_rollout_worker: float = 0.0
    """GPUs reserved for each rollout worker (1 for a vLLM engine)."""
    cpus_per_learner: float = 1.0
    """CPUs reserved for each learner (also its torch threads unless system.torch_threads is set)."""
    gpus_per_learner: float = 0.0
    """GPUs reserved for each learner (1 on a GPU cluster: NCCL then joins the learners)."""
    cpus_per_retriever_replica: float = 1.0
    """CPUs reserved for each retrieval replica."""
    gpus_per_retriever_replica: float = 0.0
    """GPUs reserved for each retrieval replica (a dense index searched on GPU)."""
    colocate: bool = False
    """Put rollout worker i in learner i's placement bundle, sharing its node and GPU: generation and
    training take turns on one device. Needs as many rollout workers as learners and the same GPUs each."""
    weight_sync: Literal["object_store", "broadcast"] = "object_store"
    """How learner 0's new weights reach the rollout workers after each step: through Ray's object store
    (the whole state dict in shared memory), or `broadcast` over a process group of learner 0 and the
    workers (NCCL between GPUs, gloo on CPU), bucket by bucket, bf16 for vLLM engines."""
    max_restarts: int = 2
    """When an actor dies (a crashed rollout worker, a lost node), stop every actor, start them again and
    resume from the last checkpoint, up to this many times in a run; 0 stops the run at the first death."""
    placement_timeout_s: float = 600.0
    """How long to wait for the cluster to have room for every actor before stopping with what is missing."""

    def __post_init__(self) -> None:
        _check(bool(self.address.strip()), "ray.address must be local, auto or a cluster address")
        for name in ("num_rollout_workers", "num_learners"):
            _check(getattr(self, name) >= 1, f"ray.{name} must be >= 1, got {getattr(self, name)}")
        _check(
            self.num_retriever_replicas >= 0,
            f"ray.num_retriever_replicas must be >= 0, got {self.num_retriever_replicas}",
        )
        for role in ("rollout_worker", "learner", "retriever_replica"):
            cpus, gpus = getattr(self, f"cpus_per_{role}"), getattr(self, f"gpus_per_{role}")
            _check(cpus > 0, f"ray.cpus_per_{role} must be > 0, got {cpus}")
            _check(gpus >= 0, f"ray.gpus_per_{role} must be >= 0, got {gpus}")
            _check(
                gpus <= 1 or gpus == int(gpus),
                f"ray.gpus_per_{role}={gpus}: Ray shares a GPU only in fractions below 1; use a whole number",
            )
        _check(self.placement_timeout_s > 0, "ray.placement_timeout_s must be > 0")
        _check(self.max_restarts >= 0, f"ray.max_restarts must be >= 0, got {self.max_restarts}")
        if self.colocate:
            self._check_colocation()

    def _check_colocation(self) -> None:
        _check(
            self.num_rollout_workers == self.num_learners,
            f"ray.colocate pairs rollout worker i with learner i: set ray.num_rollout_workers "
            f"({self.num_rollout_workers}) equal to ray.num_learners ({self.num_learners})",
        )
        _check(
            self.gpus_per_rollout_worker == self.gpus_per_learner <= 1,
            "ray.colocate shares one GPU between a learner and its rollout worker: set "
            "ray.gpus_per_rollout_worker and ray.gpus_per_learner to the same value, at most 1",
        )


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def require_ray() -> None:
    """Check that Ray is installed before a ``ray.enabled`` run starts.

    Raises:
        ConfigError: ray is missing; the message says how to install it.
    """
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(
            "ray.enabled=true needs Ray: pip install 'searchgym[ray]' (or set ray.enabled=false)"
        )
