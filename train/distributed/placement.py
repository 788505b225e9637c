"""The placement map: which actor runs in which bundle, with what resources, computed from the config alone.

One Ray placement group holds a bundle per learner, per rollout worker (none when colocated: a rollout
worker then shares its learner's bundle and GPU) and per retrieval replica, so that a run either gets
room for all its parts at once or none. Plain Python: ``describe`` prints the same map for a cluster that
is not there (docs/scaling.md shows it for 1x8 and 4x8 GPUs).
"""

import itertools
import math
from dataclasses import dataclass
from typing import Any, Literal

from searchgym.train.config import TrainConfig

Role = Literal["learner", "rollout worker", "retriever replica"]
STRATEGY = "PACK"
"""Ray's bundle strategy: fill a node before the next, so learners and their rollout workers stay close."""


@dataclass(frozen=True, slots=True)
class ActorPlace:
    """Where one actor runs.

    Attributes:
        role: what the actor is.
        index: its rank among the actors of its role.
        bundle: index of its bundle in the placement group.
        cpus: CPUs it takes from the bundle.
        gpus: GPUs it takes from the bundle (a fraction when it shares one).
    """

    role: Role
    index: int
    bundle: int
    cpus: float
    gpus: float


@dataclass(frozen=True, slots=True)
class PlacementPlan:
    """Bundles of the placement group and the place of every actor.

    Attributes:
        bundles: resources of each bundle, ``{"CPU": c, "GPU": g}`` (no GPU key without GPUs).
        learners: one place per data-parallel learner (rank order).
        rollout_workers: one place per rollout worker.
        retriever_replicas: one place per retrieval replica (none when the rollout workers open the
            retriever themselves).
        duties: what each role does in this run, one line per role.
    """

    bundles: tuple[dict[str, float], ...]
    learners: tuple[ActorPlace, ...]
    rollout_workers: tuple[ActorPlace, ...]
    retriever_replicas: tuple[ActorPlace, ...]
    duties: dict[str, str]

    @property
    def cpus(self) -> float:
        """CPUs the whole run reserves."""
        return sum(bundle.get("CPU", 0.0) for bundle in self.bundles)

    @property
    def gpus(self) -> float:
        """GPUs the whole run reserves."""
        return sum(bundle.get("GPU", 0.0) for bundle in self.bundles)

    def describe(self) -> str:
        """The map as a table: role, actors, resources per actor, bundles, what they do."""
        lines = [
            f"placement: {len(self.bundles)} bundles ({STRATEGY}), {_count(self.cpus, 'CPU')} and "
            f"{_count(self.gpus, 'GPU')} in all",
            f"  {'role':<18} {'actors':>6}  {'each':<16} {'bundles':<8} runs",
        ]
        for role, places in (
            ("learner", self.learners),
            ("rollout worker", self.rollout_workers),
            ("retriever replica", self.retriever_replicas),
        ):
            if not places:
                continue
            first, last = places[0].bundle, places[-1].bundle
            each = _count(places[0].cpus, "CPU") + (f", {places[0].gpus:g} GPU" if places[0].gpus else "")
            span = f"{first}" if first == last else f"{first}-{last}"
            lines.append(f"  {role:<18} {len(places):>6}  {each:<16} {span:<8} {self.duties[role]}")
        return "\n".join(lines)


def plan_placement(config: TrainConfig) -> PlacementPlan:
    """Bundles and places for the ``ray`` section of ``config``."""
    ray = config.ray
    bundles: list[dict[str, float]] = []

    def add_bundle(cpus: float, gpus: float) -> int:
        bundles.append({"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus})
        return len(bundles) - 1

    learners, rollout_workers = [], []
    for rank in range(ray.num_learners):
        if ray.colocate:
            # The learner and its rollout worker take turns on one GPU; Ray counts half of it for each.
            bundle = add_bundle(ray.cpus_per_learner + ray.cpus_per_rollout_worker, ray.gpus_per_learner)
            share = ray.gpus_per_learner / 2
            learners.append(ActorPlace("learner", rank, bundle, ray.cpus_per_learner, share))
            rollout_workers.append(
                ActorPlace("rollout worker", rank, bundle, ray.cpus_per_rollout_worker, share)
            )
        else:
            bundle = add_bundle(ray.cpus_per_learner, ray.gpus_per_learner)
            learners.append(ActorPlace("learner", rank, bundle, ray.cpus_per_learner, ray.gpus_per_learner))
    if not ray.colocate:
        for index in range(ray.num_rollout_workers):
            bundle = add_bundle(ray.cpus_per_rollout_worker, ray.gpus_per_rollout_worker)
            rollout_workers.append(
                ActorPlace(
                    "rollout worker", index, bundle, ray.cpus_per_rollout_worker, ray.gpus_per_rollout_worker
                )
            )
    replicas = []
    for index in range(ray.num_retriever_replicas):
        bundle = add_bundle(ray.cpus_per_retriever_replica, ray.gpus_per_retriever_replica)
        replicas.append(
            ActorPlace(
                "retriever replica",
                index,
                bundle,
                ray.cpus_per_retriever_replica,
                ray.gpus_per_retriever_replica,
            )
        )
    return PlacementPlan(
        bundles=tuple(bundles),
        learners=tuple(learners),
        rollout_workers=tuple(rollout_workers),
        retriever_replicas=tuple(replicas),
        duties=_duties(config),
    )


def episodes_per_worker(config: TrainConfig) -> int:
    """The most episodes one rollout worker generates per step (the batch split as evenly as it goes)."""
    return math.ceil(config.trajectories_per_step / config.ray.num_rollout_workers)


def split_evenly(items: list[Any], parts: int) -> list[list[Any]]:
    """``items`` in ``parts`` contiguous slices whose sizes differ by at most one (larger ones first)."""
    size, larger = divmod(len(items), parts)
    bounds = [0]
    for part in range(parts):
        bounds.append(bounds[-1] + size + (part < larger))
    return [items[start:end] for start, end in itertools.pairwise(bounds)]


def _duties(config: TrainConfig) -> dict[str, str]:
    ray = config.ray
    models = [
        "policy",
        *(["critic"] if config.uses_critic else []),
        *(["reference"] if config.uses_reference else []),
    ]
    backend = "nccl" if ray.gpus_per_learner > 0 else "gloo"
    index = config.retriever.index or "BM25 over wiki-mini"
    if ray.num_retriever_replicas:
        searches = f"searches the {ray.num_retriever_replicas} replicas in turn"
    else:
        searches = f"searches {config.retriever.url or index} itself"
    return {
        "learner": f"{' + '.join(models)}; data-parallel over torch.distributed {backend}",
        "rollout worker": (
            f"{config.rollout.backend} generation of <= {episodes_per_worker(config)} episodes a step; "
            f"{searches}; weights from learner 0 after each update"
        ),
        "retriever replica": f"{index}; search(queries, k) for any rollout worker",
    }


def _count(amount: float, unit: str) -> str:
    return f"{amount:g} {unit}{'' if amount == 1 else 's'}"
