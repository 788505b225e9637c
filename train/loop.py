"""The training loop: rollout, learn, sync weights, log, check, checkpoint, evaluate — once per step.

The loop drives two plug-ins and knows nothing else about where they run:

- a :class:`Rollout` produces episodes with the weights it was last given: :class:`~searchgym.train.
  search_rollout.SearchRollout` in this process, the Ray rollout workers, or the tests' toy task;
- a :class:`Learner` turns episodes into an update and holds the run's weights and checkpoints:
  :class:`~searchgym.train.learner.LocalLearner` in this process, or the Ray learner group.

The loop reads top to bottom; the RL math lives in :mod:`searchgym.train.algorithms`, the update in
:mod:`searchgym.train.learner`.
"""

import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from transformers import PreTrainedTokenizerBase

from searchgym.env.data import QAExample
from searchgym.errors import SearchgymError
from searchgym.policy.generation import SamplingParams
from searchgym.policy.rollout import default_group_id
from searchgym.policy.trajectory import Trajectory
from searchgym.train.checkpoint import CheckpointManager, TrainerState
from searchgym.train.config import TrainConfig
from searchgym.train.dynamic_sampling import fill_with_informative_groups
from searchgym.train.guards import Guards
from searchgym.train.learner import LearnerStep
from searchgym.train.metrics import DEV_METRICS, episode_means, rollout_timings
from searchgym.train.plots import plot_run
from searchgym.train.tracking import Tracker, render_samples

logger = logging.getLogger(__name__)


class Learner(Protocol):
    """Holds the models being trained; updates them on episodes, saves, loads and exports them."""

    def step(self, trajectories: Sequence[Trajectory]) -> LearnerStep:
        """Experience and update on one step's episodes."""
        ...

    def policy_state(self) -> Any:
        """The policy's current weights, in the form this learner's rollouts load them."""
        ...

    def save(self, state: TrainerState) -> Path:
        """Write a checkpoint of the weights, optimizers and random state beside ``state``."""
        ...

    def load(self, path: Path, *, restore_rng: bool) -> TrainerState:
        """Restore a checkpoint (with its random state when ``restore_rng``); return its trainer state."""
        ...

    def export(self, target: Path) -> Path:
        """Write the policy as a plain Hugging Face folder."""
        ...


class Rollout(Protocol):
    """Produces episodes with the policy weights it was last given.

    A request is submitted, then collected: lock-step rollouts run it on ``collect``, others start at once
    and may overlap it with other work. Several requests may be in flight (``rollout.max_staleness`` > 0):
    each is generated with the weights synced before it was submitted, and they are collected in order.
    """

    def sync_weights(self, learner: Learner) -> None:
        """Take the learner's current policy weights for the requests submitted from now on."""
        ...

    def submit(
        self, examples: Sequence[QAExample], *, sampling: SamplingParams, step: int, batch_size: int
    ) -> None:
        """Ask for one episode per example.

        Args:
            examples: the questions, each repeated as many times as it is to be sampled, consecutively.
            sampling: how to sample (a seeded temperature for training, greedy for evaluation).
            step: the training step the episodes are for.
            batch_size: at most this many episodes are generated together.
        """
        ...

    def collect(self) -> list[Trajectory]:
        """The episodes of the oldest request not yet collected, one per example, in order."""
        ...


class ExampleSampler:
    """Training questions in a seeded order, reshuffled every epoch; its position fits in two integers.

    Args:
        examples: the training questions.
        seed: seeds the order of every epoch.
        shuffle: False visits the questions in file order.
    """

    def __init__(self, examples: Sequence[QAExample], *, seed: int, shuffle: bool) -> None:
        if not examples:
            raise SearchgymError("no training examples: check data.train and data.train_limit")
        self.examples = examples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, count: int) -> list[QAExample]:
        """The next ``count`` questions, crossing into the next epoch when this one runs out."""
        taken: list[QAExample] = []
        while len(taken) < count:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order()
            taken.append(self.examples[self._order[self.position]])
            self.position += 1
        return taken

    def state_dict(self) -> dict[str, int]:
        """Where the sampler stands."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a ``state_dict``."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order()


class PhaseTimer:
    """Wall-clock seconds per named phase of a step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the ``with`` block under ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        """``time/<phase>`` for every phase timed."""
        return {f"time/{name}": seconds for name, seconds in self.seconds.items()}


@dataclass(slots=True)
class TrainResult:
    """What a finished run leaves behind.

    Attributes:
        steps: training steps completed.
        run_dir: the run's folder (metrics.jsonl, tensorboard/, samples/, checkpoints/, curves.png).
        final_model: the exported Hugging Face folder, or None when export is off.
        history: the metrics of every step this process ran (step 0 is the untrained dev evaluation).
    """

    steps: int
    run_dir: Path
    final_model: Path | None
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass(slots=True)
class _Run:
    """Everything the loop carries from step to step."""

    config: TrainConfig
    learner: Learner
    rollout: Rollout
    tokenizer: PreTrainedTokenizerBase
    sampler: ExampleSampler
    guards: Guards
    checkpoints: CheckpointManager
    dev_examples: Sequence[QAExample]
    pipeline: "RequestPipeline"


class RequestPipeline:
    """The training requests submitted to the rollout and not yet collected, oldest first.

    With ``rollout.max_staleness`` k, the requests of the next k steps are submitted before a step learns,
    so the rollout generates them with the weights it has while the learner updates. A request never
    crosses a step that checkpoints or evaluates (``drains``): a checkpoint then holds no batch in flight,
    and a resumed run submits exactly what the uninterrupted one did after that step.

    Args:
        config: the run's settings.
        rollout: where requests go.
        sampler: the training questions.
        drains: whether a step must end with no request in flight, given the run's last step.

    Attributes:
        weights_version: the step whose update made the rollout's current weights (0: the initial ones).
        in_flight: ``(step, weights version it is sampled with)`` of each request not yet collected.
        last_step: the run's last step: ``total_steps``, or an earlier one where ``max_minutes`` runs
            out. Nothing is submitted beyond it, and it drains.
    """

    def __init__(
        self,
        config: TrainConfig,
        rollout: Rollout,
        sampler: ExampleSampler,
        *,
        drains: Callable[[int, int], bool],
    ) -> None:
        self.config, self.rollout, self.sampler, self._drains = config, rollout, sampler, drains
        self.weights_version = 0
        self.last_step = config.total_steps
        self.in_flight: deque[tuple[int, int, list[QAExample]]] = deque()
        self.collected: list[QAExample] = []

    def collect(self, step: int) -> list[Trajectory]:
        """Step ``step``'s episodes (submitted now unless they were), stamped with weights and staleness."""
        if not self.in_flight:
            self._submit(step)
        submitted_for, version, examples = self.in_flight.popleft()
        assert submitted_for == step, (submitted_for, step)  # requests are submitted in step order
        self.collected = examples
        trajectories = self.rollout.collect()
        for trajectory in trajectories:
            trajectory.weights_version, trajectory.staleness = version, self.weights_version - version
        return trajectories

    def submit_ahead(self, step: int) -> None:
        """Before step ``step`` learns: submit the next steps' requests that staleness and drains allow."""
        if self.drains(step):
            return
        last = self.newest_submitted(step)
        until = min(step + self.config.rollout.max_staleness, self.last_step)
        for next_step in range(last + 1, until + 1):
            if any(self.drains(between) for between in range(step, next_step)):
                return
            self._submit(next_step)

    def drains(self, step: int) -> bool:
        """Whether ``step`` must end with no request in flight (it checkpoints, evaluates or is the last)."""
        return self._drains(step, self.last_step)

    def newest_submitted(self, step: int) -> int:
        """The newest step whose request is in flight; ``step`` when none is."""
        return self.in_flight[-1][0] if self.in_flight else step

    def _submit(self, step: int) -> None:
        config = self.config
        examples = self.sampler.take(config.batch.prompts_per_step)
        repeated = [example for example in examples for _ in range(config.rollout.samples_per_prompt)]
        self.rollout.submit(
            repeated,
            sampling=training_sampling(config, step),
            step=step,
            batch_size=config.trajectories_per_step,
        )
        self.in_flight.append((step, self.weights_version, repeated))

    def draw_now(self, step: int) -> list[Trajectory]:
        """More episodes for step ``step`` at once (dynamic sampling; only with nothing in flight)."""
        drawn = self.collected
        self._submit(step)
        trajectories = self.collect(step)
        self.collected = [*drawn, *self.collected]
        return trajectories


def train(
    config: TrainConfig,
    *,
    learner: Learner,
    rollout: Rollout,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: Sequence[QAExample],
    dev_examples: Sequence[QAExample] = (),
) -> TrainResult:
    """Train for ``config.total_steps`` steps, resuming from the run folder when it can.

    Args:
        config: the run's settings.
        learner: holds the models (as initialised; a resumed run gets its weights from the checkpoint).
        rollout: produces the episodes of each step.
        tokenizer: the policy's tokenizer (sample episodes are rendered with it).
        train_examples: the training questions.
        dev_examples: scored with greedy episodes every ``dev.every`` steps; none skips the evaluation.
    """
    sampler = ExampleSampler(train_examples, seed=config.system.seed, shuffle=config.data.shuffle)
    run = _Run(
        config=config,
        learner=learner,
        rollout=rollout,
        tokenizer=tokenizer,
        sampler=sampler,
        guards=Guards(config.guards),
        checkpoints=CheckpointManager(config.run_dir / "checkpoints", keep_last=config.checkpoint.keep_last),
        dev_examples=dev_examples,
        pipeline=RequestPipeline(
            config, rollout, sampler, drains=partial(_drains, config, evaluates=bool(dev_examples))
        ),
    )
    start_step = run.pipeline.weights_version = _resume(run)
    rollout.sync_weights(learner)
    tracker = Tracker(config, start_step=start_step)
    time_limit = TimeLimit(config.max_minutes)
    history: list[dict[str, float]] = []
    step = start_step
    try:
        if start_step == 0 and dev_examples and config.dev.before_training:
            history.append(_log(tracker, 0, _dev_metrics(run, 0)))
        while step < run.pipeline.last_step:
            step += 1
            _end_in_time(run, step, time_limit)
            with time_limit.step():
                metrics = _training_step(run, step, tracker)
            if dev_examples and _dev_due(step, config, run.pipeline.last_step):
                metrics |= _dev_metrics(run, step)
            history.append(_log(tracker, step, metrics))
            if _due(step, config.checkpoint.every, run.pipeline.last_step):
                _save_checkpoint(run, step)
            tracker.advance()
        if step < config.total_steps:
            tracker.note(
                f"max_minutes={config.max_minutes:g} leaves no time for step {step + 1}: stopping at {step}"
            )
    finally:
        tracker.close()
    final_model = _finish(run, tracker)
    return TrainResult(steps=step, run_dir=config.run_dir, final_model=final_model, history=history)


class TimeLimit:
    """How many more steps fit in ``max_minutes`` of the training loop.

    The steps left are paced at the mean step so far, with room kept for one as slow as the slowest: steps
    vary (an update's cost follows how many groups did not score alike), and a slow last step is what
    would run past the limit.

    Args:
        minutes: the limit, counted from now; 0 means none.
        clock: seconds from a fixed point (tests pass a fake one).
    """

    def __init__(self, minutes: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._deadline = clock() + minutes * 60.0 if minutes > 0 else None
        self._steps, self._total_s, self._slowest_s = 0, 0.0, 0.0

    @contextmanager
    def step(self) -> Iterator[None]:
        """Time one step (the ``with`` block)."""
        started = self._clock()
        yield
        took = self._clock() - started
        self._steps, self._total_s, self._slowest_s = (
            self._steps + 1,
            self._total_s + took,
            max(self._slowest_s, took),
        )

    def steps_that_fit(self) -> int | None:
        """Whole steps that fit in the time left; None without a limit or before a step was timed."""
        if self._deadline is None or self._steps == 0 or self._total_s <= 0:
            return None
        mean_s = self._total_s / self._steps
        left_s = self._deadline - self._clock() - (self._slowest_s - mean_s)
        return max(0, math.floor(left_s / mean_s))


def _end_in_time(run: _Run, step: int, time_limit: TimeLimit) -> None:
    """Set the run's last step to the last that ``max_minutes`` leaves time for, from this step's estimate.

    The estimate is made again before every step, so the last step moves with the pace of the steps. It
    never comes before a step already submitted, nor after ``total_steps``.
    """
    fits = time_limit.steps_that_fit()
    if fits is not None:
        pipeline = run.pipeline
        pipeline.last_step = min(
            max(step + fits - 1, pipeline.newest_submitted(step)), run.config.total_steps
        )


def _training_step(run: _Run, step: int, tracker: Tracker) -> dict[str, float]:
    """One step: rollout, learn, new weights to the rollout, guard checks (and a roll-back if called for)."""
    config, timer = run.config, PhaseTimer()
    with timer.phase("rollout"):
        trajectories = drawn = run.pipeline.collect(step)
        sampling_metrics: dict[str, float] = {}
        if config.algorithm.dynamic_sampling:
            first = iter([trajectories])
            sample = fill_with_informative_groups(
                lambda: next(first, None) or run.pipeline.draw_now(step),
                target_groups=config.batch.prompts_per_step,
                max_draws=config.algorithm.dynamic_sampling_max_draws,
            )
            trajectories, drawn, sampling_metrics = sample.trajectories, sample.drawn, sample.metrics()
    # With max_staleness > 0, the next steps' episodes generate with these weights while the learner updates.
    run.pipeline.submit_ahead(step)
    with timer.phase("learn"):
        learned = run.learner.step(trajectories)
    with timer.phase("weight_sync"):
        run.rollout.sync_weights(run.learner)
        run.pipeline.weights_version = step
    # Every episode sampled counts in the rollout's means, also those dynamic sampling left out.
    metrics = {f"rollout/{name}": value for name, value in episode_means(drawn).items()}
    metrics |= {"rollout/staleness": float(trajectories[0].staleness) if trajectories else 0.0}
    metrics |= sampling_metrics | learned.metrics
    report = run.guards.check(learned.health)
    for warning in report.warnings:
        tracker.warn(f"step {step}: {warning}")
    metrics |= {"guards/warnings": float(len(report.warnings)), "guards/bad_streak": float(report.bad_streak)}
    if report.roll_back:
        metrics |= {"guards/rolled_back_to": float(_roll_back(run, tracker, step))}
    if config.logging.samples_every and step % config.logging.samples_every == 0:
        tracker.write_samples(step, render_samples(trajectories, run.tokenizer, config.logging.num_samples))
    of_group = {default_group_id(example): example for example in run.pipeline.collected}
    tracker.write_episodes(step, trajectories, [of_group[t.group_id] for t in trajectories], run.tokenizer)
    return metrics | timer.metrics() | rollout_timings(trajectories)


def training_sampling(config: TrainConfig, step: int) -> SamplingParams:
    """How a step's episodes are sampled: seeded by the run's seed and the step.

    A resumed run therefore samples what the uninterrupted one would have.
    """
    return SamplingParams(
        max_new_tokens=config.rollout.max_new_tokens,
        temperature=config.rollout.temperature,
        top_p=config.rollout.top_p,
        seed=config.system.seed * 1_000_003 + step,
    )


def evaluation_sampling(config: TrainConfig) -> SamplingParams:
    """Greedy decoding with the rollout's turn length: how dev questions are answered."""
    return SamplingParams(max_new_tokens=config.rollout.max_new_tokens, temperature=0.0)


def evaluate(
    rollout: Rollout, examples: Sequence[QAExample], config: TrainConfig, *, step: int
) -> dict[str, float]:
    """Greedy episodes on ``examples`` with the rollout's current weights: EM, F1, reward, searches..."""
    rollout.submit(
        examples, sampling=evaluation_sampling(config), step=step, batch_size=config.dev.batch_size
    )
    means = episode_means(rollout.collect())
    return {name: means[name] for name in DEV_METRICS if name in means}


def _dev_metrics(run: _Run, step: int) -> dict[str, float]:
    """``dev/...`` of :func:`evaluate` on the dev questions, and how long it took."""
    started = time.perf_counter()
    scores = evaluate(run.rollout, run.dev_examples, run.config, step=step)
    return {f"dev/{name}": value for name, value in scores.items()} | {
        "time/dev_eval": time.perf_counter() - started
    }


def _resume(run: _Run) -> int:
    """Load the newest checkpoint when resuming is on and there is one; return the step to continue from."""
    latest = run.checkpoints.latest()
    if latest is not None and not run.config.checkpoint.resume:
        # A fresh run would interleave its checkpoints with the old run's, and a later resume would pick
        # whichever has the higher step.
        raise SearchgymError(
            f"{run.checkpoints.directory} holds checkpoints of an earlier run and checkpoint.resume=false: "
            "set another logging.run_dir, delete that folder, or resume with checkpoint.resume=true"
        )
    if latest is None:
        return 0
    state = run.learner.load(latest, restore_rng=True)
    run.sampler.load_state_dict(state.data_position)
    run.guards.load_state_dict(state.guards)
    logger.info("resumed from %s (step %d)", latest, state.step)
    return state.step


def _roll_back(run: _Run, tracker: Tracker, step: int) -> int:
    """Restore the weights, optimizers and guard statistics of the last healthy checkpoint.

    The step counter, the data position and the random generators go on: replaying the same batches
    with the same samples would lead straight back into the same trouble.
    """
    target = run.checkpoints.latest(healthy_only=True)
    if target is None:
        tracker.warn(f"step {step}: roll-back wanted but no healthy checkpoint exists yet; continuing")
        return -1
    state = run.learner.load(target, restore_rng=False)
    run.rollout.sync_weights(run.learner)
    run.guards.load_state_dict(state.guards)
    run.guards.bad_streak = 0
    tracker.warn(f"step {step}: rolled back to the healthy checkpoint of step {state.step}")
    return state.step


def _save_checkpoint(run: _Run, step: int) -> None:
    assert not run.pipeline.in_flight  # checkpoint steps drain the pipeline (RequestPipeline)
    run.learner.save(
        TrainerState(
            step=step,
            data_position=run.sampler.state_dict(),
            guards=run.guards.state_dict(),
            healthy=run.guards.bad_streak == 0,
        )
    )


def _finish(run: _Run, tracker: Tracker) -> Path | None:
    """Export the final policy and draw the curves."""
    if run.config.logging.plots:
        plot_run(tracker.metrics_path, run.config.run_dir / "curves.png")
    if not run.config.checkpoint.export_final:
        return None
    return run.learner.export(run.config.run_dir / "final")


def _log(tracker: Tracker, step: int, metrics: dict[str, float]) -> dict[str, float]:
    tracker.log(step, metrics)
    return {"step": float(step)} | metrics


def _drains(config: TrainConfig, step: int, last_step: int, *, evaluates: bool) -> bool:
    """Whether ``step`` ends with no request in flight: it checkpoints, or it evaluates (``evaluates``)."""
    if evaluates and _dev_due(step, config, last_step):
        return True
    return _due(step, config.checkpoint.every, last_step)


def _dev_due(step: int, config: TrainConfig, last_step: int) -> bool:
    """Dev evaluations run every ``dev.every`` steps and after the last one; ``dev.every`` 0 runs none."""
    return config.dev.every > 0 and _due(step, config.dev.every, last_step)


def _due(step: int, every: int, last_step: int) -> bool:
    """Periodic work happens every ``every`` steps and after the last one (``every`` 0: only the last)."""
    return step == last_step or (every > 0 and step % every == 0)
