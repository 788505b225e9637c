"""The generation interface shared by the transformers and vLLM backends, and the transformers backend.

A backend turns a batch of prompts (token ids) into one ``Generation`` per prompt: the ids exactly as
sampled, ending right after the token that completes a stop string or after EOS, the sampler's log-probs
of those ids, and why generation ended. Nothing is decoded and re-tokenized, so the ids the trainer
scores are the ids the policy produced.
"""

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import CacheLayerMixin

from searchgym.errors import SearchgymError
from searchgym.policy.models import Policy

FinishReason = Literal["stop", "eos", "length"]
"""``stop``: a stop string was completed; ``eos``: an end-of-sequence token; ``length``: the token limit."""

DEFAULT_STOP = ("</search>", "</answer>")


class SamplingError(SearchgymError):
    """Sampling parameters out of range."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to sample one turn.

    The sampler log-probs a backend reports are those of the distribution it sampled from: after
    temperature, top-k and top-p (of the raw logits when greedy). With ``top_p=1`` and ``top_k=0`` (the RL
    setting) they equal the trainer's temperature-scaled log-probs, up to numerics.

    Attributes:
        max_new_tokens: the most tokens to generate per prompt.
        temperature: softmax temperature; 0 means greedy (argmax).
        top_p: nucleus sampling mass in (0, 1]; 1 turns it off.
        top_k: keep the k most likely tokens; 0 turns it off.
        seed: seed of the sampler's random stream for this call; None uses the global torch RNG.
        stop: strings that end generation; the token that completes one is kept.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = DEFAULT_STOP

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise SamplingError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if any(not s for s in self.stop):
            raise SamplingError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        """Whether decoding takes the argmax instead of sampling."""
        return self.temperature == 0


@dataclass(frozen=True, slots=True)
class Generation:
    """What a backend generated for one prompt.

    Attributes:
        token_ids: (N,) the sampled ids, ending right after the token that completes a stop string or after
            the EOS token (both kept), or at the token limit.
        logprobs: (N,) the sampler's log-prob of each id, or None when the backend gives none.
        finish_reason: why generation ended.
    """

    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: FinishReason


class Generator(Protocol):
    """A generation backend: what the rollout calls to let the policy write its next turn."""

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer of the policy (the rollout decodes actions and encodes observations with it)."""
        ...

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        """Generate a continuation of each prompt.

        Args:
            prompts: the token ids of each prompt (lengths may differ).
            params: sampling parameters shared by the batch.
            max_new_tokens: a per-prompt token limit (each at most ``params.max_new_tokens``) for prompts
                whose context budget is nearly spent; ``params.max_new_tokens`` for all when None.
        """
        ...


def token_limits(num_prompts: int, params: SamplingParams, max_new_tokens: Sequence[int] | None) -> list[int]:
    """Each prompt's token limit: the per-prompt limits capped by ``params.max_new_tokens``.

    Raises:
        SamplingError: the per-prompt limits do not match the prompts or are below 1.
    """
    if max_new_tokens is None:
        return [params.max_new_tokens] * num_prompts
    if len(max_new_tokens) != num_prompts:
        raise SamplingError(f"{len(max_new_tokens)} token limits for {num_prompts} prompts")
    if any(limit < 1 for limit in max_new_tokens):
        raise SamplingError(f"every per-prompt token limit must be at least 1, got {list(max_new_tokens)}")
    return [min(limit, params.max_new_tokens) for limit in max_new_tokens]


class StopMatcher:
    """Finds the token that completes a stop string, on token ids, as generation goes.

    Only the last few tokens are decoded at each step: a stop string of ``b`` UTF-8 bytes spans at most
    ``b`` tokens, so it is completed by the newest token exactly when it first appears in that window.
    Special tokens are skipped when decoding, as vLLM's detokenizer does.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.window = max((len(s.encode()) for s in self.stop), default=0) + 1

    def completed(self, token_ids: Sequence[int]) -> bool:
        """Whether the ids, whose earlier prefixes completed no stop string, now end one."""
        if not self.stop:
            return False
        tail = self.tokenizer.decode(list(token_ids[-self.window :]), skip_special_tokens=True)
        return any(s in tail for s in self.stop)


class TransformersGenerator:
    """Batched sampling with a transformers model: a left-padded prefill, then a token a step on a KV cache.

    Sequences that finish leave the batch (their rows are dropped from the cache), so a batch costs what
    its still-running sequences cost. Greedy results do not depend on how prompts are batched.

    Multi-turn rollouts send back each context with the policy's last turn and an observation appended.
    With ``reuse_kv``, the KV cache of every sequence a call generated is kept until the next call, and a
    prompt that extends one of them only prefills its new tokens, which saves most of the prefill of a
    rollout. Kept caches are dropped as soon as the model's weights change in place (an optimizer step,
    ``load_state_dict``).

    Args:
        policy: the model and tokenizer.
        max_batch_size: prompts are generated in chunks of at most this many (memory bound).
        reuse_kv: keep the last call's KV caches for prompts that extend its sequences (memory: one
            batch's caches).

    Attributes:
        prefilled_tokens: prompt tokens run through the model so far (padding and reused prefixes
            not counted).
    """

    def __init__(self, policy: Policy, *, max_batch_size: int = 64, reuse_kv: bool = True) -> None:
        self.policy = policy
        self.max_batch_size = max_batch_size
        self.reuse_kv = reuse_kv
        self._kept: list[_KVPrefix] = []
        self._kept_version: int | None = None
        self.prefilled_tokens = 0
        eos = policy.model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.eos_ids = frozenset(int(i) for i in [*eos_ids, policy.tokenizer.eos_token_id] if i is not None)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The policy's tokenizer."""
        return self.policy.tokenizer

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        """Generate a continuation of each prompt (see ``Generator.generate``)."""
        limits = token_limits(len(prompts), params, max_new_tokens)
        rng = None
        if params.seed is not None:
            rng = torch.Generator(device=self.policy.device).manual_seed(params.seed)
        version = _weights_version(self.policy.model)
        previous = self._kept if version == self._kept_version else []
        self._kept, self._kept_version = [], version
        results: list[Generation] = []
        for start in range(0, len(prompts), self.max_batch_size):
            chunk = slice(start, start + self.max_batch_size)
            pasts = [_longest_prefix(previous, prompt) for prompt in prompts[chunk]]
            if self.reuse_kv:
                pasts = self._share_common_prefix(prompts[chunk], pasts)
            results.extend(self._generate_batch(prompts[chunk], pasts, limits[chunk], params, rng))
        return results

    @torch.no_grad()
    def _share_common_prefix(
        self, prompts: Sequence[Sequence[int]], pasts: list["_KVPrefix | None"]
    ) -> list["_KVPrefix | None"]:
        """Give the prompts without a kept cache the KV cache of their longest common prefix, run once.

        First turns of a batch share the chat template and the task's instructions (70 of SmolLM2's 85
        prompt tokens in the demo): those are then computed once instead of once per prompt. Each prompt
        keeps at least its last token to feed, whose logits start its generation.
        """
        fresh = [prompt for prompt, past in zip(prompts, pasts, strict=True) if past is None]
        if len({tuple(prompt) for prompt in fresh}) < 2:
            return pasts  # nothing, or one distinct prompt: _generate_batch runs it once anyway
        length = min(_common_prefix_length(fresh), min(len(prompt) for prompt in fresh) - 1)
        if length < 1:
            return pasts
        shared = tuple(fresh[0][:length])
        cache = DynamicCache(config=self.policy.model.config)
        self.policy.model(
            input_ids=torch.tensor([shared], device=self.policy.device),
            use_cache=True,
            logits_to_keep=1,
            **_cache_argument(self.policy.model, cache),
        )
        prefix = _KVPrefix(shared, *_cache_row(cache, 0, slice(None)))
        self.prefilled_tokens += length
        return [prefix if past is None else past for past in pasts]

    # no_grad, not inference_mode: a sharded learner's policy (an FSDP2 unit) generates here too, and FSDP
    # tracks the version counters that inference tensors lack.
    @torch.no_grad()
    def _generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        pasts: list["_KVPrefix | None"],
        limits: list[int],
        params: SamplingParams,
        rng: torch.Generator | None,
    ) -> list[Generation]:
        if any(len(p) == 0 for p in prompts):
            raise SamplingError("cannot generate from an empty prompt")
        # Each distinct (prompt, cache) is prefilled once, then its cache and logits are copied to the
        # rows that repeat it (the samples of a GRPO group), which sample on their own from there.
        # Two rows prefill alike when they have the same prompt and the same kept cache.
        keys = [(tuple(prompt), id(past)) for prompt, past in zip(prompts, pasts, strict=True)]
        first_row: dict[tuple[tuple[int, ...], int], int] = {}
        for row, key in enumerate(keys):
            first_row.setdefault(key, row)
        leaders = list(first_row.values())
        for row in leaders:  # a repeated prompt is prefilled once, from its kept prefix if it has one
            past = pasts[row]
            self.prefilled_tokens += len(prompts[row]) - (0 if past is None else len(past.token_ids))
        state = _DecodeState.prefill(
            self.policy, [prompts[row] for row in leaders], [pasts[row] for row in leaders]
        )
        if len(leaders) < len(prompts):
            slot = {key: i for i, key in enumerate(first_row)}
            state.repeat_rows([slot[key] for key in keys])
        warpers = _warpers(params)
        matcher = StopMatcher(self.tokenizer, params.stop)
        generated: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        finished: dict[int, Generation] = {}
        while True:
            tokens, token_logprobs = _sample(state.logits, warpers, params.greedy, rng)
            running = []
            for i, (token, logprob) in enumerate(zip(tokens.tolist(), token_logprobs.tolist(), strict=True)):
                row = state.rows[i]
                generated[row].append(token)
                logprobs[row].append(logprob)
                reason = self._finish_reason(generated[row], limits[row], matcher)
                if reason is None:
                    running.append(i)
                else:
                    finished[row] = Generation(generated[row], logprobs[row], reason)
                    if self.reuse_kv:
                        # The cache holds everything fed so far: the prompt and all but the newest token.
                        covered = (*prompts[row], *generated[row][:-1])
                        self._kept.append(_KVPrefix(covered, *state.kv_of(i)))
            if not running:
                return [finished[row] for row in range(len(prompts))]
            state.step(self.policy, tokens, running)

    def _finish_reason(self, token_ids: list[int], limit: int, matcher: StopMatcher) -> FinishReason | None:
        if token_ids[-1] in self.eos_ids:
            return "eos"
        if matcher.completed(token_ids):
            return "stop"
        if len(token_ids) >= limit:
            return "length"
        return None


@dataclass(slots=True)
class _DecodeState:
    """The running part of a batch: its rows, KV cache, attention mask and the next-token logits.

    Attributes:
        rows: index into the batch of each running sequence.
        cache: KV cache of the running sequences.
        attention_mask: (B, T) 0 on left padding.
        positions: (B,) position id of the latest token of each running sequence.
        logits: (B, V) next-token logits, fp32.
    """

    rows: list[int]
    cache: DynamicCache
    attention_mask: torch.Tensor
    positions: torch.Tensor
    logits: torch.Tensor

    @classmethod
    def prefill(
        cls, policy: Policy, prompts: Sequence[Sequence[int]], pasts: "Sequence[_KVPrefix | None]"
    ) -> "_DecodeState":
        """Run the prompts through the model, from their kept KV prefix when they have one.

        A padded token costs a prefill as much as a real one, so prompts whose new parts differ much in
        length are prefilled in groups of similar length, whose caches are then joined into one batch.
        """
        new_lengths = [
            len(prompt) - (0 if past is None else len(past.token_ids))
            for prompt, past in zip(prompts, pasts, strict=True)
        ]
        groups = length_groups(new_lengths, PREFILL_CALL_TOKENS)
        if len(groups) == 1:
            return cls._prefill_padded(policy, prompts, pasts)
        parts = [
            cls._prefill_padded(policy, [prompts[i] for i in group], [pasts[i] for i in group])
            for group in groups
        ]
        return cls._join(parts, groups, prompts, policy)

    @classmethod
    def _join(
        cls,
        parts: "Sequence[_DecodeState]",
        groups: Sequence[Sequence[int]],
        prompts: Sequence[Sequence[int]],
        policy: Policy,
    ) -> "_DecodeState":
        """One state of all prompts, in their order, from the states of ``groups`` of them.

        Each row keeps only its real tokens' keys and values, right-aligned; the keys carry their
        positions already (rotary embeddings are applied before caching), so the columns they move to
        do not matter.
        """
        kept = [
            _KVPrefix(tuple(prompts[row]), *part.kv_of(local))
            for part, group in zip(parts, groups, strict=True)
            for local, row in enumerate(group)
        ]
        # The parts hold the rows group after group; the inverse of that permutation puts them back.
        order = torch.tensor([row for group in groups for row in group]).argsort().tolist()
        width = max(len(prompt) for prompt in prompts)
        cache = DynamicCache(config=policy.model.config)
        _fill_cache(cache, [kept[position] for position in order], width)
        lengths = torch.tensor([len(prompt) for prompt in prompts], device=policy.device)
        columns = torch.arange(width, device=policy.device)
        return cls(
            rows=list(range(len(prompts))),
            cache=cache,
            attention_mask=(columns[None, :] >= width - lengths[:, None]).long(),
            positions=lengths - 1,
            logits=torch.cat([part.logits for part in parts])[order],
        )

    @classmethod
    def _prefill_padded(
        cls, policy: Policy, prompts: Sequence[Sequence[int]], pasts: "Sequence[_KVPrefix | None]"
    ) -> "_DecodeState":
        """Prefill the prompts as one left-padded batch.

        Row ``i`` is laid out as ``[pad, past_i, pad, new_i]`` (``P`` past columns, ``N`` new ones); the
        attention mask hides the padding, and position ids count real tokens only.
        """
        device = policy.device
        past_lengths = [0 if past is None else len(past.token_ids) for past in pasts]
        news = [list(prompt[length:]) for prompt, length in zip(prompts, past_lengths, strict=True)]
        past_width, new_width = max(past_lengths), max(len(new) for new in news)
        pad = policy.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (new_width - len(new)) + new for new in news], device=device)
        attention_mask = torch.tensor(
            [
                [0] * (past_width - length) + [1] * length + [0] * (new_width - len(new)) + [1] * len(new)
                for length, new in zip(past_lengths, news, strict=True)
            ],
            device=device,
        )
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, past_width:]
        cache = DynamicCache(config=policy.model.config)
        if past_width:
            _fill_cache(cache, pasts, past_width)
        output = policy.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **_cache_argument(policy.model, cache),
        )
        return cls(
            rows=list(range(len(prompts))),
            cache=cache,
            attention_mask=attention_mask,
            positions=position_ids[:, -1],
            logits=output.logits[:, -1, :].float(),
        )

    def repeat_rows(self, sources: list[int]) -> None:
        """Make row ``i`` a copy of current row ``sources[i]`` (its cache, mask, position and logits)."""
        index = torch.tensor(sources, device=self.logits.device)
        self.cache.batch_select_indices(index)
        self.attention_mask = self.attention_mask[index]
        self.positions = self.positions[index]
        self.logits = self.logits[index]
        self.rows = list(range(len(sources)))

    def kv_of(self, index: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Keys and values, per layer ``(H, T, D)``, of running row ``index`` without its padding."""
        return _cache_row(self.cache, index, self.attention_mask[index].nonzero().squeeze(-1))

    def step(self, policy: Policy, tokens: torch.Tensor, running: list[int]) -> None:
        """Keep the ``running`` rows (indices into ``rows``) and feed each its newest token."""
        if len(running) < len(self.rows):
            keep = torch.tensor(running, device=tokens.device)
            self.cache.batch_select_indices(keep)
            self.attention_mask = self.attention_mask[keep]
            self.positions = self.positions[keep]
            tokens = tokens[keep]
            self.rows = [self.rows[i] for i in running]
        new_column = self.attention_mask.new_ones(len(self.rows), 1)
        self.attention_mask = torch.cat([self.attention_mask, new_column], dim=1)
        self.positions = self.positions + 1
        output = policy.model(
            input_ids=tokens[:, None],
            attention_mask=self.attention_mask,
            position_ids=self.positions[:, None],
            use_cache=True,
            **_cache_argument(policy.model, self.cache),
        )
        self.logits = output.logits[:, -1, :].float()


@dataclass(frozen=True, slots=True)
class _KVPrefix:
    """The KV cache of one sequence a call generated, kept for a later prompt that extends it.

    Attributes:
        token_ids: the tokens the cache covers.
        keys: per layer, (H, T, D).
        values: per layer, (H, T, D).
    """

    token_ids: tuple[int, ...]
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]


def _cache_argument(model: torch.nn.Module, cache: DynamicCache) -> dict[str, DynamicCache]:
    """The keyword argument that hands ``model`` its KV cache.

    transformers renamed ``past_key_values`` to ``cache`` within the 5.x range setup.cfg allows, and the old
    name goes in 5.40: a model is given the name its ``forward`` declares.
    """
    return {cache_keyword(type(model).forward): cache}


@functools.cache  # read once per model class: a signature lookup costs ~50 us, and it is asked every step
def cache_keyword(forward: Callable[..., Any]) -> str:
    """``cache`` or ``past_key_values``: the name under which a model's ``forward`` takes its KV cache."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _weights_version(model: torch.nn.Module) -> int:
    """A number that changes whenever a parameter is modified in place (torch counts tensor versions)."""
    return sum(parameter._version for parameter in model.parameters())


def _longest_prefix(kept: list[_KVPrefix], prompt: Sequence[int]) -> _KVPrefix | None:
    """The kept cache with the most tokens that is a strict prefix of ``prompt`` (None if there is none)."""
    prompt = tuple(prompt)
    matches = [
        p for p in kept if len(p.token_ids) < len(prompt) and prompt[: len(p.token_ids)] == p.token_ids
    ]
    return max(matches, key=lambda p: len(p.token_ids), default=None)


def _cache_row(
    cache: DynamicCache, row: int, columns: torch.Tensor | slice
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Keys and values, per layer ``(H, T, D)``, of batch ``row`` of ``cache`` at sequence ``columns``."""
    keys, values = [], []
    for layer in cache.layers:
        # A causal LM's DynamicCache: attention layers only, their keys and values set by a forward pass.
        assert isinstance(layer, CacheLayerMixin) and layer.keys is not None and layer.values is not None
        keys.append(layer.keys[row][:, columns])
        values.append(layer.values[row][:, columns])
    return tuple(keys), tuple(values)


PREFILL_CALL_TOKENS = 32
"""What one more prefill call costs, in padded prompt tokens: the price of splitting a batch by length."""


def length_groups(lengths: Sequence[int], call_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` split into groups of similar length whose padded prefill costs least.

    A group costs its rows times its longest length, plus ``call_tokens``; the split of the sorted
    lengths into consecutive runs with the least total cost is found by dynamic programming.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    ordered = [lengths[i] for i in order]
    best: list[float] = [0.0] + [math.inf] * len(order)  # best[end]: cheapest split of the first ``end`` rows
    start_of = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end):
            cost = best[start] + (end - start) * ordered[end - 1] + call_tokens
            if cost < best[end]:
                best[end], start_of[end] = cost, start
    groups: list[list[int]] = []
    end = len(order)
    while end:
        groups.append(sorted(order[start_of[end] : end]))
        end = start_of[end]
    return groups[::-1]


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all ``sequences`` share."""
    shortest = min(len(sequence) for sequence in sequences)
    for position in range(shortest):
        token = sequences[0][position]
        if any(sequence[position] != token for sequence in sequences):
            return position
    return shortest


def _fill_cache(cache: DynamicCache, pasts: Sequence[_KVPrefix | None], width: int) -> None:
    """Put the kept prefixes into an empty cache, left-padded with zeros to ``width`` positions."""
    template = next(past for past in pasts if past is not None)
    for layer, (key, value) in enumerate(zip(template.keys, template.values, strict=True)):
        heads, _, dim = key.shape
        keys = key.new_zeros(len(pasts), heads, width, dim)
        values = value.new_zeros(len(pasts), heads, width, dim)
        for row, past in enumerate(pasts):
            if past is not None:
                length = len(past.token_ids)
                keys[row, :, width - length :] = past.keys[layer]
                values[row, :, width - length :] = past.values[layer]
        cache.update(keys, values, layer)


def _warpers(params: SamplingParams) -> LogitsProcessorList:
    """The temperature, top-k and top-p warpers of transformers, in the order its own sampler applies them."""
    warpers = LogitsProcessorList()
    if params.greedy:
        return warpers
    if params.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(top_k=params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=params.top_p))
    return warpers


def _sample(
    logits: torch.Tensor, warpers: LogitsProcessorList, greedy: bool, rng: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens (B,) and their log-probs (B,) under the sampled-from distribution."""
    if greedy:
        log_probs = torch.log_softmax(logits, dim=-1)
        tokens = log_probs.argmax(dim=-1)
    else:
        # The warpers ignore the input ids; they only reshape the scores.
        scores = warpers(None, logits)  # type: ignore[arg-type]
        log_probs = torch.log_softmax(scores, dim=-1)
        tokens = torch.multinomial(log_probs.exp(), num_samples=1, generator=rng).squeeze(-1)
    return tokens, log_probs.gather(-1, tokens[:, None]).squeeze(-1)
