"""The models a run trains or consults: policy, critic (PPO) and frozen reference, and their forward passes.

Every forward pass here reads a :class:`~searchgym.train.batch.Batch` and returns ``(B, R)`` tensors aligned
with the
response: position ``t`` holds what the model says about response token ``t`` given everything before it.
"""

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from searchgym.errors import SearchgymError
from searchgym.policy.logprobs import sequence_logprobs
from searchgym.train.lora import adapters_disabled, apply_lora

if TYPE_CHECKING:  # for the type checker only: the models import no env code (benchmarks/gpu_check.py)
    from searchgym.train.batch import Batch
    from searchgym.train.config import LoraConfig


class ValueModel(nn.Module):
    """The critic: a language model's transformer body with a fresh, bias-free linear value head.

    Args:
        body: the base model of a causal LM (without its LM head); returns ``last_hidden_state``.
        hidden_size: width of the body's hidden states.
    """

    def __init__(self, body: PreTrainedModel, hidden_size: int) -> None:
        super().__init__()
        self.body = body
        self.value_head = nn.Linear(hidden_size, 1, bias=False)
        # Zero values at the start: the critic's first predictions match an outcome reward of 0 rather than
        # random numbers whose errors would dominate the first advantages.
        nn.init.zeros_(self.value_head.weight)

    @classmethod
    def from_causal_lm(cls, model: PreTrainedModel) -> "ValueModel":
        """A critic whose body is a copy of ``model``'s base model (the LM head is dropped)."""
        body = copy.deepcopy(model.base_model)
        # Declared an nn.Module, base_model is the body's PreTrainedModel (or the model itself, bodiless).
        assert isinstance(body, PreTrainedModel)
        return cls(body, model.config.hidden_size).to(model.device)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        """(B, T) the value of each position's state, in float32."""
        hidden = self.body(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        # The loss reads the values in float32: the head runs outside autocast on float32 operands (a bf16
        # value would round a return of 0.75 to within 0.004, the size of a late-training advantage).
        # A product with the head's one row, not a linear layer's (B, T, 1) squeezed: a sharded critic's
        # output must not be a view (FSDP's backward hook would be lost to an in-place op on it).
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return hidden.float() @ self.value_head.weight.float()[0]


@dataclass(slots=True)
class TrainModels:
    """What a run holds in memory.

    Attributes:
        policy: the causal LM being trained (the actor), with LoRA adapters when ``model.lora.rank > 0``.
        reference: a frozen copy of the initial policy, or None when the KL coefficient is 0 or when the
            reference is the policy with its adapters switched off (``reference_is_base``).
        critic: the value model (PPO), or None (GRPO).
        reference_is_base: the KL reference is the LoRA policy's base model (no second copy in memory).
        compiled: the models' transformer blocks run through ``torch.compile``, and so do the log-probs'
            float32 softmax passes (``sequence_logprobs(compiled=True)``).
    """

    policy: PreTrainedModel
    reference: PreTrainedModel | None
    critic: ValueModel | None
    reference_is_base: bool = False
    compiled: bool = False


@contextlib.contextmanager
def reference_policy(models: TrainModels) -> Iterator[PreTrainedModel | None]:
    """The reference policy inside the block: the frozen copy, the policy with adapters off, or None."""
    if not models.reference_is_base:
        yield models.reference
        return
    with adapters_disabled(models.policy):
        yield models.policy


def build_train_models(
    policy: PreTrainedModel,
    *,
    with_reference: bool,
    with_critic: bool,
    gradient_checkpointing: bool = False,
    lora: "LoraConfig | None" = None,
    compile_blocks: bool = False,
) -> TrainModels:
    """Wrap the initial ``policy`` with the reference copy and the critic the algorithm needs.

    Both are taken from the policy before any update, so a resumed run rebuilds them identically from the
    same starting model (and then loads the critic's trained weights from its checkpoint). With ``lora``
    enabled, adapters are injected into the policy (and the critic's body with ``lora.critic``) after the
    critic is copied from the base model, and the reference is the base model itself.
    """
    critic = ValueModel.from_causal_lm(policy) if with_critic else None
    reference = None
    use_lora = lora is not None and lora.enabled
    if use_lora:
        assert lora is not None
        _add_adapters(policy, lora)
        if critic is not None and lora.critic:
            _add_adapters(critic.body, lora)
    elif with_reference:
        reference = copy.deepcopy(policy).eval()
        reference.requires_grad_(False)
    if gradient_checkpointing:
        policy.activation_checkpointing_enable()
        if critic is not None:
            critic.body.activation_checkpointing_enable()
        if use_lora:
            # With a frozen embedding no checkpointed segment's input would require grad, and reentrant
            # checkpointing would then give the adapters no gradient.
            policy.enable_input_require_grads()
            if critic is not None:
                critic.body.enable_input_require_grads()
    if compile_blocks:
        for model in (policy, reference, critic):
            if model is not None:
                compile_transformer_blocks(model)
    return TrainModels(
        policy=policy,
        reference=reference,
        critic=critic,
        reference_is_base=use_lora and with_reference,
        compiled=compile_blocks,
    )


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of every Hugging Face model inside ``model`` (decoder layers of policy or critic).

    Found by the class names the models declare unsplittable (``_no_split_modules``); empty if none.
    """
    names = {
        name
        for module in model.modules()
        if isinstance(module, PreTrainedModel)
        for name in (getattr(module, "_no_split_modules", None) or ())
    }
    return [module for module in model.modules() if type(module).__name__ in names]


COMPILE_VARIANT_LIMIT = 32
"""Graphs torch.compile may keep per block's code before running it eagerly (its default is 8)."""


def compile_transformer_blocks(model: nn.Module) -> None:
    """Run each transformer block of ``model`` through ``torch.compile``, in place.

    Between its matmuls a block is a chain of memory-bound elementwise kernels (norms in float32, the
    activation, rotary embeddings, casts, residual adds) that compilation fuses: on an H100 they took more
    GPU time than the matmuls in a 1.5B update. Compiled per block, not per model: one block's code serves
    every layer, the compile stays short, and FSDP still wraps each block.

    Raises:
        SearchgymError: ``model`` declares no transformer block.
    """
    blocks = transformer_blocks(model)
    if not blocks:
        raise SearchgymError(
            f"{type(model).__name__} names no transformer block class (_no_split_modules): set "
            "model.compile=false for it"
        )
    # Each variant of a block (gradients on or off, recomputation, the policy and its frozen reference)
    # is a graph of its own; past the limit torch would silently run the block uncompiled.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_VARIANT_LIMIT)
    for block in blocks:
        block.compile()


def _add_adapters(model: PreTrainedModel, lora: "LoraConfig") -> None:
    apply_lora(model, rank=lora.rank, alpha=lora.alpha, targets=lora.targets, dropout=lora.dropout)


def response_logprobs(
    model: PreTrainedModel, batch: "Batch", *, temperature: float, compiled: bool = False
) -> tuple[Tensor, Tensor]:
    """Log-probs and entropies of the policy tokens under ``model`` at sampling ``temperature``.

    Returns:
        ``(logprobs, entropy)``, both (B, R) in float32 and 0 off the policy tokens (observations, padding).
    """
    scores = sequence_logprobs(
        model,
        batch.sequences,
        temperature=temperature,
        micro_batch_size=batch.size,
        with_entropy=True,
        scored=batch.policy_mask,
        compiled=compiled,
    )
    assert scores.entropy is not None  # asked for with_entropy
    return scores.logprobs, scores.entropy


def response_values(critic: ValueModel, batch: "Batch") -> Tensor:
    """(B, R) the critic's value of the state before each response token, in float32."""
    values = critic(batch.sequences.input_ids, batch.sequences.attention_mask, batch.position_ids)
    return values[:, -batch.response_length - 1 : -1].float()
