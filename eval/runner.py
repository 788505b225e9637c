"""Running an evaluation: check everything it needs, then generate in batches, score and write the run files.

The three modes share the training code end to end: answers are read by
``searchgym.env.actions.parse_action`` and
scored by ``searchgym.env.rewards``; ``agent`` episodes run through ``searchgym.policy.rollout.run_episodes``
and the vector env
(all searches of a turn in one retriever call), exactly as in training but greedy.
"""

import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from tqdm import tqdm

from searchgym.env import Answer, EnvConfig, SearchVectorEnv, parse_action
from searchgym.env.config import PromptStyle
from searchgym.env.observations import fit_information
from searchgym.env.prompts import build_baseline_prompt
from searchgym.env.retrieval import retrieve_batch
from searchgym.env.rewards import cover_exact_match, exact_match, f1_score
from searchgym.env.tokens import TokenizerMeter
from searchgym.errors import SearchgymError
from searchgym.eval.config import EvalConfig
from searchgym.eval.inputs import (
    EvalItem,
    check_retriever,
    input_fingerprints,
    load_generator,
    load_items,
    open_retriever,
    resume_predictions,
    run_file_document,
)
from searchgym.eval.metrics import gold_passage_recall
from searchgym.eval.records import Prediction
from searchgym.eval.report import (
    PREDICTIONS_FILE,
    RUN_FILE,
    PredictionsWriter,
    RunResults,
    write_json_atomic,
    write_run_files,
)
from searchgym.eval.runlock import RunLock
from searchgym.policy.generation import DEFAULT_STOP, Generation, Generator, SamplingParams
from searchgym.policy.models import encode_prompt, is_chat_model
from searchgym.policy.rollout import TokenBudgets, run_episodes
from searchgym.policy.trajectory import Trajectory
from searchgym.retriever.base import Retriever

ANSWER_STOP = ("</answer>",)


@dataclass(slots=True)
class Engine:
    """What generates and retrieves, with the settings every mode shares.

    Attributes:
        generator: the policy's generation backend.
        retriever: the search backend; None in ``direct`` mode.
        env_config: the env settings of ``agent`` mode; ``rag`` trims its passages to the same
            observation budget and both use its prompt style.
        budgets: the token budgets of ``agent`` episodes.
        max_new_tokens: tokens per generation call.
        batch_size: questions per batch (the vector env's size in ``agent`` mode).
    """

    generator: Generator
    retriever: Retriever | None
    env_config: EnvConfig
    budgets: TokenBudgets
    max_new_tokens: int
    batch_size: int
    _vector_env: SearchVectorEnv | None = None

    @classmethod
    def for_config(cls, config: EvalConfig, generator: Generator, retriever: Retriever | None) -> "Engine":
        """The engine of a run: greedy decoding, the prompt style the protocol or the tokenizer says."""
        style: PromptStyle = "chat" if is_chat_model(generator.tokenizer) else "plain"
        return cls(
            generator,
            retriever,
            config.env_for(style),
            config.budgets,
            config.max_new_tokens,
            config.batch_size,
        )

    def sampling(self, stop: tuple[str, ...] = DEFAULT_STOP) -> SamplingParams:
        """Greedy decoding (evaluation is deterministic), stopping at the protocol's closing tags."""
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0, stop=stop)

    @property
    def vector_env(self) -> SearchVectorEnv:
        """The vector env of ``agent`` mode, made once and reset on each batch."""
        if self.retriever is None:
            raise SearchgymError("agent mode needs a retriever: give --index or --retriever-url")
        if self._vector_env is None:
            self._vector_env = SearchVectorEnv(
                num_envs=self.batch_size,
                dataset=None,
                retriever=self.retriever,
                config=self.env_config,
                tokenizer=self.generator.tokenizer,
            )
        return self._vector_env

    def encode(self, prompt: str) -> list[int]:
        """A prompt's ids, in the chat template or raw as the env's prompt style says."""
        return encode_prompt(self.generator.tokenizer, prompt, chat=self.env_config.prompt_style == "chat")

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of generated ids."""
        return cast(str, self.generator.tokenizer.decode(list(token_ids)))


# ---------------------------------------------------------------------------------------------- the modes
def agent_predictions(items: Sequence[EvalItem], engine: Engine) -> list[Prediction]:
    """Multi-turn search episodes through the training rollout and the vector env, greedy."""
    trajectories = run_episodes(
        engine.generator,
        engine.vector_env,
        [item.example for item in items],
        sampling=engine.sampling(),
        budgets=engine.budgets,
    )
    return [
        trajectory_prediction(item, trajectory, engine)
        for item, trajectory in zip(items, trajectories, strict=True)
    ]


def trajectory_prediction(item: EvalItem, trajectory: Trajectory, engine: Engine) -> Prediction:
    """Score an agent episode from its final answer and keep what it did, turn by turn."""
    outcome = trajectory.outcome
    searches = [turn for turn in trajectory.turns if turn.action_type == "search"]
    retrieved = [list(turn.retrieved_ids) for turn in searches]
    return scored_prediction(
        item,
        answer=outcome.answer,
        num_searches=outcome.num_searches,
        num_turns=outcome.num_turns,
        num_response_tokens=trajectory.num_policy_tokens,
        queries=[turn.query for turn in searches if turn.query is not None],
        retrieved_ids=retrieved,
        trajectory=engine.decode(trajectory.response_ids),
        end_reason=outcome.end_reason,
        error=outcome.error,
    )


def rag_predictions(items: Sequence[EvalItem], engine: Engine) -> list[Prediction]:
    """Retrieve top-k with each question once (one retriever call per batch), then answer in one turn."""
    if engine.retriever is None:
        raise SearchgymError("rag mode needs a retriever: give --index or --retriever-url")
    questions = [item.example.question for item in items]
    results = retrieve_batch(engine.retriever, questions, engine.env_config.topk)
    meter = TokenizerMeter(engine.generator.tokenizer)
    blocks = [
        fit_information(result.passages, meter=meter, max_tokens=engine.env_config.max_observation_tokens)
        for result in results
    ]
    style = engine.env_config.prompt_style
    prompts = [
        build_baseline_prompt(item.example.question, style=style, information=block.text)
        for item, block in zip(items, blocks, strict=True)
    ]
    generations = engine.generator.generate([engine.encode(p) for p in prompts], engine.sampling(ANSWER_STOP))
    return [
        one_turn_prediction(
            item,
            generation,
            engine,
            queries=[item.example.question],
            retrieved=[list(block.shown_ids)],
            error=result.error,
        )
        for item, generation, block, result in zip(items, generations, blocks, results, strict=True)
    ]


def direct_predictions(items: Sequence[EvalItem], engine: Engine) -> list[Prediction]:
    """Answer each question in one turn, without retrieval."""
    style = engine.env_config.prompt_style
    prompts = [engine.encode(build_baseline_prompt(item.example.question, style=style)) for item in items]
    generations = engine.generator.generate(prompts, engine.sampling(ANSWER_STOP))
    return [
        one_turn_prediction(item, generation, engine)
        for item, generation in zip(items, generations, strict=True)
    ]


def one_turn_prediction(
    item: EvalItem,
    generation: Generation,
    engine: Engine,
    *,
    queries: Sequence[str] = (),
    retrieved: list[list[str]] | None = None,
    error: str | None = None,
) -> Prediction:
    """Score a one-turn baseline: its answer is what the training parser reads in the generated text."""
    text = engine.decode(generation.token_ids)
    action = parse_action(text)
    return scored_prediction(
        item,
        answer=action.text if isinstance(action, Answer) else None,
        num_searches=len(queries),
        num_turns=1,
        num_response_tokens=len(generation.token_ids),
        queries=list(queries),
        retrieved_ids=retrieved,
        trajectory=text,
        end_reason="answered" if isinstance(action, Answer) else "no_answer",
        error=error,
    )


def scored_prediction(
    item: EvalItem,
    *,
    answer: str | None,
    num_searches: int,
    num_turns: int,
    num_response_tokens: int,
    queries: list[str],
    retrieved_ids: list[list[str]] | None,
    trajectory: str,
    end_reason: str | None,
    error: str | None,
) -> Prediction:
    """A prediction scored with the training reward code.

    ``retrieved_ids`` is None in a mode without retrieval; gold-passage recall is computed where the
    example's gold ids are known and the mode retrieves (an agent that never searched scores 0).
    """
    example = item.example
    golds = list(example.golden_answers)
    gold_ids = list(example.gold_doc_ids or ())
    recall = None if retrieved_ids is None or not gold_ids else gold_passage_recall(retrieved_ids, gold_ids)
    return Prediction(
        example_id=example.id,
        dataset=item.dataset,
        question=example.question,
        golden_answers=golds,
        prediction=answer,
        exact_match=exact_match(answer, golds),
        cover_exact_match=cover_exact_match(answer, golds),
        f1=f1_score(answer, golds),
        num_searches=num_searches,
        num_turns=num_turns,
        num_response_tokens=num_response_tokens,
        queries=queries,
        retrieved_ids=retrieved_ids or [],
        gold_doc_ids=gold_ids or None,
        gold_recall=recall,
        trajectory=trajectory,
        end_reason=end_reason,
        error=error,
    )


MODES: dict[str, Callable[[Sequence[EvalItem], Engine], list[Prediction]]] = {
    "agent": agent_predictions,
    "rag": rag_predictions,
    "direct": direct_predictions,
}


# ---------------------------------------------------------------------------------------------- the run
def evaluate(
    items: Sequence[EvalItem],
    engine: Engine,
    *,
    mode: str,
    writer: PredictionsWriter | None = None,
    progress: tqdm | None = None,
) -> list[Prediction]:
    """Predict every item, ``engine.batch_size`` at a time, appending each batch to ``writer`` when given."""
    predict = MODES[mode]
    predictions: list[Prediction] = []
    for start in range(0, len(items), engine.batch_size):
        batch = predict(items[start : start + engine.batch_size], engine)
        if writer is not None:
            writer.write(batch)
        predictions += batch
        if progress is not None:
            progress.update(len(batch))
            progress.set_postfix(em=f"{sum(p.exact_match for p in predictions) / len(predictions):.3f}")
    return predictions


@dataclass(frozen=True, slots=True)
class PlannedRun:
    """A run whose inputs have been checked: its questions, and which of them an earlier run already did."""

    config: EvalConfig
    run_dir: Path
    items: list[EvalItem]
    done: list[Prediction]
    fingerprints: dict[str, str]

    @property
    def todo(self) -> list[EvalItem]:
        """The questions still to evaluate."""
        done_keys = {prediction.key for prediction in self.done}
        return [item for item in self.items if item.key not in done_keys]


def plan_run(config: EvalConfig, run_dir: Path, fingerprints: dict[str, str]) -> PlannedRun:
    """Check a run's questions and its directory (resuming what an earlier run there left).

    Raises:
        SearchgymError: a bad benchmark or exclusion file, or a run directory made with other settings
            or other model or index files.
    """
    run_dir = Path(run_dir)
    items = load_items(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    wanted = {item.key for item in items}
    earlier = resume_predictions(run_dir, config, fingerprints)
    done = [prediction for prediction in earlier if prediction.key in wanted]
    return PlannedRun(config, run_dir, items, done, fingerprints)


def execute_run(
    run: PlannedRun, generator: Generator | None, retriever: Retriever | None, *, show_progress: bool
) -> RunResults:
    """Evaluate a planned run's remaining questions and write its files.

    ``generator`` may be None when no question is left (the files are then rebuilt from the predictions).
    """
    new: list[Prediction] = []
    started = time.perf_counter()
    if run.todo:
        if generator is None:
            raise ValueError("a generator is needed: this run has questions left")
        engine = Engine.for_config(run.config, generator, retriever)
        write_json_atomic(run.run_dir / RUN_FILE, run_file_document(run.config, run.fingerprints))
        started = time.perf_counter()
        desc = f"eval {run.config.mode}"
        bar = tqdm(
            total=len(run.items), initial=len(run.done), unit="q", desc=desc, disable=not show_progress
        )
        with PredictionsWriter(run.run_dir / PREDICTIONS_FILE) as writer, bar:
            new = evaluate(run.todo, engine, mode=run.config.mode, writer=writer, progress=bar)
    seconds = time.perf_counter() - started
    results = RunResults.from_predictions(run.config, [*run.done, *new], seconds=seconds, num_new=len(new))
    write_run_files(run.run_dir, results)
    return results


def run_evaluations(
    configs: Sequence[EvalConfig],
    run_dirs: Sequence[Path],
    *,
    show_progress: bool = True,
    generator: Generator | None = None,
    retriever: Retriever | None = None,
) -> list[RunResults]:
    """Evaluate several runs of one model (e.g. its agent, rag and direct modes), loading it once.

    Every input of every run is checked before the model loads and the first question runs: the
    benchmarks, the exclusion file, the run directories' earlier settings, the index folder or the
    server; then the model loads, then the index. A run directory that an interrupted run left is resumed;
    one that another live process writes is refused (see :mod:`searchgym.eval.runlock`).

    Args:
        configs: the runs, sharing one model and one retriever (typically one config per mode).
        run_dirs: one per run: where ``run.json``, ``predictions.jsonl``, ``results.json`` and
            ``results.md`` go.
        show_progress: show a progress bar.
        generator: a loaded generation backend to use instead of loading the configs' model (a trainer
            evaluating the policy it holds); the configs' ``model`` then only names it.
        retriever: a retriever to use instead of opening the configs' index or URL.

    Raises:
        SearchgymError: a bad input; the message says what to fix.
    """
    models = {(config.model, config.backend) for config in configs}
    retrievers = {(config.index, config.retriever_url) for config in configs if config.uses_retrieval}
    if len(models) > 1 or len(retrievers) > 1:
        raise ValueError("runs evaluated together must share one model and one retriever")
    with ExitStack() as locks:  # one writer per run directory, until its files are written
        for run_dir in run_dirs:
            locks.enter_context(RunLock(run_dir))
        fingerprints = input_fingerprints(configs, model=generator is None, index=retriever is None)
        runs = [plan_run(*run) for run in zip(configs, run_dirs, fingerprints, strict=True)]
        searching = next((config for config in configs if config.uses_retrieval), None)
        if retriever is None and searching is not None:
            check_retriever(searching)
        if generator is None and any(run.todo for run in runs):
            generator = load_generator(configs[0])
        # An in-process index opens after the model: vLLM's start-up scans every loaded module for kernels
        # and fails on those of numba (which bm25s loads).
        if retriever is None and searching is not None:
            retriever = open_retriever(searching)
        return [execute_run(run, generator, retriever, show_progress=show_progress) for run in runs]


def run_evaluation(
    config: EvalConfig,
    run_dir: Path,
    *,
    show_progress: bool = True,
    generator: Generator | None = None,
    retriever: Retriever | None = None,
) -> RunResults:
    """Evaluate one run (see :func:`run_evaluations`)."""
    (results,) = run_evaluations(
        [config], [run_dir], show_progress=show_progress, generator=generator, retriever=retriever
    )
    return results
