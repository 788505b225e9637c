"""One-GPU check of the learner at the paper's scale: memory, throughput and MFU of PPO and GRPO updates.

Run on a machine with one GPU, offline, from the repository root (nothing is downloaded: the models are
Qwen2.5 architectures with random weights, built from the configs written below)::

    python benchmarks/gpu_check.py                       # the full table, under 8 minutes on an H100
    python benchmarks/gpu_check.py --device cpu --tiny   # a dry run of every code path on a CPU, seconds

    # the settings that decide MFU: sequences per micro-batch, recomputation, torch.compile, a profile
    python benchmarks/gpu_check.py --sizes 1.5B --algorithms grpo --strategies replicate \
        --micro-batch 2,4 --checkpointing on,off --compile yes,no --profile

It needs torch and transformers alone: it imports the learner's building blocks (chunked log-probs, the
critic, compilation, FSDP2 sharding) and refuses to import faiss, vllm, flask, ray and gymnasium, so that a
dry run here proves it runs on a GPU box that lacks them. It prints:

1. per model, algorithm and learner strategy (replicate: fp32 weights + bf16 autocast; shard: FSDP2 with
   bf16 compute and fp32 master weights, over this one rank; shard+offload: the same with parameters,
   gradients and optimizer states in CPU memory), the peak GPU memory of one update on 4 x 4,096 tokens
   (rollout-time forward passes, then one optimizer step of the policy and, for PPO, the critic), its
   tokens/s and its model-FLOPs utilisation (bf16 dense peak of the card);
2. the peak GPU memory of the policy's forward + backward with chunked log-probs against the full
   (B, R, V) float32 logits;
3. exact dense search (bf16 matmul + top-k) over 1M x 768 vectors: queries/s.

An update that does not fit prints OOM. Every figure is measured on this machine; none is computed.
"""

import argparse
import contextlib
import functools
import gc
import importlib.abc
import itertools
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

BLOCKED = ("faiss", "vllm", "flask", "ray", "gymnasium")


class _Blocker(importlib.abc.MetaPathFinder):
    """Fail any import of the packages a GPU box for this check lacks, as it would fail there."""

    def find_spec(self, name, path=None, target=None):
        """Refuse the blocked packages; leave every other import to the usual finders."""
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"gpu_check must not import {name}: the GPU box it runs on lacks it")
        return None


sys.meta_path.insert(0, _Blocker())
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from searchgym.policy.logprobs import SequenceBatch, sequence_logprobs  # noqa: E402
from searchgym.train.models import ValueModel, compile_transformer_blocks  # noqa: E402
from searchgym.train.optim import adamw  # noqa: E402
from searchgym.train.sharding import ShardingOptions, learner_mesh, shard_model  # noqa: E402

# Qwen2.5 architectures (the models' config.json values); random weights.
QWEN25 = {
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12),
    "3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}
STRATEGIES = ("replicate", "shard", "shard+offload")


def qwen_config(shape: dict, *, vocab_size: int) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_cache=False,
        **shape,
    )


@dataclass(frozen=True)
class Shape:
    """The update's batch: ``rows`` sequences of ``prompt`` + ``response`` tokens, ``micro`` rows a pass."""

    rows: int
    prompt: int
    response: int
    micro: int

    @property
    def tokens(self) -> int:
        """Tokens of the whole batch."""
        return self.rows * (self.prompt + self.response)


@dataclass
class Models:
    """What one learner strategy holds: the models and the optimizers of the trained ones."""

    policy: nn.Module
    reference: nn.Module
    critic: nn.Module | None
    actor_optimizer: torch.optim.Optimizer
    critic_optimizer: torch.optim.Optimizer | None
    compiled: bool


def build_models(
    config: Qwen2Config, *, algorithm: str, strategy: str, checkpointing: bool, compiled: bool,
    device: torch.device,
) -> Models:  # fmt: skip
    """Policy, reference and (PPO) critic on ``device``, sharded as ``strategy`` says, with AdamW."""
    with torch.device(device):
        policy = Qwen2ForCausalLM(config).float()
    if checkpointing:
        checkpoint_activations(policy)
    with torch.device(device):
        reference = Qwen2ForCausalLM(config).float().eval().requires_grad_(False)
    critic = ValueModel.from_causal_lm(policy) if algorithm == "ppo" else None
    if compiled:
        for model in (policy, reference, critic):
            if model is not None:
                compile_transformer_blocks(model)
    if strategy != "replicate":
        options = ShardingOptions(mixed_precision=device.type == "cuda", offload=strategy == "shard+offload")
        mesh = learner_mesh(device)
        for model in (policy, reference, critic):
            if model is not None:
                shard_model(model, mesh, options=options)

    return Models(
        policy=policy,
        reference=reference,
        critic=critic,
        actor_optimizer=adamw(policy, lr=1e-6, weight_decay=0.01),
        critic_optimizer=adamw(critic, lr=1e-6, weight_decay=0.01) if critic is not None else None,
        compiled=compiled,
    )


def checkpoint_activations(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing, under the name this transformers version uses."""
    settings = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=settings)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=settings)


def random_batch(shape: Shape, vocab_size: int, device: torch.device) -> SequenceBatch:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (shape.rows, shape.prompt + shape.response), generator=generator)
    return SequenceBatch(
        input_ids=ids.to(device),
        attention_mask=torch.ones_like(ids, device=device),
        response_mask=torch.ones(shape.rows, shape.response, dtype=torch.long, device=device),
        prompt_width=shape.prompt,
    )


def autocast(strategy: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for replicated fp32 models (the sharded ones compute in bf16 through FSDP)."""
    if strategy == "replicate" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def micro_batches(batch: SequenceBatch, size: int) -> Iterator[SequenceBatch]:
    for start in range(0, batch.input_ids.shape[0], size):
        rows = slice(start, start + size)
        yield SequenceBatch(
            batch.input_ids[rows], batch.attention_mask[rows], batch.response_mask[rows], batch.prompt_width
        )


def values_of(critic: nn.Module, batch: SequenceBatch) -> Tensor:
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    values = critic(batch.input_ids, batch.attention_mask, position_ids)
    return values[:, batch.prompt_width - 1 : -1]


def one_update(
    models: Models, batch: SequenceBatch, shape: Shape, *, strategy: str, device: torch.device
) -> None:
    """Rollout-time scores, then one PPO/GRPO optimizer step (clipped surrogate, low-var KL, value loss)."""
    tokens = float(batch.response_mask.sum())
    with torch.no_grad(), autocast(strategy, device):
        old = sequence_logprobs(
            models.policy, batch, micro_batch_size=shape.micro, compiled=models.compiled
        ).logprobs
        reference = sequence_logprobs(
            models.reference, batch, micro_batch_size=shape.micro, compiled=models.compiled
        ).logprobs
        values = None
        if models.critic is not None:
            values = torch.cat(
                [values_of(models.critic, micro) for micro in micro_batches(batch, shape.micro)]
            )
    # Stand-in advantages and returns: the cost of the update does not depend on their values.
    advantages = torch.randn_like(old)
    for start, micro in zip(
        range(0, shape.rows, shape.micro), micro_batches(batch, shape.micro), strict=True
    ):
        rows = slice(start, start + shape.micro)
        with autocast(strategy, device):
            scored = sequence_logprobs(
                models.policy,
                micro,
                micro_batch_size=shape.micro,
                with_entropy=True,
                compiled=models.compiled,
            )
            ratio = torch.exp(scored.logprobs - old[rows])
            surrogate = -torch.minimum(ratio * advantages[rows], ratio.clamp(0.8, 1.2) * advantages[rows])
            log_ratio = reference[rows] - scored.logprobs
            kl = (torch.exp(log_ratio) - log_ratio - 1).clamp(-10, 10)
            assert scored.entropy is not None
            loss = (surrogate + 1e-3 * kl - 1e-3 * scored.entropy).sum() / tokens
        loss.backward()
    step(models.policy, models.actor_optimizer)
    if models.critic is not None and models.critic_optimizer is not None and values is not None:
        returns = values + torch.randn_like(values)
        for start, micro in zip(
            range(0, shape.rows, shape.micro), micro_batches(batch, shape.micro), strict=True
        ):
            rows = slice(start, start + shape.micro)
            with autocast(strategy, device):
                predicted = values_of(models.critic, micro)
                clipped = values[rows] + (predicted - values[rows]).clamp(-0.5, 0.5)
                loss = torch.maximum((predicted - returns[rows]) ** 2, (clipped - returns[rows]) ** 2).sum()
            (0.5 * loss / tokens).backward()
        step(models.critic, models.critic_optimizer)


def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def update_flops(config: Qwen2Config, shape: Shape, algorithm: str) -> float:
    """Model FLOPs of one update (recomputation not counted): 2 per weight and token forward, 4 backward.

    Weights: the non-embedding ones plus the LM head (vocabulary x hidden); the critic has no LM head.
    Causal attention adds 2 x layers x hidden x sequence per token forward (QK^T and AV, half the square).
    """
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * hidden // config.num_attention_heads
    per_layer = hidden * (hidden + 2 * kv) + hidden * hidden + 3 * hidden * config.intermediate_size
    body = layers * per_layer
    attention = 2 * layers * hidden * (shape.prompt + shape.response)
    forward_policy = 2 * (body + hidden * vocab) + attention
    forward_critic = 2 * body + attention
    passes = 2 * forward_policy + 3 * forward_policy  # old + reference forwards; train forward + backward
    if algorithm == "ppo":
        passes += forward_critic + 3 * forward_critic
    return passes * shape.tokens


@dataclass
class UpdateResult:
    """One row of the table (None where it does not apply or did not fit)."""

    peak_gib: float | None
    tokens_per_s: float | None
    mfu: float | None
    note: str = ""


def measure_update(
    config: Qwen2Config, *, algorithm: str, strategy: str, checkpointing: bool, compiled: bool,
    shape: Shape, device: torch.device, profile: bool = False,
) -> UpdateResult:  # fmt: skip
    """Build, warm up with one update, then time a second one; peak memory covers both updates.

    With ``profile``, a third update runs under the torch profiler (after the timing, which it would slow)
    and the operators that took the most device time are printed.
    """
    models = None
    try:
        models = build_models(
            config, algorithm=algorithm, strategy=strategy, checkpointing=checkpointing, compiled=compiled,
            device=device,
        )  # fmt: skip
        batch = random_batch(shape, config.vocab_size, device)
        reset_peak(device)
        one_update(models, batch, shape, strategy=strategy, device=device)
        synchronize(device)
        start = time.perf_counter()
        one_update(models, batch, shape, strategy=strategy, device=device)
        synchronize(device)
        elapsed = time.perf_counter() - start
        peak = peak_gib(device)
        if profile:
            print_profile(
                functools.partial(one_update, models, batch, shape, strategy=strategy, device=device), device
            )
        peak_flops = card_peak_flops(device)
        mfu = update_flops(config, shape, algorithm) / elapsed / peak_flops if peak_flops else None
        return UpdateResult(peak, shape.tokens / elapsed, mfu)
    except torch.OutOfMemoryError:
        return UpdateResult(None, None, None, "OOM")
    finally:
        del models
        release(device)


def print_profile(update: Callable[[], None], device: torch.device) -> None:
    """Run ``update`` under the torch profiler; print the 20 operators with the most self device time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        update()
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=20, max_name_column_width=60), flush=True)


def measure_logprobs_memory(
    config: Qwen2Config, shape: Shape, device: torch.device
) -> tuple[float | None, float | None]:
    """Peak GiB of the policy's forward + backward on one micro-batch: chunked log-probs vs full logits."""
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    checkpoint_activations(model)
    batch = next(micro_batches(random_batch(shape, config.vocab_size, device), shape.micro))
    peaks = []
    for chunked in (True, False):
        model.zero_grad(set_to_none=True)
        release(device)
        reset_peak(device)
        if chunked:
            scored = sequence_logprobs(model, batch, micro_batch_size=shape.micro, with_entropy=True)
            assert scored.entropy is not None
            (scored.logprobs.sum() + scored.entropy.sum()).backward()
        else:
            logits = model(input_ids=batch.input_ids).logits[:, batch.prompt_width - 1 : -1].float()
            log_probs = torch.log_softmax(logits, dim=-1)
            targets = batch.input_ids[:, batch.prompt_width :, None]
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            (log_probs.gather(-1, targets).sum() + entropy.sum()).backward()
            del logits, log_probs, entropy
        synchronize(device)
        peaks.append(peak_gib(device))
    del model
    release(device)
    return peaks[0], peaks[1]


def measure_dense_search(num_vectors: int, dim: int, device: torch.device) -> float:
    """Queries/s of exact inner-product top-10 over ``num_vectors`` x ``dim`` bf16 vectors (256 a batch)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    corpus = torch.randn(num_vectors, dim, device=device, dtype=dtype)
    queries = torch.randn(256, dim, device=device, dtype=dtype)
    torch.topk(queries @ corpus.T, k=10, dim=-1)  # warm-up
    synchronize(device)
    rounds, start = 20, time.perf_counter()
    for _ in range(rounds):
        torch.topk(queries @ corpus.T, k=10, dim=-1)
    synchronize(device)
    rate = rounds * queries.shape[0] / (time.perf_counter() - start)
    del corpus, queries
    release(device)
    return rate


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def card_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def parameter_count(config: Qwen2Config) -> int:
    """Parameters of the Qwen2 model ``config`` describes, counted on the meta device."""
    with torch.device("meta"):
        return sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())


def offload_host_bytes(config: Qwen2Config, algorithm: str) -> int:
    """Host bytes of offloaded states: 36 P for PPO, 20 P for GRPO.

    fp32 weights, gradients and AdamW (16 B) per trained parameter, fp32 reference (4 B); the critic is
    about as large as the policy.
    """
    return (36 if algorithm == "ppo" else 20) * parameter_count(config)


def host_memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def run_table(
    sizes: list[str], algorithms: list[str], strategies: list[str], shapes: list[Shape],
    checkpointing: list[bool], compiled: list[bool], *, tiny: bool, device: torch.device, deadline: float,
    profile: bool,
) -> None:  # fmt: skip
    """Print one row per model size, algorithm, strategy, micro-batch and checkpointing setting.

    With compilation on, each decoder block runs through torch.compile (the first update of a row, the
    warm-up, pays for compiling). Rows are skipped once past ``deadline``; with ``profile``, the first
    measured row is also profiled.
    """
    columns = (
        "model | algorithm | strategy | micro-batch | act. checkpointing | compiled | peak GPU GiB | tokens/s"
        " | MFU"
    )
    print(f"| {columns} |   ({shapes[0].rows} x {shapes[0].prompt + shapes[0].response} tokens)")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        config = qwen_config(TINY if tiny else QWEN25[size], vocab_size=1000 if tiny else 151936)
        for algorithm, strategy, shape, recompute, compile_ in itertools.product(
            algorithms, strategies, shapes, checkpointing, compiled
        ):
            cells = table_cells(
                config, algorithm, strategy, shape, checkpointing=recompute, compiled=compile_, device=device,
                deadline=deadline, profile=profile,
            )  # fmt: skip
            profile = profile and cells.startswith("skipped")
            setting = f"{shape.micro} | {'on' if recompute else 'off'} | {'yes' if compile_ else 'no'}"
            print(f"| {size} | {algorithm} | {strategy} | {setting} | {cells} |", flush=True)


def table_cells(
    config: Qwen2Config, algorithm: str, strategy: str, shape: Shape, *, checkpointing: bool, compiled: bool,
    device: torch.device, deadline: float, profile: bool,
) -> str:  # fmt: skip
    """The measured cells of one row, or why the row was skipped."""
    if time.monotonic() > deadline:
        return "skipped: time budget spent | |"
    needed = offload_host_bytes(config, algorithm) if strategy == "shard+offload" else 0
    if needed > 0.8 * host_memory_bytes():
        # Running out of host memory would kill the whole check, not just this row.
        have = host_memory_bytes() / 1e9
        return f"skipped: needs {needed / 1e9:.0f} GB of host RAM (arithmetic), has {have:.0f} | |"
    result = measure_update(
        config, algorithm=algorithm, strategy=strategy, checkpointing=checkpointing, compiled=compiled,
        shape=shape, device=device, profile=profile,
    )  # fmt: skip
    mfu = fmt(None if result.mfu is None else 100 * result.mfu, "{:.0f}%")
    peak = result.note or fmt(result.peak_gib, "{:.1f}")
    return f"{peak} | {fmt(result.tokens_per_s, '{:,.0f}')} | {mfu}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models and batches: a dry run of every path"
    )
    parser.add_argument(
        "--sizes", default="1.5B,3B", help="Qwen2.5 sizes of the update table (0.5B, 1.5B, 3B)"
    )
    # Offload first: a row that runs out of GPU memory is the likelier one to leave a fragmented allocator.
    parser.add_argument("--strategies", default=",".join(reversed(STRATEGIES)))
    parser.add_argument("--algorithms", default="grpo,ppo", help="grpo, ppo or both")
    parser.add_argument(
        "--micro-batch", default="1", help="sequences per forward/backward pass; a list runs each"
    )
    parser.add_argument(
        "--checkpointing", default="on", help="activation checkpointing of the policy: on, off or on,off"
    )
    parser.add_argument(
        "--compile",
        default="no",
        help="torch.compile each decoder block and the log-softmax: no, yes or no,yes",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile the first row's update: top operators"
    )
    parser.add_argument("--budget-s", type=float, default=360.0, help="skip table rows after this long")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device visible; run with --device cpu --tiny for a dry run", file=sys.stderr
        )
        return 2
    deadline = time.monotonic() + args.budget_s
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run: no GPU figure)"
    print(f"gpu_check on {name}; torch {torch.__version__}")
    micros = [int(size) for size in args.micro_batch.split(",")]
    shapes = [
        Shape(rows=4, prompt=8, response=24, micro=micro) if args.tiny else Shape(4, 512, 3584, micro)
        for micro in micros
    ]
    shape = shapes[0]
    checkpointing = [{"on": True, "off": False}[setting] for setting in args.checkpointing.split(",")]
    compiled = [{"yes": True, "no": False}[setting] for setting in args.compile.split(",")]
    sizes = ["tiny"] if args.tiny else args.sizes.split(",")
    algorithms, strategies = args.algorithms.split(","), args.strategies.split(",")
    run_table(
        sizes, algorithms, strategies, shapes, checkpointing, compiled, tiny=args.tiny, device=device,
        deadline=deadline, profile=args.profile,
    )  # fmt: skip
    logprob_model = (
        qwen_config(TINY, vocab_size=1000) if args.tiny else qwen_config(QWEN25["1.5B"], vocab_size=151936)
    )
    chunked, full = measure_logprobs_memory(logprob_model, shape, device)
    what = f"{shape.micro} x {shape.prompt + shape.response} tokens, {'tiny' if args.tiny else '1.5B'}"
    print(f"\nlog-probs + entropy, forward + backward ({what}, bf16 weights): peak GPU GiB chunked "
          f"{fmt(chunked, '{:.1f}')}, full fp32 logits {fmt(full, '{:.1f}')}")  # fmt: skip
    vectors = 10_000 if args.tiny else 1_000_000
    rate = measure_dense_search(vectors, 768, device)
    print(f"exact dense search, {vectors:,} x 768 ({'bf16' if device.type == 'cuda' else 'fp32'}), top-10, "
          f"256 queries a batch: {rate:,.0f} q/s")  # fmt: skip
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
