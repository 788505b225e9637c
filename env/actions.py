"""Parsing one turn of the model's text into the action it takes (the tag format).

The protocol: ``<search> query </search>`` asks the search engine, ``<answer> text </answer>`` ends the
episode; anything else (``<think>`` blocks included) is free text around them. Other tools are called the
same way, ``<calculator> 2 + 2 </calculator>`` (see :mod:`searchgym.env.tools`);
:mod:`searchgym.env.formats` holds the Hermes JSON format beside this one.
"""

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


@functools.cache
def _tag_pattern(names: tuple[str, ...]) -> re.Pattern[str]:
    # Tags are matched case-insensitively, with optional whitespace inside the brackets: "< /Search >".
    alternatives = "|".join(re.escape(name) for name in names)
    return re.compile(rf"<\s*(/?)\s*({alternatives})\s*>", re.IGNORECASE)


class InvalidReason(StrEnum):
    """Why a turn's text is not a usable action (the values are stable names for logs and metrics)."""

    NO_TAG = "no_tag"
    UNCLOSED_TAG = "unclosed_tag"
    NESTED_TAGS = "nested_tags"
    EMPTY_QUERY = "empty_query"
    EMPTY_ANSWER = "empty_answer"
    EMPTY_TOOL_INPUT = "empty_tool_input"
    BAD_TOOL_CALL = "bad_tool_call"
    UNKNOWN_TOOL = "unknown_tool"
    BAD_ARGUMENTS = "bad_arguments"


@dataclass(frozen=True, slots=True)
class Search:
    """Ask the search engine; ``query`` is stripped of surrounding whitespace and never empty."""

    query: str


@dataclass(frozen=True, slots=True)
class Answer:
    """The final answer; ``text`` is stripped of surrounding whitespace and never empty."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    """Call a tool other than search (or any tool, in the Hermes format).

    Attributes:
        name: the tool's name.
        arguments: its arguments (the JSON object of a Hermes call), or the text of a tag (the tag format;
            the env passes it as the tool's first required string argument).
    """

    name: str
    arguments: Mapping[str, Any] | str = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Invalid:
    """The text holds no usable action; ``detail`` says more when the reason alone does not."""

    reason: InvalidReason
    detail: str = ""


Action = Search | Answer | ToolCall | Invalid


@dataclass(frozen=True, slots=True)
class _Tag:
    name: str
    closing: bool
    start: int
    end: int


def parse_action(text: str, tools: tuple[str, ...] = ("search",)) -> Action:
    """The action in one turn of model text: the first complete tag wins.

    ``tools`` are the tag names of the env's tools; ``search`` gives :class:`Search`, any other tool a
    :class:`ToolCall` with the tag's text as its arguments.

    Rules, in order:

    - The winner is the earliest-opening ``<search>`` or ``<answer>`` tag that has a matching closing tag
      later in the text; later tags are ignored (several tags: the first complete one wins).
    - If the winner's content holds another protocol tag, the turn is ``Invalid(NESTED_TAGS)``.
    - An empty (all-whitespace) content gives ``Invalid(EMPTY_QUERY)`` or ``Invalid(EMPTY_ANSWER)``.
    - With no complete tag: ``Invalid(UNCLOSED_TAG)`` if a tag was opened, else ``Invalid(NO_TAG)``.

    Tag names are case-insensitive and may have spaces inside the brackets. The scan is linear in the
    length of the text and never raises.

    Examples:
        >>> parse_action("<think>who?</think> <search> capital of France </search>")
        Search(query='capital of France')
        >>> parse_action("<ANSWER>Paris</Answer> <answer>Lyon</answer>")
        Answer(text='Paris')
        >>> parse_action("<search> capital of France")
        Invalid(reason=<InvalidReason.UNCLOSED_TAG: 'unclosed_tag'>, detail='')
    """
    names = ("answer", *tools)
    tags = [
        _Tag(match.group(2).lower(), bool(match.group(1)), match.start(), match.end())
        for match in _tag_pattern(names).finditer(text)
    ]
    if not tags:
        return Invalid(InvalidReason.NO_TAG)
    closer = _first_closer_after_each(tags, names)
    for index, tag in enumerate(tags):
        close_index = closer[index]
        if tag.closing or close_index is None:
            continue
        if close_index != index + 1:
            return Invalid(InvalidReason.NESTED_TAGS)
        content = text[tag.end : tags[close_index].start].strip()
        if tag.name == "search":
            return Search(content) if content else Invalid(InvalidReason.EMPTY_QUERY)
        if tag.name == "answer":
            return Answer(content) if content else Invalid(InvalidReason.EMPTY_ANSWER)
        return ToolCall(tag.name, content) if content else Invalid(InvalidReason.EMPTY_TOOL_INPUT)
    has_opening = any(not tag.closing for tag in tags)
    return Invalid(InvalidReason.UNCLOSED_TAG if has_opening else InvalidReason.NO_TAG)


def _first_closer_after_each(tags: list[_Tag], names: tuple[str, ...]) -> list[int | None]:
    """For each tag, the index of the first closing tag of the same name after it (None if there is none)."""
    next_closer: dict[str, int | None] = dict.fromkeys((name.lower() for name in names), None)
    result: list[int | None] = [None] * len(tags)
    for index in range(len(tags) - 1, -1, -1):
        tag = tags[index]
        result[index] = next_closer[tag.name]
        if tag.closing:
            next_closer[tag.name] = index
    return result
