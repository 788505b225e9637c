import json
import os
import shutil
import subprocess
import sys

import pytest

from searchgym import paths
from searchgym.cli import main
from searchgym.eval.report import PREDICTIONS_FILE, RESULTS_FILE, RUN_FILE
from searchgym.policy.models import tiny_random_model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    policy = tiny_random_model()
    policy.model.save_pretrained(folder)
    policy.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def wiki_mini_index(tmp_path_factory):
    folder = tmp_path_factory.mktemp("indexes") / "wiki-mini-bm25"
    assert (
        main(["index", "--corpus", str(paths.WIKI_MINI_CORPUS), "--method", "bm25", "--out", str(folder)])
        == 0
    )
    return folder


def test_cli_smoke_agent_on_wiki_mini_dev_with_the_tiny_model(tmp_path, tiny_model_dir, wiki_mini_index):
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "searchgym", "eval", "--model", str(tiny_model_dir),
        "--benchmarks", "wiki-mini-dev", "--mode", "agent", "--index", str(wiki_mini_index),
        "--limit", "3", "--max-new-tokens", "4", "--max-turns", "2", "--out", str(run_dir), "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr
    assert "| metric | wiki-mini-dev | avg |" in done.stdout
    assert "| questions | 3 | 3 |" in done.stdout
    results = json.loads((run_dir / RESULTS_FILE).read_text())
    assert results["config"]["mode"] == "agent"
    assert results["datasets"]["wiki-mini-dev"]["num_examples"] == 3
    assert results["datasets"]["wiki-mini-dev"]["mean_turns"] <= 2
    rows = [json.loads(line) for line in (run_dir / PREDICTIONS_FILE).read_text().splitlines()]
    assert len(rows) == 3
    assert {"question", "golden_answers", "prediction", "trajectory", "queries"} <= set(rows[0])


def test_compare_prints_runs_next_to_the_paper(tmp_path, tiny_model_dir, capsys):
    for mode in ("direct", "rag"):
        argv = [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--benchmarks",
            "bamboogle",
            "--mode",
            mode,
            "--limit",
            "2",
        ]
        argv += ["--max-new-tokens", "2", "--out", str(tmp_path / mode), "--no-progress"]
        if mode == "rag":
            argv += ["--retriever-url", "http://127.0.0.1:9"]
            assert main(argv) == 2  # nothing listens there: refused before any work
            assert "does not answer" in capsys.readouterr().err
            continue
        assert main(argv) == 0
    capsys.readouterr()
    assert main(["eval", "--compare", str(tmp_path / "direct"), "--reported", "qwen2.5-7b/rag"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| run | bamboogle | avg |"
    assert lines[4].startswith("| direct (direct) | ")
    assert lines[5] == "| paper: qwen2.5-7b/rag | 0.208 | 0.208 |"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--benchmarks", "nq,hotpotq", "--mode", "direct"],
            "unknown dataset 'hotpotq': use one of wiki-mini-train",
        ),
        (["--mode", "rag"], "give --index DIR"),
        (["--mode", "agent", "--index", "no/such/index"], "index folder no/such/index does not exist"),
        (["--mode", "direct", "--model", "/no/such/model"], "model folder /no/such/model does not exist"),
        (["--mode", "direct", "--limit", "0"], "--limit must be at least 1"),
        (["--mode", "direct", "--exclude", "/no/such/ids.txt"], "cannot read the --exclude file"),
        (["--compare", "/no/such/run"], "is /no/such/run a finished `searchgym eval` run directory"),
        (["--compare", "/no/such/run", "--reported", "gpt-4"], "no reported row matches 'gpt-4'"),
    ],
)
def test_bad_input_is_a_clear_error_before_any_work(tmp_path, capsys, argv, message):
    run_dir = tmp_path / "run"
    assert main(["eval", *argv, "--out", str(run_dir), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (run_dir / RUN_FILE).exists()


def test_a_folder_that_holds_no_model_is_refused(tmp_path, wiki_mini_index, capsys):
    argv = ["eval", "--mode", "direct", "--model", str(wiki_mini_index), "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    assert "is not a model folder (no config.json)" in capsys.readouterr().err


def test_a_folder_that_holds_no_index_is_refused_before_the_model_loads(tmp_path, capsys):
    argv = [
        "eval",
        "--mode",
        "rag",
        "--index",
        str(tmp_path),
        "--model",
        "/no/such/model",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 2
    assert "is not a searchgym index" in capsys.readouterr().err


def test_a_merged_search_r1_file_is_one_column_per_data_source(tmp_path, tiny_model_dir, capsys):
    from data_layout_fixtures import write_search_r1_merged

    merged = write_search_r1_merged(tmp_path / "test.parquet")
    argv = ["eval", "--model", str(tiny_model_dir), "--benchmarks", str(merged), "--mode", "direct"]
    argv += ["--max-new-tokens", "2", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| metric | nq | triviaqa | popqa | avg |" in out
    assert "| questions | 2 | 2 | 1 | 5 |" in out


def test_a_run_of_other_weights_in_the_same_folder_is_not_resumed(tmp_path, tiny_model_dir, capsys):
    model_dir = tmp_path / "final"
    shutil.copytree(tiny_model_dir, model_dir)
    argv = ["eval", "--model", str(model_dir), "--benchmarks", "bamboogle", "--mode", "direct"]
    argv += ["--limit", "2", "--max-new-tokens", "2", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 0
    recorded = json.loads((tmp_path / "run" / RUN_FILE).read_text())["fingerprints"]
    assert set(recorded) == {"model"}
    assert main(argv) == 0  # the same files: the finished run is reported again
    tiny_random_model(seed=1).model.save_pretrained(model_dir)  # trained further, exported to the same path
    capsys.readouterr()
    assert main(argv) == 2
    assert f"the model {model_dir} changed since it began" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / RUN_FILE).read_text())["fingerprints"] == recorded
