"""A short supervised warm-start on protocol traces, so that outcome rewards are not all zero at the start.

A small instruct model (SmolLM2-135M) never writes a well-formed ``<answer>`` tag when it is merely told to,
so exact match gives RL nothing to reinforce. The warm-start shows it the protocol on training questions:
each trace is a real episode of the search env in which the "policy" searches for the question itself and
then answers with the gold answer — ``<search> question </search>``, the real retrieved ``<information>``,
``<answer> gold </answer>``. The traces are collected by :func:`searchgym.policy.rollout.run_episodes` with a
scripted generator, so prompts, observations, token budgets and loss masks are exactly those of training;
the loss is the negative log-likelihood of the policy tokens only (observations are masked, as in RL).
"""

import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from searchgym.env import QAExample, SearchVectorEnv
from searchgym.errors import SearchgymError
from searchgym.policy.generation import Generation, SamplingParams
from searchgym.policy.logprobs import sequence_logprobs
from searchgym.policy.models import Policy, load_policy, pad_token_id
from searchgym.policy.rollout import TokenBudgets, run_episodes
from searchgym.policy.trajectory import Trajectory
from searchgym.train import algorithms
from searchgym.train.batch import collate
from searchgym.train.checkpoint import export_hf_model
from searchgym.train.config import TrainConfig, WarmStartConfig

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ProtocolTraceGenerator:
    """A scripted :class:`~searchgym.policy.generation.Generator`: search the question, answer the gold.

    The rollout gives a generator only token ids, so the episode's question is found in the decoded context;
    a context with an ``<information>`` block after the question gets the answer, any other the search.
    """

    tokenizer: PreTrainedTokenizerBase
    examples: Sequence[QAExample]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        """The scripted next action of each context, as token ids."""
        generations = []
        for prompt in prompts:
            # One sequence of ids decodes to one str (transformers declares str | list[str], for batches too).
            context = cast(str, self.tokenizer.decode(list(prompt)))
            example = self._example_in(context)
            # Only what follows the question counts: the protocol text itself names the tags.
            if "<information>" in context.rsplit(example.question, 1)[1]:
                action = f"<answer> {example.golden_answers[0]} </answer>"
            else:
                action = f"<search> {example.question} </search>"
            token_ids = self.tokenizer.encode(action, add_special_tokens=False)
            generations.append(Generation(token_ids=token_ids, logprobs=None, finish_reason="stop"))
        return generations

    def _example_in(self, context: str) -> QAExample:
        # The longest matching question wins, so that a question contained in another is not mistaken for it.
        matches = [example for example in self.examples if example.question in context]
        if not matches:
            raise SearchgymError("a warm-start context holds none of the trace questions (prompt template?)")
        return max(matches, key=lambda example: len(example.question))


def protocol_traces(
    tokenizer: PreTrainedTokenizerBase,
    vector_env: SearchVectorEnv,
    examples: Sequence[QAExample],
    *,
    budgets: TokenBudgets,
) -> list[Trajectory]:
    """One scripted search-then-gold-answer episode per example (examples without a gold answer skipped)."""
    answerable = [example for example in examples if example.golden_answers]
    generator = ProtocolTraceGenerator(tokenizer, answerable)
    sampling = SamplingParams(max_new_tokens=budgets.max_turn_tokens, temperature=0.0)
    return run_episodes(generator, vector_env, answerable, sampling=sampling, budgets=budgets)


@dataclass(frozen=True, slots=True)
class WarmStartResult:
    """What the warm-start did.

    Attributes:
        losses: the mean policy-token NLL of each optimizer step, in order.
        traces: protocol traces trained on.
        policy_tokens: mean policy tokens per trace.
    """

    losses: list[float]
    traces: int
    policy_tokens: float


def supervised_warm_start(
    model: PreTrainedModel,
    traces: Sequence[Trajectory],
    config: WarmStartConfig,
    *,
    pad_token_id: int,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> WarmStartResult:
    """Fit ``model`` to the policy tokens of ``traces`` with AdamW; observations and prompts carry no loss.

    Batches are collated by the trainer's :func:`~searchgym.train.batch.collate`, so the loss mask is the RL
    update's.
    """
    if not traces:
        raise SearchgymError("no warm-start traces: check data.train and warmstart.examples")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    order = list(range(len(traces)))
    shuffler = random.Random(seed)
    device = next(model.parameters()).device
    losses: list[float] = []
    model.train()
    for _ in range(config.epochs):
        shuffler.shuffle(order)
        for start in range(0, len(order), config.batch_size):
            chunk = [traces[index] for index in order[start : start + config.batch_size]]
            batch = collate(chunk, pad_token_id=pad_token_id, device=device)
            scores = sequence_logprobs(
                model, batch.sequences, micro_batch_size=batch.size, scored=batch.loss_mask
            )
            loss = -algorithms.masked_mean(scores.logprobs, batch.loss_mask)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(len(losses), losses[-1])
    model.eval()
    policy_tokens = sum(t.num_policy_tokens for t in traces) / len(traces)
    if not all(math.isfinite(loss) for loss in losses):
        raise SearchgymError("the warm-start loss is not finite: lower warmstart.lr")
    return WarmStartResult(losses=losses, traces=len(traces), policy_tokens=policy_tokens)


WARMSTART_DIR = "warmstart"
"""The warm-started policy inside the run folder (a plain Hugging Face folder); a resumed run reuses it."""
WARMSTART_REPORT = "warmstart.json"
"""Its record beside it: the loss per step, trace counts, seconds, and the untrained policy's dev scores."""


def warm_started_policy(
    config: TrainConfig,
    policy: Policy,
    *,
    make_env: Callable[[int], SearchVectorEnv],
    budgets: TokenBudgets,
    train_examples: Sequence[QAExample],
    dev_eval: Callable[[], Mapping[str, float]] | None,
) -> Policy:
    """The policy after the configured warm-start; the one saved in the run folder when there is one.

    With ``dev.before_training`` the untrained policy is scored on dev first, so that the run records
    where the warm-start began as well as where RL begins (step 0 of ``metrics.jsonl``).
    """
    target = config.run_dir / WARMSTART_DIR
    if target.is_dir():
        logger.info("reusing the warm-started policy in %s", target)
        return load_policy(target, device=policy.device, dtype=torch.float32)
    report: dict[str, object] = {}
    if dev_eval is not None and config.dev.before_training:
        report["dev_untrained"] = dict(dev_eval())
    started = time.perf_counter()
    examples = list(train_examples[: config.warmstart.examples])
    traces = protocol_traces(
        policy.tokenizer,
        make_env(min(len(examples), config.warmstart.batch_size)),
        examples,
        budgets=budgets,
    )
    result = supervised_warm_start(
        policy.model,
        traces,
        config.warmstart,
        pad_token_id=pad_token_id(policy.tokenizer),
        seed=config.system.seed,
        on_step=lambda step, loss: logger.info("warm-start step %d: loss %.3f", step, loss),
    )
    report |= {
        "losses": result.losses,
        "traces": result.traces,
        "policy_tokens": result.policy_tokens,
        "seconds": time.perf_counter() - started,
    }
    config.run_dir.mkdir(parents=True, exist_ok=True)
    (config.run_dir / WARMSTART_REPORT).write_text(json.dumps(report, indent=2))
    export_hf_model(policy.model, policy.tokenizer, target)
    return policy
