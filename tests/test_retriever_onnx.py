"""The ONNX Runtime encoder backend: the PyTorch encoder's vectors, served from the same index."""

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from retriever_fixtures import QUERIES, TINY_CORPUS, tiny_index, tiny_random_encoder

from searchgym.cli import build_parser
from searchgym.retriever.encoder import PROBE_MIN_COSINE, Encoder, EncoderError
from searchgym.retriever.index import load_retriever, open_index
from searchgym.retriever.onnx_encoder import PACK_TOKENS, OnnxTransformer, cheapest_packs

pytest.importorskip("onnxruntime")

# Lengths from 1 to ~40 tokens in one call: batches are formed by length and must come back in order.
TEXTS = [*QUERIES, "a", TINY_CORPUS[0]["contents"], "one two three four five six seven eight nine ten"]


@pytest.fixture(scope="module")
def random_encoder_dir(tmp_path_factory):
    return tiny_random_encoder(tmp_path_factory.mktemp("encoder") / "bert", hidden_size=64)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_onnx_gives_the_torch_vectors_in_the_callers_order(random_encoder_dir, pooling):
    options = {"device": "cpu", "pooling": pooling, "batch_size": 4}
    torch_vectors = Encoder(str(random_encoder_dir), **options).encode_queries(TEXTS)
    onnx_vectors = Encoder(str(random_encoder_dir), backend="onnx", **options).encode_queries(TEXTS)
    np.testing.assert_allclose(onnx_vectors, torch_vectors, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(onnx_vectors, axis=1), 1.0, rtol=1e-5)


def test_texts_of_uneven_length_run_packed_and_give_the_torch_vectors(random_encoder_dir):
    options = {"device": "cpu", "batch_size": len(TEXTS)}  # one batch of 1 to ~40 tokens
    onnx = Encoder(str(random_encoder_dir), backend="onnx", **options)
    assert onnx._onnx is not None and onnx._onnx.packed
    lengths = [len(ids) for ids in onnx._model.tokenizer(TEXTS)["input_ids"]]
    assert len(cheapest_packs(lengths, hidden_size=64)) < len(TEXTS)  # so this batch is packed
    torch_vectors = Encoder(str(random_encoder_dir), **options).encode_queries(TEXTS)
    np.testing.assert_allclose(onnx.encode_queries(TEXTS), torch_vectors, atol=2e-5)


def test_a_model_that_offsets_its_positions_is_not_packed(tmp_path):
    roberta = tiny_random_encoder(tmp_path / "roberta", hidden_size=64, model_type="roberta")
    options = {"device": "cpu", "batch_size": len(TEXTS)}
    onnx = Encoder(str(roberta), backend="onnx", **options)
    assert onnx._onnx is not None and not onnx._onnx.packed  # its positions start after the padding id
    torch_vectors = Encoder(str(roberta), **options).encode_queries(TEXTS)
    np.testing.assert_allclose(onnx.encode_queries(TEXTS), torch_vectors, atol=2e-5)


def test_packs_are_balanced_and_used_only_where_they_cost_less():
    uneven = [40, 3, 12, 7, 25, 9]
    packs = cheapest_packs(uneven, hidden_size=384)
    assert len(packs) == 1 and sorted(packs[0]) == list(range(6))
    assert cheapest_packs([20] * 8, hidden_size=384) == [[row] for row in range(8)]  # no padding to save
    long = [60, 10, 55, 12, 50, 14, 45, 16, 40, 18, 35, 20]  # 375 tokens: two packs of about half each
    packs = cheapest_packs(long, hidden_size=384)
    assert sorted(row for pack in packs for row in pack) == list(range(len(long)))
    sizes = [sum(long[row] for row in pack) for pack in packs]
    assert len(packs) == 2 and max(sizes) <= PACK_TOKENS and max(sizes) - min(sizes) <= 10


def test_int8_weights_stay_close_to_fp32_and_the_prefix_is_kept(random_encoder_dir):
    options = {"device": "cpu", "query_prefix": "query: "}
    fp32 = Encoder(str(random_encoder_dir), **options).encode_queries(TEXTS)
    int8 = Encoder(str(random_encoder_dir), backend="onnx-int8", **options)
    cosines = np.sum(int8.encode_queries(TEXTS) * fp32, axis=1)
    assert cosines.min() > int8.probe_min_cosine and int8.probe_min_cosine < PROBE_MIN_COSINE
    unprefixed = Encoder(str(random_encoder_dir), device="cpu").encode_queries(TEXTS)
    assert np.sum(int8.encode_queries(TEXTS) * unprefixed, axis=1).min() < cosines.min()


def test_no_text_gives_no_vector(random_encoder_dir):
    encoder = Encoder(str(random_encoder_dir), device="cpu", backend="onnx")
    assert encoder.encode_queries([]).shape == (0, encoder.dimension) == (0, 64)


def test_a_torch_built_index_is_served_alike_with_onnx(tmp_path_factory):
    index_dir = tiny_index(tmp_path_factory, "dense")
    with_torch = load_retriever(index_dir, device="cpu").search(QUERIES, 3)
    opened = open_index(index_dir, device="cpu", encoder_backend="onnx")
    with_onnx = opened.retriever.search(QUERIES, 3)
    assert [[p.id for p in ps] for ps in with_onnx] == [[p.id for p in ps] for ps in with_torch]
    for ours, theirs in zip(with_onnx, with_torch, strict=True):
        np.testing.assert_allclose([p.score for p in ours], [p.score for p in theirs], atol=1e-5)
    reopened = copy.deepcopy(opened.retriever)  # reopened from its folder with the same backend
    assert reopened._encoder.backend == "onnx"


def test_backends_that_cannot_run_are_refused(random_encoder_dir):
    with pytest.raises(EncoderError, match="must be one of torch, onnx, onnx-int8"):
        Encoder(str(random_encoder_dir), device="cpu", backend="openvino")
    with pytest.raises(EncoderError, match="runs on the CPU"):
        Encoder(str(random_encoder_dir), device="cuda", backend="onnx")


def test_serve_and_index_take_the_backend_flag():
    parser = build_parser()
    serve = parser.parse_args(["serve", "--index", "x", "--encoder-backend", "onnx-int8"])
    index = parser.parse_args(["index", "--method", "dense", "--encoder-backend", "onnx"])
    assert (serve.encoder_backend, index.encoder_backend) == ("onnx-int8", "onnx")
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--index", "x", "--encoder-backend", "tensorrt"])


def test_a_call_alone_gets_all_threads_and_overlapping_calls_share_them(random_encoder_dir, monkeypatch):
    from sentence_transformers import SentenceTransformer

    transformer = OnnxTransformer(
        SentenceTransformer(str(random_encoder_dir), device="cpu"), quantize=False, threads=2
    )
    alone = transformer.encode(TEXTS, batch_size=4)
    used: list[int] = []
    inside, release = threading.Event(), threading.Event()
    encode = OnnxTransformer._encode

    def recording(self, session, texts, batch_size):
        used.append(session.get_session_options().intra_op_num_threads)
        if texts is TEXTS:  # the first, long-running call: hold it until the second has run
            inside.set()
            release.wait(timeout=30)
        return encode(self, session, texts, batch_size)

    monkeypatch.setattr(OnnxTransformer, "_encode", recording)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(transformer.encode, TEXTS, batch_size=4)
        assert inside.wait(timeout=30)
        second = transformer.encode(list(TEXTS), batch_size=4)  # overlaps the first
        release.set()
        np.testing.assert_allclose(first.result(), alone, atol=1e-6)
    np.testing.assert_allclose(second, alone, atol=1e-6)
    transformer.encode(list(TEXTS), batch_size=4)  # alone, but the last call to finish was not
    transformer.encode(list(TEXTS), batch_size=4)  # alone after a call that ran alone
    assert used == [2, 1, 1, 2]
    assert transformer.session_threads == [2, 1]


def test_onnx_runtime_threads_sleep_between_calls(random_encoder_dir):
    # Spinning threads take the cores from the server's own threads between two encodes (docs/benchmarks.md).
    from sentence_transformers import SentenceTransformer

    transformer = OnnxTransformer(
        SentenceTransformer(str(random_encoder_dir), device="cpu"), quantize=False, threads=2
    )
    options = transformer._session(2).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
