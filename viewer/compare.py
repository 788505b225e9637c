"""Two sets of episodes side by side: per-dataset EM and the questions that flipped right/wrong.

A side is an eval run (one prediction per question) or one step of a training run (possibly several
samples of a question: GRPO groups). Questions are matched by (dataset, example id). A question's score
on a side is the mean EM of its episodes there, and it counts as right when that mean is at least 0.5;
for eval runs this is the prediction's EM, so the per-dataset EM shown here is the one
``searchgym eval --compare`` prints (the mean EM of the run's predictions of that dataset), and over
the questions both runs answered, ``EM(b) - EM(a) = (gained - lost) / questions``.
"""

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import fmean

from searchgym.viewer.episodes import EpisodeSummary

RIGHT = 0.5


@dataclass(frozen=True, slots=True)
class QuestionScores:
    """One question's episodes on one side and their mean EM (None when no episode could be scored)."""

    lines: tuple[int, ...]
    em: float | None

    @property
    def right(self) -> bool:
        """Mean EM of at least :data:`RIGHT`."""
        return self.em is not None and self.em >= RIGHT


@dataclass(frozen=True, slots=True)
class Flip:
    """A question answered right on one side and wrong on the other.

    Attributes:
        dataset: its dataset.
        example_id: its id.
        question: its text.
        a: its episodes and score on side a.
        b: its episodes and score on side b.
    """

    dataset: str
    example_id: str
    question: str
    a: QuestionScores
    b: QuestionScores

    @property
    def gained(self) -> bool:
        """Wrong on a, right on b."""
        return self.b.right


@dataclass(frozen=True, slots=True)
class DatasetComparison:
    """One dataset's row of the comparison.

    Attributes:
        dataset: its name.
        questions_a: questions side a has.
        questions_b: questions side b has.
        em_a: mean EM over side a's questions (None when it has none).
        em_b: mean EM over side b's questions.
        common: questions both sides have.
        gained: common questions wrong on a and right on b.
        lost: common questions right on a and wrong on b.
    """

    dataset: str
    questions_a: int
    questions_b: int
    em_a: float | None
    em_b: float | None
    common: int
    gained: int
    lost: int


@dataclass(frozen=True, slots=True)
class Comparison:
    """The per-dataset rows and the flipped questions (gained first, then lost)."""

    datasets: tuple[DatasetComparison, ...]
    flips: tuple[Flip, ...]


def by_question(episodes: Iterable[EpisodeSummary]) -> dict[tuple[str, str], QuestionScores]:
    """Each question's episodes and mean EM, in order of first appearance."""
    grouped: dict[tuple[str, str], list[EpisodeSummary]] = defaultdict(list)
    for episode in episodes:
        grouped[episode.key].append(episode)
    return {key: _scores(group) for key, group in grouped.items()}


def compare(a: Sequence[EpisodeSummary], b: Sequence[EpisodeSummary]) -> Comparison:
    """Compare side ``a`` (before) with side ``b`` (after)."""
    scores_a, scores_b = by_question(a), by_question(b)
    questions = {episode.key: episode.question for episode in [*a, *b]}
    flips = [
        Flip(key[0], key[1], questions[key], scores_a[key], scores_b[key])
        for key in scores_a
        if key in scores_b and scores_a[key].right != scores_b[key].right
    ]
    flips.sort(key=lambda flip: (not flip.gained, flip.dataset, flip.example_id))
    datasets = list(dict.fromkeys(key[0] for key in [*scores_a, *scores_b]))
    rows = tuple(_dataset_row(name, scores_a, scores_b, flips) for name in datasets)
    return Comparison(rows, tuple(flips))


def _dataset_row(
    dataset: str,
    scores_a: dict[tuple[str, str], QuestionScores],
    scores_b: dict[tuple[str, str], QuestionScores],
    flips: Sequence[Flip],
) -> DatasetComparison:
    side_a = [score for key, score in scores_a.items() if key[0] == dataset]
    side_b = [score for key, score in scores_b.items() if key[0] == dataset]
    common = sum(1 for key in scores_a if key[0] == dataset and key in scores_b)
    mine = [flip for flip in flips if flip.dataset == dataset]
    return DatasetComparison(
        dataset=dataset,
        questions_a=len(side_a),
        questions_b=len(side_b),
        em_a=_mean_em(side_a),
        em_b=_mean_em(side_b),
        common=common,
        gained=sum(flip.gained for flip in mine),
        lost=sum(not flip.gained for flip in mine),
    )


def _scores(group: Sequence[EpisodeSummary]) -> QuestionScores:
    scored = [episode.em for episode in group if episode.em is not None]
    return QuestionScores(tuple(episode.line for episode in group), fmean(scored) if scored else None)


def _mean_em(scores: Sequence[QuestionScores]) -> float | None:
    # An unscorable question counts as 0, as eval's table counts an errored prediction.
    return fmean(score.em or 0.0 for score in scores) if scores else None
