"""Where a run reports: metrics.jsonl, TensorBoard, W&B (optional), a console progress bar, sample episodes.

``metrics.jsonl`` has one JSON object per step, ``{"step": n, "<group>/<name>": value, ...}``; step 0 holds
the evaluation of the untrained policy. On resume, rows after the checkpoint's step are dropped (they
belong to the part of the run that is repeated), and TensorBoard purges them likewise; so is a last line
cut off by a kill mid-write.
"""

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from searchgym.errors import SearchgymError
from searchgym.policy.render import render_trajectory
from searchgym.policy.trajectory import Trajectory
from searchgym.train.config import RUN_CONFIG_FILE, TrainConfig

METRICS_FILE = "metrics.jsonl"
# The progress bar's short names for the numbers a user watches.
_PROGRESS_FIELDS = {
    "rollout/reward": "reward",
    "rollout/em": "em",
    "rollout/policy_tokens": "len",
    "rollout/searches": "searches",
    "dev/em": "dev_em",
}


class Tracker:
    """Writes each step's metrics to every configured sink.

    Args:
        config: the run's config (run folder, sinks, step count).
        start_step: the step the run starts from (0, or the resumed checkpoint's step).
    """

    def __init__(self, config: TrainConfig, *, start_step: int) -> None:
        self.run_dir = config.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        _keep_rows_up_to(self.metrics_path, start_step)
        # Rewritten at every start: a resumed run may have been given new overrides (more steps).
        (self.run_dir / RUN_CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        self._tensorboard = None
        if config.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported only when used: it loads tensorboard

            self._tensorboard = SummaryWriter(
                log_dir=str(self.run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
            )
        self._wandb = _start_wandb(config) if config.logging.wandb_project else None
        self._progress = None
        if config.logging.progress_bar:
            self._progress = tqdm(total=config.total_steps, initial=start_step, desc="train", unit="step")
        self._shown: dict[str, float] = {}

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record ``metrics`` for ``step`` everywhere (non-finite values are written as null in JSONL)."""
        row = {"step": step, **{name: _json_number(value) for name, value in metrics.items()}}
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self._tensorboard is not None:
            for name, value in metrics.items():
                self._tensorboard.add_scalar(name, value, global_step=step)
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)
        self._show(metrics)

    def advance(self) -> None:
        """Move the progress bar by one step."""
        if self._progress is not None:
            self._progress.update(1)

    def _show(self, metrics: Mapping[str, float]) -> None:
        if self._progress is None:
            return
        for name, short in _PROGRESS_FIELDS.items():
            if name in metrics:
                self._shown[short] = metrics[name]
        self._progress.set_postfix(
            {name: f"{value:.3g}" for name, value in self._shown.items()}, refresh=False
        )

    def warn(self, message: str) -> None:
        """Show a warning without breaking the progress bar."""
        tqdm.write(f"searchgym train: warning: {message}")

    def write_samples(self, step: int, text: str) -> Path:
        """Save rendered sample episodes as ``samples/step_00000012.txt``."""
        folder = self.run_dir / "samples"
        folder.mkdir(exist_ok=True)
        path = folder / f"step_{step:08d}.txt"
        path.write_text(text)
        return path

    def close(self) -> None:
        """Flush and close every sink."""
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._progress is not None:
            self._progress.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file, in order; a last line cut off mid-write is left out.

    Raises:
        SearchgymError: a complete line (one followed by another) is not a JSON row.
    """
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError too
            if number == len(lines):  # no newline after it: the write was cut off; the row is lost
                break
            raise SearchgymError(
                f"{path}, line {number}, is not a metrics row ({error}); delete that line to resume"
            ) from error
        if not isinstance(row, dict) or "step" not in row:
            raise SearchgymError(f"{path}, line {number}, has no 'step'; delete that line to resume")
        rows.append(row)
    return rows


def render_samples(trajectories: Sequence[Trajectory], tokenizer: PreTrainedTokenizerBase, count: int) -> str:
    """The first ``count`` episodes rendered one after the other."""
    return "\n\n".join(render_trajectory(t, tokenizer) for t in trajectories[:count]) + "\n"


def _keep_rows_up_to(path: Path, step: int) -> None:
    """Drop the rows after ``step`` (all of them for a fresh run), atomically."""
    kept = [row for row in read_metrics(path) if row["step"] <= step] if step > 0 else []
    staging = path.with_suffix(".jsonl.tmp")
    staging.write_text("".join(json.dumps(row) + "\n" for row in kept))
    staging.replace(path)


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _start_wandb(config: TrainConfig) -> Any:
    try:
        import wandb  # an optional extra
    except ImportError as error:
        raise SearchgymError(
            "logging.wandb_project is set but wandb is not installed: pip install 'searchgym[wandb]', "
            "or set logging.wandb_project=null"
        ) from error
    run_name = config.run_dir.name
    return wandb.init(
        project=config.logging.wandb_project, name=run_name, config=config.to_dict(), resume="allow"
    )
