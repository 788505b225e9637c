"""SearchRollout: lock-step or async episodes, run on collect or overlapped in the background."""

import pytest
import torch
from env_fixtures import EXAMPLES, FakeRetriever

from searchgym.env import EnvConfig, SearchVectorEnv
from searchgym.policy.generation import SamplingParams
from searchgym.policy.models import tiny_random_model
from searchgym.policy.rollout import TokenBudgets
from searchgym.train.search_rollout import SearchRollout

GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0)
BUDGETS = TokenBudgets(max_prompt_tokens=512, max_context_tokens=1024)


class WeightsHolder:
    """The part of a Learner a rollout reads: the policy's weights."""

    def __init__(self, state):
        self.state = state

    def policy_state(self):
        return self.state


def make_env_maker(tokenizer):
    def make_env(num_envs):
        config = EnvConfig(max_turns=2, max_searches=1)
        return SearchVectorEnv(
            num_envs=num_envs, dataset=None, retriever=FakeRetriever(), config=config, tokenizer=tokenizer
        )

    return make_env


def episodes_with(state, mode):
    """Greedy episodes of a fresh lock-step rollout on the policy with weights ``state``."""
    policy = tiny_random_model()
    policy.model.load_state_dict(state)
    rollout = SearchRollout(
        policy=policy, make_env=make_env_maker(policy.tokenizer), budgets=BUDGETS, mode=mode
    )
    rollout.submit(list(EXAMPLES), sampling=GREEDY, step=1, batch_size=2)
    return [t.response_ids for t in rollout.collect()]


@pytest.mark.parametrize("mode", ["lockstep", "async"])
def test_overlapping_requests_generate_with_the_weights_synced_before_their_submit(mode):
    learner_policy = tiny_random_model(seed=0)
    first = {name: tensor.clone() for name, tensor in learner_policy.model.state_dict().items()}
    second = {name: tensor.clone() for name, tensor in tiny_random_model(seed=1).model.state_dict().items()}
    rollout = SearchRollout(
        policy=learner_policy,
        make_env=make_env_maker(learner_policy.tokenizer),
        budgets=BUDGETS,
        mode=mode,
        overlap=True,
    )
    rollout.sync_weights(WeightsHolder(first))
    rollout.submit(list(EXAMPLES), sampling=GREEDY, step=1, batch_size=2)
    # The learner updates in place while the first request may still be generating.
    learner_policy.model.load_state_dict(second)
    rollout.sync_weights(WeightsHolder(learner_policy.model.state_dict()))
    rollout.submit(list(EXAMPLES), sampling=GREEDY, step=2, batch_size=2)
    generated = [[t.response_ids for t in rollout.collect()] for _ in range(2)]
    assert generated == [episodes_with(first, mode), episodes_with(second, mode)]
    assert generated[0] != generated[1]
    # The rollout generated with a copy: the learner's model is the learner's alone.
    assert rollout.policy is not None and rollout.policy.model is not learner_policy.model
    for name, tensor in learner_policy.model.state_dict().items():
        assert torch.equal(tensor, second[name])


def test_collect_without_submit_is_an_error():
    policy = tiny_random_model()
    rollout = SearchRollout(policy=policy, make_env=make_env_maker(policy.tokenizer), budgets=BUDGETS)
    with pytest.raises(RuntimeError, match="submit"):
        rollout.collect()
