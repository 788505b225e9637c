"""How the policy writes a tool call and how the env's answer is framed: Search-R1 tags or Hermes JSON.

- ``tags`` (the default, Search-R1 compatible): ``<search> query </search>``, ``<calculator> 1+1
  </calculator>``; results come back as ``<information>...</information>``, appended as plain text.
- ``hermes`` (Qwen2.5 / Qwen3 / Hermes instruct models' native tool calling):
  ``<tool_call>{"name": "search", "arguments": {"query": "..."}}</tool_call>``; the prompt is rendered by
  the tokenizer's chat template with ``tools=`` (the tools' JSON schemas), and each result is a ``tool``
  message of that template (``<tool_response>...</tool_response>`` in Qwen's), appended exactly as the
  template renders it after the assistant's turn. The final answer is ``<answer> ... </answer>`` in both.

In both formats the observation is exactly the text to append after the policy's tokens, so the loss mask
is 1 on what the policy generated and 0 on everything the template or the env added (the ``<|im_end|>``
that closes the assistant's turn included, unless the policy generated it itself).
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

from searchgym.env.actions import Action, Invalid, InvalidReason, Search, ToolCall, parse_action
from searchgym.env.tools import Tool, check_arguments, primary_argument
from searchgym.errors import SearchgymError

ToolFormatName = Literal["tags", "hermes"]
Role = Literal["tool", "user"]

TOOL_CALL_TAG = "tool_call"
_ASSISTANT_SENTINEL = "\u2063ASSISTANT\u2063"
_BODY_SENTINEL = "\u2063BODY\u2063"
_TOOL_SENTINEL = "searchgym_probe_tool"


class ToolFormatError(SearchgymError):
    """The tool-call format cannot be used with this tokenizer (no chat template, or one without tools)."""


class ActionFormat(Protocol):
    """A tool-call format: the stop strings of a turn, its parser and the framing of observations."""

    @property
    def stop(self) -> tuple[str, ...]:
        """Strings that end a turn (kept in the turn)."""
        ...

    def parse(self, text: str, tools: Mapping[str, Tool]) -> Action:
        """The action of one turn; never raises."""
        ...

    def frame(self, body: str, *, action: str, role: Role) -> str:
        """The observation to append after ``action``: ``body`` as a tool result or as a user notice."""
        ...


@dataclass(frozen=True, slots=True)
class TagFormat:
    """Search-R1's tags: ``<search> q </search>``, ``<tool> text </tool>``, ``<answer> a </answer>``."""

    @property
    def stop(self) -> tuple[str, ...]:
        """The closing tags of ``search`` and ``answer`` (other tools' closing tags are added by the env)."""
        return ("</search>", "</answer>")

    def parse(self, text: str, tools: Mapping[str, Tool]) -> Action:
        """The first complete tag; a tool tag's text fills the tool's first required string argument."""
        action = parse_action(text, tuple(tools))
        if not isinstance(action, ToolCall) or not isinstance(action.arguments, str):
            return action
        argument = primary_argument(tools[action.name].parameters)
        if argument is None:
            detail = f"{action.name} takes no text argument; this format cannot call it"
            return Invalid(InvalidReason.BAD_ARGUMENTS, detail)
        return ToolCall(action.name, {argument: action.arguments})

    def frame(self, body: str, *, action: str, role: Role) -> str:
        """Tag observations are appended as they are."""
        return body


@dataclass(frozen=True, slots=True)
class HermesFormat:
    """Hermes / Qwen native tool calls, framed by the tokenizer's chat template (see the module docstring).

    Attributes:
        tool_prefix: template text between the assistant's content and a tool result's content.
        tool_suffix: template text after the tool result, up to the next assistant turn's first token.
        user_prefix: the same for a user message (the env's corrective notices).
        user_suffix: the same for a user message.
        turn_end: what closes the assistant's turn (``<|im_end|>``); left out of the observation when the
            policy generated it itself.
    """

    tool_prefix: str
    tool_suffix: str
    user_prefix: str
    user_suffix: str
    turn_end: str

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "HermesFormat":
        """Read the framing from the tokenizer's chat template.

        Raises:
            ToolFormatError: the tokenizer has no chat template, or its template drops tool messages.
        """
        if not getattr(tokenizer, "chat_template", None) or not hasattr(tokenizer, "apply_chat_template"):
            raise ToolFormatError(
                "env.tool_format=hermes needs the policy's tokenizer with a chat template that renders tool "
                "messages (Qwen2.5, Qwen3, Hermes); pass the tokenizer to the env, or use tool_format=tags"
            )
        probe = {
            "type": "function",
            "function": {"name": _TOOL_SENTINEL, "description": "", "parameters": {}},
        }
        try:
            listed = tokenizer.apply_chat_template(
                [{"role": "user", "content": "U"}], tools=[probe], tokenize=False, add_generation_prompt=True
            )
        except Exception as error:  # templates raise their own errors (jinja's)
            raise ToolFormatError(
                f"the chat template fails with tools= ({type(error).__name__}: {error})"
            ) from error
        if _TOOL_SENTINEL not in str(listed):
            raise ToolFormatError(
                "the tokenizer's chat template ignores tools=: use a model whose template supports tools "
                "(Qwen2.5, Qwen3, Hermes), set a tool-calling chat template on the tokenizer, or use "
                "env.tool_format=tags"
            )
        tool_prefix, tool_suffix = _framing(tokenizer, "tool")
        user_prefix, user_suffix = _framing(tokenizer, "user")
        closed = _render(tokenizer, [{"role": "assistant", "content": _ASSISTANT_SENTINEL}], generation=False)
        turn_end = closed.split(_ASSISTANT_SENTINEL, 1)[1].rstrip()
        return cls(tool_prefix, tool_suffix, user_prefix, user_suffix, turn_end)

    @property
    def stop(self) -> tuple[str, ...]:
        """A turn ends after a complete tool call or answer (or at the end-of-turn token)."""
        return ("</tool_call>", "</answer>")

    def parse(self, text: str, tools: Mapping[str, Tool]) -> Action:
        """The first complete ``<tool_call>`` (``{"name", "arguments"}`` JSON) or ``<answer>``; no raise."""
        action = parse_action(text, (TOOL_CALL_TAG,))
        if isinstance(action, Invalid) and action.reason == InvalidReason.EMPTY_TOOL_INPUT:
            return Invalid(InvalidReason.BAD_TOOL_CALL, "the tool call is empty")
        if not isinstance(action, ToolCall):
            return action
        return _decode_call(cast(str, action.arguments), tools)

    def frame(self, body: str, *, action: str, role: Role) -> str:
        """``body`` as a tool (or user) message of the chat template, closing the assistant's turn first."""
        prefix, suffix = (
            (self.tool_prefix, self.tool_suffix) if role == "tool" else (self.user_prefix, self.user_suffix)
        )
        if self.turn_end and action.rstrip().endswith(self.turn_end) and prefix.startswith(self.turn_end):
            prefix = prefix[len(self.turn_end) :]
        return f"{prefix}{body.strip()}{suffix}"


def _decode_call(content: str, tools: Mapping[str, Tool]) -> Action:
    """A Hermes call's JSON as an action, or why it is not one."""
    try:
        call = json.loads(content)
    except (ValueError, RecursionError):
        return Invalid(InvalidReason.BAD_TOOL_CALL, "the tool call is not valid JSON")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return Invalid(InvalidReason.BAD_TOOL_CALL, 'write {"name": ..., "arguments": {...}}')
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            arguments = None
    if not isinstance(arguments, dict):
        return Invalid(InvalidReason.BAD_TOOL_CALL, "arguments must be a JSON object")
    name = call["name"]
    if name not in tools:
        return Invalid(
            InvalidReason.UNKNOWN_TOOL, f"no tool named {name[:64]!r}; the tools are {', '.join(tools)}"
        )
    problem = check_arguments(arguments, tools[name].parameters)
    if problem is not None:
        return Invalid(InvalidReason.BAD_ARGUMENTS, problem)
    if name == "search":
        query = str(arguments["query"]).strip()
        return Search(query) if query else Invalid(InvalidReason.EMPTY_QUERY)
    return ToolCall(name, arguments)


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation: bool) -> str:
    conversation = [{"role": "user", "content": "U"}, *messages]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation)
    except Exception as error:  # templates raise their own errors (jinja's, or "roles must alternate")
        raise ToolFormatError(
            f"the tokenizer's chat template cannot render tool calls ({type(error).__name__}: {error}): use "
            "a model whose template supports tools (Qwen2.5, Qwen3, Hermes) or env.tool_format=tags"
        ) from error
    return str(text)


def _framing(tokenizer: Any, role: Role) -> tuple[str, str]:
    """The template text before and after a ``role`` message's content, after an assistant turn."""
    messages = [
        {"role": "assistant", "content": _ASSISTANT_SENTINEL},
        {"role": role, "content": _BODY_SENTINEL},
    ]
    text = _render(tokenizer, messages, generation=True)
    if _ASSISTANT_SENTINEL not in text or _BODY_SENTINEL not in text.split(_ASSISTANT_SENTINEL, 1)[1]:
        raise ToolFormatError(
            f"the tokenizer's chat template drops {role} messages: use a model whose template supports tools "
            "(Qwen2.5, Qwen3, Hermes) or env.tool_format=tags"
        )
    after = text.split(_ASSISTANT_SENTINEL, 1)[1]
    prefix, suffix = after.split(_BODY_SENTINEL, 1)
    return prefix, suffix


def make_format(name: ToolFormatName, tokenizer: Any | None) -> ActionFormat:
    """The format named by ``EnvConfig.tool_format``.

    Raises:
        ToolFormatError: ``hermes`` without a tokenizer whose chat template renders tool messages.
    """
    if name == "tags":
        return TagFormat()
    return HermesFormat.from_tokenizer(tokenizer)
