"""Moving the learner's weights to the rollout engines, bucket by bucket, in the engines' dtype.

Every path sends the policy's state dict (Hugging Face parameter names) in buckets of at most
``bucket_bytes``, so that no path ever holds a second full copy of the model in flight:

- **broadcast** (:class:`WeightBroadcast`): the learner that holds the weights (rank 0) and the rollout
  workers form a process group of their own (NCCL between GPUs, gloo on CPU) and the weights go out one
  flat bucket at a time; each worker loads a bucket as soon as it arrives;
- **in place** (:func:`copy_in_buckets`): an engine in the learner's own process takes the buckets directly;
- the Ray object store (``train.distributed.actors.shareable_weights``): the whole state dict as arrays in
  shared memory, for CPU runs and tests.

The group is made from a ``TCPStore`` and the backend's process-group class directly, not with
``torch.distributed.init_process_group``: a learner already belongs to the learners' default group, and a
rollout worker to none.
"""

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_BUCKET_BYTES = 256 * 2**20
"""Bytes per bucket: large enough to keep the link busy, small enough to be a rounding error in memory."""
_TIMEOUT = timedelta(minutes=30)

NamedTensors = list[tuple[str, Tensor]]
"""One bucket: parameter names and their tensors."""


def buckets(
    state: Iterable[tuple[str, Tensor]], *, max_bytes: int, dtype: torch.dtype | None = None
) -> Iterator[NamedTensors]:
    """Consecutive groups of named tensors of at most ``max_bytes`` (a larger tensor goes alone).

    Args:
        state: named tensors in the order to send them (a state dict's ``items()``).
        max_bytes: the most bytes a bucket holds, counted in ``dtype``.
        dtype: cast floating-point tensors to it (e.g. bf16 for the engines); None keeps each tensor's own.
    """
    bucket: NamedTensors = []
    size = 0
    for name, tensor in state:
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and (size + nbytes > max_bytes or tensor.dtype != bucket[0][1].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def copy_in_buckets(
    state: Mapping[str, Tensor],
    load: Callable[[NamedTensors], None],
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: torch.dtype | None = None,
) -> int:
    """Hand ``state`` to ``load`` (an engine's ``load_weights``) a bucket at a time; the bytes it moved."""
    moved = 0
    for bucket in buckets(state.items(), max_bytes=bucket_bytes, dtype=dtype):
        load(bucket)
        moved += sum(tensor.numel() * tensor.element_size() for _, tensor in bucket)
    return moved


@dataclass(frozen=True, slots=True)
class _Layout:
    """What a bucket holds, sent ahead of it (as JSON) so that receivers can allocate and split it."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype

    def to_json(self) -> str:
        return json.dumps(
            {"names": self.names, "shapes": self.shapes, "dtype": str(self.dtype).split(".")[-1]}
        )

    @classmethod
    def from_json(cls, text: str) -> "_Layout":
        record = json.loads(text)
        shapes = tuple(tuple(shape) for shape in record["shapes"])
        return cls(names=tuple(record["names"]), shapes=shapes, dtype=getattr(torch, record["dtype"]))


class WeightBroadcast:
    """A process group of one sender (rank 0, the learner) and receivers (the rollout workers).

    Every member constructs it with the same ``address``, ``port`` and ``world_size``; rank 0 hosts the
    rendezvous store. Then the sender calls :meth:`send` while every receiver calls :meth:`receive`.

    Args:
        address: the host of rank 0.
        port: a free port on it.
        rank: this member's rank (0 sends).
        world_size: the sender and every receiver.
        device: where the buckets travel from and to (a CUDA device selects NCCL, the CPU gloo).
    """

    def __init__(self, *, address: str, port: int, rank: int, world_size: int, device: torch.device) -> None:
        self.rank, self.device = rank, device
        store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=_TIMEOUT)
        # Any: torch's stubs declare neither class's broadcast(tensor, root), which both have.
        self.group: Any
        if device.type == "cuda":
            self.group = dist.ProcessGroupNCCL(store, rank, world_size, dist.ProcessGroupNCCL.Options())
        else:
            self.group = dist.ProcessGroupGloo(store, rank, world_size, _TIMEOUT)

    def send(
        self,
        state: Mapping[str, Tensor],
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        dtype: torch.dtype | None = None,
    ) -> int:
        """Broadcast ``state`` bucket by bucket (rank 0); returns the bytes sent."""
        sent = 0
        for bucket in buckets(state.items(), max_bytes=bucket_bytes, dtype=dtype):
            layout = _Layout(
                names=tuple(name for name, _ in bucket),
                shapes=tuple(tuple(tensor.shape) for _, tensor in bucket),
                dtype=bucket[0][1].dtype,
            )
            self._broadcast_text(layout.to_json())
            flat = torch.cat([tensor.reshape(-1) for _, tensor in bucket]).to(self.device)
            self._broadcast(flat)
            sent += flat.numel() * flat.element_size()
        self._broadcast_text("")
        return sent

    def receive(self, load: Callable[[NamedTensors], None]) -> int:
        """Take every bucket rank 0 sends and hand each to ``load``; returns the bytes received."""
        received = 0
        while header := self._broadcast_text(""):
            layout = _Layout.from_json(header)
            sizes = [int(torch.Size(shape).numel()) for shape in layout.shapes]
            flat = torch.empty(sum(sizes), dtype=layout.dtype, device=self.device)
            self._broadcast(flat)
            parts = flat.split(sizes)
            load(
                [
                    (name, part.view(shape))
                    for name, part, shape in zip(layout.names, parts, layout.shapes, strict=True)
                ]
            )
            received += flat.numel() * flat.element_size()
        return received

    def _broadcast(self, tensor: Tensor) -> None:
        self.group.broadcast(tensor, 0).wait()

    def _broadcast_text(self, text: str) -> str:
        """Rank 0's ``text`` on every member: its length, then its UTF-8 bytes ("" ends a transfer)."""
        payload = text.encode() if self.rank == 0 else b""
        length = torch.tensor([len(payload)], dtype=torch.long, device=self.device)
        self._broadcast(length)
        data = torch.empty(int(length.item()), dtype=torch.uint8, device=self.device)
        if self.rank == 0 and payload:
            data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        if data.numel():
            self._broadcast(data)
        return text if self.rank == 0 else bytes(data.cpu().tolist()).decode()
