"""Cross-encoder reranking over any retriever: retrieve ``depth`` candidates, rescore, keep the best ``k``.

Search-R1 ships the same pipeline as a separate server (``retrieval_rerank_server.py``: retrieve 10,
rerank with ``cross-encoder/ms-marco-MiniLM-L12-v2``, keep 3). Here it wraps any
:class:`~searchgym.retriever.base.Retriever`, so it runs in-process (``load_retriever(..., rerank=MODEL)``)
or behind ``searchgym serve --rerank MODEL``, where the micro-batcher hands it every query of a batch at
once: all (query, passage) pairs of the batch go through the cross-encoder together.
"""

from typing import TYPE_CHECKING, Any

from searchgym.errors import SearchgymError
from searchgym.retriever.base import Passage, Retriever

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder

DEFAULT_RERANK_DEPTH = 10  # Search-R1's retrieval_rerank_server default (topk_retrieval)


class RerankerError(SearchgymError):
    """A cross-encoder that cannot be loaded, or reranking settings that cannot work."""


def passage_text(passage: Passage) -> str:
    """The passage as Search-R1's reranker shows it to the cross-encoder: ``(Title: T) text``."""
    return f"(Title: {passage.title}) {passage.text}" if passage.title else passage.text


class RerankingRetriever:
    """Reorders the top ``depth`` passages of ``retriever`` by a sentence-transformers ``CrossEncoder``.

    Scores of the returned passages are the cross-encoder's. Pickles as its settings and its inner
    retriever (which reopens its index), so envs that use it can still be copied.

    Args:
        retriever: where the candidates come from.
        model: a cross-encoder folder or hub id (e.g. ``cross-encoder/ms-marco-MiniLM-L12-v2``).
        depth: candidates retrieved per query; at least the ``k`` asked for.
        batch_size: (query, passage) pairs per cross-encoder forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.

    Raises:
        RerankerError: ``depth`` < 1, or the model cannot be loaded.
    """

    def __init__(
        self,
        retriever: Retriever,
        *,
        model: str,
        depth: int = DEFAULT_RERANK_DEPTH,
        batch_size: int = 64,
        device: str = "auto",
    ) -> None:
        from searchgym.retriever.encoder import resolve_device

        if depth < 1:
            raise RerankerError(f"--rerank-depth must be at least 1, got {depth}")
        self.retriever = retriever
        self.model = model
        self.depth = depth
        self.batch_size = batch_size
        self.device = device
        self._cross_encoder = _load_cross_encoder(model, resolve_device(device))

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        """Return, for each query in order, its best ``k`` passages by the cross-encoder, best first."""
        candidates = self.retriever.search(queries, max(k, self.depth))
        pairs = [
            (query, passage_text(p)) for query, hits in zip(queries, candidates, strict=True) for p in hits
        ]
        if not pairs:
            return [[] for _ in queries]
        scores = iter(
            self._cross_encoder.predict(pairs, batch_size=self.batch_size, show_progress_bar=False).tolist()
        )
        results = []
        for hits in candidates:
            rescored = [Passage(p.id, p.contents, float(next(scores))) for p in hits]
            rescored.sort(key=lambda passage: -passage.score)  # stable: ties keep the retriever's order
            results.append(rescored[:k])
        return results

    def __reduce__(self) -> tuple[Any, ...]:
        """Rebuild from the inner retriever and the settings (the model is loaded again)."""
        settings = {"model": self.model, "depth": self.depth, "batch_size": self.batch_size}
        return (_rebuild, (self.retriever, settings | {"device": self.device}))


def _rebuild(retriever: Retriever, settings: dict[str, Any]) -> RerankingRetriever:
    return RerankingRetriever(retriever, **settings)


def _load_cross_encoder(model: str, device: str) -> "CrossEncoder":
    from sentence_transformers import CrossEncoder

    try:
        return CrossEncoder(model, device=device)
    except (OSError, ValueError) as error:
        raise RerankerError(
            f"cannot load cross-encoder {model!r} ({error}); pass --rerank with a local "
            "sentence-transformers CrossEncoder folder (no model is downloaded when offline)"
        ) from error
