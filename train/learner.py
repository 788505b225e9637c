"""One learner update on a batch of trajectories: experience (log-probs, values, advantages), then PPO epochs.

The update does not know how the trajectories were produced; it needs only their token ids, loss masks,
rewards and group ids. PPO and GRPO share everything except where the advantages come from and whether a
critic is fitted.
"""

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

from searchgym.policy.logprobs import sequence_logprobs
from searchgym.train import algorithms
from searchgym.train.batch import Batch, Experience
from searchgym.train.config import TrainConfig
from searchgym.train.distributed.data_parallel import SINGLE_PROCESS, DataParallel
from searchgym.train.models import TrainModels, reference_policy, response_logprobs, response_values

RecordT = TypeVar("RecordT", Batch, Experience)
logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Optimizers:
    """AdamW and the learning-rate schedule of each trained model (the critic's are None for GRPO)."""

    actor: torch.optim.Optimizer
    actor_schedule: torch.optim.lr_scheduler.LambdaLR
    critic: torch.optim.Optimizer | None = None
    critic_schedule: torch.optim.lr_scheduler.LambdaLR | None = None

    def step_schedules(self) -> None:
        """Advance the learning-rate schedules by one training step."""
        with warnings.catch_warnings():
            # The schedules follow training steps, also those whose optimizer steps were all skipped;
            # torch's warning about that order is meant for a different mistake.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.actor_schedule.step()
            if self.critic_schedule is not None:
                self.critic_schedule.step()


def lr_multiplier(
    *, total_steps: int, warmup_ratio: float, schedule: str, min_lr_ratio: float
) -> Callable[[int], float]:
    """The factor on the peak learning rate at each training step: linear warm-up, then constant or cosine."""
    warmup_steps = int(warmup_ratio * total_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def build_optimizers(models: TrainModels, config: TrainConfig) -> Optimizers:
    """AdamW with warm-up schedules for the policy and, with PPO, the critic."""
    optim = config.optim

    def adamw_with_schedule(model: nn.Module, lr: float, warmup_ratio: float) -> tuple:
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=lr,
            betas=optim.betas,
            weight_decay=optim.weight_decay,
        )
        multiplier = lr_multiplier(
            total_steps=config.total_steps,
            warmup_ratio=warmup_ratio,
            schedule=optim.schedule,
            min_lr_ratio=optim.min_lr_ratio,
        )
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)

    actor, actor_schedule = adamw_with_schedule(models.policy, optim.actor_lr, optim.actor_warmup_ratio)
    if models.critic is None:
        return Optimizers(actor=actor, actor_schedule=actor_schedule)
    critic, critic_schedule = adamw_with_schedule(models.critic, optim.critic_lr, optim.critic_warmup_ratio)
    return Optimizers(
        actor=actor, actor_schedule=actor_schedule, critic=critic, critic_schedule=critic_schedule
    )


def compute_dtype_context(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to bfloat16 when the config asks for it; weights stay float32."""
    if config.system.dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _micro_batches(record: RecordT, size: int) -> Iterator[RecordT]:
    """Consecutive slices of ``size`` episodes of a batch or an experience."""
    for start in range(0, record.size, size):
        yield record.select(torch.arange(start, min(start + size, record.size)))


@torch.no_grad()
def make_experience(
    models: TrainModels, batch: Batch, config: TrainConfig, *, data_parallel: DataParallel = SINGLE_PROCESS
) -> Experience:
    """Score ``batch`` under the current policy, the reference and the critic, and compute advantages.

    Data-parallel learners each score their share of the episodes and gather the rest, so that every
    learner computes the advantages of the whole batch.
    """
    device = batch.loss_mask.device
    size, temperature = config.batch.micro_batch_size, config.rollout.temperature
    share = data_parallel.shard(batch)
    models.policy.eval()
    with compute_dtype_context(config, device):
        old_logprobs = None
        if not config.update_is_on_policy:
            # Scores only: no entropy here, it would cost a pass over (B, R, V) probabilities for nothing.
            old_logprobs = sequence_logprobs(
                models.policy, share.sequences, temperature=temperature, micro_batch_size=size
            ).logprobs
            old_logprobs = data_parallel.gather(old_logprobs, size=batch.size)
        ref_logprobs = None
        with reference_policy(models) as reference:
            if reference is not None:
                ref_logprobs = sequence_logprobs(
                    reference, share.sequences, temperature=temperature, micro_batch_size=size
                ).logprobs
                ref_logprobs = data_parallel.gather(ref_logprobs, size=batch.size)
        values = None
        if models.critic is not None:
            models.critic.eval()
            values = torch.cat(
                [response_values(models.critic, micro) for micro in _micro_batches(share, size)]
            )
            values = data_parallel.gather(values, size=batch.size)
    advantages, returns = compute_advantages(
        batch, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, values=values, config=config
    )
    return Experience(
        batch=batch,
        old_logprobs=old_logprobs,
        advantages=advantages,
        ref_logprobs=ref_logprobs,
        values=values,
        returns=returns,
    )


def compute_advantages(
    batch: Batch,
    *,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    values: Tensor | None,
    config: TrainConfig,
) -> tuple[Tensor, Tensor | None]:
    """``(advantages, returns)``, (B, R): GAE on the critic's values (PPO) or group-normalised scores (GRPO).

    GRPO has no returns (None): there is no critic to fit.
    """
    mask = batch.loss_mask
    if values is None:
        per_episode = algorithms.grpo_advantages(
            batch.scores,
            batch.group_ids,
            valid=batch.reward_valid,
            normalize_std=config.algorithm.grpo_normalize_std,
        )
        return per_episode.unsqueeze(-1) * mask, None
    kl_penalty = None
    if ref_logprobs is not None and old_logprobs is not None and config.kl.placement == "reward":
        kl_penalty = algorithms.kl_estimate(old_logprobs, ref_logprobs, estimator=config.kl.estimator)
    rewards = algorithms.token_level_rewards(
        batch.scores, mask, kl_penalty=kl_penalty, kl_coef=config.kl.coef
    )
    advantages, returns = algorithms.gae_advantages(
        rewards, values, mask, gamma=config.algorithm.gamma, lam=config.algorithm.lam
    )
    if config.algorithm.whiten_advantages:
        advantages = algorithms.masked_whiten(advantages, mask)
    return advantages, returns


@dataclass(frozen=True, slots=True)
class UpdateStats:
    """What one update did, averaged over its micro-batches (losses: over its mini-batches).

    The critic's fields are None without a critic; ``kl_loss`` is None unless the KL is a loss term.
    """

    policy_loss: float
    entropy: float
    clip_fraction: float
    approx_kl: float
    actor_grad_norm: float
    actor_steps: int
    actor_skipped_steps: int
    kl_loss: float | None = None
    value_loss: float | None = None
    value_clip_fraction: float | None = None
    critic_grad_norm: float | None = None
    critic_steps: int | None = None
    critic_skipped_steps: int | None = None

    def to_metrics(self) -> dict[str, float]:
        """Flat ``actor/...`` and ``critic/...`` metrics, without the fields that do not apply."""
        metrics = {
            "actor/policy_loss": self.policy_loss,
            "actor/entropy": self.entropy,
            "actor/clip_fraction": self.clip_fraction,
            "actor/approx_kl": self.approx_kl,
            "actor/grad_norm": self.actor_grad_norm,
            "actor/optimizer_steps": self.actor_steps,
            "actor/skipped_steps": self.actor_skipped_steps,
            "actor/kl_loss": self.kl_loss,
            "critic/value_loss": self.value_loss,
            "critic/clip_fraction": self.value_clip_fraction,
            "critic/grad_norm": self.critic_grad_norm,
            "critic/optimizer_steps": self.critic_steps,
            "critic/skipped_steps": self.critic_skipped_steps,
        }
        return {name: float(value) for name, value in metrics.items() if value is not None}


class _WeightedMeans:
    """Running weighted means of named scalars."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}

    def add(self, name: str, value: float | Tensor, weight: float = 1.0) -> None:
        self._sums[name] = self._sums.get(name, 0.0) + float(value) * weight
        self._weights[name] = self._weights.get(name, 0.0) + weight

    def mean(self, name: str) -> float | None:
        weight = self._weights.get(name)
        if weight is None:
            return None
        return self._sums[name] / weight if weight > 0 else math.nan

    def mean_or_nan(self, name: str) -> float:
        mean = self.mean(name)
        return math.nan if mean is None else mean

    def total(self, name: str) -> int:
        return int(self._sums.get(name, 0.0))

    def average_over(self, data_parallel: DataParallel) -> None:
        """Average sums and weights over data-parallel learners: means then span all their tokens."""
        self._sums = data_parallel.average(self._sums)
        self._weights = data_parallel.average(self._weights)


def update(
    models: TrainModels,
    optimizers: Optimizers,
    experience: Experience,
    config: TrainConfig,
    *,
    data_parallel: DataParallel = SINGLE_PROCESS,
) -> UpdateStats:
    """PPO epochs over shuffled mini-batches: one optimizer step per mini-batch for the actor and the critic.

    Each mini-batch's gradient is accumulated over micro-batches with the mini-batch's own loss
    normaliser, so the step does not depend on the micro-batch size. A step whose loss or gradient is not
    finite is skipped (and counted); so is a step without any rewarded policy token. The learning-rate
    schedules advance once at the end. Data-parallel learners each compute their share of every
    mini-batch and take the same step (see :mod:`searchgym.train.distributed.data_parallel`).
    """
    means = _WeightedMeans()
    models.policy.train()
    if models.critic is not None:
        models.critic.train()
    for _ in range(config.algorithm.ppo_epochs):
        # The global torch generator drives the shuffle, so a resumed run (which restores it) repeats it.
        order = data_parallel.permutation(experience.size)
        for start in range(0, experience.size, config.mini_batch_trajectories):
            mini_batch = experience.select(order[start : start + config.mini_batch_trajectories])
            _actor_step(models, optimizers.actor, mini_batch, config, means, data_parallel)
            if models.critic is not None and optimizers.critic is not None:
                _critic_step(models.critic, optimizers.critic, mini_batch, config, means, data_parallel)
    models.policy.eval()
    if models.critic is not None:
        models.critic.eval()
    optimizers.step_schedules()
    means.average_over(data_parallel)
    return UpdateStats(
        policy_loss=means.mean_or_nan("policy_loss"),
        entropy=means.mean_or_nan("entropy"),
        clip_fraction=means.mean_or_nan("clip_fraction"),
        approx_kl=means.mean_or_nan("approx_kl"),
        actor_grad_norm=means.mean_or_nan("actor_grad_norm"),
        actor_steps=means.total("actor_steps"),
        actor_skipped_steps=means.total("actor_skipped"),
        kl_loss=means.mean("kl_loss"),
        value_loss=means.mean("value_loss"),
        value_clip_fraction=means.mean("value_clip_fraction"),
        critic_grad_norm=means.mean("critic_grad_norm"),
        critic_steps=means.total("critic_steps") if models.critic is not None else None,
        critic_skipped_steps=means.total("critic_skipped") if models.critic is not None else None,
    )


def _loss_denominator(mask: Tensor, aggregation: algorithms.LossAggregation) -> float:
    """The mini-batch's token count (token-mean) or count of sequences with tokens (seq-mean)."""
    if aggregation == "token-mean":
        return float(mask.sum())
    return float((mask.sum(dim=-1) > 0).sum())


def _actor_step(
    models: TrainModels,
    optimizer: torch.optim.Optimizer,
    mini_batch: Experience,
    config: TrainConfig,
    means: _WeightedMeans,
    data_parallel: DataParallel,
) -> None:
    algorithm, aggregation = config.algorithm, config.algorithm.loss_aggregation
    denominator = _loss_denominator(mini_batch.batch.loss_mask, aggregation)
    kl_as_loss = config.kl.placement == "loss" and mini_batch.ref_logprobs is not None

    def micro_batch_loss(micro: Experience) -> Tensor:
        mask = micro.batch.loss_mask
        logprobs, entropy = response_logprobs(
            models.policy, micro.batch, temperature=config.rollout.temperature
        )
        # On-policy (one optimizer step on this batch): the sampling policy is the one being updated.
        old_logprobs = logprobs.detach() if micro.old_logprobs is None else micro.old_logprobs
        surrogate = algorithms.clipped_policy_loss(
            logprobs,
            old_logprobs,
            micro.advantages,
            mask,
            clip_eps=algorithm.clip_eps,
            aggregation=aggregation,
            denominator=denominator,
        )
        entropy_term = algorithms.aggregate_loss(entropy, mask, mode=aggregation, denominator=denominator)
        loss = surrogate.loss - algorithm.entropy_coef * entropy_term
        tokens = float(mask.sum())
        means.add("entropy", algorithms.masked_mean(entropy.detach(), mask), tokens)
        means.add("clip_fraction", surrogate.clip_fraction, tokens)
        means.add("approx_kl", surrogate.approx_kl, tokens)
        if kl_as_loss:
            assert micro.ref_logprobs is not None  # a slice of the mini-batch's, which kl_as_loss checked
            kl = algorithms.kl_estimate(logprobs, micro.ref_logprobs, estimator=config.kl.estimator)
            kl_term = algorithms.aggregate_loss(kl, mask, mode=aggregation, denominator=denominator)
            means.add("kl_loss", algorithms.masked_mean(kl.detach(), mask), tokens)
            loss = loss + config.kl.coef * kl_term
        return loss

    outcome = _accumulate_and_step(
        models.policy, optimizer, mini_batch, micro_batch_loss, config, data_parallel
    )
    _record_outcome("actor", outcome, means)


def _critic_step(
    critic: nn.Module,
    optimizer: torch.optim.Optimizer,
    mini_batch: Experience,
    config: TrainConfig,
    means: _WeightedMeans,
    data_parallel: DataParallel,
) -> None:
    aggregation = config.algorithm.loss_aggregation
    denominator = _loss_denominator(mini_batch.batch.loss_mask, aggregation)

    def micro_batch_loss(micro: Experience) -> Tensor:
        assert micro.values is not None and micro.returns is not None  # PPO experience carries both
        # The critic may be wrapped for data parallelism; the wrapper forwards the ValueModel's call.
        values = response_values(critic, micro.batch)  # type: ignore[arg-type]
        loss = algorithms.clipped_value_loss(
            values,
            micro.values,
            micro.returns,
            micro.batch.loss_mask,
            clip_range=config.algorithm.value_clip,
            aggregation=aggregation,
            denominator=denominator,
        )
        means.add("value_clip_fraction", loss.clip_fraction, float(micro.batch.loss_mask.sum()))
        return loss.loss

    outcome = _accumulate_and_step(critic, optimizer, mini_batch, micro_batch_loss, config, data_parallel)
    _record_outcome("critic", outcome, means)


@dataclass(frozen=True, slots=True)
class _StepOutcome:
    loss: float
    grad_norm: float
    stepped: bool
    non_finite: bool


def _accumulate_and_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    mini_batch: Experience,
    micro_batch_loss: Callable[[Experience], Tensor],
    config: TrainConfig,
    data_parallel: DataParallel,
) -> _StepOutcome:
    """Backward every micro-batch of ``mini_batch``, clip, and step unless something is not finite.

    Data-parallel learners each backward their share and sum gradients before clipping; all skip the step
    when anything is not finite on any of them.
    """
    if mini_batch.batch.loss_mask.sum() == 0:
        # Every reward of this mini-batch is missing: no signal, and AdamW would still decay the weights.
        return _StepOutcome(loss=math.nan, grad_norm=math.nan, stepped=False, non_finite=False)
    device = mini_batch.batch.loss_mask.device
    total_loss, finite = 0.0, True
    for micro in _micro_batches(data_parallel.shard(mini_batch), config.batch.micro_batch_size):
        with compute_dtype_context(config, device):
            loss = micro_batch_loss(micro)
        if not torch.isfinite(loss):
            finite = False
            break
        loss.backward()
        total_loss += float(loss.detach())
    total_loss, finite = data_parallel.reduce_gradients(model, loss=total_loss, finite=finite)
    grad_norm = math.nan
    if finite:
        parameters = [p for p in model.parameters() if p.grad is not None]
        grad_norm = float(nn.utils.clip_grad_norm_(parameters, config.optim.max_grad_norm))
        finite = math.isfinite(grad_norm)
    # A zero gradient (e.g. GRPO groups whose samples all scored alike, no entropy or KL term) carries no
    # signal, yet AdamW would still move the weights along its momentum and decay them: skip the step.
    stepped = finite and grad_norm > 0
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return _StepOutcome(
        loss=total_loss if finite else math.nan, grad_norm=grad_norm, stepped=stepped, non_finite=not finite
    )


def _record_outcome(role: str, outcome: _StepOutcome, means: _WeightedMeans) -> None:
    loss_name = "policy_loss" if role == "actor" else "value_loss"
    if math.isfinite(outcome.grad_norm):  # a zero-gradient step is skipped but still reports its loss
        means.add(loss_name, outcome.loss)
        means.add(f"{role}_grad_norm", outcome.grad_norm)
    means.add(f"{role}_steps", float(outcome.stepped))
    means.add(f"{role}_skipped", float(outcome.non_finite))
    if outcome.non_finite:
        logger.warning("%s: non-finite loss or gradient; optimizer step skipped", role)
