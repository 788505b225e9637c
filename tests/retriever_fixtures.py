"""A tiny fixed corpus, indexes built from it, and fake backends for the retriever tests."""

import gzip
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from searchgym.retriever.base import Passage
from searchgym.retriever.index import IndexSpec, build_index

TINY_CORPUS = [
    {"id": "0", "contents": '"Mars"\nMars is the fourth planet from the Sun, often called the Red Planet.'},
    {"id": "1", "contents": '"Venus"\nVenus is the second planet from the Sun and the hottest planet.'},
    {"id": "2", "contents": '"Hamlet"\nHamlet is a tragedy written by William Shakespeare around 1600.'},
    {"id": "3", "contents": '"Paris"\nParis is the capital and largest city of France, on the Seine.'},
    {"id": "4", "contents": '"Berlin"\nBerlin is the capital of Germany and its largest city.'},
    {"id": "5", "contents": '"Photosynthesis"\nPlants turn sunlight, water and carbon dioxide into sugar.'},
    {
        "id": "6",
        "contents": '"Mount Everest"\nMount Everest is the highest mountain on Earth, in the Himalayas.',
    },
    {
        "id": "7",
        "contents": '"Python (language)"\nPython is a programming language created by Guido van Rossum.',
    },
    {"id": "8", "contents": '"Macbeth"\nMacbeth is a tragedy by William Shakespeare about a Scottish king.'},
    {"id": "9", "contents": '"Nile"\nThe Nile is a river in Africa, long held to be the longest river.'},
    {"id": "10", "contents": '"Jupiter"\nJupiter is the largest planet in the Solar System, a gas giant.'},
    {"id": "11", "contents": '"Tokyo"\nTokyo is the capital of Japan and the most populous city.'},
]
QUERIES = [
    "which planet is called the red planet",
    "who wrote the tragedy hamlet",
    "capital of france",
    "highest mountain on earth",
    "who created the python programming language",
    "longest river in africa",
]


def write_jsonl(path: Path, rows: list[dict[str, object]] | list[str]) -> Path:
    """Write rows (dicts as JSON, strings verbatim) one a line; gzip when the name ends with .gz."""
    lines = "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(lines.encode()))
    else:
        path.write_text(lines)
    return path


_built: dict[str, Path] = {}


def tiny_index(tmp_path_factory: pytest.TempPathFactory, method: str) -> Path:
    """The tiny corpus indexed with ``method`` (bm25 or dense), built once per test session."""
    if method not in _built:
        root = tmp_path_factory.mktemp(f"tiny-{method}")
        corpus = write_jsonl(root / "tiny.jsonl", TINY_CORPUS)
        spec = IndexSpec(corpus=corpus, out=root / "index", method=method, device="cpu", progress=False)
        build_index(spec)
        _built[method] = spec.out
    return _built[method]


class EchoRetriever:
    """Answers each query with ``k`` passages derived from its text; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], int]] = []
        self._lock = threading.Lock()

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        with self._lock:
            self.calls.append((list(queries), k))
        return [
            [
                Passage(id=f"{query}#{rank}", contents=f'"{query}"\nhit {rank}', score=float(k - rank))
                for rank in range(k)
            ]
            for query in queries
        ]


class BlockingRetriever(EchoRetriever):
    """An :class:`EchoRetriever` that holds each call until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        self.entered.set()
        self.release.wait(timeout=30)
        return super().search(queries, k)


class FailingRetriever:
    """Raises on every call, like a backend that lost its index."""

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        raise RuntimeError("index file vanished")


def tiny_random_encoder(
    folder: Path, *, hidden_size: int = 32, seed: int = 0, model_type: str = "bert"
) -> Path:
    """A plain Hugging Face folder (BERT, or another ``model_type``) with random weights and MiniLM's
    tokenizer (no download)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from searchgym.paths import default_encoder_path

    tokenizer = AutoTokenizer.from_pretrained(default_encoder_path())
    config = AutoConfig.for_model(
        model_type,
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModel.from_config(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def search_r1_encode(
    model_dir: Path, texts: list[str], *, prefix: str, max_length: int = 180
) -> "np.ndarray":
    """Encode as Search-R1's index_builder.py / retrieval_server.py do for e5: the prefix, truncation to
    ``max_length`` tokens, mean pooling over the attention mask, L2 normalisation."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer(
        [prefix + t for t in texts], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"][..., None].bool()
    pooled = hidden.masked_fill(~mask, 0.0).sum(dim=1) / mask.sum(dim=1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy().astype("float32")


def search_r1_flat_index(model_dir: Path, corpus: list[dict[str, str]], path: Path) -> Path:
    """An ``e5_Flat.index`` as Search-R1 builds it: passages encoded as above, FAISS Flat inner product."""
    import faiss

    vectors = search_r1_encode(model_dir, [row["contents"] for row in corpus], prefix="passage: ")
    index = faiss.index_factory(vectors.shape[1], "Flat", faiss.METRIC_INNER_PRODUCT)
    index.add(vectors)
    faiss.write_index(index, str(path))
    return path


def tiny_random_cross_encoder(folder: Path, *, seed: int = 0) -> Path:
    """A BERT sequence classifier (one relevance logit) with random weights and MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from searchgym.paths import default_encoder_path

    tokenizer = AutoTokenizer.from_pretrained(default_encoder_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
