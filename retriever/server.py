r"""The retrieval server: Search-R1's ``POST /retrieve`` over any backend, plus ``/health`` and ``/stats``.

Request and response are exactly Search-R1's, so its clients (and veRL's and SkyRL's) work unchanged::

    POST /retrieve  {"queries": ["who wrote hamlet?"], "topk": 3, "return_scores": true}
    -> {"result": [[{"document": {"id": "12", "contents": "\"Hamlet\"\n..."}, "score": 17.2}, ...]]}

Without ``return_scores`` each hit is the bare document ``{"id", "contents"}``. Every bad request gets a
JSON ``{"error": message}`` with a 4xx code; a backend failure gets a 500 and the server keeps serving.
Overload is refused at the door, a process of its own (see :mod:`searchgym.retriever.front`): 429 and 503
carry Retry-After.
"""

import contextlib
import hmac
import logging
import re
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import wait
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from searchgym.errors import SearchgymError
from searchgym.retriever.base import Passage, Retriever
from searchgym.retriever.batching import LruCache, MicroBatcher, QueueFullError, ServerStats, passages_nbytes
from searchgym.retriever.config import ServerConfig
from searchgym.retriever.front import ARRIVAL_HEADER, BACKEND_SPARE, DoorLimits, FrontProcess, listen
from searchgym.retriever.manifest import Manifest

logger = logging.getLogger(__name__)
RETRY_AFTER_S = 1  # what a 429 or 503 tells clients to wait
_BEARER = re.compile(r"bearer +(?P<token>\S.*)", re.IGNORECASE)  # RFC 6750: the scheme is case-insensitive


class RequestError(SearchgymError):
    """A request the server refuses; ``status`` is its HTTP code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class RetrieveRequest:
    """A validated ``POST /retrieve`` body."""

    queries: list[str]
    topk: int
    return_scores: bool
    truncated: int  # queries cut to max_query_chars


def parse_retrieve_request(body: Any, config: ServerConfig, *, default_topk: int = 3) -> RetrieveRequest:
    """Validate a decoded JSON body against Search-R1's schema and the server's limits.

    Raises:
        RequestError: 400 for a malformed body, 413 for too many queries.
    """
    if not isinstance(body, dict):
        raise RequestError(400, 'the body must be a JSON object such as {"queries": ["..."], "topk": 3}')
    queries = body.get("queries")
    if not isinstance(queries, list):
        raise RequestError(400, "'queries' must be a list of strings")
    if len(queries) > config.max_queries_per_request:
        raise RequestError(
            413, f"{len(queries)} queries in one request; the limit is {config.max_queries_per_request}"
        )
    for position, query in enumerate(queries):
        if not isinstance(query, str):
            raise RequestError(400, f"queries[{position}] is {type(query).__name__}, not a string")
        if not query.strip():
            raise RequestError(400, f"queries[{position}] is empty")
    topk = body.get("topk", default_topk)
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= config.max_topk:
        raise RequestError(400, f"'topk' must be an integer from 1 to {config.max_topk}, got {topk!r}")
    return_scores = body.get("return_scores", False)
    if not isinstance(return_scores, bool):
        raise RequestError(400, f"'return_scores' must be true or false, got {return_scores!r}")
    truncated = sum(len(query) > config.max_query_chars for query in queries)
    return RetrieveRequest(
        queries=[query[: config.max_query_chars] for query in queries],
        topk=topk,
        return_scores=return_scores,
        truncated=truncated,
    )


def format_hits(passages: list[Passage], *, return_scores: bool) -> list[dict[str, Any]]:
    """One query's passages in Search-R1's response layout."""
    if return_scores:
        return [{"document": {"id": p.id, "contents": p.contents}, "score": p.score} for p in passages]
    return [{"id": p.id, "contents": p.contents} for p in passages]


class RetrievalService:
    """The backend behind the HTTP layer: cache, micro-batcher and statistics, shared by all requests.

    Args:
        retriever: the backend; only the batcher's worker thread calls it.
        config: batching, cache and limit settings.
    """

    def __init__(self, retriever: Retriever, config: ServerConfig) -> None:
        self.config = config
        self.stats = ServerStats()
        self._cache: LruCache[tuple[str, int], list[Passage]] = LruCache(
            config.cache_size, max_bytes=config.cache_bytes, size_of=passages_nbytes
        )
        self._batcher = MicroBatcher(
            retriever,
            max_batch=config.max_batch,
            max_wait_s=config.max_wait_ms / 1000.0,
            max_queue=config.max_queue,
            stats=self.stats,
            workers=config.search_workers,
        )

    def retrieve(self, queries: list[str], k: int) -> list[list[Passage]]:
        """The top-``k`` passages of each query: from the cache, else through the batcher.

        Raises:
            RequestError: 429 when the queue is full, 503 after ``request_timeout_s``.
        """
        results = [self._cache.get((query, k)) for query in queries]
        misses = [position for position, cached in enumerate(results) if cached is None]
        self.stats.record_cache(hits=len(queries) - len(misses), misses=len(misses))
        if misses:
            try:
                futures = self._batcher.submit([queries[position] for position in misses], k)
            except QueueFullError as error:
                raise RequestError(429, str(error)) from error
            _, not_done = wait(futures, timeout=self.config.request_timeout_s)
            if not_done:
                self._batcher.cancel(futures)  # nobody waits for them any more: the backend skips them
                raise RequestError(503, f"no result within {self.config.request_timeout_s} s; retry later")
            for position, future in zip(misses, futures, strict=True):
                results[position] = passages = future.result()
                self._cache.put((queries[position], k), passages)
        return [passages or [] for passages in results]

    def snapshot(self) -> dict[str, Any]:
        """``GET /stats``: the statistics plus the queue and cache state."""
        stats = self.stats.snapshot()
        stats["queue"] = {"pending": self._batcher.pending, "capacity": self.config.max_queue}
        stats["cache"].update(
            entries=len(self._cache),
            capacity=self._cache.capacity,
            bytes=self._cache.nbytes,
            max_bytes=self._cache.max_bytes,
        )
        return stats

    def close(self) -> None:
        """Stop the batcher's worker thread."""
        self._batcher.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def create_app(service: RetrievalService, *, manifest: Manifest | None = None) -> Flask:
    """The Flask app over ``service``; ``manifest`` (when given) is reported by ``GET /health``.

    :func:`serve` puts it behind the front door, which admits ``config.max_inflight`` retrievals at a time.
    """
    app = Flask("searchgym.retriever")
    app.config["MAX_CONTENT_LENGTH"] = service.config.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.json.ensure_ascii = False  # type: ignore[attr-defined]  # UTF-8 text, as Search-R1's server sends
    _register_error_handlers(app, service.stats)

    @app.before_request
    def check_api_key() -> None:
        expected = service.config.api_key
        if expected is None or request.path == "/health":
            return
        bearer = _BEARER.fullmatch(request.headers.get("Authorization", "").strip())
        token = bearer.group("token") if bearer else ""
        if not hmac.compare_digest(token.encode(), expected.encode()):
            raise RequestError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    @app.post("/retrieve")
    def retrieve() -> Response:
        started = _arrival(request.headers.get(ARRIVAL_HEADER))
        try:
            body = request.get_json(force=True, silent=True)  # Content-Type is not required, as Search-R1
        except RecursionError:  # e.g. 10,000 nested brackets: malformed input, not a server failure
            raise RequestError(400, "the body is nested too deeply to be a /retrieve request") from None
        if body is None:
            raise RequestError(400, 'the body must be JSON, such as {"queries": ["..."], "topk": 3}')
        parsed = parse_retrieve_request(body, service.config)
        results = service.retrieve(parsed.queries, parsed.topk)
        response = jsonify(result=[format_hits(hits, return_scores=parsed.return_scores) for hits in results])
        service.stats.record_request(
            latency_s=time.monotonic() - started, queries=len(parsed.queries), truncated=parsed.truncated
        )
        return response

    @app.get("/health")
    def health() -> Response:
        index = {} if manifest is None else {"method": manifest.method, "documents": manifest.num_documents}
        return jsonify(status="ok", **index)

    @app.get("/stats")
    def stats() -> Response:
        return jsonify(service.snapshot())

    return app


def _register_error_handlers(app: Flask, stats: ServerStats) -> None:
    def reply(status: int, message: str) -> tuple[Response, int]:
        stats.record_error(status)
        return jsonify(error=message), status

    @app.errorhandler(RequestError)
    def request_error(error: RequestError) -> tuple[Response, int]:
        response, status = reply(error.status, str(error))
        if status in (429, 503):
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
        if status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response, status

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> tuple[Response, int]:
        return reply(error.code or 500, error.description or error.name)

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception) -> tuple[Response, int]:
        logger.exception("request failed")
        return reply(500, f"internal error: {type(error).__name__}: {error}")


def _arrival(stamp: str | None) -> float:
    """When the request reached the server: the front's stamp (the same system-wide clock), else now."""
    try:
        return float(stamp) if stamp is not None else time.monotonic()
    except ValueError:
        return time.monotonic()


class BoundServer:
    """The server, bound and ready: the front door process on ``host``:``port``, the search here.

    The front (:mod:`searchgym.retriever.front`) holds the client connections; this process answers what it
    admits over a Unix socket in a private folder, on waitress with one thread per admitted retrieval plus
    ``BACKEND_SPARE``, so that no admitted request waits for a thread. :meth:`run` serves until
    interrupted; :meth:`close` stops the front and frees the port.

    Raises:
        SearchgymError: the port is out of range or in use, or the front did not start.
    """

    def __init__(self, app: Flask, *, config: ServerConfig, host: str, port: int) -> None:
        from waitress.server import create_server

        limits = DoorLimits(
            max_inflight=config.max_inflight,
            max_connections=config.max_connections,
            idle_timeout_s=config.idle_timeout_s,
            max_body_bytes=config.max_body_bytes,
            retry_after_s=RETRY_AFTER_S,
        )
        self._listening = listen(host, port)
        self._private = tempfile.TemporaryDirectory(prefix="searchgym-serve-")
        backend_path = f"{self._private.name}/search.sock"
        threads = config.max_inflight + BACKEND_SPARE
        self._search = create_server(
            app,
            unix_socket=backend_path,
            unix_socket_perms="600",
            threads=threads,
            connection_limit=threads + BACKEND_SPARE,
            channel_timeout=24 * 3600,  # the front keeps its connections open and closes idle clients itself
            max_request_body_size=config.max_body_bytes + 1,  # waitress refuses a body of exactly its limit
        )
        try:
            self.front = FrontProcess(self._listening, backend_path, limits)
        except BaseException:
            self._search.close()
            self._listening.close()
            self._private.cleanup()
            raise
        self.url = f"http://{host}:{self._listening.getsockname()[1]}"

    def run(self) -> None:
        """Answer the front's requests until interrupted (or :meth:`close` from another thread)."""
        self._search.run()

    def close(self) -> None:
        """Stop the front process, stop listening, and remove the private socket."""
        self.front.stop()
        self._search.close()
        self._listening.close()
        self._private.cleanup()


def serve(
    app: Flask,
    *,
    config: ServerConfig,
    host: str,
    port: int,
    on_listen: Callable[[str], None] | None = None,
) -> None:
    """Serve ``app`` behind the front door until interrupted (see :class:`BoundServer`).

    Args:
        app: from :func:`create_app`.
        config: the service's config (admission, connection, idle and body limits).
        host: interface to bind (``127.0.0.1`` keeps it local; ``0.0.0.0`` exposes it: set an API key).
        port: TCP port; 0 picks a free one.
        on_listen: called with the base URL once the front is serving.

    Raises:
        SearchgymError: the port is out of range or in use, or the front did not start.
    """
    with contextlib.closing(BoundServer(app, config=config, host=host, port=port)) as server:
        if on_listen is not None:
            on_listen(server.url)
        server.run()
