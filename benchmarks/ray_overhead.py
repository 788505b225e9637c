"""Step time of one training run in one process and on a local Ray cluster: what the actors cost.

Three runs of the same config (no dev evaluation, a checkpoint only at the end, no export):

- ``single``: ``searchgym train`` in this process (``run_training``);
- ``ray 1/1/1``: one learner, one rollout worker and one retrieval replica as Ray actors. The same work
  as ``single``, plus the transfers: episodes to the learner, weights back to the worker, and searches
  through the replica. Its episodes are the single-process run's (the same sampling seed);
- ``ray 2/2/2``: two of each (two data-parallel learners over gloo); on two cores it can only show the
  cost of the extra processes and collectives, not a speed-up.

Each run's step time is the sum of its phases as ``metrics.jsonl`` records them; the first step (warm-up)
is left out of the means. ``startup`` is the wall time before the first step: loading (and for Ray, the
cluster and its actors). What Ray adds to a step, measured directly rather than as a difference of two
runs (on a shared machine those differ by more than the overhead):

- ``dispatch``: the driver's rollout time minus the slowest worker's own (calls, episodes back);
- ``transfer``: the driver's learn time minus the learner's experience and update (episodes to the
  learners through the object store, results back);
- ``weight_sync``: learner 0's weights through the object store into every rollout worker.

    .venv/bin/python benchmarks/ray_overhead.py [--config configs/tiny.yaml] [--steps 6] [override ...]
"""

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from searchgym.train.config import TrainConfig, load_config
from searchgym.train.run import run_training
from searchgym.train.tracking import read_metrics

PHASES = ("time/rollout", "time/learn", "time/weight_sync")
MODES = {"single": None, "ray 1/1/1": 1, "ray 2/2/2": 2}


def mode_config(base: TrainConfig, run_dir: Path, parts: int | None) -> TrainConfig:
    ray = dataclasses.replace(base.ray, enabled=False)
    if parts is not None:
        ray = dataclasses.replace(
            base.ray,
            enabled=True,
            address="local",
            num_learners=parts,
            num_rollout_workers=parts,
            num_retriever_replicas=parts,
        )
    logging = dataclasses.replace(
        base.logging,
        run_dir=str(run_dir),
        tensorboard=False,
        plots=False,
        progress_bar=False,
        samples_every=0,
    )
    checkpoint = dataclasses.replace(base.checkpoint, every=0, export_final=False, resume=False)
    dev = dataclasses.replace(base.dev, before_training=False, every=0)
    return dataclasses.replace(base, ray=ray, logging=logging, checkpoint=checkpoint, dev=dev)


def measure(config: TrainConfig) -> dict[str, float]:
    """Run ``config``; its startup, mean step time after the first, and mean phase times."""
    phases = PHASES
    started = time.perf_counter()
    result = run_training(config)
    wall = time.perf_counter() - started
    rows = [row for row in read_metrics(result.run_dir / "metrics.jsonl") if row["step"] >= 1]
    step_times = [sum(row[name] for name in phases) for row in rows]
    figures = {
        "startup_s": wall - sum(step_times),
        "step_s": statistics.mean(step_times[1:] or step_times),
    }
    measured = rows[1:] or rows
    for name in (*phases, "time/experience", "time/update", "time/rollout_slowest_batch"):
        if name in measured[0]:
            figures[name] = statistics.mean(row[name] for row in measured)
    if config.ray.enabled:
        figures["dispatch"] = figures["time/rollout"] - figures["time/rollout_slowest_batch"]
        figures["transfer"] = figures["time/learn"] - figures["time/experience"] - figures["time/update"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of the modes")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. batch.prompts_per_step=8")
    args = parser.parse_args()
    base = load_config(args.config, [f"total_steps={args.steps}", *args.overrides])
    if base.system.torch_threads is not None:
        torch.set_num_threads(base.system.torch_threads)
    print(f"{args.config}, {args.steps} steps of {base.trajectories_per_step} episodes; mean of steps 2..")
    columns = (
        "startup_s",
        "step_s",
        "time/rollout",
        "time/experience",
        "time/update",
        "dispatch",
        "transfer",
        "time/weight_sync",
    )
    print(f"{'mode':<10} " + " ".join(f"{name.removeprefix('time/'):>12}" for name in columns))
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory(prefix="ray_overhead-") as folder:
            figures = measure(mode_config(base, Path(folder), MODES[mode]))
        cells = [f"{figures[name]:>12.2f}" if name in figures else f"{'-':>12}" for name in columns]
        print(f"{mode:<10} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
