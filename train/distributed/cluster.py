"""Connecting to a Ray cluster and reserving the run's placement group; errors name what is missing."""

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from searchgym.errors import SearchgymError
from searchgym.train.distributed.config import RayConfig
from searchgym.train.distributed.placement import STRATEGY, ActorPlace, PlacementPlan

logger = logging.getLogger(__name__)


class PlacementError(SearchgymError):
    """The cluster has no room for every actor of the run."""


@contextmanager
def ray_cluster(config: RayConfig, plan: PlacementPlan) -> Iterator[None]:
    """Connected to the configured cluster inside the ``with`` block; a cluster started here stops after it.

    A process that is already connected (a notebook, the tests) keeps its connection and its cluster.
    ``local`` declares at least as many logical CPUs as the plan reserves: on a small machine the actors
    then share its cores rather than wait for cores it does not have.
    """
    if ray.is_initialized():
        yield
        return
    if config.address == "local":
        cores = os.cpu_count() or 1
        cpus = max(cores, math.ceil(plan.cpus))
        if cpus > cores:
            logger.info("local Ray cluster: %d logical CPUs on %d cores (the actors share them)", cpus, cores)
        ray.init(num_cpus=cpus, include_dashboard=False)
    else:
        ray.init(address=config.address)
    try:
        yield
    finally:
        ray.shutdown()


@dataclass(frozen=True, slots=True)
class Placement:
    """The run's reserved placement group.

    Attributes:
        plan: what each bundle is for.
        group: Ray's placement group holding one bundle per entry of ``plan.bundles``.
    """

    plan: PlacementPlan
    group: PlacementGroup

    def strategy(self, place: ActorPlace) -> PlacementGroupSchedulingStrategy:
        """Schedule an actor in its bundle."""
        return PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=place.bundle
        )

    def release(self) -> None:
        """Give the bundles back to the cluster."""
        remove_placement_group(self.group)


def reserve(plan: PlacementPlan, *, timeout_s: float) -> Placement:
    """Reserve every bundle of ``plan`` at once.

    Raises:
        PlacementError: the cluster found no room within ``timeout_s``; the message compares what the
            run asks for with what the cluster has.
    """
    group = placement_group(list(plan.bundles), strategy=STRATEGY)
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except GetTimeoutError as error:
        remove_placement_group(group)
        raise PlacementError(
            f"the Ray cluster found no room for this run within {timeout_s:g} s: it asks for "
            f"{plan.cpus:g} CPUs and {plan.gpus:g} GPUs in {len(plan.bundles)} bundles "
            f"{list(plan.bundles)}, and the cluster has {_resources(ray.cluster_resources())} "
            f"({_resources(ray.available_resources())} free). Lower ray.num_* or ray.*_per_*, add nodes, "
            "or raise ray.placement_timeout_s"
        ) from error
    return Placement(plan=plan, group=group)


def _resources(resources: dict[str, float]) -> str:
    return ", ".join(f"{resources.get(name, 0):g} {name}" for name in ("CPU", "GPU"))
