"""``searchgym export``: a Hugging Face model folder from any checkpoint of a training run.

A run writes ``final/`` only at its end; a checkpoint holds the policy's weights in the trainer's own
format: ``models.pt`` (one process) or ``sharded/`` (a ``torch.distributed.checkpoint`` folder written by
sharded learners, see :func:`searchgym.train.sharding.save_sharded`). Exporting one rebuilds the run's
initial policy from its ``config.yaml`` (architecture and tokenizer), loads the checkpoint's weights into
it and writes the folder that ``searchgym eval --model``, ``from_pretrained`` and vLLM load.
"""

import tempfile
from pathlib import Path

import torch
from torch import Tensor

from searchgym.errors import SearchgymError
from searchgym.train.checkpoint import CheckpointManager, export_hf_model
from searchgym.train.config import RUN_CONFIG_FILE, load_config
from searchgym.train.sharding import SHARDED_STATE_DIR

_SINGLE_PROCESS_MODELS = "models.pt"


class ExportError(SearchgymError):
    """The path holds no checkpoint that can be exported."""


def resolve_checkpoint(path: Path) -> tuple[Path, Path]:
    """``(run_dir, checkpoint)`` for a run folder (its newest checkpoint) or a ``step_N`` folder of one.

    Raises:
        ExportError: neither, or the run folder has no checkpoint.
    """
    if (path / RUN_CONFIG_FILE).is_file():
        latest = CheckpointManager(path / "checkpoints", keep_last=1).latest()
        if latest is None:
            raise ExportError(f"{path} holds no checkpoint yet (its checkpoints/ folder is empty)")
        return path, latest
    run_dir = path.parent.parent
    if path.parent.name == "checkpoints" and (run_dir / RUN_CONFIG_FILE).is_file():
        if not any((path / name).exists() for name in (_SINGLE_PROCESS_MODELS, SHARDED_STATE_DIR)):
            raise ExportError(
                f"{path} is not a complete checkpoint (no {_SINGLE_PROCESS_MODELS} or sharded/)"
            )
        return run_dir, path
    raise ExportError(
        f"{path} is neither a run folder of `searchgym train` (with {RUN_CONFIG_FILE}) nor one of its "
        "checkpoints (RUN_DIR/checkpoints/step_N)"
    )


def policy_state(checkpoint: Path) -> dict[str, Tensor]:
    """The policy's full state dict in a checkpoint, in either format, on the CPU."""
    if (checkpoint / _SINGLE_PROCESS_MODELS).is_file():
        return torch.load(checkpoint / _SINGLE_PROCESS_MODELS, map_location="cpu", weights_only=True)[
            "policy"
        ]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        merged = Path(scratch) / "state.pt"
        dcp_to_torch_save(checkpoint / SHARDED_STATE_DIR, merged)
        state = torch.load(merged, map_location="cpu", weights_only=False)
    return {name: value for name, value in state["models"]["policy"].items()}


def export_checkpoint(path: Path, out: Path) -> Path:
    """Write the policy of the checkpoint at ``path`` (or a run's newest) as a Hugging Face folder ``out``."""
    from searchgym.train.build import load_training_policy  # transformers and the model load here

    run_dir, checkpoint = resolve_checkpoint(path)
    config = load_config(run_dir / RUN_CONFIG_FILE, ["system.device=cpu"])
    policy = load_training_policy(config)
    missing, unexpected = policy.model.load_state_dict(policy_state(checkpoint), strict=False)
    # A tied LM head is saved under both names or only one, depending on the writer.
    missing = [name for name in missing if name != "lm_head.weight"]
    if missing or unexpected:
        raise ExportError(
            f"{checkpoint} does not fit the model of {run_dir / RUN_CONFIG_FILE} ({config.model.path}): "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return export_hf_model(policy.model, policy.tokenizer, out)
