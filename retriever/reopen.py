"""Retrievers that pickle (and deep-copy) as the recipe to reopen them, never as their loaded state.

A loaded index holds things that cannot be pickled (a Snowball stemmer, a JVM searcher, memory maps, a
torch model) and should not be: a subprocess or a copy should map the same files itself. So a retriever
opened by :func:`searchgym.retriever.index.open_index` remembers where it came from and how, and pickles
as that; unpickling opens the folder again. This is what Gymnasium needs to re-make an env from its spec
(``check_env`` deep-copies its keyword arguments) and to run envs in subprocesses
(``gymnasium.make_vec(..., vectorization_mode="async")``).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from searchgym.retriever.base import Retriever


@dataclass(frozen=True, slots=True)
class OpenedFrom:
    """How a retriever was opened: the function that opened it and its arguments.

    Attributes:
        opener: :func:`searchgym.retriever.index.open_index`, given here by that function itself (pickle
            stores it by name), so that this module needs no import of the module that imports its backends.
        index_dir: the index folder.
        options: the other keyword arguments, as (name, value) pairs (the corpus check is not repeated).
    """

    opener: Callable[..., Any]
    index_dir: str
    options: tuple[tuple[str, Any], ...] = ()


def reopen(origin: OpenedFrom) -> Retriever:
    """Open the index again the way it was first opened (what unpickling a retriever calls)."""
    return origin.opener(origin.index_dir, **dict(origin.options)).retriever


class ReopensOnPickle:
    """Mixin: pickles and deep-copies as :attr:`opened_from`, set by ``open_index``."""

    opened_from: OpenedFrom | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        """Reopen from the index folder instead of copying the loaded index."""
        if self.opened_from is None:
            raise TypeError(
                f"a {type(self).__name__} built by hand cannot be pickled or deep-copied: open it with "
                "searchgym.retriever.load_retriever(index_dir) instead"
            )
        return (reopen, (self.opened_from,))
