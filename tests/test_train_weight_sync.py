"""Weight sync: buckets of bounded size, and the broadcast group between a learner and a rollout worker."""

import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from train_fixtures import tiny_model

from searchgym.train.weight_sync import WeightBroadcast, buckets, copy_in_buckets


def test_buckets_stay_under_their_size_keep_order_and_cast_floats() -> None:
    state = [
        ("a", torch.zeros(10)),
        ("b", torch.zeros(30)),
        ("c", torch.zeros(5)),
        ("step", torch.zeros(2, dtype=torch.long)),
    ]
    grouped = list(buckets(state, max_bytes=80, dtype=torch.bfloat16))
    # bf16: a = 20 bytes, b = 60 bytes (together 80), c = 10 bytes; the integer tensor starts its own bucket.
    assert [[name for name, _ in bucket] for bucket in grouped] == [["a", "b"], ["c"], ["step"]]
    assert grouped[0][0][1].dtype == torch.bfloat16 and grouped[2][0][1].dtype == torch.long
    alone = list(buckets([("big", torch.zeros(100))], max_bytes=8))
    assert [[name for name, _ in bucket] for bucket in alone] == [["big"]]  # too big for a bucket: alone


def test_copy_in_buckets_loads_every_weight_once() -> None:
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    loaded: list[str] = []

    def load(bucket):
        loaded.extend(name for name, _ in bucket)
        target.load_state_dict(dict(bucket), strict=False)

    moved = copy_in_buckets(source.state_dict(), load, bucket_bytes=4096)
    assert sorted(loaded) == sorted(source.state_dict())
    assert moved == sum(t.numel() * t.element_size() for t in source.state_dict().values())
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor)


def _member(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    sync = WeightBroadcast(
        address="127.0.0.1", port=port, rank=rank, world_size=2, device=torch.device("cpu")
    )
    if rank == 0:
        sent = sync.send(tiny_model(seed=1).state_dict(), bucket_bytes=4096, dtype=torch.bfloat16)
        torch.save(sent, Path(folder) / "sent.pt")
        return
    model = tiny_model(seed=2).to(torch.bfloat16)
    received = sync.receive(lambda bucket: model.load_state_dict(dict(bucket), strict=False))
    torch.save((received, model.state_dict()), Path(folder) / "received.pt")


def test_a_broadcast_group_delivers_the_learners_weights_in_bf16(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(_member, args=(port, str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    sent = torch.load(tmp_path / "sent.pt")
    received, state = torch.load(tmp_path / "received.pt")
    expected = tiny_model(seed=1).state_dict()
    assert sent == received == sum(t.numel() * 2 for t in expected.values())  # every weight, 2 bytes each
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor.to(torch.bfloat16)), name
