"""Load shedding at the door, over real sockets: admitted requests, connections, body size, ports."""

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from retriever_fixtures import BlockingRetriever, EchoRetriever

from searchgym.errors import SearchgymError
from searchgym.retriever import admission
from searchgym.retriever.admission import ARRIVAL_KEY, DoorLimits, check_port, open_door_server
from searchgym.retriever.config import ServerConfig
from searchgym.retriever.server import GATE_EXTENSION, RetrievalService, create_app


@pytest.fixture
def start_server():
    """Serve a retriever behind the door on a loopback port; yields (retriever, **config) -> base URL."""
    running = []

    def start(retriever, **config):
        service = RetrievalService(retriever, ServerConfig(**{"max_wait_ms": 1.0, **config}))
        limits = DoorLimits(
            max_inflight=service.config.max_inflight,
            max_connections=service.config.max_connections,
            idle_timeout_s=service.config.idle_timeout_s,
            max_body_bytes=service.config.max_body_bytes,
        )
        app = create_app(service)
        gate = app.extensions[GATE_EXTENSION]
        server = open_door_server(app, host="127.0.0.1", port=0, limits=limits, gate=gate)
        threading.Thread(target=server.run, daemon=True).start()
        running.append((server, service))
        return f"http://127.0.0.1:{server.effective_port}"

    yield start
    for server, service in running:
        server.close()
        service.close()


def test_past_max_inflight_a_request_gets_429_at_once_and_health_still_answers(start_server):
    blocking = BlockingRetriever()
    url = start_server(blocking, max_inflight=2, max_batch=1)
    with ThreadPoolExecutor(2) as pool:
        admitted = [pool.submit(requests.post, f"{url}/retrieve", json={"queries": [q]}) for q in "ab"]
        assert blocking.entered.wait(10)
        # Both admitted requests are inside once the second is queued behind the first (in the backend).
        deadline = time.monotonic() + 30
        while requests.get(f"{url}/stats", timeout=10).json()["queue"]["pending"] < 1:
            assert time.monotonic() < deadline, "the second request never reached the queue"
            time.sleep(0.01)
        refused = requests.post(f"{url}/retrieve", json={"queries": ["c"]}, timeout=10)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert "2 requests are being served" in refused.json()["error"]
        assert requests.get(f"{url}/health", timeout=10).status_code == 200
        blocking.release.set()
        assert [future.result().status_code for future in admitted] == [200, 200]
    stats = requests.get(f"{url}/stats", timeout=10).json()
    assert stats["errors"]["429"] >= 1 and stats["requests"] >= 2


def raw_post(connection: socket.socket, body: bytes, *, version: str = "1.1", close: bool = False) -> None:
    head = f"POST /retrieve HTTP/{version}\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    connection.sendall(head.encode() + (b"Connection: close\r\n" if close else b"") + b"\r\n" + body)


def read_response(connection: socket.socket) -> tuple[str, dict[str, str], bytes]:
    """One HTTP response from a raw socket: status line, headers (lower-case names), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines)}
    while len(body) < int(headers["content-length"]):
        body += connection.recv(4096)
    return status, headers, body


def test_while_the_gate_is_full_the_io_loop_refuses_without_a_thread(start_server, monkeypatch):
    # No spare threads: the only thread is held by the admitted request, so a 429 can only come from the
    # I/O loop itself.
    monkeypatch.setattr(admission, "DOOR_THREADS", 0)
    blocking = BlockingRetriever()
    url = start_server(blocking, max_inflight=1, max_batch=1)
    port = int(url.rsplit(":", 1)[1])
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
            raw_post(connection, query)  # once the gate has room, the same connection is served
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
    stats = requests.get(f"{url}/stats", timeout=10).json()
    assert stats["errors"]["429"] == 4


def test_past_max_connections_a_new_connection_gets_503_and_is_closed(start_server):
    url = start_server(EchoRetriever(), max_connections=2)
    port = int(url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    time.sleep(0.2)  # let the server accept both
    extra = socket.create_connection(("127.0.0.1", port), timeout=10)
    reply = extra.recv(4096).decode()
    extra.close()
    assert reply.startswith("HTTP/1.1 503") and "Retry-After: 1" in reply and "Connection: close" in reply
    for connection in idle:
        connection.close()
    time.sleep(0.2)
    assert requests.post(f"{url}/retrieve", json={"queries": ["q"]}, timeout=10).status_code == 200


def test_an_oversized_body_is_refused_from_its_header_before_it_is_sent(start_server):
    url = start_server(EchoRetriever(), max_body_bytes=1000)
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
    connection.putrequest("POST", "/retrieve")
    connection.putheader("Content-Length", str(1024**3))  # announces 1 GiB and sends none of it
    connection.putheader("Content-Type", "application/json")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413
    connection.close()
    # A body of exactly the limit is served: {"queries": [""]} is 17 characters.
    exactly = json.dumps({"queries": ["q" * (1000 - 17)]})
    assert len(exactly) == 1000
    assert requests.post(f"{url}/retrieve", data=exactly, timeout=10).status_code == 200


def test_a_port_in_use_is_one_clear_error(start_server):
    url = start_server(EchoRetriever())
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(SearchgymError, match=f"port {port} on 127.0.0.1 is in use"):
        open_door_server(create_app_for_echo(), host="127.0.0.1", port=port, limits=DoorLimits())


def create_app_for_echo():
    return create_app(RetrievalService(EchoRetriever(), ServerConfig()))


@pytest.mark.parametrize("port", [-1, 65536, 70000])
def test_ports_outside_the_tcp_range_are_refused(port):
    with pytest.raises(SearchgymError, match="--port must be from 0 to 65535"):
        check_port(port)


@pytest.mark.parametrize("changes", [{"max_inflight": 0}, {"max_connections": 0}, {"idle_timeout_s": 0}])
def test_door_limits_refuse_impossible_values(changes):
    with pytest.raises(SearchgymError):
        DoorLimits(**changes)


def test_stats_latency_counts_from_arrival_not_from_the_handler():
    service = RetrievalService(EchoRetriever(), ServerConfig(max_wait_ms=1.0))
    try:
        client = create_app(service).test_client()
        # A request that a thread took 2 s ago (e.g. it waited in a queue before the handler ran).
        arrived = time.perf_counter() - 2.0
        client.post("/retrieve", json={"queries": ["q"]}, environ_base={ARRIVAL_KEY: arrived})
        assert client.get("/stats").get_json()["latency_ms"]["p50"] >= 2000
    finally:
        service.close()
