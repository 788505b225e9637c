"""Trajectories as padded tensors, and the per-token quantities the update needs beside them.

Layout of a batch of ``B`` episodes (:class:`searchgym.policy.logprobs.SequenceBatch`): the prompts are
left-padded
to ``P`` tokens and the responses right-padded to ``R`` tokens, so that every response starts at column
``P`` and per-token tensors of the response are plain ``(B, R)`` slices.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

import torch
from torch import Tensor

from searchgym.errors import SearchgymError
from searchgym.policy.logprobs import SequenceBatch
from searchgym.policy.trajectory import Trajectory
from searchgym.train.micro_batches import trim_padding


class EmptyBatchError(SearchgymError):
    """The rollout returned no trajectory to learn from."""


@dataclass(frozen=True, slots=True)
class Batch:
    """Episodes collated for a forward pass.

    Attributes:
        sequences: the padded token ids (``input_ids`` (B, P + R), ``attention_mask``, ``response_mask``
            (B, R) 1 on real response tokens, policy and observation alike).
        loss_mask: (B, R) 1 on policy tokens of episodes with a reward; 0 on observation tokens, padding
            and every token of an episode whose reward is missing.
        policy_mask: (B, R) 1 on every policy token, rewarded or not (for statistics of the rollout).
        scores: (B,) outcome rewards, 0.0 where missing.
        reward_valid: (B,) False where the reward is missing or not finite.
        sampler_logprobs: (B, R) the generation backend's log-probs, or None when some episode lacks them.
        group_ids: (B,) the prompt id of each episode (GRPO groups).
        staleness: the most updates made since any of the episodes was sampled (0: on-policy).
    """

    sequences: SequenceBatch
    loss_mask: Tensor
    policy_mask: Tensor
    scores: Tensor
    reward_valid: Tensor
    sampler_logprobs: Tensor | None
    group_ids: tuple[str, ...]
    staleness: int = 0

    @property
    def size(self) -> int:
        """B, the number of episodes."""
        return self.loss_mask.shape[0]

    @property
    def response_length(self) -> int:
        """R, the padded response length."""
        return self.loss_mask.shape[1]

    @property
    def position_ids(self) -> Tensor:
        """(B, P + R) the position of each real token within its own episode (padding does not count)."""
        return (self.sequences.attention_mask.cumsum(dim=-1) - 1).clamp(min=0)

    def select(self, rows: Tensor) -> "Batch":
        """The episodes at ``rows`` (a 1-D index tensor), every field sliced alike."""
        return _select(self, rows)

    def trimmed(self) -> "Batch":
        """The same episodes without the prompt and response columns that are padding in every row."""
        sequences = trim_padding(self.sequences)
        return _keep_response_columns(self, sequences.response_mask.shape[1], sequences=sequences)


def collate(trajectories: Sequence[Trajectory], *, pad_token_id: int, device: torch.device | str) -> Batch:
    """Pad ``trajectories`` into one :class:`Batch` on ``device``."""
    if not trajectories:
        raise EmptyBatchError("the rollout returned no trajectories: check the rollout function and the data")
    sequences = SequenceBatch.from_ids(
        [t.prompt_ids for t in trajectories],
        [t.response_ids for t in trajectories],
        pad_token_id=pad_token_id,
        device=device,
    )
    # A NaN or infinite reward is a broken reward computation: masked like a missing one, never learned from.
    reward_valid = torch.tensor([_is_usable(t.reward) for t in trajectories], device=device)
    policy_mask = _pad_rows([t.loss_mask for t in trajectories], sequences.response_mask.shape[1], device)
    sampler_logprobs = None
    if all(t.sampler_logprobs is not None for t in trajectories):
        rows = [t.sampler_logprobs or [] for t in trajectories]
        sampler_logprobs = _pad_rows(rows, policy_mask.shape[1], device, dtype=torch.float32)
    return Batch(
        sequences=sequences,
        loss_mask=policy_mask * reward_valid.unsqueeze(-1),
        policy_mask=policy_mask,
        scores=torch.tensor(  # float32 even when a reward function returns integers
            [t.reward if _is_usable(t.reward) else 0.0 for t in trajectories],
            dtype=torch.float32,
            device=device,
        ),
        reward_valid=reward_valid,
        sampler_logprobs=sampler_logprobs,
        group_ids=tuple(t.group_id for t in trajectories),
        staleness=max(t.staleness for t in trajectories),
    )


def _is_usable(reward: float | None) -> bool:
    return reward is not None and math.isfinite(reward)


def _pad_rows(
    rows: Sequence[Sequence[float]], width: int, device: torch.device | str, dtype: torch.dtype = torch.long
) -> Tensor:
    """(len(rows), width) the rows right-padded with zeros."""
    padded = torch.zeros(len(rows), width, dtype=dtype)
    for index, row in enumerate(rows):
        padded[index, : len(row)] = torch.tensor(row, dtype=dtype)
    return padded.to(device)


@dataclass(frozen=True, slots=True)
class Experience:
    """A batch with everything computed from it before the update.

    Attributes:
        batch: the episodes.
        old_logprobs: (B, R) log-probs of the response under the policy that sampled it (the sampler's own
            when the batch is stale), or None when the update is on-policy
            (``TrainConfig.update_is_on_policy``) and reads them off its own forward pass.
        advantages: (B, R) per-token advantages, 0 off the loss mask.
        ref_logprobs: (B, R) log-probs under the frozen reference, or None without a KL term.
        values: (B, R) the critic's values at collection time (PPO), else None.
        returns: (B, R) the critic's regression targets (PPO), else None.
    """

    batch: Batch
    old_logprobs: Tensor | None
    advantages: Tensor
    ref_logprobs: Tensor | None = None
    values: Tensor | None = None
    returns: Tensor | None = None

    @property
    def size(self) -> int:
        """B, the number of episodes."""
        return self.batch.size

    def select(self, rows: Tensor) -> "Experience":
        """The episodes at ``rows`` (a 1-D index tensor), every field sliced alike."""
        return _select(self, rows)

    def trimmed(self) -> "Experience":
        """The same episodes without the columns that are padding in every row (see :meth:`Batch.trimmed`)."""
        batch = self.batch.trimmed()
        return _keep_response_columns(self, batch.response_length, batch=batch)


def _keep_response_columns(record: Any, width: int, **replaced: Any) -> Any:
    """``record`` with its (B, R) tensor fields cut to their first ``width`` response columns."""
    changes = dict(replaced)
    for field in fields(record):
        value = getattr(record, field.name)
        if field.name not in changes and isinstance(value, Tensor) and value.dim() == 2:
            changes[field.name] = value[:, :width]
    return replace(record, **changes)


def _select(record: Any, rows: Tensor) -> Any:
    """``record`` (a dataclass of per-episode tensors, tuples and nested records) restricted to ``rows``."""
    changes: dict[str, Any] = {}
    for field in fields(record):
        value = getattr(record, field.name)
        if isinstance(value, Tensor) and value.dim() > 0:
            changes[field.name] = value[rows.to(value.device)]
        elif is_dataclass(value):
            changes[field.name] = _select(value, rows)
        elif isinstance(value, tuple):
            changes[field.name] = tuple(value[i] for i in rows.tolist())
    return replace(record, **changes)
