import dataclasses
import importlib.metadata
import json
import logging
import subprocess
import sys

import faiss
import numpy as np
import pytest
from retriever_fixtures import QUERIES, TINY_CORPUS, tiny_index, write_jsonl

from searchgym.paths import default_encoder_path
from searchgym.retriever.dense import (
    BLAS_MIN_QUERIES,
    FAISS_CPU_DISTRIBUTIONS,
    FAISS_GPU_DISTRIBUTIONS,
    CpuFaissSearch,
    DenseIndexError,
    TorchFlatSearch,
    check_faiss_install,
    installed_faiss_builds,
    open_vector_search,
)
from searchgym.retriever.encoder import Encoder, default_prefixes
from searchgym.retriever.index import IndexSpec, build_index, load_retriever, open_index
from searchgym.retriever.manifest import IndexMismatchError, Manifest

EXPECTED_TOP1 = ["0", "2", "3", "6", "7", "9"]  # the passage each of QUERIES is about


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return tiny_index(tmp_path_factory, "dense")


@pytest.fixture(scope="module")
def dense(dense_dir):
    return load_retriever(dense_dir, device="cpu")


def test_minilm_finds_the_passage_each_question_is_about(dense):
    results = dense.search(QUERIES, 3)
    assert [passages[0].id for passages in results] == EXPECTED_TOP1
    for passages in results:
        scores = [p.score for p in passages]
        assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 + 1e-5 for s in scores)


def test_the_manifest_names_the_encoder_and_its_size(dense_dir):
    manifest = Manifest.load(dense_dir)
    assert (manifest.encoder.model, manifest.encoder.dimension, manifest.faiss_type) == (
        "all-MiniLM-L6-v2",
        384,
        "Flat",
    )
    assert (manifest.encoder.query_prefix, manifest.encoder.passage_prefix) == ("", "")


def test_batches_answer_like_single_queries(dense):
    batched = dense.search(QUERIES, 3)
    for query, passages in zip(QUERIES, batched, strict=True):
        [single] = dense.search([query], 3)
        assert [p.id for p in single] == [p.id for p in passages]
        assert [p.score for p in single] == pytest.approx([p.score for p in passages], abs=1e-5)


def test_torch_exact_search_matches_faiss_flat():
    vectors = np.random.default_rng(0).standard_normal((1000, 32)).astype(np.float32)
    faiss.normalize_L2(vectors)
    index = faiss.IndexFlatIP(32)
    index.add(vectors)
    queries = vectors[:7] + 0.1
    expected_scores, expected_rows = index.search(queries, 5)
    scores, rows = TorchFlatSearch(np.array_split(vectors, 7), device="cpu").search(queries, 5)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5)


def test_cpu_faiss_gives_the_same_neighbours_with_and_without_blas():
    vectors = np.random.default_rng(2).standard_normal((500, 16)).astype(np.float32)
    index = faiss.IndexFlatIP(16)
    index.add(vectors)
    search = CpuFaissSearch(index)
    queries = vectors[: BLAS_MIN_QUERIES + 3] * 0.5
    scores, rows = search.search(queries, 4)  # BLAS
    for query, query_scores, query_rows in zip(queries, scores, rows, strict=True):
        single_scores, single_rows = search.search(query[None], 4)  # FAISS's own kernels
        np.testing.assert_array_equal(single_rows[0], query_rows)
        np.testing.assert_allclose(single_scores[0], query_scores, rtol=1e-5)


# Run in a fresh interpreter: whether torch and FAISS share one OpenMP runtime depends on which was
# imported first (torch's, loaded globally, serves both), and searchgym's encoder imports torch first.
_THREADS_SCRIPT = """
import json, threading
import torch
import faiss
import numpy as np
from searchgym.retriever.dense import BLAS_MIN_QUERIES, CpuFaissSearch

index = faiss.IndexFlatIP(16)
index.add(np.random.default_rng(3).standard_normal((50, 16)).astype(np.float32))
seen, after = [], []

class Recording:
    ntotal = index.ntotal

    def search(self, x, k):
        seen.append(faiss.omp_get_max_threads())
        return index.search(x, k)

search = CpuFaissSearch(Recording())
queries = np.ones((BLAS_MIN_QUERIES, 16), dtype=np.float32)
torch.set_num_threads(3)  # the share, set in the main thread; a server's worker is another thread

def searches():
    for batch in (queries, queries[:1], queries, queries[:1]):
        search.search(batch, 3)
        after.append(torch.get_num_threads())

worker = threading.Thread(target=searches)
worker.start()
worker.join()
searches()
print(json.dumps({"seen": seen, "after": after}))
"""


def test_a_few_queries_search_on_one_thread_and_batches_on_the_process_share_in_any_thread():
    result = subprocess.run(
        [sys.executable, "-c", _THREADS_SCRIPT], capture_output=True, text=True, check=True, timeout=120
    )
    threads = json.loads(result.stdout)
    assert threads["seen"] == [3, 1, 3, 1] * 2  # in a worker thread, then in the main thread
    assert threads["after"] == [3] * 8  # torch's own count (the encoder's) is left as it was found


def test_the_torch_search_path_serves_a_flat_index(dense_dir, dense):
    torch_search = open_vector_search(dense_dir, device="cpu", kind="torch")
    assert isinstance(torch_search, TorchFlatSearch) and torch_search.ntotal == len(TINY_CORPUS)
    flat = faiss.read_index(str(dense_dir / "index.faiss"))
    in_chunks = TorchFlatSearch.from_flat_index(flat, device="cpu", chunk_rows=5)
    query = np.ones((1, 384), dtype=np.float32) / np.sqrt(384)
    np.testing.assert_array_equal(in_chunks.search(query, 4)[1], torch_search.search(query, 4)[1])
    via_torch = open_index(dense_dir, device="cpu", vector_search="torch").retriever
    assert [[p.id for p in hits] for hits in via_torch.search(QUERIES, 3)] == [
        [p.id for p in hits] for hits in dense.search(QUERIES, 3)
    ]


def test_an_hnsw_index_finds_the_same_passages(tmp_path, dense_dir, caplog):
    corpus = write_jsonl(tmp_path / "tiny.jsonl", TINY_CORPUS)
    out = tmp_path / "hnsw"
    build_index(
        IndexSpec(corpus=corpus, out=out, method="dense", faiss_type="HNSW8", device="cpu", progress=False)
    )
    hnsw = open_index(out, device="cpu", faiss_params="efSearch=16").retriever
    assert [hits[0].id for hits in hnsw.search(QUERIES, 3)] == EXPECTED_TOP1
    # On CUDA without GPU FAISS (as here), an index the torch matmul cannot take is searched on the CPU,
    # and the log says so and how to get GPU FAISS.
    with caplog.at_level(logging.WARNING, logger="searchgym.retriever.dense"):
        assert isinstance(open_vector_search(out, device="cuda"), CpuFaissSearch)
    assert "IndexHNSWFlat index: searching on the CPU" in caplog.text
    assert "pip uninstall -y faiss-cpu` then pip install 'searchgym[dense-gpu]'" in caplog.text


def pretend_installed(monkeypatch, *distributions):
    """Make importlib.metadata see exactly ``distributions`` among the faiss builds."""
    real_version = importlib.metadata.version

    def version(name):
        if name in FAISS_CPU_DISTRIBUTIONS + FAISS_GPU_DISTRIBUTIONS:
            if name in distributions:
                return "1.15.1"
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)


def test_the_test_environment_has_the_cpu_build_only():
    assert installed_faiss_builds() == ["faiss-cpu"]
    check_faiss_install()


def test_two_faiss_builds_installed_together_refuse_to_start(monkeypatch, dense_dir):
    pretend_installed(monkeypatch, "faiss-cpu", "faiss-gpu")
    message = r"faiss-cpu and faiss-gpu are installed together.*`pip uninstall -y faiss-cpu faiss-gpu`"
    with pytest.raises(DenseIndexError, match=message):
        open_vector_search(dense_dir, device="cpu")


def test_faiss_on_cuda_without_the_gpu_build_is_a_clear_error(dense_dir):
    message = r"--device cuda asks for GPU FAISS but faiss-cpu is installed: `pip uninstall -y faiss-cpu`"
    with pytest.raises(DenseIndexError, match=message):
        open_vector_search(dense_dir, device="cuda", kind="faiss")


def test_a_gpu_build_that_sees_no_gpu_is_named(monkeypatch, dense_dir):
    pretend_installed(monkeypatch, "faiss-gpu")  # the faiss-cpu module stands in: it reports 0 GPUs
    with pytest.raises(DenseIndexError, match="faiss-gpu is installed but sees no GPU"):
        open_vector_search(dense_dir, device="cuda", kind="faiss")


@pytest.mark.parametrize(
    ("faiss_type", "message"),
    [
        ("NoSuchIndex", "FAISS cannot build 'NoSuchIndex'"),
        ("IVF64,Flat", "cannot train 'IVF64,Flat' on 12 vectors"),
    ],
)
def test_unbuildable_faiss_types_are_clear_errors(tmp_path, faiss_type, message):
    corpus = write_jsonl(tmp_path / "tiny.jsonl", TINY_CORPUS)
    spec = IndexSpec(corpus=corpus, out=tmp_path / "x", method="dense", faiss_type=faiss_type, device="cpu")
    with pytest.raises(DenseIndexError, match=message):
        build_index(dataclasses.replace(spec, progress=False))
    assert not spec.out.exists()


def test_faiss_params_that_do_not_apply_are_clear_errors(dense_dir):
    with pytest.raises(DenseIndexError, match="nprobe=4"):
        open_vector_search(dense_dir, device="cpu", faiss_params="nprobe=4")


def copy_index(source, target):
    target.mkdir()
    for path in source.iterdir():
        if path.is_file():
            (target / path.name).write_bytes(path.read_bytes())
    return target


def test_an_encoder_of_another_size_is_refused(tmp_path, dense_dir):
    index_dir = copy_index(dense_dir, tmp_path / "index")
    manifest = json.loads((index_dir / "manifest.json").read_text())
    manifest["encoder"]["dimension"] = 768
    (index_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexMismatchError, match=r"makes 384-d vectors but .* holds 768-d vectors"):
        open_index(index_dir, device="cpu")


def test_an_encoder_that_encodes_differently_is_refused(tmp_path, dense_dir):
    index_dir = copy_index(dense_dir, tmp_path / "index")
    other_model = np.random.default_rng(1).standard_normal(384).astype(np.float32)
    np.save(index_dir / "encoder_probe.npy", other_model / np.linalg.norm(other_model))
    with pytest.raises(IndexMismatchError, match="does not encode like"):
        open_index(index_dir, device="cpu")


def test_a_plain_hugging_face_folder_is_mean_pooled_like_sentence_transformers(tmp_path):
    """The same MiniLM weights without sentence-transformers' module files: loaded with mean pooling."""
    plain = tmp_path / "minilm-hf"
    plain.mkdir()
    for path in default_encoder_path().iterdir():
        if path.is_file() and path.name not in {"modules.json", "sentence_bert_config.json"}:
            (plain / path.name).symlink_to(path)
    hf = Encoder(str(plain), device="cpu").encode_queries(QUERIES)
    st = Encoder("all-MiniLM-L6-v2", device="cpu").encode_queries(QUERIES)
    np.testing.assert_allclose(hf, st, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(hf, axis=1), 1.0, rtol=1e-5)


def test_e5_models_get_their_prefixes():
    assert default_prefixes("intfloat/e5-base-v2") == ("query: ", "passage: ")
    assert default_prefixes("/models/multilingual-E5-large") == ("query: ", "passage: ")
    assert default_prefixes("all-MiniLM-L6-v2") == ("", "")
