"""The texts the environment shows the model: the prompt, retrieved information and short notices.

Every observation after the prompt is exactly the text to append to the model's context after its action,
so it starts and ends with a blank line and never repeats earlier context.
"""

from collections.abc import Mapping

from searchgym.env.config import QUESTION_PLACEHOLDER, PromptStyle, ToolFormat
from searchgym.env.tokens import TextMeter

PROTOCOL = (
    "Answer the question below. Reason step by step inside <think> and </think> first, and again each time "
    "you receive new information. When you are missing a fact, search a Wikipedia index by writing "
    "<search> your query </search>; the best passages come back between <information> and </information>. "
    "You may search more than once. When you know the answer, write it inside <answer> and </answer> as a "
    "short phrase without explanation, for example <answer> Marie Curie </answer>."
)

# The Hermes tool-call format: the chat template lists the tools (with ``tools=``) and says how to call them.
HERMES_PROTOCOL = (
    "Answer the question below. Reason step by step first, and again each time you receive new information. "
    "When you are missing a fact, call one of your tools; its result comes back as a tool response. When "
    "you know the answer, write it inside <answer> and </answer> as a short phrase without explanation, for "
    "example <answer> Marie Curie </answer>."
)

# Chat style: this is the user message; the policy adds the chat template and the assistant turn start.
CHAT_TEMPLATE = f"{PROTOCOL}\n\nQuestion: {QUESTION_PLACEHOLDER}"
# Plain style: the whole context of a base model, ending with the cue that it continues.
PLAIN_TEMPLATE = f"{PROTOCOL}\n\nQuestion: {QUESTION_PLACEHOLDER}\n\nAssistant:"

# The one-turn baselines of the evaluation (``searchgym eval --mode direct|rag``): the same answer protocol
# without search, so that the same parser reads their answers.
DIRECT_PROTOCOL = (
    "Answer the question below from what you know. Write the answer inside <answer> and </answer> as a short "
    "phrase without explanation, for example <answer> Marie Curie </answer>."
)
RAG_PROTOCOL = (
    "Answer the question below with the help of the Wikipedia passages between <information> and "
    "</information>. Write the answer inside <answer> and </answer> as a short phrase without explanation, "
    "for example <answer> Marie Curie </answer>."
)

INFORMATION_OPEN = "\n\n<information>"
INFORMATION_CLOSE = "</information>\n\n"

LAST_TURN_NOTICE = (
    "(This is your last turn: do not search again; give your final answer inside <answer> and </answer>.)\n\n"
)
SEARCHES_SPENT_NOTICE = (
    "(You have used all your searches: give your final answer inside <answer> and </answer>.)\n\n"
)
TOOL_REFUSED_NOTICE = (
    "\n\n(Tool call refused: you have used all your calls of this tool. Give your final answer inside "
    "<answer> and </answer>.)\n\n"
)
SEARCH_REFUSED_NOTICE = (
    "\n\n(Search refused: you have used all your searches. Give your final answer inside <answer> and "
    "</answer>.)\n\n"
)


def build_prompt(
    question: str,
    *,
    style: PromptStyle,
    template: str | None = None,
    tool_format: ToolFormat = "tags",
    extra_tools: Mapping[str, str] | None = None,
) -> str:
    r"""The reset observation: the protocol and the question, inserted verbatim (never truncated).

    With the tag format, tools beside search are listed after the protocol (``<name> input </name>``:
    description); with the Hermes format the chat template lists the tools, so the text only says how to
    answer.

    Examples:
        >>> build_prompt("Who wrote Hamlet?", style="plain", template="Q: {question}\nA:")
        'Q: Who wrote Hamlet?\nA:'
        >>> build_prompt("Who wrote Hamlet?", style="chat").endswith("Question: Who wrote Hamlet?")
        True
        >>> tools = {"calculator": "Arithmetic."}
        >>> print(build_prompt("2+2?", style="chat", extra_tools=tools).split(". ")[-1])
        For other tools write <calculator> input </calculator> (Arithmetic.).
        <BLANKLINE>
        Question: 2+2?
    """
    if template is None:
        protocol = HERMES_PROTOCOL if tool_format == "hermes" else PROTOCOL
        if extra_tools and tool_format == "tags":
            listed = "; ".join(f"<{name}> input </{name}> ({text})" for name, text in extra_tools.items())
            protocol = f"{protocol} For other tools write {listed}."
        template = f"{protocol}\n\nQuestion: {QUESTION_PLACEHOLDER}"
        if style == "plain":
            template += "\n\nAssistant:"
    # str.replace, not str.format: questions and user templates may contain braces of their own.
    return template.replace(QUESTION_PLACEHOLDER, question)


def tool_result_block(text: str, *, meter: TextMeter, max_tokens: int) -> str:
    r"""A tool's text result as an ``<information>`` block, cut to ``max_tokens`` units (marked ``...``).

    Examples:
        >>> from searchgym.env.tokens import WordMeter
        >>> tool_result_block("612", meter=WordMeter(), max_tokens=64)
        '\n\n<information>612</information>\n\n'
    """
    block = f"{INFORMATION_OPEN}{text}{INFORMATION_CLOSE}"
    if meter.count(block) <= max_tokens:
        return block
    room = max(max_tokens - meter.count(f"{INFORMATION_OPEN}...{INFORMATION_CLOSE}"), 0)
    return f"{INFORMATION_OPEN}{meter.measure(text).prefix(room)}...{INFORMATION_CLOSE}"


def document_header(rank: int, title: str) -> str:
    """The line start of the ``rank``-th document (1-based) of an information block."""
    return f"Doc {rank}(Title: {title}) "


def information_block(documents: list[tuple[str, str]]) -> str:
    r"""The observation for ``(title, text)`` documents, best first, one line each.

    Examples:
        >>> information_block([("Paris", "Capital."), ("Lyon", "A city.")])
        '\n\n<information>Doc 1(Title: Paris) Capital.\nDoc 2(Title: Lyon) A city.\n</information>\n\n'
    """
    lines = "".join(
        f"{document_header(rank, title)}{text}\n" for rank, (title, text) in enumerate(documents, 1)
    )
    return f"{INFORMATION_OPEN}{lines}{INFORMATION_CLOSE}"


# Keyed by searchgym.env.actions.InvalidReason values (a refused search has its own notice above).
_INVALID_REASON_TEXT = {
    "no_tag": "no <search> or <answer> tag",
    "unclosed_tag": "a tag was opened but not closed",
    "nested_tags": "tags inside one another",
    "empty_query": "the search query is empty",
    "empty_answer": "the answer is empty",
    "empty_tool_input": "the tool input is empty",
    "bad_tool_call": "the tool call is malformed",
    "unknown_tool": "no such tool",
    "bad_arguments": "the tool arguments do not fit",
}
_HERMES_HOW_TO = (
    'To call a tool, write <tool_call>{"name": "search", "arguments": {"query": "..."}}</tool_call>; to '
    "finish, write <answer> your answer </answer>."
)


def invalid_action_notice(reason: str, *, tool_format: ToolFormat = "tags", detail: str = "") -> str:
    """The corrective observation after an invalid action: what went wrong and the protocol again.

    Examples:
        >>> print(invalid_action_notice("empty_query").strip())  # doctest: +NORMALIZE_WHITESPACE
        (Invalid action: the search query is empty. To search, write <search> your query </search>;
        to finish, write <answer> your answer </answer>.)
    """
    what = _INVALID_REASON_TEXT.get(reason, reason) + (f" ({detail})" if detail else "")
    if tool_format == "hermes":
        return f"\n\n(Invalid action: {what}. {_HERMES_HOW_TO})\n\n"
    return (
        f"\n\n(Invalid action: {what}. To search, write "
        "<search> your query </search>; to finish, write <answer> your answer </answer>.)\n\n"
    )


def build_baseline_prompt(question: str, *, style: PromptStyle, information: str | None = None) -> str:
    """The prompt of a one-turn baseline: direct (no ``information``) or RAG (an :func:`information_block`).

    The retrieved passages come before the question, formatted as the agent's observations are; the
    question is inserted verbatim. Plain style ends with the assistant's cue, as :func:`build_prompt`.

    Examples:
        >>> build_baseline_prompt("Who wrote Hamlet?", style="chat").endswith("Question: Who wrote Hamlet?")
        True
        >>> block = information_block([("Hamlet", "A play.")])
        >>> print(build_baseline_prompt("Who?", style="plain", information=block).split("</answer>.")[-1])
        <BLANKLINE>
        <BLANKLINE>
        <information>Doc 1(Title: Hamlet) A play.
        </information>
        <BLANKLINE>
        Question: Who?
        <BLANKLINE>
        Assistant:
    """
    if information is None:
        text = f"{DIRECT_PROTOCOL}\n\nQuestion: {question}"
    else:
        text = f"{RAG_PROTOCOL}{information}Question: {question}"
    return text if style == "chat" else f"{text}\n\nAssistant:"
