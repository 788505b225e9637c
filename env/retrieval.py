"""One batched retriever call, with its failures turned into results instead of exceptions."""

import time
from collections.abc import Sequence
from dataclasses import dataclass

from searchgym.retriever.base import Passage, Retriever


@dataclass(frozen=True, slots=True)
class RetrievalResult:
    """What one search returned.

    Attributes:
        passages: the passages, best first (empty when the call failed).
        error: why the call failed (the exception's type and message), or None.
        latency_s: wall-clock seconds of the batched call this search was part of.
    """

    passages: tuple[Passage, ...] = ()
    error: str | None = None
    latency_s: float = 0.0


def retrieve_batch(retriever: Retriever, queries: Sequence[str], k: int) -> list[RetrievalResult]:
    """Search all ``queries`` in ONE ``retriever.search`` call; a failure fails every query of the call.

    Any exception of the backend (network, server, index) is caught on purpose: one failed call must end
    the episodes that asked for it with a clear error in their ``info``, not crash a batch of episodes.
    """
    if not queries:
        return []
    start = time.perf_counter()
    try:
        results = retriever.search(list(queries), k)
        if len(results) != len(queries):
            raise RuntimeError(
                f"the retriever returned {len(results)} result lists for {len(queries)} queries"
            )
    except Exception as error:
        latency = time.perf_counter() - start
        message = f"{type(error).__name__}: {error}"
        return [RetrievalResult(error=message, latency_s=latency) for _ in queries]
    latency = time.perf_counter() - start
    return [RetrievalResult(passages=tuple(passages), latency_s=latency) for passages in results]
