"""How far bm25s and pyserini (Lucene) agree on the wiki-mini dev questions, and how well each retrieves.

Both indexes are built on first use under ``indexes/`` (pyserini needs ``make pyserini``). For the top-k
of each question: same top-1 document, identical top-k list, mean overlap of the two top-k sets; and for
each backend, how often a gold answer string occurs in its top k and (where the gold paragraphs are
known) how often one of them is in its top k.

    .venv/bin/python benchmarks/bm25_agreement.py --k 3
"""

import argparse
import json

from searchgym.paths import QA_DIR, REPO_ROOT, WIKI_MINI_CORPUS
from searchgym.retriever.base import Passage
from searchgym.retriever.index import IndexSpec, ensure_index, load_retriever


def answer_found(passages: list[Passage], answers: list[str]) -> bool:
    text = " ".join(passage.contents.lower() for passage in passages)
    return any(answer.lower() in text for answer in answers)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--k", type=int, default=3, help="passages per question")
    args = parser.parse_args()
    examples = [json.loads(line) for line in (QA_DIR / "dev.jsonl").open()]
    results = {}
    for method in ("bm25", "pyserini"):
        out = REPO_ROOT / "indexes" / f"wiki-mini-{method}"
        ensure_index(IndexSpec(corpus=WIKI_MINI_CORPUS, out=out, method=method, progress=False))
        results[method] = load_retriever(out).search([example["question"] for example in examples], args.k)
    pairs = list(zip(results["bm25"], results["pyserini"], strict=True))
    ids = [([p.id for p in ours], [p.id for p in lucene]) for ours, lucene in pairs]
    n = len(examples)
    print(f"wiki-mini dev, {n} questions, top-{args.k}")
    print(f"same top-1 document:       {sum(a[:1] == b[:1] for a, b in ids) / n:6.1%}")
    print(f"identical top-{args.k} list:      {sum(a == b for a, b in ids) / n:6.1%}")
    print(
        f"mean top-{args.k} overlap:        {sum(len(set(a) & set(b)) for a, b in ids) / (n * args.k):6.1%}"
    )
    with_gold = [
        (i, set(example["gold_doc_ids"])) for i, example in enumerate(examples) if example["gold_doc_ids"]
    ]
    for method, hits in results.items():
        answers = (
            sum(answer_found(hits[i], example["golden_answers"]) for i, example in enumerate(examples)) / n
        )
        gold = sum(bool(gold & {p.id for p in hits[i]}) for i, gold in with_gold) / len(with_gold)
        print(
            f"{method:9s} answer in top-{args.k}: {answers:6.1%}  gold paragraph in top-{args.k}: {gold:6.1%}"
        )


if __name__ == "__main__":
    main()
