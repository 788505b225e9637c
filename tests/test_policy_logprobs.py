import pytest
import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

from searchgym.policy.logprobs import SequenceBatch, logprob_mismatch, sequence_logprobs
from searchgym.policy.models import tiny_random_model

PROMPTS = [[1, 20, 30, 40, 50], [1, 60], [1, 70, 80]]
RESPONSES = [[11, 12, 13], [14, 15, 16, 17, 18], [19]]

# Entropies are about 7 nats here: float32 resolves them to ~5e-7, and kernels that sum in another order
# (AVX-512 against AVX2 machines) differ by a few of those steps; a wrong position differs by whole nats.
ENTROPY_RTOL = 1e-6


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


def full_logits_scores(model, batch, temperature):
    """The unchunked computation: the whole (B, R, V) fp32 logits tensor, log-softmax, gather, entropy."""
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids
    ).logits[:, batch.prompt_width - 1 : -1]
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    targets = batch.input_ids[:, batch.prompt_width :]
    logprobs = log_probs.gather(-1, targets[..., None]).squeeze(-1) * batch.response_mask
    entropy = -(log_probs.exp() * log_probs).sum(-1) * batch.response_mask
    return logprobs, entropy


def loss_gradients(model, loss):
    model.zero_grad()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return grads


@pytest.fixture(scope="module")
def qwen_like():
    """A Llama with the usual initialisation (std 0.02), tied embeddings and a 1,000-token vocabulary."""
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config)


@pytest.mark.parametrize("chunk_tokens", [1, 2, 3, 5])
def test_chunked_scores_and_gradients_equal_the_full_logits_ones(qwen_like, chunk_tokens):
    # R = 5: chunks of 1, 2 (2 + 2 + 1), 3 (3 + 2) and 5 (one chunk) positions.
    batch = SequenceBatch.from_ids(PROMPTS, RESPONSES, pad_token_id=0)
    weights = torch.linspace(0.5, 1.5, batch.response_mask.numel()).view_as(batch.response_mask)
    expected_logprobs, expected_entropy = full_logits_scores(qwen_like, batch, temperature=0.7)
    expected_grads = loss_gradients(qwen_like, (weights * (expected_logprobs + expected_entropy)).sum())
    scored = sequence_logprobs(
        qwen_like, batch, temperature=0.7, with_entropy=True, chunk_tokens=chunk_tokens
    )
    torch.testing.assert_close(scored.logprobs, expected_logprobs, atol=1e-6, rtol=0)
    torch.testing.assert_close(scored.entropy, expected_entropy, atol=1e-6, rtol=ENTROPY_RTOL)
    grads = loss_gradients(qwen_like, (weights * (scored.logprobs + scored.entropy)).sum())
    for name, grad in grads.items():
        # Chunks sum the head's gradient in another order: equal up to float32 rounding (measured: 1.3e-6
        # of the largest entry at most).
        scale = float(expected_grads[name].abs().max())
        torch.testing.assert_close(grad, expected_grads[name], atol=3e-6 * scale, rtol=1e-5, msg=name)
    assert any(grad.abs().sum() > 0 for grad in grads.values())


@pytest.mark.parametrize("chunk_tokens", [1, 2, 1024])
def test_scoring_only_the_read_positions_gives_their_scores_and_gradients(qwen_like, chunk_tokens):
    """The head runs on the ``scored`` positions alone: the same values and gradients there, 0 elsewhere."""
    batch = SequenceBatch.from_ids(PROMPTS, RESPONSES, pad_token_id=0)
    scored = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 1, 1], [0, 0, 0, 0, 0]])
    weights = torch.linspace(0.5, 1.5, scored.numel()).view_as(scored) * scored
    expected_logprobs, expected_entropy = full_logits_scores(qwen_like, batch, temperature=0.7)
    expected_grads = loss_gradients(qwen_like, (weights * (expected_logprobs + expected_entropy)).sum())
    some = sequence_logprobs(
        qwen_like, batch, temperature=0.7, with_entropy=True, chunk_tokens=chunk_tokens, scored=scored
    )
    torch.testing.assert_close(some.logprobs, expected_logprobs * scored, atol=1e-6, rtol=0)
    torch.testing.assert_close(some.entropy, expected_entropy * scored, atol=1e-6, rtol=ENTROPY_RTOL)
    grads = loss_gradients(qwen_like, (weights * (some.logprobs + some.entropy)).sum())
    for name, grad in grads.items():
        scale = float(expected_grads[name].abs().max())
        torch.testing.assert_close(grad, expected_grads[name], atol=3e-6 * scale, rtol=1e-5, msg=name)
    nothing = sequence_logprobs(qwen_like, batch, with_entropy=True, scored=torch.zeros_like(scored))
    assert not nothing.logprobs.any() and not nothing.entropy.any()


def saved_logits_shapes(compute, vocabulary):
    """Shapes of the (b, r, V) tensors that autograd keeps for the backward pass while ``compute`` runs."""
    saved: list[torch.Size] = []

    def pack(tensor):
        saved.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        compute()
    return [shape for shape in saved if len(shape) == 3 and shape[-1] == vocabulary]


def test_chunks_recompute_their_logits_instead_of_keeping_them(tiny, batch):
    # With chunks, no logits block survives the forward pass (each is rebuilt from its hidden states in
    # the backward pass); the full computation keeps (B, R, V) blocks.
    vocabulary = tiny.model.config.vocab_size
    chunked = saved_logits_shapes(
        lambda: sequence_logprobs(tiny.model, batch, with_entropy=True, chunk_tokens=2), vocabulary
    )
    full = saved_logits_shapes(lambda: full_logits_scores(tiny.model, batch, temperature=1.0), vocabulary)
    assert chunked == []
    assert (3, 5, vocabulary) in full


def test_value_head_outputs_float32_under_bf16_autocast():
    from searchgym.train.models import ValueModel

    critic = ValueModel.from_causal_lm(tiny_random_model().model)
    torch.nn.init.normal_(critic.value_head.weight)
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = critic(ids, torch.ones_like(ids), torch.arange(4)[None])
    assert values.dtype == torch.float32


def test_the_compiled_softmax_gives_the_eager_scores_and_gradients(qwen_like):
    """``compiled=True`` fuses the float32 passes; the numbers stay those of the eager ones."""
    batch = SequenceBatch.from_ids(PROMPTS, RESPONSES, pad_token_id=0)
    scored = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    weights = torch.linspace(0.5, 1.5, scored.numel()).view_as(scored)
    graphs_before = counters["stats"]["unique_graphs"]
    runs = []
    for compiled in (False, True):
        scores = sequence_logprobs(
            qwen_like,
            batch,
            temperature=0.7,
            with_entropy=True,
            chunk_tokens=2,
            scored=scored,
            compiled=compiled,
        )
        grads = loss_gradients(qwen_like, (weights * (scores.logprobs + scores.entropy)).sum())
        runs.append((scores, grads))
    (eager, eager_grads), (fused, fused_grads) = runs
    assert counters["stats"]["unique_graphs"] > graphs_before  # it did run compiled
    torch.testing.assert_close(fused.logprobs, eager.logprobs, atol=1e-6, rtol=0)
    torch.testing.assert_close(fused.entropy, eager.entropy, atol=1e-6, rtol=ENTROPY_RTOL)
    for name, grad in fused_grads.items():
        scale = float(eager_grads[name].abs().max())
        torch.testing.assert_close(grad, eager_grads[name], atol=3e-6 * scale, rtol=1e-5, msg=name)
