"""The front door over real sockets: admission, connections, body size, ports, and a front that dies."""

import asyncio
import http.client
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from retriever_fixtures import BlockingRetriever, EchoRetriever

from searchgym.errors import SearchgymError
from searchgym.retriever.config import ServerConfig
from searchgym.retriever.front import ARRIVAL_HEADER, DoorLimits, check_port, listen, serve_front
from searchgym.retriever.server import BoundServer, RetrievalService, create_app


@pytest.fixture
def start_server():
    """Serve a retriever behind the front on a loopback port; yields (retriever, **config) -> BoundServer."""
    running = []

    def start(retriever, **config):
        service = RetrievalService(retriever, ServerConfig(**{"max_wait_ms": 1.0, **config}))
        server = BoundServer(create_app(service), config=service.config, host="127.0.0.1", port=0)
        threading.Thread(target=server.run, daemon=True).start()
        running.append((server, service))
        return server

    yield start
    for server, service in running:
        server.close()
        service.close()


def port_of(server: BoundServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def test_past_max_inflight_a_request_gets_429_at_once_and_health_still_answers(start_server):
    blocking = BlockingRetriever()
    url = start_server(blocking, max_inflight=2, max_batch=1).url
    with ThreadPoolExecutor(2) as pool:
        admitted = [pool.submit(requests.post, f"{url}/retrieve", json={"queries": [q]}) for q in "ab"]
        assert blocking.entered.wait(10)
        # Both admitted requests are inside once the second is queued behind the first (in the backend).
        deadline = time.monotonic() + 30
        while requests.get(f"{url}/stats", timeout=10).json()["queue"]["pending"] < 1:
            assert time.monotonic() < deadline, "the second request never reached the queue"
            time.sleep(0.01)
        started = time.monotonic()
        refused = requests.post(f"{url}/retrieve", json={"queries": ["c"]}, timeout=10)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert time.monotonic() - started < 5  # not after the admitted ones
        assert "2 requests are being served" in refused.json()["error"]
        assert requests.get(f"{url}/health", timeout=10).status_code == 200
        blocking.release.set()
        assert [future.result().status_code for future in admitted] == [200, 200]
    stats = requests.get(f"{url}/stats", timeout=10).json()  # the front's refusals are counted
    assert stats["errors"]["429"] == 1 and stats["requests"] == 2


def raw_post(connection: socket.socket, body: bytes, *, version: str = "1.1", close: bool = False) -> None:
    head = f"POST /retrieve HTTP/{version}\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    connection.sendall(head.encode() + (b"Connection: close\r\n" if close else b"") + b"\r\n" + body)


def read_response(
    connection: socket.socket, buffer: bytearray | None = None
) -> tuple[str, dict[str, str], bytes]:
    """One HTTP response from a raw socket: status line, headers (lower-case names), body.

    ``buffer`` carries bytes read past this response (pipelined replies) to the next call.
    """
    data = buffer if buffer is not None else bytearray()
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(4096)
        if not chunk:
            raise ConnectionError("closed before a whole response head")
        data += chunk
    head, _, tail = bytes(data).partition(b"\r\n\r\n")
    rest = bytearray(tail)
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines)}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = connection.recv(1 << 20)
        if not chunk:
            raise ConnectionError(f"closed after {len(rest)} of {length} bytes")
        rest += chunk
    data[:] = rest[length:]
    return status, headers, bytes(rest[:length])


def test_refusals_keep_the_connection_open_unless_the_client_asked_to_close(start_server):
    blocking = BlockingRetriever()
    port = port_of(start_server(blocking, max_inflight=1, max_batch=1))
    url = f"http://127.0.0.1:{port}"
    query = json.dumps({"queries": ["q"]}).encode()
    with ThreadPoolExecutor(1) as pool:
        admitted = pool.submit(requests.post, f"{url}/retrieve", json={"queries": ["a"]}, timeout=30)
        assert blocking.entered.wait(10)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
            raw_post(connection, query)
            status, headers, body = read_response(connection)
            assert status == "HTTP/1.1 429 Too Many Requests" and headers["retry-after"] == "1"
            assert "1 requests are being served" in json.loads(body)["error"]
            assert "connection" not in headers and headers["date"].endswith(" GMT")  # kept open, dated
            raw_post(connection, query)  # and the same connection is refused again
            assert read_response(connection)[0].startswith("HTTP/1.1 429")
            blocking.release.set()
            assert admitted.result().status_code == 200
            raw_post(connection, query)  # once there is room, the same connection is served
            status, _, body = read_response(connection)
            assert status == "HTTP/1.1 200 OK" and json.loads(body)["result"]
        blocking.release.clear()
        blocking.entered.clear()
        admitted = pool.submit(requests.post, f"{url}/retrieve", json={"queries": ["b"]}, timeout=30)
        assert blocking.entered.wait(10)
        for version, close in (("1.0", False), ("1.1", True)):  # a refusal closes what asked to close
            with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
                raw_post(connection, query, version=version, close=close)
                status, headers, _ = read_response(connection)
                assert status == f"HTTP/{version} 429 Too Many Requests" and headers["connection"] == "close"
                assert connection.recv(1) == b""
        blocking.release.set()
        assert admitted.result().status_code == 200
    assert requests.get(f"{url}/stats", timeout=10).json()["errors"]["429"] == 4


def test_pipelined_requests_are_answered_in_order_on_one_connection(start_server):
    port = port_of(start_server(EchoRetriever()))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        requests_ = [
            f"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
            for body in (json.dumps({"queries": [f"query {n}"], "topk": 1}) for n in range(5))
        ]
        connection.sendall(b"".join(requests_) + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        buffer = bytearray()
        ids = [json.loads(read_response(connection, buffer)[2])["result"][0][0]["id"] for _ in range(5)]
        assert ids == [f"query {n}#0" for n in range(5)]
        assert json.loads(read_response(connection, buffer)[2])["status"] == "ok"


def test_http_1_0_keep_alive_and_chunked_bodies_are_served(start_server):
    port = port_of(start_server(EchoRetriever()))
    body = json.dumps({"queries": ["chunked"], "topk": 1}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(
            b"POST /retrieve HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + f"{len(body[:10]):x}\r\n".encode()
            + body[:10]
            + b"\r\n"
            + f"{len(body[10:]):x}\r\n".encode()
            + body[10:]
            + b"\r\n0\r\n\r\n"
        )
        status, headers, reply = read_response(connection)
        assert status == "HTTP/1.1 200 OK" and json.loads(reply)["result"][0][0]["id"] == "chunked#0"
        assert "transfer-encoding" not in headers
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        for _ in range(2):
            connection.sendall(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            status, headers, _ = read_response(connection)
            assert status == "HTTP/1.0 200 OK" and headers["connection"] == "keep-alive"


def test_head_gets_the_headers_of_get_without_a_body_and_expect_gets_100_continue(start_server):
    server = start_server(EchoRetriever())
    head = requests.head(f"{server.url}/health", timeout=10)
    get = requests.get(f"{server.url}/health", timeout=10)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == get.headers["Content-Length"] == str(len(get.content))
    body = json.dumps({"queries": ["continued"], "topk": 1}).encode()
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as connection:
        connection.sendall(
            f"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        assert connection.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
        connection.sendall(body)
        status, _, reply = read_response(connection)
        assert status == "HTTP/1.1 200 OK" and json.loads(reply)["result"][0][0]["id"] == "continued#0"


def test_malformed_http_gets_400_and_the_connection_is_closed(start_server):
    server = start_server(EchoRetriever())
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as connection:
        connection.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        status, headers, body = read_response(connection)
        assert status.startswith("HTTP/1.1 400") and headers["connection"] == "close"
        assert "malformed HTTP request" in json.loads(body)["error"]
        assert connection.recv(1) == b""
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200


def test_past_max_connections_a_new_connection_gets_503_and_is_closed(start_server):
    url = start_server(EchoRetriever(), max_connections=2).url
    port = int(url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    time.sleep(0.2)  # let the front accept both
    extra = socket.create_connection(("127.0.0.1", port), timeout=10)
    reply = extra.recv(4096).decode()
    extra.close()
    assert reply.startswith("HTTP/1.1 503") and "Retry-After: 1" in reply and "Connection: close" in reply
    for connection in idle:
        connection.close()
    time.sleep(0.2)
    assert requests.post(f"{url}/retrieve", json={"queries": ["q"]}, timeout=10).status_code == 200


@pytest.mark.parametrize("sent", [b"", b"POST /retrieve HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"])
def test_an_idle_connection_is_closed_after_the_idle_timeout(start_server, sent):
    # Idle from the start, or stalled halfway through a request's body.
    port = port_of(start_server(EchoRetriever(), idle_timeout_s=1))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(sent)
        started = time.monotonic()
        assert connection.recv(1) == b""  # closed by the front, without a word
        assert 1 <= time.monotonic() - started < 5


def test_an_oversized_body_is_refused_from_its_header_before_it_is_sent(start_server):
    url = start_server(EchoRetriever(), max_body_bytes=1000).url
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
    connection.putrequest("POST", "/retrieve")
    connection.putheader("Content-Length", str(1024**3))  # announces 1 GiB and sends none of it
    connection.putheader("Content-Type", "application/json")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "limit of 1000 bytes" in json.loads(response.read())["error"]
    connection.close()
    # A chunked body is counted as it arrives.
    chunks = (b"x" * 600 for _ in range(3))
    assert requests.post(f"{url}/retrieve", data=chunks, timeout=10).status_code == 413
    # A body of exactly the limit is served: {"queries": [""]} is 17 characters.
    exactly = json.dumps({"queries": ["q" * (1000 - 17)]})
    assert len(exactly) == 1000
    assert requests.post(f"{url}/retrieve", data=exactly, timeout=10).status_code == 200


def test_stats_latency_counts_from_the_fronts_arrival_stamp_and_ignores_a_clients(start_server):
    service = RetrievalService(EchoRetriever(), ServerConfig(max_wait_ms=1.0))
    try:
        client = create_app(service).test_client()
        # A request that reached the front 2 s ago (e.g. it waited for a backend connection).
        stamp = {ARRIVAL_HEADER: repr(time.monotonic() - 2.0)}
        client.post("/retrieve", json={"queries": ["q"]}, headers=stamp)
        assert client.get("/stats").get_json()["latency_ms"]["p50"] >= 2000
    finally:
        service.close()
    url = start_server(EchoRetriever()).url
    forged = {ARRIVAL_HEADER: repr(time.monotonic() - 1000.0)}
    assert requests.post(f"{url}/retrieve", json={"queries": ["q"]}, headers=forged, timeout=10).ok
    assert requests.get(f"{url}/stats", timeout=10).json()["latency_ms"]["p50"] < 100_000


def test_a_killed_front_is_started_again_on_the_same_port(start_server):
    server = start_server(EchoRetriever())
    first = server.front.process.pid
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while server.front.process.pid == first:
        assert time.monotonic() < deadline, "no new front"
        time.sleep(0.05)
    response = requests.post(f"{server.url}/retrieve", json={"queries": ["again"]}, timeout=30)
    assert response.json()["result"][0][0]["id"] == "again#0"


def test_a_port_in_use_is_one_clear_error(start_server):
    port = port_of(start_server(EchoRetriever()))
    with pytest.raises(SearchgymError, match=f"port {port} on 127.0.0.1 is in use"):
        listen("127.0.0.1", port)


@pytest.mark.parametrize("port", [-1, 65536, 70000])
def test_ports_outside_the_tcp_range_are_refused(port):
    with pytest.raises(SearchgymError, match="--port must be from 0 to 65535"):
        check_port(port)


@pytest.mark.parametrize("changes", [{"max_inflight": 0}, {"max_connections": 0}, {"idle_timeout_s": 0}])
def test_door_limits_refuse_impossible_values(changes):
    with pytest.raises(SearchgymError):
        DoorLimits(**changes)


def test_a_backend_connection_closed_while_idle_is_replaced_without_failing_a_request(tmp_path):
    # A stand-in search process that closes each connection right after its reply, as a restarted or
    # timed-out waitress does, without saying so in the reply.
    async def scenario() -> list[bytes]:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{"status":"ok"}')
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.close()

        search = await asyncio.start_unix_server(answer, path=str(tmp_path / "search.sock"))
        stop = asyncio.Event()
        listening = listen("127.0.0.1", 0)
        front = asyncio.ensure_future(
            serve_front(listening, str(tmp_path / "search.sock"), DoorLimits(), stop=stop)
        )
        replies = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection(*listening.getsockname())
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            replies.append(await asyncio.wait_for(reader.read(), 10))
            writer.close()
            await asyncio.sleep(0.2)  # the stand-in has closed the pooled connection by now
        stop.set()
        await front
        search.close()
        return replies

    for reply in asyncio.run(scenario()):
        assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(b'{"status":"ok"}')


def test_a_reply_counts_as_in_flight_until_the_client_reads_it(start_server):
    server = start_server(EchoRetriever(), max_inflight=1, idle_timeout_s=60)
    # About 40 MB of reply: far more than the sockets' buffers take in while the client reads nothing.
    big = json.dumps({"queries": [f"{n} " + "x" * 2000 for n in range(100)], "topk": 100}).encode()
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=30) as stalled:
        raw_post(stalled, big)
        assert stalled.recv(1, socket.MSG_PEEK)  # the front has the whole reply and has begun sending it
        refused = requests.post(f"{server.url}/retrieve", json={"queries": ["q"]}, timeout=10)
        assert refused.status_code == 429  # the unread reply still holds the only slot
        status, _, body = read_response(stalled)  # read it: the slot is free again
        assert status == "HTTP/1.1 200 OK" and len(json.loads(body)["result"]) == 100
    assert requests.post(f"{server.url}/retrieve", json={"queries": ["q"]}, timeout=10).status_code == 200


def test_a_client_that_stops_reading_is_cut_off_and_frees_its_slot(start_server):
    server = start_server(EchoRetriever(), max_inflight=1, idle_timeout_s=1)
    big = json.dumps({"queries": [f"{n} " + "x" * 2000 for n in range(100)], "topk": 100}).encode()
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=30) as stalled:
        raw_post(stalled, big)
        deadline = time.monotonic() + 30
        while requests.post(f"{server.url}/retrieve", json={"queries": ["q"]}, timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the stalled client kept its slot"
            time.sleep(0.2)
