"""A tiny word-level tokenizer, a tiny random Llama and a toy one-turn rollout for the trainer's tests.

The toy task: the policy writes two tokens, the "environment" answers with two observation tokens, the
policy writes two more. The reward is 1 when the policy wrote the target token at least once (a random
policy does so about one time in five), else 0. Observation tokens include the target: they must not earn
the policy anything, since they are not its actions.
"""

import dataclasses
import os
import signal
import sys
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from searchgym.env.data import QAExample
from searchgym.env.outcome import EpisodeOutcome
from searchgym.paths import CONFIGS_DIR
from searchgym.policy.generation import SamplingParams
from searchgym.policy.models import Policy
from searchgym.policy.trajectory import Trajectory, TurnRecord
from searchgym.train.config import TrainConfig, load_config
from searchgym.train.learner import LocalLearner, single_process_learner
from searchgym.train.loop import TrainResult, train

WORDS = [f"w{i}" for i in range(21)]
VOCABULARY = ["<pad>", "<eos>", "<unk>", *WORDS]
TARGET = "w7"
OBSERVATION = ("w7", "w3")
TURN_TOKENS = 2


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCABULARY)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_model(seed: int = 0) -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=len(VOCABULARY),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def toy_examples(count: int) -> list[QAExample]:
    """Examples whose question is a few words (prompts differ in length, to exercise padding)."""
    return [
        QAExample(
            id=f"q{i}",
            question=" ".join(WORDS[(i + j) % 5 + 10] for j in range(2 + i % 3)),
            golden_answers=(),
        )
        for i in range(count)
    ]


@torch.no_grad()
def _sample(
    model: PreTrainedModel, context: torch.Tensor, count: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, count) tokens sampled after ``context`` (B, L) (all rows the same length), or greedy at 0, and
    (B, count) their log-probs under the distribution they were drawn from (the raw one when greedy)."""
    tokens, logprobs = context, []
    for _ in range(count):
        logits = model(input_ids=tokens, use_cache=False).logits[:, -1].float()
        log_probs = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)
        if temperature == 0:
            step = logits.argmax(dim=-1, keepdim=True)
        else:
            step = torch.multinomial(log_probs.exp(), 1)
        logprobs.append(log_probs.gather(-1, step))
        tokens = torch.cat([tokens, step], dim=-1)
    return tokens[:, context.shape[1] :], torch.cat(logprobs, dim=-1)


class SimulatedCrash(RuntimeError):
    """Raised by the toy rollout to stop a run mid-way, as a crash would."""


class TargetTokenRollout:
    """A :class:`searchgym.train.loop.Rollout`: two policy turns around an observation, reward for the target.

    It samples with the global torch generator at the request's temperature (0: greedy, for evaluation),
    when a request is submitted: with the weights of the last sync, as the protocol asks, even when the
    loop submits the next step's request before the learner updates. It records the log-probs of the
    distribution each token was drawn from.

    Args:
        temperature: sample training requests at this temperature instead of the requested one: a sampler
            that deliberately differs from the trainer (greedy requests stay greedy).
        missing_reward_ids: example ids whose reward is reported as missing (None).
        crash_at_step: raise :class:`SimulatedCrash` when asked for this step's episodes.
        kill_at_step: kill the process with SIGKILL (kill -9) when asked for this step's episodes.
    """

    def __init__(
        self,
        *,
        temperature: float | None = None,
        missing_reward_ids: Sequence[str] = (),
        crash_at_step: int | None = None,
        kill_at_step: int | None = None,
    ) -> None:
        self.temperature = temperature
        self.missing_reward_ids = set(missing_reward_ids)
        self.crash_at_step = crash_at_step
        self.kill_at_step = kill_at_step
        self.model: PreTrainedModel | None = None
        self.tokenizer = tiny_tokenizer()
        self._done: deque[list[Trajectory]] = deque()
        self.events: list[tuple[str, int]] = []

    def sync_weights(self, learner: LocalLearner) -> None:
        self.model = learner.models.policy
        self.events.append(("sync", 0))

    def submit(
        self, examples: Sequence[QAExample], *, sampling: SamplingParams, step: int, batch_size: int
    ) -> None:
        training = sampling.temperature > 0
        if step == self.crash_at_step and training:
            raise SimulatedCrash(f"crash at step {step}")
        if step == self.kill_at_step and training:
            os.kill(os.getpid(), signal.SIGKILL)
        temperature = self.temperature if training and self.temperature is not None else sampling.temperature
        assert self.model is not None
        self.events.append(("submit", step))
        self._done.append([self._episode(self.model, example, temperature) for example in examples])

    def collect(self) -> list[Trajectory]:
        self.events.append(("collect", 0))
        return self._done.popleft()

    def _episode(self, model: PreTrainedModel, example: QAExample, temperature: float) -> Trajectory:
        tokenizer = self.tokenizer
        prompt = tokenizer(example.question)["input_ids"]
        observation = tokenizer.convert_tokens_to_ids(list(OBSERVATION))
        first_ids, first_logprobs = _sample(model, torch.tensor([prompt]), TURN_TOKENS, temperature)
        first = first_ids[0].tolist()
        context = torch.tensor([prompt + first + observation])
        second_ids, second_logprobs = _sample(model, context, TURN_TOKENS, temperature)
        second = second_ids[0].tolist()
        target = tokenizer.convert_tokens_to_ids(TARGET)
        hit = float(target in first + second)
        missing = example.id in self.missing_reward_ids
        return Trajectory(
            example_id=example.id,
            group_id=example.id,
            prompt_ids=prompt,
            response_ids=first + observation + second,
            loss_mask=[1] * TURN_TOKENS + [0] * len(observation) + [1] * TURN_TOKENS,
            turn_index=[0] * (TURN_TOKENS + len(observation)) + [1] * TURN_TOKENS,
            sampler_logprobs=[
                *first_logprobs[0].tolist(),
                *[0.0] * len(observation),
                *second_logprobs[0].tolist(),
            ],
            outcome=EpisodeOutcome(
                answer=tokenizer.decode(second),
                end_reason="answered",
                reward=None if missing else hit,
                reward_error="left out by the test" if missing else None,
                em=hit,
                num_searches=1,
                num_turns=2,
                well_formed=True,
            ),
            turns=[
                TurnRecord(
                    action_type="search", text=tokenizer.decode(first), query="w7", num_policy_tokens=2
                ),
                TurnRecord(action_type="answer", text=tokenizer.decode(second), num_policy_tokens=2),
            ],
        )


def toy_episodes(
    model: PreTrainedModel, examples: Sequence[QAExample], temperature: float = 1.0
) -> list[Trajectory]:
    """One toy episode per example, sampled from ``model`` (outside any training run)."""
    rollout = TargetTokenRollout()
    return [rollout._episode(model, example, temperature) for example in examples]


def with_reward(trajectory: Trajectory, reward: float | None) -> Trajectory:
    """A copy of ``trajectory`` whose outcome has another reward."""
    return dataclasses.replace(trajectory, outcome=dataclasses.replace(trajectory.outcome, reward=reward))


DEV_EXAMPLES = 4
"""Fixed questions of the toy task's dev evaluation (greedy; ``em`` is the target hit rate)."""


def learner_config(*overrides: str) -> TrainConfig:
    """configs/tiny.yaml for a learner step on 8 toy episodes: 4 questions x 2 samples, micro-batches of 4."""
    return load_config(
        CONFIGS_DIR / "tiny.yaml",
        [
            "batch.prompts_per_step=4",
            "batch.mini_batch_prompts=4",
            "batch.micro_batch_size=4",
            "rollout.samples_per_prompt=2",
            "optim.actor_lr=1e-2",
            "optim.critic_lr=1e-2",
            *overrides,
        ],
    )


def toy_config(run_dir: Path, *overrides: str) -> TrainConfig:
    """configs/tiny.yaml for the toy task in ``run_dir``: PPO with critic, reference and dev evaluation."""
    return load_config(
        CONFIGS_DIR / "tiny.yaml",
        [
            f"logging.run_dir={run_dir}",
            "total_steps=4",
            "batch.prompts_per_step=4",
            "batch.mini_batch_prompts=2",
            "batch.micro_batch_size=2",
            "optim.actor_lr=1e-2",
            "optim.critic_lr=1e-2",
            "logging.tensorboard=false",
            "logging.plots=false",
            *overrides,
        ],
    )


def run_toy(
    run_dir: Path,
    *overrides: str,
    rollout: TargetTokenRollout | None = None,
    policy: PreTrainedModel | None = None,
) -> TrainResult:
    """Train a fresh tiny model on the toy task (resuming from ``run_dir`` when it holds a checkpoint)."""
    config = toy_config(run_dir, *overrides)
    model = policy if policy is not None else tiny_model()
    tokenizer = tiny_tokenizer()
    return train(
        config,
        learner=single_process_learner(config, Policy(model, tokenizer, name="tiny")),
        rollout=rollout or TargetTokenRollout(),
        tokenizer=tokenizer,
        train_examples=toy_examples(6),
        dev_examples=toy_examples(DEV_EXAMPLES),
    )


if __name__ == "__main__":
    # python tests/train_fixtures.py RUN_DIR KILL_AT_STEP [OVERRIDE ...]: a toy run that kills itself with
    # SIGKILL when it submits the request of step KILL_AT_STEP.
    torch.set_num_threads(1)
    run_toy(Path(sys.argv[1]), *sys.argv[3:], rollout=TargetTokenRollout(kill_at_step=int(sys.argv[2])))
