"""The learner: one update on a batch of trajectories (experience, then PPO epochs), and what holds its state.

The update does not know how the trajectories were produced; it needs only their token ids, loss masks,
rewards and group ids. The estimators (``algorithm.name``) share everything except where the advantages
come from and whether a critic is fitted (PPO only). :class:`LocalLearner` holds the models, optimizers and
checkpoints of one process and is what :func:`searchgym.train.loop.train` drives in a single-process run;
each Ray learner actor holds one too.
"""

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from searchgym.errors import SearchgymError
from searchgym.policy.logprobs import sequence_logprobs
from searchgym.policy.models import Policy, pad_token_id
from searchgym.policy.trajectory import Trajectory
from searchgym.runtime import resolve_device, seed_everything
from searchgym.train import algorithms
from searchgym.train.batch import Batch, Experience, collate
from searchgym.train.checkpoint import CheckpointManager, TrainerState, export_hf_model
from searchgym.train.config import TrainConfig
from searchgym.train.guards import StepHealth
from searchgym.train.lora import merged_state
from searchgym.train.micro_batches import episode_lengths, plan_micro_batches
from searchgym.train.models import (
    TrainModels,
    build_train_models,
    reference_policy,
    response_logprobs,
    response_values,
)
from searchgym.train.optim import Optimizers, build_optimizers
from searchgym.train.parallel import SINGLE_PROCESS, DataParallel, TorchDataParallel
from searchgym.train.sharding import (
    LearnerStrategy,
    ShardedDataParallel,
    ShardingOptions,
    full_state_dict,
    init_single_rank_group,
    is_sharded,
    learner_mesh,
    resolve_strategy,
    shard_models,
)

RecordT = TypeVar("RecordT", Batch, Experience)
logger = logging.getLogger(__name__)


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
        if batch.staleness > 0:
            old_logprobs = behaviour_logprobs(batch)
        elif not config.update_is_on_policy:
            # Scores only: no entropy here, it would cost a pass over (B, R, V) probabilities for nothing.
            old_logprobs = sequence_logprobs(
                models.policy,
                share.sequences,
                temperature=temperature,
                micro_batch_size=size,
                scored=share.policy_mask,
                compiled=models.compiled,
            ).logprobs
            old_logprobs = data_parallel.gather(old_logprobs, size=batch.size)
        ref_logprobs = None
        with reference_policy(models) as reference:
            if reference is not None:
                ref_logprobs = sequence_logprobs(
                    reference,
                    share.sequences,
                    temperature=temperature,
                    micro_batch_size=size,
                    scored=share.policy_mask,
                    compiled=models.compiled,
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


def behaviour_logprobs(batch: Batch) -> Tensor:
    """(B, R) the sampler's log-probs: the old log-probs of a stale batch.

    The weights that sampled a stale batch are gone (the learner has updated since), so the policy ratio
    of the loss is taken against the behaviour policy as the sampler reported it.

    Raises:
        SearchgymError: the rollout gave no sampler log-probs.
    """
    if batch.sampler_logprobs is None:
        raise SearchgymError(
            f"a batch sampled {batch.staleness} update(s) ago has no sampler log-probs to serve as old "
            "log-probs: use a generation backend that reports them (hf, vllm) or set rollout.max_staleness=0"
        )
    return batch.sampler_logprobs


def compute_advantages(
    batch: Batch,
    *,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    values: Tensor | None,
    config: TrainConfig,
) -> tuple[Tensor, Tensor | None]:
    """``(advantages, returns)``, (B, R), by the estimator ``algorithm.name`` names.

    ``returns`` are the critic's regression targets: PPO only (the others fit no critic: None). Scores are
    the outcome rewards, with DAPO's overlong penalty when ``algorithm.overlong_buffer_tokens`` is set; the
    KL reward penalty (``kl.placement=reward``) is per token for ppo and reinforce_pp and summed over the
    episode for rloo.
    """
    mask, algorithm = batch.loss_mask, config.algorithm
    scores = shaped_scores(batch, config)
    kl_penalty = None
    if ref_logprobs is not None and old_logprobs is not None and config.kl.placement == "reward":
        kl_penalty = algorithms.kl_estimate(old_logprobs, ref_logprobs, estimator=config.kl.estimator)
    valid, kl_coef = batch.reward_valid, config.kl.coef
    match algorithm.name:
        case "ppo":
            if values is None:
                raise ValueError("ppo needs the critic's values (build the models with a critic)")
            rewards = algorithms.token_level_rewards(scores, mask, kl_penalty=kl_penalty, kl_coef=kl_coef)
            advantages, returns = algorithms.gae_advantages(
                rewards, values, mask, gamma=algorithm.gamma, lam=algorithm.lam
            )
            if algorithm.whiten_advantages:  # after the returns: the critic regresses on raw returns
                advantages = algorithms.masked_whiten(advantages, mask)
            return advantages, returns
        case "grpo" | "dr_grpo":
            normalize_std = algorithm.name == "grpo"
            per_episode = algorithms.grpo_advantages(
                scores, batch.group_ids, valid=valid, normalize_std=normalize_std
            )
            return per_episode.unsqueeze(-1) * mask, None
        case "rloo":
            if kl_penalty is not None:
                scores = scores - kl_coef * algorithms.masked_row_sum(kl_penalty, mask)
            per_episode = algorithms.rloo_advantages(scores, batch.group_ids, valid=valid)
            return per_episode.unsqueeze(-1) * mask, None
        case "reinforce_pp":
            rewards = algorithms.token_level_rewards(scores, mask, kl_penalty=kl_penalty, kl_coef=kl_coef)
            return algorithms.reinforce_pp_advantages(rewards, mask, gamma=algorithm.gamma), None


def shaped_scores(batch: Batch, config: TrainConfig) -> Tensor:
    """(B,) the outcome scores, minus DAPO's overlong penalty on the policy-token count when it is on."""
    buffer_tokens = config.algorithm.overlong_buffer_tokens
    if buffer_tokens == 0:
        return batch.scores
    penalty = algorithms.overlong_penalty(
        batch.policy_mask.sum(dim=-1),
        max_tokens=config.policy_token_limit,
        buffer_tokens=buffer_tokens,
        factor=config.algorithm.overlong_penalty,
    )
    return torch.where(batch.reward_valid, batch.scores + penalty.to(batch.scores.dtype), batch.scores)


@dataclass(frozen=True, slots=True)
class UpdateStats:
    """What one update did, averaged over its micro-batches (losses: over its mini-batches).

    The critic's fields are None without a critic; ``kl_loss`` is None unless the KL is a loss term. The
    sampler fields compare the sampler's log-probs with the trainer's log-probs under the sampling weights
    (the experience's old log-probs, or on an on-policy update its own first forward pass); they are None
    when the rollout recorded no sampler log-probs. ``is_weight`` is the mean truncated importance weight
    (``algorithm.truncated_is_cap``), None when the correction is off.
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
    sampler_gap_mean: float | None = None
    sampler_gap_max: float | None = None
    sampler_kl: float | None = None
    is_weight: float | None = None

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
            "sampler/logprob_gap_mean": self.sampler_gap_mean,
            "sampler/logprob_gap_max": self.sampler_gap_max,
            "sampler/kl": self.sampler_kl,
            "actor/is_weight": self.is_weight,
        }
        return {name: float(value) for name, value in metrics.items() if value is not None}


class _WeightedMeans:
    """Running weighted means of named scalars."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}
        self._maxima: dict[str, float] = {}

    def add_max(self, name: str, value: float | Tensor) -> None:
        self._maxima[name] = max(self._maxima.get(name, -math.inf), float(value))

    def maximum(self, name: str) -> float | None:
        return self._maxima.get(name)

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
        self._maxima = data_parallel.maximum(self._maxima)


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
    mini-batch and take the same step (see :mod:`searchgym.train.parallel`).
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
        sampler_gap_mean=means.mean("sampler_gap_mean"),
        sampler_gap_max=means.maximum("sampler_gap_max"),
        sampler_kl=means.mean("sampler_kl"),
        is_weight=means.mean("is_weight"),
    )


def _loss_denominator(mask: Tensor, aggregation: algorithms.LossAggregation) -> float:
    """The mini-batch's token count (token-mean) or count of sequences with tokens (the other modes)."""
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
    algorithm, aggregation = config.algorithm, config.algorithm.aggregation
    denominator = _loss_denominator(mini_batch.batch.loss_mask, aggregation)
    token_budget = config.policy_token_limit
    kl_as_loss = config.kl.placement == "loss" and mini_batch.ref_logprobs is not None
    if algorithm.truncated_is_cap is not None and mini_batch.batch.sampler_logprobs is None:
        raise SearchgymError(
            "algorithm.truncated_is_cap needs the sampler's log-probs, which this rollout did not record: "
            "use a generation backend that returns them, or set algorithm.truncated_is_cap=null"
        )

    def micro_batch_loss(micro: Experience) -> Tensor:
        mask = micro.batch.loss_mask
        logprobs, entropy = response_logprobs(
            models.policy, micro.batch, temperature=config.rollout.temperature, compiled=models.compiled
        )
        # On-policy (one optimizer step on this batch): the sampling policy is the one being updated.
        old_logprobs = logprobs.detach() if micro.old_logprobs is None else micro.old_logprobs
        token_weights = _sampler_correction(old_logprobs, micro.batch, config, means)
        surrogate = algorithms.clipped_policy_loss(
            logprobs,
            old_logprobs,
            micro.advantages,
            mask,
            clip_eps=algorithm.clip_eps,
            clip_eps_high=algorithm.clip_eps_high,
            dual_clip=algorithm.dual_clip,
            token_weights=token_weights,
            aggregation=aggregation,
            denominator=denominator,
            token_budget=token_budget,
        )
        entropy_term = algorithms.aggregate_loss(
            entropy, mask, mode=aggregation, denominator=denominator, token_budget=token_budget
        )
        loss = surrogate.loss - algorithm.entropy_coef * entropy_term
        tokens = float(mask.sum())
        means.add("entropy", algorithms.masked_mean(entropy.detach(), mask), tokens)
        means.add("clip_fraction", surrogate.clip_fraction, tokens)
        means.add("approx_kl", surrogate.approx_kl, tokens)
        if kl_as_loss:
            assert micro.ref_logprobs is not None  # a slice of the mini-batch's, which kl_as_loss checked
            kl = algorithms.kl_estimate(logprobs, micro.ref_logprobs, estimator=config.kl.estimator)
            kl_term = algorithms.aggregate_loss(
                kl, mask, mode=aggregation, denominator=denominator, token_budget=token_budget
            )
            means.add("kl_loss", algorithms.masked_mean(kl.detach(), mask), tokens)
            loss = loss + config.kl.coef * kl_term
        return loss

    trained: Experience | None = mini_batch
    surrogate_only = algorithm.entropy_coef == 0 and not kl_as_loss
    if algorithm.skip_zero_advantage and surrogate_only and mini_batch.batch.loss_mask.sum() > 0:
        trained = _episodes_with_gradient(
            mini_batch, config, data_parallel, sharded=is_sharded(models.policy)
        )
    if trained is None:
        # Every episode's advantage is 0: the zero gradient whose step _accumulate_and_step would skip.
        outcome = _StepOutcome(loss=0.0, grad_norm=0.0, stepped=False, non_finite=False)
    else:
        outcome = _accumulate_and_step(
            models.policy, optimizer, trained, micro_batch_loss, config, data_parallel
        )
    _record_outcome("actor", outcome, means)


def _episodes_with_gradient(
    mini_batch: Experience, config: TrainConfig, data_parallel: DataParallel, *, sharded: bool
) -> Experience | None:
    """The episodes of ``mini_batch`` whose clipped surrogate has a gradient; None when none has.

    An episode whose advantage is 0 on every policy token adds exactly 0 to that loss and to its gradient,
    whatever its probability ratio. Data-parallel learners each need a non-empty share of equal size (and
    sharded ones with fixed-count micro-batches whole micro-batches, their passes being collectives), so
    zero-advantage episodes top the kept ones up to that multiple.
    """
    signal = ((mini_batch.advantages != 0) & mini_batch.batch.loss_mask.bool()).any(dim=-1)
    kept = signal.nonzero().squeeze(-1)
    if kept.numel() == 0:
        return None
    quantum = data_parallel.world_size
    if sharded and config.batch.micro_batch_tokens is None:
        quantum *= config.batch.micro_batch_size
    top_up = (~signal).nonzero().squeeze(-1)[: -kept.numel() % quantum]
    return mini_batch.select(torch.cat([kept, top_up]).sort().values).trimmed()


def _sampler_correction(
    old_logprobs: Tensor, batch: Batch, config: TrainConfig, means: _WeightedMeans
) -> Tensor | None:
    """Log the sampler/trainer gap of ``batch``; return the truncated importance weights when they are on.

    ``old_logprobs`` are the trainer's log-probs under the weights that sampled the batch, so the gap is
    the sampler's numerics (and, for vLLM, its weight lag), not the update's own drift.
    """
    sampler, mask = batch.sampler_logprobs, batch.loss_mask
    if sampler is None:
        return None
    gap = algorithms.sampler_gap(old_logprobs, sampler, mask)
    tokens = float(gap.tokens)
    means.add("sampler_gap_mean", gap.mean_abs_diff, tokens)
    means.add("sampler_kl", gap.kl, tokens)
    if tokens > 0:
        means.add_max("sampler_gap_max", gap.max_abs_diff)
    cap = config.algorithm.truncated_is_cap
    if cap is None:
        return None
    weights = algorithms.truncated_importance_weights(old_logprobs, sampler, mask, cap=cap)
    means.add("is_weight", algorithms.masked_mean(weights, mask), tokens)
    return weights


def _critic_step(
    critic: nn.Module,
    optimizer: torch.optim.Optimizer,
    mini_batch: Experience,
    config: TrainConfig,
    means: _WeightedMeans,
    data_parallel: DataParallel,
) -> None:
    aggregation = config.algorithm.aggregation
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
            token_budget=config.policy_token_limit,
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
    # A sharded model's forward and backward passes are collectives: every learner runs all of its own,
    # even after a non-finite loss (the step is then skipped by all, as without sharding).
    sharded = is_sharded(model)
    for micro in _update_micro_batches(
        data_parallel.shard(mini_batch), config, data_parallel, sharded=sharded
    ):
        with compute_dtype_context(config, device):
            loss = micro_batch_loss(micro)
        if not torch.isfinite(loss):
            finite = False
            if not sharded:
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


def _update_micro_batches(
    share: Experience, config: TrainConfig, data_parallel: DataParallel, *, sharded: bool
) -> Iterator[Experience]:
    """This learner's micro-batches of a mini-batch: a fixed count of episodes, or filled to a token budget.

    With ``batch.micro_batch_tokens`` the episodes are packed by length and each micro-batch is trimmed to
    its own widths. Sharded learners' passes are collectives, so each runs as many micro-batches as the
    learner that needs the most.
    """
    budget = config.batch.micro_batch_tokens
    if budget is None:
        yield from _micro_batches(share, config.batch.micro_batch_size)
        return
    lengths = episode_lengths(share.batch.sequences)
    groups = plan_micro_batches(lengths, max_tokens=budget)
    if sharded:
        most = int(data_parallel.maximum({"micro_batches": float(len(groups))})["micro_batches"])
        groups = plan_micro_batches(lengths, max_tokens=budget, min_micro_batches=most)
    for group in groups:
        yield share.select(torch.tensor(group)).trimmed()


def _record_outcome(role: str, outcome: _StepOutcome, means: _WeightedMeans) -> None:
    loss_name = "policy_loss" if role == "actor" else "value_loss"
    if math.isfinite(outcome.grad_norm):  # a zero-gradient step is skipped but still reports its loss
        means.add(loss_name, outcome.loss)
        means.add(f"{role}_grad_norm", outcome.grad_norm)
    means.add(f"{role}_steps", float(outcome.stepped))
    means.add(f"{role}_skipped", float(outcome.non_finite))
    if outcome.non_finite:
        logger.warning("%s: non-finite loss or gradient; optimizer step skipped", role)


@dataclass(frozen=True, slots=True)
class LearnerStep:
    """What a learner reports after one training step (the same on every data-parallel learner).

    Attributes:
        metrics: ``experience/``, ``actor/``, ``critic/``, ``optim/`` and ``time/`` metrics of the step.
        health: the numbers the guards watch.
    """

    metrics: dict[str, float]
    health: StepHealth


class LocalLearner:
    """Policy, critic and reference with their optimizers, in this process; saves and loads their checkpoints.

    Seeds the run before it builds the critic's head, so that a run, its resumption and each of its
    data-parallel learners start from the same weights and random state. The models stay whole until
    :meth:`join_data_parallel`, which shards them when ``learner.strategy`` resolves to ``shard``.

    Args:
        config: the run's settings.
        policy: the initial policy (warm-started when configured); its model is trained in place.
    """

    def __init__(self, config: TrainConfig, policy: Policy) -> None:
        seed_everything(config.system.seed)
        self.config = config
        self.tokenizer = policy.tokenizer
        self.device = resolve_device(config.system.device)
        self.strategy: LearnerStrategy = resolve_strategy(
            config.learner.strategy,
            self.device,
            learners=config.ray.num_learners if config.ray.enabled else 1,
            offload=config.learner.offload,
            lora=config.model.lora.enabled,
        )
        # transformers wraps PreTrainedModel.to in functools.wraps, which mypy reads as an unbound function.
        policy.model.to(self.device)  # type: ignore[arg-type]
        self.models = build_train_models(
            policy.model,
            with_reference=config.uses_reference,
            with_critic=config.uses_critic,
            gradient_checkpointing=config.model.gradient_checkpointing,
            lora=config.model.lora,
            compile_blocks=config.model.compile,
        )
        self.optimizers = build_optimizers(self.models, config)
        self.checkpoints = CheckpointManager(
            config.run_dir / "checkpoints", keep_last=config.checkpoint.keep_last
        )
        self.data_parallel: DataParallel = SINGLE_PROCESS

    @property
    def sharded(self) -> bool:
        """Whether the models are FSDP units (saving, exporting and reading weights are then collectives)."""
        return is_sharded(self.models.policy)

    def join_data_parallel(self) -> None:
        """Become one of the learners of the initialised process group, starting from rank 0's weights.

        With the ``shard`` strategy the models are then sharded over the group and the optimizers rebuilt
        on the shards (a group of one rank shards too: it brings FSDP's bf16 compute and CPU offload).
        """
        for model in (self.models.policy, self.models.critic, self.models.reference):
            if model is not None:
                for tensor in [*model.parameters(), *model.buffers()]:
                    dist.broadcast(tensor.data, src=0)
        if self.strategy == "replicate":
            self.data_parallel = TorchDataParallel(device=self.device)
            return
        options = ShardingOptions(
            mixed_precision=self.config.system.dtype == "bfloat16", offload=self.config.learner.offload
        )
        shard_models(self.models, learner_mesh(self.device), options=options)
        self.optimizers = build_optimizers(self.models, self.config)
        self.data_parallel = ShardedDataParallel(device=self.device)

    def step(self, trajectories: Sequence[Trajectory]) -> LearnerStep:
        """Experience and update on the step's episodes (this learner's share of them, in a group)."""
        started = time.perf_counter()
        batch = collate(trajectories, pad_token_id=pad_token_id(self.tokenizer), device=self.device)
        experience = make_experience(self.models, batch, self.config, data_parallel=self.data_parallel)
        scored = time.perf_counter()
        stats = update(
            self.models, self.optimizers, experience, self.config, data_parallel=self.data_parallel
        )
        metrics = experience_metrics(experience, self.config) | stats.to_metrics()
        metrics |= {
            "optim/actor_lr": self.optimizers.actor.param_groups[0]["lr"],
            "time/experience": scored - started,
            "time/update": time.perf_counter() - scored,
        }
        return LearnerStep(metrics=metrics, health=step_health(batch, experience, stats, self.config))

    def policy_state(self) -> dict[str, Tensor]:
        """The policy's weights under the base model's names, LoRA adapters merged in (read them only).

        Sharded, every learner must call it: the whole weights are gathered from the shards.
        """
        if self.sharded:
            return full_state_dict(self.models.policy)
        return merged_state(self.models.policy)

    def save(self, state: TrainerState) -> Path:
        """Write a checkpoint of models, optimizers and random state beside ``state`` (sharded: all call)."""
        return self.checkpoints.save(models=self.models, optimizers=self.optimizers, state=state)

    def load(self, path: Path, *, restore_rng: bool) -> TrainerState:
        """Load a checkpoint's weights and optimizer states (and random generators with ``restore_rng``)."""
        return self.checkpoints.load(
            path, models=self.models, optimizers=self.optimizers, restore_rng=restore_rng
        )

    def export(self, target: Path) -> Path:
        """Write the policy as a Hugging Face model folder (sharded: every learner calls, rank 0 writes)."""
        if not self.sharded:
            return export_hf_model(self.models.policy, self.tokenizer, target)
        state = full_state_dict(self.models.policy)
        if dist.get_rank() == 0:
            export_hf_model(self.models.policy, self.tokenizer, target, state_dict=state)
        dist.barrier()
        return target


def single_process_learner(config: TrainConfig, policy: Policy) -> LocalLearner:
    """The learner of a run without peers; with the ``shard`` strategy, sharded over a group of its own."""
    learner = LocalLearner(config, policy)
    if learner.strategy == "shard":
        init_single_rank_group(learner.device)
        learner.join_data_parallel()
    return learner


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
