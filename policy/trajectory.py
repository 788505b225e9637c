"""The record of one episode that rollouts produce and the trainer and evaluator consume."""

from dataclasses import dataclass, field

from searchgym.env.outcome import EpisodeOutcome


@dataclass(frozen=True, slots=True)
class TurnRecord:
    """What happened in one turn of an episode.

    Attributes:
        action_type: ``"search"``, ``"answer"`` or ``"invalid"`` (the env's parse of the policy's text).
        text: the decoded text the policy generated in this turn.
        query: the search query, when the action was a search.
        retrieved_ids: corpus ids of the passages shown back, in order.
        num_policy_tokens: tokens the policy generated in this turn.
        num_observation_tokens: observation tokens appended after this turn (0 after an answer).
    """

    action_type: str
    text: str
    query: str | None = None
    retrieved_ids: tuple[str, ...] = ()
    num_policy_tokens: int = 0
    num_observation_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Timings:
    """Wall-clock seconds an episode's batch spent in each phase (shared by the episodes of one batch).

    In an asynchronous rollout the batch is the whole request and generation overlaps retrieval, so the
    two may add up to more than the wall time (``bookkeeping`` is what is left of it, never below 0).
    """

    generation: float = 0.0
    retrieval: float = 0.0
    bookkeeping: float = 0.0


@dataclass(slots=True)
class Trajectory:
    """One episode, token by token, exactly as the policy saw and produced it.

    The response interleaves policy tokens (the exact ids the sampler produced, never re-tokenized) with
    observation tokens (the retrieved ``<information>`` blocks the env returned). ``P`` is the prompt
    length and ``R`` the response length.

    Attributes:
        example_id: id of the QA example.
        group_id: id shared by the samples of one prompt (GRPO groups); unique per prompt, across datasets.
        prompt_ids: (P,) the prompt as the policy was conditioned on it.
        response_ids: (R,) policy and observation tokens in order.
        loss_mask: (R,) 1 exactly on policy-generated tokens, 0 on observation tokens.
        turn_index: (R,) the turn each response token belongs to (0-based).
        outcome: how the episode ended and what it scored (its reward is the one the update uses).
        sampler_logprobs: (R,) the generation backend's log-probs of the policy tokens (0.0 on observation
            tokens), or None when the backend gives none.
        turns: one record per turn.
        timings: where the batch's time went.
        weights_version: the training step whose update made the weights that sampled the episode (0: the
            initial weights); the training loop stamps it when it collects the episode.
        staleness: updates made between those weights and the ones the episode is learned with (0:
            on-policy; up to ``rollout.max_staleness`` when generation overlaps training).
    """

    example_id: str
    group_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]
    turn_index: list[int]
    outcome: EpisodeOutcome
    sampler_logprobs: list[float] | None = None
    turns: list[TurnRecord] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)
    weights_version: int = 0
    staleness: int = 0

    def __post_init__(self) -> None:
        lengths = {len(self.response_ids), len(self.loss_mask), len(self.turn_index)}
        if self.sampler_logprobs is not None:
            lengths.add(len(self.sampler_logprobs))
        if len(lengths) != 1:
            raise ValueError(f"per-token lists of the response differ in length: {lengths}")

    @property
    def reward(self) -> float | None:
        """The scalar outcome reward, or None when it could not be computed (masked from the update)."""
        return self.outcome.reward

    @property
    def num_policy_tokens(self) -> int:
        """Tokens the policy generated (those the loss sees)."""
        return sum(self.loss_mask)
