"""The Gymnasium space of free text: any Unicode string up to a length."""

import string
from typing import Any

from gymnasium.spaces import Text

# Observations hold the prompt (never truncated) and retrieved text; actions hold one turn of generation.
MAX_OBSERVATION_CHARS = 1 << 20
MAX_ACTION_CHARS = 1 << 14
_SAMPLE_CHARSET = string.ascii_letters + string.digits + string.punctuation + " \n"


class UnicodeText(Text):
    """Strings of ``min_length`` to ``max_length`` characters, any character allowed.

    Gymnasium's :class:`~gymnasium.spaces.Text` only contains strings over a finite character set, which
    cannot hold questions and passages in every script. This space keeps ``Text``'s length bounds and
    its sampling (over printable ASCII, which is what ``sample()`` draws from) and accepts any character.
    """

    def __init__(self, max_length: int, *, min_length: int = 0, seed: int | None = None) -> None:
        super().__init__(max_length, min_length=min_length, charset=_SAMPLE_CHARSET, seed=seed)

    def contains(self, x: Any) -> bool:
        """Whether ``x`` is a string of an allowed length."""
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length

    def __repr__(self) -> str:
        """Length bounds; the character set is all of Unicode."""
        return f"UnicodeText({self.min_length}, {self.max_length})"

    def __eq__(self, other: object, /) -> bool:
        """Equal to another ``UnicodeText`` with the same bounds."""
        return (
            isinstance(other, UnicodeText)
            and self.min_length == other.min_length
            and self.max_length == other.max_length
        )
