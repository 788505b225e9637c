"""Fakes for the policy tests: a generator that plays scripted turns with deliberately odd token ids."""

from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from searchgym.policy.generation import Generation, SamplingParams, token_limits

SCRIPTED_LOGPROB = -0.5


@dataclass
class ScriptedGenerator:
    """Plays, for each question, a fixed list of turn texts, one per turn of each episode.

    The turn of a prompt is found from the contexts it continued: a context that extends one this
    generator answered at turn ``t`` is at turn ``t + 1``, so repeated questions replay their script.

    The ids of a turn are its text tokenized one character at a time, which is NOT how the tokenizer
    would tokenize the whole text: a rollout that decoded and re-tokenized the policy's output would
    change them, and the tests would see it. A turn longer than its token limit is cut there
    (``"length"``), as a real backend would.

    Attributes:
        tokenizer: the policy tokenizer.
        scripts: question -> the texts of its turns, in order.
        calls: per call, the token limit given to each prompt.
        request_seeds: per call, each prompt's seed as vLLM derives it (the call's seed plus the
            prompt's position); None for unseeded calls.
        generated: question -> the ids produced for each of its turns, in call order.
    """

    tokenizer: PreTrainedTokenizerBase
    scripts: dict[str, list[str]]
    calls: list[list[int]] = field(default_factory=list)
    request_seeds: list[list[int] | None] = field(default_factory=list)
    generated: dict[str, list[list[int]]] = field(default_factory=dict)
    answered: list[tuple[tuple[int, ...], int]] = field(default_factory=list)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        limits = token_limits(len(prompts), params, max_new_tokens)
        self.calls.append(limits)
        seeds = None if params.seed is None else [params.seed + i for i in range(len(prompts))]
        self.request_seeds.append(seeds)
        return [self._turn(prompt, limit) for prompt, limit in zip(prompts, limits, strict=True)]

    def _turn(self, prompt: Sequence[int], limit: int) -> Generation:
        context = self.tokenizer.decode(list(prompt))
        question = next(q for q in self.scripts if q in context)
        turn = self._turn_of(tuple(prompt))
        text = self.scripts[question][turn]
        ids = [i for char in text for i in self.tokenizer.encode(char, add_special_tokens=False)]
        reason = "length" if len(ids) > limit else "stop"
        ids = ids[:limit]
        self.generated.setdefault(question, []).append(ids)
        self.answered.append(((*prompt, *ids), turn))
        return Generation(token_ids=ids, logprobs=[SCRIPTED_LOGPROB] * len(ids), finish_reason=reason)

    def _turn_of(self, prompt: tuple[int, ...]) -> int:
        earlier = [turn for done, turn in self.answered if prompt[: len(done)] == done]
        return max(earlier) + 1 if earlier else 0
