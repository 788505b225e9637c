"""The reranker's training pairs (benchmarks/train_reranker.py): gold positives, safe hard negatives."""

import importlib.util

from searchgym.env.data import load_dataset
from searchgym.env.rewards import normalize_answer
from searchgym.paths import REPO_ROOT


def load_script():
    spec = importlib.util.spec_from_file_location(
        "train_reranker", REPO_ROOT / "benchmarks" / "train_reranker.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_question_gets_its_gold_passage_then_negatives_without_gold_or_answer(tmp_path):
    questions, passages, labels = load_script().training_pairs(tmp_path / "bm25", negatives=2, candidates=10)
    rows = {example.question: example for example in load_dataset("wiki-mini-train")}
    assert len(questions) == len(passages) == len(labels)
    positives = [i for i, label in enumerate(labels) if label == 1.0]
    assert len(positives) == sum(1 for example in rows.values() if example.gold_doc_ids)
    for start, end in zip(positives, [*positives[1:], len(labels)], strict=True):
        assert set(questions[start:end]) == {questions[start]} and 1 <= end - start <= 3
        assert labels[start + 1 : end] == [0.0] * (end - start - 1)
        answers = [normalize_answer(a) for a in rows[questions[start]].golden_answers]
        assert passages[start].startswith("(Title: ")  # as the reranker sees a passage when serving
        for negative in passages[start + 1 : end]:
            assert negative != passages[start]
            assert not any(answer and answer in normalize_answer(negative) for answer in answers)
