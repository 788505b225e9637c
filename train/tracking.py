"""Where a run reports: metrics.jsonl, TensorBoard, W&B (optional), a console progress bar, sample episodes.

``metrics.jsonl`` has one JSON object per step, ``{"step": n, "<group>/<name>": value, ...}``; step 0 holds
the evaluation of the untrained policy. On resume, rows after the checkpoint's step are dropped (they
belong to the part of the run that is repeated), and TensorBoard purges them likewise; so is a last line
cut off by a kill mid-write.

``samples/episodes.jsonl`` keeps the first ``logging.episodes_per_step`` episodes of every step, one JSON
object per line (what ``searchgym view`` reads): ``step``, ``index`` (position in the step's batch),
``example_id``, ``group_id``, ``dataset``, ``question``, ``golden_answers``, ``gold_doc_ids``, the outcome
(``answer``, ``em``, ``f1``, ``cover_em``, ``reward``, ``reward_parts`` {``outcome``, ``shaping``,
``search_cost``}, ``reward_error``, ``searches``, ``end_reason``, ``error``, ``terminated``, ``truncated``),
``prompt`` (decoded), ``turns`` (per turn: ``action_type``, ``text``, ``query``, ``retrieved_ids`` and
``observation``, the decoded observation tokens that followed it) and ``tokens`` (per response token:
``ids``, ``text``, ``mask``, ``logprobs`` or null, ``turn``). Rows after a resumed checkpoint's step are
dropped, as in ``metrics.jsonl``.
"""

import json
import math
import re
import secrets
from collections.abc import Mapping, Sequence
from itertools import groupby
from pathlib import Path
from typing import Any, cast

import yaml
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from searchgym.env.data import QAExample
from searchgym.errors import SearchgymError
from searchgym.policy.render import render_trajectory
from searchgym.policy.trajectory import Trajectory
from searchgym.train.config import RUN_CONFIG_FILE, TrainConfig

METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
EPISODES_FILE = "episodes.jsonl"
# Sampler log-probs are stored to this many decimals: enough to read, a third of the bytes of a float.
_LOGPROB_DECIMALS = 4
_STEP_PREFIX = re.compile(rb'^\{"step": (-?\d+)')
WANDB_ID_FILE = "wandb_run_id"  # the W&B run this folder logs to, so that a resumed run continues it
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
        self.episodes_path = self.run_dir / SAMPLES_DIR / EPISODES_FILE
        self._episodes_per_step = config.logging.episodes_per_step
        _keep_episodes_up_to(self.episodes_path, start_step)
        # Rewritten at every start: a resumed run may have been given new overrides (more steps).
        (self.run_dir / RUN_CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        self._tensorboard = None
        if config.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported only when used: it loads tensorboard

            self._tensorboard = SummaryWriter(
                log_dir=str(self.run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
            )
        self._wandb = _start_wandb(config, resuming=start_step > 0) if config.logging.wandb_project else None
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
        self.note(f"warning: {message}")

    def note(self, message: str) -> None:
        """Show a line without breaking the progress bar."""
        tqdm.write(f"searchgym train: {message}")

    def write_samples(self, step: int, text: str) -> Path:
        """Save rendered sample episodes as ``samples/step_00000012.txt``."""
        folder = self.run_dir / "samples"
        folder.mkdir(exist_ok=True)
        path = folder / f"step_{step:08d}.txt"
        path.write_text(text)
        return path

    def write_episodes(
        self,
        step: int,
        trajectories: Sequence[Trajectory],
        examples: Sequence[QAExample],
        tokenizer: PreTrainedTokenizerBase,
    ) -> None:
        """Append the step's first ``logging.episodes_per_step`` episodes to ``samples/episodes.jsonl``.

        Args:
            step: the training step the episodes were sampled at.
            trajectories: the step's episodes, in batch order.
            examples: the example of each trajectory, aligned with ``trajectories``.
            tokenizer: the policy's tokenizer (decodes prompts, observations and single tokens).
        """
        count = min(self._episodes_per_step, len(trajectories))
        if count == 0:
            return
        rows = [
            episode_record(trajectory, example, tokenizer, step=step, index=index)
            for index, (trajectory, example) in enumerate(zip(trajectories[:count], examples, strict=False))
        ]
        self.episodes_path.parent.mkdir(exist_ok=True)
        with self.episodes_path.open("a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))

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


def episode_record(
    trajectory: Trajectory, example: QAExample, tokenizer: PreTrainedTokenizerBase, *, step: int, index: int
) -> dict[str, Any]:
    """One line of ``samples/episodes.jsonl``: the episode's question, outcome, turns and tokens.

    The passages a turn was shown are kept as the decoded observation tokens that followed it, so the
    viewer shows exactly what the policy read, without the index. ``step`` comes first in the line so
    that a resume can find where to cut the file without parsing it, and the short fields come before
    ``prompt`` so that the viewer indexes a line from its head (keep that order when adding fields).
    """
    outcome, parts = trajectory.outcome, trajectory.outcome.reward_parts
    logprobs = trajectory.sampler_logprobs
    return {
        "step": step,
        "index": index,
        "example_id": trajectory.example_id,
        "group_id": trajectory.group_id,
        "dataset": example.source,
        "question": example.question,
        "golden_answers": list(example.golden_answers),
        "gold_doc_ids": list(example.gold_doc_ids) if example.gold_doc_ids is not None else None,
        "answer": outcome.answer,
        "em": outcome.em,
        "f1": outcome.f1,
        "cover_em": outcome.cover_em,
        "reward": _optional_float(trajectory.reward),
        "reward_parts": {
            "outcome": None if parts is None else parts.outcome,
            "shaping": None if parts is None else parts.shaping,
            "search_cost": None if parts is None else parts.search_cost,
        },
        "reward_error": outcome.reward_error,
        "searches": outcome.num_searches,
        "end_reason": outcome.end_reason,
        "error": outcome.error,
        "terminated": outcome.answered,
        "truncated": not outcome.answered,
        "prompt": cast(str, tokenizer.decode(trajectory.prompt_ids)),
        "turns": _turn_records(trajectory, tokenizer),
        "tokens": {
            "ids": trajectory.response_ids,
            "text": tokenizer.batch_decode([[token_id] for token_id in trajectory.response_ids]),
            "mask": trajectory.loss_mask,
            "logprobs": None if logprobs is None else [round(v, _LOGPROB_DECIMALS) for v in logprobs],
            "turn": trajectory.turn_index,
        },
    }


def _turn_records(trajectory: Trajectory, tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    """Each turn with the decoded observation tokens (mask 0) that followed it."""
    observation_ids: dict[int, list[int]] = {}
    tokens = zip(trajectory.response_ids, trajectory.loss_mask, trajectory.turn_index, strict=True)
    for (mask, turn), span in groupby(tokens, key=lambda token: (token[1], token[2])):
        if mask == 0:
            observation_ids.setdefault(turn, []).extend(token_id for token_id, _, _ in span)
    observations = {turn: cast(str, tokenizer.decode(ids)) for turn, ids in observation_ids.items()}
    return [
        {
            "action_type": turn.action_type,
            "text": turn.text,
            "query": turn.query,
            "retrieved_ids": list(turn.retrieved_ids),
            "observation": observations.get(number, ""),
        }
        for number, turn in enumerate(trajectory.turns)
    ]


def _optional_float(value: Any) -> float | None:
    """A finite float, or None for a missing or non-finite value (JSON has no NaN)."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _keep_episodes_up_to(path: Path, step: int) -> None:
    """Cut ``samples/episodes.jsonl`` before its first row after ``step`` (remove it for a fresh run).

    Rows are appended in step order, so the cut is one truncation; each row's step is read from the
    start of its line, never by parsing the (large) rows.
    """
    if not path.is_file():
        return
    if step <= 0:
        path.unlink()
        return
    with path.open("r+b") as handle:
        offset = 0
        for line in handle:
            found = _STEP_PREFIX.match(line)
            if not line.endswith(b"\n") or (found is not None and int(found.group(1)) > step):
                break
            offset += len(line)
        handle.truncate(offset)


def _keep_rows_up_to(path: Path, step: int) -> None:
    """Drop the rows after ``step`` (all of them for a fresh run), atomically."""
    kept = [row for row in read_metrics(path) if row["step"] <= step] if step > 0 else []
    staging = path.with_suffix(".jsonl.tmp")
    staging.write_text("".join(json.dumps(row) + "\n" for row in kept))
    staging.replace(path)


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _start_wandb(config: TrainConfig, *, resuming: bool) -> Any:
    """Start the W&B run, or continue the one this run folder started (its id is kept in the folder).

    A fresh run (no checkpoint to resume) gets a new W&B run, since its steps start again from 0.
    """
    try:
        import wandb  # an optional extra
    except ImportError as error:
        raise SearchgymError(
            "logging.wandb_project is set but wandb is not installed: pip install 'searchgym[wandb]', "
            "or set logging.wandb_project=null"
        ) from error
    id_file = config.run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resuming and id_file.is_file() else ""
    if not run_id:
        run_id = secrets.token_hex(8)  # W&B run ids: letters and digits, unique within the project
        id_file.write_text(run_id + "\n")
    return wandb.init(
        project=config.logging.wandb_project,
        name=config.run_dir.name,
        id=run_id,
        resume="allow",
        config=config.to_dict(),
    )
