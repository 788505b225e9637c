import json

import pytest
import torch

from searchgym.policy.generation import SamplingParams, TransformersGenerator
from searchgym.policy.models import (
    ModelLoadError,
    PromptFormatError,
    default_dtype,
    default_policy_path,
    encode_prompt,
    load_policy,
    tiny_random_model,
)


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_model()


def test_chat_prompt_wraps_the_text_as_the_user_message(tiny):
    ids = encode_prompt(tiny.tokenizer, "Who wrote Hamlet?")
    text = tiny.tokenizer.decode(ids)
    assert "<|im_start|>user\nWho wrote Hamlet?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tiny.is_chat_model


def test_plain_prompt_is_the_raw_text(tiny):
    ids = encode_prompt(tiny.tokenizer, "Question: Who wrote Hamlet?\n\nAssistant:", chat=False)
    assert tiny.tokenizer.decode(ids) == "Question: Who wrote Hamlet?\n\nAssistant:"


def test_chat_prompt_without_a_chat_template_says_to_use_plain(tiny):
    template = tiny.tokenizer.chat_template
    tiny.tokenizer.chat_template = None
    try:
        with pytest.raises(PromptFormatError, match="prompt_style='plain'"):
            encode_prompt(tiny.tokenizer, "hi", chat=True)
        assert not tiny.is_chat_model
    finally:
        tiny.tokenizer.chat_template = template


def test_tiny_model_is_small_fp32_and_deterministic(tiny):
    assert tiny.model.dtype == torch.float32
    assert tiny.device.type == "cpu"
    again = tiny_random_model()
    assert all(
        torch.equal(a, b) for a, b in zip(tiny.model.parameters(), again.model.parameters(), strict=True)
    )
    assert not torch.equal(tiny.model.lm_head.weight, tiny_random_model(seed=1).model.lm_head.weight)


def test_precision_is_bf16_on_gpu_and_fp32_on_cpu():
    assert default_dtype(torch.device("cuda")) == torch.bfloat16
    assert default_dtype(torch.device("cpu")) == torch.float32


def test_default_policy_cache_is_a_plain_safetensors_model():
    path = default_policy_path()
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()


def test_a_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="local model folder"):
        load_policy(tmp_path / "no-such-model")


@pytest.mark.slow
def test_smollm2_loads_offline_from_its_package_and_answers_a_question():
    policy = load_policy()
    assert policy.model.config.num_hidden_layers == 30
    prompt = policy.encode_prompt("What is the capital of France? Answer in one word.")
    params = SamplingParams(max_new_tokens=16, temperature=0.0, stop=())
    output = TransformersGenerator(policy).generate([prompt], params)[0]
    assert "Paris" in policy.tokenizer.decode(output.token_ids)


@pytest.mark.slow
def test_gguf_conversion_writes_a_loadable_copy_atomically(tmp_path, monkeypatch):
    from searchgym import paths
    from searchgym.policy import models

    monkeypatch.setattr(paths, "CACHE_DIR", tmp_path)
    path = models.default_policy_path()
    assert path.parent == tmp_path / "models"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no staging folder left behind
    assert load_policy(path).model.config.vocab_size == 49152
