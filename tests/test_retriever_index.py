import dataclasses
import json

import pytest
from retriever_fixtures import TINY_CORPUS, write_jsonl

from searchgym import __version__
from searchgym.errors import SearchgymError
from searchgym.retriever.bm25 import Bm25Retriever
from searchgym.retriever.client import HttpRetriever
from searchgym.retriever.corpus import CorpusError, file_sha256
from searchgym.retriever.index import IndexSpec, build_index, ensure_index, load_retriever, open_index
from searchgym.retriever.manifest import FORMAT_VERSION, IndexLoadError, IndexMismatchError, Manifest


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "tiny.jsonl.gz", TINY_CORPUS)


@pytest.fixture
def spec(tmp_path, corpus):
    return IndexSpec(corpus=corpus, out=tmp_path / "index", progress=False)


def edit_manifest(index_dir, **changes):
    path = index_dir / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_the_manifest_records_what_was_indexed_and_how(spec, corpus):
    manifest = build_index(spec)
    assert manifest == Manifest.load(spec.out)
    assert (manifest.method, manifest.num_documents) == ("bm25", len(TINY_CORPUS))
    assert manifest.corpus.sha256 == file_sha256(corpus)
    assert (manifest.format_version, manifest.searchgym_version) == (FORMAT_VERSION, __version__)
    assert (manifest.bm25.k1, manifest.bm25.b) == (0.9, 0.4)
    assert sorted(path.name for path in spec.out.iterdir()) == ["bm25s", "documents.arrow", "manifest.json"]


def test_an_existing_index_is_kept_unless_overwrite(spec):
    build_index(spec)
    with pytest.raises(SearchgymError, match="--overwrite"):
        build_index(spec)
    assert build_index(dataclasses.replace(spec, overwrite=True)).num_documents == len(TINY_CORPUS)


def test_a_folder_that_is_not_an_index_is_never_replaced(spec):
    spec.out.mkdir()
    (spec.out / "thesis.tex").write_text("precious")
    with pytest.raises(SearchgymError, match="is not a searchgym index"):
        build_index(dataclasses.replace(spec, overwrite=True))
    assert (spec.out / "thesis.tex").read_text() == "precious"


def test_a_failed_build_leaves_nothing_behind(tmp_path, spec):
    bad = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(TINY_CORPUS[0]), "not json"])
    with pytest.raises(CorpusError, match="line 2"):
        build_index(dataclasses.replace(spec, corpus=bad))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.jsonl", "tiny.jsonl.gz"]


def test_ensure_index_reuses_a_matching_index_and_rebuilds_a_stale_one(tmp_path, spec):
    first = ensure_index(spec)
    built_at = (spec.out / "documents.arrow").stat().st_mtime_ns
    assert ensure_index(spec) == first
    assert (spec.out / "documents.arrow").stat().st_mtime_ns == built_at
    changed = write_jsonl(tmp_path / "tiny.jsonl.gz", TINY_CORPUS[:5])
    assert ensure_index(dataclasses.replace(spec, corpus=changed)).num_documents == 5
    assert len(load_retriever(spec.out).search(["planet"], 10)[0]) == 2


def test_open_index_accepts_the_same_corpus_and_refuses_another(tmp_path, spec, corpus):
    build_index(spec)
    assert open_index(spec.out, corpus=corpus).manifest.num_documents == len(TINY_CORPUS)
    other = write_jsonl(tmp_path / "other.jsonl", TINY_CORPUS[:3])
    with pytest.raises(IndexMismatchError, match="built from another corpus"):
        open_index(spec.out, corpus=other)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_documents": 99}, "holds 12 documents, its manifest 99"),
        ({"format_version": FORMAT_VERSION + 1}, "upgrade searchgym or rebuild"),
        ({"method": "colbert"}, "malformed"),
        ({"bm25": None}, "malformed"),
    ],
)
def test_an_inconsistent_manifest_is_a_clear_error(spec, changes, message):
    build_index(spec)
    edit_manifest(spec.out, **changes)
    with pytest.raises(IndexLoadError, match=message):
        open_index(spec.out)


def test_a_folder_without_manifest_says_how_to_build_one(tmp_path):
    with pytest.raises(IndexLoadError, match="searchgym index --corpus"):
        open_index(tmp_path)


def test_load_retriever_opens_folders_and_urls(spec):
    build_index(spec)
    assert isinstance(load_retriever(spec.out), Bm25Retriever)
    client = load_retriever("http://127.0.0.1:9/", max_retries=0)
    assert isinstance(client, HttpRetriever)
    assert (client.url, client.max_retries) == ("http://127.0.0.1:9/retrieve", 0)


def test_load_retriever_takes_a_str_folder_and_names_options_of_the_other_kind(spec):
    build_index(spec)
    assert isinstance(load_retriever(str(spec.out)), Bm25Retriever)
    with pytest.raises(
        SearchgymError, match=r"an index folder takes no option max_retries, timeout_s; .*device"
    ):
        load_retriever(str(spec.out), timeout_s=5, max_retries=0)
    with pytest.raises(SearchgymError, match=r"a server URL takes no option device; .*timeout_s"):
        load_retriever("http://127.0.0.1:9/retrieve", device="cpu")
    with pytest.raises(SearchgymError, match="an index folder or a server URL, not NoneType"):
        load_retriever(None)
