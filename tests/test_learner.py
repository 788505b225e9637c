"""The learner on a tiny model: collation, experience, gradient accumulation, skipped and masked steps."""

import dataclasses
import math

import pytest
import torch
from torch._dynamo.utils import counters
from train_fixtures import learner_config, tiny_model, toy_episodes, toy_examples, with_reward

from searchgym.env.outcome import EpisodeOutcome
from searchgym.errors import SearchgymError
from searchgym.policy.trajectory import Trajectory
from searchgym.train.algorithms import kl_estimate
from searchgym.train.batch import Batch, EmptyBatchError, Experience, collate
from searchgym.train.config import TrainConfig
from searchgym.train.learner import (
    _episodes_with_gradient,
    compute_advantages,
    make_experience,
    shaped_scores,
    update,
)
from searchgym.train.models import (
    TrainModels,
    ValueModel,
    build_train_models,
    compile_transformer_blocks,
    response_logprobs,
    response_values,
)
from searchgym.train.optim import build_optimizers, lr_multiplier


def close(actual: torch.Tensor, expected: list | float) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def trajectories() -> list[Trajectory]:
    torch.manual_seed(1)
    return toy_episodes(tiny_model(), toy_examples(8))


def test_padding_changes_no_log_prob(trajectories: list[Trajectory]) -> None:
    model = tiny_model()
    batch = collate(trajectories, pad_token_id=0, device="cpu")
    assert len({len(t.prompt_ids) for t in trajectories}) > 1  # prompts differ, so some rows are padded
    together, _ = response_logprobs(model, batch, temperature=1.0)
    for row, trajectory in enumerate(trajectories):
        alone, _ = response_logprobs(
            model, collate([trajectory], pad_token_id=0, device="cpu"), temperature=1.0
        )
        torch.testing.assert_close(together[row, : alone.shape[1]], alone[0], atol=1e-5, rtol=1e-5)


def test_collate_masks_observations_and_missing_rewards(trajectories: list[Trajectory]) -> None:
    broken = [trajectories[0], with_reward(trajectories[1], None), with_reward(trajectories[2], math.nan)]
    batch = collate(broken, pad_token_id=0, device="cpu")
    assert batch.reward_valid.tolist() == [True, False, False]
    assert batch.loss_mask.tolist()[0] == [1, 1, 0, 0, 1, 1]
    assert batch.loss_mask[1:].sum() == 0 and batch.policy_mask[1:].sum() == 8
    assert torch.isfinite(batch.scores).all()
    with pytest.raises(EmptyBatchError, match="no trajectories"):
        collate([], pad_token_id=0, device="cpu")


def updated_policy(
    trajectories: list[Trajectory], config: TrainConfig, *, compile_blocks: bool = False
) -> torch.nn.Module:
    torch.manual_seed(0)
    models = build_train_models(
        tiny_model(),
        with_reference=config.uses_reference,
        with_critic=config.uses_critic,
        compile_blocks=compile_blocks,
    )
    experience = make_experience(models, collate(trajectories, pad_token_id=0, device="cpu"), config)
    update(models, build_optimizers(models, config), experience, config)
    return models.policy


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean"])
def test_micro_batch_size_does_not_change_the_update(
    trajectories: list[Trajectory], aggregation: str
) -> None:
    settings = (f"algorithm.loss_aggregation={aggregation}", "optim.weight_decay=0")
    whole = updated_policy(trajectories, learner_config("batch.micro_batch_size=8", *settings))
    split = updated_policy(trajectories, learner_config("batch.micro_batch_size=2", *settings))
    for (name, a), b in zip(whole.named_parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    initial = tiny_model()
    assert any(not torch.equal(a, b) for a, b in zip(whole.parameters(), initial.parameters(), strict=True))


def test_grpo_experience_has_group_advantages_and_no_critic(trajectories: list[Trajectory]) -> None:
    config = learner_config("algorithm.name=grpo", "kl.placement=loss", "kl.estimator=low_var_kl")
    models = build_train_models(tiny_model(), with_reference=True, with_critic=config.uses_critic)
    assert models.critic is None
    batch = collate(trajectories, pad_token_id=0, device="cpu")
    experience = make_experience(models, batch, config)
    assert experience.values is None and experience.returns is None
    for row in range(batch.size):
        policy_advantages = experience.advantages[row][batch.loss_mask[row].bool()]
        assert torch.allclose(policy_advantages, policy_advantages[0])  # one advantage per episode
    assert (experience.advantages[~batch.loss_mask.bool()] == 0).all()
    stats = update(models, build_optimizers(models, config), experience, config)
    assert stats.kl_loss is not None and stats.value_loss is None and stats.actor_steps == 1


def test_non_finite_loss_skips_the_step_and_keeps_the_weights(trajectories: list[Trajectory]) -> None:
    config = learner_config()
    models = build_train_models(tiny_model(), with_reference=True, with_critic=True)
    experience = make_experience(models, collate(trajectories, pad_token_id=0, device="cpu"), config)
    poisoned = experience.advantages.clone()
    poisoned[0, 0] = math.nan
    experience = dataclasses.replace(experience, advantages=poisoned)
    before = [p.detach().clone() for p in models.policy.parameters()]
    stats = update(models, build_optimizers(models, config), experience, config)
    assert (stats.actor_skipped_steps, stats.actor_steps) == (1, 0)
    assert math.isnan(stats.policy_loss)
    assert all(torch.equal(a, b) for a, b in zip(before, models.policy.parameters(), strict=True))
    assert stats.critic_skipped_steps == 0  # the critic's loss does not read advantages


def test_a_batch_without_any_reward_does_not_step(trajectories: list[Trajectory]) -> None:
    config = learner_config("kl.coef=0")
    missing = [with_reward(t, None) for t in trajectories]
    models = build_train_models(tiny_model(), with_reference=False, with_critic=True)
    before = [p.detach().clone() for p in models.policy.parameters()]
    experience = make_experience(models, collate(missing, pad_token_id=0, device="cpu"), config)
    stats = update(models, build_optimizers(models, config), experience, config)
    assert (stats.actor_steps, stats.actor_skipped_steps) == (0, 0)
    assert all(torch.equal(a, b) for a, b in zip(before, models.policy.parameters(), strict=True))


def test_learning_rate_schedules() -> None:
    warm = lr_multiplier(total_steps=10, warmup_ratio=0.3, schedule="constant", min_lr_ratio=0.0)
    assert [round(warm(step), 3) for step in range(5)] == [0.333, 0.667, 1.0, 1.0, 1.0]
    cosine = lr_multiplier(total_steps=10, warmup_ratio=0.0, schedule="cosine", min_lr_ratio=0.1)
    assert cosine(0) == pytest.approx(1.0)
    assert cosine(5) == pytest.approx(0.55)
    assert cosine(10) == pytest.approx(0.1)


# A ragged batch with left-padded prompts (3, 1, 2 and 2 tokens: P = 3) and right-padded responses (4, 2, 5
# and 1 tokens: R = 5). Episode 2's reward is missing. Groups: a = (0, 1), b = (2, 3).
RAGGED_EPISODES = (
    ([5, 6, 7], [8, 9, 10, 11], [1, 1, 0, 1], 1.0, "a"),
    ([5], [12, 13], [1, 1], 0.5, "a"),
    ([6, 7], [14, 15, 16, 17, 18], [1, 0, 0, 1, 1], None, "b"),
    ([7, 8], [9], [1], 1.0, "b"),
)


def ragged_trajectories() -> list[Trajectory]:
    return [
        Trajectory(
            example_id=group,
            group_id=group,
            prompt_ids=prompt,
            response_ids=response,
            loss_mask=mask,
            turn_index=[0] * len(response),
            outcome=EpisodeOutcome(answer=None, end_reason="answered", reward=reward),
        )
        for prompt, response, mask, reward, group in RAGGED_EPISODES
    ]


def ragged_batch() -> Batch:
    return collate(ragged_trajectories(), pad_token_id=0, device="cpu")


def test_the_ragged_batch_is_laid_out_as_the_tests_assume() -> None:
    batch = ragged_batch()
    assert batch.sequences.prompt_width == 3 and batch.response_length == 5
    assert batch.loss_mask.tolist() == [
        [1, 1, 0, 1, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0],  # missing reward
        [1, 0, 0, 0, 0],
    ]
    assert batch.sequences.attention_mask[1].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]


# Critic values at collection time; 9 marks positions no number may come from (observations, padding).
RAGGED_VALUES = torch.tensor(
    [
        [0.5, 0.25, 9.0, 0.5, 9.0],
        [0.25, 0.0, 9.0, 9.0, 9.0],
        [0.1, 9.0, 9.0, 0.2, 0.3],
        [0.5, 9.0, 9.0, 9.0, 9.0],
    ]
)


def ppo_advantages(*overrides: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    config = learner_config("algorithm.gamma=1", "algorithm.lam=1", "kl.coef=0", *overrides)
    return compute_advantages(
        ragged_batch(), old_logprobs=None, ref_logprobs=None, values=RAGGED_VALUES, config=config
    )


def test_ppo_outcome_reward_lands_on_each_episodes_last_policy_token() -> None:
    advantages, returns = ppo_advantages("algorithm.whiten_advantages=false")
    assert returns is not None
    # gamma = lam = 1: every policy token's return is its episode's score, its advantage score - value.
    close(returns, [[1, 1, 0, 1, 0], [0.5, 0.5, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]])
    close(advantages, [[0.5, 0.75, 0, 0.5, 0], [0.25, 0.5, 0, 0, 0], [0, 0, 0, 0, 0], [0.5, 0, 0, 0, 0]])


def test_ppo_returns_are_raw_and_whitening_skips_missing_reward_rows() -> None:
    advantages, returns = ppo_advantages("algorithm.whiten_advantages=true")
    # Raw advantages 0.5, 0.75, 0.5, 0.25, 0.5, 0.5 over the six rewarded tokens: mean 0.5, unbiased
    # variance 2 * 0.25^2 / 5 = 0.025, so 0.25 becomes 0.25 / sqrt(0.025) = sqrt(2.5).
    s = math.sqrt(2.5)
    close(advantages, [[0, s, 0, 0, 0], [-s, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    # The critic regresses on the raw returns, not on whitened advantages plus values.
    assert returns is not None
    close(returns, [[1, 1, 0, 1, 0], [0.5, 0.5, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]])


def test_every_estimator_is_chosen_by_name_on_the_ragged_batch() -> None:
    batch = ragged_batch()
    expected = {
        # a = (1, 0.5): mean 0.75, std sqrt(0.125); b has one valid reward: no signal.
        "grpo": [0.25 / math.sqrt(0.125), -0.25 / math.sqrt(0.125), 0.0, 0.0],
        "dr_grpo": [0.25, -0.25, 0.0, 0.0],
        "rloo": [0.5, -0.5, 0.0, 0.0],  # 1 - 0.5 and 0.5 - 1
    }
    for name, per_episode in expected.items():
        config = learner_config(f"algorithm.name={name}", "kl.coef=0")
        advantages, returns = compute_advantages(
            batch, old_logprobs=None, ref_logprobs=None, values=None, config=config
        )
        assert returns is None
        close(advantages, torch.tensor(per_episode).unsqueeze(-1) * batch.loss_mask)
    config = learner_config("algorithm.name=reinforce_pp", "kl.coef=0")
    advantages, _ = compute_advantages(
        batch, old_logprobs=None, ref_logprobs=None, values=None, config=config
    )
    # Returns 1, 1, 1, 0.5, 0.5, 1 over the six rewarded tokens: mean 5/6, unbiased variance
    # (4/36 + 2/9) / 5 = 1/15.
    hi, lo = (1 / 6) / math.sqrt(1 / 15), (-1 / 3) / math.sqrt(1 / 15)
    close(advantages, [[hi, hi, 0, hi, 0], [lo, lo, 0, 0, 0], [0, 0, 0, 0, 0], [hi, 0, 0, 0, 0]])


def test_kl_reward_penalty_per_estimator() -> None:
    batch = ragged_batch()
    old = torch.zeros(4, 5)
    ref = torch.full((4, 5), -0.5)  # k1 = 0.5 on every token
    config = learner_config("algorithm.name=rloo", "kl.coef=0.2", "kl.placement=reward")
    advantages, _ = compute_advantages(batch, old_logprobs=old, ref_logprobs=ref, values=None, config=config)
    # rloo: episode 0 pays 0.2 * 0.5 * 3 tokens = 0.3, episode 1 0.2: scores 0.7 and 0.3.
    close(advantages[:2, 0], [0.4, -0.4])


def test_overlong_shaping_lowers_the_scores_of_long_episodes() -> None:
    # policy_token_limit: env.max_turns (2) x rollout.max_new_tokens (2) = 4; buffer 2: free up to 2.
    config = learner_config("rollout.max_new_tokens=2", "algorithm.overlong_buffer_tokens=2")
    assert config.policy_token_limit == 4
    # Policy tokens: 3, 2, 3 (missing reward: stays 0), 1.
    close(shaped_scores(ragged_batch(), config), [1.0 - 0.5, 0.5, 0.0, 1.0])


class PositionAndTokenCritic(torch.nn.Module):
    """A stand-in critic whose value at each position is 100 x its position id + its token id."""

    def forward(self, input_ids, attention_mask, position_ids):
        return 100.0 * position_ids.float() + input_ids.float()


def test_critic_values_are_those_of_the_state_before_each_response_token() -> None:
    batch = ragged_batch()
    values = response_values(PositionAndTokenCritic(), batch)  # type: ignore[arg-type]
    # Row 0: prompt 5 6 7 at positions 0-2; token t is valued at position 2 + t (token 7, then 8 ...).
    # Row 1: prompt 5 alone after two pads: its first response token is valued at position 0, token 5.
    close(
        values * batch.sequences.response_mask,
        [
            [207, 308, 409, 510, 0],
            [5, 112, 0, 0, 0],
            [107, 214, 315, 416, 517],
            [108, 0, 0, 0, 0],
        ],
    )


def test_left_padding_changes_no_critic_value() -> None:
    critic = ValueModel.from_causal_lm(tiny_model())
    torch.nn.init.normal_(critic.value_head.weight, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        together = response_values(critic, ragged_batch())
        for row, trajectory in enumerate(ragged_trajectories()):
            alone = response_values(critic, collate([trajectory], pad_token_id=0, device="cpu"))
            torch.testing.assert_close(together[row, : alone.shape[1]], alone[0], atol=1e-5, rtol=1e-5)
    assert together.abs().max() > 1e-3  # the comparison is not between zeros


# The actor's loss on the ragged batch, on-policy (ratio 1): -A - entropy_coef x H + kl.coef x k3 per token.
RAGGED_ADVANTAGES = torch.tensor(
    [
        [0.5, -1.0, 7.0, 2.0, 7.0],
        [1.0, 1.0, 7.0, 7.0, 7.0],
        [3.0, 3.0, 3.0, 3.0, 3.0],  # the missing-reward row: none of it may count
        [-2.0, 7.0, 7.0, 7.0, 7.0],
    ]
)


def ragged_models() -> TrainModels:
    return TrainModels(policy=tiny_model(), reference=tiny_model(seed=1).requires_grad_(False), critic=None)


def expected_token_losses(models: TrainModels, batch: Batch) -> torch.Tensor:
    """(B, R) the per-token loss computed here from the models' own log-probs and entropies."""
    with torch.no_grad():
        logprobs, entropy = response_logprobs(models.policy, batch, temperature=1.0)
        assert models.reference is not None
        ref_logprobs, _ = response_logprobs(models.reference, batch, temperature=1.0)
    kl = kl_estimate(logprobs, ref_logprobs, estimator="k3")
    return -RAGGED_ADVANTAGES - 0.1 * entropy + 0.5 * kl


@pytest.mark.parametrize(
    ("name", "aggregation"),
    [("grpo", "token-mean"), ("grpo", "seq-mean"), ("dr_grpo", "seq-mean-token-sum-norm")],
)
def test_actor_loss_signs_and_denominators_on_the_ragged_batch(name: str, aggregation: str) -> None:
    config = learner_config(
        f"algorithm.name={name}",
        f"algorithm.loss_aggregation={aggregation}",
        "algorithm.entropy_coef=0.1",
        "kl.coef=0.5",
        "kl.placement=loss",
        "kl.estimator=k3",
        "batch.micro_batch_size=2",  # two micro-batches: each divides by the whole mini-batch's count
    )
    assert config.update_is_on_policy
    models, batch = ragged_models(), ragged_batch()
    with torch.no_grad():
        ref_logprobs, _ = response_logprobs(models.reference, batch, temperature=1.0)  # type: ignore[arg-type]
    token_losses = expected_token_losses(models, batch)
    mask = batch.loss_mask.bool()
    if aggregation == "token-mean":
        expected = token_losses[mask].sum() / 6  # six rewarded policy tokens, no padding, no missing row
    elif aggregation == "seq-mean":
        rows = [token_losses[row][mask[row]].mean() for row in (0, 1, 3)]  # the empty row does not count
        expected = sum(rows) / 3
    else:
        expected = token_losses[mask].sum() / (3 * config.policy_token_limit)
    experience = Experience(batch, old_logprobs=None, advantages=RAGGED_ADVANTAGES, ref_logprobs=ref_logprobs)
    stats = update(models, build_optimizers(models, config), experience, config)
    assert stats.actor_steps == 1
    assert stats.policy_loss == pytest.approx(float(expected), abs=1e-5)


def perturbed_sampler_batch(models: TrainModels, offsets: torch.Tensor) -> tuple[Batch, torch.Tensor]:
    """The ragged batch with sampler log-probs = the policy's own minus ``offsets``; and the policy's."""
    batch = ragged_batch()
    with torch.no_grad():
        logprobs, _ = response_logprobs(models.policy, batch, temperature=1.0)
    return dataclasses.replace(batch, sampler_logprobs=logprobs - offsets), logprobs


# Sampler minus trainer on the six rewarded tokens: -0.1, -0.3, 0.2, -2.0, 0.0, 0.5.
GAP_OFFSETS = torch.tensor(
    [
        [0.1, 0.3, 5.0, -0.2, 5.0],
        [2.0, 0.0, 5.0, 5.0, 5.0],
        [5.0, 5.0, 5.0, 5.0, 5.0],
        [-0.5, 5.0, 5.0, 5.0, 5.0],
    ]
)


@pytest.mark.parametrize("overrides", [[], ["algorithm.ppo_epochs=2"]])
def test_sampler_gap_is_logged_on_policy_and_off_policy(overrides: list[str]) -> None:
    config = learner_config("algorithm.name=grpo", "kl.coef=0", *overrides)
    models = ragged_models()
    batch, _ = perturbed_sampler_batch(models, GAP_OFFSETS)
    experience = make_experience(models, batch, config)
    assert (experience.old_logprobs is None) == config.update_is_on_policy
    stats = update(models, build_optimizers(models, config), experience, config)
    deltas = [0.1, 0.3, -0.2, 2.0, 0.0, -0.5]  # trainer - sampler
    assert stats.sampler_gap_mean == pytest.approx(sum(abs(d) for d in deltas) / 6, abs=1e-5)
    assert stats.sampler_gap_max == pytest.approx(2.0, abs=1e-5)
    k3 = [math.exp(d) - d - 1.0 for d in deltas]
    assert stats.sampler_kl == pytest.approx(sum(k3) / 6, abs=1e-5)
    assert stats.is_weight is None
    assert "sampler/logprob_gap_max" in stats.to_metrics()


def test_truncated_importance_sampling_weights_the_policy_loss() -> None:
    config = learner_config(
        "algorithm.name=grpo", "kl.coef=0", "algorithm.entropy_coef=0", "algorithm.truncated_is_cap=2"
    )
    models = ragged_models()
    batch, _ = perturbed_sampler_batch(models, GAP_OFFSETS)
    experience = Experience(batch, old_logprobs=None, advantages=RAGGED_ADVANTAGES)
    stats = update(models, build_optimizers(models, config), experience, config)
    # Weights min(exp(trainer - sampler), 2) on the rewarded tokens, times -A (ratio 1), over six tokens.
    weights = [math.exp(0.1), math.exp(0.3), math.exp(-0.2), 2.0, 1.0, math.exp(-0.5)]
    advantages = [0.5, -1.0, 2.0, 1.0, 1.0, -2.0]
    expected = -sum(w * a for w, a in zip(weights, advantages, strict=True)) / 6
    assert stats.policy_loss == pytest.approx(expected, abs=1e-5)
    assert stats.is_weight == pytest.approx(sum(weights) / 6, abs=1e-5)


def test_truncated_importance_sampling_without_sampler_log_probs_is_an_error() -> None:
    config = learner_config("algorithm.name=grpo", "kl.coef=0", "algorithm.truncated_is_cap=2")
    models = ragged_models()
    experience = Experience(ragged_batch(), old_logprobs=None, advantages=RAGGED_ADVANTAGES)
    with pytest.raises(SearchgymError, match="truncated_is_cap=null"):
        update(models, build_optimizers(models, config), experience, config)


def test_bfloat16_autocast_leaves_log_softmax_and_value_head_in_float32() -> None:
    model, batch = tiny_model(), ragged_batch()
    critic = ValueModel.from_causal_lm(model)
    torch.nn.init.normal_(critic.value_head.weight, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logprobs, _ = response_logprobs(model, batch, temperature=0.7)
        logits = model(
            input_ids=batch.sequences.input_ids,
            attention_mask=batch.sequences.attention_mask,
            position_ids=batch.position_ids,
        ).logits[:, batch.sequences.prompt_width - 1 : -1]
        values = response_values(critic, batch)
        hidden = critic.body(
            input_ids=batch.sequences.input_ids,
            attention_mask=batch.sequences.attention_mask,
            position_ids=batch.position_ids,
        ).last_hidden_state
    assert logits.dtype == torch.bfloat16 and logprobs.dtype == values.dtype == torch.float32
    # The same bf16 logits, divided by the temperature and normalised in float32.
    targets = batch.sequences.input_ids[:, batch.sequences.prompt_width :]
    expected = torch.log_softmax(logits.float() / 0.7, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    mask = batch.policy_mask.bool()  # the trainer scores policy tokens only
    torch.testing.assert_close(logprobs[mask], expected[mask], atol=1e-6, rtol=1e-6)
    assert not logprobs[~mask].any()
    # The value head on the bf16 hidden states, in float32.
    head = (hidden.float() @ critic.value_head.weight.T).squeeze(-1)[:, -batch.response_length - 1 : -1]
    torch.testing.assert_close(values, head, atol=1e-6, rtol=1e-6)


def test_a_trimmed_micro_batch_keeps_only_its_own_widths() -> None:
    config = learner_config("algorithm.name=grpo", "kl.placement=loss", "kl.estimator=low_var_kl")
    experience = make_experience(ragged_models(), ragged_batch(), config)
    alone = experience.select(torch.tensor([1])).trimmed()  # one prompt token, two response tokens
    assert alone.batch.sequences.prompt_width == 1 and alone.batch.response_length == 2
    assert alone.batch.sequences.input_ids.shape == (1, 3)
    for name in ("loss_mask", "policy_mask"):
        assert getattr(alone.batch, name).tolist() == getattr(experience.batch, name)[1:2, :2].tolist()
    for name in ("advantages", "ref_logprobs"):
        assert torch.equal(getattr(alone, name), getattr(experience, name)[1:2, :2]), name
    assert alone.batch.position_ids.tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("name", ["ppo", "grpo"])
@pytest.mark.parametrize("budget", [8, 16])
def test_token_budget_micro_batches_take_the_fixed_count_step(name: str, budget: int) -> None:
    kl = ("kl.placement=loss", "kl.estimator=low_var_kl") if name == "grpo" else ()
    settings = (f"algorithm.name={name}", "optim.weight_decay=0", *kl)
    fixed = updated_policy(ragged_trajectories(), learner_config("batch.micro_batch_size=4", *settings))
    packed = updated_policy(
        ragged_trajectories(), learner_config(f"batch.micro_batch_tokens={budget}", *settings)
    )
    # Trimmed widths change the order of float32 sums (measured: at most 7.5e-6 apart after the step); a
    # misplaced column or a lost episode moves weights by AdamW's whole step (lr 1e-2).
    for (parameter, a), b in zip(fixed.named_parameters(), packed.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0, msg=parameter)
    initial = tiny_model().parameters()
    assert any(not torch.equal(a, b) for a, b in zip(fixed.parameters(), initial, strict=True))


def rows_through_policy(models: TrainModels) -> list[int]:
    """Records the batch size of every forward pass of the policy (hook stays for the test)."""
    rows: list[int] = []
    models.policy.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    return rows


def grpo_step_with_two_flat_groups(*overrides: str) -> tuple[torch.nn.Module, list[int], float]:
    """A GRPO step on 4 groups of 2 whose first two groups scored alike (advantage 0 on every token)."""
    config = learner_config(
        "algorithm.name=grpo", "kl.coef=0", "algorithm.entropy_coef=0", "optim.weight_decay=0", *overrides
    )
    episodes = [
        with_reward(t, reward) for t, reward in zip(toy_episodes_8(), [1, 1, 0, 0, 1, 0, 0, 1], strict=True)
    ]
    torch.manual_seed(0)
    models = build_train_models(tiny_model(), with_reference=False, with_critic=False)
    experience = make_experience(models, collate(episodes, pad_token_id=0, device="cpu"), config)
    rows = rows_through_policy(models)
    stats = update(models, build_optimizers(models, config), experience, config)
    return models.policy, rows, stats.policy_loss


def toy_episodes_8() -> list[Trajectory]:
    """4 questions x 2 samples, in groups."""
    torch.manual_seed(1)
    return toy_episodes(tiny_model(), [example for example in toy_examples(4) for _ in range(2)])


def test_zero_advantage_episodes_skip_the_passes_and_leave_the_step_unchanged() -> None:
    skipped, skipped_rows, skipped_loss = grpo_step_with_two_flat_groups()
    full, full_rows, full_loss = grpo_step_with_two_flat_groups("algorithm.skip_zero_advantage=false")
    assert sum(full_rows) == 8 and sum(skipped_rows) == 4
    for (name, a), b in zip(full.named_parameters(), skipped.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0, msg=name)  # trimmed widths: float32 sum order
    assert skipped_loss == pytest.approx(full_loss, abs=1e-6)
    assert any(
        not torch.equal(a, b) for a, b in zip(full.parameters(), tiny_model().parameters(), strict=True)
    )


def test_an_entropy_bonus_reads_every_episode() -> None:
    _, rows, _ = grpo_step_with_two_flat_groups("algorithm.entropy_coef=0.01")
    assert sum(rows) == 8


def test_a_batch_whose_groups_all_scored_alike_runs_no_pass_and_no_step() -> None:
    config = learner_config("algorithm.name=grpo", "kl.coef=0", "algorithm.entropy_coef=0")
    episodes = [with_reward(t, 1.0) for t in toy_episodes_8()]
    models = build_train_models(tiny_model(), with_reference=False, with_critic=False)
    experience = make_experience(models, collate(episodes, pad_token_id=0, device="cpu"), config)
    rows = rows_through_policy(models)
    before = [p.detach().clone() for p in models.policy.parameters()]
    stats = update(models, build_optimizers(models, config), experience, config)
    assert rows == [] and (stats.actor_steps, stats.actor_skipped_steps) == (0, 0)
    assert stats.policy_loss == 0 and stats.actor_grad_norm == 0
    assert all(torch.equal(a, b) for a, b in zip(before, models.policy.parameters(), strict=True))


@dataclasses.dataclass
class Learners:
    world_size: int


@pytest.mark.parametrize(
    ("world_size", "sharded", "expected"),
    [(1, False, [1, 2, 4, 5, 6]), (2, False, [0, 1, 2, 4, 5, 6]), (2, True, list(range(8)))],
)
def test_data_parallel_learners_get_equal_shares_of_the_kept_episodes(
    world_size: int, sharded: bool, expected: list[int]
) -> None:
    """Rows 1, 2, 4, 5, 6 have an advantage; zero-advantage rows, the lowest first, top them up to a multiple
    of the learners (and, sharded, of their micro-batches of 2)."""
    config = learner_config("algorithm.name=grpo", "kl.coef=0", "batch.micro_batch_size=2")
    episodes = [with_reward(t, row / 10) for row, t in enumerate(toy_episodes_8())]  # scores name the rows
    models = build_train_models(tiny_model(), with_reference=False, with_critic=False)
    experience = make_experience(models, collate(episodes, pad_token_id=0, device="cpu"), config)
    advantages = experience.advantages.clone()
    advantages[[0, 3, 7]] = 0
    experience = dataclasses.replace(experience, advantages=advantages)
    kept = _episodes_with_gradient(experience, config, Learners(world_size), sharded=sharded)
    assert kept is not None
    assert [round(float(score) * 10) for score in kept.batch.scores] == expected


def test_compiled_blocks_take_the_eager_step(trajectories: list[Trajectory]) -> None:
    """``model.compile``: every block of policy, reference and critic runs compiled, with the eager update."""
    config = learner_config("optim.weight_decay=0")
    assert config.uses_reference and config.uses_critic
    eager = updated_policy(trajectories, config)
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = updated_policy(trajectories, config, compile_blocks=True)
    assert counters["stats"]["unique_graphs"] > graphs_before
    # Compiled kernels sum in another order, and Adam scales such float32 differences up where a gradient is
    # near 0 (4e-6 measured on an AVX-512 machine); a block left out would move weights by the step, 1e-2.
    for (name, a), b in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, msg=name)
    with pytest.raises(SearchgymError, match=r"model\.compile=false"):
        compile_transformer_blocks(torch.nn.Linear(2, 2))
