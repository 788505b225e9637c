"""Building index folders and opening them as retrievers.

An index folder holds ``manifest.json`` (what was indexed and how), the documents (``documents.arrow``,
for bm25 and dense) and the backend's files. A build writes into a temporary sibling folder and renames
it into place at the end, so an interrupted build never leaves a half-written index behind.
"""

import dataclasses
import inspect
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from searchgym.errors import SearchgymError
from searchgym.retriever.base import Retriever
from searchgym.retriever.config import DEFAULT_ENCODER, EncoderBackend, VectorSearchKind
from searchgym.retriever.corpus import CorpusReader, Document, batched, file_sha256, read_corpus
from searchgym.retriever.docstore import DocumentStore, DocumentStoreWriter
from searchgym.retriever.encoder import default_prefixes
from searchgym.retriever.manifest import (
    MANIFEST_NAME,
    Bm25Params,
    CorpusInfo,
    EncoderInfo,
    IndexLoadError,
    IndexMismatchError,
    Manifest,
    Method,
)
from searchgym.retriever.reopen import OpenedFrom

if TYPE_CHECKING:
    from searchgym.retriever.bm25 import Bm25Retriever
    from searchgym.retriever.dense import DenseRetriever
    from searchgym.retriever.encoder import Pooling
    from searchgym.retriever.pyserini_backend import PyseriniRetriever

DOCSTORE_NAME = "documents.arrow"
_STORE_BATCH = 4096  # documents per Arrow record batch


@dataclass(frozen=True, slots=True)
class IndexSpec:
    """What ``searchgym index`` builds.

    Attributes:
        corpus: a ``.jsonl`` / ``.jsonl.gz`` corpus file.
        out: the index folder to create.
        method: ``bm25`` (bm25s), ``pyserini`` (Lucene, needs Java 21) or ``dense`` (FAISS).
        model: dense encoder (path or hub id); the embedded ``all-MiniLM-L6-v2`` by default.
        faiss_type: FAISS ``index_factory`` string for dense indexes.
        query_prefix: dense query prefix; None picks the model's own (``"query: "`` for e5).
        passage_prefix: dense passage prefix; None picks the model's own (``"passage: "`` for e5).
        device: where the encoder runs: ``auto``, ``cpu`` or ``cuda``.
        batch_size: texts per encoder forward pass.
        encoder_backend: ``torch``, or ONNX Runtime on the CPU (``onnx``: the same vectors, faster).
        overwrite: replace an existing index at ``out``.
        progress: show a progress bar.
    """

    corpus: Path
    out: Path
    method: Method = "bm25"
    model: str = DEFAULT_ENCODER
    faiss_type: str = "Flat"
    query_prefix: str | None = None
    passage_prefix: str | None = None
    device: str = "auto"
    batch_size: int = 64
    encoder_backend: EncoderBackend = "torch"
    overwrite: bool = False
    progress: bool = True


def build_index(spec: IndexSpec) -> Manifest:
    """Build the index ``spec`` describes and return its manifest.

    Raises:
        CorpusError: the corpus is missing or malformed (with the line number).
        SearchgymError: ``out`` exists and is not an index, or is one and ``overwrite`` is off; or the
            backend cannot be built (pyserini without Java 21, a bad FAISS type).
    """
    reader = CorpusReader(spec.corpus)
    check_out_dir(spec.out, overwrite=spec.overwrite)
    corpus = CorpusInfo(path=str(spec.corpus), sha256=file_sha256(spec.corpus), size_bytes=reader.size_bytes)
    spec.out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{spec.out.name}.building-", dir=spec.out.parent))
    building.chmod(0o755)  # mkdtemp makes it private; the finished index should read like any folder
    try:
        documents = read_corpus(spec.corpus, progress=spec.progress, desc=f"indexing ({spec.method})")
        manifest = _build_backend(spec, documents, building, corpus)
        manifest.save(building)
        move_into_place(building, spec.out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return manifest


def move_into_place(building: Path, out: Path) -> None:
    """Rename a finished build folder to ``out``, replacing what was there."""
    if out.exists():
        shutil.rmtree(out)
    try:
        building.rename(out)
    except OSError:
        # Another process finished an index at ``out`` in the meantime (two jobs ensuring the same
        # default index): keep theirs, which is complete since its manifest is written last.
        if not (out / MANIFEST_NAME).is_file():
            raise


def ensure_index(spec: IndexSpec) -> Manifest:
    """Reuse the index at ``spec.out`` if it was built this way from the same corpus bytes, else build it."""
    try:
        existing = Manifest.load(spec.out)
    except IndexLoadError:
        existing = None
    if existing is not None and _built_as(existing, spec):
        return existing
    return build_index(dataclasses.replace(spec, overwrite=True))


def _built_as(manifest: Manifest, spec: IndexSpec) -> bool:
    same_encoder = manifest.method != "dense" or (
        manifest.encoder is not None
        and manifest.encoder.model == spec.model
        and manifest.faiss_type == spec.faiss_type
    )
    return (
        manifest.method == spec.method and same_encoder and manifest.corpus.sha256 == file_sha256(spec.corpus)
    )


def check_out_dir(out: Path, *, overwrite: bool) -> None:
    """Refuse to build over a folder that is not an index, or over an index without ``overwrite``."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not (out / MANIFEST_NAME).is_file():
        raise SearchgymError(f"{out} exists and is not a searchgym index: choose another --out")
    if not overwrite:
        raise SearchgymError(f"{out} already holds an index: pass --overwrite to rebuild it")


def _build_backend(
    spec: IndexSpec, documents: Iterator[Document], folder: Path, corpus: CorpusInfo
) -> Manifest:
    if spec.method == "pyserini":
        from searchgym.retriever.pyserini_backend import build_pyserini_index

        params = Bm25Params()
        count = build_pyserini_index(documents, folder)
        return Manifest(method="pyserini", num_documents=count, corpus=corpus, bm25=params)
    with DocumentStoreWriter(folder / DOCSTORE_NAME) as store:
        stored = _stored(documents, store)
        if spec.method == "bm25":
            from searchgym.retriever.bm25 import build_bm25_index

            params = Bm25Params()
            count = build_bm25_index(stored, folder, params)
            return Manifest(method="bm25", num_documents=count, corpus=corpus, bm25=params)
        from searchgym.retriever.dense import build_dense_index
        from searchgym.retriever.encoder import Encoder

        query_prefix, passage_prefix = default_prefixes(spec.model)
        encoder = Encoder(
            spec.model,
            query_prefix=query_prefix if spec.query_prefix is None else spec.query_prefix,
            passage_prefix=passage_prefix if spec.passage_prefix is None else spec.passage_prefix,
            device=spec.device,
            batch_size=spec.batch_size,
            backend=spec.encoder_backend,
        )
        count = build_dense_index(stored, folder, encoder=encoder, faiss_type=spec.faiss_type)
        info = EncoderInfo(spec.model, encoder.dimension, encoder.query_prefix, encoder.passage_prefix)
        return Manifest(
            method="dense", num_documents=count, corpus=corpus, encoder=info, faiss_type=spec.faiss_type
        )


def _stored(documents: Iterable[Document], store: DocumentStoreWriter) -> Iterator[Document]:
    """Pass documents through while appending them to ``store``: one read of the corpus feeds both."""
    for batch in batched(documents, _STORE_BATCH):
        store.add(batch)
        yield from batch


@dataclass(frozen=True, slots=True)
class OpenIndex:
    """An index folder opened for searching: its manifest and the retriever over it."""

    manifest: Manifest
    retriever: Retriever


def open_index(
    index_dir: str | Path,
    *,
    corpus: str | Path | None = None,
    model: str | None = None,
    device: str = "auto",
    vector_search: VectorSearchKind = "auto",
    faiss_params: str = "",
    encoder_backend: EncoderBackend = "torch",
) -> OpenIndex:
    """Check an index folder against its manifest (and ``corpus`` / ``model`` when given) and open it.

    Args:
        index_dir: the index folder.
        corpus: when given, the corpus file must be the one indexed (same SHA-256).
        model: dense only: the encoder to use instead of the manifest's (e.g. the same model at another path);
            it must encode like the one the index was built with.
        device: ``auto``, ``cpu`` or ``cuda`` (dense).
        vector_search: ``auto``, ``faiss`` or ``torch`` (dense; see
        ``searchgym.retriever.dense.open_vector_search``).
        faiss_params: FAISS search parameters such as ``nprobe=32`` (dense).
        encoder_backend: ``torch``, ``onnx`` or ``onnx-int8`` (dense, CPU; see
            :class:`searchgym.retriever.encoder.Encoder`).

    The retriever pickles and deep-copies by opening the folder again with the same arguments
    (:mod:`searchgym.retriever.reopen`).

    Raises:
        IndexLoadError: not an index, an incomplete one, or one from a newer searchgym.
        IndexMismatchError: ``corpus`` or ``model`` differ from what the index was built with.
    """
    index_dir = Path(index_dir)
    manifest = Manifest.load(index_dir)
    if corpus is not None:
        _check_corpus(index_dir, manifest, Path(corpus))
    retriever = _open_backend(
        index_dir, manifest, model, device, vector_search, faiss_params, encoder_backend
    )
    options = {
        "model": model,
        "device": device,
        "vector_search": vector_search,
        "faiss_params": faiss_params,
        "encoder_backend": encoder_backend,
    }
    retriever.opened_from = OpenedFrom(open_index, str(index_dir.resolve()), tuple(options.items()))
    return OpenIndex(manifest, retriever)


def _open_backend(
    index_dir: Path,
    manifest: Manifest,
    model: str | None,
    device: str,
    vector_search: VectorSearchKind,
    faiss_params: str,
    encoder_backend: EncoderBackend,
) -> "Bm25Retriever | DenseRetriever | PyseriniRetriever":
    if manifest.method == "pyserini":
        from searchgym.retriever.pyserini_backend import PyseriniRetriever

        assert manifest.bm25 is not None  # Manifest.__post_init__ checked it
        return PyseriniRetriever(index_dir, manifest.bm25)
    store = _open_store(index_dir, manifest)
    if manifest.method == "bm25":
        from searchgym.retriever.bm25 import Bm25Retriever

        assert manifest.bm25 is not None  # Manifest.__post_init__ checked it
        return Bm25Retriever(index_dir, manifest.bm25, store)
    return _open_dense(
        index_dir, manifest, store, model, device, vector_search, faiss_params, encoder_backend
    )


def _open_dense(
    index_dir: Path,
    manifest: Manifest,
    store: DocumentStore,
    model: str | None,
    device: str,
    vector_search: VectorSearchKind,
    faiss_params: str,
    encoder_backend: EncoderBackend,
) -> "DenseRetriever":
    from searchgym.retriever.dense import DenseRetriever, open_vector_search
    from searchgym.retriever.encoder import Encoder, resolve_device

    assert manifest.encoder is not None  # Manifest.__post_init__ checked it
    device = resolve_device(device)
    encoder = Encoder(
        model or manifest.encoder.model,
        query_prefix=manifest.encoder.query_prefix,
        passage_prefix=manifest.encoder.passage_prefix,
        device=device,
        pooling=cast("Pooling | None", manifest.encoder.pooling),
        max_length=manifest.encoder.max_length,
        backend=encoder_backend,
    )
    vectors = open_vector_search(index_dir, device=device, kind=vector_search, faiss_params=faiss_params)
    if vectors.ntotal != manifest.num_documents:
        raise IndexLoadError(
            f"{index_dir} holds {vectors.ntotal} vectors for {manifest.num_documents} documents"
        )
    return DenseRetriever(index_dir, manifest=manifest, store=store, encoder=encoder, vector_search=vectors)


def _open_store(index_dir: Path, manifest: Manifest) -> DocumentStore:
    path = index_dir / DOCSTORE_NAME
    if not path.is_file():
        raise IndexLoadError(f"{index_dir} has no {DOCSTORE_NAME}: the index is incomplete, rebuild it")
    store = DocumentStore(path)
    if len(store) != manifest.num_documents:
        raise IndexLoadError(
            f"{path} holds {len(store)} documents, its manifest {manifest.num_documents}: rebuild the index"
        )
    return store


def _check_corpus(index_dir: Path, manifest: Manifest, corpus: Path) -> None:
    if not corpus.is_file():
        raise IndexMismatchError(f"corpus file {corpus} does not exist")
    checksum = file_sha256(corpus)
    if checksum != manifest.corpus.sha256:
        raise IndexMismatchError(
            f"{index_dir} was built from another corpus ({manifest.corpus.path}, sha256 "
            f"{manifest.corpus.sha256[:12]}...) than {corpus} (sha256 {checksum[:12]}...): "
            f"rebuild with `searchgym index --corpus {corpus} --out {index_dir} --overwrite`"
        )


def load_retriever(
    location: str | Path,
    *,
    rerank: str | None = None,
    rerank_depth: int = 10,
    **options: Any,
) -> Retriever:
    """Open a retriever from an index folder or a server URL; both answer ``search(queries, k)`` alike.

    Args:
        location: an index folder built by ``searchgym index`` (a ``str`` or a ``Path``), or the URL of a
            ``searchgym serve`` (or any Search-R1-compatible) server, e.g. ``http://127.0.0.1:8000/retrieve``.
        rerank: a sentence-transformers cross-encoder that reorders the top ``rerank_depth`` passages
            (see :mod:`searchgym.retriever.rerank`); None returns the retriever's own order.
        rerank_depth: candidates per query the cross-encoder rescores.
        **options: for a folder, :func:`open_index`'s keyword arguments; for a URL,
            :class:`searchgym.retriever.client.HttpRetriever`'s.

    Raises:
        SearchgymError: ``location`` is neither, or an option belongs to the other kind of location
            (``timeout_s`` for a folder, ``device`` for a URL); plus :func:`open_index`'s errors.
    """
    if not isinstance(location, str | Path):
        raise SearchgymError(
            f"load_retriever takes an index folder or a server URL, not {type(location).__name__}"
        )
    retriever: Retriever
    if str(location).startswith(("http://", "https://")):
        from searchgym.retriever.client import HttpRetriever

        _check_options(options, HttpRetriever.__init__, location=location, kind="a server URL")
        retriever = HttpRetriever(str(location), **options)
    else:
        _check_options(options, open_index, location=location, kind="an index folder")
        retriever = open_index(location, **options).retriever
    if rerank is None:
        return retriever
    from searchgym.retriever.rerank import RerankingRetriever

    return RerankingRetriever(
        retriever, model=rerank, depth=rerank_depth, device=options.get("device", "auto")
    )


def _check_options(
    options: dict[str, Any], opener: Callable[..., object], *, location: str | Path, kind: str
) -> None:
    """Name the options that ``opener`` does not take, rather than let it raise a bare TypeError."""
    parameters = inspect.signature(opener).parameters
    accepted = [name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SearchgymError(
            f"load_retriever({str(location)!r}): {kind} takes no option {', '.join(unknown)}; "
            f"its options are {', '.join(accepted)}"
        )
