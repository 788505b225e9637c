"""Data for the Ray tests: a tiny policy that searches, a five-passage BM25 index, questions, configs.

A random tiny model never writes a well-formed ``<search>``, so rollouts would never reach the retriever.
:func:`searching_model` teaches one, in a few seconds, to open every episode with the same search; it is
saved as a Hugging Face folder, so that actors load it through ``model.path`` as a user's model would.
"""

import dataclasses
import json
from pathlib import Path

import torch
from env_fixtures import CORPUS, EXAMPLES

from searchgym.env.prompts import build_prompt
from searchgym.paths import CONFIGS_DIR
from searchgym.policy.models import encode_prompt, tiny_random_model
from searchgym.policy.trajectory import Trajectory
from searchgym.retriever.index import IndexSpec, build_index
from searchgym.train.config import TrainConfig, load_config

SEARCH = "<search> capital of France </search>"
_TEACHING_STEPS = 25


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tiny_index(folder: Path) -> Path:
    """BM25 over the five passages of :data:`env_fixtures.CORPUS`."""
    corpus = write_jsonl(folder / "corpus.jsonl", [{"id": p.id, "contents": p.contents} for p in CORPUS])
    build_index(IndexSpec(corpus=corpus, out=folder / "index", method="bm25", progress=False))
    return folder / "index"


def questions(folder: Path) -> Path:
    """The four questions of :data:`env_fixtures.EXAMPLES` as a FlashRAG jsonl file."""
    rows = [{"id": e.id, "question": e.question, "golden_answers": list(e.golden_answers)} for e in EXAMPLES]
    return write_jsonl(folder / "questions.jsonl", rows)


def searching_model(folder: Path) -> Path:
    """A tiny random model fine-tuned to answer every question's prompt with :data:`SEARCH`."""
    policy = tiny_random_model(seed=0)
    tokenizer, model = policy.tokenizer, policy.model
    target = tokenizer.encode(SEARCH, add_special_tokens=False)
    prompts = [encode_prompt(tokenizer, build_prompt(e.question, style="chat"), chat=True) for e in EXAMPLES]
    width = max(len(p) for p in prompts) + len(target)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, : len(prompt) + len(target)] = torch.tensor(prompt + target)
        attention_mask[row, : len(prompt) + len(target)] = 1
    # The head runs only where a target token is predicted: the vocabulary is most of the model.
    rows = torch.tensor([row for row in range(len(prompts)) for _ in target])
    columns = torch.tensor([len(p) - 1 + i for p in prompts for i in range(len(target))])
    labels = torch.tensor(target * len(prompts))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(_TEACHING_STEPS):
            hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            logits = model.lm_head(hidden[rows, columns])
            torch.nn.functional.cross_entropy(logits, labels).backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return folder / "model"


def ray_test_config(workdir: Path, *overrides: str) -> TrainConfig:
    """configs/tiny.yaml on the searching model, the tiny index and the four questions (8 episodes a step)."""
    return load_config(
        CONFIGS_DIR / "tiny.yaml",
        [
            f"model.path={workdir / 'model'}",
            f"retriever.index={workdir / 'index'}",
            f"data.train={workdir / 'questions.jsonl'}",
            f"data.dev={workdir / 'questions.jsonl'}",
            "data.train_limit=null",
            "data.dev_limit=null",
            f"logging.run_dir={workdir / 'run'}",
            "logging.tensorboard=false",
            "logging.plots=false",
            "rollout.max_new_tokens=16",  # room for the whole search
            "ray.enabled=true",
            "ray.num_rollout_workers=2",
            "ray.num_retriever_replicas=2",
            "ray.num_learners=2",
            *overrides,
        ],
    )


def comparable(trajectory: Trajectory) -> dict:
    """Everything of an episode but its wall-clock timings and its sampler log-probs (floats)."""
    record = dataclasses.asdict(trajectory)
    del record["timings"], record["sampler_logprobs"]
    return record
