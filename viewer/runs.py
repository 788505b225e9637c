"""The runs the viewer serves, found in the folders given on the command line.

A training run has ``samples/episodes.jsonl`` and ``metrics.jsonl``; an eval run has ``predictions.jsonl``.
"""

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean

from searchgym.errors import SearchgymError
from searchgym.viewer.columns import EpisodeColumns
from searchgym.viewer.episodes import (
    EpisodeDetail,
    EpisodeSummary,
    prediction_detail,
    prediction_summary,
    training_detail,
    training_summary,
)
from searchgym.viewer.index import JsonlIndex

# The file names the trainer and the evaluator write (searchgym.train.tracking, searchgym.eval.report);
# repeated here so that the viewer imports neither torch nor transformers.
EPISODES_FILE = Path("samples") / "episodes.jsonl"
METRICS_FILE = "metrics.jsonl"
TRAIN_CONFIG_FILE = "config.yaml"
PREDICTIONS_FILE = "predictions.jsonl"
EVAL_RUN_FILE = "run.json"


class NotARun(SearchgymError):
    """A folder given to ``searchgym view`` holds no training or eval run."""


class RunKind(enum.StrEnum):
    """What made the run: ``searchgym train`` or ``searchgym eval``."""

    TRAIN = "train"
    EVAL = "eval"


@dataclass(frozen=True, slots=True)
class RunOverview:
    """What the run's list page offers to filter on, and its EM per dataset.

    Attributes:
        steps: the training steps that have episodes (empty for an eval run).
        datasets: the datasets of its episodes.
        end_reasons: the ways its episodes ended (``""`` for an episode that does not say).
        dataset_em: (dataset, episodes, mean EM) per dataset; an unscored episode counts 0, as in
            ``searchgym eval``'s table.
    """

    steps: tuple[int, ...]
    datasets: tuple[str, ...]
    end_reasons: tuple[str, ...]
    dataset_em: tuple[tuple[str, int, float], ...]

    @classmethod
    def of(cls, episodes: Sequence[EpisodeSummary]) -> "RunOverview":
        """Computed in one pass over ``episodes``."""
        steps: set[int] = set()
        reasons: set[str] = set()
        scores: dict[str, list[float]] = {}
        for episode in episodes:
            if episode.step is not None:
                steps.add(episode.step)
            reasons.add(episode.end_reason or "")
            scores.setdefault(episode.dataset, []).append(episode.em or 0.0)
        return cls(
            steps=tuple(sorted(steps)),
            datasets=tuple(sorted(scores)),
            end_reasons=tuple(sorted(reasons)),
            dataset_em=tuple((name, len(ems), fmean(ems)) for name, ems in sorted(scores.items())),
        )


@dataclass
class Run:
    """One run folder and the index of its episode file.

    Attributes:
        number: its place on the command line (its id in URLs).
        label: a short name (the folder's name, with its parent's when two runs share a name).
        path: the folder.
        kind: training or eval run.
        episodes: the episode file's index (it may not exist yet: a run that has not written any).
    """

    number: int
    label: str
    path: Path
    kind: RunKind
    episodes: JsonlIndex[EpisodeSummary]
    _overview: tuple[tuple[int, int], RunOverview] | None = field(default=None, init=False, repr=False)
    _columns: tuple[tuple[int, int], EpisodeColumns] | None = field(default=None, init=False, repr=False)

    @property
    def metrics_path(self) -> Path:
        """The training run's ``metrics.jsonl``."""
        return self.path / METRICS_FILE

    def summaries(self) -> list[EpisodeSummary]:
        """Every episode indexed so far, after indexing what was appended since the last look."""
        self.episodes.refresh()
        return self.episodes.summaries

    def detail(self, line: int) -> EpisodeDetail:
        """The full episode on ``line`` of the episode file.

        Raises:
            RecordNotFound: no episode is on that line.
            ValueError, KeyError, TypeError: the line is not an episode record (or not JSON).
        """
        self.episodes.refresh()
        record = self.episodes.read(line)
        build = training_detail if self.kind is RunKind.TRAIN else prediction_detail
        return build(record, line)

    def overview(self) -> RunOverview:
        """Steps, datasets, end reasons and EM per dataset, recomputed only when the file has grown."""
        summaries = self.summaries()
        version = self.episodes.version
        if self._overview is None or self._overview[0] != version:
            self._overview = (version, RunOverview.of(summaries))
        return self._overview[1]

    def columns(self) -> EpisodeColumns:
        """The summaries as columns for the filters, rebuilt only when the file has grown."""
        summaries = self.summaries()
        version = self.episodes.version
        if self._columns is None or self._columns[0] != version:
            self._columns = (version, EpisodeColumns.of(summaries))
        return self._columns[1]

    def steps(self) -> list[int]:
        """The training steps that have episodes, in order."""
        return list(self.overview().steps)


def run_kind(path: Path) -> RunKind | None:
    """Which kind of run ``path`` holds, or None when it holds neither."""
    if (path / PREDICTIONS_FILE).is_file() or (path / EVAL_RUN_FILE).is_file():
        return RunKind.EVAL
    if any((path / name).exists() for name in (EPISODES_FILE, METRICS_FILE, TRAIN_CONFIG_FILE)):
        return RunKind.TRAIN
    return None


def find_runs(paths: Sequence[Path]) -> list[Run]:
    """The runs in ``paths``.

    Each path is a run folder, or a folder whose direct sub-folders are runs
    (``searchgym eval --mode agent,rag --out X`` writes ``X/agent`` and ``X/rag``).

    Raises:
        NotARun: a path is missing, or neither it nor its sub-folders are runs.
    """
    folders: list[tuple[Path, RunKind]] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise NotARun(f"{path} is not a folder: give a run folder of searchgym train or searchgym eval")
        kind = run_kind(path)
        found = [(path, kind)] if kind is not None else list(_child_runs(path))
        if not found:
            raise NotARun(
                f"{path} is not a run folder: a training run has {METRICS_FILE} or {EPISODES_FILE}, "
                f"an eval run has {PREDICTIONS_FILE}"
            )
        folders += [folder for folder in found if folder[0] not in {known for known, _ in folders}]
    labels = _labels([folder for folder, _ in folders])
    return [
        Run(number, label, folder, kind, _index(folder, kind))
        for number, ((folder, kind), label) in enumerate(zip(folders, labels, strict=True))
    ]


def _child_runs(path: Path) -> Iterable[tuple[Path, RunKind]]:
    for child in sorted(path.iterdir()):
        if child.is_dir() and (kind := run_kind(child)) is not None:
            yield child, kind


def _index(folder: Path, kind: RunKind) -> JsonlIndex[EpisodeSummary]:
    if kind is RunKind.TRAIN:
        # searchgym.train.tracking.episode_record writes the summary's fields before the prompt.
        return JsonlIndex(folder / EPISODES_FILE, training_summary, head_until=b', "prompt": ')
    return JsonlIndex(folder / PREDICTIONS_FILE, prediction_summary)


def _labels(folders: Sequence[Path]) -> list[str]:
    """Folder names, with the parent's name added where two runs would share one."""
    names = [folder.resolve().name for folder in folders]
    return [
        f"{folder.resolve().parent.name}/{name}" if names.count(name) > 1 else name
        for folder, name in zip(folders, names, strict=True)
    ]
