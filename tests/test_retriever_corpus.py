import gzip
import hashlib
import json

import pytest
from retriever_fixtures import TINY_CORPUS, write_jsonl

from searchgym.retriever.corpus import CorpusError, Document, batched, file_sha256, parse_row, read_corpus


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz"])
def test_both_file_kinds_stream_the_same_documents(tmp_path, name):
    path = write_jsonl(tmp_path / name, TINY_CORPUS)
    documents = list(read_corpus(path))
    assert documents == [Document(row["id"], row["contents"]) for row in TINY_CORPUS]


def test_progress_bar_reading_yields_the_same_documents(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl.gz", TINY_CORPUS)
    assert list(read_corpus(path, progress=True)) == list(read_corpus(path))


def test_title_text_rows_integer_ids_and_blank_lines(tmp_path):
    rows = [json.dumps({"id": 7, "title": "Mars", "text": "The red planet."}), "", "   "]
    rows.append(json.dumps({"id": "8", "contents": '"Venus"\nHot.'}))
    documents = list(read_corpus(write_jsonl(tmp_path / "c.jsonl", rows)))
    assert documents == [Document("7", '"Mars"\nThe red planet.'), Document("8", '"Venus"\nHot.')]


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ('{"id": "2", "contents": "unterminated', "not valid JSON"),
        ('["2", "text"]', "expected a JSON object"),
        ('{"contents": "no id"}', "no 'id' key"),
        ('{"id": true, "contents": "x"}', "'id' must be a string or an integer"),
        ('{"id": "2", "text": "no title"}', "expected a string 'contents'"),
        ('{"id": "2", "contents": 5}', "expected a string 'contents'"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"id": "2", "contents": "\\ud800 alone"}', r"its text holds an unpaired surrogate \('\\ud800' at"),
        ('{"id": "\\udfff", "contents": "x"}', "its id holds an unpaired surrogate"),
    ],
)
def test_a_malformed_line_is_reported_with_its_number(tmp_path, bad_line, reason):
    rows = [json.dumps(TINY_CORPUS[0]), json.dumps(TINY_CORPUS[1]), bad_line, json.dumps(TINY_CORPUS[2])]
    path = write_jsonl(tmp_path / "c.jsonl.gz", rows)
    with pytest.raises(CorpusError, match=f"line 3: {reason}"):
        list(read_corpus(path))


def test_bytes_that_are_not_utf8_are_reported_with_their_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(json.dumps(TINY_CORPUS[0]).encode() + b'\n{"id": "1", "contents": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match="line 2: not UTF-8"):
        list(read_corpus(path))


def test_a_truncated_gzip_file_is_a_corpus_error(tmp_path):
    whole = gzip.compress("".join(json.dumps(row) + "\n" for row in TINY_CORPUS * 50).encode())
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CorpusError, match="cannot be read"):
        list(read_corpus(path))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, "does not exist"),
        ("c.json", "{}", "must end with .jsonl or .jsonl.gz"),
        ("empty.jsonl", "\n\n", "has no documents"),
    ],
)
def test_unusable_files_are_refused(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(CorpusError, match=message):
        list(read_corpus(path))


def test_parse_row_keeps_contents_verbatim():
    assert parse_row({"id": "1", "contents": '"T"\nx', "extra": 1}) == Document("1", '"T"\nx')


def test_file_sha256_is_the_sha256_of_the_bytes(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", TINY_CORPUS)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_batched_keeps_order_and_the_short_tail():
    documents = [Document(str(i), "x") for i in range(5)]
    assert [[d.id for d in batch] for batch in batched(documents, 2)] == [["0", "1"], ["2", "3"], ["4"]]


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz"])
def test_a_repeated_id_is_refused_with_both_lines(tmp_path, name):
    rows = [json.dumps(TINY_CORPUS[0]), "", json.dumps({"id": "1", "contents": "a"})]
    rows += [json.dumps({"id": "x", "contents": "b"}), json.dumps({"id": 1, "contents": "c"})]
    path = write_jsonl(tmp_path / name, rows)
    with pytest.raises(CorpusError, match=r"line 5: id '1' was already used on line 3; ids must be unique"):
        list(read_corpus(path))


def test_many_distinct_ids_pass_the_uniqueness_check(tmp_path):
    rows = [json.dumps({"id": i, "contents": f"doc {i}"}) for i in range(5000)]
    assert len(list(read_corpus(write_jsonl(tmp_path / "c.jsonl", rows)))) == 5000
