"""LoRA adapters (peft) on the policy and optionally the critic: what the optimizer, checkpoints and sync see.

With ``model.lora.rank > 0`` the policy's linear layers named in ``model.lora.targets`` get low-rank
adapters (``W + alpha/rank * B @ A``, ``B`` zero at the start, so the first policy equals the base model)
and every base weight is frozen. Then:

- the optimizer holds only the adapter parameters (it already takes the parameters that require grads);
- a checkpoint holds only the trainable parameters (:func:`trainable_state`): adapters, and the critic's
  value head;
- the reference policy of the KL term is the same model with its adapters switched off
  (:func:`adapters_disabled`), not a second copy of the weights;
- the rollout engines and the export get plain weights with the adapters merged in (:func:`merged_state`),
  under the base model's parameter names, so vLLM and ``from_pretrained`` load them as any model.

The adapters are injected into the model in place (``peft.inject_adapter_in_model``), so the policy stays
the same ``PreTrainedModel`` object for generation, log-probs and gradient checkpointing. peft is imported
only here, inside the functions that need it (the ``lora`` extra).
"""

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from searchgym.errors import SearchgymError

_LORA_MARK = "lora_"
_BASE_LAYER = ".base_layer"


class LoraSetupError(SearchgymError):
    """LoRA cannot be applied as configured (peft missing, or no target layer in the model)."""


def apply_lora(
    model: nn.Module, *, rank: int, alpha: int, targets: tuple[str, ...], dropout: float
) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place and freeze everything else; returns ``model``.

    Args:
        model: a causal LM (or a critic body).
        rank: the adapters' rank ``r``.
        alpha: the scale numerator: the update is ``alpha / rank * B @ A``.
        targets: names (or name suffixes) of the linear layers to adapt, e.g. ``("q_proj", "v_proj")``;
            ``("all-linear",)`` adapts every linear layer but the LM head.
        dropout: dropout on the adapters' input during training.

    Raises:
        LoraSetupError: peft is not installed, or no layer of the model matches ``targets``.
    """
    try:
        import peft  # the lora extra
    except ImportError as error:
        raise LoraSetupError(
            "model.lora.rank > 0 needs peft: pip install 'searchgym[lora]' (or set model.lora.rank=0)"
        ) from error
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules="all-linear" if targets == ("all-linear",) else list(targets),
        bias="none",
    )
    try:
        peft.inject_adapter_in_model(config, model)
    except ValueError as error:
        raise LoraSetupError(
            f"model.lora.targets={list(targets)}: {error}. Name linear layers of this model "
            "(q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj for Llama/Qwen) or all-linear"
        ) from error
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(_LORA_MARK in name)
    return model


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries LoRA adapters (injected by :func:`apply_lora`)."""
    return any(_LORA_MARK in name for name, _ in model.named_parameters())


def _adapter_layers(model: nn.Module) -> list[Any]:
    """The model's peft adapter layers (``BaseTunerLayer``; typed Any, peft being optional)."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # only called on models that have adapters

    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base model (the frozen reference policy) inside the block."""
    layers = _adapter_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of a model with adapters: only its trainable parameters."""
    return {
        name: parameter.detach() for name, parameter in model.named_parameters() if parameter.requires_grad
    }


def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load what :func:`trainable_state` saved; the frozen base weights stay as they are.

    Raises:
        LoraSetupError: the state does not hold exactly this model's trainable parameters (a checkpoint of
            a run with other LoRA settings).
    """
    expected = set(trainable_state(model))
    if set(state) != expected:
        raise LoraSetupError(
            f"the checkpoint holds {len(state)} trainable tensors where this run has {len(expected)} "
            f"(e.g. {sorted(set(state) ^ expected)[:3]}): resume with the same model.lora settings"
        )
    model.load_state_dict(dict(state), strict=False)


@torch.no_grad()
def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of ``model`` with its adapters merged in, under the base model's names.

    ``q_proj.base_layer.weight`` plus the adapter's ``alpha/rank * B @ A`` becomes ``q_proj.weight``; the
    adapter tensors are left out. The model itself is not changed. A model without adapters gives its
    ``state_dict``.
    """
    state = model.state_dict()
    if not has_lora(model):
        return state
    merged = {
        name.replace(_BASE_LAYER, ""): tensor for name, tensor in state.items() if _LORA_MARK not in name
    }
    adapted = {id(layer) for layer in _adapter_layers(model)}
    for module_name, module in model.named_modules():
        if id(module) in adapted:
            weight = module.get_base_layer().weight
            delta = sum(module.get_delta_weight(name) for name in module.active_adapters)
            merged[f"{module_name}.weight"] = weight + delta.to(weight.dtype)
    return merged
