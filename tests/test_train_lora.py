"""LoRA: the toy task learns through adapters; the optimizer, checkpoints, reference and export see them."""

from pathlib import Path

import pytest
import torch
from train_fixtures import (
    SimulatedCrash,
    TargetTokenRollout,
    run_toy,
    tiny_model,
    tiny_tokenizer,
    toy_config,
    toy_examples,
)
from transformers import AutoModelForCausalLM

from searchgym.policy.models import Policy
from searchgym.train.checkpoint import CheckpointManager
from searchgym.train.config import ConfigError, load_config
from searchgym.train.learner import LocalLearner, build_optimizers
from searchgym.train.loop import train
from searchgym.train.lora import LoraSetupError, adapters_disabled, apply_lora, merged_state
from searchgym.train.models import build_train_models, reference_policy

pytest.importorskip("peft")

LORA = ("model.lora.rank=4", "model.lora.alpha=8")


def perturb_adapters(model: torch.nn.Module) -> None:
    """Give the zero-initialised B matrices values, so that the adapters change the model's output."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5, generator=torch.Generator().manual_seed(len(name)))


def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(torch.tensor([[3, 4, 5, 6, 7]])).logits


def test_only_adapters_train_and_the_reference_is_the_base_without_a_copy(tmp_path: Path) -> None:
    config = toy_config(tmp_path, *LORA, "model.lora.targets=[q_proj, v_proj]", "model.lora.critic=true")
    base_logits = logits(tiny_model())
    models = build_train_models(tiny_model(), with_reference=True, with_critic=True, lora=config.model.lora)
    assert models.reference is None and models.reference_is_base
    optimizers = build_optimizers(models, config)
    actor_params = [p for group in optimizers.actor.param_groups for p in group["params"]]
    adapter_params = [p for name, p in models.policy.named_parameters() if "lora_" in name]
    # 2 layers x (q_proj, v_proj) x (A, B); nothing else of the policy is in the optimizer.
    assert len(adapter_params) == 8 and {id(p) for p in actor_params} == {id(p) for p in adapter_params}
    assert optimizers.critic is not None
    critic_names = {name for name, p in models.critic.named_parameters() if p.requires_grad}
    assert critic_names == {n for n in critic_names if "lora_" in n} | {"value_head.weight"}
    assert "value_head.weight" in critic_names and len(critic_names) == 9

    perturb_adapters(models.policy)
    assert not torch.allclose(logits(models.policy), base_logits)
    with reference_policy(models) as reference:
        assert reference is models.policy
        torch.testing.assert_close(logits(reference), base_logits)
    # Adapters are back on (and trainable) after the block.
    assert not torch.allclose(logits(models.policy), base_logits)
    assert all(p.requires_grad for p in adapter_params)


def test_merged_weights_are_a_plain_model_equal_to_the_adapted_one() -> None:
    model = apply_lora(tiny_model(), rank=4, alpha=8, targets=("all-linear",), dropout=0.0)
    perturb_adapters(model)
    plain = tiny_model(seed=1)
    plain.load_state_dict(merged_state(model), strict=True)
    torch.testing.assert_close(logits(plain), logits(model), rtol=1e-5, atol=1e-5)
    with adapters_disabled(model):
        torch.testing.assert_close(logits(model), logits(tiny_model()))


def test_bad_targets_and_settings_say_what_to_set() -> None:
    with pytest.raises(LoraSetupError, match=r"model\.lora\.targets=\['no_such_layer'\]"):
        apply_lora(tiny_model(), rank=4, alpha=8, targets=("no_such_layer",), dropout=0.0)
    with pytest.raises(ConfigError, match=r"model\.lora\.rank must be >= 0"):
        load_config(None, ["model.lora.rank=-1"])
    with pytest.raises(ConfigError, match=r"model\.lora\.dropout must be in"):
        load_config(None, ["model.lora.rank=4", "model.lora.dropout=1.5"])


def test_grpo_with_lora_and_a_kl_to_the_base_learns_the_toy_task(tmp_path: Path) -> None:
    config = toy_config(
        tmp_path,
        "model.lora.rank=4",
        "model.lora.alpha=32",
        # The toy reward is one token's probability: adapting the LM head makes it learnable in a few steps.
        "model.lora.targets=[q_proj, v_proj, down_proj, lm_head]",
        "total_steps=12",
        "optim.actor_lr=1e-2",
        "algorithm.name=grpo",
        "algorithm.entropy_coef=0",
        "rollout.samples_per_prompt=4",
        "batch.prompts_per_step=4",
        "batch.mini_batch_prompts=2",
        "batch.micro_batch_size=4",
        "kl.placement=loss",
        "kl.estimator=low_var_kl",
        "checkpoint.every=0",
        "checkpoint.export_final=true",
        "dev.every=0",
        "dev.before_training=false",
        "logging.samples_every=0",
    )
    policy = tiny_model()
    result = train(
        config,
        learner=LocalLearner(config, Policy(policy, tiny_tokenizer(), name="tiny")),
        rollout=TargetTokenRollout(),
        tokenizer=tiny_tokenizer(),
        train_examples=toy_examples(16),
    )
    rewards = [row["rollout/reward"] for row in result.history]
    assert sum(rewards[:3]) / 3 < 0.35
    assert sum(rewards[-3:]) / 3 > 0.8, rewards
    assert result.history[-1]["experience/kl"] > 0  # the policy moved away from its base
    # The export is a plain model (no adapter tensor) that computes what the adapted policy computes.
    assert result.final_model is not None
    exported = AutoModelForCausalLM.from_pretrained(result.final_model)
    assert not any("lora" in name for name, _ in exported.named_parameters())
    torch.testing.assert_close(logits(exported), logits(policy), rtol=1e-5, atol=1e-5)


def test_checkpoints_hold_only_the_adapters_and_resume_exactly(tmp_path: Path) -> None:
    overrides = (*LORA, "model.lora.critic=true")
    straight_policy = tiny_model()
    run_toy(tmp_path / "straight", *overrides, policy=straight_policy)
    with pytest.raises(SimulatedCrash):
        run_toy(tmp_path / "resumed", *overrides, rollout=TargetTokenRollout(crash_at_step=3))
    checkpoint = CheckpointManager(tmp_path / "resumed" / "checkpoints", keep_last=1).latest()
    assert checkpoint is not None
    states = torch.load(checkpoint / "models.pt", weights_only=True)
    assert states["policy"] and all("lora_" in name for name in states["policy"])
    assert set(states["critic"]) - {"value_head.weight"} == {n for n in states["critic"] if "lora_" in n}
    resumed_policy = tiny_model()
    run_toy(tmp_path / "resumed", *overrides, policy=resumed_policy)
    for (name, a), b in zip(straight_policy.named_parameters(), resumed_policy.parameters(), strict=True):
        assert torch.equal(a, b), name
    # A run with other adapters refuses the checkpoint instead of loading half of it.
    with pytest.raises(LoraSetupError, match=r"resume with the same model\.lora settings"):
        run_toy(tmp_path / "resumed", "model.lora.rank=4", "model.lora.targets=[q_proj]", "total_steps=6")


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_demo_preset_trains_two_steps_with_lora_and_its_export_evaluates(tmp_path: Path) -> None:
    """SmolLM2 on wiki-mini with adapters: 2 GRPO steps, then ``searchgym eval --model`` on the export."""
    import subprocess
    import sys

    from searchgym.paths import CONFIGS_DIR
    from searchgym.train.search_rollout import WIKI_MINI_BM25

    def searchgym(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "searchgym", *args]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=3000, cwd=Path(__file__).parent.parent
        )

    run_dir = tmp_path / "run"
    trained = searchgym(
        "train",
        "--config",
        str(CONFIGS_DIR / "demo.yaml"),
        f"logging.run_dir={run_dir}",
        "total_steps=2",
        "model.lora.rank=8",
        "model.lora.alpha=16",
        "optim.actor_lr=1e-4",
        "warmstart.examples=0",
        "dev.before_training=false",
        "data.dev_limit=4",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    final = run_dir / "final"
    exported = AutoModelForCausalLM.from_pretrained(final)
    assert not any("lora" in name for name, _ in exported.named_parameters())
    evaluated = searchgym(
        "eval",
        "--model",
        str(final),
        "--train-config",
        str(run_dir),
        "--index",
        str(WIKI_MINI_BM25),
        "--benchmarks",
        "wiki-mini-dev",
        "--limit",
        "4",
        "--no-progress",
        "--out",
        str(tmp_path / "eval"),
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "wiki-mini-dev" in evaluated.stdout
