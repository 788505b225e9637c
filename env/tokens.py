"""Counting and trimming text in budget units: the policy's tokens when the env has its tokenizer, else words.

Any object with Hugging Face-style ``encode(text, add_special_tokens=False)`` and ``decode(ids)`` works as a
tokenizer; nothing here imports transformers.
"""

import re
from itertools import islice
from typing import Protocol, runtime_checkable

_WORD = re.compile(r"\S+")


@runtime_checkable
class Tokenizer(Protocol):
    """The two methods of a Hugging Face tokenizer that budgets need."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]:
        """Token ids of ``text``."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of token ids."""
        ...


class TextMeter(Protocol):
    """Measures text in budget units and cuts it to a number of them."""

    def count(self, text: str) -> int:
        """Units in ``text``."""
        ...

    def truncate(self, text: str, max_units: int) -> str:
        """The longest prefix of ``text`` with at most ``max_units`` units (``text`` itself if it fits)."""
        ...


class WordMeter:
    """Whitespace-separated words: the budget unit when the env has no tokenizer.

    Examples:
        >>> meter = WordMeter()
        >>> meter.count("to be  or not")
        4
        >>> meter.truncate("to be  or not", 3)
        'to be  or'
    """

    def count(self, text: str) -> int:
        """Words in ``text``."""
        return len(text.split())

    def truncate(self, text: str, max_units: int) -> str:
        """The first ``max_units`` words, with the original spacing between them."""
        if max_units <= 0:
            return ""
        words = list(islice(_WORD.finditer(text), max_units + 1))
        if len(words) <= max_units:
            return text
        return text[: words[max_units - 1].end()]


class TokenizerMeter:
    """Tokens of the policy's tokenizer, without special tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def count(self, text: str) -> int:
        """Tokens in ``text``."""
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    def truncate(self, text: str, max_units: int) -> str:
        """The text of the first ``max_units`` tokens, without a dangling partial character."""
        if max_units <= 0:
            return ""
        ids = self._tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= max_units:
            return text
        # A cut inside a multi-byte character decodes to U+FFFD; drop it rather than show garbage.
        return self._tokenizer.decode(ids[:max_units]).rstrip("\ufffd")


def make_meter(tokenizer: Tokenizer | None) -> TextMeter:
    """The meter for a tokenizer, or the word meter when there is none."""
    return WordMeter() if tokenizer is None else TokenizerMeter(tokenizer)
