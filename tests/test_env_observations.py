import re

from env_fixtures import CORPUS, CharTokenizer
from hypothesis import given
from hypothesis import strategies as st

from searchgym.env.observations import fit_information, share_budget
from searchgym.env.prompts import information_block
from searchgym.env.tokens import TokenizerMeter, WordMeter, make_meter
from searchgym.retriever.base import Passage


def long_passage(doc_id, title, words):
    return Passage(doc_id, f'"{title}"\n' + " ".join(f"{title.lower()}{i}" for i in range(words)), 1.0)


@given(st.lists(st.integers(0, 500), max_size=8), st.integers(-5, 2000))
def test_share_budget_never_overspends_and_is_fair(lengths, budget):
    allowance = share_budget(lengths, budget)
    assert sum(allowance) <= max(budget, 0)
    assert all(0 <= given_units <= length for given_units, length in zip(allowance, lengths, strict=True))
    if sum(lengths) <= budget:
        assert allowance == lengths
    # A trimmed item got at least as much as any other item: nobody is starved for a longer one.
    for given_units, length in zip(allowance, lengths, strict=True):
        if given_units < length:
            assert given_units >= max(allowance) - 1


def test_short_passages_are_shown_whole():
    block = fit_information(CORPUS[:3], meter=WordMeter(), max_tokens=512)
    assert block.text == information_block([(passage.title, passage.text) for passage in CORPUS[:3]])
    assert block.shown_ids == ("d0", "d1", "d2")


def test_each_document_is_trimmed_to_its_share_and_none_vanishes():
    passages = [
        long_passage("a", "Alpha", 400),
        long_passage("b", "Beta", 5),
        long_passage("c", "Gamma", 400),
    ]
    meter = WordMeter()
    block = fit_information(passages, meter=meter, max_tokens=200)
    assert meter.count(block.text) <= 200 and block.num_tokens == meter.count(block.text)
    assert block.shown_ids == ("a", "b", "c")
    lines = block.text.split("\n")[2:5]
    assert lines[0].startswith("<information>Doc 1(Title: Alpha) alpha0 ")
    assert lines[1] == "Doc 2(Title: Beta) beta0 beta1 beta2 beta3 beta4"
    # The two long documents split what the short one left, to within one unit.
    assert abs(meter.count(lines[0]) - meter.count(lines[2])) <= 1


@given(st.integers(128, 600), st.lists(st.integers(0, 300), min_size=1, max_size=5))
def test_blocks_fit_any_budget_in_tokenizer_units(budget, sizes):
    passages = [long_passage(str(i), f"T{i}", words) for i, words in enumerate(sizes)]
    meter = TokenizerMeter(CharTokenizer())
    block = fit_information(passages, meter=meter, max_tokens=budget)
    assert meter.count(block.text) <= budget
    assert block.text.startswith("\n\n<information>") and block.text.endswith("</information>\n\n")


def test_each_document_is_one_line():
    passage = Passage("n", '"Title"\nFirst paragraph.\nSecond paragraph.\r\nThird.', 1.0)
    block = fit_information([passage], meter=WordMeter(), max_tokens=200)
    assert block.text == information_block([("Title", "First paragraph. Second paragraph. Third.")])


def test_the_suffix_counts_against_the_budget():
    meter = TokenizerMeter(CharTokenizer())
    suffix = "(answer now)\n\n"
    block = fit_information(CORPUS[:3], meter=meter, max_tokens=200, suffix=suffix)
    assert block.text.endswith("</information>\n\n" + suffix)
    assert block.num_tokens == len(block.text) <= 200 and block.shown_ids == ("d0", "d1", "d2")


def test_documents_whose_headers_do_not_fit_are_dropped_lowest_ranked_first():
    passages = [long_passage(str(i), "A" * 30, 50) for i in range(5)]
    meter = TokenizerMeter(CharTokenizer())
    block = fit_information(passages, meter=meter, max_tokens=130)
    assert block.shown_ids == ("0", "1")
    assert meter.count(block.text) <= 130
    assert fit_information(passages, meter=meter, max_tokens=10).shown_ids == ()


def test_headers_that_fill_the_budget_exactly_keep_every_document():
    passages = [long_passage(str(i), f"T{i}", 20) for i in range(3)]
    meter = TokenizerMeter(CharTokenizer())
    headers_only = information_block([(f"T{i}", "") for i in range(3)])
    block = fit_information(passages, meter=meter, max_tokens=len(headers_only))
    assert (block.text, block.shown_ids) == (headers_only, ("0", "1", "2"))


class JoinTaxMeter:
    """Characters, plus one unit wherever a header meets its text, as a tokenizer merging across the join.

    Parts measured alone do not pay it, so the first assembled block overshoots by one unit a document.
    """

    def count(self, text):
        return len(text) + len(re.findall(r"\) \S", text))

    def measure(self, text):
        return TokenizerMeter(CharTokenizer()).measure(text)


def test_an_assembled_block_over_budget_is_refitted_from_its_longest_document():
    passages = [long_passage("a", "Alpha", 60), long_passage("b", "Beta", 3), long_passage("c", "Gamma", 60)]
    meter = JoinTaxMeter()
    budget = 300
    block = fit_information(passages, meter=meter, max_tokens=budget)
    assert block.shown_ids == ("a", "b", "c") and block.num_tokens == meter.count(block.text) <= budget
    lines = block.text.removeprefix("\n\n<information>").split("\n")[:3]
    texts = [line.split(") ", 1)[1] for line in lines]
    headers = information_block([(passage.title, "") for passage in passages])
    first_shares = share_budget([len(p.text.replace("\n", " ")) for p in passages], budget - len(headers))
    assert texts[1] == passages[1].text.replace("\n", " ")  # the short one is untouched
    # The three-unit overshoot came off the longest share (Alpha's, the first of the two equal longest).
    assert [len(text) for text in texts] == [first_shares[0] - 3, first_shares[1], first_shares[2]]


def test_meters_cut_a_measured_text_to_a_prefix():
    words = WordMeter().measure("a  b\nc d ")
    assert (words.count, words.prefix(3), words.prefix(4), words.prefix(9), words.prefix(0)) == (
        4,
        "a  b\nc",
        "a  b\nc d ",
        "a  b\nc d ",
        "",
    )
    tokens = TokenizerMeter(CharTokenizer()).measure("abcdef")
    assert (tokens.count, tokens.prefix(4), tokens.prefix(6)) == (6, "abcd", "abcdef")
    assert isinstance(make_meter(None), WordMeter)
    assert isinstance(make_meter(CharTokenizer()), TokenizerMeter)
