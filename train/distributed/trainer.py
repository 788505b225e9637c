"""``searchgym train ... ray.enabled=true``: the placement map, then the loop's steps on actors.

What runs where (one placement group, see :mod:`searchgym.train.distributed.placement`)::

    driver (this process)    data order, guards, logs, samples, dev scores, when to save or roll back
    learners 0..L-1          policy, critic, reference and optimizers; experience and the PPO/GRPO update,
                             data-parallel over torch.distributed (gloo on CPU, NCCL on GPU)
    retriever replicas       the index; search(queries, k) for whichever rollout worker asks
    rollout workers 0..W-1   a copy of the policy and a vector env over the replicas (or retriever.url)

A configured warm-start runs first, here, as in one process; the actors then start from its folder. A step:
the rollout workers generate their slices of the batch; the learners score it and update; learner 0's new
weights go to the rollout workers. Checkpoints are learner 0's, in the single-process format, so a
run resumes with or without Ray. When an actor dies the run stops, every actor is killed, and the error
names the actor and the checkpoint to resume from.
"""

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from searchgym.env import QAExample, load_dataset
from searchgym.policy.trajectory import Trajectory
from searchgym.train.checkpoint import CheckpointManager, TrainerState, read_trainer_state
from searchgym.train.config import TrainConfig
from searchgym.train.distributed.cluster import Placement, ray_cluster, reserve
from searchgym.train.distributed.groups import (
    LearnerGroup,
    RetrieverReplicas,
    RolloutWorkerGroup,
    Roster,
    WorkerDiedError,
)
from searchgym.train.distributed.placement import plan_placement
from searchgym.train.guards import Guards
from searchgym.train.loop import ExampleSampler, PhaseTimer, TrainResult, rollout_metrics
from searchgym.train.plots import plot_run
from searchgym.train.search_rollout import dev_sampling, dev_scores, starting_policy
from searchgym.train.tracking import Tracker, render_samples
from searchgym.train.warmstart import WARMSTART_DIR

logger = logging.getLogger(__name__)


def run_ray_training(config: TrainConfig) -> TrainResult:
    """The whole job on a Ray cluster: reserve the placement, start the parts, train, stop them all.

    Raises:
        PlacementError: the cluster has no room for the run.
        WorkerDiedError: an actor died; the message names it and the checkpoint to resume from.
    """
    train_examples = load_dataset(config.data.train, limit=config.data.train_limit)
    dev_examples = load_dataset(config.data.dev, limit=config.data.dev_limit)
    if config.warmstart.examples > 0:
        config = warm_start(config, train_examples, dev_examples)
    plan = plan_placement(config)
    logger.info("%s", plan.describe())
    with ray_cluster(config.ray, plan):
        placement = reserve(plan, timeout_s=config.ray.placement_timeout_s)
        roster = Roster(str(config.run_dir))
        try:
            parts = start_parts(config, placement, roster)
            return RayTrainer(config, parts).train(train_examples, dev_examples)
        except WorkerDiedError as error:
            raise WorkerDiedError(f"{error}. {resume_hint(config)}") from error
        finally:
            roster.stop()
            placement.release()


def warm_start(
    config: TrainConfig, train_examples: Sequence[QAExample], dev_examples: Sequence[QAExample]
) -> TrainConfig:
    """Run the configured warm-start here, as the single-process trainer does, and start the actors from it.

    The warm-started policy is a Hugging Face folder in the run folder (reused when it is there already);
    the returned config points ``model.path`` at it, so that every learner and rollout worker loads it.
    """
    starting_policy(config, train_examples, dev_examples)
    warm_started = dataclasses.replace(config.model, path=str(config.run_dir / WARMSTART_DIR))
    return dataclasses.replace(config, model=warm_started)


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


class RayTrainer:
    """The loop of :func:`~searchgym.train.loop.train`, models in learner actors, rollouts in workers.

    Args:
        config: the run's settings.
        parts: the started actors.
    """

    def __init__(self, config: TrainConfig, parts: Parts) -> None:
        self.config = config
        self.parts = parts
        self.tokenizer = parts.learners.tokenizer()
        self.guards = Guards(config.guards)
        self.checkpoints = CheckpointManager(
            config.run_dir / "checkpoints", keep_last=config.checkpoint.keep_last
        )

    def train(self, train_examples: Sequence[QAExample], dev_examples: Sequence[QAExample]) -> TrainResult:
        """Train for ``config.total_steps`` steps, resuming from the run folder when it can."""
        config = self.config
        sampler = ExampleSampler(train_examples, seed=config.system.seed, shuffle=config.data.shuffle)
        start_step = self._resume(sampler)
        tracker = Tracker(config, start_step=start_step)
        history: list[dict[str, float]] = []
        try:
            if start_step == 0 and config.dev.before_training:
                history.append(_log(tracker, 0, self._evaluate(dev_examples)))
            for step in range(start_step + 1, config.total_steps + 1):
                metrics = self._training_step(sampler, step, tracker)
                if _due(step, config.dev.every, config.total_steps):
                    metrics |= self._evaluate(dev_examples)
                history.append(_log(tracker, step, metrics))
                if _due(step, config.checkpoint.every, config.total_steps):
                    self._save(sampler, step)
                tracker.advance()
        finally:
            tracker.close()
        if config.logging.plots:
            plot_run(tracker.metrics_path, config.run_dir / "curves.png")
        final_model = None
        if config.checkpoint.export_final:
            final_model = self.parts.learners.export(config.run_dir / "final")
        return TrainResult(
            steps=config.total_steps, run_dir=config.run_dir, final_model=final_model, history=history
        )

    def _training_step(self, sampler: ExampleSampler, step: int, tracker: Tracker) -> dict[str, float]:
        """Rollout on the workers, experience and update on the learners, new weights to the workers."""
        config, timer = self.config, PhaseTimer()
        with timer.phase("rollout"):
            examples = sampler.take(config.batch.prompts_per_step)
            repeated = [example for example in examples for _ in range(config.rollout.samples_per_prompt)]
            trajectories = self.parts.rollout_workers.rollout(repeated, step)
        with timer.phase("learn"):
            learned = self.parts.learners.step(trajectories)
        with timer.phase("weight_sync"):
            self._send_weights()
        metrics = rollout_metrics(trajectories) | learned.metrics
        report = self.guards.check(learned.health)
        for warning in report.warnings:
            tracker.warn(f"step {step}: {warning}")
        metrics |= {
            "guards/warnings": float(len(report.warnings)),
            "guards/bad_streak": float(report.bad_streak),
        }
        if report.roll_back:
            metrics |= {"guards/rolled_back_to": float(self._roll_back(tracker, step))}
        if config.logging.samples_every and step % config.logging.samples_every == 0:
            tracker.write_samples(
                step, render_samples(trajectories, self.tokenizer, config.logging.num_samples)
            )
        tracker.write_episodes(step, trajectories, repeated, self.tokenizer)
        return metrics | timer.metrics() | _worker_seconds(trajectories)

    def _send_weights(self) -> None:
        self.parts.rollout_workers.load_weights(self.parts.learners.policy_state())

    def _resume(self, sampler: ExampleSampler) -> int:
        latest = self.checkpoints.latest() if self.config.checkpoint.resume else None
        if latest is None:
            return 0
        state = self.parts.learners.load(latest, restore_rng=True)
        sampler.load_state_dict(state.data_position)
        self.guards.load_state_dict(state.guards)
        self._send_weights()
        logger.info("resumed from %s (step %d)", latest, state.step)
        return state.step

    def _roll_back(self, tracker: Tracker, step: int) -> int:
        """As the single-process loop rolls back: weights, optimizers and guards; steps and data go on."""
        target = self.checkpoints.latest(healthy_only=True)
        if target is None:
            tracker.warn(f"step {step}: roll-back wanted but no healthy checkpoint exists yet; continuing")
            return -1
        state = self.parts.learners.load(target, restore_rng=False)
        self.guards.load_state_dict(state.guards)
        self.guards.bad_streak = 0
        self._send_weights()
        tracker.warn(f"step {step}: rolled back to the healthy checkpoint of step {state.step}")
        return state.step

    def _save(self, sampler: ExampleSampler, step: int) -> None:
        state = TrainerState(
            step=step,
            data_position=sampler.state_dict(),
            guards=self.guards.state_dict(),
            healthy=self.guards.bad_streak == 0,
        )
        self.parts.learners.save(state)

    def _evaluate(self, dev_examples: Sequence[QAExample]) -> dict[str, float]:
        """Greedy dev episodes, spread over the rollout workers; scored as the single-process run scores."""
        start = time.perf_counter()
        episodes = self.parts.rollout_workers.episodes(dev_examples, dev_sampling(self.config))
        scores = {f"dev/{name}": value for name, value in dev_scores(episodes).items()}
        return scores | {"time/dev_eval": time.perf_counter() - start}


def _worker_seconds(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """The rollout workers' own timings of the step.

    ``time/generation`` and ``time/retrieval`` are summed over the workers' episode batches (worker-seconds);
    ``time/rollout_slowest_worker`` is the longest batch (each worker runs one batch a step), so that
    ``time/rollout`` minus it is what dispatching the rollout and gathering the episodes cost.
    """
    batches = {id(t.timings): t.timings for t in trajectories}.values()
    return {
        "time/generation": sum(timings.generation for timings in batches),
        "time/retrieval": sum(timings.retrieval for timings in batches),
        "time/rollout_slowest_worker": max(t.generation + t.retrieval + t.bookkeeping for t in batches),
    }


def _log(tracker: Tracker, step: int, metrics: dict[str, float]) -> dict[str, float]:
    tracker.log(step, metrics)
    return {"step": float(step)} | metrics


def _due(step: int, every: int, total_steps: int) -> bool:
    """Periodic work happens every ``every`` steps and after the last one (as in the loop)."""
    return step == total_steps or (every > 0 and step % every == 0)
