"""Throughput of the search environment: a scripted policy over wiki-mini with in-process BM25.

The policy searches the question, then answers with the title of the first document it was shown. Episodes
run in fixed batches of ``--num-envs`` (a ``SearchVectorEnv`` without autoreset, reset with explicit
examples, as the rollout drives it). Budgets are counted in words, and then in the tokens of the embedded
policy's tokenizer (SmolLM2) as in training. "retrieval" is the share of wall time spent in the retriever;
"env alone" is the step rate without it. The fastest of ``--repeats`` runs is shown (the box is shared).

    .venv/bin/python benchmarks/env_throughput.py [--num-envs 64] [--episodes 2048] [--repeats 3]

The BM25 index is built once under ``searchgym.paths.CACHE_DIR`` and reused.
"""

import argparse
import re
import time
from dataclasses import dataclass

import numpy as np

from searchgym import paths
from searchgym.env import EnvConfig, QAExample, SearchVectorEnv, load_dataset
from searchgym.env.tokens import Tokenizer
from searchgym.retriever.base import Retriever
from searchgym.retriever.index import IndexSpec, ensure_index, load_retriever

_FIRST_TITLE = re.compile(r"Doc 1\(Title: (.*?)\) ")


@dataclass(frozen=True)
class Figures:
    """What one measured run gives."""

    episodes: int
    env_steps: int
    wall_s: float
    retrieval_s: float
    mean_em: float


def scripted_answer(observation: str) -> str:
    match = _FIRST_TITLE.search(observation)
    title = match.group(1) if match else "unknown"
    return f"<think>The first document should say.</think>\n<answer> {title} </answer>"


def run_batch(vector: SearchVectorEnv, batch: list[QAExample]) -> tuple[int, float, list[float]]:
    """One fixed batch of episodes; returns (env steps taken, retrieval seconds, EM per episode)."""
    vector.reset(options={"examples": batch})
    actions = [
        f"<think>I will look this up.</think>\n<search> {example.question} </search>" for example in batch
    ]
    done = np.zeros(vector.num_envs, dtype=np.bool_)
    steps, retrieval_s = 0, 0.0
    while not done.all():
        observations, _, terminated, truncated, infos = vector.step(actions)
        steps += int((~done).sum())
        searched = infos.get("_retrieval_latency_s", np.zeros(vector.num_envs, dtype=np.bool_))
        if searched.any():
            retrieval_s += float(infos["retrieval_latency_s"][searched].max())
        done |= terminated | truncated
        actions = [scripted_answer(observation) for observation in observations]
    return steps, retrieval_s, [info["em"] for info in vector.final_infos if info is not None]


def measure(
    retriever: Retriever, examples: list[QAExample], *, num_envs: int, tokenizer: Tokenizer | None
) -> Figures:
    config = EnvConfig(max_turns=2, max_searches=1, topk=3, max_observation_tokens=500)
    vector = SearchVectorEnv(
        num_envs=num_envs, dataset=None, retriever=retriever, config=config, tokenizer=tokenizer
    )
    run_batch(vector, examples[:num_envs])  # warm-up
    steps, retrieval_s, em = 0, 0.0, []
    start = time.perf_counter()
    for offset in range(0, len(examples) - num_envs + 1, num_envs):
        batch_steps, batch_retrieval_s, batch_em = run_batch(vector, examples[offset : offset + num_envs])
        steps, retrieval_s = steps + batch_steps, retrieval_s + batch_retrieval_s
        em.extend(batch_em)
    return Figures(len(em), steps, time.perf_counter() - start, retrieval_s, float(np.mean(em)))


def smollm2_tokenizer() -> Tokenizer:
    from searchgym.policy.models import default_policy_path, load_tokenizer

    return load_tokenizer(default_policy_path())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--episodes", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3, help="runs per budget unit; the fastest is shown")
    args = parser.parse_args()

    index_dir = paths.CACHE_DIR / "indexes" / "wiki-mini-bm25"
    ensure_index(IndexSpec(corpus=paths.WIKI_MINI_CORPUS, out=index_dir, progress=False))
    retriever = load_retriever(index_dir)
    examples = load_dataset("wiki-mini-train", limit=args.episodes)
    print(f"wiki-mini train, {len(examples)} episodes, vector env of {args.num_envs}, in-process BM25, top-3")
    print(
        f"{'budget unit':<16}{'episodes/s':>11}{'env steps/s':>12}{'retrieval':>10}{'env alone':>14}{'EM':>7}"
    )
    for unit, tokenizer in (("words", None), ("SmolLM2 tokens", smollm2_tokenizer())):
        runs = [
            measure(retriever, examples, num_envs=args.num_envs, tokenizer=tokenizer)
            for _ in range(args.repeats)
        ]
        figures = min(runs, key=lambda run: run.wall_s)
        episodes_per_s = figures.episodes / figures.wall_s
        steps_per_s = figures.env_steps / figures.wall_s
        retrieval_share = figures.retrieval_s / figures.wall_s
        env_alone = figures.env_steps / (figures.wall_s - figures.retrieval_s)
        print(
            f"{unit:<16}{episodes_per_s:>11,.0f}{steps_per_s:>12,.0f}{retrieval_share:>10.0%}"
            f"{env_alone:>9,.0f} st/s{figures.mean_em:>7.3f}"
        )


if __name__ == "__main__":
    main()
