"""Train a small cross-encoder reranker on wiki-mini's train questions, for ``--rerank``.

No trained cross-encoder can be loaded offline on this box, so this makes one from what is bundled: MiniLM-L6
(the weights of the bundled all-MiniLM-L6-v2 bi-encoder) with a new scoring head, trained as a binary
relevance classifier with sentence-transformers' ``CrossEncoderTrainer``. Its pairs come from the train
questions whose gold passages are known: the first gold passage is a positive; BM25's best passages that are
neither gold nor contain a gold answer are the negatives (hard negatives, as in the usual ms-marco recipe).
Passages are shown as the reranker sees them when serving (``(Title: T) text``). The dev questions are never
used, so the held-out gold@3 comes from the retrieval benchmark:

    .venv/bin/python benchmarks/train_reranker.py --out runs/reranker-wiki-mini
    .venv/bin/python benchmarks/retrieval_server.py --method bm25 --clients 4 --rerank runs/reranker-wiki-mini
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from searchgym.env.data import load_dataset
from searchgym.env.rewards import normalize_answer
from searchgym.paths import WIKI_MINI_CORPUS, default_encoder_path
from searchgym.retriever.base import Passage
from searchgym.retriever.corpus import read_corpus
from searchgym.retriever.index import IndexSpec, ensure_index, load_retriever
from searchgym.retriever.rerank import passage_text


def training_pairs(
    index_dir: Path, *, negatives: int, candidates: int
) -> tuple[list[str], list[str], list[float]]:
    """(question, passage, label) columns: a question's first gold passage, then ``negatives`` hard ones.

    The hard negatives are the best of ``candidates`` BM25 passages (``index_dir``, built when missing).
    """
    examples = [example for example in load_dataset("wiki-mini-train") if example.gold_doc_ids]
    gold_ids = {doc_id for example in examples for doc_id in example.gold_doc_ids or ()}
    gold = {d.id: Passage(d.id, d.contents, 0.0) for d in read_corpus(WIKI_MINI_CORPUS) if d.id in gold_ids}
    ensure_index(IndexSpec(corpus=WIKI_MINI_CORPUS, out=index_dir, method="bm25", progress=False))
    hits = load_retriever(index_dir).search([example.question for example in examples], candidates)
    questions: list[str] = []
    passages: list[str] = []
    labels: list[float] = []
    for example, found in zip(examples, hits, strict=True):
        gold_of_example = example.gold_doc_ids or ()
        answers = [normalize_answer(answer) for answer in example.golden_answers]
        hard = [
            p
            for p in found
            if p.id not in gold_of_example
            and not any(a and a in normalize_answer(passage_text(p)) for a in answers)  # the title too
        ]
        positives = [gold[doc_id] for doc_id in gold_of_example if doc_id in gold][:1]
        chosen = [(p, 1.0) for p in positives] + [(p, 0.0) for p in hard[:negatives]]
        for passage, label in chosen:
            questions.append(example.question)
            passages.append(passage_text(passage))
            labels.append(label)
    return questions, passages, labels


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the trained CrossEncoder")
    parser.add_argument("--negatives", type=int, default=2, help="hard negatives per question")
    parser.add_argument("--candidates", type=int, default=10, help="BM25 passages the negatives come from")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--max-length", type=int, default=192, help="tokens of question + passage")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from datasets import Dataset
    from sentence_transformers import CrossEncoder
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    index_dir = Path("indexes/wiki-mini-bm25")
    questions, passages, labels = training_pairs(
        index_dir, negatives=args.negatives, candidates=args.candidates
    )
    positives = int(sum(labels))
    print(f"{len(labels)} pairs: {positives} gold passages, {len(labels) - positives} hard negatives")
    dataset = Dataset.from_dict({"question": questions, "passage": passages, "label": labels})
    model = CrossEncoder(str(default_encoder_path()), num_labels=1, max_length=args.max_length)
    with tempfile.TemporaryDirectory() as scratch:
        training = CrossEncoderTrainingArguments(
            output_dir=scratch,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            warmup_steps=0.1,  # a float: the share of the steps
            logging_steps=50,
            save_strategy="no",
            report_to="none",
            seed=args.seed,
        )
        trainer = CrossEncoderTrainer(
            model=model, args=training, train_dataset=dataset, loss=BinaryCrossEntropyLoss(model)
        )
        started = time.perf_counter()
        trainer.train()
    model.save_pretrained(str(args.out))
    minutes = (time.perf_counter() - started) / 60
    print(f"trained in {minutes:.1f} min on {args.threads} thread(s); saved to {args.out}")


if __name__ == "__main__":
    main()
