import pytest

from retriever.base import Passage
from retriever.corpus import Document
from retriever.docstore import DocumentStore, DocumentStoreWriter


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "documents.arrow"
    with DocumentStoreWriter(path) as writer:
        writer.add([Document("a", '"A"\nfirst'), Document("b", '"B"\nsecond')])
        writer.add([Document("c", '"C"\nthird')])
    return DocumentStore(path)


def test_rows_number_the_documents_in_the_order_they_were_added(store):
    assert len(store) == 3
    assert store.passages([[2, 0, 1]], [[3.0, 2.0, 1.0]]) == [
        [
            Passage(id="c", contents='"C"\nthird', score=3.0),
            Passage(id="a", contents='"A"\nfirst', score=2.0),
            Passage(id="b", contents='"B"\nsecond', score=1.0),
        ]
    ]


def test_a_batch_keeps_each_query_its_own_rows_and_scores(store):
    found = store.passages([[1], [], [0, 1]], [[0.5], [], [0.9, 0.1]])
    assert [[(p.id, p.score) for p in passages] for passages in found] == [
        [("b", 0.5)],
        [],
        [("a", 0.9), ("b", 0.1)],
    ]


def test_a_batch_without_rows_finds_nothing(store):
    assert store.passages([[], []], [[], []]) == [[], []]
