"""Token-budget micro-batches: the greedy plan by hand, the padding it saves, and the same loss."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from searchgym.policy.logprobs import SequenceBatch, sequence_logprobs
from searchgym.train.algorithms import aggregate_loss
from searchgym.train.micro_batches import (
    EpisodeLength,
    episode_lengths,
    fixed_count_padding_share,
    padded_tokens,
    padding_share,
    plan_micro_batches,
    trim_padding,
)

# (prompt, response): A 4+10=14, B 2+2=4, C 3+8=11, D 2+1=3, E 4+3=7 real tokens, 39 in all.
LENGTHS = [
    EpisodeLength(4, 10),
    EpisodeLength(2, 2),
    EpisodeLength(3, 8),
    EpisodeLength(2, 1),
    EpisodeLength(4, 3),
]


def test_episodes_are_packed_longest_first_up_to_the_budget() -> None:
    # Longest first: A, C, E, B, D. A+C would be 2 x (4 + 10) = 28 > 24; C+E is 2 x (4 + 8) = 24;
    # C+E+B 3 x 12 = 36 > 24; B+D 2 x (2 + 2) = 8.
    groups = plan_micro_batches(LENGTHS, max_tokens=24)
    assert groups == [[0], [2, 4], [1, 3]]
    # Computed tokens 14 + 24 + 8 = 46 for 39 real: 7/46 padding, against 1 - 39 / (5 x 14) = 31/70 when
    # every row is padded to the batch's longest prompt (4) and response (10).
    assert padding_share(LENGTHS, groups) == pytest.approx(7 / 46)
    assert fixed_count_padding_share(LENGTHS) == pytest.approx(31 / 70)


def test_a_floor_on_the_count_splits_the_fullest_micro_batch() -> None:
    # [2, 4] holds 24 padded tokens, [1, 3] 8: the former is halved.
    assert plan_micro_batches(LENGTHS, max_tokens=24, min_micro_batches=4) == [[0], [2], [4], [1, 3]]
    assert len(plan_micro_batches(LENGTHS, max_tokens=1000, min_micro_batches=9)) == 5
    with pytest.raises(ValueError, match="must be >= 1"):
        plan_micro_batches(LENGTHS, max_tokens=0)


@given(
    lengths=st.lists(
        st.builds(EpisodeLength, st.integers(1, 50), st.integers(0, 200)), min_size=1, max_size=40
    ),
    max_tokens=st.integers(1, 2000),
)
def test_every_episode_is_planned_once_within_the_budget(
    lengths: list[EpisodeLength], max_tokens: int
) -> None:
    groups = plan_micro_batches(lengths, max_tokens=max_tokens)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        assert len(group) == 1 or padded_tokens([lengths[i] for i in group]) <= max_tokens
    assert padding_share(lengths, groups) <= fixed_count_padding_share(lengths) + 1e-12


PROMPTS = [[5, 6, 7, 8], [5, 9], [5, 6, 7], [5, 9], [5, 6, 7, 8]]
RESPONSES = [[10] * 10, [11, 12], [13] * 8, [14], [15, 16, 17]]


def test_trimmed_micro_batches_give_the_whole_batch_loss_and_gradient() -> None:
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    whole = SequenceBatch.from_ids(PROMPTS, RESPONSES, pad_token_id=0)
    assert episode_lengths(whole) == LENGTHS
    denominator = float(whole.response_mask.sum())

    def loss_of(batch: SequenceBatch) -> torch.Tensor:
        logprobs = sequence_logprobs(model, batch, micro_batch_size=8).logprobs
        return aggregate_loss(-logprobs, batch.response_mask, mode="token-mean", denominator=denominator)

    expected = loss_of(whole)
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total = 0.0
    for group in plan_micro_batches(episode_lengths(whole), max_tokens=24):
        micro = trim_padding(select(whole, group))
        assert micro.input_ids.numel() == padded_tokens([LENGTHS[i] for i in group])
        loss = loss_of(micro)
        loss.backward()
        total += float(loss.detach())
    assert total == pytest.approx(float(expected.detach()), rel=1e-6)
    for grad, expected_grad in zip((p.grad for p in model.parameters()), expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)


def select(batch: SequenceBatch, rows: list[int]) -> SequenceBatch:
    index = torch.tensor(rows)
    return SequenceBatch(
        input_ids=batch.input_ids[index],
        attention_mask=batch.attention_mask[index],
        response_mask=batch.response_mask[index],
        prompt_width=batch.prompt_width,
    )
