"""Load shedding at the door: a bounded number of requests and connections, the rest refused at once.

waitress queues every parsed request for its thread pool without bound, so under overload a request waits
behind the whole backlog before the server even sees it (and before any 429 can be sent). Two limits here
keep that queue empty:

- :class:`AdmissionGate` (WSGI middleware) admits at most ``max_inflight`` ``POST /retrieve`` requests at
  a time and answers the next one with an immediate 429 and ``Retry-After``, without parsing its body.
  While the gate is full, the server's I/O loop refuses a new retrieval itself, the moment the request is
  read, without handing it to a thread, so refusals take no thread from admitted work (+30% answered
  requests under overload on a 2-core box). The gate still decides every request that does reach a thread;
  waitress gets ``max_inflight + DOOR_THREADS`` threads, so ``/health``, ``/stats`` and those late
  refusals never wait behind admitted work.
- :class:`DoorServer` accepts connections past ``max_connections`` only to answer them with a 503 and
  ``Retry-After`` and close them, instead of leaving new clients hanging in the listen backlog; idle
  keep-alive connections are closed after ``idle_timeout_s``.

The gate also stamps each request's arrival (``ARRIVAL_KEY`` in the WSGI environ), so the latency in
``/stats`` covers everything from the moment a thread takes the request.
"""

import contextlib
import errno
import json
import logging
import resource
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from searchgym.errors import SearchgymError

logger = logging.getLogger(__name__)
ARRIVAL_KEY = "searchgym.arrival"  # WSGI environ key: time.perf_counter() when the request was taken
DOOR_THREADS = 8  # waitress threads beyond the admitted ones: /health, /stats and the gate's own refusals
_GATED_PATHS = frozenset({"/retrieve"})  # /health and /stats stay answerable under overload
_FD_RESERVE = 64  # file descriptors kept for the index, logs and the listening socket

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass(frozen=True, slots=True)
class DoorLimits:
    """What the server admits; everything past these limits is refused at once.

    Attributes:
        max_inflight: ``POST /retrieve`` requests served at once; the next gets 429 with Retry-After.
        max_connections: open client connections; the next gets 503 with Retry-After and is closed.
        idle_timeout_s: an idle keep-alive connection is closed after this many seconds.
        max_body_bytes: waitress refuses larger bodies (413) before spooling them to disk.
        retry_after_s: what the 429 and 503 refusals tell clients to wait.
    """

    max_inflight: int = 256
    max_connections: int = 1024
    idle_timeout_s: int = 30
    max_body_bytes: int = 16 * 1024 * 1024
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if self.max_inflight < 1:
            raise SearchgymError(f"--max-inflight (--threads) must be at least 1, got {self.max_inflight}")
        if self.max_connections < 1:
            raise SearchgymError(f"--max-connections must be at least 1, got {self.max_connections}")
        if self.idle_timeout_s < 1 or self.retry_after_s < 0 or self.max_body_bytes < 1:
            raise SearchgymError("--idle-timeout-s must be at least 1 and --max-body-bytes positive")


def check_port(port: int) -> int:
    """``port`` if it is a TCP port (0 picks a free one).

    Raises:
        SearchgymError: outside 0-65535 (the socket layer would silently wrap 70000 to 4464).
    """
    if not 0 <= port <= 65535:
        raise SearchgymError(f"--port must be from 0 to 65535 (0: any free port), got {port}")
    return port


class AdmissionGate:
    """WSGI middleware admitting at most ``max_inflight`` gated requests at a time.

    Args:
        app: the application behind the gate.
        max_inflight: requests admitted at once.
        retry_after_s: the ``Retry-After`` of a refusal.
        on_refused: called (with the status) for every refusal, e.g. to count it in ``/stats``.
    """

    def __init__(
        self,
        app: WsgiApp,
        *,
        max_inflight: int,
        retry_after_s: int = 1,
        on_refused: Callable[[int], None] | None = None,
    ) -> None:
        self.app = app
        self.max_inflight = max_inflight
        self._retry_after = str(retry_after_s)
        self._on_refused = on_refused
        self._lock = threading.Lock()
        self.inflight = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """Serve the request, or refuse it with 429 when ``max_inflight`` are already being served."""
        environ.setdefault(ARRIVAL_KEY, time.perf_counter())  # an earlier stamp (a proxy layer) wins
        if environ.get("PATH_INFO") not in _GATED_PATHS:
            return self.app(environ, start_response)
        with self._lock:
            admitted = self.inflight < self.max_inflight
            if admitted:
                self.inflight += 1
        if not admitted:
            return self._refuse(start_response)
        try:
            # Read the whole (never streamed) response here, so the request counts until it is finished.
            result = self.app(environ, start_response)
            try:
                return list(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        finally:
            with self._lock:
                self.inflight -= 1

    @property
    def full(self) -> bool:
        """Whether the next gated request would be refused now.

        Read without the lock: a count one request stale only moves that request's refusal (or admission)
        from the door to the gate, which decides under the lock.
        """
        return self.inflight >= self.max_inflight

    def refusal(self) -> tuple[str, list[tuple[str, str]], bytes]:
        """Status, headers and body of a 429, counted as a refusal."""
        if self._on_refused is not None:
            self._on_refused(429)
        message = f"{self.max_inflight} requests are being served (the server's limit); retry shortly"
        body = json.dumps({"error": message}).encode()
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Retry-After", self._retry_after),
        ]
        return "429 Too Many Requests", headers, body

    def _refuse(self, start_response: Callable[..., Any]) -> Iterable[bytes]:
        status, headers, body = self.refusal()
        start_response(status, headers)
        return [body]


def is_gated(request: Any) -> bool:
    """Whether a parsed waitress request is one the gate admits or refuses (and parsed without error)."""
    return request.error is None and request.command == "POST" and request.path in _GATED_PATHS


def keeps_alive(request: Any) -> bool:
    """Whether the connection stays open after the response, by the request's HTTP version and headers."""
    connection = request.headers.get("CONNECTION", "").lower()
    if request.version == "1.0":
        return connection == "keep-alive"
    return connection != "close"


def refuse_at_door(channel: Any, gate: AdmissionGate) -> None:
    """Answer the gated requests at the head of ``channel``'s queue with 429 while ``gate`` is full.

    Called with ``channel.requests_lock`` held, whenever waitress is about to hand the channel's first
    request to a thread (so no task is writing to the channel). The refused requests are taken off the queue
    and their responses written in order, through the channel's output buffers as waitress's own
    100-Continue is; what the socket does not take at once, the I/O loop sends.
    """
    refused = False
    while channel.requests and gate.full and is_gated(channel.requests[0]):
        refused = True
        request = channel.requests.pop(0)
        status, headers, body = gate.refusal()
        headers.append(("Date", formatdate(usegmt=True)))  # RFC 9110: every 4xx from a server with a clock
        keep = keeps_alive(request)
        if not keep:
            headers.append(("Connection", "close"))
        payload = raw_response(request.version, status, headers, body)
        request.close()
        with channel.outbuf_lock:
            channel.outbufs[-1].append(payload)
            channel.current_outbuf_count += len(payload)
            channel.total_outbufs_len += len(payload)
            # Sent now, as a task thread sends its response, rather than on the loop's next pass.
            channel._flush_exception(channel._flush_some, do_close=False)
        if not keep:
            channel.close_when_flushed = True
            for dropped in channel.requests:
                dropped.close()
            channel.requests = []
    if refused and (channel.total_outbufs_len or channel.close_when_flushed):
        channel.server.pull_trigger()  # the I/O loop sends the rest, or closes


def raw_response(version: str, status: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    """A whole HTTP response as the door writes it to a socket itself, outside WSGI."""
    head = f"HTTP/{version} {status}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers)
    return head.encode("latin-1") + b"\r\n" + body


def refusal_bytes(retry_after_s: int) -> bytes:
    """The whole HTTP response sent to a connection past the limit, before closing it."""
    body = b'{"error": "too many open connections; retry shortly"}'
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Retry-After", str(retry_after_s)),
        ("Connection", "close"),
    ]
    return raw_response("1.1", "503 Service Unavailable", headers, body)


def serve_with_limits(
    app: WsgiApp,
    *,
    host: str,
    port: int,
    limits: DoorLimits,
    gate: AdmissionGate | None = None,
    on_listen: Callable[[int], None] | None = None,
) -> None:
    """Serve ``app`` behind the door until interrupted; ``on_listen`` gets the bound port.

    Raises:
        SearchgymError: the port is out of range or taken, or the host cannot be bound.
    """
    server = open_door_server(app, host=host, port=port, limits=limits, gate=gate)
    if on_listen is not None:
        on_listen(int(server.effective_port))
    server.run()


def open_door_server(
    app: WsgiApp, *, host: str, port: int, limits: DoorLimits, gate: AdmissionGate | None = None
) -> Any:
    """A bound waitress server with the door's limits; ``run()`` serves, ``close()`` stops listening.

    ``gate``, the :class:`AdmissionGate` inside ``app``, lets the I/O loop refuse gated requests while it is
    full, without a thread.

    Raises:
        SearchgymError: the port is out of range or taken, or the host cannot be bound.
    """
    from waitress.server import TcpWSGIServer

    class DoorServer(TcpWSGIServer):
        """waitress's server answering connections past the limit instead of leaving them unaccepted."""

        def readable(self) -> bool:
            super().readable()  # runs the idle-connection maintenance
            return bool(self.accepting)

        def handle_accept(self) -> None:
            open_channels: dict[int, Any] = self.active_channels  # type: ignore[assignment]  # types-waitress
            if len(open_channels) < limits.max_connections:
                super().handle_accept()
                return
            try:
                accepted = self.accept()
            except OSError:
                return
            if accepted is not None:
                connection, _ = accepted
                with contextlib.suppress(OSError):  # the client may be gone already
                    connection.send(refusal_bytes(limits.retry_after_s))
                connection.close()

        def add_task(self, channel: Any) -> None:
            if gate is not None:
                refuse_at_door(channel, gate)
                if not channel.requests:
                    return
            super().add_task(channel)

    return _bind(DoorServer, app, host=host, port=check_port(port), limits=limits)


def _bind(server_class: type, app: WsgiApp, *, host: str, port: int, limits: DoorLimits) -> Any:
    from waitress.adjustments import Adjustments
    from waitress.task import ThreadedTaskDispatcher

    adjustments = Adjustments(
        host=host,
        port=port,
        threads=limits.max_inflight + DOOR_THREADS,
        connection_limit=_connection_limit(limits.max_connections),
        channel_timeout=limits.idle_timeout_s,
        max_request_body_size=limits.max_body_bytes + 1,  # waitress refuses a body of exactly its limit
    )
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adjustments.threads)
    try:
        return server_class(app, {}, dispatcher=dispatcher, adj=adjustments, sockinfo=adjustments.listen[0])
    except OSError as error:
        dispatcher.shutdown()
        if error.errno == errno.EADDRINUSE:
            raise SearchgymError(
                f"port {port} on {host} is in use: stop the other server or pick another --port (0: any)"
            ) from error
        raise SearchgymError(f"cannot listen on {host}:{port}: {error.strerror or error}") from error


def _connection_limit(wanted: int) -> int:
    """``wanted``, lowered to what the process's open-file limit allows (raising the soft limit first)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + _FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        logger.warning("the open-file limit (%d) allows only %d connections", soft, soft - _FD_RESERVE)
        return max(1, soft - _FD_RESERVE)
    return wanted
