"""Retrieval over NQ-style corpora: BM25 and dense indexes, a Search-R1-compatible server and its client.

Every backend, and the HTTP client, implements :class:`searchgym.retriever.base.Retriever`.
"""

from searchgym.retriever.base import Passage, Retriever

__all__ = ["Passage", "Retriever"]
