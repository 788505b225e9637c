"""The environment's settings: one frozen dataclass that the trainer's config tree embeds."""

from dataclasses import dataclass, field
from typing import Literal, get_args

from searchgym.env.reward_fns import RewardFnError, parse_reward_spec, resolve_reward_fn
from searchgym.env.rewards import RewardType
from searchgym.errors import SearchgymError

PromptStyle = Literal["chat", "plain"]
ToolFormat = Literal["tags", "hermes"]

QUESTION_PLACEHOLDER = "{question}"
# The longest notices (an invalid action on the turn before the last) must fit, with room for documents.
MIN_OBSERVATION_TOKENS = 128


class EnvConfigError(SearchgymError, ValueError):
    """An :class:`EnvConfig` field holds a value the environment cannot run with."""


@dataclass(frozen=True, slots=True)
class EnvConfig:
    """How a search-and-answer episode runs and how it is rewarded.

    Budgets count the policy's actions (turns) and searches; the observation budget counts tokens of the
    tokenizer given to the env (whitespace-separated words without one).

    Attributes:
        max_turns: actions the policy may take in one episode. The last turn is for the answer: its
            observation says so, and a search or an invalid action there ends the episode truncated.
        max_searches: searches allowed per episode (at most ``max_turns - 1``). Once spent, the
            observation says so and a further search is refused with a corrective message.
        topk: passages retrieved per search.
        max_observation_tokens: budget of one observation, tags and notices included. Each retrieved
            document is trimmed to its share so that the whole block fits; nothing is cut silently.
        prompt_style: ``"chat"`` for instruct models: the reset observation is the user message, which the
            policy wraps in its tokenizer's chat template. ``"plain"`` for base models: the reset
            observation is the whole context and ends with the assistant's cue (``Assistant:``).
        prompt_template: your own prompt in place of the style's built-in one; it must contain
            ``{question}`` exactly once (the question is inserted verbatim and never truncated).
        reward_type: the outcome metric of the final answer: ``"em"`` (exact match), ``"f1"`` (token F1)
            or ``"cover_em"`` (a gold answer appears in the prediction).
        reward_fn: your own outcome reward in place of ``reward_type``: a built-in name, an import path
            ``package.module:function``, or a weighted sum (``"0.8*f1 + 0.2*mypkg.rewards:brevity"`` or
            the list ``["0.8*f1", "0.2*mypkg.rewards:brevity"]``); see
            :mod:`searchgym.env.reward_fns` for the function's signature. None uses ``reward_type``.
        format_weight: reward floor for a well-formed episode (every action valid, ended by an answer)
            whose answer scores lower. 0 turns format shaping off (the Search-R1 paper's setting).
        retrieval_weight: extra floor, on top of ``format_weight``, when the episode is well-formed and
            a gold answer appears in some retrieved passage.
        search_cost: subtracted from the reward once per search made.
        tools: the tools of an episode: built-in names (``search``, ``calculator``) or
            ``package.module:factory`` (see :mod:`searchgym.env.tools`). Without ``search`` the env makes
            no retriever call.
        tool_format: how the policy calls tools: ``"tags"`` (``<search> q </search>``, Search-R1) or
            ``"hermes"`` (``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` through the chat
            template's native tool calling; needs the policy's tokenizer and ``prompt_style="chat"``).
        tool_budgets: calls allowed per episode for tools other than search (``{"calculator": 2}``);
            a tool not listed may be called on any turn but the last. Search has ``max_searches``.
        tool_costs: subtracted from the reward per call, for tools other than search (``search_cost``).
    """

    max_turns: int = 4
    max_searches: int = 3
    topk: int = 3
    max_observation_tokens: int = 512
    prompt_style: PromptStyle = "chat"
    prompt_template: str | None = None
    reward_type: RewardType = "em"
    reward_fn: str | tuple[str, ...] | None = None
    format_weight: float = 0.0
    retrieval_weight: float = 0.0
    search_cost: float = 0.0
    tools: tuple[str, ...] = ("search",)
    tool_format: ToolFormat = "tags"
    tool_budgets: dict[str, int] = field(default_factory=dict)
    tool_costs: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_budgets()
        self._check_prompt()
        self._check_reward()
        self._check_tools()

    def _check_budgets(self) -> None:
        if self.max_turns < 1:
            raise EnvConfigError(f"max_turns={self.max_turns}: set max_turns to 1 or more")
        if not 0 <= self.max_searches <= self.max_turns - 1:
            raise EnvConfigError(
                f"max_searches={self.max_searches} with max_turns={self.max_turns}: set max_searches between "
                f"0 and max_turns - 1 = {self.max_turns - 1} (the last turn is reserved for the answer)"
            )
        if self.topk < 1:
            raise EnvConfigError(f"topk={self.topk}: set topk to 1 or more passages per search")
        if self.max_observation_tokens < MIN_OBSERVATION_TOKENS:
            raise EnvConfigError(
                f"max_observation_tokens={self.max_observation_tokens}: set it to {MIN_OBSERVATION_TOKENS} "
                "or more, so that document headers and notices fit"
            )

    def _check_prompt(self) -> None:
        if self.prompt_style not in get_args(PromptStyle):
            raise EnvConfigError(
                f"prompt_style={self.prompt_style!r}: set prompt_style to 'chat' (instruct models) or "
                "'plain' (base models)"
            )
        if self.prompt_template is not None and self.prompt_template.count(QUESTION_PLACEHOLDER) != 1:
            raise EnvConfigError(
                f"prompt_template must contain {QUESTION_PLACEHOLDER} exactly once (found "
                f"{self.prompt_template.count(QUESTION_PLACEHOLDER)}); or set prompt_template to None "
                "for the built-in prompt"
            )

    def _check_reward(self) -> None:
        if self.reward_type not in get_args(RewardType):
            raise EnvConfigError(
                f"reward_type={self.reward_type!r}: set reward_type to one of "
                f"{', '.join(get_args(RewardType))}"
            )
        if self.reward_fn is not None:
            try:
                for term in parse_reward_spec(self.reward_fn):
                    resolve_reward_fn(term.spec)
            except RewardFnError as error:
                raise EnvConfigError(f"reward_fn={self.reward_fn!r}: {error}") from error
        for name in ("format_weight", "retrieval_weight"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise EnvConfigError(f"{name}={value}: set {name} between 0 and 1 (0 turns it off)")
        if self.format_weight + self.retrieval_weight > 1.0:
            raise EnvConfigError(
                f"format_weight + retrieval_weight = {self.format_weight + self.retrieval_weight}: keep the "
                "sum at most 1, so that a correct answer always earns at least as much as good form"
            )
        if not 0.0 <= self.search_cost <= 1.0:
            raise EnvConfigError(
                f"search_cost={self.search_cost}: set search_cost between 0 and 1 (0 = free)"
            )

    @property
    def reward_spec(self) -> str | tuple[str, ...]:
        """What scores the final answer: ``reward_fn`` when set, else ``reward_type``."""
        return self.reward_type if self.reward_fn is None else self.reward_fn

    def _check_tools(self) -> None:
        if self.tool_format not in get_args(ToolFormat):
            raise EnvConfigError(f"tool_format={self.tool_format!r}: set tool_format to 'tags' or 'hermes'")
        if self.tool_format == "hermes" and self.prompt_style != "chat":
            raise EnvConfigError(
                "tool_format='hermes' renders tools with the chat template: set prompt_style='chat'"
            )
        # Imported here: the tools module imports the retrieval layer, which this ground module does not need.
        from searchgym.env.tools import ToolSpecError, resolve_tool_factory

        for spec in self.tools:
            try:
                resolve_tool_factory(spec)
            except ToolSpecError as error:
                raise EnvConfigError(f"tools: {error}") from error
        for table, kind in ((self.tool_budgets, "budget"), (self.tool_costs, "cost")):
            if "search" in table:
                setting = "max_searches" if kind == "budget" else "search_cost"
                raise EnvConfigError(f"tool_{kind}s names search: set {setting} instead")
        for name, budget in self.tool_budgets.items():
            if budget < 0:
                raise EnvConfigError(f"tool_budgets[{name!r}]={budget}: set it to 0 or more calls")
        for name, cost in self.tool_costs.items():
            if not 0.0 <= cost <= 1.0:
                raise EnvConfigError(f"tool_costs[{name!r}]={cost}: set it between 0 and 1 (0 = free)")

    def tool_budget(self, name: str) -> int:
        """Calls of tool ``name`` allowed per episode."""
        if name == "search":
            return self.max_searches
        return self.tool_budgets.get(name, self.max_turns - 1)
