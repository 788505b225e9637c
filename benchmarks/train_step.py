"""Cost of the learner's part of one training step (experience + PPO/GRPO update), without the rollout.

A randomly initialised model with the architecture of a real one (no download) scores and updates a
batch of synthetic episodes shaped like search trajectories: a prompt, then policy turns interleaved
with observation blocks. Prints seconds, tokens per second and peak memory per phase.

    python benchmarks/train_step.py --shape smollm2-135m --episodes 16 --device cpu
    python benchmarks/train_step.py --shape qwen2.5-0.5b --episodes 64 --device cuda --dtype bfloat16
    python benchmarks/train_step.py --shape smollm2-135m --lora-rank 8  # LoRA adapters (the lora extra)

Peak memory on the CPU is the process's peak resident size, so compare settings in separate processes.
"""

import argparse
import random
import resource
import time
from collections.abc import Callable
from typing import TypeVar

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, Qwen2Config, Qwen2ForCausalLM

from searchgym.env.outcome import EpisodeOutcome
from searchgym.policy.trajectory import Trajectory
from searchgym.train.batch import collate
from searchgym.train.config import TrainConfig, load_config
from searchgym.train.learner import make_experience, update
from searchgym.train.models import build_train_models
from searchgym.train.optim import build_optimizers

T = TypeVar("T")

# Public architecture settings of the models searchgym targets (their config.json files).
SHAPES: dict[str, tuple[type, PretrainedConfig]] = {
    "smollm2-135m": (
        LlamaForCausalLM,
        LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            tie_word_embeddings=True,
        ),
    ),
    "qwen2.5-0.5b": (
        Qwen2ForCausalLM,
        Qwen2Config(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
        ),
    ),
}


def synthetic_episode(
    index: int, *, vocab: int, prompt: int, turns: int, turn: int, observation: int
) -> Trajectory:
    """A search-shaped episode: ``turns`` policy turns with an observation block after all but the last."""
    rng = random.Random(index)
    response, mask = [], []
    for number in range(turns):
        response += [rng.randrange(vocab) for _ in range(turn)]
        mask += [1] * turn
        if number < turns - 1:
            response += [rng.randrange(vocab) for _ in range(observation)]
            mask += [0] * observation
    return Trajectory(
        example_id=str(index),
        group_id=str(index // 5),
        prompt_ids=[rng.randrange(vocab) for _ in range(prompt)],
        response_ids=response,
        loss_mask=mask,
        turn_index=[0] * len(response),
        outcome=EpisodeOutcome(answer=None, end_reason="answered", reward=float(rng.random() < 0.3)),
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="smollm2-135m")
    parser.add_argument("--algorithm", choices=("ppo", "grpo"), default="ppo")
    parser.add_argument("--episodes", type=int, default=16, help="a multiple of 5 for grpo (groups of 5)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--turn-tokens", type=int, default=64)
    parser.add_argument("--observation-tokens", type=int, default=192)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--kl-coef", type=float, default=0.001, help="0 drops the reference model")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--lora-rank", type=int, default=0, help="LoRA adapters of this rank (alpha 2x); 0: off"
    )
    return parser.parse_args()


def train_config(args: argparse.Namespace) -> TrainConfig:
    """One mini-batch per step (every episode in one optimizer step), as the presets' 2:1 ratio halves."""
    group = 5 if args.algorithm == "grpo" else 1
    return load_config(
        None,
        [
            f"algorithm.name={args.algorithm}",
            f"rollout.samples_per_prompt={group}",
            f"batch.prompts_per_step={args.episodes // group}",
            f"batch.mini_batch_prompts={args.episodes // group}",
            f"batch.micro_batch_size={args.micro_batch}",
            f"kl.placement={'loss' if group > 1 else 'reward'}",
            f"kl.estimator={'low_var_kl' if group > 1 else 'k1'}",  # k1 as a loss has no gradient
            f"kl.coef={args.kl_coef}",
            f"system.dtype={args.dtype}",
            f"model.lora.rank={args.lora_rank}",
            f"model.lora.alpha={2 * max(args.lora_rank, 1)}",
        ],
    )


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = train_config(args)
    model_class, model_config = SHAPES[args.shape]
    torch.manual_seed(0)
    policy = model_class(model_config).to(args.device)
    models = build_train_models(
        policy,
        with_reference=config.uses_reference,
        with_critic=config.uses_critic,
        gradient_checkpointing=args.gradient_checkpointing,
        lora=config.model.lora,
    )
    optimizers = build_optimizers(models, config)
    shape = {"prompt": args.prompt_tokens, "turns": args.turns, "turn": args.turn_tokens}
    episodes = [
        synthetic_episode(i, vocab=model_config.vocab_size, observation=args.observation_tokens, **shape)
        for i in range(args.episodes)
    ]
    batch = collate(episodes, pad_token_id=0, device=args.device)
    tokens = int(batch.sequences.attention_mask.sum())
    experience, experience_s = timed(lambda: make_experience(models, batch, config), args.device)
    _, update_s = timed(lambda: update(models, optimizers, experience, config), args.device)
    parameters = sum(p.numel() for p in policy.parameters())
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    print(
        f"{args.shape} ({parameters / 1e6:.0f}M params, {trainable / 1e6:.2f}M trained) {args.algorithm} "
        f"(kl.coef {args.kl_coef}, lora rank {args.lora_rank}) on "
        f"{args.device} {args.dtype}: "
        f"{args.episodes} episodes, {tokens} tokens ({batch.size} x {batch.sequences.input_ids.shape[1]})"
    )
    for phase, seconds in (("experience", experience_s), ("update", update_s)):
        print(f"  {phase:10s} {seconds:7.2f} s  {tokens / seconds:9.0f} tokens/s")
    total = experience_s + update_s
    print(f"  step total {total:7.2f} s; peak memory {_peak_memory_gib(args.device):.2f} GiB")


def timed(work: Callable[[], T], device: str) -> tuple[T, float]:
    """``work()`` and its wall-clock seconds (GPU work included)."""
    _sync(device)
    start = time.perf_counter()
    result = work()
    _sync(device)
    return result, time.perf_counter() - start


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


if __name__ == "__main__":
    main()
