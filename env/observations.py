"""Retrieved passages as an ``<information>`` block that fits its token budget, trimmed per document.

Search-R1 cuts an over-long observation at its end with a warning (issue #127), so the last documents
vanish; here every document gets a fair share of the budget instead, and short documents hand what they
do not use to the longer ones.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from searchgym.env.prompts import information_block
from searchgym.env.tokens import TextMeter
from searchgym.retriever.base import Passage

# Tokenizers may merge across the joins of headers and texts, so the assembled block can count a few
# tokens more than its parts; each retry takes the excess off the longest document.
_MAX_REFITS = 4


@dataclass(frozen=True, slots=True)
class InformationBlock:
    """An observation made of retrieved documents.

    Attributes:
        text: the block and its suffix, exactly as they are appended to the model's context.
        shown_ids: corpus ids of the documents in the block, in order (a document whose header alone
            does not fit is left out, lowest-ranked first).
        num_tokens: the text's size in budget units.
    """

    text: str
    shown_ids: tuple[str, ...]
    num_tokens: int


def share_budget(lengths: Sequence[int], budget: int) -> list[int]:
    """Split ``budget`` across items of the given lengths: equal shares, unused share passed on.

    Each item gets ``min(length, fair share)``, where the shares of short items that need less go to
    the longer ones (water-filling), so the sum never exceeds ``max(budget, 0)``.

    Examples:
        >>> share_budget([10, 100, 100], 90)
        [10, 40, 40]
        >>> share_budget([5, 5], 100)
        [5, 5]
        >>> share_budget([7, 7, 7], 10)
        [3, 3, 4]
    """
    allowance = [0] * len(lengths)
    remaining = max(budget, 0)
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    for position, index in enumerate(order):
        share = remaining // (len(order) - position)
        allowance[index] = min(lengths[index], share)
        remaining -= allowance[index]
    return allowance


def fit_information(
    passages: Sequence[Passage], *, meter: TextMeter, max_tokens: int, suffix: str = ""
) -> InformationBlock:
    """The ``<information>`` block of ``passages``, followed by ``suffix``, within ``max_tokens`` units.

    Each document is one line: line breaks inside a passage become spaces. Titles are kept whole; each
    text is trimmed to its share of what the tags, titles and suffix leave. If even the headers do not
    fit, documents are dropped from the lowest-ranked up; an empty block is the result when none fits
    (it is returned even if the tags alone exceed a tiny budget).

    Args:
        passages: retrieved passages, best first.
        meter: counts budget units (words or the policy's tokens).
        max_tokens: the budget of the whole text, suffix included.
        suffix: text that must follow the block in the same observation (a notice).
    """
    documents = [
        _Document(passage.id, passage.title, " ".join(passage.text.splitlines())) for passage in passages
    ]
    while documents:
        block = _fit_texts(documents, meter=meter, max_tokens=max_tokens, suffix=suffix)
        if block is not None:
            return block
        documents.pop()
    empty = information_block([]) + suffix
    return InformationBlock(empty, (), meter.count(empty))


@dataclass(frozen=True, slots=True)
class _Document:
    id: str
    title: str
    text: str


def _fit_texts(
    documents: list[_Document], *, meter: TextMeter, max_tokens: int, suffix: str
) -> InformationBlock | None:
    """The block with every document's text trimmed to fit, or None when no trimming of the texts fits."""
    titles = [document.title for document in documents]
    fixed = meter.count(information_block([(title, "") for title in titles]) + suffix)
    if fixed > max_tokens:
        return None
    # Each text is encoded once; the cuts below only decode prefixes of it.
    texts = [meter.measure(document.text) for document in documents]
    allowance = share_budget([text.count for text in texts], max_tokens - fixed)
    for _ in range(_MAX_REFITS):
        trimmed = [text.prefix(units) for text, units in zip(texts, allowance, strict=True)]
        block = information_block(list(zip(titles, trimmed, strict=True))) + suffix
        size = meter.count(block)
        if size <= max_tokens:
            return InformationBlock(block, tuple(document.id for document in documents), size)
        longest = max(range(len(allowance)), key=allowance.__getitem__)
        allowance[longest] = max(allowance[longest] - (size - max_tokens), 0)
    return None
