import pytest
from hypothesis import given
from hypothesis import strategies as st

from searchgym.env.actions import Answer, Invalid, InvalidReason, Search, parse_action

TAGS = ["<search>", "</search>", "<answer>", "</answer>", "<think>", "</think>", "< SEARCH >", "</ Answer>"]
# Text without angle brackets cannot hold a tag.
TAG_FREE = st.text(alphabet=st.characters(blacklist_characters="<>"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<search>capital of France</search>", Search("capital of France")),
        (
            "<think>I need a fact.</think>\n<search>  capital of France \n</search>",
            Search("capital of France"),
        ),
        ("<answer> Paris </answer>", Answer("Paris")),
        ("< Search >query</SEARCH >", Search("query")),
        ("<ANSWER>\tParis\n</ answer>", Answer("Paris")),
        # Several tags: the first complete one wins, whatever comes after it.
        ("<search>a</search> <answer>b</answer>", Search("a")),
        ("<answer>b</answer> <search>a</search>", Answer("b")),
        ("<search>a</search><search>b</search>", Search("a")),
        # An unclosed tag before a complete one: the complete one wins.
        ("<search> never closed <answer>Paris</answer>", Answer("Paris")),
        ("</search> stray closing, then <search>q</search>", Search("q")),
        ("<search>capital of France", Invalid(InvalidReason.UNCLOSED_TAG)),
        ("<answer>Paris", Invalid(InvalidReason.UNCLOSED_TAG)),
        ("<search>capital of France</answer>", Invalid(InvalidReason.UNCLOSED_TAG)),  # another tag closes
        ("<search>a <search>b</search>", Invalid(InvalidReason.NESTED_TAGS)),
        ("<answer>x <search>q</search> y</answer>", Invalid(InvalidReason.NESTED_TAGS)),
        ("<search>a </answer> b</search>", Invalid(InvalidReason.NESTED_TAGS)),
        ("<search>   </search>", Invalid(InvalidReason.EMPTY_QUERY)),
        ("<answer></answer>", Invalid(InvalidReason.EMPTY_ANSWER)),
        ("Paris", Invalid(InvalidReason.NO_TAG)),
        ("", Invalid(InvalidReason.NO_TAG)),
        ("<think>only thinking</think>", Invalid(InvalidReason.NO_TAG)),
        ("</search></answer>", Invalid(InvalidReason.NO_TAG)),
        ("<searches>q</searches>", Invalid(InvalidReason.NO_TAG)),
    ],
)
def test_parse_action_cases(text, expected):
    assert parse_action(text) == expected


def test_a_query_keeps_inner_whitespace_and_unicode():
    assert parse_action("<search>Petar  Stambolić\nbirthplace</search>") == Search(
        "Petar  Stambolić\nbirthplace"
    )


def test_many_unclosed_tags_are_parsed_in_one_pass():
    assert parse_action("<search> x " * 20_000) == Invalid(InvalidReason.UNCLOSED_TAG)


@given(st.text())
def test_never_raises_on_any_text(text):
    assert isinstance(parse_action(text), Search | Answer | Invalid)


@given(st.lists(st.one_of(st.sampled_from(TAGS), TAG_FREE), max_size=12).map("".join))
def test_never_raises_on_tag_soup_and_results_are_clean(text):
    action = parse_action(text)
    if isinstance(action, Search | Answer):
        content = action.query if isinstance(action, Search) else action.text
        assert content == content.strip() and content
        assert parse_action(f"<search>{content}</search>") == Search(content)


@given(prefix=TAG_FREE, query=TAG_FREE.filter(str.strip), suffix=st.text())
def test_a_tagged_query_round_trips_after_any_tag_free_prefix(prefix, query, suffix):
    assert parse_action(f"{prefix}<search>{query}</search>{suffix}") == Search(query.strip())


@given(prefix=TAG_FREE, answer=TAG_FREE.filter(str.strip))
def test_an_answer_round_trips_in_any_case(prefix, answer):
    assert parse_action(f"{prefix}<Answer>{answer}</ANSWER>") == Answer(answer.strip())
