import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from searchgym.env.data import (
    BENCHMARKS,
    DatasetError,
    QAExample,
    dataset_names,
    load_dataset,
    load_flashrag_jsonl,
    load_search_r1_parquet,
)
from searchgym.errors import SearchgymError

# Search-R1's scripts/data_process/nq_search.py builds prompts like this one.
SEARCH_R1_PROMPT = (
    "Answer the given question. ... For example, <answer> Beijing </answer>. Question: {question}\n"
)


def write_jsonl(path, records, *, compress=False):
    text = "".join(json.dumps(record) + "\n" for record in records)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def search_r1_table(*, with_question):
    questions = ["who wrote hamlet?", "capital of france?"]
    columns = {
        "data_source": ["nq", "hotpotqa"],
        "prompt": [[{"role": "user", "content": SEARCH_R1_PROMPT.format(question=q)}] for q in questions],
        "ability": ["fact-reasoning"] * 2,
        "reward_model": [
            {"style": "rule", "ground_truth": {"target": ["William Shakespeare", "Shakespeare"]}},
            {"style": "rule", "ground_truth": {"target": ["Paris"]}},
        ],
        "extra_info": [{"split": "train", "index": 0}, {"split": "train", "index": 1}],
    }
    if with_question:
        columns |= {"id": ["train_0", "train_1"], "question": questions}
    return pa.table(columns)


def test_bundled_wiki_mini_dev_keeps_its_extra_fields():
    examples = load_dataset("wiki-mini-dev")
    assert len(examples) == 250
    first = examples[0]
    assert first.source is not None and first.golden_answers
    assert any(example.gold_doc_ids for example in examples)
    assert len({example.id for example in examples}) == 250


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_bundled_benchmark_loads_by_name(name):
    examples = load_dataset(name, limit=5)
    assert len(examples) == 5
    assert all(example.question and example.golden_answers for example in examples)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(SearchgymError) as caught:
        load_dataset("natural-questions")
    for name in dataset_names():
        assert name in str(caught.value)


def test_jsonl_gz_round_trip_keeps_every_field(tmp_path):
    original = [
        QAExample("a", "Who?", ("X", "Y"), source="mine", gold_doc_ids=("7",), extra={"hops": 2}),
        QAExample("b", "What?", ("Z",)),
    ]
    path = write_jsonl(tmp_path / "qa.jsonl.gz", [example.to_record() for example in original], compress=True)
    assert load_dataset(path) == original


def test_flashrag_records_are_tolerated_where_unambiguous(tmp_path):
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"question": "How many?", "golden_answers": 3},
            {"id": 7, "question": "Who?", "golden_answers": "Ann"},
        ],
    )
    first, second = load_flashrag_jsonl(path)
    assert (first.id, first.golden_answers) == ("qa-1", ("3",))
    assert (second.id, second.golden_answers) == ("7", ("Ann",))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "qa.jsonl:2: not valid JSON"),
        ("[1, 2]", "qa.jsonl:2: expected a JSON object"),
        ('{"id": "b", "golden_answers": ["x"]}', "qa.jsonl:2: needs a non-empty 'question'"),
        ('{"id": "b", "question": "Who?"}', "qa.jsonl:2: needs 'golden_answers'"),
        ('{"id": "b", "question": "Who?", "golden_answers": [{"x": 1}]}', "must be a list of strings"),
    ],
)
def test_malformed_lines_are_reported_with_their_line_number(tmp_path, line, message):
    path = tmp_path / "qa.jsonl"
    path.write_text(
        '{"id": "a", "question": "Who?", "golden_answers": ["x"]}\n' + line + "\n", encoding="utf-8"
    )
    with pytest.raises(DatasetError, match=message):
        load_dataset(path)


def test_unsupported_and_missing_files_say_what_is_accepted(tmp_path):
    csv = tmp_path / "qa.csv"
    csv.write_text("id,question\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"\.jsonl\.gz \(FlashRAG\), \.parquet \(Search-R1\) or a folder"):
        load_dataset(csv)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "missing.jsonl")


def test_search_r1_parquet_with_question_column(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(search_r1_table(with_question=True), path)
    first, second = load_dataset(path)
    assert first == QAExample(
        "train_0",
        "who wrote hamlet?",
        ("William Shakespeare", "Shakespeare"),
        source="nq",
        extra={"ability": "fact-reasoning", "extra_info": {"split": "train", "index": 0}},
    )
    assert second.source == "hotpotqa" and second.golden_answers == ("Paris",)


def test_search_r1_parquet_without_question_reads_it_from_the_prompt(tmp_path):
    path = tmp_path / "test.parquet"
    pq.write_table(search_r1_table(with_question=False), path)
    examples = load_search_r1_parquet(path, limit=1)
    assert [(example.id, example.question) for example in examples] == [("nq_train_0", "who wrote hamlet?")]


def test_parquet_without_ground_truth_is_rejected(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"question": ["Who?"], "answer": ["x"]}), path)
    with pytest.raises(DatasetError, match=r"needs reward_model\.ground_truth\.target"):
        load_dataset(path)
