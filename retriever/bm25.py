"""BM25 with bm25s: the default sparse retriever, pure Python, no Java.

Analysis matches Lucene's English analyzer in spirit (lower-case, English stop words, Snowball stemmer) and
the scoring uses Anserini's defaults (k1=0.9, b=0.4), so results are close to a pyserini index of the same
corpus; ``docs/retriever.md`` reports how close on wiki-mini.
"""

from collections.abc import Iterable
from pathlib import Path

import bm25s
import numpy as np
import Stemmer

from searchgym.retriever.base import Passage
from searchgym.retriever.corpus import Document
from searchgym.retriever.docstore import DocumentStore
from searchgym.retriever.manifest import Bm25Params
from searchgym.retriever.reopen import ReopensOnPickle

BM25_SUBDIR = "bm25s"

NUMBA_MIN_DOCUMENTS = 100_000
"""Indexes of at least this many documents are searched with bm25s's numba scorer, smaller ones with numpy's.

numba compiles its scorer in every process that opens an index (15 s on the 2-core box), which pays off only
on large corpora: on wiki-mini (16,335 passages) numpy answers a query in 0.9 ms against numba's 0.04 ms,
so a process would have to search 16,000 times to win the compile back (``docs/retriever.md``). The two
score alike; they may order exact ties differently.
"""


def build_bm25_index(documents: Iterable[Document], index_dir: Path, params: Bm25Params) -> int:
    """Tokenize ``documents`` as they stream by and write a bm25s index under ``index_dir``.

    Only token ids are kept in memory, never the texts. Returns the number of documents indexed.
    """
    tokenizer = bm25s.tokenization.Tokenizer(
        stopwords=params.stopwords, stemmer=Stemmer.Stemmer(params.stemmer)
    )
    token_ids = list(tokenizer.streaming_tokenize(document.contents for document in documents))
    model = bm25s.BM25(k1=params.k1, b=params.b, backend="numba")
    model.index((token_ids, tokenizer.get_vocab_dict()), show_progress=False)
    model.save(str(index_dir / BM25_SUBDIR), show_progress=False)
    return len(token_ids)


class Bm25Retriever(ReopensOnPickle):
    """Searches a bm25s index; passages come from the index's document store.

    A query that shares no term with any document gets no passages (as with Lucene), so a result list can
    be shorter than ``k``.

    Args:
        index_dir: the index folder.
        params: the analysis settings the index was built with (from its manifest).
        store: the index's documents.
    """

    def __init__(self, index_dir: Path, params: Bm25Params, store: DocumentStore) -> None:
        self._params = params
        self._store = store
        self._stemmer = Stemmer.Stemmer(params.stemmer)
        backend = "numba" if len(store) >= NUMBA_MIN_DOCUMENTS else "numpy"
        self._model = bm25s.BM25.load(str(index_dir / BM25_SUBDIR), mmap=True, backend=backend)
        # The numba scorer compiles on first use (and Arrow loads its kernels): pay that here, not on the
        # first request, with a query that surely matches: the first document's own text.
        self.search([store.passages(np.array([[0]]), np.array([[0.0]]))[0][0].contents], 1)

    @property
    def num_documents(self) -> int:
        """Documents in the index."""
        return len(self._store)

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        """Return, for each query in order, its best ``k`` passages (fewer when fewer match), best first."""
        if not queries:
            return []
        tokens = bm25s.tokenize(
            queries,
            stopwords=self._params.stopwords,
            stemmer=self._stemmer,
            return_ids=False,
            show_progress=False,
        )
        token_ids = [self._model.get_tokens_ids(query_tokens) for query_tokens in tokens]
        answerable = [i for i, ids in enumerate(token_ids) if ids]
        results: list[list[Passage]] = [[] for _ in queries]
        if answerable:
            rows, scores = self._model.retrieve(
                [token_ids[i] for i in answerable], k=min(k, self.num_documents), show_progress=False
            )
            found = self._store.passages(rows, scores, found=scores > 0)
            for i, passages in zip(answerable, found, strict=True):
                results[i] = passages
        return results
