"""searchgym view: the episode file the tracker writes, its index, filters, comparisons and every page."""

import json
import re

import pytest
from env_fixtures import FakeRetriever
from policy_fixtures import SCRIPTED_LOGPROB, ScriptedGenerator
from viewer_fixtures import (
    EXAMPLES,
    STEP_SCRIPTS,
    eval_prediction,
    write_eval_run,
    write_large_eval_run,
    write_training_run,
)

from searchgym.cli import main
from searchgym.env import EnvConfig, SearchVectorEnv
from searchgym.eval.report import compare_runs
from searchgym.policy.models import tiny_random_model
from searchgym.policy.rollout import run_episodes
from searchgym.train.config import load_config
from searchgym.train.tracking import Tracker
from searchgym.viewer.app import create_app
from searchgym.viewer.compare import compare
from searchgym.viewer.episodes import EpisodeSummary, prediction_detail, split_trajectory, training_summary
from searchgym.viewer.filters import BadFilter, EpisodeFilter, Page
from searchgym.viewer.index import JsonlIndex, RecordNotFound
from searchgym.viewer.runs import NotARun, RunKind, find_runs

QUIET = ["logging.tensorboard=false", "logging.progress_bar=false"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_random_model().tokenizer


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("runs")
    write_training_run(root / "train", tokenizer)
    write_eval_run(root / "warm", "warm")
    write_eval_run(root / "final", "final")
    return root


@pytest.fixture(scope="module")
def client(runs_root):
    runs = find_runs([runs_root / "train", runs_root / "warm", runs_root / "final"])
    return create_app(runs).test_client()


def episode_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def summary(line, *, dataset="nq", example_id="x", em=0.0, step=None, **fields):
    values = {
        "question": f"question {example_id}",
        "answer": "a",
        "golden_answers": ("gold",),
        "reward": None,
        "f1": em,
        "searches": 0,
        "end_reason": "answered",
    } | fields
    return EpisodeSummary(line=line, step=step, dataset=dataset, example_id=example_id, em=em, **values)


def page_text(response):
    return response.get_data(as_text=True)


# ---------------------------------------------------------------------------------------------- the writer
def test_the_tracker_writes_tokens_mask_logprobs_turns_and_observations(runs_root):
    rows = episode_rows(runs_root / "train" / "samples" / "episodes.jsonl")
    assert [(r["step"], r["example_id"], r["answer"], r["em"]) for r in rows] == [
        (1, "q0", "Lyon", 0.0),
        (1, "q1", "William Shakespeare", 1.0),
        (2, "q0", "Paris", 1.0),
        (2, "q1", "Marlowe", 0.0),
    ]
    france = rows[0]
    assert france["gold_doc_ids"] == ["d0"] and france["golden_answers"] == ["Paris"]
    assert france["searches"] == 1 and france["end_reason"] == "answered"
    assert france["reward"] == 0.0
    assert france["reward_parts"] == {"outcome": 0.0, "shaping": 0.0, "search_cost": 0.0}
    search_turn, answer_turn = france["turns"]
    assert search_turn["query"] == "capital of France"
    assert search_turn["retrieved_ids"] == ["d0", "d1", "d2"]
    # The observation is the decoded observation tokens: what the policy read, documents in rank order.
    assert "<information>Doc 1(Title: Paris) Paris is the capital" in search_turn["observation"]
    assert answer_turn["observation"] == ""
    tokens = france["tokens"]
    assert len(tokens["ids"]) == len(tokens["text"]) == len(tokens["mask"]) == len(tokens["turn"])
    masked = list(zip(tokens["text"], tokens["mask"], tokens["logprobs"], tokens["turn"], strict=True))
    assert {logprob for _, mask, logprob, _ in masked if mask} == {SCRIPTED_LOGPROB}
    assert "".join(text for text, mask, _, turn in masked if mask and turn == 0) == search_turn["text"]
    assert "".join(text for text, mask, _, _ in masked if not mask) == search_turn["observation"]


def test_a_resumed_run_drops_the_episodes_after_its_checkpoint_and_a_fresh_run_all(tmp_path, tokenizer):
    write_training_run(tmp_path, tokenizer)
    config = load_config(None, [f"logging.run_dir={tmp_path}", *QUIET])
    Tracker(config, start_step=1).close()
    assert [row["step"] for row in episode_rows(tmp_path / "samples" / "episodes.jsonl")] == [1, 1]
    Tracker(config, start_step=0).close()
    assert not (tmp_path / "samples" / "episodes.jsonl").exists()


def test_episodes_per_step_bounds_what_is_written(tmp_path, tokenizer):
    config = load_config(None, [f"logging.run_dir={tmp_path}", *QUIET, "logging.episodes_per_step=1"])
    tracker = Tracker(config, start_step=0)
    env = SearchVectorEnv(
        num_envs=2, dataset=None, retriever=FakeRetriever(), config=EnvConfig(), tokenizer=tokenizer
    )
    trajectories = run_episodes(ScriptedGenerator(tokenizer, STEP_SCRIPTS[1]), env, list(EXAMPLES))
    tracker.write_episodes(1, trajectories, list(EXAMPLES), tokenizer)
    tracker.write_episodes(2, trajectories, list(EXAMPLES), tokenizer)
    rows = episode_rows(tmp_path / "samples" / "episodes.jsonl")
    assert [(row["step"], row["example_id"]) for row in rows] == [(1, "q0"), (2, "q0")]


# ---------------------------------------------------------------------------------------------- records
def test_an_eval_trajectory_splits_into_turns_at_its_information_blocks():
    prediction = eval_prediction("nq", "n1", right=False).to_dict()
    detail = prediction_detail(prediction, line=7)
    search, answer = detail.turns
    assert (search.action_type, search.reasoning, search.query) == ("search", "Look it up.", "n1 capital")
    assert [(p.rank, p.title, p.doc_id, p.gold) for p in search.passages] == [
        (1, "Paris", "d0", True),
        (2, "Lyon", "d1", False),
    ]
    assert search.passages[0].text == "Paris is the capital and largest city of France."
    assert (answer.action_type, answer.answer, answer.passages) == ("answer", "Lyon", ())
    assert detail.summary.line == 7 and detail.gold_doc_ids == ("d0",)


def test_a_trajectory_without_observations_is_one_turn():
    (turn,) = split_trajectory("<answer> 42 </answer>", [], [])
    assert (turn.number, turn.action_type, turn.answer) == (1, "answer", "42")


# ---------------------------------------------------------------------------------------------- the index
def test_the_index_reads_each_byte_once_and_a_record_by_its_offset(tmp_path):
    path = tmp_path / "episodes.jsonl"
    lines = [json.dumps({"n": n, "pad": "x" * n}) + "\n" for n in range(5)]
    path.write_text("".join(lines))
    index = JsonlIndex(path, lambda row, line: (line, row["n"]))
    index.refresh()
    index.refresh()
    assert index.summaries == [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)]
    assert index.bytes_read == path.stat().st_size
    assert index.read(4) == {"n": 3, "pad": "xxx"}
    assert index.bytes_read == path.stat().st_size + len(lines[3])


def test_the_index_waits_for_a_cut_line_and_reports_a_broken_one(tmp_path):
    path = tmp_path / "episodes.jsonl"
    path.write_text('{"n": 0}\n{"n": 1, "tru')
    index = JsonlIndex(path, lambda row, line: row["n"])
    index.refresh()
    assert index.summaries == [0] and index.problems == []
    with path.open("a") as handle:  # the writer finishes the line, then writes a broken one and a good one
        handle.write('ncated": true}\n[1, 2]\n{"m": 3}\nnot json\n{"n": 4}\n')
    index.refresh()
    assert index.summaries == [0, 1, 4]
    assert [problem.line for problem in index.problems] == [3, 4, 5]
    with pytest.raises(RecordNotFound, match="no record on line 3"):
        index.read(3)


def test_the_index_starts_again_when_the_file_shrinks(tmp_path):
    path = tmp_path / "episodes.jsonl"
    path.write_text('{"n": 0}\n{"n": 1}\n')
    index = JsonlIndex(path, lambda row, line: row["n"])
    index.refresh()
    path.write_text('{"n": 9}\n')
    index.refresh()
    assert index.summaries == [9]


# ---------------------------------------------------------------------------------------------- filters
def test_filters_combine_ranges_reasons_and_text():
    episodes = [
        summary(1, em=1.0, searches=2, question="Who wrote Hamlet?", end_reason="answered"),
        summary(2, em=0.0, searches=0, question="Capital of France?", end_reason="max_turns"),
        summary(3, em=0.0, searches=3, question="Who painted it?", answer="Hamlet", dataset="hotpotqa"),
        summary(4, em=None, searches=1, question="broken", end_reason="retriever_error"),
    ]
    wrong = EpisodeFilter.from_query({"em_max": "0"})
    assert [e.line for e in wrong.apply(episodes)] == [2, 3]  # an unscored episode has no EM to compare
    searched = EpisodeFilter.from_query({"searches_min": "1", "searches_max": "2"})
    assert [e.line for e in searched.apply(episodes)] == [1, 4]
    text = EpisodeFilter.from_query({"text": "HAMLET"})  # the question or the answer, any case
    assert [e.line for e in text.apply(episodes)] == [1, 3]
    combined = EpisodeFilter.from_query({"dataset": "nq", "end_reason": "max_turns", "em_max": " 0 "})
    assert [e.line for e in combined.apply(episodes)] == [2]
    assert EpisodeFilter.from_query({"step": "", "text": ""}) == EpisodeFilter()


def test_a_bad_filter_value_names_the_field():
    with pytest.raises(BadFilter, match="em_min must be a number, got 'lots'"):
        EpisodeFilter.from_query({"em_min": "lots"})
    with pytest.raises(BadFilter, match="step must be an integer"):
        EpisodeFilter.from_query({"step": "1.5"})
    with pytest.raises(BadFilter, match="per_page between 1 and 500"):
        Page.from_query({"per_page": "100000"}, total=10)


def test_pages_cut_the_list_and_a_page_past_the_end_shows_the_last():
    page = Page.from_query({"page": "9", "per_page": "4"}, total=10)
    assert (page.number, page.count, page.start, page.stop) == (3, 3, 8, 10)


# ---------------------------------------------------------------------------------------------- compare
def test_compare_counts_flips_per_dataset():
    before = [summary(1, example_id="a", em=1.0), summary(2, example_id="b"), summary(3, example_id="c")]
    after = [summary(1, example_id="a"), summary(2, example_id="b", em=1.0), summary(3, example_id="d")]
    result = compare(before, after)
    (row,) = result.datasets
    # before: a right of a, b, c (1/3); after: b right of a, b, d (1/3); a and b are in both and flipped.
    assert (row.em_a, row.em_b, row.common, row.gained, row.lost) == (1 / 3, 1 / 3, 2, 1, 1)
    assert [(flip.example_id, flip.gained) for flip in result.flips] == [("b", True), ("a", False)]


def test_compare_scores_a_question_by_the_mean_em_of_its_samples():
    # Training steps hold GRPO groups: 2 of 3 samples right is a right question (mean 0.667 >= 0.5).
    before = [summary(n, example_id="q", em=float(n == 1), step=1) for n in range(1, 4)]
    after = [summary(n, example_id="q", em=float(n != 4), step=2) for n in range(4, 7)]
    (flip,) = compare(before, after).flips
    assert flip.gained and flip.a.em == pytest.approx(1 / 3) and flip.b.em == pytest.approx(2 / 3)
    assert flip.a.lines == (1, 2, 3)


# ---------------------------------------------------------------------------------------------- runs
def test_runs_are_found_in_their_folders_and_in_a_folder_of_runs(runs_root):
    runs = find_runs([runs_root / "train", runs_root])
    assert [(run.label, run.kind) for run in runs] == [
        ("train", RunKind.TRAIN),
        ("final", RunKind.EVAL),
        ("warm", RunKind.EVAL),
    ]


def test_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NotARun, match=r"is not a run folder: a training run has metrics\.jsonl"):
        find_runs([tmp_path])
    with pytest.raises(NotARun, match="is not a folder"):
        find_runs([tmp_path / "missing"])


def test_the_command_line_reports_a_non_run_folder_in_one_line(tmp_path, capsys):
    assert main(["view", str(tmp_path)]) == 2
    assert "searchgym view: error:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- pages
def test_the_home_page_lists_every_run(client):
    text = page_text(client.get("/"))
    assert all(name in text for name in ("train", "warm", "final"))


def test_the_training_list_filters_by_step_and_wrong_answers(client):
    text = page_text(client.get("/run/0?step=2&em_max=0"))
    assert "1 matching" in text
    assert "Marlowe" in text and "Paris</td>" not in text


def test_the_eval_list_shows_per_dataset_em_and_filters_text(client):
    text = page_text(client.get("/run/1?text=n3"))
    assert "1 matching" in text and "What is the capital asked in n3?" in text
    # warm: nq 1 of 4 right, hotpotqa 2 of 3
    assert "<td>0.250</td>" in text and "<td>0.667</td>" in text


def test_a_training_episode_shows_passages_gold_reward_parts_and_masked_tokens(client):
    text = page_text(client.get("/run/0/episode/1"))
    assert "capital of France" in text
    assert re.search(r'class="passage gold" data-doc-id="d0"', text)
    assert "<mark>Paris</mark> is the capital" in text  # the gold answer highlighted in the passage
    assert "outcome 0.000 + format 0.000 + search cost 0.000" in text
    assert 'class="tok m1" title="turn 1 · mask 1 · logprob -0.5000"' in text
    assert 'class="tok m0" title="turn 1 · mask 0"' in text


def test_an_eval_episode_shows_its_turns(client):
    text = page_text(client.get("/run/2/episode/2"))
    assert "n2 capital" in text and 'data-doc-id="d0"' in text and "gold passage" in text


def test_curves_are_inline_svg_of_the_logged_metrics(client):
    text = page_text(client.get("/run/0/curves"))
    assert text.count("<svg") == 6  # reward, EM, entropy, KL, length, searches (no dev EM logged)
    # entropy at step 2: 1 - 0.4 * (1 - exp(-0.2)) = 0.92749
    assert 'data-metric="actor/entropy"' in text and "<title>step 2: 0.9275</title>" in text
    assert "http" not in text.split("<main>")[1]  # nothing fetched from elsewhere


def test_compare_two_eval_runs_agrees_with_eval_compare(client, runs_root):
    text = page_text(client.get("/compare?a=1&b=2"))
    shown = re.findall(
        r'data-dataset="(\w+)" data-em-a="([^"]*)" data-em-b="([^"]*)" data-common="(\d+)" '
        r'data-gained="(\d+)" data-lost="(\d+)"',
        text,
    )
    assert [(row[0], int(row[4]), int(row[5])) for row in shown] == [("nq", 2, 0), ("hotpotqa", 1, 1)]
    assert text.count('class="flip gained"') == 3 and text.count('class="flip lost"') == 1
    # `searchgym eval --compare` prints | run | nq | hotpotqa | avg | rows with 3 decimals.
    printed = {
        cells[0]: [float(cell) for cell in cells[1:3]]
        for line in compare_runs([runs_root / "warm", runs_root / "final"]).splitlines()
        if (cells := [cell.strip() for cell in line.strip("|").split("|")])[0].endswith("(agent)")
    }
    for column, (_, em_a, em_b, common, gained, lost) in enumerate(shown):
        assert round(float(em_a), 3) == printed["warm (agent)"][column]
        assert round(float(em_b), 3) == printed["final (agent)"][column]
        assert float(em_b) - float(em_a) == pytest.approx((int(gained) - int(lost)) / int(common))


def test_compare_two_steps_of_a_training_run_side_by_side(client):
    text = page_text(client.get("/compare?a=0&b=0&step_a=1&step_b=2&dataset=fake&example_id=q0"))
    assert text.count('class="flip gained"') == 1 and text.count('class="flip lost"') == 1
    side_by_side = text.split('id="pair"')[1]
    assert "Lyon" in side_by_side and "Paris" in side_by_side


@pytest.mark.parametrize(
    ("url", "status", "message"),
    [
        ("/run/1/episode/999", 404, "predictions.jsonl has no record on line 999"),
        ("/run/9", 404, "no run number 9"),
        ("/run/1?em_min=lots", 400, "em_min must be a number"),
        ("/run/1?page=0", 400, "page must be &gt;= 1"),
        ("/compare?a=0&b=0&step_a=7", 400, "has no episodes at step 7"),
        ("/nowhere", 404, "The requested URL was not found"),
    ],
)
def test_bad_requests_get_a_clear_page_never_a_traceback(client, url, status, message):
    response = client.get(url)
    assert response.status_code == status
    assert message in page_text(response) and "Traceback" not in page_text(response)


def test_a_truncated_and_a_broken_line_are_skipped_with_a_notice(tmp_path):
    run = write_eval_run(tmp_path / "cut", "warm")
    predictions = run / "predictions.jsonl"
    good = predictions.read_text().splitlines()
    predictions.write_text("\n".join([good[0], "{not json", *good[1:]]) + "\n" + good[2][:40])
    client = create_app(find_runs([run])).test_client()
    text = page_text(client.get("/run/0"))
    assert "7 matching" in text  # 7 whole records; the cut last line waits to be completed
    assert "1 line(s) of predictions.jsonl could not be read" in text and "line 2" in text
    response = client.get("/run/0/episode/2")
    assert response.status_code == 404 and "no record on line 2" in page_text(response)


def test_a_record_that_is_json_but_not_an_episode_is_a_4xx_page(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    row = eval_prediction("nq", "n1", right=True).to_dict() | {"retrieved_ids": 5}
    (folder / "predictions.jsonl").write_text(json.dumps(row) + "\n")
    response = create_app(find_runs([folder])).test_client().get("/run/0/episode/1")
    assert response.status_code == 422 and "is not an episode record" in page_text(response)


def test_a_page_of_a_large_run_reads_a_bounded_number_of_bytes(tmp_path):
    run = write_large_eval_run(tmp_path / "large", 20_000)
    size = (run / "predictions.jsonl").stat().st_size
    (viewed,) = find_runs([run])
    client = create_app([viewed]).test_client()
    assert "20000 matching" in page_text(client.get("/run/0"))
    assert viewed.episodes.bytes_read == size  # indexed once
    before = viewed.episodes.bytes_read
    listed = page_text(client.get("/run/0?page=300&em_max=0"))
    shown = page_text(client.get("/run/0/episode/15000"))
    longest = max(len(line) for line in (run / "predictions.jsonl").read_bytes().splitlines(keepends=True))
    assert "page 300 of 267" not in listed and "question number 14999?" in shown
    # Listing reads nothing more (summaries are in memory); one episode reads its one line.
    assert viewed.episodes.bytes_read - before <= longest


def test_a_training_sample_is_indexed_from_its_head_and_a_broken_tail_is_a_422_page(tmp_path, tokenizer):
    run = write_training_run(tmp_path / "train", tokenizer)
    path = run / "samples" / "episodes.jsonl"
    lines = path.read_text().splitlines()
    (viewed,) = find_runs([run])
    whole = [training_summary(json.loads(line), number) for number, line in enumerate(lines, start=1)]
    assert viewed.summaries() == whole
    path.write_text("\n".join([lines[0], lines[1][:-40], *lines[2:]]) + "\n")  # line 2 loses its tail
    (viewed,) = find_runs([run])
    assert [episode.line for episode in viewed.summaries()] == [1, 2, 3, 4]
    response = create_app([viewed]).test_client().get("/run/0/episode/2")
    assert response.status_code == 422 and "line 2, is not an episode record" in page_text(response)
