"""Dense retrieval: an encoder plus a FAISS index over L2-normalised vectors (inner product = cosine).

Any FAISS ``index_factory`` string works (``Flat``, ``HNSW32``, ``IVF1024,Flat``, ``IVF4096,PQ64``...).
Where the search runs:

- CPU FAISS by default;
- GPU FAISS when the installed faiss sees GPUs (``pip install 'searchgym[dense-gpu]'``), fp16, sharded over
  GPUs (Flat and IVF indexes; GPU FAISS has no HNSW);
- exact search as a chunked fp16 matmul in torch on CUDA when faiss has no GPU support and the index is
  flat: a wiki-18 e5 flat index (60 GiB in fp32, Search-R1 #54) then needs 30 GiB of GPU memory.

The CPU and GPU builds of faiss are separate distributions that both install the ``faiss`` module; with
both installed, one silently overwrites the other's files, so searchgym refuses to start
(:func:`check_faiss_install`).
"""

import importlib.metadata
import importlib.util
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from searchgym.errors import SearchgymError
from searchgym.retriever.base import Passage
from searchgym.retriever.config import VectorSearchKind
from searchgym.retriever.corpus import Document, batched
from searchgym.retriever.docstore import DocumentStore
from searchgym.retriever.encoder import Encoder
from searchgym.retriever.manifest import IndexLoadError, IndexMismatchError, Manifest
from searchgym.retriever.reopen import ReopensOnPickle

if TYPE_CHECKING:
    import faiss

logger = logging.getLogger(__name__)

FAISS_INDEX_NAME = "index.faiss"
# The distributions that install the ``faiss`` module (CPU, CUDA 12, CUDA 13 with cuVS, older names).
FAISS_CPU_DISTRIBUTIONS = ("faiss-cpu",)
FAISS_GPU_DISTRIBUTIONS = (
    "faiss-gpu",
    "faiss-gpu-cuvs",
    "faiss-gpu-cu11",
    "faiss-gpu-cu12",
    "faiss-gpu-cu12-cuvs",
    "faiss-gpu-cu13-cuvs",
)
REINSTALL_HINT = "pip install 'searchgym[dense]' (CPU) or 'searchgym[dense-gpu]' (GPU; see docs/install.md)"
PROBE_NAME = "encoder_probe.npy"
TRAIN_SAMPLE = 131_072  # vectors used to train IVF / PQ indexes (FAISS wants >= 39 per IVF list)
# From this many queries on, CPU FAISS scores with BLAS (one matrix product) rather than its per-query
# kernels: on wiki-mini with MiniLM (2-core box), 1 query takes 0.7 ms with the kernels and 4 ms with BLAS,
# 32 queries 23 ms with the kernels and 8 ms with BLAS; they cross between 4 and 8 queries.
BLAS_MIN_QUERIES = 6


class DenseIndexError(SearchgymError):
    """A FAISS index type that cannot be built or searched as asked."""


def installed_faiss_builds() -> list[str]:
    """The installed distributions that provide the ``faiss`` module, CPU build first."""
    installed = []
    for name in FAISS_CPU_DISTRIBUTIONS + FAISS_GPU_DISTRIBUTIONS:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        installed.append(name)
    return installed


def check_faiss_install() -> None:
    """Refuse to start with no faiss, or with two builds of it that overwrite each other's ``faiss`` module.

    Raises:
        DenseIndexError: what to uninstall or install.
    """
    builds = installed_faiss_builds()
    if len(builds) > 1:
        raise DenseIndexError(
            f"{' and '.join(builds)} are installed together: both provide the faiss module, so one has "
            f"overwritten the other (GPU FAISS may silently run on the CPU). Remove them all with "
            f"`pip uninstall -y {' '.join(builds)}`, then {REINSTALL_HINT}"
        )
    if importlib.util.find_spec("faiss") is None:
        raise DenseIndexError(f"dense retrieval needs faiss, which is not installed: {REINSTALL_HINT}")


def _no_gpu_faiss(device: str) -> str:
    """Why FAISS cannot search on ``device`` (a CUDA device), and what to do about it."""
    builds = installed_faiss_builds()
    alternatives = "or search a Flat index with --vector-search torch, or search on the CPU with --device cpu"
    if any(build in FAISS_GPU_DISTRIBUTIONS for build in builds):
        return (
            f"{builds[0]} is installed but sees no GPU (faiss.get_num_gpus() is 0) for --device {device}: "
            f"check that the NVIDIA driver supports the CUDA version that {builds[0]} was built for "
            f"(docs/install.md), {alternatives}"
        )
    if not builds:  # a conda or source build
        return f"--device {device} asks for GPU FAISS, which the installed faiss lacks: {alternatives}"
    return (
        f"--device {device} asks for GPU FAISS but {builds[0]} is installed: `pip uninstall -y "
        f"{builds[0]}` then pip install 'searchgym[dense-gpu]' (docs/install.md), {alternatives}"
    )


class VectorSearch(Protocol):
    """Nearest neighbours by inner product: a FAISS index, or :class:`TorchFlatSearch`."""

    ntotal: int

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, k) scores and (B, k) row numbers (-1 where fewer than k were found), best first."""
        ...


def build_dense_index(
    documents: Iterable[Document],
    index_dir: Path,
    *,
    encoder: Encoder,
    faiss_type: str,
    chunk_size: int = 4096,
) -> int:
    """Encode ``documents`` as they stream by into a FAISS index, saved as ``index_dir/index.faiss``.

    Untrained index types (IVF, PQ) are trained on the first :data:`TRAIN_SAMPLE` vectors. Returns the
    number of documents indexed.

    Raises:
        DenseIndexError: ``faiss_type`` is not a valid factory string, or the corpus is too small to train it;
            or faiss is missing or installed twice (:func:`check_faiss_install`).
    """
    check_faiss_install()
    import faiss

    try:
        index = faiss.index_factory(encoder.dimension, faiss_type, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise DenseIndexError(
            f"FAISS cannot build {faiss_type!r}: give an index_factory string (Flat, HNSW32, IVF1024,Flat...)"
        ) from error
    untrained: list[np.ndarray] = []
    for batch in batched(documents, chunk_size):
        vectors = encoder.encode_passages([document.contents for document in batch])
        if index.is_trained:
            index.add(vectors)
            continue
        untrained.append(vectors)
        if sum(len(chunk) for chunk in untrained) >= TRAIN_SAMPLE:
            _train_and_add(index, untrained, faiss_type)
            untrained = []
    if untrained:
        _train_and_add(index, untrained, faiss_type)
    faiss.write_index(index, str(index_dir / FAISS_INDEX_NAME))
    np.save(index_dir / PROBE_NAME, encoder.probe_vector)
    return int(index.ntotal)


def _train_and_add(index: "faiss.Index", chunks: list[np.ndarray], faiss_type: str) -> None:
    vectors = np.concatenate(chunks)
    try:
        index.train(vectors)
    except RuntimeError as error:
        raise DenseIndexError(
            f"cannot train {faiss_type!r} on {len(vectors)} vectors ({error}); "
            "use fewer IVF lists (about one per 40-1000 documents) or a Flat / HNSW index"
        ) from error
    index.add(vectors)


class TorchFlatSearch:
    """Exact inner-product search as a chunked matmul in torch, for GPUs that faiss cannot use.

    Args:
        chunks: the database vectors, (rows, D) arrays in row order; each becomes one matmul, which bounds
            the (B, rows) score buffer. They are copied to ``device`` one at a time (fp16 on CUDA), so the
            host never holds a second full copy.
        device: where to keep them and search (``cuda`` in practice; ``cpu`` works, for tests).
    """

    def __init__(self, chunks: Iterable[np.ndarray], *, device: str) -> None:
        import torch

        self._torch = torch
        self._dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self._chunks = [
            torch.from_numpy(np.ascontiguousarray(chunk)).to(device, self._dtype) for chunk in chunks
        ]
        self.device = device
        self.ntotal = sum(len(chunk) for chunk in self._chunks)

    @classmethod
    def from_flat_index(
        cls, index: "faiss.IndexFlat", *, device: str, chunk_rows: int = 1 << 20
    ) -> "TorchFlatSearch":
        """Copy a (memory-mapped) FAISS flat index to ``device``, ``chunk_rows`` vectors at a time."""
        starts = range(0, index.ntotal, chunk_rows)
        chunks = (index.reconstruct_n(start, min(chunk_rows, index.ntotal - start)) for start in starts)
        return cls(chunks, device=device)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, k) scores and (B, k) rows of the best ``k`` database vectors per query, best first."""
        torch = self._torch
        queries = torch.from_numpy(x).to(self.device, self._dtype)
        best_scores = torch.empty((len(x), 0), device=self.device, dtype=torch.float32)
        best_rows = torch.empty((len(x), 0), device=self.device, dtype=torch.int64)
        offset = 0
        for chunk in self._chunks:
            scores = (queries @ chunk.T).float()  # (B, chunk_rows)
            top_scores, top_rows = scores.topk(min(k, len(chunk)), dim=1)
            merged_scores = torch.cat([best_scores, top_scores], dim=1)
            merged_rows = torch.cat([best_rows, top_rows + offset], dim=1)
            best_scores, picked = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
            best_rows = merged_rows.gather(1, picked)
            offset += len(chunk)
        return best_scores.cpu().numpy(), best_rows.cpu().numpy()


def open_vector_search(
    index_dir: Path, *, device: str, kind: VectorSearchKind = "auto", faiss_params: str = ""
) -> VectorSearch:
    """Load ``index.faiss`` for searching on ``device`` (see the module docstring for the choice).

    Args:
        index_dir: the index folder.
        device: ``cpu`` or ``cuda``.
        kind: ``auto`` picks GPU FAISS, then the torch matmul (flat indexes on CUDA), then CPU FAISS (with
            a warning on CUDA); ``faiss`` and ``torch`` force one (``faiss`` on CUDA means GPU FAISS).
        faiss_params: FAISS search parameters, e.g. ``nprobe=32`` (IVF) or ``efSearch=128`` (HNSW).

    Raises:
        DenseIndexError: faiss is missing or installed twice; ``faiss`` on CUDA without GPU FAISS, or for an
            index type GPU FAISS cannot search; ``torch`` for a non-flat index; ``faiss_params`` that do not
            apply.
    """
    check_faiss_install()
    import faiss

    path = str(index_dir / FAISS_INDEX_NAME)
    on_gpu = device.startswith("cuda")
    use_faiss_gpu = on_gpu and faiss.get_num_gpus() > 0
    if on_gpu and kind == "faiss" and not use_faiss_gpu:
        raise DenseIndexError(_no_gpu_faiss(device))
    if kind == "torch" or (kind == "auto" and on_gpu and not use_faiss_gpu):
        index = faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        if isinstance(index, faiss.IndexFlat):
            return TorchFlatSearch.from_flat_index(index, device=device)
        if kind == "torch":
            raise DenseIndexError(
                f"torch search needs a Flat index; {index_dir} holds {type(index).__name__}"
            )
        logger.warning("%s index: searching on the CPU. %s", type(index).__name__, _no_gpu_faiss(device))
    index = faiss.read_index(path)
    if use_faiss_gpu:
        index, use_faiss_gpu = _to_gpus(index, strict=kind == "faiss")
    if faiss_params:
        parameter_space = faiss.GpuParameterSpace() if use_faiss_gpu else faiss.ParameterSpace()
        try:
            parameter_space.set_index_parameters(index, faiss_params)  # type: ignore[arg-type]  # SWIG stub
        except RuntimeError as error:
            raise DenseIndexError(
                f"FAISS parameters {faiss_params!r} do not apply to this index: {error}"
            ) from error
    return index if use_faiss_gpu else CpuFaissSearch(index)


def _to_gpus(index: "faiss.Index", *, strict: bool) -> tuple["faiss.Index", bool]:
    """Shard ``index`` over every GPU in fp16; returns the index and whether it is on the GPUs.

    GPU FAISS has no HNSW: such an index stays on the CPU (with a warning), or is an error when ``strict``.
    """
    import faiss

    options = faiss.GpuMultipleClonerOptions()
    options.useFloat16 = True
    options.shard = True
    try:
        return faiss.index_cpu_to_all_gpus(index, co=options), True
    except RuntimeError as error:
        message = f"GPU FAISS cannot search a {type(index).__name__} index ({error})"
        if strict:
            raise DenseIndexError(f"{message}: use --vector-search auto or --device cpu") from error
        logger.warning("%s: searching it on the CPU", message)
        return index, False


class CpuFaissSearch:
    """A CPU FAISS index: a few queries scored by FAISS's own kernels on one thread, batches by BLAS.

    FAISS chooses between the two by ``distance_compute_blas_threshold``, whose meaning has changed across
    versions (faiss-cpu 1.15's default of 128000 keeps even 128-query batches off BLAS, 5x slower); setting
    it for each call from the batch size works with any version. The setting is process-wide: server workers
    searching batches of different sizes at once may score one with the other's method (the same
    neighbours, scores equal to rounding).
    """

    def __init__(self, index: "faiss.Index") -> None:
        self._index = index
        self.ntotal = int(index.ntotal)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, k) scores and (B, k) row numbers (-1 where fewer than k were found), best first."""
        import faiss
        import torch

        few = len(x) < BLAS_MIN_QUERIES
        faiss.cvar.distance_compute_blas_threshold = 1 << 30 if few else 1
        # OpenMP keeps its thread count per calling thread, so a server's search worker would not see the
        # share of the cores that `--search-workers` gives it (set in the main thread); torch sets its own
        # count in every thread on first use, and it is that share. A few queries run on one thread: 2.8 ms
        # for one wiki-mini query against 4.1 ms on two, and much more while another library's threads
        # still spin on the other core (ONNX Runtime's, after an encode). torch and FAISS share OpenMP, and
        # torch reads its count back from it, so the count is put back after the search: left at 1, it
        # would hold every later encode and search in this thread to one thread.
        threads = torch.get_num_threads()
        faiss.omp_set_num_threads(1 if few else threads)
        try:
            return self._index.search(x, k)
        finally:
            faiss.omp_set_num_threads(threads)


class DenseRetriever(ReopensOnPickle):
    """Encodes queries and searches the vector index; passages come from the document store.

    Args:
        index_dir: the index folder.
        manifest: its manifest (method ``dense``).
        store: its documents.
        encoder: the query encoder; checked against the one the index was built with.
        vector_search: :func:`open_vector_search`'s result.

    Raises:
        IndexMismatchError: ``encoder`` is not the model the index was built with.
    """

    def __init__(
        self,
        index_dir: Path,
        *,
        manifest: Manifest,
        store: DocumentStore,
        encoder: Encoder,
        vector_search: VectorSearch,
    ) -> None:
        check_encoder(index_dir, manifest, encoder)
        self._store = store
        self._encoder = encoder
        self._vectors = vector_search
        self.search(["warm up"], 1)  # first calls load kernels (torch, Arrow): not on the first request

    @property
    def num_documents(self) -> int:
        """Documents in the index."""
        return len(self._store)

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        """Return, for each query in order, its best ``k`` passages, best first."""
        if not queries:
            return []
        scores, rows = self._vectors.search(self._encoder.encode_queries(queries), min(k, self.num_documents))
        # IVF with a small nprobe can find fewer than k: FAISS pads with row -1.
        return self._store.passages(rows, scores, found=rows >= 0)


def check_encoder(index_dir: Path, manifest: Manifest, encoder: Encoder) -> None:
    """Refuse an encoder whose size or output differs from the one the index was built with.

    Raises:
        IndexMismatchError: the dimension differs, or the fingerprint vector of a fixed text does.
    """
    if manifest.encoder is None:
        raise IndexLoadError(f"{index_dir}: the manifest of a dense index must name its encoder: rebuild it")
    built_with = manifest.encoder.model
    hint = f"serve with --model pointing at {built_with!r}, or rebuild the index with {encoder.model!r}"
    if encoder.dimension != manifest.encoder.dimension:
        raise IndexMismatchError(
            f"encoder {encoder.model!r} makes {encoder.dimension}-d vectors but {index_dir} holds "
            f"{manifest.encoder.dimension}-d vectors from {built_with!r}: {hint}"
        )
    cosine = float(np.dot(np.load(index_dir / PROBE_NAME), encoder.probe_vector))
    if cosine < encoder.probe_min_cosine:
        raise IndexMismatchError(
            f"encoder {encoder.model!r} does not encode like {built_with!r}, the model {index_dir} was built "
            f"with (cosine {cosine:.3f} on a probe text): {hint}"
        )
