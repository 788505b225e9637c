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
