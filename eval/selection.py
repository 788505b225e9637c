"""Which questions a run evaluates: exclusions, a seeded sample, and what a resumed run still has to do."""

import random
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from searchgym.errors import SearchgymError


class HasId(Protocol):
    """Anything with an example id (``searchgym.env.data.QAExample`` in practice)."""

    @property
    def id(self) -> str:
        """The example's id, unique within its dataset."""
        ...


ExampleT = TypeVar("ExampleT", bound=HasId)


def read_id_file(path: Path) -> set[str]:
    """Example ids, one per line; blank lines and ``#`` comments are ignored.

    Raises:
        SearchgymError: the file cannot be read.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise SearchgymError(f"cannot read the --exclude file {path}: {error.strerror or error}") from error
    return {line.split("#", 1)[0].strip() for line in lines} - {""}


def check_unique_ids(dataset: str, examples: Sequence[HasId]) -> None:
    """Refuse a dataset whose ids repeat: resuming and excluding both identify questions by id.

    Raises:
        SearchgymError: an id occurs twice; the message names it.
    """
    seen: set[str] = set()
    for example in examples:
        if example.id in seen:
            raise SearchgymError(
                f"{dataset}: example id {example.id!r} occurs more than once; give each a unique id"
            )
        seen.add(example.id)


def select_examples(
    examples: Sequence[ExampleT], *, exclude: Collection[str] = (), limit: int | None = None, seed: int = 0
) -> list[ExampleT]:
    """The examples to evaluate: the excluded ids dropped, then ``limit`` of them sampled with ``seed``.

    The sample keeps the file's order, and the same ``seed`` and ``limit`` always give the same questions.

    Examples:
        >>> from types import SimpleNamespace as Example
        >>> pool = [Example(id=str(i)) for i in range(10)]
        >>> [e.id for e in select_examples(pool, exclude={"0", "1"}, limit=3, seed=7)]
        ['3', '5', '7']
    """
    kept = [example for example in examples if example.id not in exclude]
    if limit is None or limit >= len(kept):
        return kept
    chosen = sorted(random.Random(seed).sample(range(len(kept)), limit))
    return [kept[index] for index in chosen]
