import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from env_fixtures import EXAMPLES, FakeRetriever
from gymnasium.vector import AutoresetMode
from policy_fixtures import SCRIPTED_LOGPROB, ScriptedGenerator

from searchgym.env import EnvConfig, SearchVectorEnv
from searchgym.policy.generation import SamplingParams, TransformersGenerator
from searchgym.policy.logprobs import SequenceBatch, logprob_mismatch, sequence_logprobs
from searchgym.policy.models import tiny_random_model
from searchgym.policy.render import render_trajectory
from searchgym.policy.rollout import RolloutError, TokenBudgets, run_episodes

FRANCE, HAMLET, STAMBOLIC, MOON = EXAMPLES
SEARCH_THEN_ANSWER = [
    "<think>I need the capital.</think> <search> capital of France </search>",
    "<answer> Paris </answer>",
]


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_model()


@pytest.fixture(params=["lockstep", "async"])
def mode(request):
    """Every rollout test runs on both schedules: their books must not differ."""
    return request.param


def rollout(mode, *args, **kwargs):
    return run_episodes(*args, mode=mode, **kwargs)


def make_env(tokenizer, *, num_envs=4, retriever=None, **config):
    return SearchVectorEnv(
        num_envs=num_envs,
        dataset=None,
        retriever=retriever or FakeRetriever(),
        config=EnvConfig(**config),
        tokenizer=tokenizer,
    )


def masked(trajectory, value):
    return [i for i, m in zip(trajectory.response_ids, trajectory.loss_mask, strict=True) if m == value]


def spans(trajectory, value):
    """The runs of consecutive response tokens whose mask is ``value``."""
    runs, current = [], []
    for token, mask in zip(trajectory.response_ids, trajectory.loss_mask, strict=True):
        if mask == value:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [*runs, current] if current else runs


def test_mask_is_one_exactly_on_the_policy_tokens(tiny, mode):
    scripts = {FRANCE.question: SEARCH_THEN_ANSWER}
    generator = ScriptedGenerator(tiny.tokenizer, scripts)
    trajectory = rollout(mode, generator, make_env(tiny.tokenizer), [FRANCE])[0]
    decode = tiny.tokenizer.decode
    assert [decode(run) for run in spans(trajectory, 1)] == SEARCH_THEN_ANSWER
    (observation,) = [decode(run) for run in spans(trajectory, 0)]
    assert observation.startswith("\n\n<information>Doc 1(Title: Paris)")
    assert observation.endswith("</information>\n\n")
    assert decode(masked(trajectory, 1)) == "".join(turn.text for turn in trajectory.turns)
    assert decode(trajectory.prompt_ids).count(FRANCE.question) == 1


def test_a_seeded_lockstep_run_never_gives_two_requests_the_same_seed(tiny):
    # Each call's seed is SEED_STRIDE past the last, and a backend seeds its i-th request seed + i: two
    # samples of one question (a GRPO group) or two turns must never draw from the same random stream.
    scripts = {example.question: SEARCH_THEN_ANSWER for example in EXAMPLES}
    generator = ScriptedGenerator(tiny.tokenizer, scripts)
    sampling = SamplingParams(max_new_tokens=64, seed=7)
    examples = [example for example in EXAMPLES for _ in range(2)]
    rollout("lockstep", generator, make_env(tiny.tokenizer, num_envs=4), examples, sampling=sampling)
    seeds = [seed for call in generator.request_seeds for seed in call]
    assert len(seeds) == 2 * len(examples)  # two turns each
    assert len(set(seeds)) == len(seeds) and seeds[0] == 7  # the first call has the run's own seed


def test_policy_ids_are_exactly_the_generated_ids_never_re_tokenized(tiny, mode):
    generator = ScriptedGenerator(tiny.tokenizer, {FRANCE.question: SEARCH_THEN_ANSWER})
    trajectory = rollout(mode, generator, make_env(tiny.tokenizer), [FRANCE])[0]
    generated = [i for turn in generator.generated[FRANCE.question] for i in turn]
    assert masked(trajectory, 1) == generated
    # The scripted ids are not the tokenizer's own: re-tokenizing the text would have changed them.
    assert tiny.tokenizer.encode("".join(SEARCH_THEN_ANSWER), add_special_tokens=False) != generated


def test_trajectory_records_turns_reward_and_sampler_logprobs(tiny, mode):
    generator = ScriptedGenerator(tiny.tokenizer, {FRANCE.question: SEARCH_THEN_ANSWER})
    trajectory = rollout(mode, generator, make_env(tiny.tokenizer), [FRANCE])[0]
    assert trajectory.outcome.answered
    assert trajectory.reward == 1.0 and trajectory.outcome.em == 1.0
    assert trajectory.outcome.answer == "Paris"
    search, answer = trajectory.turns
    assert (search.action_type, search.query, search.retrieved_ids[0]) == (
        "search",
        "capital of France",
        "d0",
    )
    assert (answer.action_type, answer.num_observation_tokens) == ("answer", 0)
    assert search.num_policy_tokens + search.num_observation_tokens + answer.num_policy_tokens == len(
        trajectory.response_ids
    )
    assert (
        trajectory.turn_index
        == [0] * (search.num_policy_tokens + search.num_observation_tokens) + [1] * answer.num_policy_tokens
    )
    expected = [SCRIPTED_LOGPROB if m else 0.0 for m in trajectory.loss_mask]
    assert trajectory.sampler_logprobs == expected
    assert trajectory.example_id == "q0" and trajectory.group_id == "fake:q0"


def test_a_backend_without_logprobs_gives_trajectories_without_them(tiny, mode):
    class NoLogprobs(ScriptedGenerator):
        def generate(self, prompts, params, *, max_new_tokens=None):
            turns = super().generate(prompts, params, max_new_tokens=max_new_tokens)
            return [replace(turn, logprobs=None) for turn in turns]

    generator = NoLogprobs(tiny.tokenizer, {FRANCE.question: SEARCH_THEN_ANSWER})
    trajectory = rollout(mode, generator, make_env(tiny.tokenizer), [FRANCE])[0]
    assert trajectory.sampler_logprobs is None and trajectory.reward == 1.0


def test_all_searches_of_a_step_go_to_the_retriever_in_one_call(tiny, mode):
    scripts = {
        FRANCE.question: SEARCH_THEN_ANSWER,
        HAMLET.question: [
            "<search> Hamlet author </search>",
            "<search> Shakespeare </search>",
            "<answer> x </answer>",
        ],
        STAMBOLIC.question: ["<answer> Ivanjica </answer>"],
    }
    retriever = FakeRetriever()
    started = time.perf_counter()
    trajectories = rollout(
        mode,
        ScriptedGenerator(tiny.tokenizer, scripts),
        make_env(tiny.tokenizer, retriever=retriever),
        [FRANCE, HAMLET, STAMBOLIC],
    )
    wall_s = time.perf_counter() - started
    assert retriever.calls == [["capital of France", "Hamlet author"], ["Shakespeare"]]
    assert [t.reward for t in trajectories] == [1.0, 0.0, 1.0]
    assert [len(t.turns) for t in trajectories] == [2, 3, 1]
    assert trajectories[0].timings == trajectories[2].timings
    timings = trajectories[0].timings
    assert timings.generation >= 0 and timings.bookkeeping >= 0 and 0 < timings.retrieval < wall_s


def test_more_examples_than_sub_envs_run_in_order_batch_by_batch(tiny, mode):
    scripts = {example.question: [f"<answer> {example.golden_answers[0]} </answer>"] for example in EXAMPLES}
    generator = ScriptedGenerator(tiny.tokenizer, scripts)
    examples = [MOON, FRANCE, HAMLET, STAMBOLIC, FRANCE]
    trajectories = rollout(mode, generator, make_env(tiny.tokenizer, num_envs=2), examples)
    assert [t.example_id for t in trajectories] == [e.id for e in examples]
    assert all(t.reward == 1.0 for t in trajectories)
    assert [len(limits) for limits in generator.calls] == [2, 2, 1]


def test_a_prompt_over_budget_is_an_error_naming_the_setting(tiny, mode):
    generator = ScriptedGenerator(tiny.tokenizer, {FRANCE.question: SEARCH_THEN_ANSWER})
    budgets = TokenBudgets(max_prompt_tokens=50)
    with pytest.raises(RolloutError, match="max_prompt_tokens=50"):
        rollout(mode, generator, make_env(tiny.tokenizer), [FRANCE], budgets=budgets)


def test_turn_budget_cuts_the_turn_and_the_cut_text_goes_to_the_env(tiny, mode):
    long_turn = "<think>" + "very " * 40 + "long</think> <answer> Paris </answer>"
    generator = ScriptedGenerator(tiny.tokenizer, {FRANCE.question: [long_turn, "<answer> Paris </answer>"]})
    budgets = TokenBudgets(max_turn_tokens=30)
    trajectory = rollout(mode, generator, make_env(tiny.tokenizer), [FRANCE], budgets=budgets)[0]
    assert generator.calls[0] == [30]
    first, second = trajectory.turns
    assert first.num_policy_tokens == 30 and first.action_type == "invalid"
    assert second.action_type == "answer" and trajectory.reward == 1.0


def test_context_budget_ends_the_episode_as_truncated_when_an_observation_does_not_fit(tiny, mode):
    generator = ScriptedGenerator(tiny.tokenizer, {FRANCE.question: SEARCH_THEN_ANSWER})
    env = make_env(tiny.tokenizer)
    probe = rollout(mode, generator, env, [FRANCE])[0]
    prompt_length, search_length = len(probe.prompt_ids), probe.turns[0].num_policy_tokens
    generator = ScriptedGenerator(tiny.tokenizer, {FRANCE.question: SEARCH_THEN_ANSWER})
    budgets = TokenBudgets(
        max_prompt_tokens=prompt_length, max_context_tokens=prompt_length + search_length + 10
    )
    trajectory = rollout(mode, generator, env, [FRANCE], budgets=budgets)[0]
    assert not trajectory.outcome.answered
    assert trajectory.outcome.end_reason == "context_budget"
    assert trajectory.reward == 0.0 and trajectory.outcome.answer is None
    assert trajectory.loss_mask == [1] * len(trajectory.response_ids)  # the observation was not appended
    assert len(trajectory.turns) == 1 and trajectory.turns[0].query == "capital of France"


def test_context_budget_ends_the_episode_when_no_room_is_left_for_a_turn(tiny, mode):
    scripts = {
        FRANCE.question: ["<search> capital of France </search>", "<answer> " + "Paris " * 30 + "</answer>"]
    }
    generator = ScriptedGenerator(tiny.tokenizer, scripts)
    env = make_env(tiny.tokenizer)
    probe = rollout(mode, ScriptedGenerator(tiny.tokenizer, scripts), env, [FRANCE])[0]
    first_turn = probe.turns[0]
    context = len(probe.prompt_ids) + first_turn.num_policy_tokens + first_turn.num_observation_tokens
    budgets = TokenBudgets(max_prompt_tokens=len(probe.prompt_ids), max_context_tokens=context + 10)
    trajectory = rollout(mode, generator, env, [FRANCE], budgets=budgets)[0]
    assert generator.calls[1] == [10]
    assert len(trajectory.prompt_ids) + len(trajectory.response_ids) == context + 10
    assert trajectory.outcome.end_reason == "context_budget" and not trajectory.outcome.answered
    assert trajectory.outcome.tool_calls == {"search": 1}  # counted by the rollout that ended it


def test_observation_budget_ends_the_episode_as_truncated(tiny, mode):
    generator = ScriptedGenerator(tiny.tokenizer, {FRANCE.question: SEARCH_THEN_ANSWER})
    trajectory = rollout(
        mode, generator, make_env(tiny.tokenizer), [FRANCE], budgets=TokenBudgets(max_observation_tokens=20)
    )[0]
    assert trajectory.outcome.end_reason == "observation_budget" and not trajectory.outcome.answered
    assert 0 not in trajectory.loss_mask


def test_budgets_are_inclusive_an_episode_that_fills_them_exactly_finishes(tiny, mode):
    env = make_env(tiny.tokenizer)
    scripts = {FRANCE.question: SEARCH_THEN_ANSWER}
    probe = rollout(mode, ScriptedGenerator(tiny.tokenizer, scripts), env, [FRANCE])[0]
    budgets = TokenBudgets(
        max_prompt_tokens=len(probe.prompt_ids),
        max_observation_tokens=probe.turns[0].num_observation_tokens,
        max_context_tokens=len(probe.prompt_ids) + len(probe.response_ids),
    )
    trajectory = rollout(mode, ScriptedGenerator(tiny.tokenizer, scripts), env, [FRANCE], budgets=budgets)[0]
    assert trajectory.outcome.end_reason == "answered" and trajectory.reward == 1.0
    # An observation that fills the context exactly is kept; only then is there no room for a turn.
    search = probe.turns[0]
    full = len(probe.prompt_ids) + search.num_policy_tokens + search.num_observation_tokens
    budgets = TokenBudgets(max_prompt_tokens=len(probe.prompt_ids), max_context_tokens=full)
    trajectory = rollout(mode, ScriptedGenerator(tiny.tokenizer, scripts), env, [FRANCE], budgets=budgets)[0]
    assert trajectory.outcome.end_reason == "context_budget"
    assert len(trajectory.prompt_ids) + len(trajectory.response_ids) == full and 0 in trajectory.loss_mask


def test_an_episode_the_budget_cuts_short_earns_no_format_reward(tiny, mode):
    generator = ScriptedGenerator(tiny.tokenizer, {FRANCE.question: SEARCH_THEN_ANSWER})
    env = make_env(tiny.tokenizer, format_weight=0.2)
    budgets = TokenBudgets(max_observation_tokens=20)
    trajectory = rollout(mode, generator, env, [FRANCE], budgets=budgets)[0]
    assert trajectory.outcome.end_reason == "observation_budget" and trajectory.reward == 0.0


def test_an_episode_without_answer_is_truncated_by_the_env_at_max_turns(tiny, mode):
    generator = ScriptedGenerator(tiny.tokenizer, {FRANCE.question: ["I do not know.", "Still no idea."]})
    trajectory = rollout(mode, generator, make_env(tiny.tokenizer, max_turns=2, max_searches=1), [FRANCE])[0]
    assert not trajectory.outcome.answered and trajectory.outcome.end_reason == "max_turns"
    assert [turn.action_type for turn in trajectory.turns] == ["invalid", "invalid"]
    notice = tiny.tokenizer.decode(spans(trajectory, 0)[0])
    assert "Invalid action" in notice


def test_group_ids_default_to_the_example_and_can_be_given(tiny, mode):
    scripts = {FRANCE.question: ["<answer> Paris </answer>"] * 2}
    generator = ScriptedGenerator(tiny.tokenizer, scripts)
    trajectories = rollout(mode, generator, make_env(tiny.tokenizer), [FRANCE, FRANCE], group_ids=["a", "b"])
    assert [t.group_id for t in trajectories] == ["a", "b"]
    with pytest.raises(RolloutError, match="group ids"):
        rollout(mode, generator, make_env(tiny.tokenizer), [FRANCE], group_ids=["a", "b"])


def test_an_autoresetting_env_is_refused(tiny, mode):
    env = SearchVectorEnv(
        num_envs=2, dataset=None, retriever=FakeRetriever(), autoreset_mode=AutoresetMode.NEXT_STEP
    )
    with pytest.raises(RolloutError, match="DISABLED"):
        rollout(mode, ScriptedGenerator(tiny.tokenizer, {}), env, [FRANCE])


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [({"max_turn_tokens": 0}, "max_turn_tokens"), ({"max_prompt_tokens": 4096}, "max_context_tokens")],
)
def test_budgets_are_validated(kwargs, setting):
    with pytest.raises(RolloutError, match=setting):
        TokenBudgets(**kwargs)
    smallest = TokenBudgets(
        max_prompt_tokens=1, max_turn_tokens=1, max_observation_tokens=1, max_context_tokens=2
    )
    assert (smallest.max_turn_tokens, smallest.max_context_tokens) == (1, 2)  # 1 is a budget, 0 is not


def test_tiny_model_rollout_keeps_exact_tokens_and_sampler_logprobs_match_the_trainer(tiny, mode):
    generator = TransformersGenerator(tiny)
    sampling = SamplingParams(max_new_tokens=16, temperature=1.0, seed=0)
    trajectories = rollout(
        mode,
        generator,
        make_env(tiny.tokenizer, max_turns=3, max_searches=2),
        list(EXAMPLES),
        sampling=sampling,
    )
    for trajectory in trajectories:
        assert all(turn.num_policy_tokens > 0 for turn in trajectory.turns)
        policy_text = tiny.tokenizer.decode(masked(trajectory, 1))
        assert policy_text == "".join(turn.text for turn in trajectory.turns)
        assert not trajectory.outcome.answered  # random text never answers
    batch = SequenceBatch.from_ids(
        [t.prompt_ids for t in trajectories],
        [t.response_ids for t in trajectories],
        pad_token_id=tiny.tokenizer.pad_token_id,
    )
    with torch.no_grad():
        scored = sequence_logprobs(tiny.model, batch)
    width = batch.response_mask.shape[1]
    mask = torch.tensor([t.loss_mask + [0] * (width - len(t.loss_mask)) for t in trajectories])
    sampler = torch.tensor([t.sampler_logprobs + [0.0] * (width - len(t.loss_mask)) for t in trajectories])
    mismatch = logprob_mismatch(scored.logprobs, sampler, mask)
    assert mismatch.num_tokens == sum(t.num_policy_tokens for t in trajectories)
    assert mismatch.max_abs_diff < 1e-3
    assert np.isclose(mismatch.mean_prob_ratio, 1.0, atol=1e-3)


def test_render_shows_each_span_with_its_mask(tiny, mode):
    generator = ScriptedGenerator(tiny.tokenizer, {FRANCE.question: SEARCH_THEN_ANSWER})
    trajectory = rollout(mode, generator, make_env(tiny.tokenizer), [FRANCE])[0]
    view = render_trajectory(trajectory, tiny.tokenizer)
    headers = [line for line in view.splitlines() if line.startswith("== ")]
    assert [h.split(" (")[0] for h in headers[:-1]] == [
        "== prompt",
        "== policy turn 0",
        "== observation turn 0",
        "== policy turn 1",
    ]
    assert "mask 1" in headers[1] and "mask 0" in headers[2]
    assert SEARCH_THEN_ANSWER[1] in view and "reward 1.0" in headers[-1]


def test_plain_prompt_style_conditions_on_the_raw_env_prompt(tiny, mode):
    env = make_env(tiny.tokenizer, num_envs=1, prompt_style="plain", max_turns=1, max_searches=0)
    sampling = SamplingParams(max_new_tokens=4, temperature=0.0)
    (trajectory,) = rollout(mode, tiny, env, [FRANCE], sampling=sampling)
    prompt = tiny.tokenizer.decode(trajectory.prompt_ids)
    assert prompt.endswith("\n\nAssistant:") and f"Question: {FRANCE.question}" in prompt
    assert "<|im_start|>" not in prompt
    assert len(trajectory.response_ids) == 4 and not trajectory.outcome.answered


# ---- the asynchronous schedule: same episodes, scheduled per trajectory ----

MIXED_SCRIPTS = {
    FRANCE.question: SEARCH_THEN_ANSWER,
    HAMLET.question: [
        "<search> Hamlet author </search>",
        "<search> Shakespeare </search>",
        "<search> playwright </search>",
        "<answer> Shakespeare </answer>",
    ],
    STAMBOLIC.question: ["<answer> Ivanjica </answer>"],
    MOON.question: ["<think>hm</think> no tags here", "<answer> 1972 </answer>"],
}


def test_async_episodes_equal_lockstep_episodes_one_by_one(tiny):
    examples = [HAMLET, FRANCE, STAMBOLIC, MOON, FRANCE, STAMBOLIC, HAMLET]
    budgets = TokenBudgets(max_context_tokens=700, max_prompt_tokens=400)
    runs = {
        mode: run_episodes(
            ScriptedGenerator(tiny.tokenizer, MIXED_SCRIPTS),
            make_env(tiny.tokenizer, num_envs=3),
            examples,
            budgets=budgets,
            mode=mode,
        )
        for mode in ("lockstep", "async")
    }
    assert len(runs["async"]) == len(examples)
    for lockstep, asynchronous in zip(runs["lockstep"], runs["async"], strict=True):
        assert asynchronous.example_id == lockstep.example_id
        assert asynchronous.group_id == lockstep.group_id
        assert asynchronous.prompt_ids == lockstep.prompt_ids
        assert asynchronous.response_ids == lockstep.response_ids
        assert asynchronous.loss_mask == lockstep.loss_mask
        assert asynchronous.turn_index == lockstep.turn_index
        assert asynchronous.sampler_logprobs == lockstep.sampler_logprobs
        assert asynchronous.turns == lockstep.turns
        assert asynchronous.outcome == lockstep.outcome
    assert [t.reward for t in runs["async"]] == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_async_starts_the_next_episode_as_soon_as_a_sub_env_is_free(tiny, mode):
    # Two sub-envs, one four-turn episode (three searches) and three one-turn ones. Lock-step runs
    # (HAMLET, STAMBOLIC) until HAMLET ends, then the last two; async hands the sub-env STAMBOLIC frees to
    # the next example at once, so all three have run before HAMLET's last turn.
    examples = [HAMLET, STAMBOLIC, STAMBOLIC, STAMBOLIC]
    generator = ScriptedGenerator(tiny.tokenizer, MIXED_SCRIPTS)
    trajectories = rollout(mode, generator, make_env(tiny.tokenizer, num_envs=2), examples)
    order = [
        ("hamlet" if HAMLET.question in tiny.tokenizer.decode(list(ids)) else "short", turn)
        for ids, turn in generator.answered
    ]
    before_hamlet_ends = order[: order.index(("hamlet", 3))]
    assert before_hamlet_ends.count(("short", 0)) == {"lockstep": 1, "async": 3}[mode]
    assert [t.reward for t in trajectories] == [1.0, 1.0, 1.0, 1.0]


def test_async_searches_of_episodes_in_flight_share_a_retriever_call(tiny):
    examples = [FRANCE, HAMLET, MOON]
    retriever = FakeRetriever()
    rollout(
        "async",
        ScriptedGenerator(tiny.tokenizer, MIXED_SCRIPTS),
        make_env(tiny.tokenizer, retriever=retriever),
        examples,
    )
    assert retriever.calls == [["capital of France", "Hamlet author"], ["Shakespeare"], ["playwright"]]


def test_a_failed_retriever_call_ends_its_async_episodes_not_the_run(tiny):
    class Broken(FakeRetriever):
        def search(self, queries, k):
            raise ConnectionError("server down")

    trajectories = rollout(
        "async",
        ScriptedGenerator(tiny.tokenizer, MIXED_SCRIPTS),
        make_env(tiny.tokenizer, retriever=Broken()),
        [FRANCE, STAMBOLIC],
    )
    assert trajectories[0].outcome.end_reason == "retriever_error" and trajectories[0].reward is None
    assert trajectories[1].reward == 1.0


def test_async_greedy_episodes_of_the_tiny_model_equal_lockstep(tiny):
    sampling = SamplingParams(max_new_tokens=12, temperature=0.0)
    runs = [
        run_episodes(
            TransformersGenerator(tiny),
            make_env(tiny.tokenizer, num_envs=2, max_turns=3, max_searches=2),
            list(EXAMPLES),
            sampling=sampling,
            mode=mode,
        )
        for mode in ("lockstep", "async")
    ]
    assert [t.response_ids for t in runs[0]] == [t.response_ids for t in runs[1]]
    assert [t.loss_mask for t in runs[0]] == [t.loss_mask for t in runs[1]]


def test_an_unknown_mode_is_an_error_naming_the_modes(tiny):
    with pytest.raises(RolloutError, match="lockstep"):
        run_episodes(ScriptedGenerator(tiny.tokenizer, {}), make_env(tiny.tokenizer), [FRANCE], mode="eager")
