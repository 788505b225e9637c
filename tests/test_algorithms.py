"""The RL math against tensors computed by hand."""

import math

import pytest
import torch

from searchgym.train.algorithms import (
    aggregate_loss,
    clipped_policy_loss,
    clipped_value_loss,
    discounted_returns,
    gae_advantages,
    grpo_advantages,
    informative_groups,
    kl_estimate,
    last_policy_token_index,
    masked_mean,
    masked_var,
    masked_whiten,
    overlong_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
    sampler_gap,
    token_level_rewards,
    truncated_importance_weights,
)

# One trajectory: two policy tokens, two observation tokens, one policy token.
MASK = torch.tensor([[1, 1, 0, 0, 1]])


def close(actual: torch.Tensor, expected: list | float) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=1e-5, rtol=1e-5)


def test_masked_statistics_ignore_masked_entries_even_nan() -> None:
    values = torch.tensor([1.0, 2.0, 3.0, float("nan")])
    mask = torch.tensor([1, 1, 1, 0])
    close(masked_mean(values, mask), 2.0)
    close(masked_var(values, mask), 1.0)  # Bessel-corrected: ((1 + 0 + 1) / 2)
    close(masked_var(values, mask, unbiased=False), 2.0 / 3.0)
    close(masked_whiten(values, mask), [-1.0, 0.0, 1.0, 0.0])
    close(masked_whiten(values, mask, shift_mean=False), [1.0, 2.0, 3.0, 0.0])


def test_masked_mean_of_empty_mask_is_zero() -> None:
    close(masked_mean(torch.tensor([5.0]), torch.tensor([0])), 0.0)


def test_token_level_rewards_put_score_on_last_policy_token_and_kl_on_policy_tokens() -> None:
    kl = torch.tensor([[0.1, 0.2, 5.0, 5.0, 0.3]])
    rewards = token_level_rewards(torch.tensor([1.0]), MASK, kl_penalty=kl, kl_coef=0.5)
    close(rewards, [[-0.05, -0.1, 0.0, 0.0, 0.85]])


def test_last_policy_token_index_handles_rows_without_policy_tokens() -> None:
    close(last_policy_token_index(torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 0]])), [1, -1, 1])


def test_gae_jumps_over_observation_tokens() -> None:
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 9.0, 9.0, 0.8]])
    advantages, returns = gae_advantages(rewards, values, MASK, gamma=0.9, lam=0.5)
    # t=4: 1 - 0.8 = 0.2; t=1: 0.9*0.8 - 0.6 + 0.45*0.2 = 0.21; t=0: 0.9*0.6 - 0.5 + 0.45*0.21 = 0.1345
    close(advantages, [[0.1345, 0.21, 0.0, 0.0, 0.2]])
    close(returns, [[0.6345, 0.81, 0.0, 0.0, 1.0]])


def test_gae_with_gamma_and_lambda_one_returns_the_outcome_everywhere() -> None:
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 9.0, 9.0, 0.8]])
    advantages, returns = gae_advantages(rewards, values, MASK, gamma=1.0, lam=1.0)
    close(advantages, [[0.5, 0.4, 0.0, 0.0, 0.2]])
    close(returns, [[1.0, 1.0, 0.0, 0.0, 1.0]])


def test_grpo_advantages_normalise_within_groups() -> None:
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 2.0])
    groups = ["a", "a", "b", "b", "c", "a"]
    # a: (1, 0, 2), mean 1, std 1; b: equal scores, no signal; c: alone, no signal.
    close(grpo_advantages(scores, groups), [0.0, -1.0, 0.0, 0.0, 0.0, 1.0])
    close(grpo_advantages(scores, groups, normalize_std=False), [0.0, -1.0, 0.0, 0.0, 0.0, 1.0])
    doubled = grpo_advantages(scores * 2, groups, normalize_std=False)
    close(doubled, [0.0, -2.0, 0.0, 0.0, 0.0, 2.0])


def test_grpo_advantages_leave_missing_rewards_out_of_group_statistics() -> None:
    scores = torch.tensor([1.0, 0.0, 2.0])
    valid = torch.tensor([True, True, False])
    half_sqrt2 = math.sqrt(0.5)
    close(grpo_advantages(scores, ["a", "a", "a"], valid=valid), [half_sqrt2, -half_sqrt2, 0.0])


def test_kl_estimators() -> None:
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    close(kl_estimate(logp, ref, estimator="k1"), [math.log(2.0)])
    close(kl_estimate(logp, ref, estimator="k3"), [0.5 - 1.0 + math.log(2.0)])
    close(kl_estimate(logp, ref, estimator="low_var_kl"), [0.5 - 1.0 + math.log(2.0)])
    collapsed = kl_estimate(torch.tensor([-100.0]), torch.tensor([0.0]), estimator="low_var_kl")
    close(collapsed, [10.0])
    close(kl_estimate(torch.tensor([-30.0]), torch.tensor([0.0]), estimator="k3"), [math.exp(30.0) - 31.0])
    with pytest.raises(ValueError, match="k1, k3 or low_var_kl"):
        kl_estimate(logp, ref, estimator="k9")  # type: ignore[arg-type]


def policy_case() -> dict[str, torch.Tensor]:
    # Row 0: ratios 1.5 (A=1) and 0.5 (A=-1), both clipped, then a masked token; row 1: ratio 1 (A=2).
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 7.0], [1.0, 3.0, 3.0]]))
    return {
        "logprobs": logprobs,
        "old_logprobs": torch.zeros(2, 3),
        "advantages": torch.tensor([[1.0, -1.0, 5.0], [2.0, 0.0, 0.0]]),
        "mask": torch.tensor([[1, 1, 0], [1, 0, 0]]),
    }


def test_clipped_policy_loss_token_mean_and_seq_mean() -> None:
    case = policy_case()
    token_mean = clipped_policy_loss(**case, clip_eps=0.2)
    # token losses: max(-1.5, -1.2) = -1.2; max(0.5, 0.8) = 0.8; -2.0
    close(token_mean.loss, (-1.2 + 0.8 - 2.0) / 3)
    close(token_mean.clip_fraction, 2 / 3)
    close(token_mean.approx_kl, (-math.log(1.5) - math.log(0.5)) / 3)
    seq_mean = clipped_policy_loss(**case, clip_eps=0.2, aggregation="seq-mean")
    close(seq_mean.loss, ((-1.2 + 0.8) / 2 - 2.0) / 2)


def test_aggregation_with_the_mini_batch_denominator_sums_over_micro_batches() -> None:
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 6.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    for mode, denominator in (("token-mean", 6), ("seq-mean", 3)):
        whole = aggregate_loss(losses, mask, mode=mode)
        parts = sum(
            aggregate_loss(losses[rows], mask[rows], mode=mode, denominator=denominator)
            for rows in (slice(0, 1), slice(1, 3))
        )
        close(parts, whole.item())
    close(aggregate_loss(losses, mask, mode="seq-mean"), (2.0 + 4.0 + 5.5) / 3)


def test_clipped_value_loss() -> None:
    loss = clipped_value_loss(
        values=torch.tensor([[1.0, 0.0, 50.0]]),
        old_values=torch.tensor([[0.5, 0.5, 0.0]]),
        returns=torch.tensor([[2.0, 0.0, 0.0]]),
        mask=torch.tensor([[1, 1, 0]]),
        clip_range=0.2,
    )
    # clipped predictions 0.7 and 0.3: 0.5 * 1.69 and 0.5 * 0.09
    close(loss.loss, (0.845 + 0.045) / 2)
    close(loss.clip_fraction, 1.0)


def test_observation_tokens_change_neither_advantages_nor_policy_loss() -> None:
    generator = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0], [1, 0, 0, 1, 1, 0, 0]])
    observation = ~mask.bool()
    values = torch.randn(2, 7, generator=generator)
    logprobs = -torch.rand(2, 7, generator=generator)
    old_logprobs = -torch.rand(2, 7, generator=generator)
    kl = torch.rand(2, 7, generator=generator)
    scores = torch.tensor([1.0, 0.0])

    def advantages_and_loss(values, logprobs, kl):
        rewards = token_level_rewards(scores, mask, kl_penalty=kl, kl_coef=0.1)
        advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
        advantages = masked_whiten(advantages, mask)
        loss = clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2)
        value_loss = clipped_value_loss(values, values.detach(), returns, mask, clip_range=0.5)
        return advantages, returns, loss.loss, value_loss.loss

    reference = advantages_and_loss(values, logprobs, kl)
    noise = torch.randn(2, 7, generator=generator) * 100
    changed = advantages_and_loss(
        values + noise * observation, logprobs + noise * observation, kl + noise.abs() * observation
    )
    for expected, actual in zip(reference, changed, strict=True):
        torch.testing.assert_close(actual, expected)
    assert reference[2].abs() > 0  # the comparison is not between two zeros


# A ragged batch: episodes of 4, 6 and 0 policy tokens, right-padded to 6 columns.
RAGGED = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 1, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0]])


def test_token_level_rewards_find_each_rows_own_last_policy_token() -> None:
    rewards = token_level_rewards(torch.tensor([1.0, 2.0, 3.0]), RAGGED)
    # Row 0 ends at column 3 (not 5, the last padded column); row 2 has no policy token: no reward at all.
    close(rewards, [[0, 0, 0, 1.0, 0, 0], [0, 0, 0, 0, 0, 2.0], [0, 0, 0, 0, 0, 0]])


def test_rloo_baseline_is_the_mean_of_the_other_samples() -> None:
    scores = torch.tensor([1.0, 0.0, 2.0, 5.0, 1.0, 3.0])
    groups = ["a", "a", "a", "b", "c", "c"]
    # a: 1 - (0+2)/2 = 0; 0 - (1+2)/2 = -1.5; 2 - (1+0)/2 = 1.5. b alone: 0. c: 1 - 3 = -2; 3 - 1 = 2.
    close(rloo_advantages(scores, groups), [0.0, -1.5, 1.5, 0.0, -2.0, 2.0])
    # A missing reward is nobody's baseline: a becomes (1, 0): 1 - 0 = 1, 0 - 1 = -1.
    valid = torch.tensor([True, True, False, True, True, True])
    close(rloo_advantages(scores, groups, valid=valid), [1.0, -1.0, 0.0, 0.0, -2.0, 2.0])


def test_discounted_returns_jump_over_observation_tokens() -> None:
    rewards = torch.tensor([[0.1, 0.2, 9.0, 9.0, 1.0]])
    # t=4: 1; t=1: 0.2 + 0.5*1 = 0.7 (the observations neither pay nor discount); t=0: 0.1 + 0.5*0.7 = 0.45
    close(discounted_returns(rewards, MASK, gamma=0.5), [[0.45, 0.7, 0.0, 0.0, 1.0]])


def test_reinforce_pp_normalises_returns_over_the_whole_batch() -> None:
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    rewards = token_level_rewards(torch.tensor([1.0, 0.0, 7.0]), mask)  # row 2: a missing reward
    # Returns 1, 1, 1 and 0, 0 over five tokens: mean 0.6, unbiased variance (3*0.16 + 2*0.36)/4 = 0.3.
    std = math.sqrt(0.3)
    expected = [[0.4 / std] * 3, [-0.6 / std, -0.6 / std, 0.0], [0.0, 0.0, 0.0]]
    close(reinforce_pp_advantages(rewards, mask, gamma=1.0), expected)


def test_reinforce_pp_puts_the_kl_penalty_on_each_token() -> None:
    mask = torch.tensor([[1, 1], [1, 1]])
    kl = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    rewards = token_level_rewards(torch.tensor([0.0, 0.0]), mask, kl_penalty=kl, kl_coef=0.5)
    # Returns: row 0 -0.5, 0; row 1 0, 0. Mean -0.125, unbiased variance (0.375^2 + 3*0.125^2)/3 = 1/16.
    close(reinforce_pp_advantages(rewards, mask, gamma=1.0), [[-1.5, 0.5], [0.5, 0.5]])


def test_dr_grpo_aggregation_divides_by_a_constant() -> None:
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 6.0, 0.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]])
    # Sums 6, 4, 11 over three sequences with tokens (the empty row does not count), budget 4.
    close(aggregate_loss(losses, mask, mode="seq-mean-token-sum-norm", token_budget=4), 21 / (3 * 4))
    split = sum(
        aggregate_loss(
            losses[rows], mask[rows], mode="seq-mean-token-sum-norm", denominator=3, token_budget=4
        )
        for rows in (slice(0, 1), slice(1, 4))
    )
    close(split, 21 / 12)
    with pytest.raises(ValueError, match="token_budget"):
        aggregate_loss(losses, mask, mode="seq-mean-token-sum-norm")


def test_denominators_count_neither_padding_nor_empty_rows() -> None:
    losses = torch.tensor([[2.0, 4.0, 8.0], [6.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    close(aggregate_loss(losses, mask, mode="token-mean"), (2 + 4 + 6) / 3)
    close(aggregate_loss(losses, mask, mode="seq-mean"), (3 + 6) / 2)


def test_clip_higher_widens_the_range_above_one_only() -> None:
    logprobs = torch.log(torch.tensor([[1.25, 0.75]]))
    case = {
        "old_logprobs": torch.zeros(1, 2),
        "advantages": torch.tensor([[1.0, -1.0]]),
        "mask": torch.ones(1, 2),
    }
    symmetric = clipped_policy_loss(logprobs, **case, clip_eps=0.2)
    # 1.25 is clipped to 1.2 (A=1: max(-1.25, -1.2) = -1.2); 0.75 to 0.8 (A=-1: max(0.75, 0.8) = 0.8).
    close(symmetric.loss, (-1.2 + 0.8) / 2)
    decoupled = clipped_policy_loss(logprobs, **case, clip_eps=0.2, clip_eps_high=0.28)
    # 1.25 < 1.28 now stays; the low side is unchanged.
    close(decoupled.loss, (-1.25 + 0.8) / 2)
    close(decoupled.clip_fraction, 0.5)


def test_dual_clip_bounds_the_loss_of_negative_advantages() -> None:
    logprobs = torch.log(torch.tensor([[5.0, 5.0, 0.5]]))
    case = {
        "old_logprobs": torch.zeros(1, 3),
        "advantages": torch.tensor([[-1.0, 1.0, -2.0]]),
        "mask": torch.ones(1, 3),
    }
    plain = clipped_policy_loss(logprobs, **case, clip_eps=0.2)
    # A=-1, r=5: max(5, 1.2) = 5; A=1, r=5: max(-5, -1.2) = -1.2; A=-2, r=0.5: max(1, 1.6) = 1.6.
    close(plain.loss, (5.0 - 1.2 + 1.6) / 3)
    dual = clipped_policy_loss(logprobs, **case, clip_eps=0.2, dual_clip=3.0)
    # Only the first token exceeds -c A = 3; positive advantages are never dual-clipped.
    close(dual.loss, (3.0 - 1.2 + 1.6) / 3)
    close(dual.clip_fraction, 1.0)


def test_an_exploded_ratio_gives_a_finite_loss_and_gradient() -> None:
    logprobs = torch.tensor([[100.0, -100.0]], requires_grad=True)
    loss = clipped_policy_loss(
        logprobs, torch.zeros(1, 2), torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2), clip_eps=0.2
    )
    # The log-ratio is clamped to +-20: the first token's loss is e^20, not inf.
    close(loss.loss, (math.exp(20.0) - 0.8) / 2)
    loss.loss.backward()
    assert logprobs.grad is not None and torch.isfinite(logprobs.grad).all()


def test_truncated_importance_weights() -> None:
    old = torch.log(torch.tensor([[0.3, 0.1, 0.5, 0.9]]))
    sampler = torch.log(torch.tensor([[0.1, 0.2, 0.5, 0.01]]))
    mask = torch.tensor([[1, 1, 1, 0]])
    # trainer / sampler: 3 -> capped at 2; 0.5; 1; masked -> 1.
    weights = truncated_importance_weights(old, sampler, mask, cap=2.0)
    close(weights, [[2.0, 0.5, 1.0, 1.0]])
    loss = clipped_policy_loss(
        old, old, torch.tensor([[1.0, 1.0, 1.0, 1.0]]), mask, clip_eps=0.2, token_weights=weights
    )
    close(loss.loss, -(2.0 + 0.5 + 1.0) / 3)


def test_sampler_gap() -> None:
    trainer = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, 0.0]])
    sampler = torch.tensor([[-1.1, -2.0, -9.0], [-0.2, -4.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    gap = sampler_gap(trainer, sampler, mask)
    # Differences (trainer - sampler) on the mask: 0.1, 0, -0.3.
    close(gap.mean_abs_diff, 0.4 / 3)
    close(gap.max_abs_diff, 0.3)
    k3 = [math.exp(d) - d - 1.0 for d in (0.1, 0.0, -0.3)]  # r = trainer / sampler
    close(gap.kl, sum(k3) / 3)
    assert int(gap.tokens) == 3


def test_overlong_penalty() -> None:
    lengths = torch.tensor([0, 12, 13, 14, 16, 30])
    # Limit 16, buffer 4: free up to 12, then -1/4 per token, -1 at and beyond the limit (times the factor).
    close(overlong_penalty(lengths, max_tokens=16, buffer_tokens=4), [0, 0, -0.25, -0.5, -1.0, -1.0])
    close(overlong_penalty(lengths, max_tokens=16, buffer_tokens=4, factor=0.5)[2], -0.125)
    with pytest.raises(ValueError, match="buffer_tokens"):
        overlong_penalty(lengths, max_tokens=4, buffer_tokens=5)


def test_informative_groups_drop_groups_of_equal_rewards() -> None:
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 5.0, 1.0, 0.0])
    groups = ["a", "a", "b", "b", "c", "c", "d", "e", "e"]
    valid = torch.tensor([True, True, True, True, True, True, True, True, False])
    # a: equal; b: differ; c: equal; d: alone; e: one valid reward (the other is missing).
    keep = informative_groups(scores, groups, valid=valid)
    assert keep.tolist() == [False, False, True, True, False, False, False, False, False]
