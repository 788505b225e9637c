import gymnasium
import numpy as np
import pytest
from env_fixtures import EXAMPLES, FakeRetriever
from gymnasium.vector import AutoresetMode

from searchgym import env
from searchgym.env.config import EnvConfig
from searchgym.env.vector import SearchVectorEnv, stack_infos
from searchgym.errors import SearchgymError


def make_vector(num_envs=4, retriever=None, **kwargs):
    return SearchVectorEnv(
        num_envs=num_envs, dataset=list(EXAMPLES), retriever=retriever or FakeRetriever(), **kwargs
    )


def test_all_searches_of_a_step_go_in_one_retriever_call():
    retriever = FakeRetriever()
    vector = make_vector(retriever=retriever)
    observations, infos = vector.reset(seed=0, options={"examples": list(EXAMPLES)})
    assert [observation.rsplit("Question: ", 1)[1] for observation in observations] == [
        e.question for e in EXAMPLES
    ]
    assert list(infos["example_id"]) == ["q0", "q1", "q2", "q3"]

    actions = [
        "<search>capital France</search>",
        "<answer>Shakespeare</answer>",
        "<search>Stambolić</search>",
        "hmm",
    ]
    observations, rewards, terminated, truncated, infos = vector.step(actions)
    assert retriever.calls == [["capital France", "Stambolić"]]
    assert observations[0].startswith("\n\n<information>") and observations[1] == ""
    assert list(terminated) == [False, True, False, False] and not truncated.any()
    assert list(rewards) == [0.0, 1.0, 0.0, 0.0]
    assert list(infos["action_type"]) == ["search", "answer", "search", "invalid"]
    assert infos["retrieval_latency_s"][0] == infos["retrieval_latency_s"][2] > 0
    assert list(infos["_em"]) == [False, True, False, False] and infos["em"][1] == 1.0


def test_a_step_without_searches_makes_no_retriever_call():
    retriever = FakeRetriever()
    vector = make_vector(num_envs=2, retriever=retriever)
    vector.reset(seed=0)
    vector.step(["<answer>a</answer>", "nothing"])
    assert retriever.calls == []


def test_disabled_autoreset_collects_one_fixed_batch_and_finished_envs_are_no_ops():
    retriever = FakeRetriever()
    vector = make_vector(num_envs=2, retriever=retriever)
    assert vector.metadata["autoreset_mode"] == AutoresetMode.DISABLED
    vector.reset(options={"examples": [EXAMPLES[0], EXAMPLES[3]]})
    vector.step(["<answer>Paris</answer>", "<search>Moon landing</search>"])
    assert vector.final_infos[0]["em"] == 1.0 and vector.final_infos[1] is None

    observations, rewards, terminated, truncated, infos = vector.step(
        ["ignored", "<answer>December 1972</answer>"]
    )
    assert retriever.calls == [["Moon landing"]]
    assert observations == ("", "")
    assert list(rewards) == [0.0, 1.0]
    assert list(terminated) == [True, True] and not truncated.any()  # the finished env keeps its flags
    assert list(infos["_example_id"]) == [False, True]  # and reports nothing new

    observations, rewards, terminated, *_ = vector.step(["<search>x</search>", "<search>y</search>"])
    assert retriever.calls == [["Moon landing"]] and not rewards.any() and terminated.all()
    final = vector.final_infos
    assert [info["answer"] for info in final] == ["Paris", "December 1972"]
    assert final[1]["episode_retrieved_ids"][0] == "d4" and final[1]["num_searches"] == 1


def test_next_step_autoreset_restarts_a_finished_env_on_the_following_step():
    vector = make_vector(num_envs=2, autoreset_mode=AutoresetMode.NEXT_STEP)
    vector.reset(seed=1, options={"examples": [EXAMPLES[0], EXAMPLES[1]]})
    vector.step(["<answer>Paris</answer>", "<search>Hamlet</search>"])
    observations, rewards, terminated, truncated, infos = vector.step(
        ["ignored", "<answer>Shakespeare</answer>"]
    )
    assert observations[0].startswith(env.prompts.PROTOCOL)
    assert (rewards[0], terminated[0], truncated[0]) == (0.0, False, False)
    assert "question" in infos and infos["_question"][0] and not infos["_question"][1]
    assert terminated[1] and vector.final_infos[1]["em"] == 1.0
    # The restarted env plays its new episode from the next step on: it searches, and is reset no more.
    observations, *_ = vector.step(["<search>Paris</search>", "ignored"])
    assert observations[0].startswith("\n\n<information>")


def test_same_step_autoreset_returns_the_new_prompt_and_the_final_info():
    vector = make_vector(num_envs=1, autoreset_mode="SameStep")
    vector.reset(seed=0, options={"examples": [EXAMPLES[0]]})
    observations, rewards, terminated, _, infos = vector.step(["<answer>Paris</answer>"])
    assert terminated[0] and rewards[0] == 1.0
    assert "Question: " in observations[0] and infos["final_obs"][0] == ""
    assert infos["final_info"]["em"][0] == 1.0 and infos["final_info"]["_em"][0]


def test_a_retriever_failure_ends_only_the_searching_episodes():
    vector = make_vector(num_envs=3, retriever=FakeRetriever(fail_with=TimeoutError("no answer in 30 s")))
    vector.reset(options={"examples": list(EXAMPLES[:3])})
    _, rewards, terminated, truncated, infos = vector.step(
        ["<search>a</search>", "<answer>Shakespeare</answer>", "x"]
    )
    assert list(truncated) == [True, False, False] and list(terminated) == [False, True, False]
    assert infos["error"][0] == "TimeoutError: no answer in 30 s" and infos["reward"][0] is None
    assert infos["reward_error"][0].startswith("retriever failed") and infos["reward"][1] == 1.0
    assert list(rewards) == [0.0, 1.0, 0.0] and np.isfinite(rewards).all()


def test_reset_mask_resets_only_the_marked_envs():
    vector = make_vector(num_envs=2)
    vector.reset(options={"examples": [EXAMPLES[0], EXAMPLES[1]]})
    vector.step(["<answer>Paris</answer>", "<search>Hamlet</search>"])
    observations, infos = vector.reset(
        options={"reset_mask": np.array([True, False]), "examples": [EXAMPLES[2]]}
    )
    assert observations[0].endswith(EXAMPLES[2].question) and observations[1].startswith("\n\n<information>")
    assert list(infos["_example_id"]) == [True, False] and vector.final_infos[0] is None


def test_seeded_resets_are_deterministic_and_differ_across_sub_envs():
    first, second = make_vector(num_envs=4), make_vector(num_envs=4)
    assert first.reset(seed=11)[1]["example_id"].tolist() == second.reset(seed=11)[1]["example_id"].tolist()
    assert (
        first.reset(seed=[5, 5, 5, 5])[1]["example_id"].tolist()
        == [first.envs[0].reset(seed=5)[1]["example_id"]] * 4
    )


def test_bad_arguments_are_reported():
    vector = make_vector(num_envs=2)
    with pytest.raises(SearchgymError, match="call reset"):
        vector.step(["a", "b"])
    vector.reset()
    with pytest.raises(SearchgymError, match="got 1 actions for 2 sub-envs"):
        vector.step(["a"])
    with pytest.raises(SearchgymError, match="has 1 examples for 2 reset sub-envs"):
        vector.reset(options={"examples": [EXAMPLES[0]]})
    with pytest.raises(SearchgymError, match="unknown reset options \\['example'\\]"):
        vector.reset(options={"example": EXAMPLES[0]})
    with pytest.raises(SearchgymError, match="set num_envs to 1 or more"):
        make_vector(num_envs=0)


def test_make_vec_uses_the_registered_vector_entry_point():
    vector = gymnasium.make_vec(env.ENV_ID, num_envs=3, dataset=list(EXAMPLES), retriever=FakeRetriever())
    assert isinstance(vector, SearchVectorEnv) and vector.num_envs == len(vector.envs) == 3
    observations, _ = vector.reset(seed=0)
    assert len(observations) == 3 and observations in vector.observation_space
    vector.close()


def test_stack_infos_chooses_dtypes_from_every_value():
    stacked = stack_infos(
        [{"n": 1, "ok": True, "f": 0.5, "ids": ("a",)}, {"n": 2, "ok": False, "f": 1}, None]
    )
    assert (
        stacked["n"].dtype == np.int64
        and stacked["ok"].dtype == np.bool_
        and stacked["f"].dtype == np.float64
    )
    assert (
        list(stacked["_f"]) == [True, True, False]
        and stacked["ids"][0] == ("a",)
        and stacked["ids"][1] is None
    )
    with_missing = stack_infos([{"reward": 1.0}, {"reward": None}])
    assert with_missing["reward"].dtype == object and with_missing["reward"][1] is None
    absent = stack_infos([{"n": 3, "ok": True}, {}])  # a key absent from an env is 0 / False there, masked
    assert absent["n"].tolist() == [3, 0] and absent["ok"].tolist() == [True, False]
    assert absent["_n"].tolist() == [True, False]
    mixed = stack_infos([{"x": True, "m": {"a": 1}}, {"x": 0.5, "m": "text"}])  # no common type: as given
    assert mixed["x"].dtype == object and mixed["x"].tolist() == [True, 0.5]
    assert mixed["m"].dtype == object and mixed["m"].tolist() == [{"a": 1}, "text"]


def test_config_is_shared_by_every_sub_env():
    config = EnvConfig(topk=1)
    retriever = FakeRetriever()
    vector = make_vector(num_envs=2, retriever=retriever, config=config)
    vector.reset(options={"examples": [EXAMPLES[0], EXAMPLES[1]]})
    _, _, _, _, infos = vector.step(["<search>France</search>", "<search>Hamlet</search>"])
    assert [len(ids) for ids in infos["retrieved_ids"]] == [1, 1]
