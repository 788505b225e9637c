"""Fakes and tiny data for the env tests: a word-overlap retriever that counts its calls, and QA examples."""

from dataclasses import dataclass, field

from searchgym.env.data import QAExample
from searchgym.retriever.base import Passage

CORPUS = (
    Passage("d0", '"Paris"\nParis is the capital and largest city of France.', 0.0),
    Passage("d1", '"Lyon"\nLyon is the third-largest city of France, on the Rhône.', 0.0),
    Passage("d2", '"Hamlet"\nHamlet is a tragedy written by William Shakespeare around 1600.', 0.0),
    Passage("d3", '"Ivanjica"\nIvanjica is a town in Serbia where Petar Stambolić was born.', 0.0),
    Passage("d4", '"Moon landing"\nThe last crewed Moon landing was Apollo 17 in December 1972.', 0.0),
)

EXAMPLES = (
    QAExample("q0", "What is the capital of France?", ("Paris",), source="fake"),
    QAExample("q1", "Who wrote Hamlet?", ("William Shakespeare", "Shakespeare"), source="fake"),
    QAExample("q2", "In what city was Petar Stambolić born?", ("Ivanjica",), source="fake"),
    QAExample("q3", "When was the last Moon landing?", ("December 1972", "1972"), source="fake"),
)


@dataclass
class FakeRetriever:
    """Ranks :data:`CORPUS` by words shared with the query; records every call; can be told to fail."""

    fail_with: Exception | None = None
    calls: list[list[str]] = field(default_factory=list)

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        self.calls.append(list(queries))
        if self.fail_with is not None:
            raise self.fail_with
        return [self._rank(query)[:k] for query in queries]

    def _rank(self, query: str) -> list[Passage]:
        words = set(query.lower().split())

        def overlap(passage: Passage) -> int:
            return len(words & set(passage.contents.lower().replace('"', " ").split()))

        ranked = sorted(CORPUS, key=lambda passage: (-overlap(passage), passage.id))
        return [Passage(passage.id, passage.contents, float(overlap(passage))) for passage in ranked]


class CharTokenizer:
    """A stand-in for a Hugging Face tokenizer: one token per character, ids are code points."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(char) for char in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(token) for token in ids)
