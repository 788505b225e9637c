"""A readable view of a trajectory: its text, span by span, with the loss mask of each span."""

from itertools import groupby
from typing import cast

from transformers import PreTrainedTokenizerBase

from searchgym.policy.trajectory import Trajectory

_SPAN_NAMES = {1: "policy", 0: "observation"}


def render_trajectory(trajectory: Trajectory, tokenizer: PreTrainedTokenizerBase) -> str:
    """The episode as text: the prompt, then each run of policy (mask 1) and observation (mask 0) tokens.

    Each span is headed by its kind, turn, mask value and token count, so what the loss sees is visible
    at a glance; the outcome and timings close the view.
    """
    # One sequence of ids decodes to one str (transformers declares str | list[str], for batches too).
    lines = [
        f"== prompt ({len(trajectory.prompt_ids)} tokens, mask 0)",
        cast(str, tokenizer.decode(trajectory.prompt_ids)),
    ]
    tokens = zip(trajectory.response_ids, trajectory.loss_mask, trajectory.turn_index, strict=True)
    for (mask, turn), span in groupby(tokens, key=lambda token: (token[1], token[2])):
        ids = [token_id for token_id, _, _ in span]
        lines.append(f"== {_SPAN_NAMES[mask]} turn {turn} ({len(ids)} tokens, mask {mask})")
        lines.append(cast(str, tokenizer.decode(ids)))
    timings, outcome = trajectory.timings, trajectory.outcome
    lines.append(
        f"== reward {outcome.reward} | end {outcome.end_reason} | answer {outcome.answer!r} | "
        f"generation {timings.generation:.2f}s, retrieval {timings.retrieval:.3f}s, bookkeeping "
        f"{timings.bookkeeping:.3f}s (whole batch)"
    )
    return "\n".join(lines)
