"""Where a run reports: the W&B run a resumed run continues."""

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from searchgym.paths import CONFIGS_DIR
from searchgym.train.config import load_config
from searchgym.train.tracking import WANDB_ID_FILE, Tracker


class RecordingWandb(types.ModuleType):
    """Stands in for the ``wandb`` module: records each ``init`` call's keyword arguments."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict[str, Any]] = []

    def init(self, **kwargs: Any) -> "RecordingWandb":
        self.inits.append(kwargs)
        return self

    def finish(self) -> None:
        pass


@pytest.fixture
def wandb(monkeypatch: pytest.MonkeyPatch) -> RecordingWandb:
    module = RecordingWandb()
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def start(run_dir: Path, *, start_step: int) -> None:
    overrides = [f"logging.run_dir={run_dir}", "logging.wandb_project=sg", "logging.tensorboard=false"]
    config = load_config(CONFIGS_DIR / "tiny.yaml", [*overrides, "logging.progress_bar=false"])
    Tracker(config, start_step=start_step).close()


def test_a_resumed_run_continues_its_wandb_run(tmp_path: Path, wandb: RecordingWandb) -> None:
    start(tmp_path / "run", start_step=0)
    start(tmp_path / "run", start_step=4)
    start(tmp_path / "run", start_step=8)
    first, *resumed = wandb.inits
    assert first["id"] == (tmp_path / "run" / WANDB_ID_FILE).read_text().strip()
    assert [(init["id"], init["resume"]) for init in resumed] == [(first["id"], "allow")] * 2
    assert first["name"] == "run" and first["project"] == "sg"


def test_a_fresh_run_in_the_same_folder_gets_a_new_wandb_run(tmp_path: Path, wandb: RecordingWandb) -> None:
    start(tmp_path / "run", start_step=0)
    start(tmp_path / "run", start_step=0)  # no checkpoint to resume: its steps start again from 0
    start(tmp_path / "other", start_step=0)
    assert len({init["id"] for init in wandb.inits}) == 3
