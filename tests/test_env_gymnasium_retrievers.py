"""The registered env with real retrievers: pickling, Gymnasium's checker and async vector envs."""

import copy
import pickle
import threading
import warnings

import gymnasium
import pytest
import waitress
from gymnasium.utils.env_checker import check_env
from retriever_fixtures import QUERIES, tiny_index

from searchgym import env
from searchgym.env.data import QAExample
from searchgym.env.search_env import SearchEnv
from searchgym.retriever.bm25 import Bm25Retriever
from searchgym.retriever.client import HttpRetriever
from searchgym.retriever.config import ServerConfig
from searchgym.retriever.index import load_retriever, open_index
from searchgym.retriever.server import RetrievalService, create_app

# Not ASCII on purpose: async vector envs pass observations through shared memory.
EXAMPLE = QAExample("q0", "Which planet is the Red Planet — Mars or Vénus?", ("Mars",))
SEARCH = "<search> which planet is called the red planet </search>"


@pytest.fixture(scope="module")
def bm25(tmp_path_factory):
    return load_retriever(tiny_index(tmp_path_factory, "bm25"))


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return load_retriever(tiny_index(tmp_path_factory, "dense"), device="cpu")


@pytest.fixture(scope="module")
def http(bm25):
    service = RetrievalService(bm25, ServerConfig(max_wait_ms=1.0))
    server = waitress.create_server(create_app(service), host="127.0.0.1", port=0, threads=4)
    threading.Thread(target=server.run, daemon=True).start()
    yield HttpRetriever(f"http://127.0.0.1:{server.effective_port}")
    server.close()
    service.close()


@pytest.fixture(params=["bm25", "dense", "http"])
def retriever(request):
    return request.getfixturevalue(request.param)


def ids(retriever, k=3):
    return [[passage.id for passage in passages] for passages in retriever.search(QUERIES, k)]


def test_a_retriever_pickles_and_deep_copies_by_reopening(retriever):
    expected = ids(retriever)
    for copied in (pickle.loads(pickle.dumps(retriever)), copy.deepcopy(retriever)):
        assert copied is not retriever and type(copied) is type(retriever)
        assert ids(copied) == expected


def test_the_registered_env_passes_gymnasiums_checker(retriever):
    made = gymnasium.make(env.ENV_ID, dataset=[EXAMPLE], retriever=retriever)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(made.unwrapped)
    assert [str(w.message) for w in caught if "render fps" not in str(w.message)] == []


def test_a_retriever_built_by_hand_says_how_to_make_it_picklable(tmp_path_factory):
    folder = tiny_index(tmp_path_factory, "bm25")
    opened = open_index(folder)
    by_hand = Bm25Retriever(folder, opened.manifest.bm25, opened.retriever._store)
    with pytest.raises(TypeError, match=r"open it with searchgym.retriever.load_retriever\(index_dir\)"):
        pickle.dumps(by_hand)
    # Gymnasium's checker re-makes the env from its spec, deep-copying the retriever: the reason for all this.
    with pytest.raises(TypeError, match="cannot be pickled or deep-copied"):
        check_env(gymnasium.make(env.ENV_ID, dataset=[EXAMPLE], retriever=by_hand).unwrapped)


def test_async_vector_envs_in_subprocesses_match_an_env_in_process(bm25):
    local = SearchEnv(dataset=[EXAMPLE], retriever=bm25)
    prompt, _ = local.reset(seed=0)
    information, *_ = local.step(SEARCH)
    vector = gymnasium.make_vec(
        env.ENV_ID, num_envs=2, vectorization_mode="async", dataset=[EXAMPLE], retriever=bm25
    )
    try:
        assert isinstance(vector, gymnasium.vector.AsyncVectorEnv)
        observations, _ = vector.reset(seed=0)
        assert list(observations) == [prompt, prompt]
        observations, rewards, terminated, *_ = vector.step([SEARCH, "<answer> Mars </answer>"])
        assert observations[0] == information and "Doc 1(Title: Mars)" in information
        assert list(terminated) == [False, True] and list(rewards) == [0.0, 1.0]
    finally:
        vector.close()
