"""The RL math as small pure functions on tensors: masked statistics, advantage estimators, losses, KL.

The estimators (PPO's GAE, GRPO, Dr. GRPO, RLOO, REINFORCE++) and DAPO's pieces (decoupled clip range,
dynamic sampling's group filter, overlong reward shaping) live here; :mod:`searchgym.train.learner` picks
one by ``algorithm.name``.

Every per-token tensor is ``(B, R)``: one row per trajectory, one column per response token. ``mask`` is 1 on
the tokens the policy generated and 0 on observation tokens and padding; masked positions never influence any
result here (they are skipped in the GAE recursion and excluded from every mean and loss).
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k3", "low_var_kl"]
LossAggregation = Literal["token-mean", "seq-mean", "seq-mean-token-sum-norm"]

# low_var_kl bounds the log-ratio before exponentiating and the estimate after it, so that one token whose
# probability collapsed under the policy cannot produce an inf that poisons the whole batch.
_LOG_RATIO_BOUND = 20.0
_LOW_VAR_KL_BOUND = 10.0
# The policy ratio's log is clamped to this before exponentiating (as veRL does): a token whose probability
# moved by e^20 already has a clipped loss, and exp of an unbounded log-ratio gives inf and NaN gradients.
POLICY_LOG_RATIO_CLAMP = 20.0


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``values`` where ``mask`` is 1 (masked entries may hold anything, even NaN)."""
    return torch.where(mask.bool(), values, torch.zeros_like(values)).sum()


def masked_row_sum(values: Tensor, mask: Tensor) -> Tensor:
    """(B,) the sum of each row of ``(B, R)`` ``values`` where ``mask`` is 1."""
    return torch.where(mask.bool(), values, torch.zeros_like(values)).sum(dim=-1)


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
    token_budget: int | None = None,
) -> Tensor:
    """Reduce ``(B, R)`` per-token losses to a scalar.

    Args:
        token_losses: (B, R) the loss of each token.
        mask: (B, R) 1 on the tokens that count.
        mode: ``"token-mean"`` weighs every policy token equally across the batch; ``"seq-mean"`` averages
            within each sequence first, then over sequences, so long and short responses weigh the same;
            ``"seq-mean-token-sum-norm"`` (Dr. GRPO) sums each sequence's tokens and divides by the constant
            ``token_budget``, then averages over sequences: no per-length normalisation, so a long wrong
            answer is not penalised less per token than a short one.
        denominator: the token count (token-mean) or sequence count (the other modes) to divide by.
            Gradient accumulation passes the whole mini-batch's count, so that summing the micro-batch
            losses gives exactly the mini-batch loss. Default: this batch's own count. Only sequences with
            at least one token count.
        token_budget: the constant per-sequence denominator of ``seq-mean-token-sum-norm``.
    """
    if mode == "token-mean":
        count = mask.sum() if denominator is None else denominator
        return masked_sum(token_losses, mask) / max(float(count), 1.0)
    tokens_per_sequence = mask.sum(dim=-1)
    sequence_sums = torch.where(mask.bool(), token_losses, torch.zeros_like(token_losses)).sum(dim=-1)
    count = (tokens_per_sequence > 0).sum() if denominator is None else denominator
    if mode == "seq-mean":
        sequence_means = sequence_sums / tokens_per_sequence.clamp(min=1)
        return sequence_means.sum() / max(float(count), 1.0)
    if mode == "seq-mean-token-sum-norm":
        if token_budget is None or token_budget < 1:
            raise ValueError(f"seq-mean-token-sum-norm needs a positive token_budget, got {token_budget}")
        return sequence_sums.sum() / (max(float(count), 1.0) * token_budget)
    raise ValueError(f"unknown loss aggregation {mode!r}")


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
    advantages = torch.zeros_like(scores)
    for index, group in _groups_with_a_baseline(scores, group_ids, valid):
        centred = group - group.mean()
        advantages[index] = centred / (group.std() + eps) if normalize_std else centred
    return advantages


def rloo_advantages(scores: Tensor, group_ids: Sequence[str], *, valid: Tensor | None = None) -> Tensor:
    """(B,) RLOO: each score minus the mean of the *other* valid scores of its group (leave-one-out).

    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs". The baseline excludes the sample itself, so it is independent of the sample and the
    estimate unbiased; it equals ``G / (G - 1)`` times the score minus the group mean.

    Args:
        scores: (B,) outcome rewards.
        group_ids: one id per trajectory; trajectories of the same prompt share it.
        valid: (B,) False where the reward is missing: such rows get 0 and are no one's baseline.

    A group with fewer than two valid members has no baseline; its advantages are 0.
    """
    advantages = torch.zeros_like(scores)
    for index, group in _groups_with_a_baseline(scores, group_ids, valid):
        others_mean = (group.sum() - group) / (len(group) - 1)
        advantages[index] = group - others_mean
    return advantages


def discounted_returns(rewards: Tensor, mask: Tensor, *, gamma: float) -> Tensor:
    """(B, R) the discounted sum of the rewards of this and every later policy token; 0 off the mask.

    Observation tokens are jumped over: they neither add reward nor count as a discount step.
    """
    is_policy = mask.bool()
    running = torch.zeros_like(rewards[:, 0])
    returns = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[-1])):
        running = torch.where(is_policy[:, t], rewards[:, t] + gamma * running, running)
        returns[:, t] = torch.where(is_policy[:, t], running, torch.zeros_like(running))
    return returns


def reinforce_pp_advantages(rewards: Tensor, mask: Tensor, *, gamma: float) -> Tensor:
    """(B, R) REINFORCE++: token-level returns, normalised over the whole batch's policy tokens.

    Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models". No critic
    and no group: the per-token KL penalty sits in ``rewards`` (see :func:`token_level_rewards`), and the
    batch-level mean and std replace the critic's or the group's baseline.

    Args:
        rewards: (B, R) per-token rewards (outcome on the last policy token, minus the KL penalty).
        mask: (B, R) 1 on policy tokens of episodes with a reward (only these enter the statistics).
        gamma: discount per policy token.
    """
    return masked_whiten(discounted_returns(rewards, mask, gamma=gamma), mask)


def overlong_penalty(lengths: Tensor, *, max_tokens: int, buffer_tokens: int, factor: float = 1.0) -> Tensor:
    """(B,) DAPO's soft overlong punishment: 0 up to ``max_tokens - buffer_tokens``, then linear to -factor.

    Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", eq. 13: within the
    last ``buffer_tokens`` before the limit the penalty grows linearly from 0 to ``-factor``; at and
    beyond the limit it is ``-factor``. It is added to the outcome reward.

    >>> overlong_penalty(torch.tensor([5, 7, 8, 10]), max_tokens=8, buffer_tokens=4)
    tensor([-0.2500, -0.7500, -1.0000, -1.0000])
    """
    if not 0 < buffer_tokens <= max_tokens:
        raise ValueError(f"buffer_tokens must be in (0, max_tokens={max_tokens}], got {buffer_tokens}")
    excess = (lengths.float() - (max_tokens - buffer_tokens)).clamp(min=0.0, max=float(buffer_tokens))
    return -factor * excess / buffer_tokens


def informative_groups(scores: Tensor, group_ids: Sequence[str], *, valid: Tensor | None = None) -> Tensor:
    """(B,) True on the rows of groups whose valid rewards are not all equal (DAPO's dynamic sampling).

    A group whose samples all scored alike gives a group-relative estimator zero advantage everywhere:
    DAPO drops it and samples more prompts. A group with fewer than two valid rewards is dropped too.
    """
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.bool()
    keep = torch.zeros_like(valid)
    for group_id, rows in _valid_rows_of_groups(group_ids, valid).items():
        group = scores[torch.tensor(rows, device=scores.device)]
        if len(rows) >= 2 and bool((group != group[0]).any()):
            keep |= torch.tensor([g == group_id for g in group_ids], device=scores.device)
    return keep


def _groups_with_a_baseline(
    scores: Tensor, group_ids: Sequence[str], valid: Tensor | None
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(rows, scores)`` of each group of two or more valid members (the others carry no signal)."""
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.bool()
    for rows in _valid_rows_of_groups(group_ids, valid).values():
        if len(rows) >= 2:
            index = torch.tensor(rows, device=scores.device)
            yield index, scores[index]


def _valid_rows_of_groups(group_ids: Sequence[str], valid: Tensor) -> dict[str, list[int]]:
    """The valid rows of each group, in first-seen order."""
    rows_of_group: dict[str, list[int]] = {}
    for row, group_id in enumerate(group_ids):
        if valid[row]:
            rows_of_group.setdefault(group_id, []).append(row)
    return rows_of_group


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
        clip_fraction: share of policy tokens whose ratio was clipped (by the clip range or the dual clip).
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
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    token_weights: Tensor | None = None,
    aggregation: LossAggregation = "token-mean",
    denominator: float | None = None,
    token_budget: int | None = None,
) -> PolicyLoss:
    """PPO's clipped surrogate: ``max(-A r, -A clip(r, 1-eps_low, 1+eps_high))`` with ``r = exp(new - old)``.

    The log-ratio is clamped to +-:data:`POLICY_LOG_RATIO_CLAMP` first, so that no ratio is infinite.

    Args:
        logprobs: (B, R) log-probs of the taken tokens under the policy being updated.
        old_logprobs: (B, R) the same under the policy that sampled them.
        advantages: (B, R) per-token advantages.
        mask: (B, R) 1 on policy tokens.
        clip_eps: the clip range below 1 (and above, unless ``clip_eps_high`` is given).
        clip_eps_high: the clip range above 1 (DAPO's "clip-higher", e.g. 0.28 with ``clip_eps=0.2``).
        dual_clip: the dual-clip constant ``c > 1`` (Ye et al. 2020, "Mastering Complex Control in MOBA
            Games with Deep RL"): on negative advantages the loss is at most ``-c A``, so a token whose
            ratio exploded cannot dominate the batch. None: no dual clip.
        token_weights: (B, R) constant per-token factors on the loss (the truncated importance weights of
            :func:`truncated_importance_weights`), or None.
        aggregation: see :func:`aggregate_loss`.
        denominator: see :func:`aggregate_loss`.
        token_budget: see :func:`aggregate_loss`.
    """
    is_policy = mask.bool()
    log_ratio = torch.where(is_policy, logprobs - old_logprobs, torch.zeros_like(logprobs))
    log_ratio = log_ratio.clamp(-POLICY_LOG_RATIO_CLAMP, POLICY_LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    token_losses = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual_clipped = (advantages < 0) & (token_losses > bound)
        token_losses = torch.where(advantages < 0, torch.minimum(token_losses, bound), token_losses)
        was_clipped = was_clipped | dual_clipped
    if token_weights is not None:
        token_losses = token_losses * token_weights.detach()
    loss = aggregate_loss(
        token_losses, mask, mode=aggregation, denominator=denominator, token_budget=token_budget
    )
    clip_fraction = masked_mean(was_clipped.float(), mask)
    approx_kl = masked_mean(-log_ratio, mask)
    return PolicyLoss(loss=loss, clip_fraction=clip_fraction.detach(), approx_kl=approx_kl.detach())


def truncated_importance_weights(
    old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, *, cap: float
) -> Tensor:
    """(B, R) ``min(pi_trainer / pi_sampler, cap)`` per policy token (1 off the mask), with no gradient.

    Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training": the
    sampler (vLLM, other kernels, bf16, lagging weights) is not the policy the trainer computes, so the
    tokens were drawn from a different distribution; weighting each token's loss by the importance ratio
    of the trainer's old policy to the sampler, truncated at ``cap``, corrects for it with bounded variance.

    Args:
        old_logprobs: (B, R) the trainer's log-probs of the sampled tokens under the sampling weights.
        sampler_logprobs: (B, R) the sampler's log-probs of the same tokens.
        mask: (B, R) 1 on policy tokens.
        cap: the truncation ``C`` (Yao et al. use 2).
    """
    log_ratio = (old_logprobs.detach() - sampler_logprobs).clamp(max=POLICY_LOG_RATIO_CLAMP)
    weights = torch.exp(log_ratio).clamp(max=cap)
    return torch.where(mask.bool(), weights, torch.ones_like(weights))


@dataclass(frozen=True, slots=True)
class SamplerGap:
    """How far the sampler's log-probs are from the trainer's, over policy tokens (all scalars).

    Attributes:
        mean_abs_diff: mean of ``|trainer - sampler|``.
        max_abs_diff: the largest ``|trainer - sampler|`` (0 without tokens).
        kl: KL(sampler || trainer) estimated with k3 on the sampler's own samples (>= 0).
        tokens: how many tokens were compared.
    """

    mean_abs_diff: Tensor
    max_abs_diff: Tensor
    kl: Tensor
    tokens: Tensor


def sampler_gap(trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> SamplerGap:
    """Compare the trainer's and the sampler's ``(B, R)`` log-probs where ``mask`` is 1."""
    is_policy = mask.bool()
    trainer, sampler = trainer_logprobs.detach().float(), sampler_logprobs.float()
    abs_diff = torch.where(is_policy, (trainer - sampler).abs(), torch.zeros_like(trainer))
    kl = kl_estimate(sampler, trainer, estimator="k3")
    return SamplerGap(
        mean_abs_diff=masked_mean(abs_diff, mask),
        max_abs_diff=abs_diff.max() if abs_diff.numel() else abs_diff.sum(),
        kl=masked_mean(kl, mask),
        tokens=mask.sum(),
    )


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
    token_budget: int | None = None,
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
        token_budget: see :func:`aggregate_loss`.
    """
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    token_losses = 0.5 * torch.maximum(unclipped_error, clipped_error)
    loss = aggregate_loss(
        token_losses, mask, mode=aggregation, denominator=denominator, token_budget=token_budget
    )
    clip_fraction = masked_mean((clipped_error > unclipped_error).float(), mask)
    return ValueLoss(loss=loss, clip_fraction=clip_fraction.detach())
