"""The Ray path on a local cluster: workers and replicas match one process, learners match one learner, and
a killed rollout worker stops the run with its last checkpoint intact.

One small cluster serves the module (logical CPUs beyond the two cores: the actors take turns on them, each
with one torch thread); one set of parts (2 learners, 2 retrieval replicas, 2 rollout workers) serves the
first two tests; the killed run (warm-start, 1 learner, 1 replica, 2 rollout workers) starts its own.
"""

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from env_fixtures import EXAMPLES
from ray_fixtures import comparable, questions, ray_test_config, searching_model, tiny_index
from train_fixtures import with_reward
from transformers import AutoModelForCausalLM

from searchgym.env import SearchVectorEnv
from searchgym.policy.generation import TransformersGenerator
from searchgym.policy.rollout import run_episodes
from searchgym.policy.trajectory import Trajectory
from searchgym.train.build import load_training_policy, open_retriever
from searchgym.train.checkpoint import CheckpointManager, read_trainer_state
from searchgym.train.config import TrainConfig
from searchgym.train.distributed.actors import shareable_weights, weight_tensors
from searchgym.train.learner import LocalLearner
from searchgym.train.loop import evaluation_sampling
from searchgym.train.run import run_training
from searchgym.train.tracking import read_metrics

ray = pytest.importorskip("ray")

from searchgym.train.distributed.cluster import reserve  # noqa: E402  (needs ray)
from searchgym.train.distributed.groups import Roster, WorkerDiedError  # noqa: E402
from searchgym.train.distributed.launch import Parts, start_parts  # noqa: E402
from searchgym.train.distributed.placement import plan_placement  # noqa: E402

CLUSTER_CPUS = 11  # one-CPU actors: the module's six parts, and the killed runs' four or the sharded' five


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ray")
    searching_model(folder)
    tiny_index(folder)
    questions(folder)
    return folder


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(num_cpus=CLUSTER_CPUS, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def config(workdir: Path) -> TrainConfig:
    return ray_test_config(workdir)


@pytest.fixture(scope="module")
def parts(cluster: None, config: TrainConfig) -> Iterator[Parts]:
    placement = reserve(plan_placement(config), timeout_s=120)
    roster = Roster("parts")
    yield start_parts(config, placement, roster)
    roster.stop()
    placement.release()


def perturbed_policy(config: TrainConfig):
    """The run's initial policy with every weight nudged: what a worker greedily decodes shows the weights."""
    policy = load_training_policy(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in policy.model.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    return policy


def test_two_workers_over_two_replicas_decode_what_one_process_decodes(
    parts: Parts, config: TrainConfig
) -> None:
    policy = perturbed_policy(config)
    examples = [example for example in EXAMPLES for _ in range(config.rollout.samples_per_prompt)]
    vector_env = SearchVectorEnv(
        num_envs=len(examples),
        dataset=None,
        retriever=open_retriever(config.retriever),
        config=config.env,
        tokenizer=policy.tokenizer,
    )
    alone = run_episodes(
        TransformersGenerator(policy),
        vector_env,
        examples,
        sampling=evaluation_sampling(config),
        budgets=config.token_budgets,
    )
    parts.rollout_workers.load_weights(ray.put(shareable_weights(policy.model.state_dict())))
    parts.rollout_workers.submit(
        examples, sampling=evaluation_sampling(config), step=0, batch_size=len(examples)
    )
    spread = parts.rollout_workers.collect()

    assert [comparable(t) for t in spread] == [comparable(t) for t in alone]
    for mine, theirs in zip(spread, alone, strict=True):
        assert mine.sampler_logprobs == pytest.approx(theirs.sampler_logprobs, abs=1e-4)
    assert all(t.turns[0].action_type == "search" and t.turns[0].retrieved_ids for t in alone)
    assert parts.replicas is not None
    calls = [served_calls for served_calls, _ in parts.replicas.served()]
    assert len(calls) == 2 and min(calls) >= 1  # both replicas answered searches


def rewarded(trajectories: list[Trajectory]) -> list[Trajectory]:
    """The episodes with rewards 0 and 1 in turn, so that advantages and gradients are not all zero."""
    return [with_reward(t, float(i % 2)) for i, t in enumerate(trajectories)]


def one_learner_update(config: TrainConfig, trajectories: list[Trajectory]) -> tuple[dict, dict]:
    """The single-process trainer's first update: its policy weights and metrics."""
    learner = LocalLearner(config, load_training_policy(config))
    step = learner.step(trajectories)
    return learner.policy_state(), step.metrics


def test_two_data_parallel_learners_take_the_one_learner_step(parts: Parts, config: TrainConfig) -> None:
    policy = load_training_policy(config)
    examples = [example for example in EXAMPLES for _ in range(config.rollout.samples_per_prompt)]
    vector_env = SearchVectorEnv(
        num_envs=len(examples),
        dataset=None,
        retriever=open_retriever(config.retriever),
        config=config.env,
        tokenizer=policy.tokenizer,
    )
    episodes = run_episodes(
        TransformersGenerator(policy),
        vector_env,
        examples,
        sampling=evaluation_sampling(config),
        budgets=config.token_budgets,
    )
    trajectories = rewarded(episodes)
    expected_state, expected_metrics = one_learner_update(config, trajectories)
    initial = policy.model.state_dict()

    step = parts.learners.step(trajectories)
    states = [
        weight_tensors(ray.get(member.handle.policy_state.remote())) for member in parts.learners.members
    ]

    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])  # learners in lockstep
    moved = max(float((expected_state[name] - initial[name]).abs().max()) for name in initial)
    assert moved > 0.5 * config.optim.actor_lr  # the step did change the weights
    for name, expected in expected_state.items():
        torch.testing.assert_close(states[0][name], expected, atol=1e-3 * config.optim.actor_lr, rtol=1e-5)
    for name in ("actor/policy_loss", "actor/grad_norm", "actor/entropy", "critic/value_loss"):
        assert step.metrics[name] == pytest.approx(expected_metrics[name], rel=1e-4, abs=1e-6), name
    assert step.metrics["actor/optimizer_steps"] == expected_metrics["actor/optimizer_steps"] == 2


def kill_when_checkpointed(
    run_dir: Path, step: int, actor_name: str, killed: list[int], run_over: threading.Event
) -> None:
    """SIGKILL the named actor's process once the run has saved the checkpoint of ``step``."""
    checkpoint = run_dir / "checkpoints" / f"step_{step:08d}"
    while not checkpoint.is_dir():
        if run_over.wait(timeout=0.2):
            return
    where = ray.get(ray.get_actor(actor_name).whereabouts.remote())
    os.kill(where.pid, signal.SIGKILL)
    killed.append(where.pid)


def test_a_killed_rollout_worker_stops_the_run_with_its_last_checkpoint_intact(
    cluster: None, workdir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    config = ray_test_config(
        workdir,
        f"logging.run_dir={run_dir}",
        "ray.num_learners=1",
        "ray.num_retriever_replicas=1",
        "total_steps=40",
        "checkpoint.every=1",
        "dev.every=0",
        "dev.before_training=false",
        "checkpoint.export_final=false",
        "warmstart.examples=4",  # the driver warm-starts the policy and the actors start from its folder
        "ray.max_restarts=0",
    )
    killed: list[int] = []
    run_over = threading.Event()
    killer = threading.Thread(
        target=kill_when_checkpointed, args=(run_dir, 1, f"rollout worker 1 @ {run_dir}", killed, run_over)
    )
    killer.start()
    try:
        with pytest.raises(WorkerDiedError) as failure:
            run_training(config)
    finally:
        run_over.set()
        killer.join()

    assert (run_dir / "warmstart" / "config.json").is_file()
    message = str(failure.value)
    assert f"rollout worker 1 (pid {killed[0]} on " in message
    latest = CheckpointManager(run_dir / "checkpoints", keep_last=2).latest()
    assert (
        latest is not None
        and f"The last checkpoint (step {read_trainer_state(latest).step}) is intact" in message
    )
    # The run's actors are gone and its bundles given back (the module's parts may still hold theirs).
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < CLUSTER_CPUS - 6 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) >= CLUSTER_CPUS - 6
    # The checkpoint resumes, here in one process.
    resumed_step = read_trainer_state(latest).step + 1
    resumed = run_training(
        dataclasses.replace(
            config, total_steps=resumed_step, ray=dataclasses.replace(config.ray, enabled=False)
        )
    )
    assert [int(row["step"]) for row in resumed.history] == [resumed_step]
    assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")] == list(
        range(1, resumed_step + 1)
    )


def test_a_run_restarts_its_actors_after_a_death_and_resumes_from_its_last_checkpoint(
    cluster: None, workdir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    config = ray_test_config(
        workdir,
        f"logging.run_dir={run_dir}",
        "ray.num_learners=1",
        "ray.num_retriever_replicas=1",
        "total_steps=3",
        "checkpoint.every=1",
        "dev.every=0",
        "dev.before_training=false",
        "checkpoint.export_final=false",
        "ray.max_restarts=1",
    )
    killed: list[int] = []
    run_over = threading.Event()
    killer = threading.Thread(
        target=kill_when_checkpointed, args=(run_dir, 1, f"rollout worker 0 @ {run_dir}", killed, run_over)
    )
    killer.start()
    try:
        with caplog.at_level("WARNING", logger="searchgym.train.distributed.launch"):
            result = run_training(config)
    finally:
        run_over.set()
        killer.join()

    assert killed and result.steps == 3
    assert "rollout worker 0 (pid" in caplog.text and "restart 1 of 1" in caplog.text
    # Every step is in the log exactly once: the steps after the checkpoint were run again, not twice.
    assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]


def test_searches_go_on_when_a_retrieval_replica_dies(parts: Parts) -> None:
    assert parts.replicas is not None
    victim = ray.get_actor("retriever replica 0 @ parts")
    os.kill(ray.get(victim.whereabouts.remote()).pid, signal.SIGKILL)
    client = parts.replicas.client(0)  # starts at the dead replica
    (passages,) = client.search([EXAMPLES[0].question], 1)
    assert len(passages) == 1  # answered by the other replica
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # Ray restarts the dead one, which then serves again
        try:
            ray.get(victim.served.remote(), timeout=5)
            break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(0.5)
    (passages,) = parts.replicas.client(0).search([EXAMPLES[0].question], 1)
    assert ray.get(victim.served.remote())[0] >= 1


# Three Ray runs of two learners: about 3 minutes on the 2-core box.
@pytest.mark.slow
def test_two_sharded_learners_train_resume_and_export_as_replicated_ones(
    cluster: None, workdir: Path, tmp_path: Path
) -> None:
    def run(name: str, *overrides: str) -> list[dict]:
        config = ray_test_config(
            workdir,
            f"logging.run_dir={tmp_path / name}",
            "ray.num_retriever_replicas=1",
            "checkpoint.every=1",
            "dev.every=0",
            "dev.before_training=false",
            *overrides,
        )
        run_training(config)
        return read_metrics(tmp_path / name / "metrics.jsonl")

    replicated = run("replicated", "total_steps=2")
    run("sharded", "total_steps=1", "learner.strategy=shard")
    checkpoint = CheckpointManager(tmp_path / "sharded" / "checkpoints", keep_last=1).latest()
    assert checkpoint is not None
    assert len(list((checkpoint / "sharded").glob("*.distcp"))) == 2  # each learner wrote its shards
    sharded = run("sharded", "total_steps=2", "learner.strategy=shard")  # resumes from step 1
    assert [row["step"] for row in sharded] == [1, 2]
    for ours, theirs in zip(sharded, replicated, strict=True):
        for name in ("rollout/reward", "actor/policy_loss", "actor/grad_norm"):
            assert ours[name] == pytest.approx(theirs[name], rel=1e-4, abs=1e-6), (ours["step"], name)
        # The zero-initialised value head keeps the critic's loss near 1e-6, where the order of the two
        # learners' sums (reduce-scatter against all-reduce) shows: measured 3.5e-6 against 5.0e-6.
        assert ours["critic/value_loss"] == pytest.approx(theirs["critic/value_loss"], abs=5e-6)
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded" / "final")
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "replicated" / "final")
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(final.state_dict()[name], value, atol=1e-5, rtol=1e-4, msg=name)
