"""The two commands as a user runs them: subprocesses, and one server over a real loopback socket."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from retriever_fixtures import QUERIES, TINY_CORPUS, write_jsonl

from searchgym.cli import build_parser
from searchgym.retriever.cli import NO_THREAD_CACHES, default_index_dir, environ_without_thread_caches
from searchgym.retriever.client import HttpRetriever
from searchgym.retriever.index import load_retriever

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
ENV.pop("GLIBC_TUNABLES", None)
ON_GLIBC = sys.platform == "linux" and bool(os.confstr("CS_GNU_LIBC_VERSION"))


def searchgym(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "searchgym", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=300,
    )


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = write_jsonl(root / "tiny.jsonl.gz", TINY_CORPUS)
    done = searchgym("index", "--corpus", corpus, "--method", "bm25", "--no-progress", cwd=root)
    assert done.returncode == 0, done.stderr
    return root, corpus, done


def test_index_writes_the_default_folder_and_says_how_to_serve_it(indexed):
    root, corpus, done = indexed
    out = root / default_index_dir(corpus, "bm25")
    assert out == root / "indexes" / "tiny-bm25"
    assert json.loads((out / "manifest.json").read_text())["num_documents"] == len(TINY_CORPUS)
    assert f"indexed {len(TINY_CORPUS)} documents" in done.stdout
    assert "searchgym serve --index indexes/tiny-bm25" in done.stdout


def test_a_malformed_corpus_is_one_line_with_the_line_number(tmp_path):
    corpus = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(TINY_CORPUS[0]), '{"id": "1"}'])
    done = searchgym("index", "--corpus", corpus, "--out", tmp_path / "out", "--no-progress")
    assert done.returncode == 2
    assert done.stderr.startswith(f"searchgym index: error: {corpus}, line 2: expected a string 'contents'")
    assert "Traceback" not in done.stderr


def test_serve_over_a_real_socket(indexed):
    root, corpus, _ = indexed
    index_dir = root / "indexes" / "tiny-bm25"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "searchgym",
            "serve",
            "--index",
            str(index_dir),
            "--port",
            "0",
            "--corpus",
            str(corpus),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ENV,
    )
    try:
        announcement = server.stdout.readline()
        assert announcement.startswith(
            f"searchgym serve: bm25 index of {len(TINY_CORPUS)} documents at http://127.0.0.1:"
        )
        url = announcement.split(" at ")[1].strip()
        payload = {"queries": QUERIES[:2], "topk": 3, "return_scores": True}
        body = requests.post(url, json=payload, timeout=30).json()
        assert [hits[0]["document"]["id"] for hits in body["result"]] == ["0", "2"]
        assert HttpRetriever(url).search(QUERIES, 3) == load_retriever(index_dir).search(QUERIES, 3)
        assert requests.get(url.replace("/retrieve", "/stats"), timeout=30).json()["requests"] == 2
        if ON_GLIBC:  # it restarted itself with glibc's per-thread malloc caches off (the soak's growth)
            environ = Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
            assert f"GLIBC_TUNABLES={NO_THREAD_CACHES}".encode() in environ
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0


def start_serve(index_dir: Path, port: int) -> tuple[subprocess.Popen[str], str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "searchgym", "serve", "--index", str(index_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ENV,
    )
    announcement = server.stdout.readline()
    assert " at http://127.0.0.1:" in announcement, announcement
    return server, announcement.split(" at ")[1].strip()


def front_runs(pid: int) -> bool:
    try:  # a zombie's command line is empty
        return b"searchgym.retriever.front" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_killed_server_leaves_no_front_behind(indexed):
    index_dir = indexed[0] / "indexes" / "tiny-bm25"
    server, url = start_serve(index_dir, 0)
    (front,) = map(int, Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split())
    server.kill()  # SIGKILL: no clean shutdown, the front is not told
    server.wait()
    deadline = time.monotonic() + 30
    while front_runs(front):
        assert time.monotonic() < deadline, "the front outlived its server"
        time.sleep(0.05)
    port = int(url.removesuffix("/retrieve").rsplit(":", 1)[1])
    again, url = start_serve(index_dir, port)  # the port is free again
    try:
        assert requests.post(url, json={"queries": QUERIES[:1]}, timeout=30).status_code == 200
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(timeout=30) == 0


@pytest.mark.skipif(not ON_GLIBC, reason="a glibc tunable")
def test_the_thread_caches_are_turned_off_without_overriding_the_users_tunables():
    assert environ_without_thread_caches({"PATH": "/bin"}) == {
        "PATH": "/bin",
        "GLIBC_TUNABLES": NO_THREAD_CACHES,
    }
    arenas = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert environ_without_thread_caches(arenas) == {
        "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{NO_THREAD_CACHES}"
    }
    assert environ_without_thread_caches({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}) is None
    assert environ_without_thread_caches({"GLIBC_TUNABLES": NO_THREAD_CACHES}) is None


def test_serve_refuses_an_index_of_another_corpus(indexed, tmp_path):
    root, _, _ = indexed
    other = write_jsonl(tmp_path / "other.jsonl", TINY_CORPUS[:2])
    done = searchgym("serve", "--index", root / "indexes" / "tiny-bm25", "--corpus", other)
    assert done.returncode == 2 and "was built from another corpus" in done.stderr


def test_every_server_limit_is_a_documented_flag():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = {action.dest: action for action in serve._actions}
    for name in ("max_batch", "max_wait_ms", "max_queue", "cache_size", "max_topk", "max_query_chars"):
        assert flags[name].help and not flags[name].help.startswith(" (default")
    args = build_parser().parse_args(["serve", "--index", "x", "--max-batch", "1", "--max-wait-ms", "0.5"])
    assert (args.max_batch, args.max_wait_ms, args.cache_size) == (1, 0.5, 10_000)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--threads", "0"), "--max-inflight must be at least 1"),
        (("--max-inflight", "0"), "--max-inflight must be at least 1"),
        (("--port", "70000"), "--port must be from 0 to 65535"),
        (("--search-workers", "2"), "--search-workers 2 needs a dense index, not bm25"),
    ],
)
def test_serve_refuses_settings_that_could_never_answer_in_one_line(indexed, flags, message):
    root, _, _ = indexed
    done = searchgym("serve", "--index", root / "indexes" / "tiny-bm25", *flags)
    assert done.returncode == 2 and message in done.stderr
    assert "Traceback" not in done.stderr


def test_the_door_limits_are_flags_and_threads_is_their_former_name():
    args = build_parser().parse_args(["serve", "--index", "x", "--threads", "8", "--max-connections", "50"])
    assert (args.max_inflight, args.max_connections, args.idle_timeout_s) == (8, 50, 30)
    assert build_parser().parse_args(["serve", "--index", "x"]).max_inflight == 256
