"""The Ray path's plain parts, without a cluster: the ray config section, the placement map, the batch split,
the workers' seeds, and that nothing imports ray unless a run asks for it."""

import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from env_fixtures import EXAMPLES, FakeRetriever
from hypothesis import given
from hypothesis import strategies as st

from searchgym.env import QAExample
from searchgym.paths import CONFIGS_DIR, REPO_ROOT
from searchgym.train.build import load_training_policy, vector_envs
from searchgym.train.config import TrainConfig, config_help, load_config
from searchgym.train.config_io import ConfigError
from searchgym.train.distributed.actors import LearnerActor, RolloutWorker, worker_sampling
from searchgym.train.distributed.placement import episodes_per_worker, plan_placement, split_evenly
from searchgym.train.loop import evaluation_sampling, training_sampling
from searchgym.train.search_rollout import SearchRollout

TINY = CONFIGS_DIR / "tiny.yaml"
SEARCH_R1_PPO = CONFIGS_DIR / "search_r1_3b_ppo.yaml"


def tiny(*overrides: str) -> TrainConfig:
    return load_config(TINY, ["ray.enabled=true", *overrides])


def test_the_ray_section_is_off_by_default_and_documented() -> None:
    assert not load_config(TINY).ray.enabled
    help_text = config_help()
    for key in ("ray.enabled", "ray.address", "ray.num_rollout_workers", "ray.num_learners", "ray.colocate"):
        assert f"  {key} (" in help_text, key


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ray.num_learners=0"], "ray.num_learners must be >= 1"),
        (["ray.num_retriever_replicas=-1"], "ray.num_retriever_replicas must be >= 0"),
        (["ray.cpus_per_learner=0"], "ray.cpus_per_learner must be > 0"),
        (["ray.gpus_per_learner=1.5"], "use a whole number"),
        (["ray.address= "], "ray.address must be local, auto or a cluster address"),
        (["ray.colocate=true", "ray.num_rollout_workers=2"], "set ray.num_rollout_workers (2) equal to"),
        (
            ["ray.colocate=true", "ray.gpus_per_learner=1"],
            "set ray.gpus_per_rollout_worker and ray.gpus_per_learner to the same value",
        ),
        (["ray.num_learners=3"], "make it a multiple of ray.num_learners"),
        (["retriever.url=http://127.0.0.1:8000"], "set ray.num_retriever_replicas=0 to use the server"),
        (["rollout.backend=vllm", "system.device=auto"], "set ray.gpus_per_rollout_worker=1"),
        (["system.device=cuda"], "set ray.gpus_per_learner=1"),
    ],
)
def test_bad_ray_settings_name_the_keys_to_change(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny(*overrides)


def test_cross_section_checks_apply_only_to_ray_runs() -> None:
    config = load_config(TINY, ["ray.num_learners=3", "retriever.url=http://127.0.0.1:8000"])
    assert config.ray.num_learners == 3 and not config.ray.enabled


def test_placement_of_the_tiny_run_on_a_cpu_box() -> None:
    plan = plan_placement(
        tiny("ray.num_rollout_workers=2", "ray.num_retriever_replicas=2", "ray.num_learners=2")
    )
    assert plan.bundles == ({"CPU": 1.0},) * 6
    assert [place.bundle for place in plan.learners] == [0, 1]
    assert [place.bundle for place in plan.rollout_workers] == [2, 3]
    assert [place.bundle for place in plan.retriever_replicas] == [4, 5]
    assert (plan.cpus, plan.gpus) == (6.0, 0.0)
    described = plan.describe()
    assert "placement: 6 bundles (PACK), 6 CPUs and 0 GPUs in all" in described
    assert "policy + critic + reference; data-parallel over torch.distributed gloo" in described
    assert "hf generation of <= 4 episodes a step; searches the 2 replicas in turn" in described


def test_placement_on_one_node_of_eight_gpus_keeps_the_parts_apart() -> None:
    config = load_config(
        SEARCH_R1_PPO,
        [
            "ray.enabled=true",
            "retriever.url=null",
            "ray.num_learners=4",
            "ray.gpus_per_learner=1",
            "ray.num_rollout_workers=4",
            "ray.gpus_per_rollout_worker=1",
            "ray.num_retriever_replicas=2",
            "ray.cpus_per_retriever_replica=4",
        ],
    )
    plan = plan_placement(config)
    assert plan.gpus == 8 and plan.cpus == 16
    assert {place.gpus for place in (*plan.learners, *plan.rollout_workers)} == {1.0}
    assert len({place.bundle for place in (*plan.learners, *plan.rollout_workers)}) == 8
    assert "nccl" in plan.describe() and "vllm generation of <= 128 episodes a step" in plan.describe()


def test_colocated_placement_shares_each_gpu_between_a_learner_and_a_rollout_worker() -> None:
    config = load_config(
        SEARCH_R1_PPO,
        [
            "ray.enabled=true",
            "ray.num_retriever_replicas=0",
            "ray.num_learners=32",
            "ray.num_rollout_workers=32",
            "ray.gpus_per_learner=1",
            "ray.gpus_per_rollout_worker=1",
            "ray.colocate=true",
        ],
    )
    plan = plan_placement(config)
    assert len(plan.bundles) == 32 and plan.gpus == 32
    for learner, worker in zip(plan.learners, plan.rollout_workers, strict=True):
        assert learner.bundle == worker.bundle and learner.gpus == worker.gpus == 0.5
    assert "searches http://127.0.0.1:8000/retrieve itself" in plan.describe()


@given(items=st.lists(st.integers(), max_size=40), parts=st.integers(min_value=1, max_value=9))
def test_split_evenly_keeps_order_and_balances(items: list[int], parts: int) -> None:
    slices = split_evenly(items, parts)
    assert len(slices) == parts
    assert [item for part in slices for item in part] == items
    assert max(map(len, slices)) - min(map(len, slices)) <= 1


def test_each_worker_gets_at_most_its_share_of_a_step() -> None:
    config = tiny("ray.num_rollout_workers=3")  # 8 episodes a step: 3, 3 and 2
    assert episodes_per_worker(config) == 3
    assert [len(part) for part in split_evenly(list(range(8)), 3)] == [3, 3, 2]


def test_a_lone_worker_samples_the_single_process_stream_and_several_draw_their_own() -> None:
    config = tiny()
    assert worker_sampling(training_sampling(config, 3), index=0, num_workers=1) == training_sampling(
        config, 3
    )
    seeds = {
        worker_sampling(training_sampling(config, step), index=i, num_workers=4).seed
        for step in range(5)
        for i in range(4)
    }
    assert len(seeds) == 20
    greedy = evaluation_sampling(config)
    assert worker_sampling(greedy, index=1, num_workers=4) == greedy


def test_nothing_imports_ray_unless_a_run_asks_for_it() -> None:
    code = (
        "import sys\n"
        "import searchgym.cli, searchgym.train.run, searchgym.train.loop\n"
        "import searchgym.train.learner, searchgym.train.distributed.actors\n"
        "import searchgym.train.distributed.placement, searchgym.train.parallel\n"
        "print('ray' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.fixture(scope="module")
def sampled_rollout() -> tuple[TrainConfig, list[QAExample]]:
    config = load_config(TINY, ["rollout.max_new_tokens=6"])
    examples = [example for example in EXAMPLES for _ in range(config.rollout.samples_per_prompt)]
    return config, examples


def test_a_lone_rollout_worker_samples_the_single_process_episodes(
    sampled_rollout: tuple[TrainConfig, list[QAExample]],
) -> None:
    config, examples = sampled_rollout
    worker = RolloutWorker(config, index=0, num_workers=1, retriever=FakeRetriever(), cpus=1)
    policy = load_training_policy(config)
    rollout = SearchRollout(
        policy=policy,
        make_env=vector_envs(config, FakeRetriever(), policy.tokenizer),
        budgets=config.token_budgets,
    )
    request = {"sampling": training_sampling(config, 3), "step": 3, "batch_size": len(examples)}
    rollout.submit(examples, **request)
    alone = rollout.collect()
    assert [t.response_ids for t in worker.run(examples, **request)] == [t.response_ids for t in alone]


def test_two_rollout_workers_sample_distinct_streams(
    sampled_rollout: tuple[TrainConfig, list[QAExample]],
) -> None:
    config, examples = sampled_rollout
    workers = [
        RolloutWorker(config, index=i, num_workers=2, retriever=FakeRetriever(), cpus=1) for i in range(2)
    ]
    request = {"sampling": training_sampling(config, 3), "step": 3, "batch_size": len(examples)}
    first, second = (worker.run(examples, **request) for worker in workers)
    assert [t.response_ids for t in first] != [t.response_ids for t in second]


def test_learner_zero_broadcasts_its_weights_to_the_rollout_workers() -> None:
    """``ray.weight_sync=broadcast`` without a cluster: the two actors' methods, each in its own thread."""
    config = tiny()
    learner = LearnerActor(config, rank=0, cpus=1)
    worker = RolloutWorker(config, index=0, num_workers=1, retriever=FakeRetriever(), cpus=1)
    with torch.no_grad():
        for parameter in learner.learner.models.policy.parameters():
            parameter.add_(0.01)  # the learner has moved on; the worker still holds the initial weights
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    group = {"address": "127.0.0.1", "port": port, "world_size": 2}
    with ThreadPoolExecutor(max_workers=2) as pool:
        joined = [
            pool.submit(learner.join_weight_broadcast, **group),
            pool.submit(worker.join_weight_broadcast, **group),
        ]
        for joining in joined:
            joining.result(timeout=120)
        sent, received = pool.submit(learner.broadcast_weights, None), pool.submit(worker.receive_weights)
        assert sent.result(timeout=120) == received.result(timeout=120) > 0
    assert worker.rollout.policy is not None
    mine = worker.rollout.policy.model.state_dict()
    for name, tensor in learner.learner.policy_state().items():
        assert torch.equal(mine[name], tensor), name
