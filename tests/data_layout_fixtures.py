"""QA files in the exact layouts Search-R1 and FlashRAG users have on disk, written small.

- Search-R1's ``scripts/data_process/qa_search_test_merge.py``: the FlashRAG records of several datasets,
  mapped to its training schema (``data_source``, ``prompt``, ``ability``, ``reward_model``, ``extra_info``)
  and concatenated into one ``test.parquet``; the FlashRAG columns (``id``, ``question``,
  ``golden_answers``) stay, so the ids (``test_0``, ...) repeat across data sources.
- FlashRAG's dataset folder (``RUC-NLPIR/FlashRAG_datasets``): ``<root>/<dataset>/{train,dev,test}.jsonl``,
  one ``{"id", "question", "golden_answers", "metadata"}`` record a line.
"""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# Search-R1's make_prefix(template_type="base"), abridged in the middle; it ends with the question.
SEARCH_R1_TEMPLATE = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time "
    "you get new information. ... For example, <answer> Beijing </answer>. Question: {question}\n"
)
FLASHRAG_SETS = {  # dataset -> split -> [(question, golden answers)]
    "nq": {
        "train": [("who sang the song in the movie once", ["Glen Hansard", "Markéta Irglová"])],
        "test": [("who got the first nobel prize in physics", ["Wilhelm Conrad Röntgen"]),
                 ("when is the next deadpool movie being released", ["May 18, 2018"])],
    },
    "triviaqa": {
        "train": [("Which Lloyd Webber musical premiered in the US on 10th December 1993?", ["Sunset Blvd"])],
        "dev": [("Who was the man behind The Chipmunks?", ["David Seville"]),
                ("What star sign is Jamie Lee Curtis?", ["Scorpio", "Scorpius"])],
    },
    "popqa": {"test": [("What is George Rankin's occupation?", ["politician", "political leader"])]},
}  # fmt: skip


def flashrag_record(split: str, index: int, question: str, answers: list[str]) -> dict[str, object]:
    return {"id": f"{split}_{index}", "question": question, "golden_answers": answers, "metadata": {}}


def write_flashrag_root(root: Path) -> Path:
    """FlashRAG_datasets as downloaded: one folder per dataset, one jsonl per split."""
    for dataset, splits in FLASHRAG_SETS.items():
        (root / dataset).mkdir(parents=True)
        for split, rows in splits.items():
            records = [flashrag_record(split, i, q, a) for i, (q, a) in enumerate(rows)]
            (root / dataset / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def search_r1_rows(data_source: str, split: str) -> list[dict[str, object]]:
    """One dataset's split mapped as Search-R1's process_fn maps it (question gets its '?')."""
    rows = []
    for index, (question, answers) in enumerate(FLASHRAG_SETS[data_source][split]):
        question = question.strip() if question.strip().endswith("?") else question.strip() + "?"
        rows.append(
            flashrag_record(split, index, question, answers)
            | {
                "data_source": data_source,
                "prompt": [{"role": "user", "content": SEARCH_R1_TEMPLATE.format(question=question)}],
                "ability": "fact-reasoning",
                "reward_model": {"style": "rule", "ground_truth": {"target": answers}},
                "extra_info": {"split": "test", "index": index},
            }
        )
    return rows


def write_search_r1_merged(path: Path) -> Path:
    """qa_search_test_merge.py --data_sources nq,triviaqa,popqa: each set's test split, else dev."""
    rows = search_r1_rows("nq", "test") + search_r1_rows("triviaqa", "dev") + search_r1_rows("popqa", "test")
    for row in rows:
        del row["metadata"]  # an empty struct column cannot be written to parquet
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path
