"""Sharded learners: FSDP2 (``torch.distributed.fsdp.fully_shard``) over the learner ranks.

With the ``replicate`` strategy every learner holds whole fp32 copies of the policy, the critic, the
reference and both AdamW states (36 bytes a trained parameter, see ``docs/scaling.md``) and sums gradients
with all-reduces (:class:`~searchgym.train.parallel.TorchDataParallel`). With ``shard``,
each of the N learners holds 1/N of every parameter, gradient and optimizer state: each transformer block is
one FSDP unit (gathered just before its forward and backward, freed after), and the root unit holds the
rest (embeddings, final norm, LM or value head). Optionally the shards live on the CPU between uses
(offload), and compute runs on bf16 copies of the fp32 master weights with gradients reduced in fp32.

How a learner uses it (order matters: optimizers are built on the sharded parameters)::

    mesh = learner_mesh(device)                       # after init_process_group (gloo on CPU, NCCL on GPU)
    models = build_train_models(policy, ...)
    shard_models(models, mesh, options=ShardingOptions(mixed_precision=..., offload=...))
    optimizers = build_optimizers(models, config)
    data_parallel = ShardedDataParallel(device=device)
    experience = make_experience(models, batch, config, data_parallel=data_parallel)
    update(models, optimizers, experience, config, data_parallel=data_parallel)

Each learner still computes its share of every mini-batch (data parallelism over the same ranks): FSDP's
reduce-scatter, with its averaging turned into a sum, adds the learners' gradients, which the global loss
denominators make the gradient of the whole mini-batch.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from searchgym.errors import SearchgymError
from searchgym.train.models import TrainModels, transformer_blocks
from searchgym.train.parallel import TorchDataParallel

LearnerStrategy = Literal["replicate", "shard"]


class ShardingError(SearchgymError):
    """A model cannot be sharded as asked."""


@dataclass(frozen=True, kw_only=True)
class ShardingOptions:
    """How :func:`shard_models` shards.

    Attributes:
        mixed_precision: compute on bf16 copies of the fp32 parameters, reduce gradients in fp32 (the
            shards, gradients and optimizer states stay fp32).
        offload: keep parameter shards, gradients and optimizer states in CPU memory between uses; the
            optimizer step then runs on the CPU.
    """

    mixed_precision: bool = False
    offload: bool = False


def resolve_strategy(
    strategy: Literal["auto", "replicate", "shard"],
    device: torch.device,
    *,
    learners: int = 1,
    offload: bool = False,
    lora: bool = False,
) -> LearnerStrategy:
    """What ``auto`` means for a run: shard where it saves memory, replicate where it would only cost.

    ``auto`` shards several CUDA learners (each then holds 1/N of the states) and any learner that offloads;
    it replicates a lone learner, which sharding over one rank slows without saving memory (measured on an
    H200: see docs/benchmarks.md), CPU runs, and LoRA, which trains a few adapter weights beside a frozen
    base (little to shard; the adapters' merging and checkpoints are written for whole models).

    Raises:
        ShardingError: ``shard`` or offload asked for together with LoRA.
    """
    if lora and (strategy == "shard" or offload):
        raise ShardingError(
            "LoRA adapters are not sharded or offloaded: set learner.strategy=replicate learner.offload=false"
        )
    if strategy == "auto":
        shards = offload or (device.type == "cuda" and learners > 1 and not lora)
        return "shard" if shards else "replicate"
    return strategy


def init_single_rank_group(device: torch.device) -> None:
    """A process group of this process alone (in-memory store), for a sharded learner without peers."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def learner_mesh(device: torch.device) -> DeviceMesh:
    """A one-dimensional mesh over every rank of the initialised default process group.

    Raises:
        ShardingError: ``torch.distributed`` has not been initialised.
    """
    if not dist.is_initialized():
        raise ShardingError(
            "sharding needs torch.distributed: call init_process_group (gloo on CPU, nccl on GPU) first"
        )
    return init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("learners",))


def shard_models(models: TrainModels, mesh: DeviceMesh, *, options: ShardingOptions) -> TrainModels:
    """Shard the policy, the critic and the reference in place over ``mesh``; returns ``models``.

    Call it on every rank, on identical models, before building the optimizers.
    """
    for model in (models.policy, models.critic, models.reference):
        if model is not None:
            shard_model(model, mesh, options=options)
    return models


def shard_model(model: nn.Module, mesh: DeviceMesh, *, options: ShardingOptions) -> FSDPModule:
    """One FSDP unit per transformer block, then the root; gradients are summed over the ranks, not averaged.

    Raises:
        ShardingError: the model has no transformer blocks that Hugging Face names (``_no_split_modules``).
    """
    settings: dict[str, Any] = {"mesh": mesh}
    if options.mixed_precision:
        settings["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if options.offload:
        settings["offload_policy"] = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda")
    blocks = transformer_blocks(model)
    if not blocks:
        raise ShardingError(
            f"{type(model).__name__} names no transformer block class (_no_split_modules): set "
            "learner.strategy=replicate for it"
        )
    for block in blocks:
        fully_shard(block, **settings)
    root = fully_shard(model, **settings)
    # The learner's losses are divided by the whole mini-batch's token count, so the ranks' gradients must
    # add up (FSDP would average them). One factor for every unit: set_gradient_divide_factor reaches only
    # the unit it is called on.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            if mesh.device_type == "cpu":
                # gloo has no pre-multiplied sum (NCCL's PREMUL_SUM): ask for plain sums.
                module.set_force_sum_reduction_for_comms(True)
    return root


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is an FSDP unit (its forward and backward passes are then collectives)."""
    return isinstance(model, FSDPModule)


class ShardedDataParallel(TorchDataParallel):
    """The learners of a sharded update.

    Shares, gathers and shuffles as data parallelism does, while FSDP reduces the gradients inside
    ``backward``: here the learners only agree on the loss and on finiteness.
    """

    def reduce_gradients(self, model: nn.Module, *, loss: float, finite: bool) -> tuple[float, bool]:
        """Sum ``loss`` over the learners; finite only where finite on all (gradients are FSDP's)."""
        agreement = torch.tensor(
            [float(not finite), loss if finite else 0.0], dtype=torch.float64, device=self.device
        )
        dist.all_reduce(agreement)
        not_finite, total_loss = agreement.tolist()
        return total_loss, not not_finite


def local_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes this rank holds of ``tensors`` (a sharded tensor counts its local shard only)."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The tensors of an optimizer's per-parameter state (AdamW: step, exp_avg, exp_avg_sq)."""
    states: Iterable[Mapping[str, Any]] = optimizer.state.values()
    return [value for state in states for value in state.values() if isinstance(value, Tensor)]


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of ``model`` whole, on the CPU, on every rank (sharded or not)."""
    state = model.state_dict()
    return {
        name: (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu()
        for name, value in state.items()
    }


SHARDED_STATE_DIR = "sharded"
"""The ``torch.distributed.checkpoint`` folder inside a checkpoint written by sharded learners."""


def save_sharded(
    checkpoint: Path, *, models: TrainModels, optimizers: Mapping[str, torch.optim.Optimizer]
) -> Path:
    """Every rank writes its shards of the trained models and their optimizer states (a collective).

    Args:
        checkpoint: the checkpoint folder (``step_N``); the state goes to its ``sharded/`` folder.
        models: the sharded models; the frozen reference is not saved (it is the initial policy).
        optimizers: each trained model's optimizer, keyed by the model's role (``policy``, ``critic``).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    trained = _trained_models(models)
    state = {
        "models": {role: get_model_state_dict(model) for role, model in trained.items()},
        "optimizers": {
            role: get_optimizer_state_dict(trained[role], optimizer) for role, optimizer in optimizers.items()
        },
    }
    target = checkpoint / SHARDED_STATE_DIR
    dcp.save(state, checkpoint_id=target)
    return target


def load_sharded(
    checkpoint: Path, *, models: TrainModels, optimizers: Mapping[str, torch.optim.Optimizer]
) -> None:
    """Load what :func:`save_sharded` wrote into sharded models and optimizers (any number of ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    trained = _trained_models(models)
    state: dict[str, dict[str, Any]] = {
        "models": {role: get_model_state_dict(model) for role, model in trained.items()},
        "optimizers": {
            role: get_optimizer_state_dict(trained[role], optimizer) for role, optimizer in optimizers.items()
        },
    }
    dcp.load(state, checkpoint_id=checkpoint / SHARDED_STATE_DIR)
    for role, model in trained.items():
        set_model_state_dict(model, state["models"][role])
    for role, optimizer in optimizers.items():
        set_optimizer_state_dict(trained[role], optimizer, state["optimizers"][role])


def _trained_models(models: TrainModels) -> dict[str, nn.Module]:
    trained: dict[str, nn.Module] = {"policy": models.policy}
    if models.critic is not None:
        trained["critic"] = models.critic
    return trained
