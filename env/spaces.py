"""The Gymnasium space of free text: any Unicode string up to a length."""

import string
from collections.abc import Sequence
from typing import Any, overload

import numpy as np
from gymnasium.spaces import Text
from gymnasium.vector.utils import read_from_shared_memory, write_to_shared_memory

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


# Gymnasium's async vector env passes observations through shared memory, which it reads ONCE, expecting
# views that later writes update (true of arrays, not of the tuple of strings its Text reader builds, so
# text observations would stay those of the first read). Here text goes as Unicode code points padded
# with -1, in Text's own buffer (``max_length`` int32 per env), and is read through a live view that the
# vector env's ``deepcopy`` (``copy=True``, its default) turns into a tuple of strings at every step.
_PAD = -1


class SharedTexts(Sequence[str]):
    """The texts in a shared-memory buffer, decoded when read; a deep copy is a tuple of strings."""

    def __init__(self, rows: np.ndarray) -> None:
        self._rows = rows  # (n, max_length) int32 view of the shared buffer

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...
    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        """The text of env ``index`` as it is now."""
        if isinstance(index, slice):
            return tuple(self)[index]
        row = self._rows[index]
        return row[row != _PAD].tobytes().decode("utf-32-le")

    def __deepcopy__(self, memo: dict[int, Any]) -> tuple[str, ...]:
        """A snapshot: what the vector env hands out at each reset and step."""
        return tuple(self)


@write_to_shared_memory.register(UnicodeText)
def _write_unicode_text(space: UnicodeText, index: int, values: str, shared_memory: Any) -> None:
    buffer = shared_memory.get_obj()  # a multiprocessing Array of int32, max_length per env
    destination = np.frombuffer(buffer, dtype=np.int32)[
        index * space.max_length : (index + 1) * space.max_length
    ]
    codes = np.frombuffer(values.encode("utf-32-le"), dtype=np.int32)
    destination[: len(codes)] = codes
    destination[len(codes) :] = _PAD


@read_from_shared_memory.register(UnicodeText)
def _read_unicode_text(space: UnicodeText, shared_memory: Any, n: int = 1) -> SharedTexts:
    rows = np.frombuffer(shared_memory.get_obj(), dtype=np.int32).reshape((n, space.max_length))
    return SharedTexts(rows)
