"""The RL math as small pure functions on tensors: masked statistics, GAE, PPO/GRPO losses, KL estimators.

Every per-token tensor is ``(B, R)``: one row per trajectory, one column per response token. ``mask`` is 1 on
the tokens the policy generated and 0 on observation tokens and padding; masked positions never influence any
result here (they are skipped in the GAE recursion and excluded from every mean and loss).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k3", "low_var_kl"]
LossAggregation = Literal["token-mean", "seq-mean"]

# low_var_kl bounds the log-ratio before exponentiating and the estimate after it, so that one token whose
# probability collapsed under the policy cannot produce an inf that poisons the whole batch.
_LOG_RATIO_BOUND = 20.0
_LOW_VAR_KL_BOUND = 10.0


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``values`` where ``mask`` is 1 (masked entries may hold anything, even NaN)."""
    return torch.where(mask.bool(), values, torch.zeros_like(values)).sum()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the entries where ``mask`` is 1; 0 when the mask is empty.

    >>> masked_mean(torch.tensor([1.0, 2.0, 9.0]), torch.tensor([1, 1, 0]))
    tensor(1.5000)
    """
    count = mask.sum()
    return masked_sum(values, mask) / count.clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, *, unbiased: bool = True) -> Tensor:
    """Variance of ``values`` over the masked-in entries (Bessel-corrected when ``unbiased``)."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased and count > 1:
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``values`` to unit variance (and zero mean when ``shift_mean``) over the masked-in entries.

    Masked-out entries come back as 0.
    """
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def aggregate_loss(
    token_losses: Tensor,
    mask: Tensor,
    *,
    mode: LossAggregation,
    denominator: float | None = None,
) -> Tensor:
    """Reduce ``(B, R)`` per-token losses to a scalar.

    Args:
        token_losses: (B, R) the loss of each token.
        mask: (B, R) 1 on the tokens that count.
        mode: ``"token-mean"`` weighs every policy token equally across the batch; ``"seq-mean"`` averages
            within each sequence first, then over sequences, so long and short responses weigh the same.
        denominator: the token count (token-mean) or sequence count (seq-mean) to divide by. Gradient
            accumulation passes the whole mini-batch's count, so that summing the micro-batch losses gives
            exactly the mini-batch loss. Default: this batch's own count.
    """
    if mode == "token-mean":
        count = mask.sum() if denominator is None else denominator
        return masked_sum(token_losses, mask) / max(float(count), 1.0)
    tokens_per_sequence = mask.sum(dim=-1)
    sequence_sums = torch.where(mask.bool(), token_losses, torch.zeros_like(token_losses)).sum(dim=-1)
    sequence_means = sequence_sums / tokens_per_sequence.clamp(min=1)
    count = (tokens_per_sequence > 0).sum() if denominator is None else denominator
    return sequence_means.sum() / max(float(count), 1.0)


def last_policy_token_index(mask: Tensor) -> Tensor:
    """(B,) the position of the last 1 in each row of ``mask`` (-1 for a row without any)."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=-1).values


def token_level_rewards(
    scores: Tensor, mask: Tensor, *, kl_penalty: Tensor | None = None, kl_coef: float = 0.0
) -> Tensor:
    """(B, R) rewards: the outcome score on each row's last policy token, minus ``kl_coef`` x KL per token.

    Args:
        scores: (B,) the outcome reward of each trajectory.
        mask: (B, R) 1 on policy tokens.
        kl_penalty: (B, R) a per-token KL estimate to the reference policy, or None for no penalty.
        kl_coef: the penalty's coefficient.
    """
    rewards = torch.zeros_like(mask, dtype=scores.dtype)
    if kl_penalty is not None and kl_coef != 0.0:
        rewards = torch.where(mask.bool(), -kl_coef * kl_penalty.to(scores.dtype), rewards)
    last = last_policy_token_index(mask)
    has_tokens = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has_tokens]
    rewards[rows, last[has_tokens]] += scores[has_tokens]
    return rewards


def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over policy tokens only.

    The recursion runs right to left and jumps over masked positions: a policy token's "next" value and
    advantage are those of the next *policy* token, so retrieved observation tokens take no part in the
    value bootstrap or the advantage chain. The value after the last policy token is 0 (the episode ends).

    Args:
        rewards: (B, R) per-token rewards (see :func:`token_level_rewards`).
        values: (B, R) the critic's value estimates.
        mask: (B, R) 1 on policy tokens.
        gamma: discount per policy token.
        lam: the GAE lambda.

    Returns:
        ``(advantages, returns)``, both (B, R) and 0 on masked positions; ``returns = advantages + values``.
    """
    is_policy = mask.bool()
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[-1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        next_value = torch.where(is_policy[:, t], values[:, t], next_value)
        next_advantage = torch.where(is_policy[:, t], advantage, next_advantage)
        advantages[:, t] = torch.where(is_policy[:, t], advantage, torch.zeros_like(advantage))
    returns = torch.where(is_policy, advantages + values, torch.zeros_like(values))
    return advantages, returns


def grpo_advantages(
    scores: Tensor,
    group_ids: Sequence[str],
    *,
    valid: Tensor | None = None,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """(B,) group-normalised outcome advantages: each score minus its group's mean (divided by its std).

    Args:
        scores: (B,) outcome rewards.
        group_ids: one id per trajectory; trajectories of the same prompt share it.
        valid: (B,) False where the reward is missing: such rows get advantage 0 and stay out of their
            group's statistics.
        normalize_std: divide by the group's (Bessel-corrected) standard deviation; False gives the
            "no-std" variant (Dr. GRPO), which does not inflate tiny reward differences.
        eps: added to the std before dividing.

    A group with fewer than two valid members carries no relative signal; its advantages are 0.
    """
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.bool()
    advantages = torch.zeros_like(scores)
    rows_of_group: dict[str, list[int]] = {}
    for row, group_id in enumerate(group_ids):
        if valid[row]:
            rows_of_group.setdefault(group_id, []).append(row)
    for rows in rows_of_group.values():
        if len(rows) < 2:
            continue
        index = torch.tensor(rows, device=scores.device)
        group = scores[index]
        centred = group - group.mean()
        advantages[index] = centred / (group.std() + eps) if normalize_std else centred
    return advantages


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, *, estimator: KLEstimator) -> Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of tokens sampled from the policy.

    ``k1`` is the plain log-ratio (unbiased, high variance, can be negative); ``k3`` is Schulman's
    ``r - 1 - log r`` with ``r = ref / policy`` (unbiased, always >= 0); ``low_var_kl`` is k3 with the
    log-ratio and the estimate bounded (veRL's name for it), the safer choice as a loss.
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    log_ratio = ref_logprobs - logprobs
    if estimator == "k3":
        return torch.exp(log_ratio) - log_ratio - 1.0
    if estimator == "low_var_kl":
        log_ratio = log_ratio.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
        estimate = torch.exp(log_ratio) - log_ratio - 1.0
        return estimate.clamp(-_LOW_VAR_KL_BOUND, _LOW_VAR_KL_BOUND)
    raise ValueError(f"unknown KL estimator {estimator!r}; choose k1, k3 or low_var_kl")


@dataclass(frozen=True, slots=True)
class PolicyLoss:
    """The clipped surrogate loss and its diagnostics (all scalars).

    Attributes:
        loss: the value to minimise.
        clip_fraction: share of policy tokens whose ratio was clipped.
        approx_kl: mean of ``old - new`` log-probs, KL(old || new) to first order.
    """

    loss: Tensor
    clip_fraction: Tensor
    approx_kl: Tensor


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float,
    aggregation: LossAggregation = "token-mean",
    denominator: float | None = None,
) -> PolicyLoss:
    """PPO's clipped surrogate: ``max(-A r, -A clip(r, 1-eps, 1+eps))`` with ``r = exp(new - old)``.

    Args:
        logprobs: (B, R) log-probs of the taken tokens under the policy being updated.
        old_logprobs: (B, R) the same under the policy that sampled them.
        advantages: (B, R) per-token advantages.
        mask: (B, R) 1 on policy tokens.
        clip_eps: the clip range epsilon.
        aggregation: see :func:`aggregate_loss`.
        denominator: see :func:`aggregate_loss`.
    """
    is_policy = mask.bool()
    log_ratio = torch.where(is_policy, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    token_losses = torch.maximum(unclipped, clipped)
    loss = aggregate_loss(token_losses, mask, mode=aggregation, denominator=denominator)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(-log_ratio, mask)
    return PolicyLoss(loss=loss, clip_fraction=clip_fraction.detach(), approx_kl=approx_kl.detach())


@dataclass(frozen=True, slots=True)
class ValueLoss:
    """The clipped value loss and its diagnostics (all scalars).

    Attributes:
        loss: the value to minimise.
        clip_fraction: share of policy tokens where the clipped error was the larger one.
    """

    loss: Tensor
    clip_fraction: Tensor


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_range: float,
    aggregation: LossAggregation = "token-mean",
    denominator: float | None = None,
) -> ValueLoss:
    """``0.5 max((v - R)^2, (v_clip - R)^2)`` with ``v_clip`` kept within ``clip_range`` of the old value.

    Args:
        values: (B, R) the critic's current predictions.
        old_values: (B, R) its predictions when the batch was collected.
        returns: (B, R) the regression targets.
        mask: (B, R) 1 on policy tokens.
        clip_range: how far a prediction may move from its old value before its loss is clipped.
        aggregation: see :func:`aggregate_loss`.
        denominator: see :func:`aggregate_loss`.
    """
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    token_losses = 0.5 * torch.maximum(unclipped_error, clipped_error)
    loss = aggregate_loss(token_losses, mask, mode=aggregation, denominator=denominator)
    clip_fraction = masked_mean((clipped_error > unclipped_error).float(), mask)
    return ValueLoss(loss=loss, clip_fraction=clip_fraction.detach())
