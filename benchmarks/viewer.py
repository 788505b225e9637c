"""searchgym view on large runs: how long the one-time index takes, and what a page costs after it.

Writes a synthetic eval run of ``--eval-episodes`` predictions (each with a two-document trajectory, as
``searchgym eval --mode agent`` writes them) and a synthetic training run of ``--train-episodes`` samples
with ``--tokens`` response tokens each (as the tracker writes ``samples/episodes.jsonl``), then times,
through Flask's test client (no sockets): indexing each file, the first list page, a filtered page
(wrong answers, deep page), a text search, one episode page, and the bytes each request read from disk.

    .venv/bin/python benchmarks/viewer.py [--eval-episodes 100000] [--train-episodes 20000] [--tokens 300]

The files go to a temporary folder that is removed at the end.
"""

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from searchgym.viewer.app import create_app
from searchgym.viewer.runs import Run, find_runs

PASSAGES = (
    "\n\n<information>Doc 1(Title: Paris) Paris is the capital and largest city of France, on the Seine.\n"
    "Doc 2(Title: Lyon) Lyon is the third-largest city of France, at the confluence of the Rhone and the "
    "Saone.\nDoc 3(Title: Marseille) Marseille is a port city in southern France.\n</information>\n\n"
)


def eval_row(number: int, rng: random.Random) -> dict:
    """One prediction, every third one right."""
    right = number % 3 == 0
    answer = "Paris" if right else "Lyon"
    return {
        "example_id": f"q{number}",
        "dataset": rng.choice(["nq", "hotpotqa", "triviaqa"]),
        "question": f"what is the capital asked in question {number}?",
        "golden_answers": ["Paris"],
        "prediction": answer,
        "exact_match": float(right),
        "cover_exact_match": float(right),
        "f1": float(right),
        "num_searches": rng.randint(0, 3),
        "num_turns": 2,
        "num_response_tokens": 60,
        "queries": [f"capital question {number}"],
        "retrieved_ids": [["d0", "d1", "d2"]],
        "gold_doc_ids": ["d0"],
        "gold_recall": 1.0,
        "trajectory": f"<think>I should search.</think> <search> capital {number} </search>{PASSAGES}"
        f"<think>The first document says it.</think> <answer> {answer} </answer>",
        "end_reason": "answered",
        "error": None,
    }


def train_row(number: int, tokens: int, rng: random.Random) -> dict:
    """One training sample with ``tokens`` response tokens."""
    row = eval_row(number, rng)
    return {
        "step": number // 16,
        "index": number % 16,
        "example_id": row["example_id"],
        "group_id": row["example_id"],
        "dataset": row["dataset"],
        "question": row["question"],
        "golden_answers": row["golden_answers"],
        "gold_doc_ids": ["d0"],
        "answer": row["prediction"],
        "em": row["exact_match"],
        "f1": row["f1"],
        "cover_em": row["exact_match"],
        "reward": row["exact_match"],
        "reward_parts": {"outcome": row["exact_match"], "shaping": 0.0, "search_cost": 0.0},
        "reward_error": None,
        "searches": 1,
        "end_reason": "answered",
        "error": None,
        "terminated": True,
        "truncated": False,
        "prompt": "Answer the question... Question: " + row["question"],
        "turns": [
            {
                "action_type": "search",
                "text": "<search> capital </search>",
                "query": "capital",
                "retrieved_ids": ["d0", "d1", "d2"],
                "observation": PASSAGES,
            },
            {
                "action_type": "answer",
                "text": f"<answer> {row['prediction']} </answer>",
                "query": None,
                "retrieved_ids": [],
                "observation": "",
            },
        ],
        "tokens": {
            "ids": [rng.randrange(49152) for _ in range(tokens)],
            "text": [" tok"] * tokens,
            "mask": [1 if i % 4 else 0 for i in range(tokens)],
            "logprobs": [round(-rng.random(), 4) for _ in range(tokens)],
            "turn": [i * 2 // tokens for i in range(tokens)],
        },
    }


def write_jsonl(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path.stat().st_size


def timed_get(client, run: Run, url: str) -> tuple[float, int, int]:
    """(milliseconds, status, bytes read from the run's episode file) of one request."""
    before = run.episodes.bytes_read
    start = time.perf_counter()
    response = client.get(url)
    return (time.perf_counter() - start) * 1000, response.status_code, run.episodes.bytes_read - before


def measure(folder: Path, label: str, size: int, count: int, deep_line: int) -> None:
    (run,) = find_runs([folder])
    client = create_app([run]).test_client()
    start = time.perf_counter()
    run.episodes.refresh()
    seconds = time.perf_counter() - start
    print(
        f"{label}: {count} episodes, {size / 1e6:.0f} MB; index once: {seconds:.1f} s "
        f"({size / 1e6 / seconds:.0f} MB/s), {run.episodes.bytes_read / 1e6:.0f} MB read"
    )
    pages = [
        ("first page", "/run/0"),
        ("wrong answers, page 500", "/run/0?em_max=0&page=500"),
        ("text search", "/run/0?text=question+77777"),
        ("searches 2..3, dataset nq", "/run/0?searches_min=2&searches_max=3&dataset=nq"),
        (f"episode on line {deep_line}", f"/run/0/episode/{deep_line}"),
    ]
    for name, url in pages:
        timings = [timed_get(client, run, url) for _ in range(3)]
        best = min(t[0] for t in timings)
        status, read = timings[-1][1], timings[-1][2]
        print(f"  {name:28s} {best:7.1f} ms (best of 3)  status {status}  bytes read {read}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval-episodes", type=int, default=100_000)
    parser.add_argument("--train-episodes", type=int, default=20_000)
    parser.add_argument("--tokens", type=int, default=300, help="response tokens per training sample")
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        size = write_jsonl(
            root / "eval" / "predictions.jsonl", (eval_row(n, rng) for n in range(args.eval_episodes))
        )
        measure(root / "eval", "eval run", size, args.eval_episodes, args.eval_episodes - 1)
        size = write_jsonl(
            root / "train" / "samples" / "episodes.jsonl",
            (train_row(n, args.tokens, rng) for n in range(args.train_episodes)),
        )
        measure(root / "train", "training run", size, args.train_episodes, args.train_episodes - 1)


if __name__ == "__main__":
    main()
