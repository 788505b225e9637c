"""``searchgym train`` and the real rollout wiring: help, config printing, errors, a tiny search run."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from searchgym.env import SearchVectorEnv, load_dataset
from searchgym.paths import CONFIGS_DIR, REPO_ROOT
from searchgym.policy.models import tiny_random_model
from searchgym.policy.vllm_backend import VLLMAsyncEngine
from searchgym.retriever.base import Passage
from searchgym.train import run
from searchgym.train.config import TrainConfig, load_config
from searchgym.train.config_io import build
from searchgym.train.learner import LocalLearner
from searchgym.train.loop import train
from searchgym.train.search_rollout import SearchRollout
from searchgym.train.tracking import read_metrics

TINY = CONFIGS_DIR / "tiny.yaml"


def searchgym(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "searchgym", *args], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT
    )


def test_help_documents_the_config_keys() -> None:
    result = searchgym("train", "--help")
    assert result.returncode == 0, result.stderr
    for key in (
        "optim.actor_lr",
        "kl.estimator",
        "env.max_turns",
        "guards.rollback_after",
        "batch.micro_batch_size",
    ):
        assert f"  {key} (" in result.stdout, key
    assert "Peak learning rate of the policy." in result.stdout


def test_print_config_resolves_preset_and_overrides() -> None:
    result = searchgym("train", "--config", str(TINY), "optim.actor_lr=3e-5", "env.topk=2", "--print-config")
    assert result.returncode == 0, result.stderr
    printed = build(TrainConfig, yaml.safe_load(result.stdout))
    assert printed == load_config(TINY, ["optim.actor_lr=3e-5", "env.topk=2"])


def test_a_wrong_key_exits_2_with_a_suggestion() -> None:
    result = searchgym("train", "--config", str(TINY), "optim.actor_lrr=1e-6")
    assert result.returncode == 2
    assert "did you mean optim.actor_lr?" in result.stderr


class EchoRetriever:
    """Returns the query itself as a passage: searches work without an index."""

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        return [
            [Passage(id=str(i), contents=f'"Echo"\n{query}', score=1.0) for i in range(k)]
            for query in queries
        ]


def test_search_rollout_trains_a_tiny_policy_through_the_env(tmp_path: Path) -> None:
    config = load_config(TINY, [f"logging.run_dir={tmp_path}", "total_steps=1", "logging.tensorboard=false"])
    policy = tiny_random_model()
    examples = load_dataset("wiki-mini-train", limit=4)

    def vector_env(num_envs: int) -> SearchVectorEnv:
        return SearchVectorEnv(
            num_envs=num_envs,
            dataset=None,
            retriever=EchoRetriever(),
            config=config.env,
            tokenizer=policy.tokenizer,
        )

    result = train(
        config,
        learner=LocalLearner(config, policy),
        rollout=SearchRollout(policy=policy, make_env=vector_env, budgets=config.token_budgets),
        tokenizer=policy.tokenizer,
        train_examples=examples,
        dev_examples=examples[:2],
    )
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == [0, 1]
    assert rows[1]["rollout/missing_rewards"] == 0 and rows[1]["actor/optimizer_steps"] == 2
    assert rows[1]["rollout/response_tokens"] > rows[1]["rollout/policy_tokens"]  # observations were appended
    assert rows[1]["experience/sampler_logprob_gap"] < 1e-3  # the trainer scores what the sampler sampled
    assert "dev/em" in rows[0] and "dev/em" in rows[1]
    assert result.final_model is not None and (result.final_model / "config.json").is_file()


@pytest.mark.slow
def test_searchgym_train_runs_the_tiny_preset_end_to_end(tmp_path: Path) -> None:
    result = searchgym("train", "--config", str(TINY), f"logging.run_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "dev/em" in result.stdout and (tmp_path / "final" / "model.safetensors").is_file()


def test_a_run_shuts_its_async_engine_down_even_when_training_fails(tmp_path: Path, monkeypatch) -> None:
    """vLLM's async engine runs a core process and an event-loop thread that would outlive the run."""

    class RecordingEngine(VLLMAsyncEngine):
        def __init__(self) -> None:  # no vLLM here: only close() is called
            self.closed = False

        def close(self) -> None:
            self.closed = True

    engine = RecordingEngine()

    def killed(*args, **kwargs):
        raise RuntimeError("the run died")

    monkeypatch.setattr(run, "make_engine", lambda config: engine)
    monkeypatch.setattr(run, "train", killed)
    with pytest.raises(RuntimeError, match="the run died"):
        run.run_training(load_config(TINY, [f"logging.run_dir={tmp_path}"]))
    assert engine.closed
