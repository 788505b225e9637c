"""An on-policy update (one epoch, one mini-batch) reads its old log-probs off its own forward pass."""

import copy
import dataclasses

import pytest
import torch
from train_fixtures import learner_config, tiny_model, toy_episodes, toy_examples, with_reward

from searchgym.policy.logprobs import sequence_logprobs
from searchgym.train.batch import collate
from searchgym.train.learner import make_experience, update
from searchgym.train.models import build_train_models
from searchgym.train.optim import build_optimizers


@pytest.mark.parametrize(
    "overrides",
    [
        ["algorithm.name=ppo", "kl.coef=0"],
        ["algorithm.name=grpo", "kl.coef=0.1", "kl.placement=loss", "kl.estimator=low_var_kl"],
    ],
)
def test_skipping_the_old_log_prob_pass_gives_the_same_update(overrides: list[str]) -> None:
    config = learner_config(*overrides)
    assert config.update_is_on_policy
    torch.manual_seed(1)
    trajectories = toy_episodes(tiny_model(), toy_examples(8))
    batch = collate(trajectories, pad_token_id=0, device="cpu")
    models = build_train_models(
        tiny_model(), with_reference=config.uses_reference, with_critic=config.uses_critic
    )
    explicit_models = copy.deepcopy(models)
    experience = make_experience(models, batch, config)
    assert experience.old_logprobs is None
    with torch.no_grad():
        old_logprobs = sequence_logprobs(models.policy, batch.sequences).logprobs
    explicit = dataclasses.replace(experience, old_logprobs=old_logprobs)

    torch.manual_seed(0)
    stats = update(models, build_optimizers(models, config), experience, config)
    torch.manual_seed(0)
    explicit_stats = update(explicit_models, build_optimizers(explicit_models, config), explicit, config)
    assert stats.clip_fraction == 0.0 and stats.policy_loss == pytest.approx(explicit_stats.policy_loss)
    for ours, theirs in zip(models.policy.parameters(), explicit_models.policy.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_several_optimizer_steps_per_batch_score_the_old_log_probs_first() -> None:
    for overrides in (["algorithm.ppo_epochs=2"], ["batch.mini_batch_prompts=2"]):
        config = learner_config(*overrides)
        assert not config.update_is_on_policy
    kl_reward = learner_config("kl.coef=0.01")
    assert kl_reward.kl.placement == "reward" and not kl_reward.update_is_on_policy


def test_a_batch_without_signal_leaves_the_weights_alone() -> None:
    """GRPO groups that all scored alike have zero advantages: AdamW must not drift on its momentum."""
    config = learner_config("algorithm.name=grpo", "kl.coef=0", "algorithm.entropy_coef=0")
    torch.manual_seed(1)
    trajectories = [with_reward(t, 0.5) for t in toy_episodes(tiny_model(), toy_examples(8))]
    models = build_train_models(tiny_model(), with_reference=False, with_critic=False)
    optimizers = build_optimizers(models, config)
    before = [parameter.detach().clone() for parameter in models.policy.parameters()]
    experience = make_experience(models, collate(trajectories, pad_token_id=0, device="cpu"), config)
    stats = update(models, optimizers, experience, config)
    assert stats.actor_steps == 0 and stats.actor_skipped_steps == 0 and stats.actor_grad_norm == 0.0
    for old, new in zip(before, models.policy.parameters(), strict=True):
        assert torch.equal(old, new)
