import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from retriever_fixtures import (
    QUERIES,
    TINY_CORPUS,
    BlockingRetriever,
    EchoRetriever,
    FailingRetriever,
    tiny_index,
)

from searchgym.errors import SearchgymError
from searchgym.retriever import batching
from searchgym.retriever.base import Passage
from searchgym.retriever.batching import (
    LruCache,
    MicroBatcher,
    QueueFullError,
    ServerStats,
    passages_nbytes,
)
from searchgym.retriever.config import ServerConfig
from searchgym.retriever.index import load_retriever, open_index
from searchgym.retriever.server import RetrievalService, create_app


@pytest.fixture
def echo():
    return EchoRetriever()


@pytest.fixture
def client_for():
    """Make a Flask test client over a retriever; every service is closed after the test."""
    services = []

    def make(retriever, manifest=None, **config):
        service = RetrievalService(retriever, ServerConfig(**{"max_wait_ms": 1.0, **config}))
        services.append(service)
        return create_app(service, manifest=manifest).test_client()

    yield make
    for service in services:
        service.close()


@pytest.fixture(scope="module")
def bm25_dir(tmp_path_factory):
    return tiny_index(tmp_path_factory, "bm25")


def test_search_r1_payload_and_response_shape(client_for, bm25_dir):
    opened = open_index(bm25_dir)
    client = client_for(opened.retriever, manifest=opened.manifest)
    response = client.post(
        "/retrieve", json={"queries": ["capital of france", "hamlet"], "topk": 3, "return_scores": True}
    )
    assert response.status_code == 200
    body = response.get_json()
    assert list(body) == ["result"] and len(body["result"]) == 2
    first = body["result"][0][0]
    assert first == {
        "document": {"id": "3", "contents": TINY_CORPUS[3]["contents"]},
        "score": pytest.approx(1.8715, abs=1e-4),
    }
    assert all(
        set(hit) == {"document", "score"} and set(hit["document"]) == {"id", "contents"}
        for hit in body["result"][1]
    )


def test_without_return_scores_hits_are_bare_documents(client_for, bm25_dir):
    client = client_for(load_retriever(bm25_dir))
    body = client.post("/retrieve", json={"queries": ["hamlet"], "topk": 1}).get_json()
    assert body == {"result": [[{"id": "2", "contents": TINY_CORPUS[2]["contents"]}]]}


def test_json_without_content_type_and_utf8_out(client_for, echo):
    response = client_for(echo).post("/retrieve", data='{"queries": ["Poznań"], "topk": 1}'.encode())
    assert response.status_code == 200
    assert '"id":"Poznań#0"' in response.get_data(as_text=True)


def test_topk_defaults_to_three_as_in_search_r1(client_for, echo):
    body = client_for(echo).post("/retrieve", json={"queries": ["q"]}).get_json()
    assert len(body["result"][0]) == 3


def test_health_reports_the_index(client_for, bm25_dir):
    opened = open_index(bm25_dir)
    body = client_for(opened.retriever, manifest=opened.manifest).get("/health").get_json()
    assert body == {"status": "ok", "method": "bm25", "documents": len(TINY_CORPUS)}


BAD_REQUESTS = [
    (b"not json", 400, "must be JSON"),
    (b"", 400, "must be JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b"{}", 400, "'queries' must be a list"),
    (b'{"queries": "who?"}', 400, "'queries' must be a list"),
    (b'{"queries": ["ok", 7]}', 400, r"queries\[1\] is int"),
    (b'{"queries": ["ok", null]}', 400, r"queries\[1\] is NoneType"),
    (b'{"queries": ["ok", "  "]}', 400, r"queries\[1\] is empty"),
    (b'{"queries": ["q"], "topk": 0}', 400, "'topk' must be an integer from 1 to 100"),
    (b'{"queries": ["q"], "topk": 101}', 400, "'topk' must be an integer"),
    (b'{"queries": ["q"], "topk": "3"}', 400, "'topk' must be an integer"),
    (b'{"queries": ["q"], "topk": 2.5}', 400, "'topk' must be an integer"),
    (b'{"queries": ["q"], "topk": true}', 400, "'topk' must be an integer"),
    (b'{"queries": ["q"], "return_scores": "yes"}', 400, "'return_scores' must be true or false"),
    (b'{"queries": [' + b",".join([b'"q"'] * 1025) + b"]}", 413, "1025 queries in one request"),
    (b'{"queries": ["' + b"x" * (17 * 1024 * 1024) + b'"]}', 413, "Request Entity Too Large|exceeds"),
]


@pytest.mark.parametrize(
    ("body", "status", "message"), BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))]
)
def test_bad_input_gets_a_json_error_and_the_server_keeps_serving(client_for, echo, body, status, message):
    client = client_for(echo)
    response = client.post("/retrieve", data=body, content_type="application/json")
    assert response.status_code == status
    assert response.is_json
    assert re.search(message, response.get_json()["error"])
    assert client.post("/retrieve", json={"queries": ["fine"], "topk": 1}).status_code == 200


@pytest.mark.parametrize(("method", "path", "status"), [("get", "/retrieve", 405), ("post", "/nowhere", 404)])
def test_wrong_routes_are_json_errors(client_for, echo, method, path, status):
    response = getattr(client_for(echo), method)(path)
    assert response.status_code == status and "error" in response.get_json()


def test_long_queries_are_truncated_and_counted(client_for, echo):
    client = client_for(echo, max_query_chars=10)
    body = client.post("/retrieve", json={"queries": ["a" * 50, "short"], "topk": 1}).get_json()
    assert [hits[0]["id"] for hits in body["result"]] == ["a" * 10 + "#0", "short#0"]
    assert client.get("/stats").get_json()["truncated_queries"] == 1


def test_a_backend_failure_is_a_500_and_does_not_kill_the_server(client_for):
    client = client_for(FailingRetriever())
    response = client.post("/retrieve", json={"queries": ["q"]})
    assert response.status_code == 500
    assert response.get_json() == {"error": "internal error: RuntimeError: index file vanished"}
    assert client.get("/health").status_code == 200


def test_a_full_queue_answers_429_with_retry_after(client_for):
    blocking = BlockingRetriever()
    client = client_for(blocking, max_queue=2, max_queries_per_request=2, max_batch=1)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, "/retrieve", json={"queries": ["a"]})
        assert blocking.entered.wait(10)  # "a" is in the backend; "b" and "c" fill the queue
        second = pool.submit(client.post, "/retrieve", json={"queries": ["b", "c"]})
        for _ in range(1000):
            rejected = client.post("/retrieve", json={"queries": ["d"]})
            if rejected.status_code == 429:
                break
        blocking.release.set()
        assert (first.result().status_code, second.result().status_code) == (200, 200)
    assert rejected.status_code == 429
    assert rejected.headers["Retry-After"] == "1"
    assert "retry shortly" in rejected.get_json()["error"]


def test_api_key_guards_everything_but_health(client_for, echo):
    client = client_for(echo, api_key="s3cret")
    assert client.post("/retrieve", json={"queries": ["q"]}).status_code == 401
    wrong = client.post("/retrieve", json={"queries": ["q"]}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
    assert client.get("/stats").status_code == 401
    assert client.get("/health").status_code == 200
    ok = client.post("/retrieve", json={"queries": ["q"]}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200


def test_stats_count_requests_batches_cache_and_errors(client_for, echo):
    client = client_for(echo)
    for _ in range(3):
        client.post("/retrieve", json={"queries": ["same", "other"], "topk": 2})
    client.post("/retrieve", json={"queries": []})
    client.post("/retrieve", data=b"{", content_type="application/json")
    stats = client.get("/stats").get_json()
    assert (stats["requests"], stats["queries"]) == (4, 6)
    cache = stats["cache"]
    assert (cache["hits"], cache["misses"], cache["entries"], cache["capacity"]) == (4, 2, 2, 10_000)
    assert 0 < cache["bytes"] <= cache["max_bytes"] == 256 * 1024 * 1024
    assert stats["batches"]["count"] == 1 and stats["batches"]["size_histogram"] == {"2-3": 1}
    assert stats["errors"] == {"400": 1}
    assert stats["latency_ms"]["p50"] > 0 and stats["latency_ms"]["p99"] >= stats["latency_ms"]["p50"]
    assert stats["queue"] == {"pending": 0, "capacity": 4096}
    assert stats["queries_per_s"] > 0
    assert echo.calls == [(["same", "other"], 2)]


def test_stats_figures_from_a_known_history(monkeypatch):
    clock = {"now": 100.0}
    monkeypatch.setattr(batching, "time", SimpleNamespace(monotonic=lambda: clock["now"]))
    stats = ServerStats()
    clock["now"] = 100.2
    stats.record_request(latency_s=0.010, queries=2, truncated=1)
    clock["now"] = 100.5
    assert stats.snapshot()["queries_per_s"] == 4.0  # a young server: 2 queries over its 0.5 s
    for when, queries, latency_s in ((105.0, 3, 0.030), (112.0, 5, 0.020), (115.0, 2, 0.040)):
        clock["now"] = when
        stats.record_request(latency_s=latency_s, queries=queries, truncated=0)
    for size in (1, 3, 3, 8):
        stats.record_batch(size)
    snapshot = stats.snapshot()
    assert (snapshot["uptime_s"], snapshot["requests"], snapshot["queries"]) == (15.0, 4, 12)
    assert snapshot["queries_per_s"] == 1.0  # the last 10 s, its first instant included: 3 + 5 + 2
    assert snapshot["latency_ms"] == {"p50": 25.0, "p99": 39.7, "window_requests": 4}
    assert snapshot["batches"] == {
        "count": 4,
        "mean_size": 3.75,
        "max_size": 8,
        "size_histogram": {"1": 1, "2-3": 2, "8-15": 1},
    }
    assert snapshot["truncated_queries"] == 1


def test_concurrent_requests_are_batched_and_answer_like_unbatched_calls(client_for, bm25_dir):
    bm25 = load_retriever(bm25_dir)
    queries = [f"{query} {extra}" for query in QUERIES for extra in ("", "planet", "city", "tragedy")]
    expected = {query: bm25.search([query], 3)[0] for query in queries}
    client = client_for(bm25, cache_size=0, max_wait_ms=100.0, max_batch=8)
    start = threading.Barrier(8)

    def ask(worker):
        start.wait()
        mine = queries[worker::8]
        return mine, [
            client.post("/retrieve", json={"queries": [q], "return_scores": True}).get_json() for q in mine
        ]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    for mine, bodies in answers:
        for query, body in zip(mine, bodies, strict=True):
            hits = body["result"][0]
            assert [(h["document"]["id"], h["score"]) for h in hits] == [
                (p.id, p.score) for p in expected[query]
            ]
    assert client.get("/stats").get_json()["batches"]["max_size"] > 1


def test_the_batcher_groups_by_k_and_searches_duplicates_once(echo):
    stats = ServerStats()
    # Full at 4 queries, so the long wait only matters on a machine too loaded to submit them in time.
    batcher = MicroBatcher(echo, max_batch=4, max_wait_s=5.0, max_queue=10, stats=stats)
    futures = batcher.submit(["a", "b"], 2) + batcher.submit(["a"], 2) + batcher.submit(["a"], 1)
    results = [future.result(timeout=10) for future in futures]
    batcher.close()
    assert sorted(echo.calls) == [(["a"], 1), (["a", "b"], 2)]
    assert [r[0].id for r in results] == ["a#0", "b#0", "a#0", "a#0"]
    assert len(results[3]) == 1


def test_queries_waiting_together_hold_on_for_company_until_the_batch_fills(echo):
    batcher = MicroBatcher(echo, max_batch=3, max_wait_s=30.0, max_queue=10, stats=ServerStats())
    first = batcher.submit(["a", "b"], 1)  # two at once: not alone, so they wait for a third
    time.sleep(0.2)
    assert echo.calls == []
    last = batcher.submit(["c"], 1)  # the batch is full: searched at once, long before the 30 s
    assert [future.result(timeout=10)[0].id for future in first + last] == ["a#0", "b#0", "c#0"]
    batcher.close()
    assert echo.calls == [(["a", "b", "c"], 1)]


def test_the_batcher_refuses_more_than_its_queue(echo):
    blocking = BlockingRetriever()
    batcher = MicroBatcher(blocking, max_batch=1, max_wait_s=0.0, max_queue=2, stats=ServerStats())
    first = batcher.submit(["busy"], 1)
    assert blocking.entered.wait(10)
    batcher.submit(["x", "y"], 1)
    with pytest.raises(QueueFullError):
        batcher.submit(["z"], 1)
    blocking.release.set()
    assert first[0].result(timeout=10)[0].id == "busy#0"
    batcher.close()


class MeetingRetriever:
    """Answers only once ``parties`` calls are in the backend at the same time (else times out)."""

    def __init__(self, parties: int) -> None:
        self.meeting = threading.Barrier(parties, timeout=10)

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        self.meeting.wait()
        return [[Passage(f"{query}#0", query, 1.0)] for query in queries]


def test_several_workers_search_several_batches_at_once():
    # Batches of one query: the first worker leaves the second query to another, which must be woken.
    batcher = MicroBatcher(
        MeetingRetriever(2), max_batch=1, max_wait_s=0.0, max_queue=10, stats=ServerStats(), workers=2
    )
    try:
        futures = batcher.submit(["a", "b"], 1)
        assert [future.result(timeout=20)[0].id for future in futures] == ["a#0", "b#0"]
    finally:
        batcher.close()


def test_lru_cache_evicts_the_least_recently_used():
    cache = LruCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)
    disabled = LruCache(0)
    disabled.put("a", 1)
    assert disabled.get("a") is None
    single = LruCache(1)
    single.put("a", 1)
    assert single.get("a") == 1
    single.put("b", 2)
    assert (single.get("a"), single.get("b")) == (None, 2)


@pytest.mark.parametrize(
    "changes",
    [
        {"max_batch": 0},
        {"search_workers": 0},
        {"max_wait_ms": -1},
        {"max_queue": 10, "max_queries_per_request": 20},
        {"max_inflight": 0},
        {"max_connections": 0},
        {"cache_bytes": -1},
    ],
)
def test_server_config_rejects_impossible_limits(changes):
    with pytest.raises(SearchgymError):
        ServerConfig(**changes)


def test_a_lone_query_is_searched_without_waiting_for_a_batch(echo):
    # max_wait_s is far longer than the result timeout: a lone query that waited for company would fail.
    batcher = MicroBatcher(echo, max_batch=64, max_wait_s=120.0, max_queue=10, stats=ServerStats())
    try:
        assert batcher.submit(["alone"], 1)[0].result(timeout=10)[0].id == "alone#0"
    finally:
        batcher.close()
    assert echo.calls == [(["alone"], 1)]


def test_deeply_nested_json_is_a_400_not_a_500(client_for, echo):
    client = client_for(echo)
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"queries": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"):
        response = client.post("/retrieve", data=body, content_type="application/json")
        assert response.status_code == 400
        assert "RecursionError" not in response.get_json()["error"]
    assert client.get("/stats").get_json()["errors"] == {"400": 2}


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_bearer_scheme_is_case_insensitive(client_for, echo, scheme):
    client = client_for(echo, api_key="s3cret")
    headers = {"Authorization": f"{scheme} s3cret"}
    assert client.post("/retrieve", json={"queries": ["q"]}, headers=headers).status_code == 200
    wrong = {"Authorization": f"{scheme} s3cre"}
    assert client.post("/retrieve", json={"queries": ["q"]}, headers=wrong).status_code == 401


def test_the_cache_is_bounded_in_bytes():
    # Sizes are the string lengths: "aaaa" 4 + "bb" 2 = 6 fits in 7; "ccc" (3) evicts "aaaa" then.
    cache = LruCache(100, max_bytes=7, size_of=len)
    cache.put("a", "aaaa")
    cache.put("b", "bb")
    assert (cache.nbytes, len(cache)) == (6, 2)
    cache.put("c", "ccc")
    assert (cache.get("a"), cache.get("b"), cache.get("c"), cache.nbytes) == (None, "bb", "ccc", 5)
    cache.put("b", "b")  # replacing an entry counts only its new size
    assert cache.nbytes == 4
    cache.put("huge", "x" * 8)  # larger than the whole budget: not stored, nothing evicted
    assert (cache.get("huge"), len(cache), cache.nbytes) == (None, 2, 4)
    exact = LruCache(100, max_bytes=4, size_of=len)
    exact.put("a", "aaaa")  # exactly the budget: kept
    assert (exact.get("a"), exact.nbytes) == ("aaaa", 4)


def test_big_results_stay_within_the_cache_byte_budget(client_for, echo):
    # Each request caches 20 queries x 100 passages; the budget holds far fewer than 10 requests' worth.
    budget = 2 * 1024 * 1024
    client = client_for(echo, cache_bytes=budget)
    for request_number in range(10):
        queries = [f"query {request_number}-{i} " + "x" * 200 for i in range(20)]
        assert client.post("/retrieve", json={"queries": queries, "topk": 100}).status_code == 200
    cache = client.get("/stats").get_json()["cache"]
    assert cache["bytes"] <= budget
    assert 0 < cache["entries"] < 200


def test_passage_bytes_grow_with_their_text():
    short = [Passage("1", "x", 1.0)]
    assert passages_nbytes([Passage("1", "x" * 1001, 1.0)]) - passages_nbytes(short) == 1000
    assert passages_nbytes(short * 3) > 3 * len("x")


def test_a_timed_out_request_gets_503_with_retry_after_and_its_queries_leave_the_queue(client_for):
    blocking = BlockingRetriever()
    client = client_for(blocking, max_batch=1, request_timeout_s=0.2)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/retrieve", json={"queries": ["busy"]})
        assert blocking.entered.wait(10)  # the worker is stuck on "busy"
        timed_out = client.post("/retrieve", json={"queries": ["late-1", "late-2"]})
        assert timed_out.status_code == 503 and timed_out.headers["Retry-After"] == "1"
        assert client.get("/stats").get_json()["queue"]["pending"] == 0  # withdrawn, not left queued
        blocking.release.set()
        assert first.result().status_code == 503  # it waited 0.2 s too
    # The withdrawn queries never reach the backend.
    assert client.post("/retrieve", json={"queries": ["after"]}).status_code == 200
    assert [queries for queries, _ in blocking.calls] == [["busy"], ["after"]]


def test_the_batcher_skips_cancelled_queries(echo):
    blocking = BlockingRetriever()
    batcher = MicroBatcher(blocking, max_batch=1, max_wait_s=0.0, max_queue=10, stats=ServerStats())
    first = batcher.submit(["busy"], 1)
    assert blocking.entered.wait(10)
    withdrawn = batcher.submit(["gone"], 1)
    kept = batcher.submit(["kept"], 1)
    batcher.cancel(withdrawn)
    assert batcher.pending == 1 and withdrawn[0].cancelled()
    also_gone = batcher.submit(["also gone"], 1)
    # One request's queries: the first is being searched (cannot be withdrawn, finishes normally), the
    # other waits and is withdrawn, its queue slot freed.
    batcher.cancel(first + also_gone)
    assert batcher.pending == 1 and also_gone[0].cancelled() and not first[0].cancelled()
    blocking.release.set()
    assert first[0].result(timeout=10)[0].id == "busy#0"
    assert kept[0].result(timeout=10)[0].id == "kept#0"
    batcher.close()
    assert [queries for queries, _ in blocking.calls] == [["busy"], ["kept"]]
