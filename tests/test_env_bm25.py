"""The env over the bundled wiki-mini data with a real in-process BM25 index (slow: builds the index)."""

import gymnasium
import numpy as np
import pytest

from searchgym import env
from searchgym.env import EnvConfig, SearchVectorEnv
from searchgym.paths import WIKI_MINI_CORPUS
from searchgym.retriever.index import IndexSpec, build_index, load_retriever

pytestmark = pytest.mark.slow


class CountingRetriever:
    def __init__(self, retriever):
        self.retriever = retriever
        self.batch_sizes = []

    def search(self, queries, k):
        self.batch_sizes.append(len(queries))
        return self.retriever.search(queries, k)


@pytest.fixture(scope="module")
def bm25(tmp_path_factory):
    out = tmp_path_factory.mktemp("indexes") / "wiki-mini-bm25"
    build_index(IndexSpec(corpus=WIKI_MINI_CORPUS, out=out, progress=False))
    return load_retriever(out)


def test_the_docs_episode_by_hand(bm25):
    search_env = gymnasium.make(env.ENV_ID, dataset="wiki-mini-dev", retriever=bm25)
    example = {e.id: e for e in env.load_dataset("wiki-mini-dev")}["wikimini_popqa_918"]
    prompt, _ = search_env.reset(options={"example": example})
    assert prompt.endswith("Question: In what city was Édouard Vaillant born?")
    observation, *_, info = search_env.step(
        "<think>I do not know.</think>\n<search> Édouard Vaillant born </search>"
    )
    assert (
        observation.startswith("\n\n<information>Doc 1(Title: Édouard Vaillant) ")
        and "Vierzon" in observation
    )
    assert info["retrieved_ids"][0] == "6192"
    _, reward, terminated, _, info = search_env.step("<answer> Vierzon </answer>")
    assert (reward, terminated, info["em"], info["f1"]) == (1.0, True, 1.0, 1.0)


def test_a_batch_of_dev_questions_makes_one_retriever_call_per_step(bm25):
    retriever = CountingRetriever(bm25)
    config = EnvConfig(max_turns=2, max_searches=1)
    vector = SearchVectorEnv(num_envs=64, dataset="wiki-mini-dev", retriever=retriever, config=config)
    batch = vector.envs[0].examples[:64]
    vector.reset(options={"examples": batch})
    _, _, terminated, truncated, infos = vector.step([f"<search> {e.question} </search>" for e in batch])
    assert retriever.batch_sizes == [64] and not (terminated | truncated).any()
    assert all(len(ids) == 3 for ids in infos["retrieved_ids"])
    _, _, terminated, _, _ = vector.step(["<answer> unknown </answer>"] * 64)
    assert terminated.all() and retriever.batch_sizes == [64]
    assert np.mean([info["em"] for info in vector.final_infos]) == 0.0


def test_the_readme_episode(bm25):
    search_env = gymnasium.make(env.ENV_ID, dataset="wiki-mini-dev", retriever=bm25)
    _, info = search_env.reset(seed=0)
    assert info["example_id"] == "wikimini_hotpotqa_dev_5a713a5a5542994082a3e6a9"
    observation, *_ = search_env.step(f"<search> {info['question']} </search>")
    assert "Manchester United" in observation
    *_, info = search_env.step("<answer> Manchester United </answer>")
    assert (info["answer"], info["em"], info["f1"], info["reward"]) == ("Manchester United", 1.0, 1.0, 1.0)
