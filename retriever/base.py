"""The one retrieval interface shared by BM25, dense and HTTP backends."""

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Passage:
    """One retrieved document.

    Attributes:
        id: the corpus row id.
        contents: DPR wiki-18 layout, ``"Title"`` on the first line and the text after it.
        score: the backend's relevance score (higher is better; not comparable across backends).
    """

    id: str
    contents: str
    score: float

    @property
    def title(self) -> str:
        """The title line without its quotes ('' when the contents have no title line)."""
        first, sep, _ = self.contents.partition("\n")
        return first.strip().strip('"') if sep else ""

    @property
    def text(self) -> str:
        """The passage text without the title line."""
        first, sep, rest = self.contents.partition("\n")
        return rest if sep else first


@runtime_checkable
class Retriever(Protocol):
    """Anything that answers a batch of queries with the top-k passages of each.

    The environment calls this and nothing else, so a local index and a remote server are interchangeable.
    """

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        """Return, for each query in order, its ``k`` best passages, best first."""
        ...
