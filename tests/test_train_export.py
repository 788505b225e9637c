"""``searchgym export``: a Hugging Face folder from a mid-run checkpoint of either format, that eval loads."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from transformers import AutoModelForCausalLM

from searchgym.cli import main
from searchgym.eval.report import RESULTS_FILE
from searchgym.paths import CONFIGS_DIR
from searchgym.policy.models import tiny_random_model
from searchgym.train.checkpoint import CheckpointManager, TrainerState, step_dir_name
from searchgym.train.config import RUN_CONFIG_FILE, load_config
from searchgym.train.learner import build_optimizers
from searchgym.train.models import build_train_models
from searchgym.train.sharding import SHARDED_STATE_DIR


def trained_policy() -> torch.nn.Module:
    """The tiny-random-llama of configs/tiny.yaml with one weight moved, as training would."""
    model = tiny_random_model(seed=0).model
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.5)
    return model


def start_run(run_dir: Path) -> None:
    config = load_config(CONFIGS_DIR / "tiny.yaml", [f"logging.run_dir={run_dir}"])
    run_dir.mkdir(parents=True)
    (run_dir / RUN_CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def single_process_checkpoint(run_dir: Path, step: int) -> Path:
    config = load_config(run_dir / RUN_CONFIG_FILE)
    models = build_train_models(trained_policy(), with_reference=False, with_critic=True)
    manager = CheckpointManager(run_dir / "checkpoints", keep_last=2)
    state = TrainerState(step=step, data_position={}, guards={})
    return manager.save(models=models, optimizers=build_optimizers(models, config), state=state)


def sharded_checkpoint(run_dir: Path, step: int) -> Path:
    # One process writes the torch.distributed.checkpoint layout that sharded learners write together.
    checkpoint = run_dir / "checkpoints" / step_dir_name(step)
    dcp.save(
        {"models": {"policy": trained_policy().state_dict()}}, checkpoint_id=checkpoint / SHARDED_STATE_DIR
    )
    return checkpoint


def assert_exports_the_trained_weights(out: Path) -> None:
    exported = AutoModelForCausalLM.from_pretrained(out)
    expected = trained_policy().state_dict()
    for name, value in exported.state_dict().items():
        assert torch.equal(value, expected[name]), name


# Each loads the SmolLM2 tokenizer and a model twice: about 30 s on the shared 2-core box.
@pytest.mark.slow
def test_a_mid_run_checkpoint_exports_and_evaluates(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    start_run(run_dir)
    checkpoint = single_process_checkpoint(run_dir, step=3)
    out = tmp_path / "step3-model"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    assert_exports_the_trained_weights(out)
    evaluated = tmp_path / "eval"
    argv = ["eval", "--model", str(out), "--benchmarks", "wiki-mini-dev", "--mode", "direct", "--limit", "2"]
    assert main([*argv, "--max-new-tokens", "3", "--out", str(evaluated), "--no-progress"]) == 0
    results = json.loads((evaluated / RESULTS_FILE).read_text())
    assert results["datasets"]["wiki-mini-dev"]["num_examples"] == 2


@pytest.mark.slow
def test_a_sharded_checkpoint_and_a_run_folder_export(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    start_run(run_dir)
    single_process_checkpoint(run_dir, step=1)
    checkpoint = sharded_checkpoint(run_dir, step=2)
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "sharded")]) == 0
    assert_exports_the_trained_weights(tmp_path / "sharded")
    # A run folder exports its newest complete checkpoint (the one with state.json: step 1 here).
    assert main(["export", str(run_dir), "--out", str(tmp_path / "newest")]) == 0
    assert_exports_the_trained_weights(tmp_path / "newest")


def test_a_folder_without_checkpoints_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "neither a run folder of `searchgym train`" in capsys.readouterr().err
    run_dir = tmp_path / "run"
    start_run(run_dir)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "out")]) == 2
    assert "holds no checkpoint yet" in capsys.readouterr().err
