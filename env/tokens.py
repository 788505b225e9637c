"""Counting and trimming text in budget units: the policy's tokens when the env has its tokenizer, else words.

Any object with Hugging Face-style ``encode(text, add_special_tokens=False)`` and ``decode(ids)`` works as a
tokenizer; nothing here imports transformers. A text is encoded once to be both counted and trimmed
(:meth:`TextMeter.measure`), since encoding is what an observation's budget costs.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

_WORD = re.compile(r"\S+")


@runtime_checkable
class Tokenizer(Protocol):
    """The two methods of a Hugging Face tokenizer that budgets need."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]:
        """Token ids of ``text``."""
        ...

    def decode(self, ids: list[int], /) -> str | list[str]:
        """Text of token ids: one ``str`` (Hugging Face's ``decode`` also declares batches' ``list[str]``)."""
        ...


class Measured(Protocol):
    """A text with its size in budget units, ready to be cut to fewer."""

    @property
    def count(self) -> int:
        """Units in the text."""
        ...

    def prefix(self, max_units: int) -> str:
        """The text cut to at most ``max_units`` units (the whole text if it fits)."""
        ...


class TextMeter(Protocol):
    """Measures text in budget units."""

    def count(self, text: str) -> int:
        """Units in ``text``."""
        ...

    def measure(self, text: str) -> Measured:
        """``text`` measured once, to be counted and cut."""
        ...


@dataclass(frozen=True, slots=True)
class _MeasuredWords:
    text: str
    word_ends: Sequence[int]

    @property
    def count(self) -> int:
        return len(self.word_ends)

    def prefix(self, max_units: int) -> str:
        if max_units >= len(self.word_ends):
            return self.text
        return self.text[: self.word_ends[max_units - 1]] if max_units > 0 else ""


@dataclass(frozen=True, slots=True)
class _MeasuredTokens:
    text: str
    ids: list[int]
    tokenizer: Tokenizer

    @property
    def count(self) -> int:
        return len(self.ids)

    def prefix(self, max_units: int) -> str:
        if max_units >= len(self.ids):
            return self.text
        if max_units <= 0:
            return ""
        # A cut inside a multi-byte character decodes to U+FFFD; drop it rather than show garbage.
        text = self.tokenizer.decode(self.ids[:max_units])
        assert isinstance(text, str)  # one sequence of ids decodes to one text
        return text.rstrip("\ufffd")


class WordMeter:
    """Whitespace-separated words: the budget unit when the env has no tokenizer.

    Examples:
        >>> meter = WordMeter()
        >>> meter.count("to be  or not")
        4
        >>> meter.measure("to be  or not").prefix(3)
        'to be  or'
    """

    def count(self, text: str) -> int:
        """Words in ``text``."""
        return len(text.split())

    def measure(self, text: str) -> Measured:
        """``text`` with the end offset of each word, so that a cut keeps the original spacing."""
        return _MeasuredWords(text, [match.end() for match in _WORD.finditer(text)])


class TokenizerMeter:
    """Tokens of the policy's tokenizer, without special tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def count(self, text: str) -> int:
        """Tokens in ``text``."""
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    def measure(self, text: str) -> Measured:
        """``text`` with its token ids; a cut decodes a prefix of them."""
        return _MeasuredTokens(text, self._tokenizer.encode(text, add_special_tokens=False), self._tokenizer)


def make_meter(tokenizer: Tokenizer | None) -> TextMeter:
    """The meter for a tokenizer, or the word meter when there is none."""
    return WordMeter() if tokenizer is None else TokenizerMeter(tokenizer)
