import json
import socket
import subprocess
from dataclasses import replace

import pytest
from eval_fixtures import GEO, PEOPLE, Interrupted, KeywordRetriever, ScriptedGenerator, write_jsonl

from searchgym.env.config import EnvConfig
from searchgym.errors import SearchgymError
from searchgym.eval.config import EvalConfig
from searchgym.eval.inputs import input_fingerprints, resume_predictions, run_file_document
from searchgym.eval.report import PREDICTIONS_FILE, RESULTS_FILE, RUN_FILE, read_predictions
from searchgym.eval.runlock import LOCK_FILE, RunLockedError
from searchgym.eval.runner import run_evaluation
from searchgym.policy.models import default_policy_path, load_tokenizer

FRANCE, ITALY = GEO[0]["question"], GEO[1]["question"]
HAMLET, MONA_LISA = PEOPLE[0]["question"], PEOPLE[1]["question"]
ONE_TURN_SCRIPTS = {
    FRANCE: ["<answer> Paris </answer>"],  # exact
    ITALY: ["<answer> Rome, Italy </answer>"],  # covers the gold answer; F1 2/3
    HAMLET: ["<think>the playwright</think> <answer> Shakespeare </answer>"],  # exact (second alias)
    MONA_LISA: ["I am not sure."],  # no <answer>: not valid, scores 0
}
AGENT_SCRIPTS = {
    FRANCE: ["<think>look it up</think> <search> capital of France </search>", "<answer> Paris </answer>"],
    ITALY: ["<search> Italy capital </search>", "<search> Rome Italy </search>", "<answer> Rome </answer>"],
    HAMLET: ["<answer> Shakespeare </answer>"],
    MONA_LISA: ["hmm", "hmm", "hmm", "hmm"],  # four invalid turns: the turn budget ends it unanswered
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_policy_path())


@pytest.fixture
def benchmarks(tmp_path):
    return (
        str(write_jsonl(tmp_path / "geo.jsonl", GEO)),
        str(write_jsonl(tmp_path / "people.jsonl", PEOPLE)),
    )


def asked(prompt):
    return next(question for question in (FRANCE, ITALY, HAMLET, MONA_LISA) if question in prompt)


def tokens(tokenizer, *texts):
    return sum(len(tokenizer.encode(text, add_special_tokens=False)) for text in texts)


FIELDS = (
    "exact_match",
    "cover_exact_match",
    "f1",
    "valid_answer_rate",
    "mean_searches",
    "mean_turns",
    "gold_recall",
)


def metrics_of(results):
    """Per dataset and on average: the table's values, rounded to 4 places (None stays None)."""
    rows = [*results.per_dataset, results.average]
    return {
        m.dataset: tuple(None if (v := getattr(m, f)) is None else round(v, 4) for f in FIELDS) for m in rows
    }


def evaluate(tmp_path, benchmarks, tokenizer, mode, scripts, *, batch_size=4, retriever=None):
    """Run ``mode`` with the scripted policy (and the fake retriever) through ``run_evaluation``."""
    config = EvalConfig(
        benchmarks=benchmarks,
        mode=mode,
        index=None if mode == "direct" else "fake-index",
        batch_size=batch_size,
    )
    generator = ScriptedGenerator(tokenizer, scripts)
    results = run_evaluation(
        config, tmp_path / mode, show_progress=False, generator=generator, retriever=retriever
    )
    return results, generator


def test_direct_mode_gives_the_known_table(tmp_path, benchmarks, tokenizer):
    results, generator = evaluate(tmp_path, benchmarks, tokenizer, "direct", ONE_TURN_SCRIPTS, batch_size=3)
    #                       EM    cover   F1      valid  searches turns recall
    assert metrics_of(results) == {
        "geo": (0.5, 1.0, 0.8333, 1.0, 0.0, 1.0, None),
        "people": (0.5, 0.5, 0.5, 0.5, 0.0, 1.0, None),
        "average": (0.5, 0.75, 0.6667, 0.75, 0.0, 1.0, None),
    }
    people_tokens = tokens(tokenizer, *ONE_TURN_SCRIPTS[HAMLET], *ONE_TURN_SCRIPTS[MONA_LISA])
    assert results.per_dataset[1].mean_response_tokens == people_tokens / 2
    assert all("<information>" not in prompt for prompt in generator.prompts)


def test_rag_mode_retrieves_once_per_batch_and_gives_the_known_table(tmp_path, benchmarks, tokenizer):
    retriever = KeywordRetriever()
    results, generator = evaluate(
        tmp_path, benchmarks, tokenizer, "rag", ONE_TURN_SCRIPTS, batch_size=2, retriever=retriever
    )
    assert metrics_of(results) == {
        "geo": (0.5, 1.0, 0.8333, 1.0, 1.0, 1.0, 0.75),  # recall: d1 of {d1}, d2 of {d2, d9}
        "people": (0.5, 0.5, 0.5, 0.5, 1.0, 1.0, None),  # no gold ids known
        "average": (0.5, 0.75, 0.6667, 0.75, 1.0, 1.0, 0.75),
    }
    assert retriever.calls == [[FRANCE, ITALY], [HAMLET, MONA_LISA]]
    france_prompt = next(prompt for prompt in generator.prompts if FRANCE in prompt)
    assert (
        "<information>Doc 1(Title: Paris) Paris is the capital of France.\nDoc 2(Title: Europe)"
        in france_prompt
    )


def test_agent_mode_runs_the_training_rollout_and_gives_the_known_table(tmp_path, benchmarks, tokenizer):
    retriever = KeywordRetriever()
    results, _ = evaluate(tmp_path, benchmarks, tokenizer, "agent", AGENT_SCRIPTS, retriever=retriever)
    assert metrics_of(results) == {
        "geo": (1.0, 1.0, 1.0, 1.0, 1.5, 2.5, 0.75),  # Italy searched twice, saw d2 but never d9
        "people": (0.5, 0.5, 0.5, 0.5, 0.0, 2.5, None),
        "average": (0.75, 0.75, 0.75, 0.75, 0.75, 2.5, 0.75),
    }
    # One retriever call per vector-env step that has searches: turn 1 (France, Italy), turn 2 (Italy).
    assert retriever.calls == [["capital of France", "Italy capital"], ["Rome Italy"]]
    predictions = {p.example_id: p for p in read_predictions(tmp_path / "agent" / PREDICTIONS_FILE)}
    italy = predictions["g2"]
    assert italy.queries == ["Italy capital", "Rome Italy"]
    assert italy.retrieved_ids == [["d2", "d3"], ["d2", "d3"]]
    assert italy.num_response_tokens == tokens(tokenizer, *AGENT_SCRIPTS[ITALY])
    assert italy.trajectory.startswith(AGENT_SCRIPTS[ITALY][0] + "\n\n<information>Doc 1(Title: Rome)")
    assert predictions["p2"].prediction is None
    assert predictions["p2"].end_reason == "max_turns"


def test_agent_mode_follows_the_training_protocol(tmp_path, benchmarks, tokenizer):
    config = EvalConfig(
        benchmarks=benchmarks,
        mode="agent",
        index="fake-index",
        env=EnvConfig(
            max_turns=2, max_searches=1, prompt_template="Look it up, then answer. Question: {question}"
        ),
    )
    generator = ScriptedGenerator(tokenizer, AGENT_SCRIPTS)
    run_evaluation(
        config, tmp_path / "agent", show_progress=False, generator=generator, retriever=KeywordRetriever()
    )
    first_prompts = [prompt for prompt in generator.prompts if "<information>" not in prompt]
    assert first_prompts and all("Look it up, then answer. Question: " in prompt for prompt in first_prompts)
    predictions = {p.example_id: p for p in read_predictions(tmp_path / "agent" / PREDICTIONS_FILE)}
    assert predictions["g1"].prediction == "Paris"  # search, then answer: within the two turns
    italy = predictions["g2"]  # its second search is the last turn's action: refused, and the episode ends
    assert (italy.num_searches, italy.num_turns, italy.prediction) == (1, 2, None)


def test_a_killed_run_resumes_from_its_predictions(tmp_path, benchmarks, tokenizer):
    config = EvalConfig(benchmarks=benchmarks, mode="direct", batch_size=1)
    run_dir = tmp_path / "run"
    killed = ScriptedGenerator(tokenizer, ONE_TURN_SCRIPTS, fail_after=2)
    with pytest.raises(Interrupted):
        run_evaluation(config, run_dir, show_progress=False, generator=killed)
    assert len(read_predictions(run_dir / PREDICTIONS_FILE)) == 2
    assert not (run_dir / RESULTS_FILE).exists()
    with (run_dir / PREDICTIONS_FILE).open("a") as file:
        file.write('{"example_id": "p1", "data')  # the kill also cut a line in half
    resumed = ScriptedGenerator(tokenizer, ONE_TURN_SCRIPTS)
    results = run_evaluation(config, run_dir, show_progress=False, generator=resumed)
    assert [asked(prompt) for prompt in resumed.prompts] == [HAMLET, MONA_LISA]  # only what was left
    straight, _ = evaluate(tmp_path, benchmarks, tokenizer, "direct", ONE_TURN_SCRIPTS)
    assert results.per_dataset == straight.per_dataset
    assert len(read_predictions(run_dir / PREDICTIONS_FILE)) == 4


def test_resuming_with_other_settings_is_refused(tmp_path, benchmarks, tokenizer):
    config = EvalConfig(benchmarks=benchmarks, mode="direct")
    policy = ScriptedGenerator(tokenizer, ONE_TURN_SCRIPTS)
    run_evaluation(config, tmp_path / "run", show_progress=False, generator=policy)
    other = EvalConfig(benchmarks=benchmarks, mode="direct", limit=1)
    with pytest.raises(SearchgymError, match="limit differ"):
        run_evaluation(other, tmp_path / "run", show_progress=False, generator=policy)
    assert json.loads((tmp_path / "run" / RUN_FILE).read_text())["limit"] is None


def test_fingerprints_digest_the_files_each_run_reads(tmp_path):
    model, index = tmp_path / "model", tmp_path / "index"
    (model / ".cache").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    index.mkdir()
    (index / "manifest.json").write_text('{"created": "2026-11-28T10:55:29Z"}')
    agent = EvalConfig(benchmarks=("nq",), model=str(model), mode="agent", index=str(index))
    direct = replace(agent, mode="direct")
    hub = EvalConfig(benchmarks=("nq",), model="org/name", mode="direct")
    fingerprints = input_fingerprints([agent, direct, hub])
    assert [set(found) for found in fingerprints] == [{"model", "index"}, {"model"}, set()]
    assert fingerprints[0]["model"] == fingerprints[1]["model"]
    (model / ".cache" / "download.lock").write_text("")  # hidden files are not the model
    assert input_fingerprints([agent]) == fingerprints[:1]
    (model / "model.safetensors").write_bytes(b"trained")
    (changed,) = input_fingerprints([agent])
    assert changed["model"] != fingerprints[0]["model"] and changed["index"] == fingerprints[0]["index"]
    assert input_fingerprints([agent], model=False, index=False) == [{}]  # a loaded model, a given retriever


def test_resuming_over_a_rebuilt_index_is_refused(tmp_path):
    index, run_dir = tmp_path / "index", tmp_path / "run"
    index.mkdir()
    run_dir.mkdir()
    (index / "manifest.json").write_text('{"created": "2026-11-28T10:55:29Z"}')
    config = EvalConfig(benchmarks=("nq",), mode="rag", index=str(index))
    (before,) = input_fingerprints([config])
    (run_dir / RUN_FILE).write_text(json.dumps(run_file_document(config, before)))
    assert resume_predictions(run_dir, config, before) == []
    (index / "manifest.json").write_text('{"created": "2026-11-29T08:00:00Z"}')
    (after,) = input_fingerprints([config])
    with pytest.raises(SearchgymError, match=f"the index {index} changed since it began"):
        resume_predictions(run_dir, config, after)
    (run_dir / RUN_FILE).write_text(json.dumps(config.to_dict()))  # written before fingerprints existed
    assert resume_predictions(run_dir, config, after) == []
    (index / "manifest.json").unlink()  # a deleted index is not "changed": the retriever check names it
    assert input_fingerprints([config]) == [{}]


def test_exclude_drops_the_listed_ids(tmp_path, benchmarks, tokenizer):
    ids_file = tmp_path / "overlap.txt"
    ids_file.write_text("g2  # seen in training\n\np1\n", encoding="utf-8")
    config = EvalConfig(benchmarks=benchmarks, mode="direct", exclude=str(ids_file))
    generator = ScriptedGenerator(tokenizer, ONE_TURN_SCRIPTS)
    results = run_evaluation(config, tmp_path / "run", show_progress=False, generator=generator)
    kept = [p.example_id for p in read_predictions(tmp_path / "run" / PREDICTIONS_FILE)]
    assert kept == ["g1", "p2"]
    assert [m.num_examples for m in results.per_dataset] == [1, 1]
    assert [m.exact_match for m in results.per_dataset] == [1.0, 0.0]


def test_limit_and_seed_pick_the_same_questions_every_time(tmp_path, benchmarks, tokenizer):
    picked = []
    for run in ("a", "b"):
        config = EvalConfig(benchmarks=benchmarks, mode="direct", limit=1, seed=5)
        policy = ScriptedGenerator(tokenizer, ONE_TURN_SCRIPTS)
        run_evaluation(config, tmp_path / run, show_progress=False, generator=policy)
        picked.append([p.example_id for p in read_predictions(tmp_path / run / PREDICTIONS_FILE)])
    assert picked[0] == picked[1]
    assert len(picked[0]) == 2  # one per dataset


def test_repeated_prediction_lines_are_counted_once(tmp_path, benchmarks, tokenizer, capsys):
    straight, _ = evaluate(tmp_path, benchmarks, tokenizer, "direct", ONE_TURN_SCRIPTS)
    predictions = tmp_path / "direct" / PREDICTIONS_FILE
    lines = predictions.read_text(encoding="utf-8").splitlines(keepends=True)
    predictions.write_text("".join(lines + lines[:3]), encoding="utf-8")  # two writers, or a copy-paste
    config = EvalConfig(benchmarks=benchmarks, mode="direct", batch_size=4)
    again = run_evaluation(config, tmp_path / "direct", show_progress=False, generator=None)
    assert [m.num_examples for m in again.per_dataset] == [2, 2]  # not 2 + 3 repeats
    assert again.per_dataset == straight.per_dataset
    assert "4 questions already done (3 repeated lines ignored)" in capsys.readouterr().err


def test_a_run_directory_written_by_a_live_process_is_refused(tmp_path, benchmarks, tokenizer):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with subprocess.Popen(["sleep", "60"]) as other:
        try:
            (run_dir / LOCK_FILE).write_text(f"{socket.gethostname()} {other.pid}\n")
            config = EvalConfig(benchmarks=benchmarks, mode="direct")
            with pytest.raises(RunLockedError, match=f"being written by process {other.pid}"):
                run_evaluation(
                    config,
                    run_dir,
                    show_progress=False,
                    generator=ScriptedGenerator(tokenizer, ONE_TURN_SCRIPTS),
                )
            assert not (run_dir / PREDICTIONS_FILE).exists()
        finally:
            other.kill()


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_released(tmp_path, benchmarks, tokenizer):
    finished = subprocess.Popen(["true"])
    finished.wait()  # reaped: its pid no longer runs
    dead_pid = finished.pid
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(f"{socket.gethostname()} {dead_pid}\n")
    config = EvalConfig(benchmarks=benchmarks, mode="direct")
    generator = ScriptedGenerator(tokenizer, ONE_TURN_SCRIPTS)
    results = run_evaluation(config, run_dir, show_progress=False, generator=generator)
    assert [m.num_examples for m in results.per_dataset] == [2, 2]
    assert not (run_dir / LOCK_FILE).exists()


def test_a_run_directory_that_cannot_be_written_is_one_clear_error(tmp_path, benchmarks, tokenizer):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = EvalConfig(benchmarks=benchmarks, mode="direct")
    with pytest.raises(SearchgymError, match=r"cannot write to .*a-file/run .*choose another --out"):
        run_evaluation(config, blocker / "run", show_progress=False, generator=None)
