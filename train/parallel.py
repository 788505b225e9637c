"""How data-parallel learners share one update: the protocol the learner follows, and its two implementations.

The learner's ``make_experience`` and ``update`` take a :class:`DataParallel`. With :data:`SINGLE_PROCESS`
they are the one-process update. With :class:`TorchDataParallel`, N learners that each hold the whole batch
compute contiguous shares of it and together take the step one learner takes on the whole batch:

- each learner scores its share of the episodes and the shares are gathered, so that advantage whitening
  and GRPO groups see the whole batch;
- every loss is normalised by the token (or episode) count of the whole mini-batch, so the learners'
  gradients add up to the mini-batch's gradient; one all-reduce per optimizer step sums them;
- the epoch's shuffle is rank 0's, broadcast; a loss or gradient that is not finite on any learner makes
  every learner skip the step.

That is the algorithm of torch's ``DistributedDataParallel`` with gradient accumulation (``no_sync`` until
the last micro-batch), written out rather than wrapped: the trainer's forward passes take the plain Hugging
Face model (which the DDP wrapper would hide), and the skip rule needs the learners to agree before they
reduce, where DDP reduces inside ``backward``.
"""

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:  # for the type checker only: the learner's GPU building blocks import no env code
    from searchgym.train.batch import Batch, Experience

RecordT = TypeVar("RecordT", "Batch", "Experience")
_BUCKET_ELEMENTS = 25 * 2**20 // 4  # DDP's default bucket of 25 MiB, in float32 elements


class DataParallel(Protocol):
    """What the learner asks of its data-parallel group at the few points where learners must agree."""

    world_size: int
    """How many learners share each update."""

    def shard(self, record: RecordT) -> RecordT:
        """This learner's contiguous share of the episodes of a batch or mini-batch."""
        ...

    def gather(self, share: Tensor, *, size: int) -> Tensor:
        """(size, ...) every learner's ``share`` of a ``size``-episode batch, in episode order."""
        ...

    def permutation(self, size: int) -> Tensor:
        """(size,) the epoch's shuffle of the episodes, the same on every learner."""
        ...

    def reduce_gradients(self, model: nn.Module, *, loss: float, finite: bool) -> tuple[float, bool]:
        """Sum the gradients of ``model`` and ``loss`` over the learners; finite only where finite on all.

        Gradients are left as they are when the step is not finite anywhere (every learner skips it).
        """
        ...

    def average(self, values: Mapping[str, float]) -> dict[str, float]:
        """Each value averaged over the learners (a key one learner lacks counts as 0 there)."""
        ...

    def maximum(self, values: Mapping[str, float]) -> dict[str, float]:
        """Each value's maximum over the learners that have it."""
        ...


class SingleProcess:
    """One learner alone: every method is the identity (the shuffle is torch's global generator's)."""

    world_size = 1

    def shard(self, record: RecordT) -> RecordT:
        """The whole record."""
        return record

    def gather(self, share: Tensor, *, size: int) -> Tensor:
        """The share, which is the whole batch."""
        return share

    def permutation(self, size: int) -> Tensor:
        """A shuffle drawn from torch's global generator (checkpoints save it; resumes repeat it)."""
        return torch.randperm(size)

    def reduce_gradients(self, model: nn.Module, *, loss: float, finite: bool) -> tuple[float, bool]:
        """Nothing to sum."""
        return loss, finite

    def average(self, values: Mapping[str, float]) -> dict[str, float]:
        """The values themselves."""
        return dict(values)

    def maximum(self, values: Mapping[str, float]) -> dict[str, float]:
        """The values themselves."""
        return dict(values)


SINGLE_PROCESS = SingleProcess()
"""The default :class:`DataParallel` of the learner: the one-process update."""


class TorchDataParallel:
    """The learners of an initialised ``torch.distributed`` process group (gloo on CPU, NCCL on GPU).

    Every learner must call the learner's functions with the same batch, in the same order: each method
    is a collective operation of the group.

    Args:
        device: where this learner's tensors live (a CUDA device under NCCL).
    """

    def __init__(self, *, device: torch.device) -> None:
        if not dist.is_initialized():
            raise RuntimeError("TorchDataParallel needs torch.distributed.init_process_group to have run")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device

    def _rows(self, size: int) -> list[Tensor]:
        return list(torch.tensor_split(torch.arange(size), self.world_size))

    def shard(self, record: RecordT) -> RecordT:
        """Rows ``[rank * size / N, (rank + 1) * size / N)`` of the record (sizes differ by at most 1)."""
        return record.select(self._rows(record.size)[self.rank])

    def gather(self, share: Tensor, *, size: int) -> Tensor:
        """Every learner's share, padded to the largest for the all-gather and trimmed back."""
        sizes = [len(rows) for rows in self._rows(size)]
        padded = share.new_zeros((max(sizes), *share.shape[1:]))
        padded[: share.shape[0]] = share
        shares = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(shares, padded)
        return torch.cat([gathered[:count] for gathered, count in zip(shares, sizes, strict=True)])

    def permutation(self, size: int) -> Tensor:
        """Rank 0 draws the shuffle from its global generator and broadcasts it."""
        order = torch.randperm(size) if self.rank == 0 else torch.empty(size, dtype=torch.long)
        order = order.to(self.device)
        dist.broadcast(order, src=0)
        return order.cpu()

    def reduce_gradients(self, model: nn.Module, *, loss: float, finite: bool) -> tuple[float, bool]:
        """One all-reduce agrees on finiteness and the loss; bucketed all-reduces then sum the gradients.

        Raises:
            RuntimeError: the learners hold gradients for different parameters (their models differ).
        """
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        agreement = torch.tensor(
            [float(not finite), loss if finite else 0.0, float(len(grads))],
            dtype=torch.float64,
            device=self.device,
        )
        dist.all_reduce(agreement)
        not_finite, total_loss, grad_count = agreement.tolist()
        if not_finite:
            return total_loss, False
        if grad_count != len(grads) * self.world_size:
            raise RuntimeError(
                f"learner {self.rank} has gradients for {len(grads)} tensors, the group {int(grad_count)} "
                f"in all: the learners' models differ"
            )
        for bucket in _buckets(grads, _BUCKET_ELEMENTS):
            flat = torch.cat([grad.reshape(-1) for grad in bucket])
            dist.all_reduce(flat)
            for grad, summed in zip(bucket, flat.split([grad.numel() for grad in bucket]), strict=True):
                grad.copy_(summed.view_as(grad))
        return total_loss, True

    def average(self, values: Mapping[str, float]) -> dict[str, float]:
        """The mean of each value over the learners (gathered as Python objects: a handful of numbers)."""
        gathered: list[Mapping[str, float] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, dict(values))
        keys = sorted({key for entry in gathered if entry for key in entry})
        return {
            key: sum(entry.get(key, 0.0) for entry in gathered if entry) / self.world_size for key in keys
        }

    def maximum(self, values: Mapping[str, float]) -> dict[str, float]:
        """The largest of each value over the learners that have it (gathered as Python objects)."""
        gathered: list[Mapping[str, float] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, dict(values))
        keys = sorted({key for entry in gathered if entry for key in entry})
        return {key: max(entry[key] for entry in gathered if entry and key in entry) for key in keys}


def _buckets(tensors: Sequence[Tensor], max_elements: int) -> Iterator[list[Tensor]]:
    """Consecutive groups of same-dtype tensors of about ``max_elements`` elements (one if larger)."""
    bucket: list[Tensor] = []
    elements = 0
    for tensor in tensors:
        if bucket and (elements + tensor.numel() > max_elements or tensor.dtype != bucket[0].dtype):
            yield bucket
            bucket, elements = [], 0
        bucket.append(tensor)
        elements += tensor.numel()
    if bucket:
        yield bucket
