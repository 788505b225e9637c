"""Damaged run files: checkpoints verified against their manifests, resume from the newest intact one."""

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
from train_fixtures import run_toy

from searchgym.errors import SearchgymError
from searchgym.train.checkpoint import (
    MANIFEST,
    CheckpointError,
    CheckpointManager,
    step_dir_name,
    verify_checkpoint,
)
from searchgym.train.tracking import read_metrics

FEW_STEPS = ("total_steps=3", "dev.every=0", "checkpoint.keep_last=3", "logging.samples_every=0")


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-step toy run with a checkpoint after every step (copied by each test that damages it)."""
    run_dir = tmp_path_factory.mktemp("three-checkpoints")
    run_toy(run_dir, *FEW_STEPS, "checkpoint.export_final=false")
    return run_dir


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def test_every_checkpoint_has_a_manifest_of_its_files(three_checkpoints: Path) -> None:
    newest = three_checkpoints / "checkpoints" / step_dir_name(3)
    files = json.loads((newest / MANIFEST).read_text())["files"]
    assert set(files) == {"models.pt", "optimizers.pt", "torch_rng.pt", "state.json"}
    assert files["state.json"]["bytes"] == (newest / "state.json").stat().st_size
    assert verify_checkpoint(newest) is None


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda folder: truncate(folder / "models.pt"), r"models.pt has \d+ bytes, \d+ were written"),
        (lambda folder: truncate(folder / "state.json"), r"state.json has \d+ bytes"),
        (lambda folder: (folder / "optimizers.pt").unlink(), "optimizers.pt is missing"),
        (lambda folder: flip_last_byte(folder / "models.pt"), "models.pt does not match its checksum"),
        (lambda folder: (folder / MANIFEST).write_text("{"), f"its {MANIFEST} is unreadable"),
    ],
    ids=["truncated-models", "truncated-state", "missing-file", "flipped-byte", "bad-manifest"],
)
def test_a_damaged_newest_checkpoint_is_skipped_with_the_reason(
    three_checkpoints: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage, reason
) -> None:
    run_dir = copy_run(three_checkpoints, tmp_path / "run")
    damage(run_dir / "checkpoints" / step_dir_name(3))
    manager = CheckpointManager(run_dir / "checkpoints", keep_last=3)
    with caplog.at_level(logging.WARNING):
        assert manager.latest() == run_dir / "checkpoints" / step_dir_name(2)
    assert f"skipping checkpoint {run_dir / 'checkpoints' / step_dir_name(3)}" in caplog.text
    assert caplog.text.count("skipping checkpoint") == 1
    assert list(manager.skipped) == [run_dir / "checkpoints" / step_dir_name(3)]
    assert re.search(reason, manager.skipped[run_dir / "checkpoints" / step_dir_name(3)])


def flip_last_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))


def test_resume_falls_back_to_the_newest_intact_checkpoint(
    three_checkpoints: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = copy_run(three_checkpoints, tmp_path / "run")
    truncate(run_dir / "checkpoints" / step_dir_name(3) / "models.pt")
    with caplog.at_level(logging.WARNING):
        resumed = run_toy(run_dir, *FEW_STEPS[1:], "total_steps=4", "checkpoint.export_final=false")
    assert "skipping checkpoint" in caplog.text and step_dir_name(3) in caplog.text
    assert [row["step"] for row in resumed.history] == [3, 4]  # step 3 is trained again, from step 2
    assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    assert verify_checkpoint(run_dir / "checkpoints" / step_dir_name(3)) is None  # rewritten intact


def test_when_every_checkpoint_is_damaged_resume_refuses_to_start_afresh(
    three_checkpoints: Path, tmp_path: Path
) -> None:
    run_dir = copy_run(three_checkpoints, tmp_path / "run")
    for step in (1, 2, 3):
        truncate(run_dir / "checkpoints" / step_dir_name(step) / "models.pt")
    with pytest.raises(CheckpointError, match=r"every checkpoint in .* is damaged"):
        CheckpointManager(run_dir / "checkpoints", keep_last=3).latest()


def test_loading_a_damaged_checkpoint_is_a_checkpoint_error(three_checkpoints: Path, tmp_path: Path) -> None:
    run_dir = copy_run(three_checkpoints, tmp_path / "run")
    folder = run_dir / "checkpoints" / step_dir_name(3)
    truncate(folder / "models.pt")
    manager = CheckpointManager(run_dir / "checkpoints", keep_last=3)
    with pytest.raises(CheckpointError, match=r"is damaged: models\.pt has"):
        manager.load(folder, models=None, optimizers=None)  # type: ignore[arg-type]  # refused before use


def test_a_checkpoint_without_manifest_is_accepted_when_its_state_reads(
    three_checkpoints: Path, tmp_path: Path
) -> None:
    run_dir = copy_run(three_checkpoints, tmp_path / "run")
    folder = run_dir / "checkpoints" / step_dir_name(3)
    (folder / MANIFEST).unlink()  # as written before manifests existed
    assert verify_checkpoint(folder) is None
    truncate(folder / "state.json")
    assert "no manifest.json and an unreadable state.json" in (verify_checkpoint(folder) or "")


def test_a_torn_last_metrics_line_is_dropped_on_resume(three_checkpoints: Path, tmp_path: Path) -> None:
    run_dir = copy_run(three_checkpoints, tmp_path / "run")
    metrics = run_dir / "metrics.jsonl"
    with metrics.open("a") as handle:
        handle.write('{"step": 4, "rollout/rew')  # a kill in the middle of a write
    assert [row["step"] for row in read_metrics(metrics)] == [0, 1, 2, 3]
    resumed = run_toy(run_dir, *FEW_STEPS[1:], "total_steps=4", "checkpoint.export_final=false")
    assert [row["step"] for row in resumed.history] == [4]
    assert [row["step"] for row in read_metrics(metrics)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "content", [b'{"step": 0}\n{"step": 1, "x"\n{"step": 2}\n', b'{"step": 0}\n[1, 2]\n{"step": 2}\n']
)
def test_a_damaged_metrics_line_before_the_last_says_which(tmp_path: Path, content: bytes) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(content)
    with pytest.raises(SearchgymError, match=r"metrics.jsonl, line 2, (is not a metrics row|has no 'step')"):
        read_metrics(metrics)
