"""The outcome reward as a registry of functions: the built-in metrics and your own, picked by config.

A reward function takes one :class:`RewardContext` (the question, the gold answers, the final answer, the
whole episode's text and what the episode did) and returns a float, or :class:`NoReward` (or None) when it
cannot score the episode. ``EnvConfig.reward_fn`` names one function or a weighted sum of several:

- a built-in name: ``"em"``, ``"f1"``, ``"cover_em"`` (the pure metrics of :mod:`searchgym.env.rewards`);
- an import path ``"package.module:function"`` of any importable module (your own package, or a module on
  ``PYTHONPATH``);
- a weighted sum, as a list ``["0.8*f1", "0.2*mypkg.rewards:brevity"]`` or one string
  ``"0.8*f1 + 0.2*mypkg.rewards:brevity"``.

A function that raises, returns NaN or infinity, or returns something other than a number is not trusted:
the episode's reward is missing (``reward`` None, ``reward_error`` says which function and why) and the
trainer masks it from the update, exactly as for an example without gold answers.
"""

import functools
import importlib
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from searchgym.env.data import QAExample
from searchgym.env.rewards import cover_exact_match, exact_match, f1_score
from searchgym.errors import SearchgymError


class RewardFnError(SearchgymError, ValueError):
    """A reward function spec cannot be resolved (bad syntax, module not found, not callable)."""


@dataclass(frozen=True, slots=True)
class EpisodeFacts:
    """What an episode did, before it is scored (the reward functions' view of the episode outcome).

    Attributes:
        end_reason: ``"answered"``, ``"max_turns"``, ``"retriever_error"``, ``"context_budget"``, ...
        well_formed: every action was valid and the episode ended with an answer.
        num_turns: actions the policy took.
        tool_calls: per tool name, the calls carried out (``{"search": 2, "fetch": 1}``).
        retrieved_ids: ids of every passage shown to the policy, in order.
        retrieved_texts: their texts, in the same order.
    """

    end_reason: str
    well_formed: bool
    num_turns: int = 0
    tool_calls: Mapping[str, int] = field(default_factory=dict)
    retrieved_ids: tuple[str, ...] = ()
    retrieved_texts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RewardContext:
    """Everything a reward function may read about one finished episode.

    Attributes:
        question: the question, as the example gives it.
        golden_answers: the gold answers (never empty: an example without them is not scored).
        answer: the final answer, or None when the episode ended without one.
        trajectory: the whole episode as text: prompt, actions and observations, in order.
        episode: what the episode did (turns, tool calls, retrieved passages, why it ended).
        example: the QA example itself (its ``source``, ``gold_doc_ids`` and ``extra`` fields).
    """

    question: str
    golden_answers: tuple[str, ...]
    answer: str | None
    trajectory: str
    episode: EpisodeFacts
    example: QAExample


@dataclass(frozen=True, slots=True)
class NoReward:
    """What a reward function returns when it cannot score an episode; ``reason`` ends up in the logs."""

    reason: str


RewardValue = float | NoReward | None


class RewardFn(Protocol):
    """A reward function: ``def my_reward(context: RewardContext) -> float | NoReward | None``."""

    def __call__(self, context: RewardContext, /) -> RewardValue:
        """Score one episode; NoReward (or None) when it cannot."""
        ...


def _em(context: RewardContext) -> float:
    return exact_match(context.answer, context.golden_answers)


def _f1(context: RewardContext) -> float:
    return f1_score(context.answer, context.golden_answers)


def _cover_em(context: RewardContext) -> float:
    return cover_exact_match(context.answer, context.golden_answers)


BUILTIN_REWARDS: Mapping[str, RewardFn] = {"em": _em, "f1": _f1, "cover_em": _cover_em}
"""The built-in entries of the registry (Search-R1's outcome metrics)."""


@dataclass(frozen=True, slots=True)
class RewardTerm:
    """One function of a weighted sum: ``weight * function(context)``.

    Attributes:
        spec: the name or import path as configured (the key of its part in the logs).
        weight: its weight in the sum.
    """

    spec: str
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class OutcomeScore:
    """The outcome reward of one episode: the weighted sum, its parts, or why it is missing.

    Attributes:
        value: ``sum(weight * part)``, or None when some part could not be computed.
        parts: each function's unweighted value, by spec (those that returned a number).
        error: why ``value`` is None, naming the function.
    """

    value: float | None
    parts: Mapping[str, float]
    error: str | None = None


_TERM = re.compile(r"^\s*(?:([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*\s*)?(\S+?)\s*$")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def parse_reward_spec(spec: str | Sequence[str]) -> tuple[RewardTerm, ...]:
    """The terms of a reward spec: one name or path, ``"w*spec + w*spec"``, or a list of ``"w*spec"``.

    Raises:
        RewardFnError: a term is neither a built-in name nor ``package.module:function``.

    Examples:
        >>> parse_reward_spec("0.8*f1 + 0.2*mypkg.rewards:brevity")
        (RewardTerm(spec='f1', weight=0.8), RewardTerm(spec='mypkg.rewards:brevity', weight=0.2))
        >>> parse_reward_spec(["em"])
        (RewardTerm(spec='em', weight=1.0),)
    """
    items = spec.split("+") if isinstance(spec, str) else list(spec)
    if not items or not any(item.strip() for item in items):
        raise RewardFnError("the reward spec is empty: name a function, e.g. reward_fn=em")
    terms = []
    for item in items:
        match = _TERM.match(item)
        name = match.group(2) if match else ""
        if not match or not (name in BUILTIN_REWARDS or _IMPORT_PATH.match(name)):
            raise RewardFnError(
                f"reward term {item.strip()!r}: write a built-in name ({', '.join(BUILTIN_REWARDS)}) or "
                "package.module:function, optionally weighted as 0.5*name"
            )
        terms.append(RewardTerm(spec=name, weight=float(match.group(1)) if match.group(1) else 1.0))
    if len({term.spec for term in terms}) != len(terms):
        raise RewardFnError(f"reward spec {spec!r} names a function twice: give each function once")
    return tuple(terms)


@functools.cache
def resolve_reward_fn(spec: str) -> RewardFn:
    """The function a spec names: a built-in, or the attribute ``function`` of ``package.module``.

    Raises:
        RewardFnError: the module cannot be imported, has no such attribute, or it is not callable.
    """
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RewardFnError(
            f"reward function {spec!r}: cannot import {module_name!r} ({error}); install the package or "
            "put its folder on PYTHONPATH"
        ) from error
    function = getattr(module, attribute, None)
    if not callable(function):
        raise RewardFnError(f"reward function {spec!r}: {module_name} has no callable {attribute!r}")
    return function


def score_outcome(terms: Sequence[RewardTerm], context: RewardContext) -> OutcomeScore:
    """Call every term's function on ``context`` and sum the weighted values.

    A function that raises, or returns NaN, infinity, None, :class:`NoReward` or a non-number, makes the
    whole outcome missing, with the reason; the other parts are still reported.
    """
    parts: dict[str, float] = {}
    errors: list[str] = []
    for term in terms:
        value, error = _call(term.spec, context)
        if error is None and value is not None:
            parts[term.spec] = value
        else:
            errors.append(f"{term.spec}: {error}")
    if errors:
        return OutcomeScore(value=None, parts=parts, error="; ".join(errors))
    return OutcomeScore(value=sum(term.weight * parts[term.spec] for term in terms), parts=parts)


def _call(spec: str, context: RewardContext) -> tuple[float | None, str | None]:
    """One function's value, or None and why it has none (its exceptions are caught on purpose)."""
    try:
        value = resolve_reward_fn(spec)(context)
    except Exception as error:  # a user's function must not crash a batch of episodes
        return None, f"raised {type(error).__name__}: {error}"
    if value is None:
        return None, "returned None"
    if isinstance(value, NoReward):
        return None, value.reason
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None, f"returned {type(value).__name__}, not a float"
    if not math.isfinite(float(value)):
        return None, f"returned {value}"
    return float(value), None
