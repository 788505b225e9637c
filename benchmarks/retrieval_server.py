"""Retrieval server throughput and latency over loopback, against the raw backend called in-process.

For one index (built on first use for wiki-mini: ``--method bm25`` or ``--method dense`` = MiniLM-Flat):

1. raw: the backend called in this process with batches of ``--clients`` queries -> queries/s;
2. for each server setting (micro-batching on; off = ``--max-batch 1``): ``searchgym serve`` in a subprocess,
   ``--clients`` threads each sending one query per POST, back to back, for ``--seconds`` -> queries/s,
   p50 / p99 latency, mean batch size (from /stats), and the ratio to the raw rate.

The result cache is off, and queries are the wiki-mini train + dev questions, so every query is searched.
``--encoder-backend onnx`` / ``onnx-int8`` serve (and call in-process) the dense encoder in ONNX Runtime and
first print how many questions get the same top 3 as with the PyTorch encoder. ``--url`` runs only the
client loop, against a server already running there (another implementation of the same API).
``--rerank MODEL`` puts a cross-encoder over the top ``--rerank-depth`` in the server and in-process, and
first prints gold@3 (the share of the dev questions whose gold passages are known, 170 of 250, with one of
them in the top 3) without and with it.

    .venv/bin/python benchmarks/retrieval_server.py --method dense --clients 32 --seconds 12
    .venv/bin/python benchmarks/retrieval_server.py --method dense --clients 1 --encoder-backend onnx
    .venv/bin/python benchmarks/retrieval_server.py --clients 1 --url http://127.0.0.1:8001/retrieve
"""

import argparse
import dataclasses
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import requests

from searchgym.paths import QA_DIR, REPO_ROOT, WIKI_MINI_CORPUS
from searchgym.retriever.config import ENCODER_BACKENDS
from searchgym.retriever.index import IndexSpec, ensure_index, load_retriever
from searchgym.retriever.manifest import Manifest


@dataclasses.dataclass(frozen=True)
class Load:
    """What a closed loop of clients measured."""

    queries_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    mean_batch: float = 0.0  # queries per backend call, from the server's /stats


def questions() -> list[str]:
    rows = [json.loads(line) for name in ("train", "dev") for line in (QA_DIR / f"{name}.jsonl").open()]
    return [row["question"] for row in rows]


def gold_at_3(index_dir: Path, options: dict[str, Any]) -> float:
    """Share of the dev questions with known ``gold_doc_ids`` that have one among their top 3 passages."""
    rows = [json.loads(line) for line in (QA_DIR / "dev.jsonl").open()]
    rows = [row for row in rows if row.get("gold_doc_ids")]
    results = load_retriever(index_dir, device="cpu", **options).search([row["question"] for row in rows], 3)
    hits = [
        bool({p.id for p in passages} & set(row["gold_doc_ids"]))
        for row, passages in zip(rows, results, strict=True)
    ]
    return sum(hits) / len(hits)


def retriever_options(index_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``load_retriever``'s options for this run (a BM25 index has no encoder)."""
    options: dict[str, Any] = {}
    if Manifest.load(index_dir).method == "dense":
        options["encoder_backend"] = args.encoder_backend
    if args.rerank is not None:
        options |= {"rerank": args.rerank, "rerank_depth": args.rerank_depth}
    return options


def serve_flags(index_dir: Path, args: argparse.Namespace) -> list[str]:
    """The ``searchgym serve`` flags giving the server the same backend as :func:`retriever_options`."""
    flags = []
    if Manifest.load(index_dir).method == "dense":
        flags += ["--encoder-backend", args.encoder_backend, "--search-workers", str(args.search_workers)]
    if args.rerank is not None:
        flags += ["--rerank", args.rerank, "--rerank-depth", str(args.rerank_depth)]
    return flags


def raw_rate(index_dir: Path, queries: list[str], args: argparse.Namespace) -> float:
    """Queries/s of the backend called directly with batches of ``--clients`` queries."""
    batch, seconds = args.clients, args.seconds
    retriever = load_retriever(index_dir, device="cpu", **retriever_options(index_dir, args))
    retriever.search(queries[:batch], 3)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        retriever.search([queries[(done + i) % len(queries)] for i in range(batch)], 3)
        done += batch
    return done / (time.perf_counter() - start)


def top3_agreement(index_dir: Path, queries: list[str], backend: str) -> float:
    """The share of ``queries`` whose top 3 ids (in order) ``backend`` finds as the PyTorch encoder does."""
    ours = load_retriever(index_dir, device="cpu", encoder_backend=backend).search(queries, 3)
    reference = load_retriever(index_dir, device="cpu").search(queries, 3)
    same = [[p.id for p in a] == [p.id for p in b] for a, b in zip(ours, reference, strict=True)]
    return sum(same) / len(same)


def start_server(index_dir: Path, server_args: list[str], threads: int) -> tuple[subprocess.Popen[str], str]:
    command = [
        sys.executable,
        "-m",
        "searchgym",
        "serve",
        "--index",
        str(index_dir),
        "--port",
        "0",
        "--cache-size",
        "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [*command, *server_args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    announcement = server.stdout.readline() if server.stdout else ""
    if " at http://" not in announcement:
        raise RuntimeError(f"the server did not start: {announcement!r}")
    return server, announcement.rsplit(" at ", 1)[1].strip()


def closed_loop(url: str, queries: list[str], *, clients: int, seconds: float) -> Load:
    """``clients`` threads, each POSTing one query at a time, for ``seconds``."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    barrier = threading.Barrier(clients + 1)

    address = urlsplit(url)

    def client(worker: int) -> None:
        # http.client on a kept-alive connection: a light load generator leaves the cores to the server.
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
        barrier.wait()
        position = worker * 7919
        while time.perf_counter() < deadline:
            payload = {"queries": [queries[position % len(queries)]], "topk": 3, "return_scores": True}
            sent = time.perf_counter()
            connection.request(
                "POST", address.path, json.dumps(payload), {"Content-Type": "application/json"}
            )
            response = connection.getresponse()
            response.read()
            latencies[worker].append(time.perf_counter() - sent)
            errors[worker] += response.status != 200
            position += 1
        connection.close()

    threads = [threading.Thread(target=client, args=(worker,)) for worker in range(clients)]
    for thread in threads:
        thread.start()
    deadline = time.perf_counter() + seconds
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    all_ms = np.array([latency for worker in latencies for latency in worker]) * 1000.0
    return Load(
        len(all_ms) / elapsed, float(np.percentile(all_ms, 50)), float(np.percentile(all_ms, 99)), sum(errors)
    )


def measure_server(
    index_dir: Path, queries: list[str], args: argparse.Namespace, server_args: list[str]
) -> Load:
    """One server configuration under load, with its mean batch size from /stats."""
    server, url = start_server(index_dir, server_args, args.server_threads)
    try:
        closed_loop(url, queries, clients=args.clients, seconds=2.0)  # warm-up
        load = closed_loop(url, queries, clients=args.clients, seconds=args.seconds)
        batches = requests.get(url.replace("/retrieve", "/stats"), timeout=10).json()["batches"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    return dataclasses.replace(load, mean_batch=batches["mean_size"])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--method", choices=("bm25", "dense"), default="dense", help="wiki-mini index to serve"
    )
    parser.add_argument("--index", type=Path, help="serve this index folder instead")
    parser.add_argument("--clients", type=int, default=32, help="concurrent single-query clients")
    parser.add_argument("--seconds", type=float, default=12.0, help="measuring time per configuration")
    parser.add_argument(
        "--server-threads", type=int, default=1, help="OMP/torch threads of the server process"
    )
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="micro-batching wait")
    parser.add_argument("--repeats", type=int, default=1, help="run everything N times, keep each one's best")
    parser.add_argument(
        "--encoder-backend", choices=ENCODER_BACKENDS, default="torch", help="dense: what runs the encoder"
    )
    parser.add_argument("--search-workers", type=int, default=1, help="dense: the server's --search-workers")
    parser.add_argument("--rerank", metavar="MODEL", help="rerank with this cross-encoder folder")
    parser.add_argument("--rerank-depth", type=int, default=10, help="candidates the cross-encoder rescores")
    parser.add_argument("--url", help="only measure the /retrieve endpoint of a server already running here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.server_threads)
    import torch

    torch.set_num_threads(args.server_threads)
    queries = questions()
    if args.url is not None:
        closed_loop(args.url, queries, clients=args.clients, seconds=2.0)  # warm-up
        load = closed_loop(args.url, queries, clients=args.clients, seconds=args.seconds)
        print(
            f"{args.url}, {args.clients} clients: {load.queries_per_s:8.1f} q/s  p50 {load.p50_ms:6.1f} ms  ",
            end="",
        )
        print(f"p99 {load.p99_ms:6.1f} ms  errors {load.errors}")
        return
    index_dir = args.index or REPO_ROOT / "indexes" / f"wiki-mini-{args.method}"
    if args.index is None:
        ensure_index(IndexSpec(corpus=WIKI_MINI_CORPUS, out=index_dir, method=args.method, device="cpu"))
    if args.encoder_backend != "torch":
        agreement = top3_agreement(index_dir, queries, args.encoder_backend)
        print(
            f"{args.encoder_backend}: the same top 3 as the PyTorch encoder for {agreement:.1%} of questions"
        )
    if args.rerank is not None:
        plain = gold_at_3(index_dir, {**retriever_options(index_dir, args), "rerank": None})
        reranked = gold_at_3(index_dir, retriever_options(index_dir, args))
        print(f"gold@3 on the dev questions: {plain:.1%} without the reranker, {reranked:.1%} with it")
    backend = serve_flags(index_dir, args)
    settings = {
        "micro-batching on ": ["--max-wait-ms", str(args.max_wait_ms), *backend],
        "micro-batching off": ["--max-batch", "1", "--max-wait-ms", "0", *backend],
    }
    raw = 0.0
    best: dict[str, Load] = {}
    for _ in range(args.repeats):
        raw = max(raw, raw_rate(index_dir, queries, args))
        for name, server_args in settings.items():
            load = measure_server(index_dir, queries, args, server_args)
            if name not in best or load.queries_per_s > best[name].queries_per_s:
                best[name] = load
    print(f"index {index_dir.name}, {' '.join(backend) or 'bm25'}, {args.clients} clients, ", end="")
    print(f"{args.server_threads} server thread(s), best of {args.repeats}")
    print(f"raw in-process, batches of {args.clients}: {raw:8.1f} q/s")
    for name, load in best.items():
        rate, share = f"{load.queries_per_s:8.1f} q/s", f"{load.queries_per_s / raw:5.1%} of raw"
        print(
            f"server, {name}: {rate}  p50 {load.p50_ms:6.1f} ms  p99 {load.p99_ms:6.1f} ms  "
            f"mean batch {load.mean_batch:5.1f}  errors {load.errors}  = {share}"
        )
    on, off = (load.queries_per_s for load in best.values())
    print(f"micro-batching speed-up: {on / off:.1f}x")


if __name__ == "__main__":
    main()
