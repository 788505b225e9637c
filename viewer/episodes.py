"""The viewer's records of an episode, built from a training sample or an eval prediction.

Two sources, one shape: a line of a training run's ``samples/episodes.jsonl`` (written by
``searchgym.train.tracking.episode_record``) and a line of an eval run's ``predictions.jsonl`` (a
``searchgym.eval.records.Prediction``). The list and the filters use :class:`EpisodeSummary` (kept in
memory for every line); one episode's page uses :class:`EpisodeDetail` (built from its one line).
"""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

INFORMATION = re.compile(r"<information>(.*?)</information>", re.DOTALL)
DOCUMENT_HEADER = re.compile(r"^Doc (\d+)\(Title: (.*?)\) ?(.*)$")
THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)
SEARCH = re.compile(r"<search>(.*?)</search>", re.DOTALL)
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass(frozen=True, slots=True)
class EpisodeSummary:
    """What the episode list shows and filters on, one per line of the run's episode file.

    Attributes:
        line: the line of the episode file (1-based): the episode's id in URLs.
        step: the training step it was sampled at; None for an eval prediction.
        dataset: the dataset it came from ("" when unknown).
        example_id: the QA example's id.
        question: the question text.
        answer: the final answer, or None when the episode gave none.
        golden_answers: every accepted answer.
        reward: the scalar reward (training), or None (eval, or not computable).
        em: exact match, or None when it could not be computed.
        f1: token F1, or None.
        searches: searches issued.
        end_reason: how the episode ended (``answered``, ``max_turns``, ``context_budget``, ...).
    """

    line: int
    step: int | None
    dataset: str
    example_id: str
    question: str
    answer: str | None
    golden_answers: tuple[str, ...]
    reward: float | None
    em: float | None
    f1: float | None
    searches: int
    end_reason: str | None
    haystack: str = field(default="", repr=False, compare=False)
    """Question, answer, gold answers and example id in lower case, built once for the text filter."""

    def __post_init__(self) -> None:
        texts = (self.question, self.answer or "", *self.golden_answers, self.example_id)
        object.__setattr__(self, "haystack", "\n".join(texts).lower())

    @property
    def key(self) -> tuple[str, str]:
        """(dataset, example id): how the same question is found in another run or step."""
        return (self.dataset, self.example_id)


@dataclass(frozen=True, slots=True)
class Passage:
    """A retrieved document as the policy was shown it.

    Attributes:
        rank: its place in the observation (1-based).
        title: its title.
        text: its text, as trimmed to the observation budget.
        doc_id: its corpus id, when the run recorded it.
        gold: whether it is one of the example's gold passages.
    """

    rank: int
    title: str
    text: str
    doc_id: str | None
    gold: bool


@dataclass(frozen=True, slots=True)
class Turn:
    """One turn: what the policy wrote and what the env answered.

    Attributes:
        number: the turn (1-based).
        action_type: ``search``, ``answer`` or ``invalid`` (``""`` when not recorded).
        text: everything the policy wrote in the turn.
        reasoning: the contents of its ``<think>`` tags.
        query: the search query, if it searched.
        answer: the answer, if it answered.
        passages: the documents shown back after a search.
        notice: an observation that is not a list of documents (an invalid-action notice, a last-turn
            reminder).
    """

    number: int
    action_type: str
    text: str
    reasoning: str
    query: str | None
    answer: str | None
    passages: tuple[Passage, ...]
    notice: str


@dataclass(frozen=True, slots=True)
class Token:
    """One response token of a training sample: text, loss mask, sampler log-prob, turn."""

    text: str
    mask: int
    logprob: float | None
    turn: int


@dataclass(frozen=True, slots=True)
class RewardParts:
    """The reward and where it came from (training samples).

    Attributes:
        total: the reward used in the update (None: not computable, masked).
        outcome: the answer's score (EM or F1, as configured).
        shaping: the format / retrieval shaping term.
        search_cost: the penalty for searching (0 or negative).
        error: why the reward could not be computed.
    """

    total: float | None
    outcome: float | None
    shaping: float | None
    search_cost: float | None
    error: str | None


@dataclass(frozen=True, slots=True)
class EpisodeDetail:
    """Everything one episode's page shows.

    Attributes:
        summary: the list's record of it.
        turns: its turns in order.
        gold_doc_ids: the example's gold passages, when the dataset has them.
        cover_em: whether a gold answer is contained in the answer.
        reward: the reward and its parts (training samples only).
        gold_recall: share of the gold passages retrieved (eval predictions that know them).
        error: why the episode ended abnormally, if it did.
        prompt: the decoded prompt (training samples only).
        tokens: the response tokens (training samples only).
    """

    summary: EpisodeSummary
    turns: tuple[Turn, ...]
    gold_doc_ids: tuple[str, ...]
    cover_em: float | None
    reward: RewardParts | None
    gold_recall: float | None
    error: str | None
    prompt: str | None
    tokens: tuple[Token, ...]


# ---------------------------------------------------------------------------------------------- training
def training_summary(row: Mapping[str, Any], line: int) -> EpisodeSummary:
    """The summary of a line of ``samples/episodes.jsonl``."""
    return EpisodeSummary(
        line=line,
        step=int(row["step"]),
        dataset=str(row.get("dataset") or ""),
        example_id=str(row["example_id"]),
        question=str(row["question"]),
        answer=_optional_str(row.get("answer")),
        golden_answers=tuple(str(answer) for answer in row.get("golden_answers") or ()),
        reward=_optional_float(row.get("reward")),
        em=_optional_float(row.get("em")),
        f1=_optional_float(row.get("f1")),
        searches=int(row.get("searches") or 0),
        end_reason=_optional_str(row.get("end_reason")),
    )


def training_detail(row: Mapping[str, Any], line: int) -> EpisodeDetail:
    """The page of a training sample: turns with the observations it was shown, reward parts, tokens."""
    gold_ids = tuple(str(doc_id) for doc_id in row.get("gold_doc_ids") or ())
    turns = tuple(
        _turn(
            number,
            action_type=str(turn.get("action_type") or ""),
            text=str(turn.get("text") or ""),
            observation=str(turn.get("observation") or ""),
            retrieved_ids=[str(doc_id) for doc_id in turn.get("retrieved_ids") or ()],
            gold_ids=gold_ids,
        )
        for number, turn in enumerate(row.get("turns") or (), start=1)
    )
    parts = row.get("reward_parts") or {}
    return EpisodeDetail(
        summary=training_summary(row, line),
        turns=turns,
        gold_doc_ids=gold_ids,
        cover_em=_optional_float(row.get("cover_em")),
        reward=RewardParts(
            total=_optional_float(row.get("reward")),
            outcome=_optional_float(parts.get("outcome")),
            shaping=_optional_float(parts.get("shaping")),
            search_cost=_optional_float(parts.get("search_cost")),
            error=_optional_str(row.get("reward_error")),
        ),
        gold_recall=None,
        error=_optional_str(row.get("error")),
        prompt=_optional_str(row.get("prompt")),
        tokens=_tokens(row.get("tokens") or {}),
    )


def _tokens(tokens: Mapping[str, Any]) -> tuple[Token, ...]:
    texts = tokens.get("text") or []
    masks = tokens.get("mask") or []
    turns = tokens.get("turn") or [0] * len(texts)
    logprobs = tokens.get("logprobs") or [None] * len(texts)
    if not len(texts) == len(masks) == len(turns) == len(logprobs):
        raise ValueError("the per-token lists of the sample differ in length")
    return tuple(
        Token(str(text), int(mask), _optional_float(logprob), int(turn))
        for text, mask, logprob, turn in zip(texts, masks, logprobs, turns, strict=True)
    )


# ---------------------------------------------------------------------------------------------- eval
def prediction_summary(row: Mapping[str, Any], line: int) -> EpisodeSummary:
    """The summary of a line of ``predictions.jsonl``."""
    return EpisodeSummary(
        line=line,
        step=None,
        dataset=str(row["dataset"]),
        example_id=str(row["example_id"]),
        question=str(row["question"]),
        answer=_optional_str(row.get("prediction")),
        golden_answers=tuple(str(answer) for answer in row.get("golden_answers") or ()),
        reward=None,
        em=_optional_float(row["exact_match"]),
        f1=_optional_float(row.get("f1")),
        searches=int(row.get("num_searches") or 0),
        end_reason=_optional_str(row.get("end_reason")),
    )


def prediction_detail(row: Mapping[str, Any], line: int) -> EpisodeDetail:
    """The page of an eval prediction: its trajectory text split into turns at the observations."""
    gold_ids = tuple(str(doc_id) for doc_id in row.get("gold_doc_ids") or ())
    retrieved = [[str(doc_id) for doc_id in ids] for ids in row.get("retrieved_ids") or ()]
    return EpisodeDetail(
        summary=prediction_summary(row, line),
        turns=split_trajectory(str(row.get("trajectory") or ""), retrieved, gold_ids),
        gold_doc_ids=gold_ids,
        cover_em=_optional_float(row.get("cover_exact_match")),
        reward=None,
        gold_recall=_optional_float(row.get("gold_recall")),
        error=_optional_str(row.get("error")),
        prompt=None,
        tokens=(),
    )


def split_trajectory(
    text: str, retrieved_ids: Sequence[Sequence[str]], gold_ids: Sequence[str]
) -> tuple[Turn, ...]:
    """The turns of a decoded trajectory: the policy's text up to each ``<information>`` block, then the rest.

    The ``n``-th block holds the documents of the ``n``-th search, so it is paired with
    ``retrieved_ids[n]``. Notices between turns (invalid action, last turn) stay in the text.
    """
    turns = []
    start = 0
    for number, block in enumerate(INFORMATION.finditer(text), start=1):
        ids = retrieved_ids[number - 1] if number - 1 < len(retrieved_ids) else []
        turns.append(_turn(number, "", text[start : block.start()], block.group(0), ids, gold_ids))
        start = block.end()
    rest = text[start:]
    if rest.strip() or not turns:
        turns.append(_turn(len(turns) + 1, "", rest, "", [], gold_ids))
    return tuple(turns)


def _turn(
    number: int,
    action_type: str,
    text: str,
    observation: str,
    retrieved_ids: Sequence[str],
    gold_ids: Sequence[str],
) -> Turn:
    query = _last(SEARCH, text)
    answer = _last(ANSWER, text)
    if not action_type:
        action_type = "answer" if answer is not None else "search" if query is not None else "invalid"
    block = INFORMATION.search(observation)
    passages = parse_passages(block.group(1), retrieved_ids, gold_ids) if block else ()
    notice = observation if block is None else observation[: block.start()] + observation[block.end() :]
    return Turn(
        number=number,
        action_type=action_type,
        text=text.strip(),
        reasoning="\n".join(part.strip() for part in THINK.findall(text)),
        query=query,
        answer=answer,
        passages=passages,
        notice=notice.strip(),
    )


def parse_passages(block: str, retrieved_ids: Sequence[str], gold_ids: Sequence[str]) -> tuple[Passage, ...]:
    r"""The documents of an ``<information>`` block (``Doc 1(Title: T) text`` lines), with their ids.

    A line that does not start a document continues the one before it. The ``n``-th document is paired
    with ``retrieved_ids[n]`` (documents are shown in retrieval order).

    >>> block = "Doc 1(Title: Paris) Capital.\nDoc 2(Title: Lyon) A city.\n"
    >>> parse_passages(block, ["d1", "d2"], ["d2"])[1]
    Passage(rank=2, title='Lyon', text='A city.', doc_id='d2', gold=True)
    """
    documents: list[list[str]] = []
    for line in block.strip("\n").split("\n"):
        header = DOCUMENT_HEADER.match(line)
        if header is not None:
            documents.append([header.group(2), header.group(3)])
        elif documents:
            documents[-1][1] += "\n" + line
    gold = set(gold_ids)
    passages = []
    for rank, (title, text) in enumerate(documents, start=1):
        doc_id = retrieved_ids[rank - 1] if rank - 1 < len(retrieved_ids) else None
        passages.append(Passage(rank, title, text.strip(), doc_id, doc_id is not None and doc_id in gold))
    return tuple(passages)


def _last(pattern: re.Pattern[str], text: str) -> str | None:
    found = pattern.findall(text)
    return found[-1].strip() if found else None


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)
