"""Cross-encoder reranking in-process and behind the server, with a tiny random cross-encoder."""

import pickle
from concurrent.futures import ThreadPoolExecutor

import pytest
from retriever_fixtures import QUERIES, EchoRetriever, tiny_index, tiny_random_cross_encoder
from sentence_transformers import CrossEncoder

from searchgym.retriever.config import ServerConfig
from searchgym.retriever.index import load_retriever
from searchgym.retriever.rerank import RerankerError, RerankingRetriever, passage_text
from searchgym.retriever.server import RetrievalService


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory):
    return tiny_random_cross_encoder(tmp_path_factory.mktemp("cross-encoder") / "tiny-ce")


@pytest.fixture(scope="module")
def bm25_dir(tmp_path_factory):
    return tiny_index(tmp_path_factory, "bm25")


class CountingCrossEncoder:
    """Wraps a CrossEncoder and records the number of pairs of every ``predict`` call."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []

    def predict(self, pairs, **kwargs):
        self.calls.append(len(pairs))
        return self.inner.predict(pairs, **kwargs)


def test_the_top_candidates_come_back_in_the_cross_encoders_order(bm25_dir, cross_encoder_dir):
    plain = load_retriever(bm25_dir)
    reranked = load_retriever(bm25_dir, rerank=str(cross_encoder_dir), rerank_depth=5, device="cpu")
    judge = CrossEncoder(str(cross_encoder_dir), device="cpu")
    rows = zip(QUERIES, plain.search(QUERIES, 5), reranked.search(QUERIES, 2), strict=True)
    for query, candidates, results in rows:
        scores = judge.predict([(query, passage_text(p)) for p in candidates]).tolist()
        by_judge = sorted(zip(scores, [p.id for p in candidates], strict=True), key=lambda pair: -pair[0])
        assert [p.id for p in results] == [doc_id for _, doc_id in by_judge[:2]]
        assert [p.score for p in results] == pytest.approx([score for score, _ in by_judge[:2]], rel=1e-5)


def test_one_cross_encoder_call_per_micro_batch(cross_encoder_dir):
    backend = EchoRetriever()  # k passages per query
    reranker = RerankingRetriever(backend, model=str(cross_encoder_dir), depth=4, device="cpu")
    reranker._cross_encoder = counting = CountingCrossEncoder(reranker._cross_encoder)
    config = ServerConfig(max_batch=64, max_wait_ms=200.0)
    with RetrievalService(reranker, config) as service, ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda q: service.retrieve([q], 3), [f"query {i}" for i in range(6)]))
    assert [len(answer[0]) for answer in answers] == [3] * 6
    assert backend.calls and all(k == 4 for _, k in backend.calls)  # depth candidates, not topk
    assert sum(counting.calls) == 6 * 4 and len(counting.calls) == len(backend.calls) < 6


def test_a_reranking_retriever_pickles(bm25_dir, cross_encoder_dir):
    reranked = load_retriever(bm25_dir, rerank=str(cross_encoder_dir), device="cpu")
    copied = pickle.loads(pickle.dumps(reranked))
    assert [[p.id for p in hits] for hits in copied.search(QUERIES, 3)] == [
        [p.id for p in hits] for hits in reranked.search(QUERIES, 3)
    ]


def test_bad_reranker_settings_are_clear_errors(tmp_path, cross_encoder_dir):
    with pytest.raises(RerankerError, match="cannot load cross-encoder"):
        RerankingRetriever(EchoRetriever(), model=str(tmp_path / "missing"), device="cpu")
    with pytest.raises(RerankerError, match="--rerank-depth must be at least 1"):
        RerankingRetriever(EchoRetriever(), model=str(cross_encoder_dir), depth=0, device="cpu")
