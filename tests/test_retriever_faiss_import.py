"""Adopting a FAISS index built as Search-R1 builds it, with a tiny random e5-style encoder."""

import faiss
import numpy as np
import pytest
from retriever_fixtures import (
    QUERIES,
    TINY_CORPUS,
    search_r1_encode,
    search_r1_flat_index,
    tiny_random_encoder,
    write_jsonl,
)

from searchgym.cli import main
from searchgym.retriever.faiss_import import FaissImportError, FaissImportSpec, import_faiss_index
from searchgym.retriever.index import load_retriever
from searchgym.retriever.manifest import Manifest


@pytest.fixture(scope="module")
def search_r1(tmp_path_factory):
    """(encoder folder, corpus file, e5_Flat.index) as a Search-R1 user has them."""
    root = tmp_path_factory.mktemp("search-r1")
    encoder = tiny_random_encoder(root / "e5-tiny")  # "e5" in the name: searchgym picks e5's prefixes
    corpus = write_jsonl(root / "wiki-18.jsonl", TINY_CORPUS)
    return encoder, corpus, search_r1_flat_index(encoder, TINY_CORPUS, root / "e5_Flat.index")


def spec(search_r1, out, **overrides):
    encoder, corpus, index = search_r1
    settings = {"pooling": "mean", "max_length": 180, "device": "cpu", "progress": False} | overrides
    return FaissImportSpec(faiss_file=index, corpus=corpus, out=out, model=str(encoder), **settings)


def test_an_adopted_index_answers_as_search_r1s_server_would(search_r1, tmp_path):
    manifest = import_faiss_index(spec(search_r1, tmp_path / "adopted"))
    assert manifest.num_documents == len(TINY_CORPUS) and manifest.faiss_type == "imported IndexFlatIP"
    assert (manifest.encoder.query_prefix, manifest.encoder.passage_prefix) == ("query: ", "passage: ")
    assert (manifest.encoder.pooling, manifest.encoder.max_length, manifest.encoder.dimension) == (
        "mean",
        180,
        32,
    )
    # Search-R1's retrieval_server: "query: " + mean pooling, then inner product against the stored vectors.
    stored = faiss.read_index(str(search_r1[2])).reconstruct_n(0, len(TINY_CORPUS))
    scores = search_r1_encode(search_r1[0], QUERIES, prefix="query: ") @ stored.T
    expected = [[TINY_CORPUS[row]["id"] for row in np.argsort(-row_scores)[:3]] for row_scores in scores]
    results = load_retriever(tmp_path / "adopted", device="cpu").search(QUERIES, 3)
    assert [[p.id for p in passages] for passages in results] == expected
    np.testing.assert_allclose([p.score for p in results[0]], np.sort(scores[0])[::-1][:3], rtol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pooling": "cls"}, r"median centred cosine .* Check --pooling"),
        ({"passage_prefix": ""}, r"passage prefix ''.*median centred cosine"),
    ],
)
def test_an_index_built_another_way_is_refused_with_the_likely_cause(search_r1, tmp_path, overrides, message):
    with pytest.raises(FaissImportError, match=message):
        import_faiss_index(spec(search_r1, tmp_path / "adopted", **overrides))
    assert not (tmp_path / "adopted").exists()


def test_rows_dimension_and_metric_are_checked(search_r1, tmp_path):
    encoder, corpus, index = search_r1
    longer = write_jsonl(tmp_path / "longer.jsonl", [*TINY_CORPUS, {"id": "12", "contents": '"X"\nextra'}])
    with pytest.raises(FaissImportError, match=r"holds 12 vectors but .*longer.jsonl has 13 passages"):
        import_faiss_index(spec((encoder, longer, index), tmp_path / "a"))
    wider = tiny_random_encoder(tmp_path / "e5-wider", hidden_size=48)
    with pytest.raises(FaissImportError, match=r"holds 32-d vectors but .* makes 48-d vectors"):
        import_faiss_index(spec((wider, corpus, index), tmp_path / "b"))
    l2 = faiss.IndexFlatL2(32)
    l2.add(faiss.read_index(str(index)).reconstruct_n(0, len(TINY_CORPUS)))
    faiss.write_index(l2, str(tmp_path / "l2.index"))
    with pytest.raises(FaissImportError, match="not inner product"):
        import_faiss_index(spec((encoder, corpus, tmp_path / "l2.index"), tmp_path / "c"))


def test_the_cli_adopts_the_index_for_serve(search_r1, tmp_path, capsys):
    encoder, corpus, index = search_r1
    argv = ["index", "--import-faiss", str(index), "--corpus", str(corpus), "--model", str(encoder)]
    argv += ["--pooling", "mean", "--max-length", "180", "--out", str(tmp_path / "adopted"), "--threads", "1"]
    assert main([*argv, "--device", "cpu", "--no-progress"]) == 0
    assert "serve it with: searchgym serve --index" in capsys.readouterr().out
    assert Manifest.load(tmp_path / "adopted").encoder.pooling == "mean"
    assert main([*argv, "--pooling", "cls", "--overwrite"]) == 2
    assert "Check --pooling" in capsys.readouterr().err
