"""Adopting a FAISS index built elsewhere (Search-R1's ``e5_Flat.index``, FlashRAG's) without re-encoding.

The corpus goes into the document store, the FAISS file is linked (not copied) into the index folder,
and the manifest records the encoder with the pooling, prefixes and length the index was built with, so
``searchgym serve`` encodes queries the same way. Nothing is trusted: the row count must match the
corpus, the dimension the encoder, the metric must be inner product, and a random sample of passages is
re-encoded and compared with the stored vectors, which catches a wrong pooling, prefix or model.
"""

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from searchgym.errors import SearchgymError
from searchgym.retriever.corpus import CorpusReader, file_sha256, read_corpus
from searchgym.retriever.dense import FAISS_INDEX_NAME, PROBE_NAME
from searchgym.retriever.docstore import DocumentStoreWriter
from searchgym.retriever.encoder import Encoder, Pooling, default_prefixes
from searchgym.retriever.manifest import CorpusInfo, EncoderInfo, Manifest

if TYPE_CHECKING:
    import faiss

SAMPLE_MIN_COSINE = 0.99  # median over the sample, of cosines centred on the sample mean
_STORE_BATCH = 4096


class FaissImportError(SearchgymError):
    """A FAISS index that does not match the corpus or encoder it is said to come from."""


@dataclass(frozen=True, slots=True)
class FaissImportSpec:
    """What ``searchgym index --import-faiss`` adopts.

    Attributes:
        faiss_file: the FAISS index file (e.g. Search-R1's ``e5_Flat.index``).
        corpus: the corpus it was built from, rows in index order (e.g. ``wiki-18.jsonl``).
        out: the index folder to create.
        model: the encoder it was built with (path or hub id).
        pooling: how token vectors were pooled: ``mean`` (e5, contriever) or ``cls`` (bge); None is the
            model's own.
        query_prefix: None picks the model's own (``"query: "`` for e5).
        passage_prefix: None picks the model's own (``"passage: "`` for e5).
        max_length: tokens per text the index was built with (Search-R1: 180); None is the model's limit.
        sample_size: passages re-encoded to check the stored vectors.
        seed: which passages are sampled.
        device: where the encoder runs.
        overwrite: replace an existing index at ``out``.
        progress: show a progress bar while the corpus is stored.
    """

    faiss_file: Path
    corpus: Path
    out: Path
    model: str
    pooling: Pooling | None = None
    query_prefix: str | None = None
    passage_prefix: str | None = None
    max_length: int | None = None
    sample_size: int = 64
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False
    progress: bool = True


def import_faiss_index(spec: FaissImportSpec) -> Manifest:
    """Check ``spec.faiss_file`` against the corpus and encoder and make it a servable index folder.

    Raises:
        FaissImportError: the file is missing or not a FAISS index, or its rows, dimension, metric or
            vectors do not match (the message names the likely cause).
        CorpusError: the corpus is missing or malformed.
    """
    from searchgym.retriever.index import DOCSTORE_NAME, check_out_dir, move_into_place

    index = _read_index(spec.faiss_file)
    encoder = _encoder(spec)
    _check_shape(index, encoder, spec)
    reader = CorpusReader(spec.corpus)
    check_out_dir(spec.out, overwrite=spec.overwrite)
    spec.out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{spec.out.name}.building-", dir=spec.out.parent))
    building.chmod(0o755)
    try:
        rows = np.sort(np.random.default_rng(spec.seed).permutation(index.ntotal)[: spec.sample_size])
        count, sampled = _store_corpus(spec, building / DOCSTORE_NAME, rows)
        if count != index.ntotal:
            raise FaissImportError(
                f"{spec.faiss_file} holds {index.ntotal} vectors but {spec.corpus} has {count} passages: "
                "give the corpus the index was built from (row i of the index is line i of the corpus)"
            )
        _check_vectors(index, rows, encoder.encode_passages(sampled), spec)
        _link(spec.faiss_file, building / FAISS_INDEX_NAME)
        np.save(building / PROBE_NAME, encoder.probe_vector)
        manifest = Manifest(
            method="dense",
            num_documents=count,
            corpus=CorpusInfo(str(spec.corpus), file_sha256(spec.corpus), reader.size_bytes),
            encoder=EncoderInfo(
                spec.model,
                encoder.dimension,
                encoder.query_prefix,
                encoder.passage_prefix,
                pooling=spec.pooling,
                max_length=spec.max_length,
            ),
            faiss_type=f"imported {type(index).__name__}",
        )
        manifest.save(building)
        move_into_place(building, spec.out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return manifest


def _read_index(path: Path) -> "faiss.Index":
    import faiss

    if not path.is_file():
        raise FaissImportError(f"FAISS index file {path} does not exist")
    try:
        # Memory-mapped: a 60 GiB flat index is not read into RAM just to be checked.
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as error:
        raise FaissImportError(f"{path} is not a FAISS index file ({error})") from error


def _encoder(spec: FaissImportSpec) -> Encoder:
    query_prefix, passage_prefix = default_prefixes(spec.model)
    return Encoder(
        spec.model,
        query_prefix=query_prefix if spec.query_prefix is None else spec.query_prefix,
        passage_prefix=passage_prefix if spec.passage_prefix is None else spec.passage_prefix,
        device=spec.device,
        pooling=spec.pooling,
        max_length=spec.max_length,
    )


def _check_shape(index: "faiss.Index", encoder: Encoder, spec: FaissImportSpec) -> None:
    import faiss

    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise FaissImportError(
            f"{spec.faiss_file} ranks by metric {index.metric_type} (L2 is 1), not inner product: searchgym "
            "scores unit vectors by inner product; rebuild the index with faiss.METRIC_INNER_PRODUCT"
        )
    if index.d != encoder.dimension:
        raise FaissImportError(
            f"{spec.faiss_file} holds {index.d}-d vectors but {spec.model} makes {encoder.dimension}-d "
            "vectors: give --model the encoder the index was built with"
        )


def _store_corpus(spec: FaissImportSpec, path: Path, rows: np.ndarray) -> tuple[int, list[str]]:
    """Write every passage to the document store; return the count and the sampled rows' texts."""
    wanted = set(rows.tolist())
    sampled: list[str] = []
    batch = []
    count = 0
    with DocumentStoreWriter(path) as store:
        for document in read_corpus(spec.corpus, progress=spec.progress, desc="storing the corpus"):
            if count in wanted:
                sampled.append(document.contents)
            batch.append(document)
            count += 1
            if len(batch) == _STORE_BATCH:
                store.add(batch)
                batch = []
        if batch:
            store.add(batch)
    return count, sampled


def _check_vectors(
    index: "faiss.Index", rows: np.ndarray, encoded: np.ndarray, spec: FaissImportSpec
) -> None:
    stored = _unit(_reconstruct(index, rows))
    # Encoders are anisotropic (every text sits at cosine > 0.9 from every other), so a raw cosine barely
    # tells a wrong prefix from the right one; with the sample's mean direction removed from both sides,
    # the same encoding stays at ~1.0 and a different one falls far below.
    centre = stored.mean(axis=0)
    cosines = np.sum(_unit(stored - centre) * _unit(encoded - centre), axis=1)  # (sample,)
    median = float(np.median(cosines))
    if median < SAMPLE_MIN_COSINE:
        raise FaissImportError(
            f"re-encoding {len(rows)} sampled passages of {spec.corpus} with {spec.model!r} "
            f"(pooling {spec.pooling or 'the model default'}, passage prefix "
            f"{_prefix(spec.passage_prefix, spec.model)!r}, max length {spec.max_length or 'the default'}) "
            f"gives vectors at median centred cosine {median:.3f} from the stored ones (needs "
            f"{SAMPLE_MIN_COSINE}): "
            "the index was built another way. Check --pooling (mean for e5 and contriever, cls for bge), "
            "--passage-prefix and --query-prefix ('passage: ' / 'query: ' for e5), --max-length (Search-R1 "
            "used 180) and --model"
        )


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _prefix(given: str | None, model: str) -> str:
    return default_prefixes(model)[1] if given is None else given


def _reconstruct(index: "faiss.Index", rows: np.ndarray) -> np.ndarray:
    """(sample, D) stored vectors; IVF indexes get the direct map reconstruction needs."""
    import faiss

    try:
        return np.stack([index.reconstruct(int(row)) for row in rows])
    except RuntimeError:
        ivf = faiss.extract_index_ivf(index)
        ivf.make_direct_map()
        return np.stack([index.reconstruct(int(row)) for row in rows])


def _link(source: Path, target: Path) -> None:
    """A hard link when on the same file system, else a symbolic link: never a copy of many GiB."""
    try:
        os.link(source, target)
    except OSError:
        target.symlink_to(source.resolve())
