"""A whole training run with a sharded learner (FSDP2 over a process group of its own, gloo on the CPU).

Each run is a subprocess (``tests/train_fixtures.py``): a sharded learner leaves torch.distributed's
default group initialised, which must not leak into the other tests' process.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_fixtures import run_toy
from transformers import AutoModelForCausalLM

from searchgym.train.checkpoint import MANIFEST, CheckpointError, CheckpointManager, verify_checkpoint
from searchgym.train.export import policy_state
from searchgym.train.sharding import SHARDED_STATE_DIR, ShardingError, resolve_strategy
from searchgym.train.tracking import read_metrics

FIXTURES = Path(__file__).parent / "train_fixtures.py"
CHECKOUT_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
SHARD = "learner.strategy=shard"
NEVER = 99  # a kill step the five-step toy run never reaches


def toy_run(run_dir: Path, *overrides: str, kill_at_step: int = NEVER) -> subprocess.CompletedProcess:
    """The toy run of ``train_fixtures.run_toy`` in a subprocess, killed with SIGKILL at ``kill_at_step``."""
    return subprocess.run(
        [sys.executable, str(FIXTURES), str(run_dir), str(kill_at_step), *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        env=CHECKOUT_ENV,
    )


def comparable(rows: list[dict]) -> list[dict]:
    """Metrics without wall-clock timings."""
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("sharded") / "run"
    finished = toy_run(run_dir, SHARD)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return run_dir


def test_a_sharded_run_logs_the_metrics_of_a_replicated_one(sharded_run: Path, tmp_path: Path) -> None:
    replicated = read_metrics(run_toy(tmp_path / "replicated").run_dir / "metrics.jsonl")
    sharded = read_metrics(sharded_run / "metrics.jsonl")
    assert [row.keys() for row in comparable(sharded)] == [row.keys() for row in comparable(replicated)]
    for ours, theirs in zip(comparable(sharded), comparable(replicated), strict=True):
        for name, value in theirs.items():
            assert ours[name] == pytest.approx(value, rel=1e-4, abs=1e-5), (ours["step"], name)
    assert replicated[-1]["actor/optimizer_steps"] > 0  # the runs did update


def test_sharded_checkpoints_are_verified_torch_distributed_folders(sharded_run: Path) -> None:
    latest = CheckpointManager(sharded_run / "checkpoints", keep_last=1).latest()
    assert latest is not None and (latest / SHARDED_STATE_DIR).is_dir()
    assert not (latest / "models.pt").exists()
    assert verify_checkpoint(latest) is None
    # The manifest covers the shards too: a damaged shard is caught before a resume trusts it.
    shard = next((latest / SHARDED_STATE_DIR).glob("*.distcp"))
    assert f"{SHARDED_STATE_DIR}/{shard.name}" in (latest / MANIFEST).read_text()
    with shard.open("r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    assert "does not match its checksum" in (verify_checkpoint(latest) or "")


def test_a_killed_sharded_run_resumes_as_if_uninterrupted(sharded_run: Path, tmp_path: Path) -> None:
    killed = toy_run(tmp_path / "resumed", SHARD, kill_at_step=3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = toy_run(tmp_path / "resumed", SHARD)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert comparable(read_metrics(tmp_path / "resumed" / "metrics.jsonl")) == comparable(
        read_metrics(sharded_run / "metrics.jsonl")
    )


def test_export_reads_the_policy_of_any_sharded_checkpoint(sharded_run: Path) -> None:
    # (The toy run trains a model of its own, not its config's model.path: the export's rebuild of the
    # config's model is covered by the CLI tests; here, reading a sharded checkpoint's weights.)
    checkpoints = CheckpointManager(sharded_run / "checkpoints", keep_last=1).checkpoints()
    first, last = policy_state(checkpoints[0]), policy_state(checkpoints[-1])
    final = AutoModelForCausalLM.from_pretrained(sharded_run / "final").state_dict()
    for name, value in final.items():
        if name in last:  # a tied LM head is stored once
            assert torch.equal(last[name], value), name
    assert any(not torch.equal(first[name], last[name]) for name in last)


def test_a_replicated_run_refuses_a_sharded_checkpoint(sharded_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    latest = CheckpointManager(sharded_run / "checkpoints", keep_last=1).latest()
    assert latest is not None
    os.symlink(latest, run_dir / "checkpoints" / latest.name)
    with pytest.raises(CheckpointError, match=r"learner\.strategy=shard"):
        run_toy(run_dir)


def test_lora_is_refused_under_shard_and_offload() -> None:
    for asked in ({"strategy": "shard"}, {"strategy": "auto", "offload": True}):
        with pytest.raises(ShardingError, match="LoRA"):
            resolve_strategy(device=torch.device("cpu"), lora=True, **asked)  # type: ignore[arg-type]
