"""Log-probs of final sequences: the trainer's source of truth, and its mismatch with the sampler's.

The trainer re-scores every response with the model it is updating; the sampler's log-probs (from the
generation backend) differ by numerics (batching, kernels, bf16) and, for vLLM, by weights that lag a
step behind. ``logprob_mismatch`` measures that gap on the policy tokens only.
"""

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel


@dataclass(frozen=True, slots=True)
class SequenceBatch:
    """Prompt and response ids of a batch, left-padded prompts and right-padded responses.

    Attributes:
        input_ids: (B, P + R) prompt then response; P and R are the longest prompt and response.
        attention_mask: (B, P + R) 1 on real tokens.
        response_mask: (B, R) 1 on real response tokens (padding 0).
        prompt_width: P, where every response starts.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_width: int

    @classmethod
    def from_ids(
        cls,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        *,
        pad_token_id: int,
        device: torch.device | str = "cpu",
    ) -> "SequenceBatch":
        """Pack token-id lists: prompts aligned on their right edge so that all responses start at P."""
        prompt_width = max(len(p) for p in prompts)
        response_width = max(max(len(r) for r in responses), 1)
        rows, masks, response_masks = [], [], []
        for prompt, response in zip(prompts, responses, strict=True):
            left = prompt_width - len(prompt)
            right = response_width - len(response)
            rows.append([pad_token_id] * left + [*prompt, *response] + [pad_token_id] * right)
            masks.append([0] * left + [1] * (len(prompt) + len(response)) + [0] * right)
            response_masks.append([1] * len(response) + [0] * right)
        return cls(
            input_ids=torch.tensor(rows, device=device),
            attention_mask=torch.tensor(masks, device=device),
            response_mask=torch.tensor(response_masks, device=device),
            prompt_width=prompt_width,
        )


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Per-token scores of the response tokens.

    Attributes:
        logprobs: (B, R) log-prob of each response token given everything before it (0 on padding).
        entropy: (B, R) entropy of the next-token distribution at each response position, or None.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor | None


DEFAULT_CHUNK_TOKENS = 1024
"""Response positions scored per chunk: the largest fp32 logits block is (rows, 1024, vocabulary)."""


def sequence_logprobs(
    model: PreTrainedModel,
    batch: SequenceBatch,
    *,
    temperature: float = 1.0,
    micro_batch_size: int = 8,
    with_entropy: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    scored: torch.Tensor | None = None,
    compiled: bool = False,
) -> TokenLogprobs:
    """Log-probs (and optionally entropies) of the response tokens, micro-batched, with gradients.

    The model returns hidden states only; the LM head, the float32 log-softmax, the gather and the entropy
    run on ``chunk_tokens`` response positions at a time, and with gradients each chunk is recomputed in
    the backward pass. So no ``(B, R, V)`` logits tensor ever exists, in the forward or the backward: the
    peak is one ``(micro_batch_size, chunk_tokens, V)`` float32 block (151,936 x 4 bytes a position for
    Qwen2.5, 0.6 MB: 4 x 4,096 positions would be 10 GB at once).

    Args:
        model: the causal LM being trained (its mode and grad context are the caller's).
        batch: the packed sequences.
        temperature: the sampling temperature; logits are divided by it, as the sampler did (0 is
            treated as 1: greedy sampling scores the raw distribution).
        micro_batch_size: rows per forward pass (memory bound).
        with_entropy: also return the entropy at each response position.
        chunk_tokens: response positions per LM-head chunk (memory bound; the result does not depend on it).
        scored: (B, R) 1 at the positions the caller reads (its policy tokens): the LM head runs only there
            and every other position reads 0. A search episode's response is mostly observation tokens
            (122 of 153 in the demo), whose scores no loss reads. None scores every response position.
        compiled: run each chunk's float32 log-softmax, gather and entropy through ``torch.compile``, which
            fuses their passes over the ``(rows, chunk, V)`` block into a few kernels (on an H100 the
            unfused ones took a sixth of a 1.5B update). The first call of each shape pays for compiling.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    scale = temperature if temperature > 0 else 1.0
    head = model.get_output_embeddings()
    score = _compiled_logit_scores() if compiled else _logit_scores
    logprob_chunks, entropy_chunks = [], []
    for start in range(0, batch.input_ids.shape[0], micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        hidden = _response_hidden_states(model, batch, rows)
        targets = batch.input_ids[rows, batch.prompt_width :]
        mask = batch.response_mask[rows]
        if scored is None:
            logprobs, entropy = _score_positions(
                head, score, hidden, targets, scale, with_entropy, chunk_tokens
            )
            logprob_chunks.append(logprobs * mask)
            if entropy is not None:
                entropy_chunks.append(entropy * mask)
            continue
        # The scored positions of the micro-batch, flattened into one row, then put back in place.
        where = (scored[rows] * mask).bool()
        logprobs, entropy = _score_positions(
            head, score, hidden[where][None], targets[where][None], scale, with_entropy, chunk_tokens
        )
        zeros = torch.zeros(where.shape, dtype=torch.float32, device=where.device)
        logprob_chunks.append(zeros.masked_scatter(where, logprobs[0]))
        if entropy is not None:
            entropy_chunks.append(zeros.masked_scatter(where, entropy[0]))
    return TokenLogprobs(
        logprobs=torch.cat(logprob_chunks),
        entropy=torch.cat(entropy_chunks) if with_entropy else None,
    )


LogitScores = Callable[[torch.Tensor, torch.Tensor, float, bool], tuple[torch.Tensor, torch.Tensor | None]]
"""``(logits, targets, scale, with_entropy) -> (log-probs, entropies or None)`` of one chunk."""


def _score_positions(
    head: nn.Module, score: LogitScores, hidden: torch.Tensor, targets: torch.Tensor, scale: float,
    with_entropy: bool, chunk: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Log-probs and entropies ``(b, c)`` of hidden states ``(b, c, H)``, ``chunk`` positions at a time."""
    if hidden.shape[1] == 0:
        empty = hidden.new_zeros(hidden.shape[:2], dtype=torch.float32)
        return empty, empty if with_entropy else None
    scores = [
        _score_chunk(head, score, hidden[:, cols], targets[:, cols], scale, with_entropy)
        for cols in _chunks(hidden.shape[1], chunk)
    ]
    logprobs = torch.cat([logprobs for logprobs, _ in scores], dim=1)
    if not with_entropy:
        return logprobs, None
    return logprobs, torch.cat([entropy for _, entropy in scores if entropy is not None], dim=1)


def _chunks(length: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


def _response_hidden_states(model: PreTrainedModel, batch: SequenceBatch, rows: slice) -> torch.Tensor:
    """(b, R, H) final hidden states (after the last norm) at the positions that predict response tokens."""
    attention_mask = batch.attention_mask[rows]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    response_width = batch.response_mask.shape[1]
    # The whole model runs (not its body alone) so that a sharded model's root gathers its parameters as
    # for any forward pass, with one logit position, the least ``logits_to_keep`` allows. The body's last
    # hidden state is taken by a hook: ``output_hidden_states`` would also keep every layer's (b, T, H)
    # output alive, memory that a no-grad pass would otherwise free layer by layer.
    captured: list[torch.Tensor] = []
    hook = model.get_decoder().register_forward_hook(
        lambda module, inputs, output: captured.append(output.last_hidden_state)
    )
    try:
        model(
            input_ids=batch.input_ids[rows],
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=1,
        )
    finally:
        hook.remove()
    # Position t predicts token t + 1: keep the R positions from P - 1 to P + R - 2.
    return captured[-1][:, -response_width - 1 : -1]


def _score_chunk(
    head: nn.Module, score: LogitScores, hidden: torch.Tensor, targets: torch.Tensor, scale: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Log-probs and entropies ``(b, c)`` of one chunk; recomputed in the backward pass when grads flow."""
    if torch.is_grad_enabled() and hidden.requires_grad:
        # Saves only the chunk's hidden states; its logits are rebuilt in the backward pass.
        return checkpoint(
            _chunk_scores, head, score, hidden, targets, scale, with_entropy, use_reentrant=False
        )
    return _chunk_scores(head, score, hidden, targets, scale, with_entropy)


def _chunk_scores(
    head: nn.Module, score: LogitScores, hidden: torch.Tensor, targets: torch.Tensor, scale: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    # The head's matmul runs in the compute dtype (bf16 under autocast or bf16 parameters: accumulated in
    # fp32 by the hardware); everything after it runs in float32 outside autocast: bf16 keeps 8 significant
    # bits (a logit near 20 moves by up to 0.06 when divided by the temperature in bf16), the softmax over
    # the vocabulary would lose the small probabilities, and the loss reads these log-probs directly.
    logits = head(hidden)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return score(logits, targets, scale, with_entropy)


def _logit_scores(
    logits: torch.Tensor, targets: torch.Tensor, scale: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    log_probs = torch.log_softmax(logits.float() / scale, dim=-1)
    token_logprobs = log_probs.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) if with_entropy else None
    return token_logprobs, entropy


@functools.cache
def _compiled_logit_scores() -> LogitScores:
    # Dynamic shapes from the start: chunks differ in rows and positions (the last chunk, scored subsets).
    return torch.compile(_logit_scores, dynamic=True)


@dataclass(frozen=True, slots=True)
class LogprobMismatch:
    """How far the sampler's log-probs are from the trainer's, over the policy tokens.

    Attributes:
        mean_abs_diff: mean of ``|trainer - sampler|``.
        max_abs_diff: the largest ``|trainer - sampler|``.
        mean_prob_ratio: mean of ``exp(trainer - sampler)`` (1 when they agree; the importance weight
            an off-policy correction would apply).
        num_tokens: how many tokens were compared.
    """

    mean_abs_diff: float
    max_abs_diff: float
    mean_prob_ratio: float
    num_tokens: int


def logprob_mismatch(trainer: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor) -> LogprobMismatch:
    """Compare trainer and sampler log-probs ``(B, R)`` where ``mask`` (the loss mask) is 1."""
    selected = mask.bool()
    diff = (trainer.detach().float() - sampler.float())[selected]
    if diff.numel() == 0:
        return LogprobMismatch(0.0, 0.0, 1.0, 0)
    return LogprobMismatch(
        mean_abs_diff=diff.abs().mean().item(),
        max_abs_diff=diff.abs().max().item(),
        mean_prob_ratio=diff.exp().mean().item(),
        num_tokens=int(diff.numel()),
    )
