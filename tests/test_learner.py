"""The learner on a tiny model: collation, experience, gradient accumulation, skipped and masked steps."""

import dataclasses
import math

import pytest
import torch
from train_fixtures import learner_config, tiny_model, toy_episodes, toy_examples, with_reward

from searchgym.errors import SearchgymError
from searchgym.policy.trajectory import Trajectory
from searchgym.train.batch import EmptyBatchError, collate
from searchgym.train.config import TrainConfig
from searchgym.train.learner import make_experience, update
from searchgym.train.models import build_train_models, response_logprobs
from searchgym.train.optim import build_optimizers, lr_multiplier


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


def updated_policy(trajectories: list[Trajectory], config: TrainConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    models = build_train_models(
        tiny_model(), with_reference=config.uses_reference, with_critic=config.uses_critic
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


def test_a_stale_batch_takes_the_sampler_logprobs_as_old_logprobs(trajectories: list[Trajectory]) -> None:
    config = learner_config()
    models = build_train_models(tiny_model(seed=7), with_reference=True, with_critic=config.uses_critic)
    fresh = collate(trajectories, pad_token_id=0, device="cpu")
    stale = collate(
        [dataclasses.replace(t, weights_version=0, staleness=1) for t in trajectories],
        pad_token_id=0,
        device="cpu",
    )
    assert fresh.staleness == 0 and stale.staleness == 1
    # The learner's weights (seed 7) are not the sampler's (seed 0): recomputed old log-probs differ from
    # the sampler's, and a stale batch must use the sampler's, the behaviour policy's.
    recomputed = make_experience(
        models,
        fresh,
        dataclasses.replace(config, algorithm=dataclasses.replace(config.algorithm, ppo_epochs=2)),
    )
    assert recomputed.old_logprobs is not None
    assert not torch.allclose(recomputed.old_logprobs * fresh.policy_mask, stale.sampler_logprobs)
    behaviour = make_experience(models, stale, config)
    assert behaviour.old_logprobs is not None and torch.equal(behaviour.old_logprobs, stale.sampler_logprobs)


def test_a_stale_batch_without_sampler_logprobs_is_an_error(trajectories: list[Trajectory]) -> None:
    config = learner_config()
    models = build_train_models(tiny_model(), with_reference=True, with_critic=config.uses_critic)
    blind = [dataclasses.replace(t, sampler_logprobs=None, staleness=2) for t in trajectories]
    with pytest.raises(SearchgymError, match=r"rollout\.max_staleness=0"):
        make_experience(models, collate(blind, pad_token_id=0, device="cpu"), config)
