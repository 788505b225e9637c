import math
import warnings

import gymnasium
import pytest
from env_fixtures import CORPUS, EXAMPLES, CharTokenizer, FakeRetriever
from gymnasium.utils.env_checker import check_env

from searchgym import env
from searchgym.env import prompts
from searchgym.env.config import EnvConfig
from searchgym.env.data import QAExample
from searchgym.env.search_env import EpisodeStateError, SearchEnv
from searchgym.env.tokens import WordMeter
from searchgym.errors import SearchgymError

FRANCE = EXAMPLES[0]
END_KEYS = {
    "answer",
    "em",
    "f1",
    "cover_em",
    "reward",
    "reward_error",
    "end_reason",
    "error",
    "episode_retrieved_ids",
}


def make_env(config=None, retriever=None, **kwargs):
    return SearchEnv(dataset=list(EXAMPLES), retriever=retriever or FakeRetriever(), config=config, **kwargs)


def start(search_env, example=FRANCE):
    return search_env.reset(seed=0, options={"example": example})


def test_search_then_answer():
    retriever = FakeRetriever()
    search_env = make_env(retriever=retriever)
    prompt, info = start(search_env)
    assert prompt.endswith("Question: What is the capital of France?")
    assert info == {"example_id": "q0", "question": FRANCE.question}

    observation, reward, terminated, truncated, info = search_env.step(
        "<think>I should look it up.</think>\n<search> capital of France </search>"
    )
    expected = prompts.information_block([(passage.title, passage.text) for passage in CORPUS[:3]])
    assert observation == expected
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert retriever.calls == [["capital of France"]]
    assert info["action_type"] == "search" and info["query"] == "capital of France"
    assert info["retrieved_ids"] == ("d0", "d1", "d2") and info["num_searches"] == 1
    assert info["retrieval_latency_s"] > 0 and info["observation_tokens"] == WordMeter().count(observation)
    assert END_KEYS.isdisjoint(info)

    observation, reward, terminated, truncated, info = search_env.step(
        "<think>It is Paris.</think><answer>Paris</answer>"
    )
    assert (observation, reward, terminated, truncated) == ("", 1.0, True, False)
    assert info["answer"] == "Paris" and info["end_reason"] == "answered"
    assert (info["em"], info["f1"], info["cover_em"]) == (1.0, 1.0, 1.0)
    assert (info["reward_outcome"], info["reward_shaping"], info["reward_search_cost"]) == (1.0, 0.0, 0.0)
    assert info["episode_retrieved_ids"] == ("d0", "d1", "d2") and info["error"] is None


def test_answer_at_once_scores_without_searching():
    retriever = FakeRetriever()
    search_env = make_env(retriever=retriever)
    start(search_env)
    _, reward, terminated, truncated, info = search_env.step("<answer>Lyon</answer>")
    assert (reward, terminated, truncated) == (0.0, True, False)
    assert info["em"] == 0.0 and info["reward"] == 0.0 and info["num_searches"] == 0
    assert retriever.calls == []


def test_invalid_then_valid_action_gets_a_corrective_notice():
    search_env = make_env()
    start(search_env)
    observation, reward, terminated, truncated, info = search_env.step("<search>capital of France")
    assert observation == prompts.invalid_action_notice("unclosed_tag")
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert info["action_type"] == "invalid" and info["invalid_reason"] == "unclosed_tag"
    _, reward, terminated, _, info = search_env.step("<answer>Paris</answer>")
    assert (reward, terminated, info["em"]) == (1.0, True, 1.0)


def test_the_observation_before_the_last_turn_says_to_answer_and_a_search_there_truncates():
    retriever = FakeRetriever()
    search_env = make_env(EnvConfig(max_turns=3, max_searches=2), retriever=retriever)
    start(search_env)
    first, *_ = search_env.step("<search>France</search>")
    assert not first.endswith(prompts.LAST_TURN_NOTICE)
    second, *_ = search_env.step("<search>Paris</search>")
    assert second.startswith("\n\n<information>") and second.endswith(prompts.LAST_TURN_NOTICE)
    observation, reward, terminated, truncated, info = search_env.step("<search>more</search>")
    assert (observation, reward, terminated, truncated) == ("", 0.0, False, True)
    assert info["end_reason"] == "max_turns" and info["invalid_reason"] == "search_on_last_turn"
    assert info["answer"] is None and info["em"] == 0.0 and info["reward"] == 0.0
    assert len(retriever.calls) == 2


def test_a_search_on_the_last_turn_is_refused_even_with_searches_left():
    retriever = FakeRetriever()
    search_env = make_env(EnvConfig(max_turns=2, max_searches=1), retriever=retriever)
    start(search_env)
    search_env.step("thinking aloud")
    observation, _, terminated, truncated, info = search_env.step("<search>France</search>")
    assert (observation, terminated, truncated) == ("", False, True)
    assert info["invalid_reason"] == "search_on_last_turn" and info["observation_tokens"] == 0
    assert retriever.calls == []


def test_a_search_that_finds_nothing_shows_an_empty_information_block():
    class EmptyRetriever(FakeRetriever):
        def search(self, queries, k):
            self.calls.append(list(queries))
            return [[] for _ in queries]

    search_env = make_env(retriever=EmptyRetriever())
    start(search_env)
    observation, *_, info = search_env.step("<search>nothing matches</search>")
    assert observation == prompts.information_block([])
    assert info["retrieved_ids"] == () and info["num_searches"] == 1


def test_searches_beyond_the_budget_are_refused_until_the_turns_run_out():
    retriever = FakeRetriever()
    search_env = make_env(EnvConfig(max_turns=3, max_searches=1), retriever=retriever)
    start(search_env)
    spent, *_ = search_env.step("<search>France</search>")
    assert spent.endswith(prompts.SEARCHES_SPENT_NOTICE)
    refused, _, _, _, info = search_env.step("<search>again</search>")
    assert refused == prompts.SEARCH_REFUSED_NOTICE + prompts.LAST_TURN_NOTICE
    assert info["action_type"] == "invalid" and info["invalid_reason"] == "search_budget_spent"
    assert info["query"] == "again" and info["num_searches"] == 1
    _, _, terminated, truncated, info = search_env.step("no idea")
    assert (terminated, truncated, info["end_reason"]) == (False, True, "max_turns")
    assert len(retriever.calls) == 1


def test_the_searches_spent_notice_follows_the_search_that_spent_them_only():
    search_env = make_env(EnvConfig(max_turns=4, max_searches=1))
    start(search_env)
    spent, *_ = search_env.step("<search>France</search>")
    assert spent.endswith(prompts.SEARCHES_SPENT_NOTICE)
    corrected, *_ = search_env.step("no tag here")
    assert prompts.SEARCHES_SPENT_NOTICE not in corrected and corrected.startswith("\n\n(")


def test_a_single_turn_episode_puts_the_answer_now_notice_in_the_prompt():
    search_env = make_env(EnvConfig(max_turns=1, max_searches=0))
    prompt, _ = start(search_env)
    assert prompt.endswith(prompts.LAST_TURN_NOTICE.strip())
    _, _, terminated, truncated, info = search_env.step("<search>capital</search>")
    assert (terminated, truncated, info["invalid_reason"]) == (False, True, "search_on_last_turn")


def test_a_retriever_failure_ends_the_episode_with_a_clear_error_and_no_reward():
    search_env = make_env(retriever=FakeRetriever(fail_with=ConnectionError("server at :8000 refused")))
    start(search_env)
    observation, reward, terminated, truncated, info = search_env.step("<search>capital of France</search>")
    assert (observation, reward, terminated, truncated) == ("", 0.0, False, True)
    assert info["end_reason"] == "retriever_error" and info["action_type"] == "search"
    assert info["error"] == "ConnectionError: server at :8000 refused"
    assert (
        info["reward"] is None
        and info["reward_error"] == "retriever failed: ConnectionError: server at :8000 refused"
    )
    assert info["em"] is None and info["reward_outcome"] is None
    with pytest.raises(EpisodeStateError, match="call reset"):
        search_env.step("<answer>Paris</answer>")


def test_a_retriever_returning_the_wrong_number_of_lists_is_a_retriever_error():
    class ShortRetriever:
        def search(self, queries, k):
            return []

    search_env = make_env(retriever=ShortRetriever())
    start(search_env)
    *_, info = search_env.step("<search>x</search>")
    assert info["error"] == "RuntimeError: the retriever returned 0 result lists for 1 queries"


def test_an_example_without_gold_answers_gets_no_reward_and_says_why():
    search_env = make_env()
    search_env.reset(options={"example": {"id": "u", "question": "Unknown?", "golden_answers": []}})
    _, reward, terminated, _, info = search_env.step("<answer>x</answer>")
    assert (reward, terminated, info["reward"]) == (0.0, True, None)
    assert info["reward_error"] == "example 'u' has no golden answers"


def test_format_and_retrieval_shaping_and_search_cost():
    config = EnvConfig(reward_type="em", format_weight=0.2, retrieval_weight=0.1, search_cost=0.05)
    search_env = make_env(config)
    start(search_env)
    search_env.step("<search>capital of France</search>")
    *_, info = search_env.step("<answer>Lyon</answer>")
    assert info["reward_shaping"] == pytest.approx(0.3)  # well-formed, and "Paris" was retrieved
    assert info["reward"] == pytest.approx(0.3 - 0.05)

    start(search_env)
    *_, info = search_env.step("<answer>Lyon</answer>")
    assert info["reward_shaping"] == pytest.approx(0.2)  # well-formed, but nothing retrieved

    start(search_env)
    search_env.step("oops")
    *_, info = search_env.step("<answer>Paris</answer>")
    assert info["reward_shaping"] == 0.0 and info["reward"] == 1.0  # malformed, but a correct answer


def test_observations_fit_their_token_budget_with_the_notice():
    # One token per character: 300 leaves each document about 30 characters of text beside tags and notice.
    config = EnvConfig(max_turns=2, max_searches=1, max_observation_tokens=300)
    search_env = make_env(config, tokenizer=CharTokenizer())
    start(search_env)
    observation, *_, info = search_env.step("<search>capital of France</search>")
    assert len(observation) <= 300 and info["observation_tokens"] == len(observation)
    assert observation.endswith("</information>\n\n" + prompts.LAST_TURN_NOTICE)
    assert info["retrieved_ids"] == ("d0", "d1", "d2") and observation.count("(Title: ") == 3
    assert "Paris is the capital" in observation and CORPUS[0].text not in observation


def test_prompt_styles_and_custom_templates_never_truncate_the_question():
    long_question = "Which " + "very " * 3000 + "long question?"
    example = QAExample("long", long_question, ("x",))
    plain = make_env(EnvConfig(prompt_style="plain"))
    prompt, _ = plain.reset(options={"example": example})
    assert long_question in prompt and prompt.endswith("\n\nAssistant:")
    custom = make_env(EnvConfig(prompt_template="Q: {question} {braces} A:"))
    prompt, _ = custom.reset(options={"example": FRANCE})
    assert prompt == "Q: What is the capital of France? {braces} A:"


def test_reset_is_deterministic_under_a_seed():
    first, second = make_env(), make_env()
    sequence = [first.reset(seed=7)[1]["example_id"]] + [first.reset()[1]["example_id"] for _ in range(5)]
    again = [second.reset(seed=7)[1]["example_id"]] + [second.reset()[1]["example_id"] for _ in range(5)]
    assert sequence == again
    drawn = {make_env().reset(seed=seed)[1]["example_id"] for seed in range(20)}
    assert len(drawn) > 1


def test_reset_errors_say_what_to_pass():
    with pytest.raises(SearchgymError, match="pass options=\\{'example'"):
        SearchEnv(dataset=None, retriever=FakeRetriever()).reset()
    with pytest.raises(SearchgymError, match="unknown reset options \\['examples'\\]"):
        make_env().reset(options={"examples": [FRANCE]})
    with pytest.raises(SearchgymError, match="expected a QAExample or a FlashRAG record"):
        make_env().reset(options={"example": "What is the capital of France?"})
    with pytest.raises(EpisodeStateError):
        make_env().step("<answer>x</answer>")


def test_render_ansi_shows_the_whole_episode():
    search_env = make_env(render_mode="ansi")
    prompt, _ = start(search_env)
    observation, *_ = search_env.step("<search>capital of France</search>")
    assert search_env.render() == prompt + "<search>capital of France</search>" + observation
    assert make_env().render() is None
    unrendered = make_env()
    start(unrendered)
    assert unrendered.render() is None  # no render mode: nothing, even mid-episode


def test_gymnasium_make_and_check_env():
    assert env.ENV_ID in gymnasium.registry
    made = gymnasium.make(env.ENV_ID, dataset=list(EXAMPLES), retriever=FakeRetriever())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(made.unwrapped)
    # The only warning: text rendering ("ansi") has no frame rate to declare.
    assert [str(warning.message) for warning in caught if "render fps" not in str(warning.message)] == []
    observation, info = made.reset(seed=3)
    assert observation in made.observation_space and info["example_id"] in {
        example.id for example in EXAMPLES
    }
    _, reward, *_ = made.step(made.action_space.sample())
    assert math.isfinite(reward)


def test_gymnasium_make_loads_a_bundled_dataset_by_name():
    made = gymnasium.make(env.ENV_ID, dataset="bamboogle", retriever=FakeRetriever())
    assert len(made.unwrapped.examples) == 125
