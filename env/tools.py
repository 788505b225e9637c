"""Tools the policy may call: the retriever is one, a calculator another, and yours come from config.

A tool is anything with a ``name``, a ``description``, a JSON schema of its arguments (``parameters``, the
OpenAI / Hermes function-calling shape) and a batched ``call``: the vector env gathers every call of a step
to one tool and makes ONE ``call`` with all their arguments, as it does for the retriever's searches.

``EnvConfig.tools`` lists the tools of an episode: built-in names (``"search"``, ``"calculator"``) or import
paths ``"package.module:factory"``, where ``factory`` (a class or a function) is called with one
:class:`ToolSetup` and returns a :class:`Tool`. With the tag format a tool is called as
``<name> text </name>`` and the text fills its first required string argument; with the Hermes format as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.
"""

import ast
import functools
import importlib
import math
import operator
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from searchgym.env.retrieval import retrieve_batch
from searchgym.errors import SearchgymError
from searchgym.retriever.base import Passage, Retriever


class ToolSpecError(SearchgymError, ValueError):
    """A configured tool cannot be built (unknown name, import error, not a tool)."""


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What one call of a tool gave back.

    Attributes:
        text: the observation's body (the env wraps it in the format's tags and fits its budget).
        passages: retrieved passages, shown as an ``<information>`` block of documents trimmed to the
            observation budget (the search tool; ``text`` is then unused).
        error: why the call failed; a failed call ends the episode without a reward (as a failed
            retriever does), so a flaky service never trains the policy on a wrong observation.
        latency_s: wall-clock seconds of the batched call this call was part of.
    """

    text: str = ""
    passages: tuple[Passage, ...] = ()
    error: str | None = None
    latency_s: float = 0.0


class Tool(Protocol):
    """A tool of the environment (see the module docstring)."""

    @property
    def name(self) -> str:
        """What the policy calls it by (a tag name: letters, digits and ``_``)."""
        ...

    @property
    def description(self) -> str:
        """One or two sentences for the chat template's tool list."""
        ...

    @property
    def parameters(self) -> Mapping[str, Any]:
        """JSON schema of the arguments: ``{"type": "object", "properties": {...}, "required": [...]}``."""
        ...

    def call(self, arguments: Sequence[Mapping[str, Any]]) -> list[ToolResult]:
        """One result per call, in order; the arguments were checked against ``parameters``."""
        ...


@dataclass(frozen=True, slots=True)
class ToolSetup:
    """What a tool factory is given: the env's retriever and settings.

    Attributes:
        retriever: the retriever of the env.
        topk: passages per search (``EnvConfig.topk``).
    """

    retriever: Retriever
    topk: int


def string_argument(name: str, description: str) -> dict[str, Any]:
    """The JSON schema of a tool with one required string argument."""
    return {
        "type": "object",
        "properties": {name: {"type": "string", "description": description}},
        "required": [name],
    }


@dataclass(frozen=True, slots=True)
class SearchTool:
    """The retriever as a tool: ``search(query)`` returns the ``topk`` best passages."""

    retriever: Retriever
    topk: int
    name: str = "search"
    description: str = "Search a Wikipedia index; returns the best passages for the query."

    @property
    def parameters(self) -> Mapping[str, Any]:
        """One string argument, ``query``."""
        return string_argument("query", "what to search for")

    def call(self, arguments: Sequence[Mapping[str, Any]]) -> list[ToolResult]:
        """All queries in ONE retriever call; a failure fails every query of the call."""
        results = retrieve_batch(self.retriever, [str(args["query"]) for args in arguments], self.topk)
        return [ToolResult(passages=r.passages, error=r.error, latency_s=r.latency_s) for r in results]


_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_EXPRESSION_CHARS = 200
_MAX_EXPONENT = 100


@dataclass(frozen=True, slots=True)
class CalculatorTool:
    """Arithmetic on numbers (``+ - * / // % **``, parentheses): dates and quantities in QA need it.

    Deterministic and offline. A malformed expression is an observation that says so, not an error.
    """

    name: str = "calculator"
    description: str = "Evaluate an arithmetic expression such as (1969 - 1918) * 12."

    @property
    def parameters(self) -> Mapping[str, Any]:
        """One string argument, ``expression``."""
        return string_argument("expression", "numbers, + - * / // % ** and parentheses")

    def call(self, arguments: Sequence[Mapping[str, Any]]) -> list[ToolResult]:
        """Each expression's value (integers without a decimal point, others to 10 significant digits)."""
        start = time.perf_counter()
        texts = [calculate(str(args["expression"])) for args in arguments]
        latency = time.perf_counter() - start
        return [ToolResult(text=text, latency_s=latency) for text in texts]


def calculate(expression: str) -> str:
    """The value of an arithmetic expression as text, or a message saying why there is none.

    Examples:
        >>> calculate("(1969 - 1918) * 12")
        '612'
        >>> calculate("10 / 4")
        '2.5'
        >>> calculate("2 ** 1000")
        'error: exponent too large (at most 100)'
        >>> calculate("__import__('os')")
        'error: only numbers, + - * / // % ** and parentheses are allowed'
    """
    if len(expression) > _MAX_EXPRESSION_CHARS:
        return f"error: expression longer than {_MAX_EXPRESSION_CHARS} characters"
    try:
        value = _evaluate(ast.parse(expression.strip(), mode="eval").body)
    except SyntaxError:
        return "error: not an arithmetic expression"
    except ZeroDivisionError:
        return "error: division by zero"
    except (ValueError, OverflowError, TypeError) as error:
        return f"error: {error}"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(value) if isinstance(value, int) else f"{value:.10g}"


def _evaluate(node: ast.expr) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return cast(float, node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return cast(float, _UNARY[type(node.op)](_evaluate(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ValueError(f"exponent too large (at most {_MAX_EXPONENT})")
        value = _BINARY[type(node.op)](left, right)
        if isinstance(value, complex) or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError("the result is not a finite real number")
        return cast(float, value)
    raise ValueError("only numbers, + - * / // % ** and parentheses are allowed")


BUILTIN_TOOLS: Mapping[str, Callable[[ToolSetup], Tool]] = {
    "search": lambda setup: SearchTool(setup.retriever, setup.topk),
    "calculator": lambda setup: CalculatorTool(),
}
"""Built-in tools by name: each builds its tool from a :class:`ToolSetup`."""


def build_tools(specs: Sequence[str], setup: ToolSetup) -> dict[str, Tool]:
    """The tools named by ``specs``, by their names.

    Raises:
        ToolSpecError: an unknown name, an import that fails, something that is not a tool, or two tools
            with one name.
    """
    tools: dict[str, Tool] = {}
    for spec in specs:
        tool = resolve_tool_factory(spec)(setup)
        missing = [attr for attr in ("name", "description", "parameters", "call") if not hasattr(tool, attr)]
        if missing:
            raise ToolSpecError(
                f"tool {spec!r} built {type(tool).__name__}, which has no {', '.join(missing)}"
            )
        if not tool.name.isidentifier() or tool.name == "answer":
            raise ToolSpecError(
                f"tool {spec!r} is named {tool.name!r}: use letters, digits and _ (not answer)"
            )
        if tool.name in tools:
            raise ToolSpecError(f"two tools are named {tool.name!r}: list each tool once in env.tools")
        tools[tool.name] = tool
    return tools


@functools.cache
def resolve_tool_factory(spec: str) -> Callable[[ToolSetup], Tool]:
    """The factory a spec names: a built-in, or the attribute ``factory`` of ``package.module``.

    Raises:
        ToolSpecError: the spec is neither, or the import fails.
    """
    if spec in BUILTIN_TOOLS:
        return BUILTIN_TOOLS[spec]
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute.isidentifier():
        raise ToolSpecError(
            f"tool {spec!r}: write a built-in name ({', '.join(BUILTIN_TOOLS)}) or package.module:Factory"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ToolSpecError(
            f"tool {spec!r}: cannot import {module_name!r} ({error}); install it or put it on PYTHONPATH"
        ) from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ToolSpecError(f"tool {spec!r}: {module_name} has no callable {attribute!r}")
    return cast(Callable[[ToolSetup], Tool], factory)


def check_arguments(arguments: Mapping[str, Any], schema: Mapping[str, Any]) -> str | None:
    """Why ``arguments`` do not fit the top level of a JSON schema (required keys, basic types), or None.

    Examples:
        >>> check_arguments({"query": "x"}, string_argument("query", ""))
        >>> check_arguments({"query": 3}, string_argument("query", ""))
        "argument 'query' must be a string"
    """
    for key in schema.get("required", ()):
        if key not in arguments:
            return f"missing argument {key!r}"
    properties = schema.get("properties", {})
    for key, value in arguments.items():
        if key not in properties:
            return f"unknown argument {key!r}"
        expected = properties[key].get("type")
        if expected in _JSON_TYPES and not _JSON_TYPES[expected](value):
            return f"argument {key!r} must be a{'n' if expected[0] in 'aeiou' else ''} {expected}"
    return None


_JSON_TYPES: Mapping[str, Callable[[Any], bool]] = {
    "string": lambda value: isinstance(value, str),
    "integer": lambda value: isinstance(value, int) and not isinstance(value, bool),
    "number": lambda value: isinstance(value, int | float) and not isinstance(value, bool),
    "boolean": lambda value: isinstance(value, bool),
    "array": lambda value: isinstance(value, list),
    "object": lambda value: isinstance(value, dict),
}


def primary_argument(schema: Mapping[str, Any]) -> str | None:
    """The argument a tag's text fills: the first required string argument (None if there is none)."""
    properties = schema.get("properties", {})
    for key in schema.get("required", ()):
        if properties.get(key, {}).get("type") == "string":
            return str(key)
    return None


def tool_schema(tool: Tool) -> dict[str, Any]:
    """The tool as the ``tools=`` entry of a chat template (OpenAI function-calling shape)."""
    return {
        "type": "function",
        "function": {"name": tool.name, "description": tool.description, "parameters": dict(tool.parameters)},
    }


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """One call the env is about to make: the tool's name and its checked arguments."""

    name: str
    arguments: Mapping[str, Any]


def call_batched(tools: Mapping[str, Tool], requests: Sequence[ToolRequest]) -> list[ToolResult]:
    """The results of ``requests``, in order, with ONE ``call`` per tool for all of its requests.

    A tool that raises, or returns the wrong number of results, fails each of its requests with the error
    (caught on purpose: one tool's failure must end the episodes that asked for it, not the batch).
    """
    results: list[ToolResult | None] = [None] * len(requests)
    by_tool: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
        by_tool.setdefault(request.name, []).append(index)
    for name, indices in by_tool.items():
        start = time.perf_counter()
        try:
            answers = tools[name].call([requests[index].arguments for index in indices])
            if len(answers) != len(indices):
                raise RuntimeError(f"{name} returned {len(answers)} results for {len(indices)} calls")
        except Exception as error:
            failed = ToolResult(
                error=f"{type(error).__name__}: {error}", latency_s=time.perf_counter() - start
            )
            answers = [failed] * len(indices)
        for index, answer in zip(indices, answers, strict=True):
            results[index] = answer
    return [result if result is not None else ToolResult(error="no result") for result in results]
