"""Cross-request micro-batching, an LRU result cache and the server's running statistics.

Worker threads own the backend: queries from concurrent requests wait in a bounded queue until a worker
gathers them (up to ``max_batch``, or for at most ``max_wait_s`` after the oldest arrived) into one
``search`` call, so the encoder and the index see batches even when every client sends one query. A
query alone in the queue is searched at once, with no wait. With several workers, several batches are
searched at once (the backend must then be thread-safe).
"""

import logging
import sys
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from searchgym.errors import SearchgymError
from searchgym.retriever.base import Passage, Retriever

logger = logging.getLogger(__name__)
Key = TypeVar("Key", bound=Hashable)
Value = TypeVar("Value")
_LATENCY_WINDOW = 10_000  # most recent requests the latency percentiles cover
_RATE_WINDOW_S = 10.0  # the queries/s figure covers this many recent seconds
_PASSAGE_OVERHEAD = sys.getsizeof(Passage("", "", 0.0)) + sys.getsizeof(0.0) + 8  # object, score, list slot


class QueueFullError(SearchgymError):
    """More queries are waiting than the queue holds; the client should retry later."""


@dataclass(slots=True)
class _Job:
    query: str
    k: int
    arrived: float
    future: "Future[list[Passage]]" = field(default_factory=Future)


class MicroBatcher:
    """Gathers queries from concurrent callers into batched ``search`` calls on one worker thread.

    Args:
        retriever: the backend; only the worker thread calls it.
        max_batch: most distinct queries per backend call.
        max_wait_s: the longest the oldest waiting query is held back for a fuller batch.
        max_queue: most queries waiting; :meth:`submit` refuses more.
        stats: where batch sizes are recorded.
        workers: threads calling the backend, each with its own batch.
    """

    def __init__(
        self,
        retriever: Retriever,
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        stats: "ServerStats",
        workers: int = 1,
    ) -> None:
        self._retriever = retriever
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._max_queue = max_queue
        self._stats = stats
        self._pending: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._workers = [
            threading.Thread(target=self._run, name=f"searchgym-batcher-{i}", daemon=True)
            for i in range(workers)
        ]
        for worker in self._workers:
            worker.start()

    @property
    def pending(self) -> int:
        """Queries waiting for the worker."""
        return len(self._pending)

    def submit(self, queries: list[str], k: int) -> "list[Future[list[Passage]]]":
        """Queue ``queries`` for a top-``k`` search; each future resolves to that query's passages.

        Raises:
            QueueFullError: accepting them would exceed ``max_queue``.
        """
        now = time.monotonic()
        jobs = [_Job(query, k, now) for query in queries]
        with self._ready:
            if self._closed:
                raise RuntimeError("the retrieval server is shutting down")
            if len(self._pending) + len(jobs) > self._max_queue:
                raise QueueFullError(
                    f"{len(self._pending)} queries are waiting (limit {self._max_queue}); retry shortly"
                )
            self._pending.extend(jobs)
            self._ready.notify()
        return [job.future for job in jobs]

    def cancel(self, futures: "list[Future[list[Passage]]]") -> None:
        """Withdraw the queries of ``futures`` still waiting (those being searched finish unread)."""
        with self._ready:
            if any([future.cancel() for future in futures]):  # a list: cancel every one, not the first
                self._pending = deque(job for job in self._pending if not job.future.cancelled())

    def close(self) -> None:
        """Stop the workers after their batches in progress; queries still waiting fail."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        for worker in self._workers:
            worker.join()
        for job in self._pending:
            job.future.set_exception(RuntimeError("the retrieval server is shutting down"))

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._search(batch)

    def _next_batch(self) -> list[_Job] | None:
        with self._ready:
            while not self._pending and not self._closed:
                self._ready.wait()
            if self._closed:
                return None
            # A lone query goes at once: holding it back for company would only add latency at low load.
            # Under load, queries pile up while the previous batch is searched and meet without waiting.
            deadline = self._pending[0].arrived + self._max_wait_s
            while 1 < len(self._pending) < self._max_batch and (remaining := deadline - time.monotonic()) > 0:
                self._ready.wait(remaining)
            taken = [self._pending.popleft() for _ in range(min(self._max_batch, len(self._pending)))]
            if self._pending:
                self._ready.notify()  # what is left is another idle worker's batch
        # Running futures can no longer be cancelled; cancelled ones are skipped.
        return [job for job in taken if job.future.set_running_or_notify_cancel()]

    def _search(self, batch: list[_Job]) -> None:
        """One backend call per distinct k (clients almost always share one), duplicates searched once."""
        by_k: dict[int, dict[str, list[_Job]]] = {}
        for job in batch:
            by_k.setdefault(job.k, {}).setdefault(job.query, []).append(job)
        for k, jobs_by_query in by_k.items():
            queries = list(jobs_by_query)
            self._stats.record_batch(len(queries))
            try:
                results = self._retriever.search(queries, k)
            except Exception as error:  # a backend failure fails this batch's requests, not the server
                logger.exception("search of %d queries failed", len(queries))
                for jobs in jobs_by_query.values():
                    for job in jobs:
                        job.future.set_exception(error)
                continue
            for query, passages in zip(queries, results, strict=True):
                for job in jobs_by_query[query]:
                    job.future.set_result(passages)


def passages_nbytes(passages: list[Passage]) -> int:
    """About how many bytes of memory ``passages`` hold: their strings, objects and the list."""
    text = sum(sys.getsizeof(p.contents) + sys.getsizeof(p.id) for p in passages)
    return sys.getsizeof(passages) + text + _PASSAGE_OVERHEAD * len(passages)


class LruCache(Generic[Key, Value]):
    """A thread-safe least-recently-used cache bounded in entries and, optionally, in bytes.

    Args:
        capacity: most entries; 0 stores nothing.
        max_bytes: most bytes of all values together, as ``size_of`` counts them (None: no byte bound).
            A value larger than this alone is not stored.
        size_of: a value's size in bytes; needed with ``max_bytes``.
    """

    def __init__(
        self,
        capacity: int,
        *,
        max_bytes: int | None = None,
        size_of: Callable[[Value], int] | None = None,
    ) -> None:
        if max_bytes is not None and size_of is None:
            raise ValueError("a cache bounded in bytes needs size_of")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._size_of = size_of
        self._entries: OrderedDict[Key, tuple[Value, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key) -> Value | None:
        """The cached value (now the most recent), or None."""
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return self._entries[key][0]

    def put(self, key: Key, value: Value) -> None:
        """Store ``value``, evicting the least recently used entries while over a bound."""
        size = self._size_of(value) if self._size_of is not None else 0
        if self.capacity == 0 or (self.max_bytes is not None and size > self.max_bytes):
            return
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self.nbytes -= previous[1]
            self._entries[key] = (value, size)
            self.nbytes += size
            while len(self._entries) > self.capacity or (
                self.max_bytes is not None and self.nbytes > self.max_bytes
            ):
                _, (_, evicted) = self._entries.popitem(last=False)
                self.nbytes -= evicted


class ServerStats:
    """Counters and recent-window figures behind ``GET /stats``; every method is thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._requests = self._queries = self._truncated = 0
        self._cache_hits = self._cache_misses = 0
        self._errors: Counter[int] = Counter()
        self._latencies_s: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        self._recent_queries: deque[tuple[float, int]] = deque()
        self._batch_sizes: Counter[int] = Counter()

    def record_request(self, *, latency_s: float, queries: int, truncated: int) -> None:
        """A request answered with 200."""
        now = time.monotonic()
        with self._lock:
            self._requests += 1
            self._queries += queries
            self._truncated += truncated
            self._latencies_s.append(latency_s)
            self._recent_queries.append((now, queries))
            while self._recent_queries[0][0] < now - _RATE_WINDOW_S:
                self._recent_queries.popleft()

    def record_error(self, status: int) -> None:
        """A request answered with an error status."""
        with self._lock:
            self._errors[status] += 1

    def record_cache(self, *, hits: int, misses: int) -> None:
        """Cache lookups of one request."""
        with self._lock:
            self._cache_hits += hits
            self._cache_misses += misses

    def record_batch(self, size: int) -> None:
        """One backend call of ``size`` distinct queries."""
        with self._lock:
            self._batch_sizes[size] += 1

    def snapshot(self) -> dict[str, Any]:
        """The JSON body of ``GET /stats``."""
        now = time.monotonic()
        with self._lock:
            latencies_ms = np.array(self._latencies_s) * 1000.0
            recent = sum(count for stamp, count in self._recent_queries if stamp >= now - _RATE_WINDOW_S)
            batches = sum(self._batch_sizes.values())
            batched_queries = sum(size * count for size, count in self._batch_sizes.items())
            return {
                "uptime_s": round(now - self._started, 3),
                "requests": self._requests,
                "queries": self._queries,
                "queries_per_s": round(recent / min(_RATE_WINDOW_S, max(now - self._started, 1e-9)), 2),
                "latency_ms": {
                    "p50": round(float(np.percentile(latencies_ms, 50)), 3) if len(latencies_ms) else None,
                    "p99": round(float(np.percentile(latencies_ms, 99)), 3) if len(latencies_ms) else None,
                    "window_requests": len(latencies_ms),
                },
                "batches": {
                    "count": batches,
                    "mean_size": round(batched_queries / batches, 2) if batches else None,
                    "max_size": max(self._batch_sizes, default=None),
                    "size_histogram": _power_of_two_buckets(self._batch_sizes),
                },
                "cache": {"hits": self._cache_hits, "misses": self._cache_misses},
                "errors": {str(status): count for status, count in sorted(self._errors.items())},
                "truncated_queries": self._truncated,
            }


def _power_of_two_buckets(sizes: Counter[int]) -> dict[str, int]:
    """Batch counts by size bucket: ``"1"``, ``"2-3"``, ``"4-7"``, ... (only non-empty buckets)."""
    buckets: Counter[int] = Counter()
    for size, count in sizes.items():
        buckets[size.bit_length() - 1] += count
    return {
        (str(1 << power) if power == 0 else f"{1 << power}-{(2 << power) - 1}"): buckets[power]
        for power in sorted(buckets)
    }
