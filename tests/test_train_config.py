"""The training config tree: presets, overrides, validation messages and --help text."""

import dataclasses
import typing
from pathlib import Path

import pytest

from searchgym.paths import CONFIGS_DIR
from searchgym.train.config import TrainConfig, config_help, load_config
from searchgym.train.config_io import ConfigError, build, field_docs

PRESETS = sorted(CONFIGS_DIR.glob("*.yaml"))


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            keys += leaf_keys(hints[field.name], f"{prefix}{field.name}.")
        else:
            keys.append(f"{prefix}{field.name}")
    return keys


@pytest.mark.parametrize("preset", PRESETS, ids=lambda path: path.name)
def test_every_preset_loads_and_round_trips(preset: Path) -> None:
    config = load_config(preset)
    assert build(TrainConfig, config.to_dict()) == config


def test_presets_named_by_the_issue_exist() -> None:
    names = {path.name for path in PRESETS}
    assert {"tiny.yaml", "demo.yaml", "search_r1_3b_ppo.yaml", "search_r1_3b_grpo.yaml"} <= names


def test_search_r1_presets_hold_the_paper_settings() -> None:
    ppo = load_config(CONFIGS_DIR / "search_r1_3b_ppo.yaml")
    assert (ppo.optim.actor_lr, ppo.optim.actor_warmup_ratio) == (1e-6, 0.285)
    assert (ppo.optim.critic_lr, ppo.optim.critic_warmup_ratio) == (1e-5, 0.015)
    assert (ppo.kl.coef, ppo.batch.prompts_per_step, ppo.batch.mini_batch_prompts) == (0.001, 512, 256)
    assert (ppo.env.max_turns, ppo.env.topk, ppo.env.max_observation_tokens) == (4, 3, 500)
    assert (ppo.rollout.max_new_tokens, ppo.rollout.backend, ppo.system.dtype) == (500, "vllm", "bfloat16")
    assert ppo.model.gradient_checkpointing and ppo.uses_critic and ppo.env.reward_type == "em"
    grpo = load_config(CONFIGS_DIR / "search_r1_3b_grpo.yaml")
    assert (grpo.algorithm.name, grpo.rollout.samples_per_prompt, grpo.uses_critic) == ("grpo", 5, False)
    assert grpo.mini_batch_trajectories == 256 * 5


def test_overrides_are_typed_and_nested() -> None:
    config = load_config(
        None,
        ["optim.actor_lr=3e-6", "optim.betas=[0.9, 0.95]", "data.dev_limit=null", "env.reward_type=f1"],
    )
    assert config.optim.actor_lr == 3e-6
    assert config.optim.betas == (0.9, 0.95)
    assert config.data.dev_limit is None
    assert config.env.reward_type == "f1"


def test_derived_sizes() -> None:
    config = load_config(
        None,
        [
            "algorithm.name=grpo",
            "rollout.samples_per_prompt=4",
            "kl.placement=loss",
            "batch.prompts_per_step=8",
            "batch.mini_batch_prompts=4",
            "batch.micro_batch_size=2",
            "kl.coef=0",
        ],
    )
    assert (config.trajectories_per_step, config.mini_batch_trajectories) == (32, 16)
    assert (config.mini_batches_per_step, config.accumulation_steps) == (2, 8)
    assert not config.uses_critic and not config.uses_reference


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.actor_lrr=1e-6"], "did you mean optim.actor_lr"),
        (["algorithm.name=ppg"], "set one of ppo, grpo"),
        (["algorithm.name=grpo"], "rollout.samples_per_prompt >= 2"),
        (["algorithm.name=grpo", "rollout.samples_per_prompt=4"], "set kl.placement=loss"),
        (["batch.prompts_per_step=6", "batch.mini_batch_prompts=4"], "multiple of batch.mini_batch_prompts"),
        (["batch.micro_batch_size=100"], "batch.micro_batch_size to a divisor"),
        (["optim.actor_lr=fast"], "optim.actor_lr must be float"),
        (["total_steps=2.5"], "total_steps must be int"),
        (["max_minutes=-1"], "max_minutes must be a number of minutes >= 0"),
        (["max_minutes=nan"], "max_minutes must be a number of minutes >= 0"),
        (["optim.betas=0.9"], "takes 2 values"),
        (["rollout.backend=vllm", "system.device=cpu"], "needs a GPU"),
        (["env.max_turns=0"], "env: max_turns=0"),
        (["guards.rollback_after=3", "checkpoint.every=0"], "checkpoint.every > 0"),
        (["actor_lr"], "is not key=value"),
        (["kl.placement=loss"], "k1 as a loss term has zero expected gradient"),
        (["algorithm.name=rloo"], "rollout.samples_per_prompt >= 2"),
        (["algorithm.name=dr_grpo", "rollout.samples_per_prompt=2"], "set kl.placement=loss"),
        (["algorithm.name=dr_grpo", "algorithm.loss_aggregation=token-mean"], "divides by a constant"),
        (["algorithm.dual_clip=1.0"], "algorithm.dual_clip must be > 1"),
        (["algorithm.truncated_is_cap=0.5"], "truncated_is_cap must be >= 1"),
        (["algorithm.dynamic_sampling=true"], "rollout.samples_per_prompt >= 2"),
        (["algorithm.overlong_buffer_tokens=2000"], "below the policy-token limit"),
        (["rollout.mode=eager"], "set one of lockstep, async"),
        (["rollout.max_staleness=-1"], "rollout.max_staleness must be >= 0"),
        (["rollout.search_wait_s=-0.1"], "rollout.search_wait_s must be >= 0"),
        (
            ["algorithm.dynamic_sampling=true", "rollout.samples_per_prompt=2", "rollout.max_staleness=1"],
            "max_staleness=0",
        ),
    ],
)
def test_mistakes_say_what_to_set(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_estimators_are_chosen_by_name_with_their_own_aggregation() -> None:
    group = ["rollout.samples_per_prompt=2", "kl.coef=0"]
    aggregation = {
        name: load_config(None, [f"algorithm.name={name}", *group]).algorithm.aggregation
        for name in ("ppo", "grpo", "rloo", "reinforce_pp", "dr_grpo")
    }
    assert aggregation == {
        "ppo": "token-mean",
        "grpo": "token-mean",
        "rloo": "token-mean",
        "reinforce_pp": "token-mean",
        "dr_grpo": "seq-mean-token-sum-norm",
    }
    chosen = load_config(None, ["algorithm.name=rloo", "algorithm.loss_aggregation=seq-mean", *group])
    assert chosen.algorithm.aggregation == "seq-mean"
    # k1 stays valid where it belongs: in the reward, and as a loss only with a zero coefficient.
    assert load_config(None, ["kl.placement=reward"]).kl.estimator == "k1"
    assert load_config(None, ["kl.placement=loss", "kl.coef=0"]).uses_reference is False
    # Only ppo fits a critic; rloo and reinforce_pp may keep the KL in the reward.
    assert [load_config(None, [f"algorithm.name={n}", *group]).uses_critic for n in ("ppo", "rloo")] == [
        True,
        False,
    ]
    assert load_config(None, ["algorithm.name=reinforce_pp", "kl.coef=0.01"]).kl.placement == "reward"


def test_missing_preset_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config file"):
        load_config(tmp_path / "absent.yaml")


def test_help_documents_every_leaf_key() -> None:
    text = config_help()
    for key in leaf_keys(TrainConfig):
        assert f"  {key} (" in text, key
        section, _, name = key.rpartition(".")
        owner = TrainConfig
        for part in filter(None, section.split(".")):
            owner = typing.get_type_hints(owner)[part]
        assert field_docs(owner).get(name), f"{key} has no documentation"


def test_scale_presets_shard_the_learners() -> None:
    ppo = load_config(CONFIGS_DIR / "search_r1_3b_ppo.yaml")
    assert (ppo.learner.strategy, ppo.ray.enabled, ppo.ray.num_learners, ppo.ray.gpus_per_learner) == (
        "shard",
        True,
        4,
        1,
    )
    one_gpu = load_config(CONFIGS_DIR / "search_r1_3b_grpo_1gpu.yaml")
    assert (one_gpu.learner.strategy, one_gpu.learner.offload, one_gpu.ray.enabled) == ("shard", True, False)
    assert one_gpu.model.path == "Qwen/Qwen2.5-3B" and one_gpu.algorithm.name == "grpo"
