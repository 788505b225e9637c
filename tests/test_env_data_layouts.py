"""Search-R1's merged parquet, FlashRAG's folders and ``datasets`` folders, as eval benchmarks."""

import pytest
from data_layout_fixtures import write_flashrag_root, write_search_r1_merged

from searchgym.env.data import DatasetError, expand_benchmarks, load_dataset
from searchgym.eval.config import EvalConfig
from searchgym.eval.inputs import load_items


def test_a_merged_search_r1_file_becomes_one_benchmark_per_data_source(tmp_path):
    merged = str(write_search_r1_merged(tmp_path / "test.parquet"))
    expanded = expand_benchmarks([merged])
    assert expanded == (f"{merged}#nq", f"{merged}#triviaqa", f"{merged}#popqa")
    triviaqa = load_dataset(expanded[1])
    assert [(e.id, e.question, e.golden_answers, e.source) for e in triviaqa] == [
        ("dev_0", "Who was the man behind The Chipmunks?", ("David Seville",), "triviaqa"),
        ("dev_1", "What star sign is Jamie Lee Curtis?", ("Scorpio", "Scorpius"), "triviaqa"),
    ]
    items = load_items(EvalConfig(benchmarks=expanded, mode="direct"))
    assert [(item.dataset, item.example.id) for item in items] == [
        ("nq", "test_0"), ("nq", "test_1"), ("triviaqa", "dev_0"), ("triviaqa", "dev_1"), ("popqa", "test_0")
    ]  # fmt: skip
    assert items[0].example.question == "who got the first nobel prize in physics?"  # Search-R1 added the '?'


def test_the_whole_merged_file_still_loads_for_training(tmp_path):
    merged = write_search_r1_merged(tmp_path / "test.parquet")
    assert [e.source for e in load_dataset(merged)] == ["nq", "nq", "triviaqa", "triviaqa", "popqa"]


def test_a_data_source_the_file_lacks_is_a_clear_error(tmp_path):
    merged = write_search_r1_merged(tmp_path / "test.parquet")
    with pytest.raises(DatasetError, match=r"no rows with data_source 'hotpotqa'; it has \['nq', 'triviaqa'"):
        load_dataset(f"{merged}#hotpotqa")


def test_a_flashrag_folder_becomes_its_datasets_named_by_folder(tmp_path):
    root = write_flashrag_root(tmp_path / "FlashRAG_datasets")
    expanded = expand_benchmarks([str(root)])
    # test when there is one, else dev (triviaqa has no test split), never train
    assert expanded == tuple(
        str(root / f) for f in ("nq/test.jsonl", "popqa/test.jsonl", "triviaqa/dev.jsonl")
    )
    assert EvalConfig(benchmarks=expanded, mode="direct").dataset_labels == ("nq", "popqa", "triviaqa")
    # one dataset's folder, or its split file given by hand, name the column the same way
    assert expand_benchmarks([str(root / "triviaqa")]) == (str(root / "triviaqa/dev.jsonl"),)
    items = load_items(
        EvalConfig(benchmarks=(str(root / "nq/train.jsonl"), str(root / "popqa")), mode="direct")
    )
    assert [(item.dataset, item.example.golden_answers) for item in items] == [
        ("nq", ("Glen Hansard", "Markéta Irglová")), ("popqa", ("politician", "political leader"))
    ]  # fmt: skip


def test_a_folder_without_qa_data_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"holds no QA data: expected FlashRAG's layout"):
        expand_benchmarks([str(tmp_path / "empty")])


def test_datasets_save_to_disk_folders_in_either_schema(tmp_path):
    datasets = pytest.importorskip("datasets")
    root = write_flashrag_root(tmp_path / "flashrag")
    nq = datasets.load_dataset("json", data_files={s: str(root / f"nq/{s}.jsonl") for s in ("train", "test")})
    nq.save_to_disk(str(tmp_path / "saved" / "nq"))  # a DatasetDict: FlashRAG's records
    merged = datasets.Dataset.from_parquet(str(write_search_r1_merged(tmp_path / "merged.parquet")))
    merged.save_to_disk(str(tmp_path / "saved" / "search_r1_test"))  # a Dataset: Search-R1's schema
    saved = tmp_path / "saved"
    expanded = expand_benchmarks([str(saved / "nq"), str(saved / "search_r1_test")])
    assert expanded == (
        str(saved / "nq/test"),  # the DatasetDict's test split
        *(f"{saved / 'search_r1_test'}#{source}" for source in ("nq", "triviaqa", "popqa")),
    )
    nq_items = load_items(EvalConfig(benchmarks=expanded[:1], mode="direct"))
    assert [(i.dataset, i.example.id, i.example.golden_answers) for i in nq_items] == [
        ("nq", "test_0", ("Wilhelm Conrad Röntgen",)),
        ("nq", "test_1", ("May 18, 2018",)),
    ]
    search_r1_items = load_items(EvalConfig(benchmarks=expanded[1:], mode="direct"))
    assert [(i.dataset, i.example.id) for i in search_r1_items] == [
        ("nq", "test_0"), ("nq", "test_1"), ("triviaqa", "dev_0"), ("triviaqa", "dev_1"), ("popqa", "test_0")
    ]  # fmt: skip
    assert search_r1_items[-1].example.golden_answers == ("politician", "political leader")
