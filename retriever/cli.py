"""``searchgym index`` and ``searchgym serve``: argument declarations here, heavy imports in the handlers."""

import argparse
import dataclasses
import importlib.util
import inspect
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, get_args

from searchgym.errors import SearchgymError
from searchgym.paths import WIKI_MINI_CORPUS
from searchgym.retriever.config import (
    API_KEY_ENV,
    DEFAULT_ENCODER,
    ENCODER_BACKENDS,
    ServerConfig,
    VectorSearchKind,
)
from searchgym.retriever.manifest import METHODS

POOLINGS = ("mean", "cls")  # as searchgym.retriever.encoder.POOLINGS, without importing torch for --help

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

# glibc gives every thread its own cache of freed chunks (tcache), which it never returns: over a soak,
# waitress's hundreds of threads (one per admitted request) each fill theirs, +11% of the server's memory
# in 5 minutes; without them, +1.4% (docs/benchmarks.md). glibc reads its tunables only at process start.
NO_THREAD_CACHES = "glibc.malloc.tcache_count=0"


def default_index_dir(corpus: Path, method: str) -> Path:
    """``indexes/<corpus name>-<method>``, e.g. ``indexes/wiki-mini-bm25``."""
    name = corpus.name.removesuffix(".gz").removesuffix(".jsonl")
    return Path("indexes") / f"{name}-{method}"


def add_index_command(subparsers: Any) -> None:
    """Declare ``searchgym index``."""
    parser = subparsers.add_parser(
        "index",
        help="build a BM25 or dense index of a corpus",
        description="Build a BM25 (bm25s or pyserini) or dense (FAISS) index of a .jsonl / .jsonl.gz corpus.",
    )
    parser.add_argument(
        "--corpus", type=Path, default=WIKI_MINI_CORPUS, help="corpus file (default: wiki-mini)"
    )
    parser.add_argument(
        "--method", choices=METHODS, default="bm25", help="bm25 (bm25s), pyserini (Java 21), dense"
    )
    parser.add_argument("--out", type=Path, help="index folder (default: indexes/<corpus>-<method>)")
    parser.add_argument(
        "--model", default=DEFAULT_ENCODER, help="dense: sentence-transformers / HF model path"
    )
    parser.add_argument(
        "--faiss-type", default="Flat", help="dense: FAISS index_factory string (Flat, HNSW32...)"
    )
    parser.add_argument(
        "--query-prefix", help="dense: query prefix (default: 'query: ' for e5 models, else none)"
    )
    parser.add_argument(
        "--passage-prefix", help="dense: passage prefix (default: 'passage: ' for e5, else none)"
    )
    parser.add_argument("--device", default="auto", help="dense: auto, cpu or cuda (fp16)")
    parser.add_argument("--batch-size", type=int, default=64, help="dense: passages per encoder forward pass")
    _add_encoder_backend_flag(parser)
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="CPU threads for encoding and FAISS (default: all cores, %(default)s here)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    adopt = parser.add_argument_group(
        "adopting an existing FAISS index (Search-R1's e5_Flat.index, FlashRAG's): no re-encoding"
    )
    adopt.add_argument(
        "--import-faiss",
        type=Path,
        metavar="FILE",
        help="FAISS index built from --corpus with --model; checked, then served as it is",
    )
    adopt.add_argument(
        "--pooling", choices=POOLINGS, help="how it was pooled: mean (e5, contriever) or cls (bge)"
    )
    adopt.add_argument("--max-length", type=int, help="tokens per passage it was built with (Search-R1: 180)")
    parser.set_defaults(run=_run_index)


def _run_index(args: argparse.Namespace) -> int:
    from searchgym.retriever.index import IndexSpec, build_index

    _use_threads(args.threads)
    if args.import_faiss is not None:
        return _run_import(args)
    spec = IndexSpec(
        corpus=args.corpus,
        out=args.out or default_index_dir(args.corpus, args.method),
        method=args.method,
        model=args.model,
        faiss_type=args.faiss_type,
        query_prefix=args.query_prefix,
        passage_prefix=args.passage_prefix,
        device=args.device,
        batch_size=args.batch_size,
        encoder_backend=args.encoder_backend,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    started = time.perf_counter()
    manifest = build_index(spec)
    print(
        f"indexed {manifest.num_documents} documents of {spec.corpus} ({manifest.method}) into {spec.out} "
        f"in {time.perf_counter() - started:.1f} s; serve it with: searchgym serve --index {spec.out}"
    )
    return 0


def _use_threads(threads: int) -> None:
    """Give torch (the encoder) and FAISS, when the dense extra installed it, ``threads`` threads."""
    if threads < 1:
        raise SearchgymError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
    if importlib.util.find_spec("faiss") is not None:  # BM25 indexes need no FAISS (the dense extra)
        import faiss

        faiss.omp_set_num_threads(threads)


def _run_import(args: argparse.Namespace) -> int:
    from searchgym.retriever.faiss_import import FaissImportSpec, import_faiss_index

    spec = FaissImportSpec(
        faiss_file=args.import_faiss,
        corpus=args.corpus,
        out=args.out or default_index_dir(args.corpus, "dense"),
        model=args.model,
        pooling=args.pooling,
        query_prefix=args.query_prefix,
        passage_prefix=args.passage_prefix,
        max_length=args.max_length,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    manifest = import_faiss_index(spec)
    print(
        f"adopted {spec.faiss_file} ({manifest.num_documents} vectors of {spec.corpus}) as {spec.out}; "
        f"serve it with: searchgym serve --index {spec.out}"
    )
    return 0


def add_serve_command(subparsers: Any) -> None:
    """Declare ``searchgym serve``."""
    parser = subparsers.add_parser(
        "serve",
        help="serve an index over HTTP (Search-R1's /retrieve API)",
        description="Serve an index built by `searchgym index` with Search-R1's POST /retrieve API, "
        "GET /health and GET /stats.",
    )
    parser.add_argument("--index", type=Path, required=True, help="index folder built by `searchgym index`")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port from 0 to 65535 (0: any free port)")
    parser.add_argument(
        "--api-key",
        help=f"require 'Authorization: Bearer KEY'; prefer setting ${API_KEY_ENV}, which, unlike a flag, "
        "other users cannot read in the process list",
    )
    parser.add_argument("--corpus", type=Path, help="check that the index was built from this corpus file")
    parser.add_argument("--model", help="dense: encoder to use instead of the manifest's (must encode alike)")
    parser.add_argument("--device", default="auto", help="dense: auto, cpu or cuda")
    parser.add_argument(
        "--vector-search", choices=get_args(VectorSearchKind), default="auto", help="dense: where search runs"
    )
    parser.add_argument(
        "--faiss-params", default="", help="dense: e.g. nprobe=32 (IVF) or efSearch=128 (HNSW)"
    )
    _add_encoder_backend_flag(parser)
    parser.add_argument(
        "--rerank", metavar="MODEL", help="rerank with this sentence-transformers cross-encoder folder or id"
    )
    parser.add_argument(
        "--rerank-depth", type=int, default=10, help="candidates per query the cross-encoder rescores"
    )
    _add_config_flags(parser, ServerConfig, skip=("api_key",))
    # The former name of --max-inflight: one HTTP thread serves one admitted request.
    parser.add_argument("--threads", dest="max_inflight", type=int, help=argparse.SUPPRESS)
    parser.set_defaults(run=_run_serve)


def _add_encoder_backend_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--encoder-backend",
        choices=ENCODER_BACKENDS,
        default="torch",
        help="dense, CPU: run the encoder in PyTorch, or in ONNX Runtime (onnx: same vectors, faster; "
        "onnx-int8: int8 weights, faster still, cosine ~0.99 to fp32); needs the onnx extra",
    )


def _add_config_flags(parser: argparse.ArgumentParser, config_class: type, *, skip: tuple[str, ...]) -> None:
    """One ``--flag`` per dataclass field, its help taken from the class docstring's Attributes section."""
    docs = _attribute_docs(config_class)
    for field in dataclasses.fields(config_class):
        if field.name not in skip:
            parser.add_argument(
                f"--{field.name.replace('_', '-')}",
                type=type(field.default),
                default=field.default,
                help=f"{docs.get(field.name, '').replace('``', '').rstrip('.')} (default: {field.default})",
            )


def _attribute_docs(config_class: type) -> dict[str, str]:
    docs: dict[str, str] = {}
    lines = (inspect.getdoc(config_class) or "").partition("Attributes:")[2].splitlines()
    name = ""
    for line in lines:
        head, sep, text = line.strip().partition(": ")
        if sep and line.startswith("    ") and not line.startswith("        ") and head.isidentifier():
            name, docs[head] = head, text
        elif name and line.strip():
            docs[name] += " " + line.strip()
    return docs


def environ_without_thread_caches(environ: dict[str, str]) -> dict[str, str] | None:
    """``environ`` with glibc's per-thread malloc caches turned off, or None when it needs no change.

    None also when the C library is not glibc, or when the user's ``GLIBC_TUNABLES`` already sets the
    cache size: theirs wins.
    """
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        glibc = None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if not glibc or "glibc.malloc.tcache_count" in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{NO_THREAD_CACHES}" if tunables else NO_THREAD_CACHES}


def _restart_without_thread_caches() -> None:
    """Re-execute this ``searchgym serve`` process (same pid, same arguments) with the caches off.

    Only a process started as ``searchgym serve`` is replaced, never one that called ``main`` itself.
    """
    environ = environ_without_thread_caches(dict(os.environ))
    if environ is not None and sys.argv[1:2] == ["serve"]:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def _run_serve(args: argparse.Namespace) -> int:
    _restart_without_thread_caches()
    from searchgym.retriever.front import check_port
    from searchgym.retriever.index import open_index
    from searchgym.retriever.server import RetrievalService, create_app, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig) if f.name != "api_key"}
    config = ServerConfig(**fields, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None)
    check_port(args.port)  # before the index loads, which can take minutes
    if args.host not in LOOPBACK_HOSTS and config.api_key is None:
        logging.warning("serving on %s without an API key: anyone who can reach it can query it", args.host)
    if config.search_workers > 1:
        from searchgym.retriever.manifest import Manifest

        method = Manifest.load(args.index).method
        if method != "dense":
            raise SearchgymError(
                f"--search-workers {config.search_workers} needs a dense index, not {method}: its searches "
                "are not thread-safe (PyStemmer, Lucene), and one worker keeps up with them"
            )
    logging.info("opening %s", args.index)
    opened = open_index(
        args.index,
        corpus=args.corpus,
        model=args.model,
        device=args.device,
        vector_search=args.vector_search,
        faiss_params=args.faiss_params,
        encoder_backend=args.encoder_backend,
    )
    retriever = opened.retriever
    if config.search_workers > 1:
        import torch

        # Each worker searches its own batch on its share of the cores (FAISS, and the PyTorch encoder).
        # The ONNX Runtime encoder, opened above with all of them, divides them by the batches running.
        _use_threads(max(1, torch.get_num_threads() // config.search_workers))
    if args.rerank is not None:
        from searchgym.retriever.rerank import RerankingRetriever

        logging.info("reranking the top %d with %s", args.rerank_depth, args.rerank)
        retriever = RerankingRetriever(
            retriever, model=args.rerank, depth=args.rerank_depth, device=args.device
        )
    # SIGTERM (docker stop, kill) ends the serve loop like Ctrl-C, so the batcher is stopped cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    def announce(url: str) -> None:
        print(
            f"searchgym serve: {opened.manifest.method} index of {opened.manifest.num_documents} documents "
            f"at {url}/retrieve",
            flush=True,
        )

    with RetrievalService(retriever, config) as service:
        serve(
            create_app(service, manifest=opened.manifest),
            config=config,
            host=args.host,
            port=args.port,
            on_listen=announce,
        )
    return 0
