"""SearchEnv: one search-and-answer episode as a Gymnasium environment with text observations and actions."""

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, SupportsFloat

import gymnasium

from searchgym.env import prompts
from searchgym.env.actions import Action, Answer, Invalid, Search, ToolCall
from searchgym.env.config import EnvConfig
from searchgym.env.data import QAExample, load_dataset
from searchgym.env.formats import make_format
from searchgym.env.observations import fit_information
from searchgym.env.outcome import EndReason, EpisodeOutcome
from searchgym.env.reward_fns import EpisodeFacts, RewardContext, parse_reward_spec, score_outcome
from searchgym.env.rewards import (
    RewardBreakdown,
    answer_in_passages,
    cover_exact_match,
    exact_match,
    f1_score,
    format_reward,
    search_penalty,
)
from searchgym.env.spaces import MAX_ACTION_CHARS, MAX_OBSERVATION_CHARS, UnicodeText
from searchgym.env.tokens import Tokenizer, make_meter
from searchgym.env.tools import (
    Tool,
    ToolRequest,
    ToolResult,
    ToolSetup,
    build_tools,
    call_batched,
    tool_schema,
)
from searchgym.errors import SearchgymError
from searchgym.retriever.base import Retriever

DatasetLike = str | os.PathLike[str] | Sequence[QAExample | Mapping[str, Any]]

# Reasons an action parsed as a search was not carried out (beside searchgym.env.actions.InvalidReason).
SEARCH_BUDGET_SPENT = "search_budget_spent"
SEARCH_ON_LAST_TURN = "search_on_last_turn"
TOOL_BUDGET_SPENT = "tool_budget_spent"
TOOL_ON_LAST_TURN = "tool_on_last_turn"


class EpisodeStateError(SearchgymError):
    """``step`` was called with no running episode."""


@dataclass(slots=True)
class _Episode:
    """The mutable state of the running episode."""

    example: QAExample
    turn: int = 0
    num_searches: int = 0
    tool_calls: dict[str, int] = field(default_factory=dict)
    well_formed: bool = True
    done: bool = False
    retrieved_ids: list[str] = field(default_factory=list)
    retrieved_texts: list[str] = field(default_factory=list)
    transcript: list[str] = field(default_factory=list)
    pending: Action | None = None
    pending_text: str = ""


class SearchEnv(gymnasium.Env[str, str]):
    r"""A question to answer with the help of a search engine, one model turn per step.

    ## Description
    Each episode is one QA example. The model reasons in ``<think>`` blocks, searches with
    ``<search> query </search>`` and ends with ``<answer> text </answer>``; the env parses each turn with
    :func:`searchgym.env.actions.parse_action` (the first complete tag wins), runs searches on its retriever
    and
    returns what to append to the model's context.

    ## Action Space
    :class:`~searchgym.env.spaces.UnicodeText`: one turn of model text (any string; the closing tag must be
    included, so generation should stop *after* ``</search>`` / ``</answer>``).

    ## Observation Space
    :class:`~searchgym.env.spaces.UnicodeText`. ``reset`` returns the prompt: with ``prompt_style="chat"``
    the user
    message (the policy applies its chat template), with ``"plain"`` the whole context, ending with
    ``Assistant:``. ``step`` returns exactly the text to append after the action:
    ``\n\n<information>Doc 1(Title: T) text\n...</information>\n\n`` after a search (each document
    trimmed to its share of ``max_observation_tokens``), a short corrective notice after an invalid
    action, and ``""`` when the episode ends. The observation before the last allowed turn, and the one
    that spends the last search, say to answer now.

    ## Rewards
    0.0 on every step but the last; the last step's reward is ``max(outcome, shaping) - search_cost``
    (:class:`searchgym.env.rewards.RewardBreakdown`). When the reward cannot be computed (the retriever
    failed, or
    the example has no gold answers) the step reward is 0.0 and ``info["reward"]`` is None with
    ``info["reward_error"]`` saying why: mask those episodes, never train on the 0.0.

    ## Episode End
    ``terminated`` when the model answers. ``truncated`` when the last turn passes without an answer
    (a search or an invalid action there) or when the retriever fails (``info["error"]``).

    ## Info
    Every step: ``example_id``, ``turn`` (1-based), ``action_type`` (``"search"``, ``"answer"`` or
    ``"invalid"``: what the env did), ``query`` (the parsed query, also for a refused search),
    ``invalid_reason`` (an :class:`~searchgym.env.actions.InvalidReason` value, ``"search_budget_spent"`` or
    ``"search_on_last_turn"``), ``retrieved_ids``, ``retrieval_latency_s``, ``num_searches``,
    ``observation_tokens``, ``tool`` (the tool called, or None). At the end also: ``answer``, ``em``,
    ``f1``, ``cover_em``, ``reward``, ``reward_error``, ``reward_outcome``, ``reward_shaping``,
    ``reward_search_cost``, ``reward_tool_cost``, ``reward_parts`` (each reward function's value),
    ``end_reason`` (``"answered"``, ``"max_turns"``, ``"retriever_error"``, ``"tool_error"``), ``error``,
    ``episode_retrieved_ids``, ``tool_calls`` (calls made, per tool), and ``outcome``: all of these as one
    :class:`~searchgym.env.outcome.EpisodeOutcome`, which is what code reads.

    ## Tools and formats
    ``config.tools`` lists the tools (:mod:`searchgym.env.tools`; search is the retriever) and
    ``config.tool_format`` how they are called (:mod:`searchgym.env.formats`: tags, or Hermes JSON framed by
    the tokenizer's chat template).

    ## Arguments
    ``dataset``: a bundled name (``"wiki-mini-dev"``), a file path, or QA examples; may be None when
    every reset passes ``options={"example": ...}``. ``retriever``: any
    :class:`searchgym.retriever.base.Retriever`
    (in-process index or HTTP client). ``config``: :class:`searchgym.env.config.EnvConfig`. ``tokenizer``:
    counts
    budgets in the policy's tokens (HF-style ``encode``/``decode``); words without one; the Hermes format
    reads its chat template. ``tools``: the tools already built from ``config.tools`` (a vector env
    shares one set across its sub-envs); built from the config when None.
    ``render_mode="ansi"``: ``render()`` returns the episode's text so far.

    ## Gymnasium checks
    ``gymnasium.utils.env_checker.check_env`` passes; its one warning is that ``render_mode="ansi"``
    declares no ``render_fps`` (text has no frame rate). Gymnasium's ``Text`` space only holds strings over
    a finite character set, so both spaces are :class:`~searchgym.env.spaces.UnicodeText`, a ``Text`` that
    accepts
    any character; ``action_space.sample()`` draws printable ASCII, which parses as an invalid action.
    """

    metadata: dict[str, Any] = {"render_modes": ["ansi"]}  # noqa: RUF012  (Gymnasium's class attribute)

    def __init__(
        self,
        *,
        dataset: DatasetLike | None,
        retriever: Retriever,
        config: EnvConfig | None = None,
        tokenizer: Tokenizer | None = None,
        render_mode: str | None = None,
        tools: Mapping[str, Tool] | None = None,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise SearchgymError(f"render_mode={render_mode!r}: use None or 'ansi'")
        self.config = config or EnvConfig()
        self.retriever = retriever
        self.examples = resolve_examples(dataset)
        self.render_mode = render_mode
        self.observation_space = UnicodeText(MAX_OBSERVATION_CHARS)
        self.action_space = UnicodeText(MAX_ACTION_CHARS)
        self._meter = make_meter(tokenizer)
        if tools is None:
            tools = build_tools(self.config.tools, ToolSetup(retriever, self.config.topk))
        self.tools: dict[str, Tool] = dict(tools)
        self.action_format = make_format(self.config.tool_format, tokenizer)
        self._episode: _Episode | None = None

    @property
    def tool_schemas(self) -> list[dict[str, Any]]:
        """The tools as a chat template's ``tools=`` list (the Hermes format's prompt renders them)."""
        return [tool_schema(tool) for tool in self.tools.values()]

    @property
    def stop(self) -> tuple[str, ...]:
        """Strings that end a policy turn in this env's format (the tag format adds each tool's tag)."""
        extra = () if self.config.tool_format == "hermes" else tuple(f"</{name}>" for name in self.tools)
        return tuple(dict.fromkeys((*self.action_format.stop, *extra)))

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Start an episode on ``options["example"]``, or on a dataset example drawn with the env's RNG.

        Raises:
            SearchgymError: an unknown option, or no example given and the env has no dataset.
        """
        super().reset(seed=seed)
        unknown = set(options or {}) - {"example"}
        if unknown:
            raise SearchgymError(f"unknown reset options {sorted(unknown)}: the only option is 'example'")
        example = (options or {}).get("example")
        if example is None:
            if not self.examples:
                raise SearchgymError(
                    "this SearchEnv has no dataset: pass options={'example': QAExample(...)}"
                )
            example = self.examples[int(self.np_random.integers(len(self.examples)))]
        self._episode = _Episode(example=as_example(example))
        question = self._episode.example.question
        if self.config.max_turns == 1:
            # The first turn is also the last: the notice rides with the question, whatever the template.
            question = f"{question}\n{prompts.LAST_TURN_NOTICE.strip()}"
        prompt = prompts.build_prompt(
            question,
            style=self.config.prompt_style,
            template=self.config.prompt_template,
            tool_format=self.config.tool_format,
            extra_tools={name: tool.description for name, tool in self.tools.items() if name != "search"},
        )
        self._episode.transcript.append(prompt)
        return prompt, {"example_id": self._episode.example.id, "question": self._episode.example.question}

    def step(self, action: str) -> tuple[str, SupportsFloat, bool, bool, dict[str, Any]]:
        """Take one model turn: ``begin_step``, the tool call if there is one, ``finish_step``."""
        request = self.begin_step(action)
        result = None if request is None else call_batched(self.tools, [request])[0]
        return self.finish_step(result)

    def render(self) -> str | None:
        """The episode so far (prompt, actions and observations) with ``render_mode="ansi"``."""
        if self.render_mode != "ansi" or self._episode is None:
            return None
        return "".join(self._episode.transcript)

    @property
    def episode_over(self) -> bool:
        """Whether there is no running episode (never reset, or the last one ended)."""
        return self._episode is None or self._episode.done

    def begin_step(self, action: str) -> ToolRequest | None:
        """First half of ``step``: parse the turn; return the tool call to make, or None if none runs.

        :class:`searchgym.env.vector.SearchVectorEnv` calls this on every sub-env, makes one call per tool
        with all the sub-envs' requests, then calls :meth:`finish_step`.

        Raises:
            EpisodeStateError: no running episode (call ``reset`` first).
        """
        episode = self._running_episode()
        episode.turn += 1
        episode.pending = self.action_format.parse(action, self.tools)
        episode.pending_text = action
        episode.transcript.append(action)
        request = _request_of(episode.pending)
        if request is None or episode.turn >= self.config.max_turns:
            return None
        if episode.tool_calls.get(request.name, 0) >= self.config.tool_budget(request.name):
            return None
        return request

    def finish_step(self, result: ToolResult | None) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Second half of ``step``: ``result`` is the tool call's outcome (None when there was no call)."""
        episode = self._running_episode()
        action = episode.pending
        if action is None:
            raise EpisodeStateError("finish_step() needs a begin_step() first")
        episode.pending = None
        info = self._turn_info(action, result)
        if isinstance(action, Answer):
            return self._end(info, answer=action.text, end_reason="answered", terminated=True)
        if result is not None and result.error is not None:
            reason: EndReason = "retriever_error" if isinstance(action, Search) else "tool_error"
            return self._end(info, answer=None, end_reason=reason, terminated=False, error=result.error)
        if episode.turn >= self.config.max_turns:
            return self._end(info, answer=None, end_reason="max_turns", terminated=False)
        if result is None:
            episode.well_formed = False
            observation = self._notice(action, info)
            info["observation_tokens"] = self._meter.count(observation)
        else:
            observation, info["observation_tokens"] = self._tool_observation(action, result)
        episode.transcript.append(observation)
        return observation, 0.0, False, False, info

    def _notice(self, action: Action, info: dict[str, Any]) -> str:
        """The corrective observation after an action that ran no tool (and did not end the episode)."""
        if isinstance(action, Search | ToolCall):
            body = (
                prompts.SEARCH_REFUSED_NOTICE if isinstance(action, Search) else prompts.TOOL_REFUSED_NOTICE
            )
        else:
            body = prompts.invalid_action_notice(
                info["invalid_reason"],
                tool_format=self.config.tool_format,
                detail=getattr(action, "detail", ""),
            )
        body += self._closing_notice(searched=False)
        return self.action_format.frame(body, action=self._running_episode().pending_text, role="user")

    def _running_episode(self) -> _Episode:
        if self._episode is None or self._episode.done:
            raise EpisodeStateError(
                "no running episode: call reset() before step() (the last episode has ended)"
            )
        return self._episode

    def _turn_info(self, action: Action, result: ToolResult | None) -> dict[str, Any]:
        episode = self._running_episode()
        request = _request_of(action)
        if result is not None:
            action_type, invalid_reason = ("search" if isinstance(action, Search) else "tool"), None
        elif isinstance(action, Answer):
            action_type, invalid_reason = "answer", None
        elif request is not None:
            last_turn = episode.turn >= self.config.max_turns
            if isinstance(action, Search):
                invalid_reason = SEARCH_ON_LAST_TURN if last_turn else SEARCH_BUDGET_SPENT
            else:
                invalid_reason = TOOL_ON_LAST_TURN if last_turn else TOOL_BUDGET_SPENT
            action_type = "invalid"
        else:
            assert isinstance(action, Invalid)
            action_type, invalid_reason = "invalid", str(action.reason)
        passages = () if result is None else result.passages
        succeeded = result is not None and result.error is None
        return {
            "example_id": episode.example.id,
            "turn": episode.turn,
            "action_type": action_type,
            "tool": None if request is None else request.name,
            "query": action.query if isinstance(action, Search) else None,
            "invalid_reason": invalid_reason,
            "retrieved_ids": tuple(passage.id for passage in passages),
            "retrieval_latency_s": 0.0 if result is None else result.latency_s,
            "num_searches": episode.num_searches + int(succeeded and isinstance(action, Search)),
            "observation_tokens": 0,
        }

    def _tool_observation(self, action: Action, result: ToolResult) -> tuple[str, int]:
        """The observation after a successful tool call and its size; records the call and what it showed."""
        episode = self._running_episode()
        request = _request_of(action)
        assert request is not None
        episode.tool_calls[request.name] = episode.tool_calls.get(request.name, 0) + 1
        if isinstance(action, Search):
            episode.num_searches += 1
        episode.retrieved_ids.extend(passage.id for passage in result.passages)
        episode.retrieved_texts.extend(passage.contents for passage in result.passages)
        suffix = self._closing_notice(searched=True)
        if result.passages or isinstance(action, Search):
            block = fit_information(
                result.passages,
                meter=self._meter,
                max_tokens=self.config.max_observation_tokens,
                suffix=suffix,
            )
            body = block.text
        else:
            body = (
                prompts.tool_result_block(
                    result.text, meter=self._meter, max_tokens=self.config.max_observation_tokens
                )
                + suffix
            )
        observation = self.action_format.frame(body, action=episode.pending_text, role="tool")
        return observation, self._meter.count(observation)

    def _closing_notice(self, *, searched: bool) -> str:
        """Answer now, said when the next turn is the last or this turn's search spent the last one."""
        episode = self._running_episode()
        if episode.turn + 1 >= self.config.max_turns:
            return prompts.LAST_TURN_NOTICE
        if searched and "search" in self.tools and episode.num_searches >= self.config.max_searches:
            return prompts.SEARCHES_SPENT_NOTICE
        return ""

    def _end(
        self,
        info: dict[str, Any],
        *,
        answer: str | None,
        end_reason: EndReason,
        terminated: bool,
        error: str | None = None,
    ) -> tuple[str, float, bool, bool, dict[str, Any]]:
        episode = self._running_episode()
        episode.done = True
        outcome = score_episode(
            episode.example,
            answer=answer,
            end_reason=end_reason,
            retrieved_ids=tuple(episode.retrieved_ids),
            retrieved_texts=episode.retrieved_texts,
            well_formed=episode.well_formed and answer is not None,
            num_turns=episode.turn,
            tool_calls=dict(episode.tool_calls),
            config=self.config,
            error=error,
            trajectory="".join(episode.transcript),
        )
        info |= outcome.info_entries()
        reward = 0.0 if outcome.reward is None else outcome.reward
        return "", reward, terminated, not terminated, info


def _request_of(action: Action | None) -> ToolRequest | None:
    """The tool call an action asks for (None for an answer or an invalid action)."""
    if isinstance(action, Search):
        return ToolRequest("search", {"query": action.query})
    if isinstance(action, ToolCall) and not isinstance(action.arguments, str):
        return ToolRequest(action.name, action.arguments)
    return None


def score_episode(
    example: QAExample,
    *,
    answer: str | None,
    end_reason: EndReason,
    retrieved_ids: tuple[str, ...],
    retrieved_texts: Sequence[str],
    well_formed: bool,
    num_turns: int,
    tool_calls: Mapping[str, int],
    config: EnvConfig,
    error: str | None = None,
    trajectory: str = "",
) -> EpisodeOutcome:
    """The outcome of an episode: metrics and reward (with its parts), or a missing reward with its reason.

    The outcome part of the reward comes from the configured reward functions
    (:mod:`searchgym.env.reward_fns`), called with the question, the gold answers, the answer, the
    episode's ``trajectory`` text and what it did; each function's value is kept in ``reward_functions``.
    """
    num_searches = tool_calls.get("search", 0)
    ended = EpisodeOutcome(
        answer=answer,
        end_reason=end_reason,
        reward=None,
        num_searches=num_searches,
        num_turns=num_turns,
        well_formed=well_formed,
        error=error,
        retrieved_ids=retrieved_ids,
        tool_calls=dict(tool_calls),
    )
    if error is not None:
        failed = "retriever" if end_reason == "retriever_error" else "tool"
        return replace(ended, reward_error=f"{failed} failed: {error}")
    golds = example.golden_answers
    if not golds:
        return replace(ended, reward_error=f"example {example.id!r} has no golden answers")
    scored = replace(
        ended,
        em=exact_match(answer, golds),
        f1=f1_score(answer, golds),
        cover_em=cover_exact_match(answer, golds),
    )
    facts = EpisodeFacts(
        end_reason=end_reason,
        well_formed=well_formed,
        num_turns=num_turns,
        tool_calls=dict(tool_calls),
        retrieved_ids=retrieved_ids,
        retrieved_texts=tuple(retrieved_texts),
    )
    context = RewardContext(
        question=example.question,
        golden_answers=tuple(golds),
        answer=answer,
        trajectory=trajectory,
        episode=facts,
        example=example,
    )
    result = score_outcome(parse_reward_spec(config.reward_spec), context)
    if result.value is None:
        return replace(
            scored, reward_error=f"reward function failed: {result.error}", reward_functions=result.parts
        )
    shaping = format_reward(
        well_formed=well_formed,
        answer_retrieved=config.retrieval_weight > 0 and answer_in_passages(retrieved_texts, golds),
        format_weight=config.format_weight,
        retrieval_weight=config.retrieval_weight,
    )
    parts = RewardBreakdown(
        outcome=result.value, shaping=shaping, search_cost=search_penalty(num_searches, config.search_cost)
    )
    tool_cost = sum(config.tool_costs.get(name, 0.0) * count for name, count in tool_calls.items())
    return replace(
        scored,
        reward=parts.total - tool_cost,
        reward_parts=parts,
        reward_functions=result.parts,
        tool_cost=tool_cost,
    )


def as_example(example: QAExample | Mapping[str, Any]) -> QAExample:
    """A QA example from an example or a FlashRAG record.

    Raises:
        SearchgymError: ``example`` is neither.
    """
    if isinstance(example, QAExample):
        return example
    if not isinstance(example, Mapping):
        raise SearchgymError(
            f"expected a QAExample or a FlashRAG record {{'id', 'question', 'golden_answers'}}, "
            f"got {type(example).__name__}"
        )
    return QAExample.from_record(example, where="the example passed to reset")


def resolve_examples(dataset: DatasetLike | None) -> list[QAExample]:
    """The examples of a dataset argument: a bundled name or a path is loaded; records are converted."""
    if dataset is None:
        return []
    if isinstance(dataset, str | os.PathLike):
        return load_dataset(dataset)
    return [as_example(example) for example in dataset]
