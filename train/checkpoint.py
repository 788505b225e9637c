"""Checkpoints that a killed run resumes from as if nothing had happened, and the final model export.

A checkpoint is a folder ``step_00000012/`` holding the trained weights (policy, critic), the optimizer
and schedule states, the random-number generators (python, numpy, torch, CUDA) and the trainer's own
state (step, data position, guard statistics). It is written under a temporary name and renamed into
place, so a crash mid-write never leaves a half checkpoint that a resume would trust.

Each checkpoint also holds ``manifest.json``: the size and SHA-256 of every other file, written last. A
checkpoint is verified against it before it is used (:func:`verify_checkpoint`), so one damaged after it
was written (a truncated copy, a full disk, a bad sector) is skipped with a warning naming it and why,
and the run resumes from the newest intact one instead.
"""

import hashlib
import json
import logging
import os
import pickle
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from searchgym.errors import SearchgymError
from searchgym.train.lora import has_lora, load_trainable_state, merged_state, trainable_state
from searchgym.train.models import TrainModels
from searchgym.train.optim import Optimizers
from searchgym.train.sharding import SHARDED_STATE_DIR, is_sharded, load_sharded, save_sharded

logger = logging.getLogger(__name__)
_PREFIX = "step_"
_MODELS, _OPTIMIZERS, _TORCH_RNG, _STATE = "models.pt", "optimizers.pt", "torch_rng.pt", "state.json"
_SCHEDULES = "schedules.pt"  # beside sharded/: the learning-rate schedules of sharded learners
MANIFEST = "manifest.json"  # {"files": {name: {"bytes": n, "sha256": hex}}}, written last


class CheckpointError(SearchgymError):
    """A checkpoint does not fit the run that tries to load it."""


@dataclass(frozen=True, slots=True)
class TrainerState:
    """The trainer's own state beside the tensors.

    Attributes:
        step: training steps completed.
        data_position: where the example sampler stands (see ``ExampleSampler.state_dict``).
        guards: the guards' running statistics.
        healthy: whether the guards saw no bad step in a row at save time (roll-back targets).
    """

    step: int
    data_position: dict[str, int]
    guards: dict[str, float]
    healthy: bool = True


def step_dir_name(step: int) -> str:
    """``step_00000012`` for step 12 (zero-padded so names sort by step)."""
    return f"{_PREFIX}{step:08d}"


class CheckpointManager:
    """Saves, lists, loads and prunes the checkpoints of one run.

    Args:
        directory: the run's checkpoint folder.
        keep_last: how many of the newest checkpoints to keep; the newest healthy one is kept as well.
    """

    def __init__(self, directory: Path, *, keep_last: int) -> None:
        self.directory = directory
        self.keep_last = keep_last
        self.skipped: dict[Path, str] = {}  # damaged checkpoints met by latest(), and why
        self._verified: set[Path] = set()  # checked (or written) by this manager since its last change

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)]
        return sorted(p for p in found if (p / _STATE).is_file())

    def latest(self, *, healthy_only: bool = False) -> Path | None:
        """The newest intact checkpoint (the newest intact healthy one with ``healthy_only``), or None.

        Damaged checkpoints are skipped with a warning that names each and says why (see ``skipped``).

        Raises:
            CheckpointError: there are checkpoints but none is intact (a fresh start would silently
                throw the run away).
        """
        existing = self.checkpoints()
        for path in reversed(existing):
            if not self.is_intact(path):
                continue
            if not healthy_only or read_trainer_state(path).healthy:
                return path
        if existing and not healthy_only and all(path in self.skipped for path in existing):
            reasons = "; ".join(f"{path.name}: {self.skipped[path]}" for path in existing)
            raise CheckpointError(
                f"every checkpoint in {self.directory} is damaged ({reasons}); move them away to start "
                "afresh, or set checkpoint.resume=false with another logging.run_dir"
            )
        return None

    def is_intact(self, path: Path) -> bool:
        """Whether ``path`` matches its manifest (checked once per manager; a failure is warned about)."""
        if path in self._verified:
            return True
        problem = verify_checkpoint(path)
        if problem is None:
            self._verified.add(path)
            self.skipped.pop(path, None)
            return True
        if path not in self.skipped:
            logger.warning("skipping checkpoint %s: %s", path, problem)
        self.skipped[path] = problem
        return False

    def save(self, *, models: TrainModels, optimizers: Optimizers, state: TrainerState) -> Path:
        """Write a checkpoint of the current run atomically, then prune old ones.

        Sharded learners all call it (a collective): each writes its shards into ``sharded/``, and rank 0
        writes the rest and publishes the folder.
        """
        target = self.directory / step_dir_name(state.step)
        staging = self.directory / f".{target.name}.tmp-{os.getpid()}"
        sharded = is_sharded(models.policy)
        lead = not sharded or dist.get_rank() == 0
        if sharded:
            agreed = [staging]
            dist.broadcast_object_list(agreed, src=0)  # every rank writes into rank 0's staging folder
            staging = agreed[0]
        if lead:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        if sharded:
            dist.barrier()
            save_sharded(staging, models=models, optimizers=_trained_optimizers(optimizers))
            if lead:
                torch.save(_schedule_states(optimizers), staging / _SCHEDULES)
        else:
            torch.save(_model_states(models), staging / _MODELS)
            torch.save(_optimizer_states(optimizers), staging / _OPTIMIZERS)
        if lead:
            self._publish(staging, target, state)
        if sharded:
            dist.barrier()  # no rank goes on (and may load it) before rank 0 has renamed it into place
        self._verified.add(target)  # its checksums were just taken from the files on disk
        self.skipped.pop(target, None)
        if lead:
            self._prune()
        return target

    def _publish(self, staging: Path, target: Path, state: TrainerState) -> None:
        """Add the random and trainer states and the manifest to ``staging``, then rename it to ``target``."""
        torch.save(_torch_rng_state(), staging / _TORCH_RNG)
        state_record = {
            "trainer": asdict(state),
            "python_rng": _python_rng_state(),
            "numpy_rng": _numpy_rng_state(),
        }
        (staging / _STATE).write_text(json.dumps(state_record))
        _write_manifest(staging)
        _fsync_tree(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        _fsync_dir(self.directory)

    def load(
        self, path: Path, *, models: TrainModels, optimizers: Optimizers, restore_rng: bool = True
    ) -> TrainerState:
        """Load the weights and optimizer states of ``path`` into the run; optionally its RNG states too.

        Raises:
            CheckpointError: the checkpoint is damaged, or holds other models than this run (PPO vs GRPO).
        """
        if not self.is_intact(path):
            raise CheckpointError(f"checkpoint {path} is damaged: {self.skipped[path]}")
        sharded = is_sharded(models.policy)
        if sharded != (path / SHARDED_STATE_DIR).is_dir():
            written, asked = ("shard", "replicate") if not sharded else ("replicate", "shard")
            raise CheckpointError(
                f"{path} was written by learners with learner.strategy={written}: resume with it (this run "
                f"has {asked}), or `searchgym export` the checkpoint and start a new run from the export"
            )
        if sharded:
            _load_sharded(path, models, optimizers)
        else:
            _load_whole(path, models, optimizers)
        record = json.loads((path / _STATE).read_text())
        if restore_rng:
            random.setstate(_as_tuple(record["python_rng"]))
            np.random.set_state(_as_numpy_state(record["numpy_rng"]))
            _set_torch_rng_state(_load_tensors(path / _TORCH_RNG, torch.device("cpu")))
        return _state_from_json(record["trainer"])

    def _prune(self) -> None:
        existing = self.checkpoints()
        keep = set(existing[-self.keep_last :])
        newest_healthy = self.latest(healthy_only=True)
        if newest_healthy is not None:
            keep.add(newest_healthy)
        for path in existing:
            if path not in keep:
                shutil.rmtree(path)
                self._verified.discard(path)
                self.skipped.pop(path, None)


_CRITIC_MISMATCH = (
    "{path} was written by a run {written} a critic; resume with the same algorithm.name, or start afresh "
    "with checkpoint.resume=false or another logging.run_dir"
)


def _load_whole(path: Path, models: TrainModels, optimizers: Optimizers) -> None:
    device = next(models.policy.parameters()).device
    model_states = _load_tensors(path / _MODELS, device)
    if ("critic" in model_states) != (models.critic is not None):
        written = "with" if "critic" in model_states else "without"
        raise CheckpointError(_CRITIC_MISMATCH.format(path=path, written=written))
    _load_weights(models.policy, model_states["policy"])
    if models.critic is not None:
        _load_weights(models.critic, model_states["critic"])
    _load_optimizer_states(optimizers, _load_tensors(path / _OPTIMIZERS, device))


def _load_sharded(path: Path, models: TrainModels, optimizers: Optimizers) -> None:
    schedules = _load_tensors(path / _SCHEDULES, torch.device("cpu"))
    if ("critic_schedule" in schedules) != (models.critic is not None):
        written = "with" if "critic_schedule" in schedules else "without"
        raise CheckpointError(_CRITIC_MISMATCH.format(path=path, written=written))
    load_sharded(path, models=models, optimizers=_trained_optimizers(optimizers))
    _load_schedule_states(optimizers, schedules)


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with the checkpoint at ``path``, or None when every file matches its manifest.

    A checkpoint written before manifests existed passes when its ``state.json`` parses (its tensors are
    then checked only by loading them).
    """
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        try:
            json.loads((path / _STATE).read_text())
        except (OSError, ValueError) as error:
            return f"no {MANIFEST} and an unreadable {_STATE} ({error})"
        return None
    try:
        files = json.loads(manifest_path.read_text())["files"]
        expected = {str(name): (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its {MANIFEST} is unreadable ({error!r})"
    for name, (size, digest) in expected.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        actual_size = file.stat().st_size
        if actual_size != size:
            return f"{name} has {actual_size} bytes, {size} were written"
        if _sha256(file) != digest:
            return f"{name} does not match its checksum"
    return None


def _load_tensors(file: Path, device: torch.device) -> Any:
    """``torch.load`` of one checkpoint file; a damaged one raises CheckpointError."""
    try:
        return torch.load(file, map_location=device, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise CheckpointError(
            f"{file} cannot be loaded ({error}); move its folder away to resume from an earlier checkpoint"
        ) from error


def _write_manifest(folder: Path) -> None:
    files = {
        str(file.relative_to(folder)): {"bytes": file.stat().st_size, "sha256": _sha256(file)}
        for file in sorted(folder.rglob("*"))
        if file.is_file() and file.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def _sha256(file: Path) -> str:
    with file.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_trainer_state(path: Path) -> TrainerState:
    """The trainer state of the checkpoint at ``path`` (without loading any tensor)."""
    return _state_from_json(json.loads((path / _STATE).read_text())["trainer"])


def export_hf_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    target: Path,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` and ``tokenizer`` as a plain Hugging Face model folder, atomically.

    The folder loads with ``AutoModelForCausalLM.from_pretrained``, ``searchgym eval --model`` and vLLM;
    LoRA adapters are merged into the weights they adapt (the folder holds no adapter). ``state_dict``
    replaces the model's own weights (a sharded model's, gathered whole).
    """
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    if state_dict is None and has_lora(model):
        state_dict = merged_state(model)
    model.save_pretrained(staging, state_dict=state_dict)
    tokenizer.save_pretrained(staging)
    _fsync_tree(staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def _model_states(models: TrainModels) -> dict[str, Any]:
    states = {"policy": _weights(models.policy)}
    if models.critic is not None:
        states["critic"] = _weights(models.critic)
    return states


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of a model: every weight, or only the trainable ones beside a frozen base."""
    return trainable_state(model) if has_lora(model) else model.state_dict()


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    if has_lora(model):
        load_trainable_state(model, state)
    else:
        model.load_state_dict(state)


def _optimizer_states(optimizers: Optimizers) -> dict[str, Any]:
    states = {"actor": optimizers.actor.state_dict(), **_schedule_states(optimizers)}
    if optimizers.critic is not None:
        states["critic"] = optimizers.critic.state_dict()
    return states


def _schedule_states(optimizers: Optimizers) -> dict[str, Any]:
    states = {"actor_schedule": optimizers.actor_schedule.state_dict()}
    if optimizers.critic_schedule is not None:
        states["critic_schedule"] = optimizers.critic_schedule.state_dict()
    return states


def _trained_optimizers(optimizers: Optimizers) -> dict[str, torch.optim.Optimizer]:
    """The optimizers keyed by the role of the model they train, as the sharded checkpoint names them."""
    trained = {"policy": optimizers.actor}
    if optimizers.critic is not None:
        trained["critic"] = optimizers.critic
    return trained


def _load_optimizer_states(optimizers: Optimizers, states: dict[str, Any]) -> None:
    optimizers.actor.load_state_dict(states["actor"])
    if optimizers.critic is not None:
        optimizers.critic.load_state_dict(states["critic"])
    _load_schedule_states(optimizers, states)


def _load_schedule_states(optimizers: Optimizers, states: dict[str, Any]) -> None:
    optimizers.actor_schedule.load_state_dict(states["actor_schedule"])
    if optimizers.critic_schedule is not None:
        optimizers.critic_schedule.load_state_dict(states["critic_schedule"])


def _python_rng_state() -> list[Any]:
    version, internal, gauss_next = random.getstate()
    return [version, list(internal), gauss_next]


def _as_tuple(state: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss_next = state
    return (version, tuple(internal), gauss_next)


def _numpy_rng_state() -> list[Any]:
    state = np.random.get_state()
    assert isinstance(state, tuple)  # the legacy form: the global RandomState is an MT19937
    name, keys, position, has_gauss, cached_gaussian = state
    return [name, keys.tolist(), position, has_gauss, cached_gaussian]


def _as_numpy_state(state: list[Any]) -> tuple[Any, ...]:
    name, keys, position, has_gauss, cached_gaussian = state
    return (name, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian)


def _torch_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_torch_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _state_from_json(record: dict[str, Any]) -> TrainerState:
    return TrainerState(
        step=int(record["step"]),
        data_position={k: int(v) for k, v in record["data_position"].items()},
        guards={k: float(v) for k, v in record["guards"].items()},
        healthy=bool(record["healthy"]),
    )


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` to disk, so the rename never publishes data still in flight."""
    for path in (p for p in root.rglob("*") if p.is_file()):
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(root)


def _fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
