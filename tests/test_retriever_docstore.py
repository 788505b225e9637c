import numpy as np
import pytest

from searchgym.retriever.base import Passage
from searchgym.retriever.corpus import Document
from searchgym.retriever.docstore import DocumentStore, DocumentStoreWriter


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "documents.arrow"
    with DocumentStoreWriter(path) as writer:
        writer.add([Document("a", '"A"\nfirst'), Document("b", '"B"\nsecond')])
        writer.add([Document("c", '"C"\nthird')])
    return DocumentStore(path)


def test_rows_number_the_documents_in_the_order_they_were_added(store):
    assert len(store) == 3
    assert store.passages(np.array([[2, 0, 1]]), np.array([[3.0, 2.0, 1.0]])) == [
        [
            Passage(id="c", contents='"C"\nthird', score=3.0),
            Passage(id="a", contents='"A"\nfirst', score=2.0),
            Passage(id="b", contents='"B"\nsecond', score=1.0),
        ]
    ]


def test_a_batch_keeps_each_query_its_own_hits_and_scores(store):
    rows = np.array([[1, -1], [-1, -1], [0, 1]])
    scores = np.array([[0.5, 0.0], [0.0, 0.0], [0.9, 0.1]], dtype=np.float32)
    found = store.passages(rows, scores, found=rows >= 0)
    assert [[(p.id, p.score) for p in passages] for passages in found] == [
        [("b", 0.5)],
        [],
        [("a", pytest.approx(0.9)), ("b", pytest.approx(0.1))],
    ]
    assert all(type(p.score) is float for passages in found for p in passages)


def test_a_batch_without_hits_finds_nothing(store):
    rows = np.array([[-1], [-1]])
    assert store.passages(rows, np.zeros((2, 1)), found=rows >= 0) == [[], []]


def test_hits_spread_over_many_record_batches_come_back_in_the_backends_order(tmp_path):
    path = tmp_path / "documents.arrow"
    documents = [Document(f"d{i}", f'"T{i}"\ntext {i}') for i in range(100)]
    with DocumentStoreWriter(path) as writer:
        for start in range(0, 100, 7):  # batches of 7 rows, the last of 2
            writer.add(documents[start : start + 7])
    store = DocumentStore(path)
    rows = np.random.default_rng(0).integers(0, 100, size=(5, 8))
    rows[1, 3] = 99  # the last row of the last batch
    rows[2, 0] = 0
    scores = np.arange(40, dtype=np.float32).reshape(5, 8)
    found = store.passages(rows, scores)
    assert len(store) == 100
    assert [[p.id for p in passages] for passages in found] == [[f"d{row}" for row in line] for line in rows]
    assert [[p.contents for p in passages] for passages in found] == [
        [documents[row].contents for row in line] for line in rows
    ]
    assert [[p.score for p in passages] for passages in found] == scores.tolist()
