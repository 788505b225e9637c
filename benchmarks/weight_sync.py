"""Seconds per GB of moving a policy's weights to a rollout engine: object store, in place, broadcast.

- ``object_store``: what the Ray run does today: the state dict as numpy arrays into Ray's shared-memory store
  (``ray.put``), then read back as tensors and copied into the worker's model (``load_state_dict``);
- ``in_place``: bucket by bucket into a model in the same process (an engine colocated with the learner);
- ``broadcast``: bucket by bucket over a gloo process group to a second process (NCCL on GPUs), which loads
  each bucket into its model as it arrives.

Random weights from a model config (nothing downloaded); fp32 and bf16 on the wire. On this CPU::

    .venv/bin/python benchmarks/weight_sync.py --shape smollm2-135m --repeats 3

With ``--device cuda`` (one GPU; Ray, vLLM and a second GPU not needed) the learner-side half is timed: in
place into a second model on the same GPU (a colocated engine) and bucket by bucket from the GPU into host
memory (what every path off the GPU starts with); broadcast needs a GPU per NCCL rank and is left out::

    python benchmarks/weight_sync.py --device cuda --shape qwen2.5-3b
"""

import argparse
import functools
import socket
import time
from collections.abc import Callable

import torch
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from searchgym.train.distributed.actors import shareable_weights, weight_tensors
from searchgym.train.weight_sync import WeightBroadcast, copy_in_buckets

SHAPES = {
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "heads": 9,
                     "kv_heads": 3, "vocab": 49152},
    "qwen2.5-3b": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "heads": 16,
                   "kv_heads": 2, "vocab": 151936},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "heads": 4,
             "kv_heads": 1, "vocab": 49152},
}  # fmt: skip


def make_model(shape: str, device: str = "cpu") -> PreTrainedModel:
    spec = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        tie_word_embeddings=False,
    )
    with torch.device(device):
        return LlamaForCausalLM(config).eval()


def best_of(repeats: int, run: Callable[[], int]) -> tuple[float, int]:
    """The fastest of ``repeats`` runs (a shared box), and the bytes one run moved."""
    times, moved = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        moved = run()
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times), moved


def object_store(model: PreTrainedModel, target: PreTrainedModel) -> int:
    import ray

    state = model.state_dict()
    reference = ray.put(shareable_weights(state))
    target.load_state_dict(weight_tensors(ray.get(reference)))
    return sum(t.numel() * t.element_size() for t in state.values())


def in_place(model: PreTrainedModel, target: PreTrainedModel, dtype: torch.dtype) -> int:
    def load(bucket: list[tuple[str, torch.Tensor]]) -> None:
        target.load_state_dict(dict(bucket), strict=False)

    return copy_in_buckets(model.state_dict(), load, dtype=dtype)


def to_host(model: PreTrainedModel, dtype: torch.dtype) -> int:
    """Bucket by bucket from the device into pinned host memory (the first leg of every path off a GPU)."""
    staging: dict[str, torch.Tensor] = {}

    def load(bucket: list[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in bucket:
            if name not in staging:
                staging[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            staging[name].copy_(tensor, non_blocking=True)

    return copy_in_buckets(model.state_dict(), load, dtype=dtype)


def _receiver(port: int, shape: str, dtype: torch.dtype, repeats: int) -> None:
    torch.set_num_threads(1)
    sync = WeightBroadcast(address="127.0.0.1", port=port, rank=1, world_size=2, device=torch.device("cpu"))
    model = make_model(shape).to(dtype)
    for _ in range(repeats):
        sync.receive(lambda bucket: model.load_state_dict(dict(bucket), strict=False))


def broadcast(model: PreTrainedModel, shape: str, dtype: torch.dtype, repeats: int) -> tuple[float, int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    receiver = mp.get_context("spawn").Process(target=_receiver, args=(port, shape, dtype, repeats))
    receiver.start()
    sync = WeightBroadcast(address="127.0.0.1", port=port, rank=0, world_size=2, device=torch.device("cpu"))
    result = best_of(repeats, lambda: sync.send(model.state_dict(), dtype=dtype))
    receiver.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        gpu(args.shape, args.repeats)
        return
    model, target = make_model(args.shape), make_model(args.shape)
    rows = []
    try:
        import ray

        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        rows.append(("object store (fp32)", *best_of(args.repeats, lambda: object_store(model, target))))
        ray.shutdown()
    except ImportError:
        print("ray is not installed: no object-store figure")
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        copy = functools.partial(in_place, model, make_model(args.shape).to(dtype), dtype)
        rows.append((f"in place ({name})", *best_of(args.repeats, copy)))
        rows.append((f"broadcast, gloo ({name})", *broadcast(model, args.shape, dtype, args.repeats)))
    print(f"{args.shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
    print_rows(rows)
    print(f"(best of {args.repeats} runs each; torch threads {args.threads})")


def gpu(shape: str, repeats: int) -> None:
    """The learner-side legs on one GPU: in place on the GPU, and GPU to host, in fp32 and bf16."""
    device = "cuda"
    model = make_model(shape, device)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        target = make_model(shape, device).to(dtype)
        rows.append(
            (f"in place, GPU ({name})", *best_of(repeats, functools.partial(in_place, model, target, dtype)))
        )
        del target
        rows.append((f"GPU to host ({name})", *best_of(repeats, functools.partial(to_host, model, dtype))))
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{shape} on {torch.cuda.get_device_name()}: {millions:.0f}M parameters")
    print_rows(rows)
    print(f"(best of {repeats} runs each)")


def print_rows(rows: list[tuple[str, float, int]]) -> None:
    print(f"{'path':<24} {'MB moved':>9} {'seconds':>8} {'s / GB':>7} {'GB/s':>7}")
    for name, seconds, moved in rows:
        per_gb = seconds / (moved / 1e9)
        print(f"{name:<24} {moved / 1e6:>9.0f} {seconds:>8.3f} {per_gb:>7.3f} {1 / per_gb:>7.1f}")


if __name__ == "__main__":
    main()
