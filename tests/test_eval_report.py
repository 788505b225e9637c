import json

import pytest
from eval_fixtures import prediction

from searchgym.errors import SearchgymError
from searchgym.eval.config import EvalConfig
from searchgym.eval.report import (
    PREDICTIONS_FILE,
    RESULTS_FILE,
    TABLE_FILE,
    PairedComparison,
    PredictionsWriter,
    RunResults,
    TableRow,
    compare_runs,
    format_comparison,
    format_run_table,
    load_results,
    paired_comparison,
    read_predictions,
    sign_test,
    write_run_files,
)


def finished_run(run_dir, *, mode="direct", scores=None):
    scores = scores or {"nq": [1.0, 0.0], "popqa": [1.0]}
    config = EvalConfig(benchmarks=tuple(scores), mode=mode, index="idx" if mode != "direct" else None)
    rows = [
        prediction(f"{name}-{i}", dataset=name, em=em) for name in scores for i, em in enumerate(scores[name])
    ]
    results = RunResults.from_predictions(config, rows, seconds=2.0, num_new=len(rows))
    run_dir.mkdir(parents=True, exist_ok=True)
    with PredictionsWriter(run_dir / PREDICTIONS_FILE) as writer:
        writer.write(rows)
    write_run_files(run_dir, results)
    return results


def test_predictions_round_trip(tmp_path):
    path = tmp_path / PREDICTIONS_FILE
    rows = [prediction("a", em=1.0, gold_recall=0.5), prediction("b", answer=None, error="timeout")]
    with PredictionsWriter(path) as writer:
        writer.write(rows[:1])
        writer.write(rows[1:])
    assert read_predictions(path) == rows


def test_a_line_cut_by_a_kill_is_dropped_and_repaired(tmp_path):
    path = tmp_path / PREDICTIONS_FILE
    with PredictionsWriter(path) as writer:
        writer.write([prediction("a"), prediction("b")])
    whole = path.read_bytes()
    path.write_bytes(whole[: whole.rfind(b"\n", 0, len(whole) - 1) + 25])  # half of the last line
    assert [p.example_id for p in read_predictions(path)] == ["a"]
    assert [p.example_id for p in read_predictions(path, repair=True)] == ["a"]
    assert path.read_bytes().endswith(b"\n")
    with PredictionsWriter(path) as writer:  # appending after the repair gives a clean file
        writer.write([prediction("c")])
    assert [p.example_id for p in read_predictions(path)] == ["a", "c"]


def test_a_corrupt_complete_line_names_its_number(tmp_path):
    path = tmp_path / PREDICTIONS_FILE
    path.write_text(json.dumps(prediction("a").to_dict()) + "\n{not json}\n", encoding="utf-8")
    with pytest.raises(SearchgymError, match="line 2"):
        read_predictions(path)


def test_bytes_that_are_not_utf8_name_their_line(tmp_path):
    path = tmp_path / PREDICTIONS_FILE
    path.write_bytes(json.dumps(prediction("a").to_dict()).encode() + b'\n{"example_id": "caf\xe9"}\n')
    with pytest.raises(SearchgymError, match=r"line 2, is not a prediction record \('utf-8' codec"):
        read_predictions(path)


def test_missing_predictions_file_reads_as_empty(tmp_path):
    assert read_predictions(tmp_path / PREDICTIONS_FILE) == []


def test_results_round_trip_and_files(tmp_path):
    results = finished_run(tmp_path / "run")
    assert load_results(tmp_path / "run") == results
    document = json.loads((tmp_path / "run" / RESULTS_FILE).read_text())
    assert document["datasets"]["nq"]["exact_match"] == 0.5
    assert document["average"]["exact_match"] == 0.75
    assert document["questions_per_second"] == 1.5
    assert (tmp_path / "run" / TABLE_FILE).read_text().strip() == format_run_table(results)


def test_results_need_every_benchmark(tmp_path):
    config = EvalConfig(benchmarks=("nq", "popqa"), mode="direct")
    with pytest.raises(ValueError, match="popqa"):
        RunResults.from_predictions(config, [prediction("a")], seconds=1.0, num_new=1)


def test_load_results_of_an_unfinished_run_says_so(tmp_path):
    with pytest.raises(SearchgymError, match="finished"):
        load_results(tmp_path)


def test_run_table_has_datasets_as_columns(tmp_path):
    table = format_run_table(finished_run(tmp_path / "run"))
    lines = table.splitlines()
    assert lines[2] == "| metric | nq | popqa | avg |"
    assert "| EM | 0.500 | 1.000 | 0.750 |" in lines
    assert "| gold-passage recall | – | – | – |" in lines
    assert "| questions | 2 | 1 | 3 |" in lines


def test_comparison_columns_come_from_runs_and_paper_rows_fill_them():
    rows = [
        TableRow("a (agent)", {"nq": 0.5, "popqa": 0.25}),
        TableRow("b (rag)", {"nq": 0.1}),
        TableRow("paper: qwen2.5-7b/rag", {"nq": 0.349, "popqa": 0.392, "musique": 0.058}),
    ]
    assert format_comparison(rows).splitlines() == [
        "EM",
        "",
        "| run | nq | popqa | avg |",
        "|---|---:|---:|---:|",
        "| a (agent) | 0.500 | 0.250 | 0.375 |",
        "| b (rag) | 0.100 | – | – |",
        "| paper: qwen2.5-7b/rag | 0.349 | 0.392 | 0.370 |",
    ]


def test_compare_runs_with_the_paper(tmp_path):
    finished_run(tmp_path / "base", scores={"nq": [0.0, 1.0]})
    finished_run(tmp_path / "trained", mode="agent", scores={"nq": [1.0, 1.0]})
    table = compare_runs([tmp_path / "base", tmp_path / "trained"], reported=["qwen2.5-7b/rag"])
    assert table.splitlines()[2:] == [
        "| run | nq | avg |",
        "|---|---:|---:|",
        "| base (direct) | 0.500 | 0.500 |",
        "| trained (agent) | 1.000 | 1.000 |",
        "| paper: qwen2.5-7b/rag | 0.349 | 0.349 |",
        "",
        f"paired EM, {tmp_path / 'trained'} against {tmp_path / 'base'}, 2 questions: 1 better, 0 worse "
        "(two-sided sign test p = 1)",
    ]


def test_sign_test_is_the_exact_two_sided_binomial_tail():
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 0) == sign_test(0, 5) == pytest.approx(2 / 32)
    assert sign_test(3, 3) == 1.0
    assert sign_test(28, 9) == pytest.approx(0.0025632, rel=1e-4)  # scipy.stats.binomtest(9, 37)


def test_paired_comparison_matches_questions_by_dataset_and_id(tmp_path):
    finished_run(tmp_path / "a", scores={"nq": [0.0, 1.0, 0.0, 1.0], "popqa": [0.0]})
    finished_run(tmp_path / "b", scores={"nq": [1.0, 1.0, 1.0, 0.0], "bamboogle": [1.0]})
    paired = paired_comparison(tmp_path / "a", tmp_path / "b")
    assert paired == PairedComparison(questions=4, gained=2, lost=1, p_value=1.0)
    finished_run(tmp_path / "c", scores={"hotpotqa": [1.0]})
    assert paired_comparison(tmp_path / "a", tmp_path / "c") is None
    assert "paired" not in compare_runs([tmp_path / "a", tmp_path / "c"])
    with pytest.raises(SearchgymError, match="per-question"):
        paired_comparison(tmp_path / "a", tmp_path / "b", metric="mean_searches")


def test_compare_other_metrics_without_the_paper(tmp_path):
    finished_run(tmp_path / "run")
    assert compare_runs([tmp_path / "run"], metric="f1").startswith("F1")
    with pytest.raises(SearchgymError, match="EM only"):
        compare_runs([tmp_path / "run"], metric="f1", reported=["all"])
    with pytest.raises(SearchgymError, match="unknown metric"):
        compare_runs([tmp_path / "run"], metric="bleu")
