"""A run's episode summaries as columns (numpy arrays), so a filter over 100k episodes is a few array ops."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from searchgym.viewer.episodes import EpisodeSummary


@dataclass(frozen=True, eq=False)
class EpisodeColumns:
    """One entry per episode, in file order; a missing number is NaN (it never passes a range).

    Attributes:
        step: (N,) float, the training step (NaN for eval predictions).
        dataset: (N,) object, the dataset name.
        end_reason: (N,) object, how it ended ("" when not recorded).
        reward: (N,) float.
        em: (N,) float.
        f1: (N,) float.
        searches: (N,) float.
        haystack: the lower-case text the text filter searches, per episode.
    """

    step: np.ndarray
    dataset: np.ndarray
    end_reason: np.ndarray
    reward: np.ndarray
    em: np.ndarray
    f1: np.ndarray
    searches: np.ndarray
    haystack: list[str]

    @classmethod
    def of(cls, episodes: Sequence[EpisodeSummary]) -> "EpisodeColumns":
        """The columns of ``episodes``."""

        def numbers(values: list[float | int | None]) -> np.ndarray:
            return np.array([np.nan if value is None else value for value in values], dtype=np.float64)

        def names(values: list[str]) -> np.ndarray:
            column = np.empty(len(values), dtype=object)
            column[:] = values
            return column

        return cls(
            step=numbers([episode.step for episode in episodes]),
            dataset=names([episode.dataset for episode in episodes]),
            end_reason=names([episode.end_reason or "" for episode in episodes]),
            reward=numbers([episode.reward for episode in episodes]),
            em=numbers([episode.em for episode in episodes]),
            f1=numbers([episode.f1 for episode in episodes]),
            searches=numbers([episode.searches for episode in episodes]),
            haystack=[episode.haystack for episode in episodes],
        )

    def __len__(self) -> int:
        return len(self.haystack)
