"""``searchgym train ... ray.enabled=true``: the placement map, the actors, then the one training loop.

What runs where (one placement group, see :mod:`searchgym.train.distributed.placement`)::

    driver (this process)    the loop: data order, guards, logs, samples, dev scores, saves, roll-backs
    learners 0..L-1          policy, critic, reference and optimizers; experience and the PPO/GRPO update,
                             data-parallel over torch.distributed (gloo on CPU, NCCL on GPU)
    retriever replicas       the index; search(queries, k) for whichever rollout worker asks
    rollout workers 0..W-1   a copy of the policy and a vector env over the replicas (or retriever.url)

The learners are the loop's :class:`~searchgym.train.loop.Learner` and the rollout workers its
:class:`~searchgym.train.loop.Rollout`: a step is the single-process step, with the rollout split over the
workers and learner 0's new weights sent to them through the object store. Checkpoints are learner 0's,
in the single-process format, so a run resumes with or without Ray. When an actor dies, every actor is
stopped and the run starts them again and resumes from its last checkpoint, up to ``ray.max_restarts``
times; after that it stops with an error naming the actor and the checkpoint to resume from.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from searchgym.env import QAExample
from searchgym.train.checkpoint import CheckpointManager, read_trainer_state
from searchgym.train.config import TrainConfig
from searchgym.train.distributed.cluster import Placement, ray_cluster, reserve
from searchgym.train.distributed.groups import (
    LearnerGroup,
    RetrieverReplicas,
    RolloutWorkerGroup,
    Roster,
    WorkerDiedError,
)
from searchgym.train.distributed.placement import PlacementPlan, plan_placement
from searchgym.train.loop import TrainResult, train

logger = logging.getLogger(__name__)


def train_on_ray(
    config: TrainConfig, *, train_examples: Sequence[QAExample], dev_examples: Sequence[QAExample]
) -> TrainResult:
    """The whole job on a Ray cluster: reserve the placement, start the parts, train, stop them all.

    When an actor dies, every actor is stopped and started afresh, and the run resumes from its last
    checkpoint, up to ``ray.max_restarts`` times.

    Raises:
        PlacementError: the cluster has no room for the run.
        WorkerDiedError: an actor died once too often; the message names it and the checkpoint to resume from.
    """
    plan = plan_placement(config)
    logger.info("%s", plan.describe())
    with ray_cluster(config.ray, plan):
        restarts = 0
        while True:
            try:
                return _train_once(config, plan, train_examples, dev_examples)
            except WorkerDiedError as error:
                if restarts == config.ray.max_restarts:
                    raise WorkerDiedError(f"{error}. {resume_hint(config)}") from error
                restarts += 1
                logger.warning(
                    "%s. Restarting every actor and resuming from the last checkpoint (restart %d of %d)",
                    error,
                    restarts,
                    config.ray.max_restarts,
                )


def _train_once(
    config: TrainConfig,
    plan: PlacementPlan,
    train_examples: Sequence[QAExample],
    dev_examples: Sequence[QAExample],
) -> TrainResult:
    """Reserve the placement, start every actor, run the loop (resuming when it can), stop them all."""
    placement = reserve(plan, timeout_s=config.ray.placement_timeout_s)
    roster = Roster(str(config.run_dir))
    try:
        parts = start_parts(config, placement, roster)
        return train(
            config,
            learner=parts.learners,
            rollout=parts.rollout_workers,
            tokenizer=parts.learners.tokenizer(),
            train_examples=train_examples,
            dev_examples=dev_examples,
        )
    finally:
        roster.stop()
        placement.release()


@dataclass(frozen=True, slots=True)
class Parts:
    """The run's actors, by role."""

    learners: LearnerGroup
    replicas: RetrieverReplicas | None
    rollout_workers: RolloutWorkerGroup


def start_parts(config: TrainConfig, placement: Placement, roster: Roster) -> Parts:
    """What runs where: the learners (one process group), the retrieval replicas, the rollout workers."""
    learners = LearnerGroup.start(config, placement, roster)
    replicas = None
    if placement.plan.retriever_replicas:
        replicas = RetrieverReplicas.start(config, placement, roster)
    rollout_workers = RolloutWorkerGroup.start(config, placement, roster, replicas=replicas)
    if config.ray.weight_sync == "broadcast":
        learners.connect(rollout_workers, dtype="bfloat16" if config.rollout.backend == "vllm" else None)
    return Parts(learners=learners, replicas=replicas, rollout_workers=rollout_workers)


def resume_hint(config: TrainConfig) -> str:
    """Where the run can pick up from: its newest checkpoint, which a crash never leaves half-written."""
    latest = CheckpointManager(config.run_dir / "checkpoints", keep_last=config.checkpoint.keep_last).latest()
    if latest is None:
        return "No checkpoint was written yet: running the same command again starts afresh"
    step = read_trainer_state(latest).step
    how = (
        "run the same command again" if config.checkpoint.resume else "run again with checkpoint.resume=true"
    )
    return f"The last checkpoint (step {step}) is intact at {latest}: {how} to resume"
