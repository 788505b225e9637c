"""Tools (calculator, user tools from config, batching, budgets, costs); the tag and Hermes call formats."""

import itertools
import json
import textwrap

import pytest
from env_fixtures import EXAMPLES, FakeRetriever
from hypothesis import given
from hypothesis import strategies as st
from policy_fixtures import ScriptedGenerator

from searchgym.env import EnvConfig, SearchVectorEnv, prompts
from searchgym.env.actions import Answer, Invalid, InvalidReason, Search, ToolCall
from searchgym.env.config import EnvConfigError
from searchgym.env.formats import HermesFormat, TagFormat, ToolFormatError
from searchgym.env.search_env import SearchEnv
from searchgym.env.tools import CalculatorTool, SearchTool, calculate
from searchgym.policy.models import default_policy_path, load_tokenizer
from searchgym.policy.rollout import run_episodes

FRANCE, HAMLET = EXAMPLES[0], EXAMPLES[1]
_PACKAGES = itertools.count()

# The tool-calling part of Qwen2.5-Instruct's chat template (system prompt with <tools>, <tool_response>
# messages in a user turn), written out here because the tests have no Qwen tokenizer; SmolLM2's tokenizer
# has the same ChatML special tokens.
QWEN_STYLE_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\nYou are a helpful assistant.\\n\\n# Tools\\n\\n"
    "You may call one or "
    "more functions to assist with the user query.\\n\\nYou are provided with function signatures within "
    "<tools></tools> XML tags:\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}"
    "{%- endfor %}{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def hermes_tokenizer():
    tokenizer = load_tokenizer(default_policy_path())
    tokenizer.chat_template = QWEN_STYLE_TEMPLATE
    return tokenizer


TOOLS = {"search": SearchTool(FakeRetriever(), 3), "calculator": CalculatorTool()}


def call(name, **arguments):
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


# --- the calculator ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("(1969 - 1918) * 12", "612"),
        ("7 / 2", "3.5"),
        ("-2 ** 2", "-4"),
        ("2 ** 0.5", "1.414213562"),
        ("1 / 0", "error: division by zero"),
        ("2 ** 101", "error: exponent too large (at most 100)"),
        ("open('x')", "error: only numbers, + - * / // % ** and parentheses are allowed"),
        ("1 +", "error: not an arithmetic expression"),
        ("(-8) ** 0.5", "error: the result is not a finite real number"),
    ],
)
def test_calculator(expression, value):
    assert calculate(expression) == value


# --- tools in the tag format through the env ---------------------------------------------------------


def run_env(config, actions, example=FRANCE, retriever=None):
    search_env = SearchEnv(dataset=None, retriever=retriever or FakeRetriever(), config=config)
    search_env.reset(seed=0, options={"example": example})
    steps = [search_env.step(action) for action in actions]
    return search_env, steps


def test_a_tagged_calculator_call_is_answered_budgeted_and_charged():
    config = EnvConfig(
        tools=("search", "calculator"), tool_budgets={"calculator": 1}, tool_costs={"calculator": 0.25}
    )
    _, steps = run_env(
        config,
        [
            "<calculator> (1969 - 1918) * 12 </calculator>",
            "<calculator> 1+1 </calculator>",
            "<answer>Paris</answer>",
        ],
    )
    observation, _, _, _, info = steps[0]
    assert observation == "\n\n<information>612</information>\n\n"
    assert (info["action_type"], info["tool"], info["invalid_reason"]) == ("tool", "calculator", None)
    refused, _, _, _, info = steps[1]
    assert info["invalid_reason"] == "tool_budget_spent" and refused.startswith("\n\n(Tool call refused")
    _, reward, terminated, _, info = steps[2]
    # EM 1, one calculator call at 0.25: 1 - 0.25.
    assert terminated and reward == 0.75 and info["reward_tool_cost"] == 0.25
    assert info["tool_calls"] == {"calculator": 1}


def test_each_tool_call_is_charged():
    config = EnvConfig(
        tools=("search", "calculator"), tool_budgets={"calculator": 2}, tool_costs={"calculator": 0.25}
    )
    _, steps = run_env(
        config, ["<calculator> 1+1 </calculator>", "<calculator> 2+2 </calculator>", "<answer>Paris</answer>"]
    )
    _, reward, _, _, info = steps[2]
    assert (reward, info["reward_tool_cost"], info["tool_calls"]) == (0.5, 0.5, {"calculator": 2})


def test_the_prompt_lists_tools_beside_search_and_the_stop_strings_close_them():
    search_env = SearchEnv(
        dataset=None, retriever=FakeRetriever(), config=EnvConfig(tools=("search", "calculator"))
    )
    prompt, _ = search_env.reset(options={"example": FRANCE})
    assert "<calculator> input </calculator> (Evaluate an arithmetic expression" in prompt
    assert search_env.stop == ("</search>", "</answer>", "</calculator>")


USER_TOOLS = '''
from searchgym.env.tools import ToolResult, string_argument

CALLS = []


class Shout:
    """Upper-cases its text; records each batched call."""

    name = "shout"
    description = "Upper-case a text."
    parameters = string_argument("text", "what to shout")

    def __init__(self, setup):
        self.topk = setup.topk

    def call(self, arguments):
        CALLS.append([dict(args) for args in arguments])
        return [ToolResult(text=args["text"].upper() + "!" * self.topk) for args in arguments]


def broken(setup):
    class Broken(Shout):
        name = "broken"

        def call(self, arguments):
            raise ConnectionError("service down")

    return Broken(setup)
'''


@pytest.fixture
def user_tools(tmp_path, monkeypatch):
    name = f"user_tools_{next(_PACKAGES)}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_TOOLS))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_a_user_tool_from_config_is_called_once_per_vector_step(user_tools):
    import importlib

    config = EnvConfig(tools=("search", f"{user_tools}:Shout"), topk=2)
    retriever = FakeRetriever()
    vector_env = SearchVectorEnv(num_envs=3, dataset=None, retriever=retriever, config=config)
    vector_env.reset(options={"examples": [FRANCE, HAMLET, FRANCE]})
    observations, *_ = vector_env.step(
        ["<shout> paris </shout>", "<search> Hamlet </search>", "<shout>lyon</shout>"]
    )
    # Two shouts in one call, one search in one retriever call; topk reached the tool through its setup.
    assert importlib.import_module(user_tools).CALLS == [[{"text": "paris"}, {"text": "lyon"}]]
    assert retriever.calls == [["Hamlet"]]
    assert observations[0] == "\n\n<information>PARIS!!</information>\n\n"
    assert observations[1].startswith("\n\n<information>Doc 1(Title: Hamlet)")
    vector_env.step(["<answer>Paris</answer>"] * 3)
    assert vector_env.final_infos[0]["tool_calls"] == {"shout": 1}


def test_a_failing_tool_ends_the_episode_without_a_reward(user_tools):
    config = EnvConfig(tools=("search", f"{user_tools}:broken"))
    _, steps = run_env(config, ["<broken> x </broken>"])
    _, reward, terminated, truncated, info = steps[0]
    assert (reward, terminated, truncated) == (0.0, False, True)
    assert info["end_reason"] == "tool_error" and info["error"] == "ConnectionError: service down"
    assert info["reward"] is None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tools": ("search", "nonexistent_tools_zz:Tool")}, "cannot import 'nonexistent_tools_zz'"),
        ({"tools": ("fetcher",)}, "write a built-in name (search, calculator)"),
        ({"tool_budgets": {"search": 2}}, "set max_searches instead"),
        ({"tool_costs": {"calculator": 2.0}}, "set it between 0 and 1"),
        ({"tool_format": "hermes", "prompt_style": "plain"}, "set prompt_style='chat'"),
    ],
)
def test_bad_tool_settings_say_what_to_set(settings, message):
    with pytest.raises(EnvConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EnvConfig(**settings)


# --- the Hermes parser --------------------------------------------------------------------------------

TAG_FREE = st.text().filter(lambda text: "<" not in text and ">" not in text)
HERMES_TAGS = [
    "<tool_call>",
    "</tool_call>",
    "<answer>",
    "</answer>",
    "{",
    "}",
    '"name"',
    ":",
    '"search"',
    '"',
]


@given(st.text())
def test_hermes_parser_never_raises_on_any_text(text):
    assert isinstance(
        HermesFormat("", "", "", "", "").parse(text, TOOLS), Search | Answer | ToolCall | Invalid
    )


@given(st.lists(st.one_of(st.sampled_from(HERMES_TAGS), TAG_FREE), max_size=14).map("".join))
def test_hermes_parser_never_raises_on_tag_and_json_soup(text):
    action = HermesFormat("", "", "", "", "").parse(text, TOOLS)
    if isinstance(action, Search):
        assert action.query and action.query == action.query.strip()


@given(prefix=TAG_FREE, query=TAG_FREE.filter(str.strip), suffix=st.text())
def test_a_hermes_search_round_trips(prefix, query, suffix):
    text = f"{prefix}{call('search', query=query)}{suffix}"
    assert HermesFormat("", "", "", "", "").parse(text, TOOLS) == Search(query.strip())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (call("calculator", expression="2*3"), ToolCall("calculator", {"expression": "2*3"})),
        (
            '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"1\\"}"}</tool_call>',
            ToolCall("calculator", {"expression": "1"}),
        ),
        ("<answer> Paris </answer>" + call("search", query="x"), Answer("Paris")),
        (
            "<tool_call>{not json}</tool_call>",
            Invalid(InvalidReason.BAD_TOOL_CALL, "the tool call is not valid JSON"),
        ),
        (
            "<tool_call>[1, 2]</tool_call>",
            Invalid(InvalidReason.BAD_TOOL_CALL, 'write {"name": ..., "arguments": {...}}'),
        ),
        ("<tool_call> </tool_call>", Invalid(InvalidReason.BAD_TOOL_CALL, "the tool call is empty")),
        (
            call("browse", url="x"),
            Invalid(InvalidReason.UNKNOWN_TOOL, "no tool named 'browse'; the tools are search, calculator"),
        ),
        (call("search", q="x"), Invalid(InvalidReason.BAD_ARGUMENTS, "missing argument 'query'")),
        (call("search", query=3), Invalid(InvalidReason.BAD_ARGUMENTS, "argument 'query' must be a string")),
        (call("search", query="  "), Invalid(InvalidReason.EMPTY_QUERY)),
        ("<search> x </search>", Invalid(InvalidReason.NO_TAG)),
        ('<tool_call>{"name": "search"', Invalid(InvalidReason.UNCLOSED_TAG)),
    ],
)
def test_hermes_parser_cases(text, expected):
    assert HermesFormat("", "", "", "", "").parse(text, TOOLS) == expected


def test_tag_format_fills_a_tools_first_string_argument():
    assert TagFormat().parse("<calculator> 1+1 </calculator>", TOOLS) == ToolCall(
        "calculator", {"expression": "1+1"}
    )
    assert TagFormat().parse("<search> q </search>", TOOLS) == Search("q")


# --- Hermes through the chat template, the env and the rollout --------------------------------------


def test_hermes_framing_is_read_from_the_chat_template(hermes_tokenizer):
    framing = HermesFormat.from_tokenizer(hermes_tokenizer)
    assert framing.tool_prefix == "<|im_end|>\n<|im_start|>user\n<tool_response>\n"
    assert framing.tool_suffix == "\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    assert framing.user_prefix == "<|im_end|>\n<|im_start|>user\n"
    assert framing.turn_end == "<|im_end|>"
    # A turn the policy closed itself: the observation does not close it again.
    assert framing.frame("612", action=call("calculator", expression="1") + "<|im_end|>", role="tool") == (
        "\n<|im_start|>user\n<tool_response>\n612\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def test_hermes_needs_a_template_that_renders_tool_messages():
    tokenizer = load_tokenizer(default_policy_path())  # SmolLM2's template has no tools
    with pytest.raises(ToolFormatError, match="chat template ignores tools="):
        HermesFormat.from_tokenizer(tokenizer)
    with pytest.raises(ToolFormatError, match="needs the policy's tokenizer"):
        SearchEnv(dataset=None, retriever=FakeRetriever(), config=EnvConfig(tool_format="hermes"))


HERMES_SCRIPT = [
    "I should look it up. " + call("search", query="capital of France"),
    call("calculator", expression="6 * 7") + "<|im_end|>",
    "<answer> Paris </answer>",
]


def test_hermes_rollout_has_exact_masks_and_the_templates_own_framing(hermes_tokenizer):
    config = EnvConfig(tools=("search", "calculator"), tool_format="hermes", max_turns=4)
    vector_env = SearchVectorEnv(
        num_envs=2, dataset=None, retriever=FakeRetriever(), config=config, tokenizer=hermes_tokenizer
    )
    generator = ScriptedGenerator(hermes_tokenizer, {FRANCE.question: HERMES_SCRIPT})
    (trajectory,) = run_episodes(generator, vector_env, [FRANCE])
    decode = hermes_tokenizer.decode

    # The prompt is the chat template's rendering with the tools' schemas.
    prompt = decode(trajectory.prompt_ids)
    user = prompts.build_prompt(FRANCE.question, style="chat", tool_format="hermes")
    expected_prompt = hermes_tokenizer.apply_chat_template(
        [{"role": "user", "content": user}],
        tools=vector_env.tool_schemas,
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == expected_prompt and '"name": "calculator"' in prompt and "<tools>" in prompt

    # Mask 1 exactly on what the policy generated, turn by turn; 0 on the two tool responses.
    policy_runs, observation_runs = [], []
    for mask, run in itertools.groupby(
        zip(trajectory.response_ids, trajectory.loss_mask, strict=True), key=lambda t: t[1]
    ):
        (policy_runs if mask else observation_runs).append(decode([token for token, _ in run]))
    assert policy_runs == HERMES_SCRIPT
    first, second = observation_runs
    assert first.startswith("<|im_end|>\n<|im_start|>user\n<tool_response>\n<information>Doc 1(Title: Paris)")
    assert first.endswith("</information>\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    # The policy closed its second turn itself, so the observation starts after its <|im_end|>.
    assert (
        second == "\n<|im_start|>user\n<tool_response>\n<information>42</information>\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert [turn.action_type for turn in trajectory.turns] == ["search", "tool", "answer"]
    assert trajectory.reward == 1.0 and trajectory.outcome.tool_calls == {"search": 1, "calculator": 1}
    # A turn ends at the close of a call or an answer.
    assert "</tool_call>" in vector_env.stop and "</answer>" in vector_env.stop
