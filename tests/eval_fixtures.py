"""Builders and fakes for the eval tests: predictions, QA files, a scripted policy, a fake retriever."""

import json
import re
from collections import Counter
from pathlib import Path

from searchgym.eval.records import Prediction
from searchgym.policy.generation import Generation, SamplingParams
from searchgym.retriever.base import Passage


def prediction(
    example_id: str,
    *,
    dataset: str = "nq",
    em: float = 0.0,
    f1: float | None = None,
    cover: float | None = None,
    answer: str | None = "x",
    searches: int = 0,
    turns: int = 1,
    tokens: int = 10,
    gold_recall: float | None = None,
    error: str | None = None,
) -> Prediction:
    """A prediction with the given scores; F1 and cover-EM default to the EM."""
    return Prediction(
        example_id=example_id,
        dataset=dataset,
        question=f"question {example_id}?",
        golden_answers=["gold"],
        prediction=answer,
        exact_match=em,
        cover_exact_match=em if cover is None else cover,
        f1=em if f1 is None else f1,
        num_searches=searches,
        num_turns=turns,
        num_response_tokens=tokens,
        gold_recall=gold_recall,
        error=error,
    )


QUESTION = re.compile(r"Question: (.+?)(?:<\|im_end\|>|\n|$)")

GEO = [
    {
        "id": "g1",
        "question": "What is the capital of France?",
        "golden_answers": ["Paris"],
        "gold_doc_ids": ["d1"],
    },
    {
        "id": "g2",
        "question": "What is the capital of Italy?",
        "golden_answers": ["Rome"],
        "gold_doc_ids": ["d2", "d9"],
    },
]
PEOPLE = [
    {"id": "p1", "question": "Who wrote Hamlet?", "golden_answers": ["William Shakespeare", "Shakespeare"]},
    {"id": "p2", "question": "Who painted the Mona Lisa?", "golden_answers": ["Leonardo da Vinci"]},
]
CORPUS = {
    "d1": Passage("d1", '"Paris"\nParis is the capital of France.', 3.0),
    "d2": Passage("d2", '"Rome"\nRome is the capital of Italy.', 2.0),
    "d3": Passage("d3", '"Europe"\nEurope is a continent.', 1.0),
}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """A FlashRAG jsonl file of ``records``."""
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


class KeywordRetriever:
    """A fake retriever: France -> d1, d3; Italy -> d2, d3; anything else -> d3. Counts its calls."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        self.calls.append(list(queries))
        return [self._hits(query)[:k] for query in queries]

    @staticmethod
    def _hits(query: str) -> list[Passage]:
        if "France" in query:
            return [CORPUS["d1"], CORPUS["d3"]]
        if "Italy" in query:
            return [CORPUS["d2"], CORPUS["d3"]]
        return [CORPUS["d3"]]


class ScriptedGenerator:
    """A fake policy behind the ``searchgym.policy.generation.Generator`` interface: fixed texts per question
    and turn.

    The question is read from the prompt (``Question: ...``); its n-th generation call returns
    ``scripts[question][n]``, tokenized by the real tokenizer, as a backend would return sampled ids.
    """

    def __init__(self, tokenizer, scripts: dict[str, list[str]], *, fail_after: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.scripts = scripts
        self.fail_after = fail_after
        self.turns: Counter[str] = Counter()
        self.prompts: list[str] = []

    def generate(self, prompts, params: SamplingParams, *, max_new_tokens=None) -> list[Generation]:
        if self.fail_after is not None and len(self.prompts) + len(prompts) > self.fail_after:
            raise Interrupted("the scripted policy was killed")
        generations = []
        for ids in prompts:
            text = self.tokenizer.decode(list(ids))
            self.prompts.append(text)
            question = QUESTION.search(text).group(1).strip()
            reply = self.scripts[question][self.turns[question]]
            self.turns[question] += 1
            generations.append(
                Generation(self.tokenizer.encode(reply, add_special_tokens=False), None, "stop")
            )
        return generations


class Interrupted(Exception):
    """Stands for a kill in the middle of a run."""
