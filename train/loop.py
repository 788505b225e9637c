"""The training loop: rollout, experience, update, log, check, checkpoint, evaluate — once per step.

The rollout is a plug-in (:class:`RolloutFunc`): the real run plugs in the search environment with the
policy's generator, the tests a one-turn toy task. The loop reads top to bottom; the math lives in
:mod:`searchgym.train.algorithms`, the update in :mod:`searchgym.train.learner`.
"""

import logging
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from searchgym.env.data import QAExample
from searchgym.errors import SearchgymError
from searchgym.policy.trajectory import Trajectory
from searchgym.train import algorithms
from searchgym.train.batch import Batch, Experience, collate
from searchgym.train.checkpoint import CheckpointManager, TrainerState, export_hf_model
from searchgym.train.config import TrainConfig
from searchgym.train.guards import Guards, StepHealth
from searchgym.train.learner import Optimizers, UpdateStats, build_optimizers, make_experience, update
from searchgym.train.models import TrainModels, build_train_models
from searchgym.train.plots import plot_run
from searchgym.train.tracking import Tracker, render_samples

logger = logging.getLogger(__name__)


class RolloutFunc(Protocol):
    """Produces the episodes of one training step.

    Called with the policy as it is now, its tokenizer, the step's examples (each question repeated
    ``rollout.samples_per_prompt`` times, consecutively) and the step index; returns one
    :class:`~searchgym.policy.trajectory.Trajectory` per example, whose ``group_id`` identifies the question.
    """

    def __call__(
        self,
        policy_model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        examples: Sequence[QAExample],
        step: int,
    ) -> list[Trajectory]:
        """Run one episode per example with ``policy_model``."""
        ...


class DevEvalFunc(Protocol):
    """Scores the current policy on the dev set (greedy decoding); returns e.g. ``{"em": 0.31}``."""

    def __call__(
        self, policy_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, step: int
    ) -> Mapping[str, float]:
        """Evaluate ``policy_model`` after ``step`` training steps."""
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
    models: TrainModels
    optimizers: Optimizers
    tokenizer: PreTrainedTokenizerBase
    sampler: ExampleSampler
    guards: Guards
    checkpoints: CheckpointManager
    device: torch.device


def train(
    config: TrainConfig,
    *,
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rollout: RolloutFunc,
    train_examples: Sequence[QAExample],
    dev_eval: DevEvalFunc | None = None,
) -> TrainResult:
    """Train ``policy`` for ``config.total_steps`` steps, resuming from the run folder when it can.

    Args:
        config: the run's settings.
        policy: the initial policy (as loaded; a resumed run passes the same initial model and gets its
            trained weights from the checkpoint).
        tokenizer: the policy's tokenizer (pad id, sample texts, export).
        rollout: produces the episodes of each step.
        train_examples: the training questions.
        dev_eval: scores the policy on dev questions every ``dev.every`` steps; None skips it.
    """
    run = _start_run(config, policy=policy, tokenizer=tokenizer, train_examples=train_examples)
    start_step = _resume(run)
    tracker = Tracker(config, start_step=start_step)
    history: list[dict[str, float]] = []
    if start_step == 0 and dev_eval is not None and config.dev.before_training:
        history.append(_log(tracker, 0, _evaluate(run, dev_eval, 0)))
    try:
        for step in range(start_step + 1, config.total_steps + 1):
            metrics = _training_step(run, rollout, step, tracker)
            if dev_eval is not None and _due(step, config.dev.every, config.total_steps):
                metrics |= _evaluate(run, dev_eval, step)
            history.append(_log(tracker, step, metrics))
            if _due(step, config.checkpoint.every, config.total_steps):
                _save_checkpoint(run, step)
            tracker.advance()
    finally:
        tracker.close()
    final_model = _finish(run, tracker)
    return TrainResult(
        steps=config.total_steps, run_dir=config.run_dir, final_model=final_model, history=history
    )


def _training_step(run: _Run, rollout: RolloutFunc, step: int, tracker: Tracker) -> dict[str, float]:
    """One step: rollout, experience, update, guard checks (and a roll-back when they call for it)."""
    config, models, timer = run.config, run.models, PhaseTimer()
    with timer.phase("rollout"):
        examples = run.sampler.take(config.batch.prompts_per_step)
        repeated = [example for example in examples for _ in range(config.rollout.samples_per_prompt)]
        trajectories = rollout(models.policy, run.tokenizer, repeated, step)
    with timer.phase("experience"):
        batch = collate(trajectories, pad_token_id=pad_token_id(run.tokenizer), device=run.device)
        experience = make_experience(models, batch, config)
    with timer.phase("update"):
        stats = update(models, run.optimizers, experience, config)
    metrics = rollout_metrics(trajectories) | experience_metrics(experience, config) | stats.to_metrics()
    metrics |= {"optim/actor_lr": run.optimizers.actor.param_groups[0]["lr"]}
    report = run.guards.check(step_health(batch, experience, stats, config))
    for warning in report.warnings:
        tracker.warn(f"step {step}: {warning}")
    metrics |= {"guards/warnings": float(len(report.warnings)), "guards/bad_streak": float(report.bad_streak)}
    if report.roll_back:
        metrics |= {"guards/rolled_back_to": float(_roll_back(run, tracker, step))}
    if config.logging.samples_every and step % config.logging.samples_every == 0:
        tracker.write_samples(step, render_samples(trajectories, run.tokenizer, config.logging.num_samples))
    return metrics | timer.metrics() | _rollout_timings(trajectories)


def _start_run(
    config: TrainConfig,
    *,
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: Sequence[QAExample],
) -> _Run:
    """Seed, place the models, and build the critic, reference, optimizers, sampler and guards."""
    if config.system.torch_threads is not None:
        torch.set_num_threads(config.system.torch_threads)
    seed_everything(config.system.seed)
    device = resolve_device(config.system.device)
    # transformers wraps PreTrainedModel.to in functools.wraps, which mypy reads as an unbound function.
    policy.to(device)  # type: ignore[arg-type]
    models = build_train_models(
        policy,
        with_reference=config.uses_reference,
        with_critic=config.uses_critic,
        gradient_checkpointing=config.model.gradient_checkpointing,
        lora=config.model.lora,
    )
    return _Run(
        config=config,
        models=models,
        optimizers=build_optimizers(models, config),
        tokenizer=tokenizer,
        sampler=ExampleSampler(train_examples, seed=config.system.seed, shuffle=config.data.shuffle),
        guards=Guards(config.guards),
        checkpoints=CheckpointManager(config.run_dir / "checkpoints", keep_last=config.checkpoint.keep_last),
        device=device,
    )


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
    state = run.checkpoints.load(latest, models=run.models, optimizers=run.optimizers)
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
    state = run.checkpoints.load(target, models=run.models, optimizers=run.optimizers, restore_rng=False)
    run.guards.load_state_dict(state.guards)
    run.guards.bad_streak = 0
    tracker.warn(f"step {step}: rolled back to the healthy checkpoint of step {state.step}")
    return state.step


def _save_checkpoint(run: _Run, step: int) -> None:
    run.checkpoints.save(
        models=run.models,
        optimizers=run.optimizers,
        state=TrainerState(
            step=step,
            data_position=run.sampler.state_dict(),
            guards=run.guards.state_dict(),
            healthy=run.guards.bad_streak == 0,
        ),
    )


def _evaluate(run: _Run, dev_eval: DevEvalFunc, step: int) -> dict[str, float]:
    start = time.perf_counter()
    scores = dev_eval(run.models.policy, run.tokenizer, step)
    return {f"dev/{name}": float(value) for name, value in scores.items()} | {
        "time/dev_eval": time.perf_counter() - start
    }


def _finish(run: _Run, tracker: Tracker) -> Path | None:
    """Export the final policy and draw the curves."""
    if run.config.logging.plots:
        plot_run(tracker.metrics_path, run.config.run_dir / "curves.png")
    if not run.config.checkpoint.export_final:
        return None
    return export_hf_model(run.models.policy, run.tokenizer, run.config.run_dir / "final")


def _log(tracker: Tracker, step: int, metrics: dict[str, float]) -> dict[str, float]:
    tracker.log(step, metrics)
    return {"step": float(step)} | metrics


def _due(step: int, every: int, total_steps: int) -> bool:
    """Periodic work happens every ``every`` steps and after the last one (``every`` 0: only the last)."""
    return step == total_steps or (every > 0 and step % every == 0)


def rollout_metrics(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """``rollout/...``: reward, missing (or non-finite) rewards, EM when reported, lengths, searches."""
    count = len(trajectories)
    rewards = [t.reward for t in trajectories if t.reward is not None and math.isfinite(t.reward)]
    metrics = {
        "rollout/reward": float(np.mean(rewards)) if rewards else math.nan,
        "rollout/missing_rewards": float(count - len(rewards)),
        "rollout/policy_tokens": float(np.mean([t.num_policy_tokens for t in trajectories])),
        "rollout/response_tokens": float(np.mean([len(t.response_ids) for t in trajectories])),
        "rollout/searches": float(
            np.mean([sum(turn.action_type == "search" for turn in t.turns) for t in trajectories])
        ),
        "rollout/turns": float(np.mean([len(t.turns) for t in trajectories])),
        "rollout/answered": float(np.mean([t.terminated for t in trajectories])),
        "rollout/truncated": float(np.mean([t.truncated for t in trajectories])),
    }
    for name in ("em", "f1", "cover_em"):
        values = [float(t.info[name]) for t in trajectories if t.info.get(name) is not None]
        if values:
            metrics[f"rollout/{name}"] = float(np.mean(values))
    return metrics


def experience_metrics(experience: Experience, config: TrainConfig) -> dict[str, float]:
    """``experience/...``: KL to the reference, value and return means, sampler log-prob mismatch.

    An on-policy update computes no old log-probs here; its KL is then ``actor/kl_loss``.
    """
    mask, old_logprobs = experience.batch.loss_mask, experience.old_logprobs
    metrics = {"experience/advantage_abs": float(algorithms.masked_mean(experience.advantages.abs(), mask))}
    if experience.ref_logprobs is not None and old_logprobs is not None:
        kl = algorithms.kl_estimate(old_logprobs, experience.ref_logprobs, estimator=config.kl.estimator)
        metrics["experience/kl"] = float(algorithms.masked_mean(kl, mask))
    if experience.values is not None and experience.returns is not None:
        metrics["experience/value"] = float(algorithms.masked_mean(experience.values, mask))
        metrics["experience/return"] = float(algorithms.masked_mean(experience.returns, mask))
    sampler = experience.batch.sampler_logprobs
    if sampler is not None and old_logprobs is not None:
        gap = (old_logprobs - sampler).abs()
        metrics["experience/sampler_logprob_gap"] = float(
            algorithms.masked_mean(gap, experience.batch.policy_mask)
        )
    return metrics


def step_health(batch: Batch, experience: Experience, stats: UpdateStats, config: TrainConfig) -> StepHealth:
    """The numbers of this step the guards watch."""
    valid = batch.reward_valid
    kl = stats.kl_loss  # measured by an on-policy update, which computes no old log-probs beforehand
    if experience.ref_logprobs is not None and experience.old_logprobs is not None:
        estimate = algorithms.kl_estimate(
            experience.old_logprobs, experience.ref_logprobs, estimator=config.kl.estimator
        )
        kl = float(algorithms.masked_mean(estimate, batch.loss_mask))
    return StepHealth(
        reward=float(batch.scores[valid].mean()) if valid.any() else math.nan,
        response_length=float(batch.policy_mask.sum(dim=-1).float().mean()),
        entropy=stats.entropy,
        kl=kl,
        clip_fraction=stats.clip_fraction,
        missing_reward_fraction=float((~valid).float().mean()),
        skipped_steps=stats.actor_skipped_steps + (stats.critic_skipped_steps or 0),
    )


def _rollout_timings(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """``time/generation`` and ``time/retrieval``: the rollout's own breakdown (each batch counted once)."""
    batches = {id(t.timings): t.timings for t in trajectories}.values()
    return {
        "time/generation": sum(timings.generation for timings in batches),
        "time/retrieval": sum(timings.retrieval for timings in batches),
    }


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise SearchgymError(
            "the tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token first"
        )
    return int(pad)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` is cuda when a GPU is visible, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SearchgymError("system.device=cuda but no GPU is visible: set system.device=cpu (or auto)")
    return torch.device(name)
