import itertools
import random
import warnings
from dataclasses import replace

import pytest
import torch

from searchgym.policy.generation import (
    PREFILL_CALL_TOKENS,
    SamplingError,
    SamplingParams,
    StopMatcher,
    TransformersGenerator,
    cache_keyword,
    length_groups,
)
from searchgym.policy.logprobs import SequenceBatch, sequence_logprobs
from searchgym.policy.models import tiny_random_model

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, stop=())
QUESTIONS = (
    "What is the capital of France?",
    "hi",
    "Who wrote Hamlet, and in which year was it first staged?",
)


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_model()


@pytest.fixture(scope="module")
def prompts(tiny):
    return [tiny.encode_prompt(question) for question in QUESTIONS]


@pytest.fixture(scope="module")
def greedy_outputs(tiny, prompts):
    return TransformersGenerator(tiny).generate(prompts, GREEDY)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"temperature": -1.0},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"stop": ("</search>", "")},
    ],
)
def test_sampling_params_reject_out_of_range_values(kwargs):
    with pytest.raises(SamplingError):
        SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return tiny.tokenizer


class TestStopMatcher:
    def first_completing(self, tokenizer, ids, stop):
        matcher = StopMatcher(tokenizer, stop)
        return next((end for end in range(1, len(ids) + 1) if matcher.completed(ids[:end])), None)

    def test_stop_string_split_over_several_tokens_ends_at_its_last_token(self, tokenizer):
        ids = tokenizer.encode("<search> capital of France </search> and more", add_special_tokens=False)
        end = self.first_completing(tokenizer, ids, ("</search>",))
        assert tokenizer.decode(ids[:end]).endswith("</search>")
        assert "</search>" not in tokenizer.decode(ids[: end - 1])

    def test_token_that_runs_past_the_stop_string_is_kept_whole(self, tokenizer):
        ids = tokenizer.encode("<answer> Paris </answer>\n\nThe end", add_special_tokens=False)
        # "answer" followed by ">\n\n" in one token: the stop ends inside the completing token.
        end = self.first_completing(tokenizer, ids, ("</answer>\n",))
        assert "</answer>\n" in tokenizer.decode(ids[:end])
        assert "</answer>\n" not in tokenizer.decode(ids[: end - 1])

    def test_earliest_of_several_stop_strings_wins(self, tokenizer):
        ids = tokenizer.encode("<answer> x </answer> <search> y </search>", add_special_tokens=False)
        end = self.first_completing(tokenizer, ids, ("</search>", "</answer>"))
        assert tokenizer.decode(ids[:end]).endswith("</answer>")

    def test_no_stop_string_no_match(self, tokenizer):
        ids = tokenizer.encode("<search> unfinished query </sear", add_special_tokens=False)
        assert self.first_completing(tokenizer, ids, ("</search>",)) is None
        assert not StopMatcher(tokenizer, ()).completed(ids)

    def test_special_tokens_are_skipped_like_vllm_does(self, tokenizer):
        ids = [*tokenizer.encode("a", add_special_tokens=False), tokenizer.eos_token_id]
        assert not StopMatcher(tokenizer, ("<|im_end|>",)).completed(ids)


def test_greedy_matches_transformers_generate(tiny, prompts, greedy_outputs):
    for prompt, output in zip(prompts, greedy_outputs, strict=True):
        reference = tiny.model.generate(
            torch.tensor([prompt]), max_new_tokens=GREEDY.max_new_tokens, do_sample=False
        )
        assert output.token_ids == reference[0, len(prompt) :].tolist()
        assert output.finish_reason == "length"


def test_batched_greedy_equals_one_by_one_with_different_prompt_lengths(tiny, prompts, greedy_outputs):
    assert len({len(prompt) for prompt in prompts}) == len(prompts)
    generator = TransformersGenerator(tiny)
    for prompt, batched in zip(prompts, greedy_outputs, strict=True):
        alone = generator.generate([prompt], GREEDY)[0]
        assert alone.token_ids == batched.token_ids
        assert alone.logprobs == pytest.approx(batched.logprobs, abs=1e-4)


def test_small_batches_give_the_same_greedy_results(tiny, prompts, greedy_outputs):
    chunked = TransformersGenerator(tiny, max_batch_size=2).generate(prompts, GREEDY)
    assert [g.token_ids for g in chunked] == [g.token_ids for g in greedy_outputs]


def test_generation_is_trimmed_right_after_the_token_completing_a_stop_string(tiny, prompts, greedy_outputs):
    tokenizer = tiny.tokenizer
    full = greedy_outputs[0].token_ids
    # The first token from the 5th on whose text has 2+ characters; the stop string ends inside it.
    end = next(k for k in range(5, len(full)) if len(tokenizer.decode(full[k - 1 : k])) >= 2)
    before, through = tokenizer.decode(full[: end - 1]), tokenizer.decode(full[:end])
    stop = through[len(before) - 3 : len(through) - 1]
    assert stop not in before
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop=(stop,))
    output = TransformersGenerator(tiny).generate([prompts[0]], params)[0]
    assert output.finish_reason == "stop"
    assert output.token_ids == full[:end]
    assert len(output.logprobs) == end


def test_eos_ends_generation_and_is_kept(tiny, prompts, greedy_outputs):
    full = greedy_outputs[2].token_ids
    eos = full[4]
    tiny.model.generation_config.eos_token_id = eos
    try:
        output = TransformersGenerator(tiny).generate([prompts[2]], GREEDY)[0]
    finally:
        tiny.model.generation_config.eos_token_id = tiny.tokenizer.eos_token_id
    assert output.finish_reason == "eos"
    assert output.token_ids == full[: full.index(eos) + 1]


def test_per_prompt_token_limits(tiny, prompts, greedy_outputs):
    outputs = TransformersGenerator(tiny).generate(prompts, GREEDY, max_new_tokens=[3, 12, 7])
    assert [len(o.token_ids) for o in outputs] == [3, 12, 7]
    assert all(o.finish_reason == "length" for o in outputs)
    assert outputs[0].token_ids == greedy_outputs[0].token_ids[:3]
    with pytest.raises(SamplingError):
        TransformersGenerator(tiny).generate(prompts, GREEDY, max_new_tokens=[3, 12])


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny, prompts):
    generator = TransformersGenerator(tiny)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=7, stop=())
    first = [g.token_ids for g in generator.generate(prompts, params)]
    again = [g.token_ids for g in generator.generate(prompts, params)]
    other = [g.token_ids for g in generator.generate(prompts, replace(params, seed=8))]
    assert first == again
    assert first != other


def test_identical_prompts_in_one_batch_get_different_samples(tiny, prompts):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=0, stop=())
    outputs = TransformersGenerator(tiny).generate([prompts[0]] * 4, params)
    assert len({tuple(o.token_ids) for o in outputs}) > 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_match_the_trainer_logprobs(tiny, prompts, temperature):
    params = SamplingParams(max_new_tokens=10, temperature=temperature, seed=3, stop=())
    outputs = TransformersGenerator(tiny).generate(prompts, params)
    batch = SequenceBatch.from_ids(
        prompts, [o.token_ids for o in outputs], pad_token_id=tiny.tokenizer.pad_token_id
    )
    with torch.no_grad():
        scored = sequence_logprobs(tiny.model, batch, temperature=temperature)
    for row, output in enumerate(outputs):
        expected = scored.logprobs[row, : len(output.token_ids)].tolist()
        assert output.logprobs == pytest.approx(expected, abs=1e-4)


def test_top_k_one_is_greedy(tiny, prompts, greedy_outputs):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=1, seed=0, stop=())
    outputs = TransformersGenerator(tiny).generate(prompts, params)
    assert [o.token_ids for o in outputs] == [g.token_ids for g in greedy_outputs]
    # The sampled-from distribution has one token left: its log-prob is 0.
    assert all(lp == pytest.approx(0.0) for o in outputs for lp in o.logprobs)


def continue_each(generator, prompts, first_outputs, params):
    """Second turns: each prompt, its first turn and a fixed 'observation', generated again."""
    observation = [31, 32, 33, 34, 35]
    follow_ups = [[*p, *o.token_ids, *observation] for p, o in zip(prompts, first_outputs, strict=True)]
    return follow_ups, generator.generate(follow_ups, params)


def common_prefix(prompts):
    """How many leading tokens all prompts share."""
    columns = zip(*prompts, strict=False)  # as long as the shortest
    return next((i for i, column in enumerate(columns) if len(set(column)) > 1), min(map(len, prompts)))


def shared_prefill(prompts):
    """Prompt tokens run once their common prefix (the chat template's, here) is computed only once."""
    common = common_prefix(prompts)
    return common + sum(len(prompt) - common for prompt in prompts)


def test_the_prompts_common_prefix_is_computed_once_with_the_same_results(tiny, prompts, greedy_outputs):
    sharing = TransformersGenerator(tiny)
    shared = sharing.generate(prompts, GREEDY)
    assert 0 < common_prefix(prompts) < min(map(len, prompts))
    assert sharing.prefilled_tokens == shared_prefill(prompts) < sum(map(len, prompts))
    unshared = TransformersGenerator(tiny, reuse_kv=False)
    separate = unshared.generate(prompts, GREEDY)
    assert unshared.prefilled_tokens == sum(map(len, prompts))
    assert (
        [g.token_ids for g in shared]
        == [g.token_ids for g in separate]
        == [g.token_ids for g in greedy_outputs]
    )
    for one, other in zip(shared, separate, strict=True):
        assert one.logprobs == pytest.approx(other.logprobs, abs=1e-4)


def assert_sampled_logprobs_are_the_trainers(policy, prompts, generations):
    """Each generation's sampler log-probs (temperature 1) equal the trainer's log-probs of its tokens."""
    for prompt, generation in zip(prompts, generations, strict=True):
        logprobs = sequence_logprobs(
            policy.model,
            SequenceBatch.from_ids([prompt], [generation.token_ids], pad_token_id=0),
            temperature=1.0,
        ).logprobs[0]
        assert generation.logprobs == pytest.approx(logprobs.tolist(), abs=1e-4)


def test_repeated_prompts_are_prefilled_once_and_sample_apart(tiny, prompts):
    """A GRPO group: the same prompt 4 times, prefilled once, then each copy samples its own tokens."""
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3, stop=())
    groups = [prompts[0]] * 4 + [prompts[2]] * 4
    generator = TransformersGenerator(tiny)
    together = generator.generate(groups, params)
    assert generator.prefilled_tokens == shared_prefill([prompts[0], prompts[2]])
    assert len({tuple(g.token_ids) for g in together[:4]}) > 1
    assert_sampled_logprobs_are_the_trainers(tiny, groups, together)


def test_prompts_extending_the_last_call_reuse_its_kv_cache_with_the_same_results(tiny, prompts):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=1, stop=())
    reusing = TransformersGenerator(tiny)
    first = reusing.generate(prompts, params)
    first_turn = shared_prefill(prompts)
    assert reusing.prefilled_tokens == first_turn
    follow_ups, continued = continue_each(reusing, prompts, first, params)
    # Only each first turn's last token (not yet fed) and the observation were prefilled again.
    assert reusing.prefilled_tokens == first_turn + len(prompts) * (1 + 5)
    fresh = TransformersGenerator(tiny, reuse_kv=False).generate(follow_ups, params)
    assert [o.token_ids for o in continued] == [o.token_ids for o in fresh]
    for kept, recomputed in zip(continued, fresh, strict=True):
        assert kept.logprobs == pytest.approx(recomputed.logprobs, abs=1e-4)


def test_kept_kv_caches_are_dropped_when_the_weights_change(prompts):
    policy = tiny_random_model(seed=2)
    generator = TransformersGenerator(policy)
    first = generator.generate(prompts, GREEDY)
    with torch.no_grad():
        for parameter in policy.model.parameters():
            parameter.mul_(1.5)
    follow_ups, continued = continue_each(generator, prompts, first, GREEDY)
    fresh = TransformersGenerator(policy, reuse_kv=False).generate(follow_ups, GREEDY)
    assert [o.token_ids for o in continued] == [o.token_ids for o in fresh]
    # Stale caches would be off by the whole weight change; the shared prompt prefix, by float32 rounding.
    for kept, recomputed in zip(continued, fresh, strict=True):
        assert kept.logprobs == pytest.approx(recomputed.logprobs, abs=1e-4)


@pytest.mark.parametrize("seed", range(20))
def test_prefill_length_groups_are_the_cheapest_split(seed):
    """The dynamic programme against every split of the sorted lengths into consecutive runs."""
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 8), rng.randint(40, 120)]) for _ in range(rng.randint(1, 8))]
    call_tokens = rng.choice([0, 8, 32, 200])

    def cost(groups):
        return sum(len(group) * max(lengths[i] for i in group) + call_tokens for group in groups)

    groups = length_groups(lengths, call_tokens)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    splits = itertools.product([False, True], repeat=len(lengths) - 1)
    cheapest = min(
        cost(
            [
                order[a:b]
                for a, b in itertools.pairwise([0, *(i + 1 for i, cut in enumerate(s) if cut), len(order)])
            ]
        )
        for s in splits
    )
    assert cost(groups) == cheapest


def test_prefill_groups_split_only_when_padding_costs_more_than_a_call():
    assert length_groups([10, 11, 12], 32) == [[0, 1, 2]]
    assert length_groups([3, 100, 4, 98], 32) == [[0, 2], [1, 3]]


def long_and_short_prompts(tiny):
    """Prompts whose lengths differ enough that the prefill splits them into groups."""
    long_question = " ".join(["Which of the following rivers is the longest in Europe?"] * 8)
    prompts = [
        tiny.encode_prompt(q) for q in ("hi", long_question, "Who wrote Hamlet?", long_question + " No?")
    ]
    lengths = [len(prompt) for prompt in prompts]
    assert len(length_groups(lengths, PREFILL_CALL_TOKENS)) > 1
    return prompts


def test_prompts_prefilled_in_length_groups_give_the_one_by_one_results(tiny):
    prompts = long_and_short_prompts(tiny)
    generator = TransformersGenerator(tiny, reuse_kv=False)
    together = generator.generate(prompts, GREEDY)
    for prompt, batched in zip(prompts, together, strict=True):
        alone = generator.generate([prompt], GREEDY)[0]
        assert alone.token_ids == batched.token_ids
        assert alone.logprobs == pytest.approx(batched.logprobs, abs=1e-4)


def test_caches_joined_from_length_groups_serve_the_next_turn(tiny):
    """Sampled rows keep their order after the join, and their kept caches continue exactly."""
    prompts = long_and_short_prompts(tiny)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5, stop=())
    reusing = TransformersGenerator(tiny)
    first = reusing.generate(prompts, params)
    assert_sampled_logprobs_are_the_trainers(tiny, prompts, first)
    follow_ups, continued = continue_each(reusing, prompts, first, params)
    fresh = TransformersGenerator(tiny, reuse_kv=False).generate(follow_ups, params)
    assert [o.token_ids for o in continued] == [o.token_ids for o in fresh]


def test_generation_hands_the_cache_under_the_name_the_model_declares(tiny, prompts):
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40)."""

    class Renamed(torch.nn.Module):
        def forward(self, input_ids, cache=None): ...

    class Older(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None): ...

    assert cache_keyword(Renamed.forward) == "cache"
    assert cache_keyword(Older.forward) == "past_key_values"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        TransformersGenerator(tiny).generate(prompts, GREEDY)
