"""The server's front door: a process of its own that holds every client connection and sheds load at once.

``searchgym serve`` runs the search (the Flask app on waitress) in its own process, listening on a private
Unix socket, and this front on the public port. The front parses HTTP/1.1 with httptools (llhttp, in C) on
an asyncio loop (uvloop where installed), and

- answers a connection past ``max_connections`` with 503 and Retry-After, and closes it;
- closes a keep-alive connection idle for ``idle_timeout_s``;
- refuses a body over ``max_body_bytes`` with 413 from its Content-Length, before reading it;
- admits at most ``max_inflight`` ``POST /retrieve`` requests at a time and answers the next at once with
  429 and Retry-After;
- forwards the rest to the search process (one request at a time per backend connection, never more
  connections than that process has threads), stamped with their arrival time (``ARRIVAL_HEADER``), so
  that the latency in ``/stats`` counts from the moment a request reached the server; and adds its own
  refusals to the error counts of ``GET /stats``.

Why a process: a refusal decided inside the search process waits for its GIL behind the admitted work and
for its one I/O thread's turn; with 200 clients on a 2-core box that put the p50 of a 429 at 17-27 ms. Here
it is well under a millisecond (docs/benchmarks.md, "A front process for the door").

The front exits when the serve process dies (the pipe it was given closes), so a kill -9 of ``searchgym
serve`` frees the port; the serve process starts a new front if this one dies alone.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import cast

import httptools

from searchgym.errors import SearchgymError

logger = logging.getLogger(__name__)
ARRIVAL_HEADER = "X-Searchgym-Arrival"  # time.monotonic() at the front; the clock is system-wide on Linux
BACKEND_SPARE = 8  # backend connections (and search-process threads) beyond the admitted retrievals
_GATED_PATH = b"/retrieve"  # /health and /stats stay answerable under overload
_FD_RESERVE = 64  # file descriptors kept for the listening socket, the backend connections and the pipes
_BACKLOG = 2048  # connections the kernel holds before the front accepts them
_MAX_PIPELINED = 8  # parsed requests a connection may have waiting before the front stops reading it
# Headers that describe one hop, not the request: the front sets its own on each side.
_HOP_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"content-length",
        b"expect",
        b"te",
        b"upgrade",
        ARRIVAL_HEADER.lower().encode(),  # a client's own stamp is dropped, never trusted
    }
)


@dataclass(frozen=True, slots=True)
class DoorLimits:
    """What the server admits; everything past these limits is refused at once.

    Attributes:
        max_inflight: ``POST /retrieve`` requests served at once; the next gets 429 with Retry-After.
        max_connections: open client connections; the next gets 503 with Retry-After and is closed.
        idle_timeout_s: an idle keep-alive connection is closed after this many seconds.
        max_body_bytes: a larger body is refused with 413 from its Content-Length, before it is read.
        retry_after_s: what the 429 and 503 refusals tell clients to wait.
    """

    max_inflight: int = 256
    max_connections: int = 1024
    idle_timeout_s: float = 30.0
    max_body_bytes: int = 16 * 1024 * 1024
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if self.max_inflight < 1:
            raise SearchgymError(f"--max-inflight must be at least 1, got {self.max_inflight}")
        if self.max_connections < 1:
            raise SearchgymError(f"--max-connections must be at least 1, got {self.max_connections}")
        if self.idle_timeout_s <= 0 or self.retry_after_s < 0 or self.max_body_bytes < 1:
            raise SearchgymError("--idle-timeout-s must be positive and --max-body-bytes at least 1")


def check_port(port: int) -> int:
    """``port`` if it is a TCP port (0 picks a free one).

    Raises:
        SearchgymError: outside 0-65535 (the socket layer would silently wrap 70000 to 4464).
    """
    if not 0 <= port <= 65535:
        raise SearchgymError(f"--port must be from 0 to 65535 (0: any free port), got {port}")
    return port


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` and listening (port 0: any free one).

    Raises:
        SearchgymError: the port is out of range or in use, or the host cannot be bound.
    """
    check_port(port)
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family, backlog=_BACKLOG)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise SearchgymError(
                f"port {port} on {host} is in use: stop the other server or pick another --port (0: any)"
            ) from error
        raise SearchgymError(f"cannot listen on {host}:{port}: {error.strerror or error}") from error


@dataclass(slots=True)
class _Request:
    method: bytes
    url: bytes
    version: str
    keep_alive: bool
    headers: list[tuple[bytes, bytes]]
    arrival: float
    body: bytearray = field(default_factory=bytearray)

    @property
    def gated(self) -> bool:
        return self.method == b"POST" and self.url.partition(b"?")[0] == _GATED_PATH

    def forwarded(self) -> bytes:
        """The request as sent to the search process: HTTP/1.1, keep-alive, its body whole.

        HEAD goes as GET (the reply parser cannot tell a HEAD reply's missing body); the front drops the body.
        """
        method = b"GET" if self.method == b"HEAD" else self.method
        head = [method + b" " + self.url + b" HTTP/1.1\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in self.headers]
        stamp = f"{ARRIVAL_HEADER}: {self.arrival!r}\r\nContent-Length: {len(self.body)}\r\n\r\n"
        return b"".join(head) + stamp.encode() + self.body


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def encode(self, version: str, *, keep_alive: bool, head_only: bool = False) -> bytes:
        """The reply as a client of HTTP ``version`` gets it, saying whether the connection stays open."""
        head = [f"HTTP/{version} {self.status} {_phrase(self.status)}\r\n".encode()]
        head += [name + b": " + value + b"\r\n" for name, value in self.headers]
        head.append(f"Content-Length: {len(self.body)}\r\n".encode())
        if not keep_alive:
            head.append(b"Connection: close\r\n")
        elif version == "1.0":
            head.append(b"Connection: keep-alive\r\n")
        return b"".join(head) + b"\r\n" + (b"" if head_only else self.body)


def _error(status: int, message: str, *, retry_after_s: int | None = None) -> _Reply:
    """A JSON error the front answers itself, without asking the search process."""
    headers = [
        (b"Content-Type", b"application/json"),
        (b"Date", formatdate(usegmt=True).encode()),  # RFC 9110: every response from a server with a clock
    ]
    if retry_after_s is not None:
        headers.append((b"Retry-After", str(retry_after_s).encode()))
    return _Reply(status, headers, json.dumps({"error": message}).encode())


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class BackendGone(ConnectionError):
    """The search process closed a connection before answering."""


class _BackendConnection(asyncio.Protocol):
    """One keep-alive connection to the search process, carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.answered_any = False
        self._parser = httptools.HttpResponseParser(self)
        self._reply: asyncio.Future[_Reply] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def send(self, request: bytes) -> "asyncio.Future[_Reply]":
        """The reply to ``request``, once it has all arrived.

        Raises:
            BackendGone: the connection is closed (now, or before the reply is whole).
        """
        if self.closed or self.transport is None:
            raise BackendGone("the search process closed the connection")
        self._reply = asyncio.get_running_loop().create_future()
        self._headers, self._body = [], bytearray()
        self.transport.write(request)
        return self._reply

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(BackendGone(f"unreadable reply from the search process: {error}"))

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in _HOP_HEADERS:
            self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.answered_any = True
        if not self._parser.should_keep_alive():
            self.closed = True
        if self._reply is not None and not self._reply.done():
            self._reply.set_result(_Reply(self._parser.get_status_code(), self._headers, bytes(self._body)))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(BackendGone("the search process closed the connection"))

    def _fail(self, error: Exception) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(error)


class _Backend:
    """Keep-alive connections to the search process, opened as needed and reused.

    The door's count bounds those of retrievals (``max_inflight``); everything else shares
    ``BACKEND_SPARE`` more, so that no request waits for a thread inside the search process.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._idle: list[_BackendConnection] = []
        self._others = asyncio.Semaphore(BACKEND_SPARE)  # the door's count bounds the retrievals

    async def ask(self, request: _Request) -> _Reply:
        """The search process's reply to ``request``.

        Raises:
            BackendGone: the search process is not answering (it is restarting, or gone).
        """
        if request.gated:
            return await self._ask(request.forwarded())
        async with self._others:
            return await self._ask(request.forwarded())

    async def _ask(self, payload: bytes) -> _Reply:
        connection = self._idle.pop() if self._idle else await self._open()
        try:
            reply = await connection.send(payload)
        except BackendGone:
            if not connection.answered_any:
                raise
            # The search process closed this pooled connection while it was idle: once more, on a new one.
            connection = await self._open()
            reply = await connection.send(payload)
        if not connection.closed:
            self._idle.append(connection)
        return reply

    async def _open(self) -> _BackendConnection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_unix_connection(_BackendConnection, self.path)
        except OSError as error:
            raise BackendGone(f"cannot reach the search process: {error.strerror or error}") from error
        return connection

    def close(self) -> None:
        for connection in self._idle:
            if connection.transport is not None:
                connection.transport.close()


@dataclass(slots=True)
class _Door:
    """What every connection shares: the limits, the count of admitted retrievals, the refusals."""

    limits: DoorLimits
    backend: _Backend
    inflight: int = 0
    refused: Counter[int] = field(default_factory=Counter)
    connections: set["_ClientConnection"] = field(default_factory=set)
    forwarding: set["asyncio.Future[None]"] = field(default_factory=set)


class _ClientConnection(asyncio.Protocol):
    """One client connection: its requests are parsed as they arrive and answered in order."""

    def __init__(self, door: _Door) -> None:
        self.door = door
        self.transport: asyncio.Transport | None = None
        self.last_active = time.monotonic()
        self._parser = httptools.HttpRequestParser(self)
        self._request: _Request | None = None
        self._url = bytearray()
        self._headers: list[tuple[bytes, bytes]] = []
        self._too_large = False
        self._waiting: deque[_Request] = deque()
        self._busy = False
        self._closing = False
        self._drained = asyncio.Event()  # cleared while the transport's write buffer is over its limit
        self._drained.set()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        if len(self.door.connections) >= self.door.limits.max_connections:
            self.door.refused[503] += 1
            message = "too many open connections; retry shortly"
            refusal = _error(503, message, retry_after_s=self.door.limits.retry_after_s)
            self.transport.write(refusal.encode("1.1", keep_alive=False))
            self.transport.close()
            return
        self.door.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._drained.set()  # nothing more will be sent
        self.door.connections.discard(self)

    def pause_writing(self) -> None:
        self._drained.clear()

    def resume_writing(self) -> None:
        self._drained.set()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self.last_active = time.monotonic()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse_and_close(400, "protocol upgrades are not supported")
            return
        except httptools.HttpParserError as error:
            if self._too_large:
                message = f"the body is over the server's limit of {self.door.limits.max_body_bytes} bytes"
                self._refuse_and_close(413, message)
            else:
                self._refuse_and_close(400, f"malformed HTTP request: {error}")
            return

    def idle_for(self, now: float) -> float:
        """Seconds since the client last sent anything, or 0 while the server owes it a reply.

        A request the client stopped sending halfway is idle too.
        """
        if self._busy or self._waiting:
            return 0.0
        return now - self.last_active

    def close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._url, self._headers = bytearray(), []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        length = next((value for name, value in self._headers if name.lower() == b"content-length"), None)
        if length is not None and length.strip().isdigit() and int(length) > self.door.limits.max_body_bytes:
            self._too_large = True
            raise _BodyTooLarge  # stops the parser before it reads the body
        expects = any(n.lower() == b"expect" and v.lower() == b"100-continue" for n, v in self._headers)
        version = parser.get_http_version()
        if expects and version == "1.1" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._request = _Request(
            method=parser.get_method(),
            url=bytes(self._url),
            version=version,
            keep_alive=parser.should_keep_alive(),
            headers=[(n, v) for n, v in self._headers if n.lower() not in _HOP_HEADERS],
            arrival=time.monotonic(),
        )

    def on_body(self, body: bytes) -> None:
        assert self._request is not None
        self._request.body += body
        if len(self._request.body) > self.door.limits.max_body_bytes:  # a chunked body over the limit
            self._too_large = True
            raise _BodyTooLarge

    def on_message_complete(self) -> None:
        assert self._request is not None
        self._waiting.append(self._request)
        self._request = None
        if len(self._waiting) >= _MAX_PIPELINED and self.transport is not None:
            self.transport.pause_reading()
        self._serve_next()

    # serving

    def _serve_next(self) -> None:
        """Answer the waiting requests in order: refusals at once, the rest one at a time."""
        door = self.door
        while self._waiting and not self._busy and not self._closing:
            request = self._waiting.popleft()
            if request.gated and door.inflight >= door.limits.max_inflight:
                door.refused[429] += 1
                limit = door.limits.max_inflight
                message = f"{limit} requests are being served (the server's limit); retry shortly"
                self._write(request, 429, message, retry_after=True)
                continue
            self._busy = True
            if request.gated:
                door.inflight += 1
            task = asyncio.ensure_future(self._forward(request))
            door.forwarding.add(task)  # the loop keeps only weak references to its tasks
            task.add_done_callback(door.forwarding.discard)
        if len(self._waiting) < _MAX_PIPELINED and self.transport is not None and not self._closing:
            self.transport.resume_reading()

    async def _forward(self, request: _Request) -> None:
        door = self.door
        try:
            reply = await door.backend.ask(request)
        except BackendGone as error:
            logger.warning("%s", error)
            door.refused[503] += 1
            self._write(request, 503, "the search process is not answering; retry shortly", retry_after=True)
        else:
            if request.method == b"GET" and request.url == b"/stats" and reply.status == 200:
                reply = _with_front_refusals(reply, door.refused)
            if self._send(request, reply) and self.transport is not None:
                # A retrieval counts against --max-inflight until the client has taken its reply, so that
                # clients that do not read cannot make the front hold more replies than that; one that
                # reads nothing for --idle-timeout-s is cut off.
                try:
                    await asyncio.wait_for(self._drained.wait(), door.limits.idle_timeout_s)
                except TimeoutError:
                    self._closing = True
                    self.transport.abort()
        finally:
            if request.gated:
                door.inflight -= 1
            self._busy = False
            self.last_active = time.monotonic()
        self._serve_next()

    def _write(self, request: _Request, status: int, message: str, *, retry_after: bool = False) -> None:
        retry_after_s = self.door.limits.retry_after_s if retry_after else None
        self._send(request, _error(status, message, retry_after_s=retry_after_s))

    def _send(self, request: _Request, reply: _Reply) -> bool:
        """Write ``reply`` to ``request`` (closing what asked to close); False if the connection is gone."""
        if self.transport is None or self._closing:
            return False
        keep_alive, head_only = request.keep_alive, request.method == b"HEAD"
        self.transport.write(reply.encode(request.version, keep_alive=keep_alive, head_only=head_only))
        if not request.keep_alive:
            self.close()
        return True

    def _refuse_and_close(self, status: int, message: str) -> None:
        self.door.refused[status] += 1
        if self.transport is not None and not self._closing and not self._busy:
            self.transport.write(_error(status, message).encode("1.1", keep_alive=False))
        self.close()


class _BodyTooLarge(Exception):
    """Raised from a parser callback to stop reading a body over the limit."""


def _with_front_refusals(reply: _Reply, refused: Counter[int]) -> _Reply:
    """``GET /stats`` with the front's own refusals added to the search process's error counts."""
    try:
        stats = json.loads(reply.body)
    except ValueError:
        return reply
    errors = stats.setdefault("errors", {})
    for status, count in refused.items():
        errors[str(status)] = errors.get(str(status), 0) + count
    body = json.dumps(stats).encode()
    return dataclasses.replace(reply, body=body)


async def serve_front(
    listening: socket.socket,
    backend_path: str,
    limits: DoorLimits,
    *,
    stop: asyncio.Event,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Run the front on ``listening`` until ``stop`` is set.

    Admitted requests go to the search process listening on the Unix socket ``backend_path``.
    """
    loop = asyncio.get_running_loop()
    door = _Door(limits=limits, backend=_Backend(backend_path))
    server = await loop.create_server(lambda: _ClientConnection(door), sock=listening)
    sweeper = asyncio.ensure_future(_close_idle(door, limits.idle_timeout_s))
    if on_ready is not None:
        on_ready()
    try:
        await stop.wait()
    finally:
        sweeper.cancel()
        server.close()
        for connection in list(door.connections):
            connection.close()
        door.backend.close()


async def _close_idle(door: _Door, idle_timeout_s: float) -> None:
    while True:
        await asyncio.sleep(min(1.0, idle_timeout_s / 2))
        now = time.monotonic()
        for connection in [c for c in door.connections if c.idle_for(now) > idle_timeout_s]:
            connection.close()


def connection_limit(wanted: int) -> int:
    """``wanted``, lowered to what the process's open-file limit allows (raising the soft limit first)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + _FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        logger.warning("the open-file limit (%d) allows only %d connections", soft, soft - _FD_RESERVE)
        return max(1, soft - _FD_RESERVE)
    return wanted


class FrontProcess:
    """The front, run as a child of the serve process on its bound ``listening`` socket.

    A front that crashes or is killed is started again on the same socket (clients retry their connection
    errors meanwhile); one that stopped cleanly (SIGTERM) stops the server with it.

    Raises:
        SearchgymError: the front did not start.
    """

    START_TIMEOUT_S = 30.0

    def __init__(self, listening: socket.socket, backend_path: str, limits: DoorLimits) -> None:
        self._listening = listening
        self._backend_path = backend_path
        self._limits = limits
        # The front reads EOF on this pipe once the serve process is gone, however it died.
        self._alive_read, self._alive_write = os.pipe()
        self._stopping = threading.Event()
        self.process = self._start()
        self._watcher = threading.Thread(target=self._watch, name="front-watcher", daemon=True)
        self._watcher.start()

    def _start(self) -> subprocess.Popen[bytes]:
        ready_read, ready_write = os.pipe()
        listen_fd = self._listening.fileno()
        command = [
            *(sys.executable, "-m", "searchgym.retriever.front"),
            *("--listen-fd", str(listen_fd), "--parent-fd", str(self._alive_read)),
            *("--ready-fd", str(ready_write), "--backend", self._backend_path),
            *("--limits", json.dumps(dataclasses.asdict(self._limits))),
        ]
        try:
            process = subprocess.Popen(command, pass_fds=(listen_fd, self._alive_read, ready_write))
        finally:
            os.close(ready_write)
        try:
            readable, _, _ = select.select([ready_read], [], [], self.START_TIMEOUT_S)
            ready = bool(readable) and os.read(ready_read, 1) == b"1"
        finally:
            os.close(ready_read)
        if not ready:
            process.kill()
            process.wait()
            raise SearchgymError(f"the server's front process did not start (exit code {process.returncode})")
        return process

    def _watch(self) -> None:
        while True:
            code = self.process.wait()
            if self._stopping.is_set():
                return
            if code == 0:
                logger.info("the front process was stopped; stopping the server")
                os.kill(os.getpid(), signal.SIGTERM)
                return
            logger.error("the front process exited with code %s; starting a new one", code)
            try:
                self.process = self._start()
            except SearchgymError:
                logger.exception("the front process could not be restarted; stopping the server")
                os.kill(os.getpid(), signal.SIGTERM)
                return

    def stop(self) -> None:
        """Stop the front (its open connections are closed) and wait for it."""
        self._stopping.set()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._watcher.join(timeout=10)
        os.close(self._alive_write)
        os.close(self._alive_read)


def _main() -> None:
    """The front process, as :class:`FrontProcess` starts it."""
    parser = argparse.ArgumentParser(description="searchgym serve's front door (started by searchgym serve)")
    parser.add_argument("--listen-fd", type=int, required=True, help="the bound, listening public socket")
    parser.add_argument("--parent-fd", type=int, required=True, help="pipe whose end closes when serve dies")
    parser.add_argument("--ready-fd", type=int, required=True, help="pipe to write one byte to once serving")
    parser.add_argument("--backend", required=True, help="the search process's Unix socket")
    parser.add_argument("--limits", required=True, help="DoorLimits as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ctrl-C reaches the whole process group: the serve process decides, and stops this one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    limits = DoorLimits(**json.loads(args.limits))
    limits = dataclasses.replace(limits, max_connections=connection_limit(limits.max_connections))
    listening = socket.socket(fileno=args.listen_fd)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(args.parent_fd, stop.set)  # readable only at EOF: serve has exited or died
        loop.add_signal_handler(signal.SIGTERM, stop.set)

        def ready() -> None:
            os.write(args.ready_fd, b"1")
            os.close(args.ready_fd)

        await serve_front(listening, args.backend, limits, stop=stop, on_ready=ready)

    try:
        import uvloop
    except ImportError:  # no uvloop on this platform: the standard loop, the same behaviour
        asyncio.run(run())
    else:
        uvloop.run(run())


if __name__ == "__main__":
    _main()
