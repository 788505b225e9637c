"""Run folders for the viewer tests: a small training run written by the real tracker from real rollouts,
two eval runs written by the real eval report code, and a large synthetic eval run.

The training run has two steps of scripted episodes over :data:`EXAMPLES` (France wrong then right,
Hamlet right then wrong); the eval runs ``warm`` and ``final`` flip known questions:

- ``nq``: warm right on n1; final right on n1, n2, n3 (EM 0.25 -> 0.75; 2 gained, 0 lost).
- ``hotpotqa``: warm right on h1, h2; final right on h2, h3 (EM 0.667 -> 0.667; 1 gained, 1 lost).
"""

import json
import math
from pathlib import Path

from env_fixtures import CORPUS, FakeRetriever
from policy_fixtures import ScriptedGenerator

from searchgym.env import EnvConfig, SearchVectorEnv
from searchgym.env.data import QAExample
from searchgym.env.prompts import information_block
from searchgym.eval.config import EvalConfig
from searchgym.eval.records import Prediction
from searchgym.eval.report import PREDICTIONS_FILE, PredictionsWriter, RunResults, write_run_files
from searchgym.policy.rollout import run_episodes
from searchgym.train.config import load_config
from searchgym.train.tracking import Tracker

FRANCE = QAExample("q0", "What is the capital of France?", ("Paris",), source="fake", gold_doc_ids=("d0",))
HAMLET = QAExample("q1", "Who wrote Hamlet?", ("William Shakespeare", "Shakespeare"), source="fake")
EXAMPLES = (FRANCE, HAMLET)
SEARCH_FRANCE = "<think>I need the capital.</think> <search> capital of France </search>"
STEP_SCRIPTS = {
    1: {
        FRANCE.question: [SEARCH_FRANCE, "<answer> Lyon </answer>"],
        HAMLET.question: ["<answer> William Shakespeare </answer>"],
    },
    2: {
        FRANCE.question: [SEARCH_FRANCE, "<think>Doc 1 says so.</think> <answer> Paris </answer>"],
        HAMLET.question: ["<search> Hamlet author </search>", "<answer> Marlowe </answer>"],
    },
}
EVAL_RIGHT = {"warm": {"n1", "h1", "h2"}, "final": {"n1", "n2", "n3", "h2", "h3"}}
EVAL_QUESTIONS = {"nq": ["n1", "n2", "n3", "n4"], "hotpotqa": ["h1", "h2", "h3"]}


def write_training_run(folder: Path, tokenizer, *, curve_steps: int = 2) -> Path:
    """A training run folder: samples/episodes.jsonl from scripted rollouts at steps 1 and 2, and
    metrics.jsonl rows for steps 1 to ``curve_steps`` (synthetic curves: reward ``0.1 + 0.3 * rise`` with
    ``rise = 1 - exp(-step / 10)``, entropy ``1 - 0.4 * rise``, KL ``0.002 * step``, ...)."""
    config = load_config(
        None,
        [f"logging.run_dir={folder}", "logging.tensorboard=false", "logging.progress_bar=false"],
    )
    tracker = Tracker(config, start_step=0)
    for step, scripts in STEP_SCRIPTS.items():
        env = SearchVectorEnv(
            num_envs=2, dataset=None, retriever=FakeRetriever(), config=EnvConfig(), tokenizer=tokenizer
        )
        trajectories = run_episodes(ScriptedGenerator(tokenizer, scripts), env, list(EXAMPLES))
        tracker.write_episodes(step, trajectories, list(EXAMPLES), tokenizer)
    for step in range(1, curve_steps + 1):
        rise = 1.0 - math.exp(-step / 10)  # a saturating curve, for pages that look like a run's
        tracker.log(
            step,
            {
                "rollout/reward": 0.1 + 0.3 * rise,
                "rollout/em": 0.1 + 0.25 * rise,
                "actor/entropy": 1.0 - 0.4 * rise,
                "experience/kl": 0.002 * step,
                "rollout/policy_tokens": 60.0 + 40.0 * rise,
                "rollout/searches": 0.5 + 0.7 * rise,
            },
        )
    tracker.close()
    return folder


def eval_prediction(dataset: str, example_id: str, *, right: bool) -> Prediction:
    """A searched-then-answered prediction whose trajectory shows two documents of :data:`CORPUS`."""
    shown = [CORPUS[0], CORPUS[1]]
    titled = [passage.contents.split("\n", 1) for passage in shown]
    block = information_block([(title.strip('"'), text) for title, text in titled])
    answer = "Paris" if right else "Lyon"
    search = f"<think>Look it up.</think> <search> {example_id} capital </search>"
    trajectory = f"{search}{block}<answer> {answer} </answer>"
    return Prediction(
        example_id=example_id,
        dataset=dataset,
        question=f"What is the capital asked in {example_id}?",
        golden_answers=["Paris"],
        prediction=answer,
        exact_match=float(right),
        cover_exact_match=float(right),
        f1=float(right),
        num_searches=1,
        num_turns=2,
        num_response_tokens=30,
        queries=[f"{example_id} capital"],
        retrieved_ids=[[p.id for p in shown]],
        gold_doc_ids=["d0"],
        gold_recall=1.0,
        trajectory=trajectory,
        end_reason="answered",
    )


def write_eval_run(folder: Path, name: str) -> Path:
    """The eval run ``warm`` or ``final`` (see the module docstring), with results.json for --compare."""
    folder.mkdir(parents=True, exist_ok=True)
    predictions = [
        eval_prediction(dataset, example_id, right=example_id in EVAL_RIGHT[name])
        for dataset, ids in EVAL_QUESTIONS.items()
        for example_id in ids
    ]
    with PredictionsWriter(folder / PREDICTIONS_FILE) as writer:
        writer.write(predictions)
    config = EvalConfig(benchmarks=tuple(EVAL_QUESTIONS), index="unused")
    results = RunResults.from_predictions(config, predictions, seconds=1.0, num_new=len(predictions))
    write_run_files(folder, results)
    return folder


def write_large_eval_run(folder: Path, count: int) -> Path:
    """An eval run of ``count`` predictions (every third one right), written as fast as JSON allows."""
    folder.mkdir(parents=True, exist_ok=True)
    template = eval_prediction("nq", "x", right=False).to_dict()
    with (folder / PREDICTIONS_FILE).open("w", encoding="utf-8") as handle:
        for number in range(count):
            right = number % 3 == 0
            row = template | {
                "example_id": f"x{number}",
                "question": f"question number {number}?",
                "prediction": "Paris" if right else "Lyon",
                "exact_match": float(right),
                "f1": float(right),
            }
            handle.write(json.dumps(row) + "\n")
    return folder
