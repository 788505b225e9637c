import pytest
import torch

from searchgym.policy.logprobs import SequenceBatch, logprob_mismatch, sequence_logprobs
from searchgym.policy.models import tiny_random_model

PROMPTS = [[1, 20, 30, 40, 50], [1, 60], [1, 70, 80]]
RESPONSES = [[11, 12, 13], [14, 15, 16, 17, 18], [19]]


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_model()


@pytest.fixture(scope="module")
def batch(tiny):
    return SequenceBatch.from_ids(PROMPTS, RESPONSES, pad_token_id=tiny.tokenizer.pad_token_id)


def unpadded_logprobs(model, prompt, response, temperature=1.0):
    """Reference: one sequence, no padding, the textbook shift."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1] / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    return log_probs.gather(-1, torch.tensor(response)[:, None]).squeeze(-1), log_probs


def test_packing_aligns_every_response_at_the_same_column(batch):
    assert batch.prompt_width == 5
    assert batch.input_ids.shape == (3, 10)
    assert batch.input_ids[1, 3:10].tolist() == [1, 60, 14, 15, 16, 17, 18]
    assert batch.attention_mask[1].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    assert batch.response_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_equal_the_unpadded_computation(tiny, batch, temperature):
    with torch.no_grad():
        scored = sequence_logprobs(tiny.model, batch, temperature=temperature, with_entropy=True)
        for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
            expected, log_probs = unpadded_logprobs(tiny.model, prompt, response, temperature)
            n = len(response)
            assert scored.logprobs[row, :n] == pytest.approx(expected, abs=1e-5)
            assert scored.logprobs[row, n:].abs().sum() == 0
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            assert scored.entropy[row, :n] == pytest.approx(entropy, abs=1e-4)


def test_micro_batching_does_not_change_the_result(tiny, batch):
    with torch.no_grad():
        whole = sequence_logprobs(tiny.model, batch, micro_batch_size=8).logprobs
        split = sequence_logprobs(tiny.model, batch, micro_batch_size=1).logprobs
    assert torch.allclose(whole, split, atol=1e-5)


def test_logprobs_carry_gradients_for_the_trainer(tiny, batch):
    scored = sequence_logprobs(tiny.model, batch)
    assert scored.entropy is None
    scored.logprobs.sum().backward()
    grad = tiny.model.model.embed_tokens.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    tiny.model.zero_grad()


def test_greedy_temperature_scores_the_raw_distribution(tiny, batch):
    with torch.no_grad():
        greedy = sequence_logprobs(tiny.model, batch, temperature=0.0).logprobs
        raw = sequence_logprobs(tiny.model, batch, temperature=1.0).logprobs
    assert torch.equal(greedy, raw)


def test_mismatch_is_measured_on_masked_tokens_only():
    trainer = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, 0.0]])
    sampler = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    mismatch = logprob_mismatch(trainer, sampler, mask)
    assert mismatch.num_tokens == 3
    assert mismatch.mean_abs_diff == pytest.approx(0.5 / 3)
    assert mismatch.max_abs_diff == pytest.approx(0.5)
    assert mismatch.mean_prob_ratio == pytest.approx((torch.exp(torch.tensor(0.5)).item() + 2) / 3)


def test_mismatch_of_nothing_is_neutral():
    empty = logprob_mismatch(torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 2))
    assert (empty.num_tokens, empty.mean_abs_diff, empty.mean_prob_ratio) == (0, 0.0, 1.0)
