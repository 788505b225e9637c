"""The retrieval server under hostile load: many clients, overload, kill -9 and restart, a soak.

``searchgym serve`` runs in a subprocess on a fixed loopback port (wiki-mini BM25 by default, built on first
use); ``--clients`` threads each send one new query per POST (a question plus a unique suffix, so the cache
never answers), back to back, with a light retrying client (429 / 503: wait Retry-After, at most 0.2 s;
connection errors: back off from 0.1 s to 2 s; give up on a query after 60 s, as HttpRetriever does). Phases:

1. load: the default admission limit (``--max-inflight`` 256) against ``--clients`` (200) for ``--seconds``;
2. overload: the server restarted with ``--max-inflight`` ``--overload-inflight`` (50) under the same
   clients, past the admission limit: how many 429s, and how fast they come back;
3. kill: under load, the server is killed with SIGKILL halfway and restarted on the same port;
4. soak: the default server under load for ``--soak-seconds`` (300), its memory sampled every 10 s, after
   ``--soak-warmup-seconds`` (60) of the same load (reported apart), in which the result cache fills to its
   cap: the soak asks whether memory stays flat once the server is in its steady state.

Each phase prints requests answered, 429s, 503s, other errors (anything else, and queries given up on),
p50 / p99 latency of answered requests and of 429s, and the server's resident memory at start and end.

    .venv/bin/python benchmarks/server_load.py --soak-seconds 60
"""

import argparse
import dataclasses
import http.client
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from searchgym.paths import QA_DIR, WIKI_MINI_CORPUS
from searchgym.retriever.index import IndexSpec, ensure_index

GIVE_UP_S = (
    60.0  # a query not answered within this (retries included) counts as an error, as in HttpRetriever
)


@dataclasses.dataclass
class Tally:
    """What one phase's clients saw."""

    answered_ms: list[float] = dataclasses.field(default_factory=list)
    refused_ms: list[float] = dataclasses.field(default_factory=list)  # 429 round trips
    unavailable: int = 0  # 503 with Retry-After
    connection_errors: int = 0  # retried (e.g. while the server restarts)
    errors: list[str] = dataclasses.field(default_factory=list)  # other statuses, and queries given up on


def questions() -> list[str]:
    rows = [json.loads(line) for name in ("train", "dev") for line in (QA_DIR / f"{name}.jsonl").open()]
    return [row["question"] for row in rows]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(index_dir: Path, port: int, *flags: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "searchgym", "serve", "--index", str(index_dir), "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [*command, *flags], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    announcement = server.stdout.readline() if server.stdout else ""
    if " at http://" not in announcement:
        raise RuntimeError(f"the server did not start: {announcement!r}")
    return server


def rss_mb(pid: int) -> float:
    """Resident memory of the server: its search process and its front process together."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0.0
    for process in (pid, *map(int, children)):
        for line in Path(f"/proc/{process}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total


def post(connection: http.client.HTTPConnection, body: str) -> http.client.HTTPResponse:
    """POST ``body`` to ``/retrieve`` and read the whole reply."""
    connection.request("POST", "/retrieve", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    return response


def run_clients(port: int, queries: list[str], *, clients: int, seconds: float, phase: str) -> Tally:
    """``clients`` threads sending new single-query requests for ``seconds``; retried until answered."""
    tallies = [Tally() for _ in range(clients)]
    deadline = time.perf_counter() + seconds

    def client(worker: int) -> None:
        tally, connection, sent_count, down_s = tallies[worker], None, 0, 0.05
        while time.perf_counter() < deadline:
            query = f"{queries[(worker * 7919 + sent_count) % len(queries)]} {phase}{worker}x{sent_count}"
            sent_count += 1
            body = json.dumps({"queries": [query], "topk": 3, "return_scores": True})
            given_up = time.perf_counter() + GIVE_UP_S
            while True:
                if connection is None:
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=GIVE_UP_S)
                started = time.perf_counter()
                try:
                    response = post(connection, body)
                # Refused or reset while the server is down, or a reply cut off by the kill.
                except (OSError, http.client.HTTPException):
                    tally.connection_errors += 1
                    connection.close()
                    down_s = min(2 * down_s, 2.0)  # back off as HttpRetriever does, not to slow a restart
                    connection, wait_s = None, down_s
                else:
                    down_s = 0.05
                    elapsed_ms = (time.perf_counter() - started) * 1000.0
                    if response.status == 200:
                        tally.answered_ms.append(elapsed_ms)
                        break
                    retry_after = response.getheader("Retry-After")
                    if response.status == 429 and retry_after is not None:
                        tally.refused_ms.append(elapsed_ms)
                    elif response.status == 503 and retry_after is not None:
                        tally.unavailable += 1
                    else:
                        tally.errors.append(f"HTTP {response.status}")
                        break
                    if response.getheader("Connection", "").lower() == "close":
                        connection.close()
                        connection = None
                    wait_s = min(float(retry_after), 0.2)  # a load generator: retry sooner than told
                if time.perf_counter() + wait_s > given_up:
                    tally.errors.append(
                        f"given up after {'connection errors' if down_s > 0.05 else 'refusals'}"
                    )
                    break
                time.sleep(wait_s)
        if connection is not None:
            connection.close()

    threads = [threading.Thread(target=client, args=(worker,)) for worker in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = Tally()
    for tally in tallies:
        total.answered_ms += tally.answered_ms
        total.refused_ms += tally.refused_ms
        total.unavailable += tally.unavailable
        total.connection_errors += tally.connection_errors
        total.errors += tally.errors
    return total


def probe(port: int, seconds: float, results: "multiprocessing.Queue[dict[int, list[float]]]") -> None:
    """One client in its own process: a new query every 20 ms, round trips in ms by status.

    The load's 200 client threads share one interpreter, so each of their round trips also includes the
    wait for that process's GIL; this client's do not, as for a client on another machine.
    """
    by_status: dict[int, list[float]] = {}
    connection, sent_count = None, 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if connection is None:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=GIVE_UP_S)
        body = json.dumps({"queries": [f"probe {sent_count}: who wrote the probe?"], "topk": 3})
        sent_count += 1
        started = time.perf_counter()
        try:
            response = post(connection, body)
        except (OSError, http.client.HTTPException):
            connection.close()
            connection = None
        else:
            by_status.setdefault(response.status, []).append((time.perf_counter() - started) * 1000.0)
            if response.getheader("Connection", "").lower() == "close":
                connection.close()
                connection = None
        time.sleep(0.02)
    results.put(by_status)


def percentiles(values: list[float]) -> str:
    if not values:
        return "-"
    return f"p50 {np.percentile(values, 50):.1f} ms, p99 {np.percentile(values, 99):.1f} ms"


def report(phase: str, tally: Tally, seconds: float, memory: tuple[float, float]) -> None:
    print(
        f"{phase}: {len(tally.answered_ms)} answered ({len(tally.answered_ms) / seconds:.0f}/s), "
        f"errors {len(tally.errors)}, 429s {len(tally.refused_ms)}, 503s {tally.unavailable}, "
        f"connection errors retried {tally.connection_errors}\n"
        f"  answered: {percentiles(tally.answered_ms)}; 429s: {percentiles(tally.refused_ms)}\n"
        f"  errors by kind: {dict(Counter(tally.errors))}\n"
        f"  server memory: {memory[0]:.0f} MB at start, {memory[1]:.0f} MB at end",
        flush=True,
    )


def phase_with_server(
    index_dir: Path,
    queries: list[str],
    args: argparse.Namespace,
    *,
    phase: str,
    seconds: float,
    warmup_s: float = 2.0,
    flags=(),
) -> None:
    port = free_port()
    server = start_server(index_dir, port, *flags)
    try:
        started_mb = rss_mb(server.pid)
        run_clients(port, queries, clients=args.clients, seconds=warmup_s, phase=f"warm{phase}")
        before = rss_mb(server.pid)
        print(
            f"{phase}: warm-up of {warmup_s:.0f} s, server memory {started_mb:.0f} -> {before:.0f} MB",
            flush=True,
        )
        samples: list[float] = []
        sampler_done = threading.Event()

        def sample() -> None:
            while not sampler_done.wait(10.0):
                samples.append(rss_mb(server.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        spawn = multiprocessing.get_context("spawn")
        probed: multiprocessing.Queue[dict[int, list[float]]] = spawn.Queue()
        prober = spawn.Process(target=probe, args=(port, seconds, probed))
        prober.start()
        tally = run_clients(port, queries, clients=args.clients, seconds=seconds, phase=phase)
        by_status = probed.get(timeout=GIVE_UP_S)
        prober.join()
        sampler_done.set()
        report(phase, tally, seconds, (before, rss_mb(server.pid)))
        print(
            "  one more client in its own process: "
            + "; ".join(
                f"HTTP {status} x {len(ms)}: {percentiles(ms)}" for status, ms in sorted(by_status.items())
            ),
            flush=True,
        )
        if samples:
            print(f"  memory every 10 s (MB): {', '.join(f'{mb:.0f}' for mb in samples)}", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def kill_phase(index_dir: Path, queries: list[str], args: argparse.Namespace) -> None:
    port = free_port()
    servers = [start_server(index_dir, port)]
    before = rss_mb(servers[0].pid)

    def kill_and_restart() -> None:
        time.sleep(args.seconds / 2)
        servers[0].kill()  # SIGKILL: no clean shutdown
        servers[0].wait()
        killed = time.perf_counter()
        servers.append(start_server(index_dir, port))
        print(f"  restarted {time.perf_counter() - killed:.1f} s after the kill", flush=True)

    killer = threading.Thread(target=kill_and_restart)
    killer.start()
    try:
        tally = run_clients(port, queries, clients=args.clients, seconds=args.seconds, phase="kill")
        killer.join()
        report("kill -9 + restart", tally, args.seconds, (before, rss_mb(servers[-1].pid)))
    finally:
        killer.join()
        for server in servers:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=30)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--index", type=Path, help="index folder (default: wiki-mini BM25, built on first use)"
    )
    parser.add_argument("--clients", type=int, default=200, help="concurrent clients")
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="length of the load, overload, kill phases"
    )
    parser.add_argument(
        "--overload-inflight", type=int, default=50, help="--max-inflight of the overload phase"
    )
    parser.add_argument("--soak-seconds", type=float, default=300.0, help="length of the soak")
    parser.add_argument(
        "--soak-warmup-seconds",
        type=float,
        default=60.0,
        help="full load before the soak's memory is first read: the result cache fills to its cap, every "
        "server thread is used once",
    )
    parser.add_argument(
        "--phases", default="load,overload,kill,soak", help="comma-separated phases to run, in this order"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    index_dir = args.index or Path("indexes/wiki-mini-bm25")
    if args.index is None:
        ensure_index(IndexSpec(corpus=WIKI_MINI_CORPUS, out=index_dir, method="bm25", progress=False))
    queries = questions()
    phases = args.phases.split(",")
    if "load" in phases:
        phase_with_server(index_dir, queries, args, phase="load", seconds=args.seconds)
    if "overload" in phases:
        overload = ("--max-inflight", str(args.overload_inflight))
        phase_with_server(index_dir, queries, args, phase="overload", seconds=args.seconds, flags=overload)
    if "kill" in phases:
        kill_phase(index_dir, queries, args)
    if "soak" in phases:
        phase_with_server(
            index_dir,
            queries,
            args,
            phase="soak",
            seconds=args.soak_seconds,
            warmup_s=args.soak_warmup_seconds,
        )


if __name__ == "__main__":
    main()
