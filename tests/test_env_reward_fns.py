"""Reward functions from config: built-ins, a user module, weighted sums, failures masked with a reason."""

import itertools
import math
import textwrap

import pytest
from env_fixtures import EXAMPLES, FakeRetriever

from searchgym.env.config import EnvConfig, EnvConfigError
from searchgym.env.reward_fns import (
    BUILTIN_REWARDS,
    EpisodeFacts,
    NoReward,
    RewardContext,
    RewardTerm,
    parse_reward_spec,
    score_outcome,
)
from searchgym.env.search_env import SearchEnv
from searchgym.train.config import load_config

FRANCE = EXAMPLES[0]
_PACKAGE_NUMBERS = itertools.count()

USER_REWARDS = '''
import math

from searchgym.env.reward_fns import NoReward

SEEN = []


def brevity(context):
    """1 for an answer of at most two words, 0.5 for a longer one; records what it was called with."""
    SEEN.append(context)
    return 1.0 if len(context.answer.split()) <= 2 else 0.5


def searched(context):
    return float(context.episode.tool_calls.get("search", 0))


def broken(context):
    raise RuntimeError("judge unreachable")


def not_a_number(context):
    return math.nan


def abstains(context):
    return NoReward("no judge for this source")


def returns_none(context):
    return None


def returns_text(context):
    return "1.0"


NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A fresh importable package ``user_rewards_N`` with the reward functions above; its module path."""
    name = f"user_rewards_{next(_PACKAGE_NUMBERS)}"
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "rewards.py").write_text(textwrap.dedent(USER_REWARDS))
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}.rewards"


def run_episode(config, actions):
    search_env = SearchEnv(dataset=list(EXAMPLES), retriever=FakeRetriever(), config=config)
    search_env.reset(seed=0, options={"example": FRANCE})
    for action in actions:
        _, reward, _, _, info = search_env.step(action)
    return reward, info


SEARCH_THEN_ANSWER = ["<search> capital of France </search>", "<answer>Paris, France</answer>"]


def test_user_reward_from_a_temporary_package_is_called_with_the_episode(user_module):
    import importlib

    config = EnvConfig(reward_fn=f"{user_module}:brevity")
    reward, info = run_episode(config, SEARCH_THEN_ANSWER)
    # "Paris, France" is two words: brevity gives 1.0 (EM would give 0.0).
    assert reward == 1.0 and info["em"] == 0.0 and info["reward_parts"] == {f"{user_module}:brevity": 1.0}
    (context,) = importlib.import_module(user_module).SEEN
    assert context.question == FRANCE.question and context.golden_answers == ("Paris",)
    assert context.answer == "Paris, France" and context.example == FRANCE
    assert context.trajectory.endswith("<answer>Paris, France</answer>")
    assert "<search> capital of France </search>" in context.trajectory
    assert "<information>Doc 1(Title: Paris)" in context.trajectory
    episode = context.episode
    assert (episode.end_reason, episode.well_formed, episode.num_turns) == ("answered", True, 2)
    assert episode.tool_calls == {"search": 1} and episode.retrieved_ids == ("d0", "d1", "d2")


def test_weighted_sum_of_a_builtin_and_a_user_function(user_module):
    config = EnvConfig(reward_fn=f"0.5*f1 + 0.25*{user_module}:searched", search_cost=0.125)
    reward, info = run_episode(config, SEARCH_THEN_ANSWER)
    # f1("Paris, France", "Paris") = 2/3; one search: 0.5 * 2/3 + 0.25 * 1 = 0.5833..; minus 0.125.
    assert info["reward_outcome"] == pytest.approx(0.5 * 2 / 3 + 0.25)
    assert reward == pytest.approx(0.5 * 2 / 3 + 0.25 - 0.125)
    assert info["reward_parts"] == {"f1": pytest.approx(2 / 3), f"{user_module}:searched": 1.0}


def test_weighted_list_from_a_yaml_override(user_module):
    config = load_config(None, [f"env.reward_fn=[0.9*em, '0.1*{user_module}:brevity']"])
    assert parse_reward_spec(config.env.reward_spec) == (
        RewardTerm("em", 0.9),
        RewardTerm(f"{user_module}:brevity", 0.1),
    )
    reward, _ = run_episode(config.env, ["<answer>Paris</answer>"])
    assert reward == pytest.approx(0.9 * 1.0 + 0.1 * 1.0)


@pytest.mark.parametrize(
    ("function", "reason"),
    [
        ("broken", "raised RuntimeError: judge unreachable"),
        ("not_a_number", "returned nan"),
        ("abstains", "no judge for this source"),
        ("returns_none", "returned None"),
        ("returns_text", "returned str, not a float"),
    ],
)
def test_a_failing_function_masks_the_reward_with_its_reason(user_module, function, reason):
    config = EnvConfig(reward_fn=["em", f"{user_module}:{function}"])
    reward, info = run_episode(config, ["<answer>Paris</answer>"])
    assert reward == 0.0 and info["reward"] is None
    assert info["reward_error"] == f"reward function failed: {user_module}:{function}: {reason}"
    # The metrics and the parts that did compute are still reported.
    assert info["em"] == 1.0 and info["reward_parts"] == {"em": 1.0}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nonexistent_pkg_zz.rewards:fn", "cannot import 'nonexistent_pkg_zz.rewards'"),
        ("accuracy", "write a built-in name (em, f1, cover_em) or package.module:function"),
        ("0.5*em + ", "write a built-in name"),
        (["em", "1.0*em"], "names a function twice"),
        ("", "the reward spec is empty"),
    ],
)
def test_bad_specs_fail_at_config_time_saying_what_to_write(spec, message):
    with pytest.raises(
        EnvConfigError, match=r"reward_fn=.*" + message.replace("(", r"\(").replace(")", r"\)")
    ):
        EnvConfig(reward_fn=spec)


def test_attribute_that_is_not_callable_is_rejected(user_module):
    with pytest.raises(EnvConfigError, match="has no callable 'NOT_CALLABLE'"):
        EnvConfig(reward_fn=f"{user_module}:NOT_CALLABLE")


def test_builtin_entries_are_the_metrics():
    context = RewardContext(
        question="q",
        golden_answers=("Marie Curie",),
        answer="It was Marie Curie",
        trajectory="",
        episode=EpisodeFacts(end_reason="answered", well_formed=True),
        example=FRANCE,
    )
    values = {name: function(context) for name, function in BUILTIN_REWARDS.items()}
    # EM 0 (extra words), F1 = 2*(2/4)*(2/2)/(2/4+2/2) = 2/3, cover-EM 1.
    assert values == {"em": 0.0, "f1": pytest.approx(2 / 3), "cover_em": 1.0}
    score = score_outcome(parse_reward_spec("0.5*em+0.5*cover_em"), context)
    assert (score.value, score.error) == (0.5, None)
    assert not math.isnan(score.value)


def test_default_config_scores_with_reward_type_as_before():
    reward, info = run_episode(EnvConfig(reward_type="f1"), ["<answer>Paris, France</answer>"])
    assert reward == pytest.approx(2 / 3) and info["reward_parts"] == {"f1": pytest.approx(2 / 3)}
    assert NoReward("x").reason == "x"
