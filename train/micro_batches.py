"""Micro-batches filled to a token budget instead of a fixed count of episodes padded to the longest one.

A fixed count of episodes, each padded to the whole batch's longest prompt and response, spends most of a
search agent's forward passes on padding: a few episodes run to the context limit while most answer in one
turn. Here episodes are sorted by length and packed greedily, longest first, while the micro-batch's
padded size (rows x (longest prompt + longest response) within it) stays within the budget; each
micro-batch is then trimmed to its own widths (:func:`trim_padding`).

The loss does not change: every micro-batch's loss is divided by the token (or episode) count of the whole
mini-batch (``denominator`` in :mod:`searchgym.train.algorithms`), so how the episodes are grouped only
changes the order of a sum.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from searchgym.policy.logprobs import SequenceBatch


@dataclass(frozen=True, slots=True)
class EpisodeLength:
    """The real (unpadded) token counts of one episode."""

    prompt: int
    response: int


def padded_tokens(lengths: Sequence[EpisodeLength]) -> int:
    """Tokens a forward pass over these episodes computes: rows x (longest prompt + longest response)."""
    if not lengths:
        return 0
    return len(lengths) * (max(e.prompt for e in lengths) + max(e.response for e in lengths))


def plan_micro_batches(
    lengths: Sequence[EpisodeLength], *, max_tokens: int, min_micro_batches: int = 1
) -> list[list[int]]:
    """Episode indices of each micro-batch, filled up to ``max_tokens`` padded tokens.

    Episodes are taken longest first; an episode alone above the budget gets a micro-batch of its own.
    Micro-batches are then split (the one with the most padded tokens, in halves) until there are at least
    ``min_micro_batches``, or every micro-batch holds one episode: sharded learners run the same number of
    forward and backward passes (they are collectives), so they plan with the largest count of them all.

    Args:
        lengths: the episodes' real prompt and response lengths.
        max_tokens: the budget of padded tokens per micro-batch.
        min_micro_batches: the fewest micro-batches to return (capped by the number of episodes).

    Raises:
        ValueError: ``max_tokens`` or ``min_micro_batches`` is below 1.
    """
    if max_tokens < 1 or min_micro_batches < 1:
        raise ValueError(
            f"max_tokens ({max_tokens}) and min_micro_batches ({min_micro_batches}) must be >= 1"
        )
    order = sorted(range(len(lengths)), key=lambda i: (-(lengths[i].prompt + lengths[i].response), i))
    groups: list[list[int]] = []
    for index in order:
        if groups and padded_tokens([lengths[i] for i in (*groups[-1], index)]) <= max_tokens:
            groups[-1].append(index)
        else:
            groups.append([index])
    while len(groups) < min(min_micro_batches, len(lengths)):
        largest = max((g for g in groups if len(g) > 1), key=lambda g: padded_tokens([lengths[i] for i in g]))
        position = groups.index(largest)
        half = len(largest) // 2
        groups[position : position + 1] = [largest[:half], largest[half:]]
    return groups


def padding_share(lengths: Sequence[EpisodeLength], groups: Sequence[Sequence[int]]) -> float:
    """The share of computed tokens that are padding when the episodes run in ``groups``."""
    computed = sum(padded_tokens([lengths[i] for i in group]) for group in groups)
    real = sum(e.prompt + e.response for e in lengths)
    return 1.0 - real / computed if computed else 0.0


def fixed_count_padding_share(lengths: Sequence[EpisodeLength]) -> float:
    """The padding share of fixed-count micro-batches, every episode padded to the batch's longest ones.

    That is the learner's layout before token budgets: whatever the micro-batch size, each row is as wide
    as the whole batch's longest prompt plus its longest response.
    """
    width = max(e.prompt for e in lengths) + max(e.response for e in lengths)
    real = sum(e.prompt + e.response for e in lengths)
    return 1.0 - real / (len(lengths) * width)


def episode_lengths(batch: SequenceBatch) -> list[EpisodeLength]:
    """The real prompt and response lengths of a packed batch's episodes."""
    prompt = batch.attention_mask[:, : batch.prompt_width].sum(-1).tolist()
    response = batch.response_mask.sum(-1).tolist()
    return [EpisodeLength(int(p), int(r)) for p, r in zip(prompt, response, strict=True)]


def trim_padding(batch: SequenceBatch) -> SequenceBatch:
    """The same episodes without the prompt columns and response columns that are padding in every row."""
    prompt_width = int(batch.attention_mask[:, : batch.prompt_width].sum(-1).max())
    response_width = max(int(batch.response_mask.sum(-1).max()), 1)
    columns = slice(batch.prompt_width - prompt_width, batch.prompt_width + response_width)
    return SequenceBatch(
        input_ids=batch.input_ids[:, columns],
        attention_mask=batch.attention_mask[:, columns],
        response_mask=batch.response_mask[:, :response_width],
        prompt_width=prompt_width,
    )
