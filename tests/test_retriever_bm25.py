import math

import bm25s
import pytest
import Stemmer
from retriever_fixtures import QUERIES, TINY_CORPUS, tiny_index

from searchgym.retriever import bm25 as bm25_module
from searchgym.retriever.base import Retriever
from searchgym.retriever.index import load_retriever

# (query, [(id, score), ...]) on the tiny corpus with k1=0.9, b=0.4; queries chosen without score ties.
PINNED = [
    ("which planet is called the red planet", [("0", 3.9258), ("1", 1.8099), ("10", 1.3812)]),
    ("who wrote the tragedy hamlet", [("2", 2.3570), ("8", 0.8677)]),
    ("highest mountain on earth", [("6", 3.4097)]),
    ("who created the python programming language", [("7", 5.1536)]),
    ("the sun planet", [("1", 1.7727), ("0", 1.7062), ("10", 0.6906)]),
]


@pytest.fixture(scope="module")
def bm25(tmp_path_factory):
    return load_retriever(tiny_index(tmp_path_factory, "bm25"))


def test_pinned_results(bm25):
    results = bm25.search([query for query, _ in PINNED], 3)
    for (query, expected), passages in zip(PINNED, results, strict=True):
        assert [(p.id, round(p.score, 4)) for p in passages] == expected, query


def test_scores_follow_lucene_bm25_with_anserini_defaults(bm25):
    """One score recomputed from the formula: sum of idf * tf / (tf + k1 * (1 - b + b * dl / avgdl))."""
    k1, b = 0.9, 0.4
    stemmer = Stemmer.Stemmer("english")
    documents = bm25s.tokenize(
        [row["contents"] for row in TINY_CORPUS],
        stopwords="en",
        stemmer=stemmer,
        return_ids=False,
        show_progress=False,
    )
    query = bm25s.tokenize(
        ["highest mountain"], stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False
    )
    avgdl = sum(map(len, documents)) / len(documents)
    target = documents[6]
    expected = 0.0
    for term in query[0]:
        df = sum(term in tokens for tokens in documents)
        idf = math.log(1 + (len(documents) - df + 0.5) / (df + 0.5))
        tf = target.count(term)
        expected += idf * tf / (tf + k1 * (1 - b + b * len(target) / avgdl))
    [[best]] = bm25.search(["highest mountain"], 1)
    assert best.id == "6"
    assert best.score == pytest.approx(expected, rel=1e-5)


def test_passages_carry_the_corpus_contents(bm25):
    [[passage]] = bm25.search(["longest river in africa"], 1)
    assert passage.contents == TINY_CORPUS[9]["contents"]
    assert (passage.title, passage.text) == ("Nile", TINY_CORPUS[9]["contents"].split("\n", 1)[1])


def test_queries_without_known_terms_get_no_passages(bm25):
    assert bm25.search(["the of and", "zzzqqq xyzzy", "?!"], 3) == [[], [], []]


def test_k_beyond_the_corpus_returns_every_matching_document(bm25):
    [passages] = bm25.search(["planet"], 100)
    assert sorted(p.id for p in passages) == ["0", "1", "10"]
    assert [p.score for p in passages] == sorted((p.score for p in passages), reverse=True)


def test_a_batch_answers_like_single_queries(bm25):
    queries = [*QUERIES, "the of", *QUERIES[:2]]
    assert bm25.search(queries, 3) == [bm25.search([query], 3)[0] for query in queries]


def test_empty_batch_and_protocol(bm25):
    assert bm25.search([], 3) == []
    assert isinstance(bm25, Retriever)


def test_small_indexes_score_with_numpy_and_large_ones_with_numba(bm25, tmp_path_factory, monkeypatch):
    """The tiny corpus is far below the numba threshold; forced onto numba, it returns the same results."""
    assert bm25._model.backend == "numpy"
    monkeypatch.setattr(bm25_module, "NUMBA_MIN_DOCUMENTS", len(TINY_CORPUS))
    compiled = load_retriever(tiny_index(tmp_path_factory, "bm25"))
    assert compiled._model.backend == "numba"
    queries = [query for query, _ in PINNED] + list(QUERIES)
    for numpy_hits, numba_hits in zip(bm25.search(queries, 4), compiled.search(queries, 4), strict=True):
        assert [p.id for p in numpy_hits] == [p.id for p in numba_hits]
        assert [p.score for p in numpy_hits] == pytest.approx([p.score for p in numba_hits])
