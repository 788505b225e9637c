"""The per-question record of an evaluation run: one line of ``predictions.jsonl``."""

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Prediction:
    """What happened on one question, with its scores.

    The scores come from ``searchgym.env.rewards`` (the training reward code), applied to ``prediction``.

    Attributes:
        example_id: id of the QA example (unique within its dataset).
        dataset: the benchmark name or file the example came from.
        question: the question text.
        golden_answers: every accepted answer.
        prediction: the text of the model's ``<answer>``, or None when it gave no valid answer.
        exact_match: 1.0 when the normalised prediction equals a normalised gold answer, else 0.0.
        cover_exact_match: 1.0 when a normalised gold answer is contained in the normalised prediction.
        f1: the best token F1 of the prediction against any gold answer.
        num_searches: searches the model issued (the retrieval call of ``rag`` mode counts as one).
        num_turns: generation calls made for this question.
        num_response_tokens: tokens the model generated, over all turns (observations excluded).
        queries: (S,) the search queries in order.
        retrieved_ids: (S, k) corpus ids shown back for each query.
        gold_doc_ids: corpus ids of the passages that support the answer, when the dataset knows them.
        gold_recall: share of ``gold_doc_ids`` among everything retrieved; None when unknown or nothing
            could be retrieved (``direct`` mode).
        trajectory: the full text the model saw and wrote after the prompt (actions and observations).
        end_reason: how the episode ended (``answered``, ``max_turns``, ``context_budget``, ``no_answer``,
            ``retriever_error``, ...), as the env and the rollout name it.
        error: why the episode ended abnormally (e.g. the retriever failed), else None.
    """

    example_id: str
    dataset: str
    question: str
    golden_answers: list[str]
    prediction: str | None
    exact_match: float
    cover_exact_match: float
    f1: float
    num_searches: int = 0
    num_turns: int = 0
    num_response_tokens: int = 0
    queries: list[str] = field(default_factory=list)
    retrieved_ids: list[list[str]] = field(default_factory=list)
    gold_doc_ids: list[str] | None = None
    gold_recall: float | None = None
    trajectory: str = ""
    end_reason: str | None = None
    error: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        """(dataset, example id): the identity a resumed run uses to skip finished questions."""
        return (self.dataset, self.example_id)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, one line of ``predictions.jsonl``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "Prediction":
        """Rebuild a record from ``to_dict`` output; unknown keys are ignored (newer files stay readable)."""
        known = {name: row[name] for name in cls.__dataclass_fields__ if name in row}
        return cls(**known)
