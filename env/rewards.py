"""Answer metrics and the episode reward: pure functions, shared by training and evaluation.

Normalisation follows the SQuAD evaluation script, as Search-R1 and FlashRAG do: lower-case, drop ASCII
punctuation, drop the articles a / an / the, collapse whitespace. A prediction is compared with every gold
answer and scores its best match.
"""

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

RewardType = Literal["em", "f1", "cover_em"]
"""The outcome metrics a reward can be computed with."""

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, no ASCII punctuation, no articles, single spaces.

    Non-ASCII letters are kept as they are; non-ASCII punctuation (curly quotes, dashes) is kept too, as
    in the SQuAD script, so that scores stay comparable with published ones.

    Examples:
        >>> normalize_answer("  The Eiffel   Tower! ")
        'eiffel tower'
        >>> normalize_answer("1,000.5")
        '10005'
        >>> normalize_answer("Ĳsselmeer, a lake")
        'ĳsselmeer lake'
    """
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str | None, golden_answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer, else 0.0 (None scores 0.0).

    Raises:
        ValueError: ``golden_answers`` is empty (the score is undefined; do not record it as 0).

    Examples:
        >>> exact_match("the Beatles", ["Beatles", "The Fab Four"])
        1.0
        >>> exact_match("Beatles band", ["Beatles"])
        0.0
    """
    golds = _normalized_golds(golden_answers)
    if prediction is None:
        return 0.0
    return float(normalize_answer(prediction) in golds)


def f1_score(prediction: str | None, golden_answers: Sequence[str]) -> float:
    """Token-level F1 of the normalised prediction against its best-matching gold answer.

    When either side normalises to no tokens, the score is 1.0 if both do and 0.0 otherwise (SQuAD v2).

    Raises:
        ValueError: ``golden_answers`` is empty.

    Examples:
        >>> f1_score("Paris France", ["Paris"])
        0.6666666666666666
        >>> f1_score("Lyon", ["Paris", "City of Light"])
        0.0
    """
    golds = _normalized_golds(golden_answers)
    if prediction is None:
        return 0.0
    predicted = normalize_answer(prediction).split()
    return max(_token_f1(predicted, gold.split()) for gold in golds)


def cover_exact_match(prediction: str | None, golden_answers: Sequence[str]) -> float:
    """1.0 if some normalised gold answer occurs in the normalised prediction as whole words, else 0.0.

    Whole words: gold "1" is not covered by "1972" (Search-R1's sub-EM uses a plain substring test and
    would count it). A gold answer that normalises to nothing covers nothing.

    Raises:
        ValueError: ``golden_answers`` is empty.

    Examples:
        >>> cover_exact_match("It was Marie Curie, in 1903.", ["Marie Curie"])
        1.0
        >>> cover_exact_match("in 1972", ["1"])
        0.0
    """
    golds = _normalized_golds(golden_answers)
    if prediction is None:
        return 0.0
    return float(_contains_any_words(normalize_answer(prediction), golds))


def answer_in_passages(passages: Iterable[str], golden_answers: Sequence[str]) -> bool:
    """Whether some gold answer occurs, as whole normalised words, in some passage text.

    Raises:
        ValueError: ``golden_answers`` is empty.

    Examples:
        >>> answer_in_passages(["Paris is the capital of France."], ["paris"])
        True
        >>> answer_in_passages([], ["paris"])
        False
    """
    golds = _normalized_golds(golden_answers)
    return any(_contains_any_words(normalize_answer(text), golds) for text in passages)


def score_answer(prediction: str | None, golden_answers: Sequence[str], reward_type: RewardType) -> float:
    """The outcome score of the final answer under the chosen metric.

    Examples:
        >>> score_answer("Paris, France", ["Paris"], "cover_em")
        1.0
    """
    metric = {"em": exact_match, "f1": f1_score, "cover_em": cover_exact_match}[reward_type]
    return metric(prediction, golden_answers)


def format_reward(
    *, well_formed: bool, answer_retrieved: bool, format_weight: float, retrieval_weight: float
) -> float:
    """The shaping floor of an episode, Search-R1 v0.3 style.

    A well-formed episode (every action valid, ended by an answer) earns ``format_weight``, plus
    ``retrieval_weight`` when a gold answer appeared in a retrieved passage; a malformed one earns 0.

    Examples:
        >>> format_reward(well_formed=True, answer_retrieved=True, format_weight=0.25, retrieval_weight=0.125)
        0.375
        >>> format_reward(well_formed=False, answer_retrieved=True, format_weight=0.25, retrieval_weight=0)
        0.0
    """
    if not well_formed:
        return 0.0
    return format_weight + (retrieval_weight if answer_retrieved else 0.0)


def search_penalty(num_searches: int, search_cost: float) -> float:
    """What the searches of an episode cost (subtracted from the reward).

    Examples:
        >>> search_penalty(3, 0.125)
        0.375
    """
    return num_searches * search_cost


@dataclass(frozen=True, slots=True)
class RewardBreakdown:
    """The parts of an episode's reward: ``total = max(outcome, shaping) - search_cost``.

    Shaping is a floor, not a bonus, so a correct answer is never worth more for good form and a wrong
    well-formed one earns at most the floor.

    Attributes:
        outcome: the final answer's score under the configured metric (0 without an answer).
        shaping: the format / retrieval floor (0 when those weights are 0).
        search_cost: the summed per-search cost.
    """

    outcome: float
    shaping: float
    search_cost: float

    @property
    def total(self) -> float:
        """The scalar reward of the episode.

        Examples:
            >>> RewardBreakdown(outcome=0.0, shaping=0.25, search_cost=0.125).total
            0.125
        """
        return max(self.outcome, self.shaping) - self.search_cost


def _normalized_golds(golden_answers: Sequence[str]) -> list[str]:
    if not golden_answers:
        raise ValueError("no golden answers: the score is undefined; record it as missing, not as 0")
    return [normalize_answer(gold) for gold in golden_answers]


def _contains_any_words(text: str, golds: Sequence[str]) -> bool:
    padded = f" {text} "
    return any(gold and f" {gold} " in padded for gold in golds)


def _token_f1(predicted: list[str], gold: list[str]) -> float:
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision = common / len(predicted)
    recall = common / len(gold)
    return 2 * precision * recall / (precision + recall)
