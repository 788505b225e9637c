"""Sharded learners (FSDP2) on two gloo ranks: the same update as one process, half the bytes each."""

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor
from train_fixtures import TargetTokenRollout, learner_config, tiny_model, tiny_tokenizer, toy_examples

from searchgym.policy.trajectory import Trajectory
from searchgym.train.batch import collate
from searchgym.train.learner import build_optimizers, make_experience, update
from searchgym.train.models import build_train_models, transformer_blocks
from searchgym.train.sharding import (
    ShardedDataParallel,
    ShardingError,
    ShardingOptions,
    full_state_dict,
    learner_mesh,
    load_sharded,
    local_bytes,
    optimizer_state_tensors,
    resolve_strategy,
    save_sharded,
    shard_model,
    shard_models,
)

WORLD_SIZE = 2


@pytest.fixture(scope="module")
def trajectories() -> list[Trajectory]:
    torch.manual_seed(1)
    return TargetTokenRollout()(tiny_model(), tiny_tokenizer(), toy_examples(8), step=0)


def one_update(
    trajectories: list[Trajectory], *, sharding: ShardingOptions | None, checkpoint: Path | None = None
) -> dict:
    """Build the tiny PPO models, optionally shard them, run one learner update; what it left behind."""
    config = learner_config("optim.weight_decay=0.1")
    torch.manual_seed(0)
    models = build_train_models(tiny_model(), with_reference=True, with_critic=True)
    data_parallel = None
    if sharding is not None:
        shard_models(models, learner_mesh(torch.device("cpu")), options=sharding)
        data_parallel = ShardedDataParallel(device=torch.device("cpu"))
    optimizers = build_optimizers(models, config)
    parallel = {} if data_parallel is None else {"data_parallel": data_parallel}
    experience = make_experience(
        models, collate(trajectories, pad_token_id=0, device="cpu"), config, **parallel
    )
    stats = update(models, optimizers, experience, config, **parallel)
    assert models.critic is not None and optimizers.critic is not None
    if checkpoint is not None:
        save_sharded(
            checkpoint, models=models, optimizers={"policy": optimizers.actor, "critic": optimizers.critic}
        )
    return {
        "policy": full_state_dict(models.policy),
        "critic": full_state_dict(models.critic),
        "metrics": stats.to_metrics(),
        "advantages": experience.advantages,
        "moments": [full_tensor(state["exp_avg"]) for state in optimizers.actor.state.values()],
        "parameter_bytes": local_bytes([*models.policy.parameters(), *models.critic.parameters()]),
        "optimizer_bytes": local_bytes(
            optimizer_state_tensors(optimizers.actor) + optimizer_state_tensors(optimizers.critic)
        ),
    }


def sharded_worker(rank: int, port: int, trajectories: list[Trajectory], offload: bool, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        checkpoint = Path(out) / "step_00000001"
        result = one_update(trajectories, sharding=ShardingOptions(offload=offload), checkpoint=checkpoint)
        result["resumed"] = resumed_state(checkpoint, offload=offload)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def resumed_state(checkpoint: Path, *, offload: bool) -> dict:
    """Fresh sharded models and optimizers with the checkpoint loaded: their full weights and Adam moments."""
    config = learner_config("optim.weight_decay=0.1")
    models = build_train_models(tiny_model(seed=5), with_reference=True, with_critic=True)
    shard_models(models, learner_mesh(torch.device("cpu")), options=ShardingOptions(offload=offload))
    optimizers = build_optimizers(models, config)
    assert models.critic is not None and optimizers.critic is not None
    load_sharded(
        checkpoint, models=models, optimizers={"policy": optimizers.actor, "critic": optimizers.critic}
    )
    moments = [state["exp_avg"].full_tensor() for state in optimizers.actor.state.values()]
    return {
        "policy": full_state_dict(models.policy),
        "critic": full_state_dict(models.critic),
        "moments": moments,
    }


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def single_process(trajectories: list[Trajectory]) -> dict:
    return one_update(trajectories, sharding=None)


def spawn_sharded_update(trajectories: list[Trajectory], *, offload: bool, out: Path) -> list[dict]:
    """What each of two gloo ranks left behind after one sharded update."""
    mp.spawn(sharded_worker, args=(free_port(), trajectories, offload, str(out)), nprocs=WORLD_SIZE)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def assert_same_update(ranks: list[dict], single_process: dict) -> None:
    for result in ranks:
        torch.testing.assert_close(result["advantages"], single_process["advantages"], atol=1e-5, rtol=1e-5)
        for model in ("policy", "critic"):
            for name, expected in single_process[model].items():
                torch.testing.assert_close(result[model][name], expected, atol=1e-5, rtol=1e-5, msg=name)
        assert result["metrics"].keys() == single_process["metrics"].keys()
        for name, expected in single_process["metrics"].items():
            assert result["metrics"][name] == pytest.approx(expected, rel=1e-5, abs=1e-5), name
    initial = tiny_model().state_dict()
    assert any(not torch.equal(initial[name], value) for name, value in single_process["policy"].items())
    assert single_process["metrics"]["actor/optimizer_steps"] == 1


# Two spawned ranks import torch and transformers and run an update each: about 25 s of CPU, 100 s on the
# shared 2-core box.
@pytest.mark.slow
def test_two_sharded_learners_take_the_single_process_step_with_half_the_bytes_each(
    trajectories: list[Trajectory], single_process: dict, tmp_path: Path
) -> None:
    ranks = spawn_sharded_update(trajectories, offload=False, out=tmp_path)
    assert_same_update(ranks, single_process)
    for result in ranks:
        # A sharded checkpoint restores the exact weights (and Adam moments, non-zero after one step).
        for model in ("policy", "critic"):
            for name, value in result[model].items():
                assert torch.equal(result["resumed"][model][name], value), name
        assert len(result["resumed"]["moments"]) == len(result["moments"]) > 0
        for resumed, saved in zip(result["resumed"]["moments"], result["moments"], strict=True):
            assert torch.equal(resumed, saved)
    for kind in ("parameter_bytes", "optimizer_bytes"):
        whole = single_process[kind]
        shares = [result[kind] for result in ranks]
        # Dim-0 shards: a tensor whose first dimension is odd leaves rank 0 one row more; AdamW's step
        # counters (one 4-byte scalar a parameter) are replicated, not sharded.
        assert all(0.45 * whole <= share <= 0.55 * whole for share in shares), (kind, whole, shares)
        assert sum(shares) >= whole


@pytest.mark.slow
def test_offloaded_sharded_learners_take_the_single_process_step(
    trajectories: list[Trajectory], single_process: dict, tmp_path: Path
) -> None:
    assert_same_update(spawn_sharded_update(trajectories, offload=True, out=tmp_path), single_process)


def test_strategy_auto_shards_several_cuda_learners_or_an_offloading_one() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_strategy("auto", cuda, learners=2) == "shard"
    assert resolve_strategy("auto", cuda, learners=1) == "replicate"
    assert resolve_strategy("auto", cuda, offload=True) == "shard"
    assert resolve_strategy("auto", cpu, learners=2) == "replicate"
    assert resolve_strategy("auto", cuda, learners=2, lora=True) == "replicate"
    assert resolve_strategy("shard", cpu) == "shard"
    assert resolve_strategy("replicate", cuda, learners=8) == "replicate"


def test_blocks_are_the_decoder_layers_of_policy_and_critic() -> None:
    models = build_train_models(tiny_model(), with_reference=False, with_critic=True)
    assert [type(block).__name__ for block in transformer_blocks(models.policy)] == ["LlamaDecoderLayer"] * 2
    assert models.critic is not None and len(transformer_blocks(models.critic)) == 2
    assert transformer_blocks(torch.nn.Linear(2, 2)) == []


def test_a_model_without_blocks_cannot_be_sharded() -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        mesh = learner_mesh(torch.device("cpu"))
        with pytest.raises(ShardingError, match=r"learner\.strategy=replicate"):
            shard_model(torch.nn.Linear(2, 2), mesh, options=ShardingOptions())
    finally:
        dist.destroy_process_group()


def test_the_learner_section_defaults_to_auto_and_checks_offload() -> None:
    from searchgym.paths import CONFIGS_DIR
    from searchgym.train.config import load_config
    from searchgym.train.config_io import ConfigError

    config = load_config(CONFIGS_DIR / "tiny.yaml")
    assert (config.learner.strategy, config.learner.offload) == ("auto", False)
    assert load_config(
        CONFIGS_DIR / "tiny.yaml", ["learner.strategy=shard", "learner.offload=true"]
    ).learner.offload
    with pytest.raises(ConfigError, match=r"set learner\.strategy=shard"):
        load_config(CONFIGS_DIR / "tiny.yaml", ["learner.strategy=replicate", "learner.offload=true"])
