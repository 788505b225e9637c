"""Shared builders for the eval tests."""

from eval.records import Prediction


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
