"""The env against a running retrieval server (loopback only), and with that server gone."""

import socket
import threading

import pytest
import waitress
from env_fixtures import EXAMPLES, FakeRetriever
from flask import Flask, jsonify, request

from searchgym.env import EnvConfig, SearchEnv, SearchVectorEnv
from searchgym.retriever.client import HttpRetriever
from searchgym.retriever.config import ServerConfig
from searchgym.retriever.server import RetrievalService, create_app

SCRIPT = ["<think>Look it up.</think><search> capital of France </search>", "<answer> Paris </answer>"]
TIMING_KEYS = {"retrieval_latency_s"}


@pytest.fixture
def server_url():
    service = RetrievalService(FakeRetriever(), ServerConfig(max_wait_ms=1.0))
    server = waitress.create_server(create_app(service), host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.effective_port}"
    # The serving thread is a daemon: it lingers while clients keep their connections alive.
    server.close()
    service.close()


def play(retriever):
    search_env = SearchEnv(dataset=None, retriever=retriever)
    search_env.reset(options={"example": EXAMPLES[0]})
    return [search_env.step(action) for action in SCRIPT]


def without_timings(step):
    observation, reward, terminated, truncated, info = step
    return observation, reward, terminated, truncated, {k: v for k, v in info.items() if k not in TIMING_KEYS}


def test_a_server_and_a_local_retriever_give_the_same_episode(server_url):
    remote = [without_timings(step) for step in play(HttpRetriever(server_url))]
    local = [without_timings(step) for step in play(FakeRetriever())]
    assert remote == local
    assert remote[-1][-1]["em"] == 1.0


def test_a_vector_step_over_http(server_url):
    vector = SearchVectorEnv(
        num_envs=3, dataset=None, retriever=HttpRetriever(server_url), config=EnvConfig()
    )
    vector.reset(options={"examples": list(EXAMPLES[:3])})
    queries = ["capital France", "Hamlet Shakespeare", "Stambolić born"]
    _, _, terminated, truncated, infos = vector.step([f"<search>{query}</search>" for query in queries])
    assert not (terminated | truncated).any()
    assert [ids[0] for ids in infos["retrieved_ids"]] == ["d0", "d2", "d3"]


def test_a_server_that_is_gone_ends_the_episode_with_a_clear_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    search_env = SearchEnv(dataset=None, retriever=HttpRetriever(f"http://127.0.0.1:{port}", max_retries=0))
    search_env.reset(options={"example": EXAMPLES[0]})
    observation, reward, terminated, truncated, info = search_env.step(SCRIPT[0])
    assert (observation, reward, terminated, truncated) == ("", 0.0, False, True)
    assert info["end_reason"] == "retriever_error" and info["error"].startswith("RetrieverUnavailableError")
    assert info["reward"] is None


@pytest.fixture
def web_search_url():
    """A stand-in for Search-R1's Google / SerpAPI servers: hits with contents only, no id and no score."""
    app = Flask("search-r1-web-search")

    @app.post("/retrieve")
    def retrieve():
        body = request.get_json()
        ranked = FakeRetriever().search(body["queries"], body.get("topk", 3))
        return jsonify(result=[[{"document": {"contents": p.contents}} for p in hits] for hits in ranked])

    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=2)
    threading.Thread(target=server.run, daemon=True).start()
    yield f"http://127.0.0.1:{server.effective_port}"
    server.close()


def test_an_episode_against_a_server_that_sends_no_ids_and_no_scores(web_search_url):
    remote = play(HttpRetriever(web_search_url))
    local = play(FakeRetriever())
    assert remote[0][0] == local[0][0]  # the same passages, in the same order, in the observation
    assert remote[0][0].startswith("\n\n<information>Doc 1(Title: Paris) Paris is the capital")
    assert list(remote[0][-1]["retrieved_ids"]) == ["", "", ""]
    assert remote[-1][-1]["em"] == 1.0 and remote[-1][-1]["reward"] == local[-1][-1]["reward"]
