import json as json_module
import socket
import threading
import time

import pytest
import requests
from flask import Flask, jsonify, request
from retriever_fixtures import EchoRetriever
from werkzeug.serving import make_server

from searchgym.errors import SearchgymError
from searchgym.retriever import client
from searchgym.retriever.base import Passage
from searchgym.retriever.client import HttpRetriever, RetrievalRequestError, RetrieverUnavailableError
from searchgym.retriever.config import ServerConfig
from searchgym.retriever.server import RetrievalService, create_app

FAST_RETRIES = {"backoff_s": 0.001, "max_backoff_s": 0.01}


class FlakyApp:
    """A Search-R1-style endpoint that answers ``failures`` in turn before it starts working."""

    def __init__(self, failures: list[int | str]) -> None:
        self.failures = list(failures)
        self.requests: list[dict] = []
        self.app = Flask("flaky")
        self.app.post("/retrieve")(self.retrieve)

    def retrieve(self):
        body = request.get_json()
        self.requests.append(body)
        if self.failures:
            failure = self.failures.pop(0)
            if failure == "slow":
                time.sleep(3.0)
            else:
                response = jsonify(error=f"failure {failure}")
                if failure == 429:
                    response.headers["Retry-After"] = "0"
                return response, failure
        hits = [[{"document": {"id": q, "contents": f'"{q}"\ntext'}, "score": 1.0}] for q in body["queries"]]
        return jsonify(result=hits)


@pytest.fixture
def serve_app():
    """Serve a Flask app on a loopback port in a thread; yields a function app -> base URL."""
    servers = []

    def start(app):
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("failures", [[503], [429, 500], [502, 504, 503]])
def test_retries_until_the_server_recovers(serve_app, failures):
    flaky = FlakyApp(failures)
    client = HttpRetriever(serve_app(flaky.app), max_retries=3, **FAST_RETRIES)
    assert client.search(["q1", "q2"], 1) == [
        [Passage("q1", '"q1"\ntext', 1.0)],
        [Passage("q2", '"q2"\ntext', 1.0)],
    ]
    assert len(flaky.requests) == len(failures) + 1


def test_a_timeout_is_retried(serve_app):
    flaky = FlakyApp(["slow"])
    # The timeout leaves the healthy retry ample time on a loaded machine; only the slow answer overruns it.
    client = HttpRetriever(serve_app(flaky.app), timeout_s=1.0, max_retries=1, **FAST_RETRIES)
    assert client.search(["q"], 1)[0][0].id == "q"


def test_gives_up_with_a_clear_error_after_the_last_retry(serve_app):
    flaky = FlakyApp([503] * 10)
    client = HttpRetriever(serve_app(flaky.app), max_retries=2, **FAST_RETRIES)
    with pytest.raises(RetrieverUnavailableError, match=r"after 3 attempts .*HTTP 503: failure 503"):
        client.search(["q"], 1)
    assert len(flaky.requests) == 3


def test_a_refused_request_is_not_retried(serve_app):
    flaky = FlakyApp([400])
    client = HttpRetriever(serve_app(flaky.app), max_retries=5, **FAST_RETRIES)
    with pytest.raises(RetrievalRequestError, match="HTTP 400: failure 400"):
        client.search(["q"], 1)
    assert len(flaky.requests) == 1


def test_a_server_that_is_not_there(serve_app):
    client = HttpRetriever(f"http://127.0.0.1:{free_port()}", max_retries=2, **FAST_RETRIES)
    with pytest.raises(RetrieverUnavailableError, match=r"ConnectionError.*is `searchgym serve` running"):
        client.search(["q"], 1)


def test_large_batches_are_split_into_posts_in_order(serve_app):
    flaky = FlakyApp([])
    client = HttpRetriever(serve_app(flaky.app), batch_size=2)
    queries = [f"q{i}" for i in range(5)]
    assert [hits[0].id for hits in client.search(queries, 1)] == queries
    assert [body["queries"] for body in flaky.requests] == [["q0", "q1"], ["q2", "q3"], ["q4"]]
    assert all(body["return_scores"] is True and body["topk"] == 1 for body in flaky.requests)
    assert client.search([], 3) == []


def test_a_response_in_another_layout_is_a_clear_error(serve_app):
    app = Flask("odd")
    app.post("/retrieve")(lambda: jsonify(results=[]))
    with pytest.raises(RetrievalRequestError, match="not Search-R1's result layout"):
        HttpRetriever(serve_app(app)).search(["q"], 1)


# One query's two hits in each response shape Search-R1's servers send (retrieval_server.py with and without
# return_scores, google_search_server.py / serp_search_server.py, retrieval_rerank_server.py), and FlashRAG's.
MARS, VENUS = '"Mars"\nThe red planet.', '"Venus"\nThe hottest planet.'
SEARCH_R1_SHAPES = {
    "scores": [
        {"document": {"id": "7", "contents": MARS}, "score": 2.5},
        {"document": {"id": "9", "contents": VENUS}, "score": 0.5},
    ],
    "bare documents": [{"id": "7", "contents": MARS}, {"id": "9", "contents": VENUS}],
    "web search": [{"document": {"contents": MARS}}, {"document": {"contents": VENUS}}],
    "rerank with scores": [{"document": MARS, "score": 3.0}, {"document": VENUS, "score": -1.0}],
    "rerank bare": [MARS, VENUS],
    "flashrag title/text": [
        {"id": "7", "title": "Mars", "text": "The red planet."},
        {"id": "9", "title": "Venus", "text": "The hottest planet."},
    ],
}
EXPECTED_SHAPES = {  # (ids, scores); a missing score is the reciprocal rank, a missing id ""
    "scores": (["7", "9"], [2.5, 0.5]),
    "bare documents": (["7", "9"], [1.0, 0.5]),
    "web search": (["", ""], [1.0, 0.5]),
    "rerank with scores": (["", ""], [3.0, -1.0]),
    "rerank bare": (["", ""], [1.0, 0.5]),
    "flashrag title/text": (["7", "9"], [1.0, 0.5]),
}


@pytest.mark.parametrize("shape", list(SEARCH_R1_SHAPES))
def test_every_search_r1_response_shape_is_read(serve_app, shape):
    app = Flask("search-r1-stand-in")
    app.post("/retrieve")(
        lambda: jsonify(result=[SEARCH_R1_SHAPES[shape]] * len(request.get_json()["queries"]))
    )
    results = HttpRetriever(serve_app(app)).search(["red planet", "hot planet"], 2)
    ids, scores = EXPECTED_SHAPES[shape]
    for passages in results:
        assert [p.id for p in passages] == ids
        assert [p.score for p in passages] == scores
        assert [p.contents for p in passages] == [MARS, VENUS]
        assert [p.title for p in passages] == ["Mars", "Venus"]


@pytest.mark.parametrize("hit", [{"document": {"id": "1"}}, {"document": 3}, 7])
def test_a_hit_without_text_is_a_clear_error(serve_app, hit):
    app = Flask("odd-hit")
    app.post("/retrieve")(lambda: jsonify(result=[[hit]]))
    with pytest.raises(RetrievalRequestError, match="not Search-R1's result layout"):
        HttpRetriever(serve_app(app)).search(["q"], 1)


def test_the_client_against_the_real_app_with_an_api_key(serve_app, monkeypatch):
    service = RetrievalService(EchoRetriever(), ServerConfig(max_wait_ms=1.0, api_key="k3y"))
    url = serve_app(create_app(service))
    with pytest.raises(RetrievalRequestError, match="HTTP 401"):
        HttpRetriever(url).search(["q"], 2)
    monkeypatch.setenv("SEARCHGYM_API_KEY", "k3y")
    assert [p.id for p in HttpRetriever(url + "/retrieve").search(["q"], 2)[0]] == ["q#0", "q#1"]
    service.close()


def test_a_server_that_accepts_and_never_answers_is_given_up_on_within_the_budget():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # the kernel completes the connections; nothing ever reads or answers
    port = silent.getsockname()[1]
    try:
        client = HttpRetriever(
            f"http://127.0.0.1:{port}", timeout_s=0.5, give_up_after_s=1.5, max_retries=100, **FAST_RETRIES
        )
        started = time.monotonic()
        with pytest.raises(RetrieverUnavailableError, match=r"in 1.5 s at most .*(Timeout|timed out)"):
            client.search(["q"], 1)
        # 100 retries of 0.5 s would take 50 s; the budget ends it after 1.5 s (the bound allows a slow box).
        assert time.monotonic() - started < 10
    finally:
        silent.close()


@pytest.mark.parametrize("changes", [{"timeout_s": 0}, {"give_up_after_s": -1}, {"max_retries": -1}])
def test_impossible_client_settings_are_refused(changes):
    with pytest.raises(SearchgymError, match="timeouts must be positive"):
        HttpRetriever("http://127.0.0.1:1", **changes)


class ScriptedSession:
    """Stands in for ``requests.Session``: answers each POST with the next (status, headers) and records
    the timeouts it was given."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.timeouts = []

    def post(self, url, *, json, headers, timeout):
        self.timeouts.append(timeout)
        status, answer_headers = self.answers.pop(0)
        response = requests.Response()
        response.status_code, response.url = status, url
        response.headers.update(answer_headers)
        body = {"result": [[]]} if status == 200 else {"error": "busy"}
        response._content = json_module.dumps(body).encode()
        return response


@pytest.fixture
def paused(monkeypatch):
    """The client's sleeps, recorded instead of slept, with the jitter at its top (x 1.0)."""
    sleeps = []
    monkeypatch.setattr(client.time, "sleep", sleeps.append)
    monkeypatch.setattr(client.random, "uniform", lambda low, high: high)
    return sleeps


def scripted(answers, **settings):
    retriever = HttpRetriever("http://searchgym.invalid", **settings)
    retriever._local.session = session = ScriptedSession(answers)
    return retriever, session


def test_retry_delays_double_up_to_their_cap_and_honour_retry_after(paused):
    answers = [(503, {}), (503, {}), (503, {}), (429, {"Retry-After": "4"}), (200, {})]
    retriever, _ = scripted(answers, max_retries=4, backoff_s=0.5, max_backoff_s=1.5)
    assert retriever.search(["q"], 1) == [[]]
    assert paused == [0.5, 1.0, 1.5, 4.0]  # doubling, capped at 1.5; the server's Retry-After is longer


def test_the_last_attempt_is_not_followed_by_a_wait(paused):
    retriever, _ = scripted([(503, {})] * 3, max_retries=2, backoff_s=0.5)
    with pytest.raises(RetrieverUnavailableError, match="after 3 attempts"):
        retriever.search(["q"], 1)
    assert paused == [0.5, 1.0]


def test_waits_and_timeouts_are_cut_to_the_time_left(paused):
    retriever, session = scripted([(503, {}), (503, {}), (200, {})], backoff_s=0.5, give_up_after_s=0.75)
    assert retriever.search(["q"], 1) == [[]]
    assert paused[0] == 0.5 and 0.7 < paused[1] <= 0.75  # 1.0 wanted, the time left given
    assert all(connect <= 0.75 and read <= 0.75 for connect, read in session.timeouts)


def test_jitter_scales_a_delay_down_to_half(paused, monkeypatch):
    monkeypatch.setattr(client.random, "uniform", lambda low, high: low)
    retriever, _ = scripted([(503, {}), (200, {})], backoff_s=0.5)
    retriever.search(["q"], 1)
    assert paused == [0.25]
