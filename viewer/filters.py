"""The episode list's filters, read from the page's query string.

Every filter is optional and they combine with AND. A value that cannot be read is a
:class:`~searchgym.errors.SearchgymError` naming the field (the page answers 400 with that message).
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TypeVar

import numpy as np

from searchgym.errors import SearchgymError
from searchgym.viewer.columns import EpisodeColumns
from searchgym.viewer.episodes import EpisodeSummary

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
Parsed = TypeVar("Parsed")


class BadFilter(SearchgymError):
    """A filter value in the URL cannot be read."""


@dataclass(frozen=True, slots=True)
class EpisodeFilter:
    """Which episodes the list shows.

    Attributes:
        step: the training step (training runs only).
        dataset: the dataset name.
        reward_min: smallest reward (episodes without a reward are left out when a bound is set).
        reward_max: largest reward.
        em_min: smallest exact match (1 keeps right answers).
        em_max: largest exact match (0 keeps wrong answers).
        f1_min: smallest token F1.
        f1_max: largest token F1.
        searches_min: fewest searches.
        searches_max: most searches.
        end_reason: how the episode ended (``answered``, ``max_turns``, ``context_budget``, ...).
        text: case-insensitive text to find in the question, the answer or the gold answers.
    """

    step: int | None = None
    dataset: str | None = None
    reward_min: float | None = None
    reward_max: float | None = None
    em_min: float | None = None
    em_max: float | None = None
    f1_min: float | None = None
    f1_max: float | None = None
    searches_min: int | None = None
    searches_max: int | None = None
    end_reason: str | None = None
    text: str | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> "EpisodeFilter":
        """Read the filters from a query string; empty values mean "any".

        Raises:
            BadFilter: a number field holds something else.
        """
        values: dict[str, object] = {}
        for field in fields(cls):
            raw = query.get(field.name, "").strip()
            if not raw:
                continue
            parse = _NUMBER_PARSERS.get(field.name)
            values[field.name] = raw if parse is None else _parse(field.name, raw, parse)
        return cls(**values)  # type: ignore[arg-type]

    def to_query(self) -> dict[str, str]:
        """The non-empty filters as query-string values (for links that keep them)."""
        return {
            field.name: str(getattr(self, field.name))
            for field in fields(self)
            if getattr(self, field.name) is not None
        }

    def select(self, columns: EpisodeColumns) -> np.ndarray:
        """Positions of the matching episodes, in order: array tests first, then text on what is left."""
        keep = np.ones(len(columns), dtype=bool)
        if self.step is not None:
            keep &= columns.step == self.step
        if self.dataset is not None:
            keep &= columns.dataset == self.dataset
        if self.end_reason is not None:
            keep &= columns.end_reason == self.end_reason
        ranges = (
            (columns.reward, self.reward_min, self.reward_max),
            (columns.em, self.em_min, self.em_max),
            (columns.f1, self.f1_min, self.f1_max),
            (columns.searches, self.searches_min, self.searches_max),
        )
        for values, low, high in ranges:
            if low is not None:
                keep &= values >= low  # NaN (no value) compares False: left out once a bound is set
            if high is not None:
                keep &= values <= high
        positions = np.flatnonzero(keep)
        if self.text is not None:
            needle = self.text.lower()
            positions = np.array([i for i in positions if needle in columns.haystack[i]], dtype=np.int64)
        return positions

    def apply(self, episodes: Sequence[EpisodeSummary]) -> list[EpisodeSummary]:
        """The episodes that match, in order."""
        return [episodes[i] for i in self.select(EpisodeColumns.of(episodes))]


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a list.

    Attributes:
        number: the page (1-based).
        size: items per page.
        total: items over all pages.
    """

    number: int
    size: int
    total: int

    @classmethod
    def from_query(cls, query: Mapping[str, str], total: int) -> "Page":
        """Read ``page`` and ``per_page``; a page past the end shows the last one.

        Raises:
            BadFilter: they are not positive integers, or ``per_page`` is above :data:`MAX_PAGE_SIZE`.
        """
        number = _parse("page", query.get("page", "").strip() or "1", int)
        size = _parse("per_page", query.get("per_page", "").strip() or str(DEFAULT_PAGE_SIZE), int)
        if number < 1 or not 1 <= size <= MAX_PAGE_SIZE:
            raise BadFilter(f"page must be >= 1 and per_page between 1 and {MAX_PAGE_SIZE}")
        return cls(min(number, max(1, -(-total // size))), size, total)

    @property
    def count(self) -> int:
        """How many pages there are (at least one)."""
        return max(1, -(-self.total // self.size))

    @property
    def start(self) -> int:
        """Index of the page's first item."""
        return (self.number - 1) * self.size

    @property
    def stop(self) -> int:
        """Index after the page's last item."""
        return min(self.start + self.size, self.total)


_NUMBER_PARSERS: dict[str, Callable[[str], object]] = {
    "step": int,
    "reward_min": float,
    "reward_max": float,
    "em_min": float,
    "em_max": float,
    "f1_min": float,
    "f1_max": float,
    "searches_min": int,
    "searches_max": int,
}


def _parse(name: str, raw: str, parse: Callable[[str], Parsed]) -> Parsed:
    try:
        return parse(raw)
    except ValueError as error:
        kind = "an integer" if parse is int else "a number"
        raise BadFilter(f"{name} must be {kind}, got {raw!r}") from error
