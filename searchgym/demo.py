"""``make demo`` until the trainer lands: index wiki-mini, serve it, and ask it three dev questions.

Builds the BM25 index of the bundled wiki-mini corpus once (cached in ``indexes/``), starts
``searchgym serve`` on a free loopback port, sends one Search-R1-style ``POST /retrieve`` with three
questions and prints the titles of the top 3 passages of each, then stops the server.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

import requests

from retriever.index import IndexSpec, ensure_index
from searchgym.errors import SearchgymError
from searchgym.paths import QA_DIR, REPO_ROOT, WIKI_MINI_CORPUS

INDEX_DIR = REPO_ROOT / "indexes" / "wiki-mini-bm25"
NUM_QUESTIONS = 3
TOPK = 3


def start_server(index_dir: Path, log: IO[bytes]) -> tuple[subprocess.Popen[str], str]:
    """Start ``searchgym serve`` on a free port; return the process and its /retrieve URL once it listens."""
    command = [sys.executable, "-m", "searchgym", "serve", "--index", str(index_dir), "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    announcement = server.stdout.readline() if server.stdout else ""
    if " at http://" not in announcement:
        server.wait(timeout=30)
        log.seek(0)
        raise SearchgymError(f"the server did not start:\n{log.read().decode(errors='replace')}")
    return server, announcement.rsplit(" at ", 1)[1].strip()


def first_question_of_each_source(path: Path, count: int) -> list[dict[str, Any]]:
    """The first ``count`` examples of ``path`` that come from different datasets (PopQA, HotpotQA, ...)."""
    examples: dict[str, dict[str, Any]] = {}
    with path.open() as lines:
        for line in lines:
            example = json.loads(line)
            examples.setdefault(example["source"].split("/")[0], example)
            if len(examples) == count:
                break
    return list(examples.values())


def main() -> int:
    """Run the demo; returns the process exit status."""
    manifest = ensure_index(IndexSpec(corpus=WIKI_MINI_CORPUS, out=INDEX_DIR, method="bm25"))
    print(
        f"index: {INDEX_DIR.relative_to(REPO_ROOT)} ({manifest.method}, {manifest.num_documents} documents)"
    )
    examples = first_question_of_each_source(QA_DIR / "dev.jsonl", NUM_QUESTIONS)
    payload = {"queries": [example["question"] for example in examples], "topk": TOPK, "return_scores": True}
    with tempfile.TemporaryFile() as log:
        server, url = start_server(INDEX_DIR, log)
        try:
            print(f"server: {url}\nPOST {json.dumps(payload, ensure_ascii=False)}\n")
            result = requests.post(url, json=payload, timeout=60).json()["result"]
        finally:
            server.terminate()
            server.wait(timeout=30)
    for example, hits in zip(examples, result, strict=True):
        print(f"Q: {example['question']}  (gold: {' / '.join(example['golden_answers'][:3])})")
        for rank, hit in enumerate(hits, start=1):
            title = hit["document"]["contents"].split("\n", 1)[0].strip('"')
            print(f"   {rank}. {title}  (score {hit['score']:.2f})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SearchgymError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        sys.exit(2)
