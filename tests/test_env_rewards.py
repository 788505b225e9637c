import doctest
import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

import searchgym.env.actions
import searchgym.env.observations
import searchgym.env.prompts
import searchgym.env.reward_fns
import searchgym.env.rewards
import searchgym.env.tokens
import searchgym.env.tools
import searchgym.env.vector
from searchgym.env.config import EnvConfig, EnvConfigError
from searchgym.env.rewards import (
    RewardBreakdown,
    answer_in_passages,
    cover_exact_match,
    exact_match,
    f1_score,
    format_reward,
    normalize_answer,
    score_answer,
    search_penalty,
)


@pytest.mark.parametrize(
    "module",
    [
        searchgym.env.rewards,
        searchgym.env.actions,
        searchgym.env.prompts,
        searchgym.env.observations,
        searchgym.env.tokens,
        searchgym.env.vector,
        searchgym.env.reward_fns,
        searchgym.env.tools,
    ],
)
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # articles: whole words only
        ("The Beatles", "beatles"),
        ("a an the", ""),
        ("Theater of the Absurd", "theater of absurd"),
        ("Anne and Thea", "anne and thea"),
        # punctuation (ASCII), including inside words and numbers
        ("U.S.A.!", "usa"),
        ("rock'n'roll", "rocknroll"),
        ("1,000", "1000"),
        ("3.14", "314"),
        ("$5-10", "510"),
        # unicode: letters kept and lower-cased, non-ASCII punctuation kept (as the SQuAD script does)
        ("Beyoncé", "beyoncé"),
        ("SÃO PAULO", "são paulo"),
        ("“Paris”", "“paris”"),
        ("東京", "東京"),
        # whitespace and empty
        ("  new\t\nyork  ", "new york"),
        ("", ""),
        ("...", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("prediction", "golds", "expected"),
    [
        ("Paris", ["Paris"], 1.0),
        ("the city of Paris", ["Paris"], 0.0),
        ("paris.", ["Lyon", "PARIS"], 1.0),
        ("December 14, 1972", ["14 December 1972", "December 14 1972"], 1.0),
        ("", ["the"], 1.0),  # both normalise to nothing
        (None, ["Paris"], 0.0),
    ],
)
def test_exact_match(prediction, golds, expected):
    assert exact_match(prediction, golds) == expected


def test_f1_counts_repeated_tokens_once_per_match():
    assert f1_score("paris paris", ["paris"]) == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert f1_score("Paris France", ["Paris", "France Paris"]) == 1.0
    assert f1_score("", ["Paris"]) == 0.0
    assert f1_score("the", ["a"]) == 1.0


def test_f1_is_the_harmonic_mean_of_token_precision_and_recall():
    assert f1_score("Paris", ["Paris France"]) == pytest.approx(2 / 3)  # precision 1, recall 1/2
    assert f1_score("x b c", ["b c d e"]) == pytest.approx(4 / 7)  # precision 2/3, recall 1/2


def test_cover_exact_match_needs_whole_words():
    assert cover_exact_match("It was William Shakespeare.", ["Shakespeare"]) == 1.0
    assert cover_exact_match("Shakespeareans", ["Shakespeare"]) == 0.0
    assert cover_exact_match("anything", ["The"]) == 0.0


@pytest.mark.parametrize("metric", [exact_match, f1_score, cover_exact_match])
def test_metrics_refuse_to_score_without_gold_answers(metric):
    with pytest.raises(ValueError, match="no golden answers"):
        metric("Paris", [])


@given(st.text(), st.lists(st.text(), min_size=1, max_size=4))
def test_metrics_are_finite_in_unit_range_and_ordered(prediction, golds):
    em, f1, cover = (
        exact_match(prediction, golds),
        f1_score(prediction, golds),
        cover_exact_match(prediction, golds),
    )
    for value in (em, f1, cover):
        assert math.isfinite(value) and 0.0 <= value <= 1.0
    if em == 1.0:
        assert f1 == 1.0
        assert cover == 1.0 or not normalize_answer(prediction)


def test_score_answer_selects_the_metric():
    assert score_answer("Paris France", ["Paris"], "em") == 0.0
    assert score_answer("Paris France", ["Paris"], "f1") == pytest.approx(2 / 3)
    assert score_answer("Paris France", ["Paris"], "cover_em") == 1.0


def test_answer_in_passages_checks_each_passage_for_whole_words():
    assert answer_in_passages(["Lyon is large.", "Ivanjica is a town."], ["Ivanjica"])
    assert not answer_in_passages(["Ivanjicas"], ["Ivanjica"])


def test_reward_breakdown_uses_shaping_as_a_floor_and_subtracts_search_cost():
    shaping = format_reward(well_formed=True, answer_retrieved=False, format_weight=0.2, retrieval_weight=0.1)
    assert shaping == 0.2
    assert RewardBreakdown(
        outcome=1.0, shaping=shaping, search_cost=search_penalty(2, 0.05)
    ).total == pytest.approx(0.9)
    assert RewardBreakdown(outcome=0.0, shaping=shaping, search_cost=0.0).total == 0.2
    assert (
        format_reward(well_formed=False, answer_retrieved=True, format_weight=0.2, retrieval_weight=0.1)
        == 0.0
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_turns": 0}, "set max_turns to 1 or more"),
        ({"max_turns": 2, "max_searches": 2}, "between 0 and max_turns - 1 = 1"),
        ({"max_searches": -1}, "set max_searches between"),
        ({"topk": 0}, "set topk to 1 or more"),
        ({"max_observation_tokens": 16}, "set it to 128 or more"),
        ({"prompt_style": "chatml"}, "'chat' (instruct models) or 'plain'"),
        ({"prompt_template": "no placeholder"}, "must contain {question} exactly once"),
        ({"prompt_template": "{question} {question}"}, "found 2"),
        ({"reward_type": "accuracy"}, "one of em, f1, cover_em"),
        ({"format_weight": 1.5}, "set format_weight between 0 and 1"),
        ({"retrieval_weight": float("nan")}, "set retrieval_weight between 0 and 1"),
        ({"format_weight": 0.8, "retrieval_weight": 0.4}, "keep the sum at most 1"),
        ({"search_cost": -0.1}, "set search_cost between 0 and 1"),
    ],
)
def test_env_config_rejects_bad_values_and_says_what_to_set(overrides, message):
    with pytest.raises(EnvConfigError, match=re.escape(message)):
        EnvConfig(**overrides)


def test_env_config_defaults_are_valid_and_frozen():
    config = EnvConfig()
    assert (config.max_turns, config.max_searches, config.topk, config.reward_type) == (4, 3, 3, "em")
    with pytest.raises(AttributeError):
        config.topk = 5  # type: ignore[misc]
