"""``searchgym train``: a YAML preset plus ``section.key=value`` overrides, then the training run.

Only arguments are declared here. ``--help`` lists every config key with its documentation, read from
the config tree when asked; torch, transformers and the retriever load in the handler.
"""

import argparse
import logging
import sys
from typing import Any, NoReturn

EXAMPLES = """\
examples:
  searchgym train --config configs/demo.yaml
  searchgym train --config configs/search_r1_3b_ppo.yaml model.path=Qwen/Qwen2.5-3B-Instruct
  searchgym train --config configs/tiny.yaml algorithm.name=grpo kl.placement=loss kl.estimator=low_var_kl
  searchgym train --config configs/demo.yaml --print-config
  searchgym train --config configs/demo.yaml ray.enabled=true ray.num_rollout_workers=2 ray.num_learners=2
"""


class _HelpWithConfigKeys(argparse.Action):
    """``-h/--help``: the usual help, then every config key (the config module loads only now)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> NoReturn:
        from searchgym.train.config import config_help

        parser.print_help()
        print("\nconfig keys (set any of them as section.key=value):\n")
        print(config_help())
        parser.exit()


def add_train_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``searchgym train``."""
    parser = subparsers.add_parser(
        "train",
        help="train a search policy with PPO or GRPO",
        description=(
            "Train a policy to search and answer with PPO (critic + GAE) or GRPO, from a YAML preset with "
            "section.key=value overrides. The run folder (logging.run_dir) gets metrics.jsonl, TensorBoard "
            "logs, sample episodes, checkpoints, curves.png and the final model; running the same command "
            "again resumes from the newest checkpoint."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    parser.add_argument(
        "-h", "--help", action=_HelpWithConfigKeys, help="show this help and every config key"
    )
    parser.add_argument("--config", help="YAML preset, e.g. configs/demo.yaml (default: built-in defaults)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.actor_lr=1e-6"
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML and exit without training",
    )
    parser.set_defaults(run=run_train_command)


def run_train_command(args: argparse.Namespace) -> int:
    """Resolve the config, then train (or only print the config)."""
    import yaml

    from searchgym.train.config import load_config

    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="searchgym train: %(message)s", stream=sys.stderr)
    if config.ray.enabled:
        from searchgym.train.distributed.config import require_ray

        require_ray()
    from searchgym.train.run import run_training  # torch, transformers, the retriever (and ray) load here

    result = run_training(config)
    print(f"trained {result.steps} steps; run folder {result.run_dir}")
    for name in ("dev/em", "dev/f1", "rollout/reward"):
        values = [(int(row["step"]), row[name]) for row in result.history if name in row]
        if values:
            (first_step, first), (last_step, last) = values[0], values[-1]
            print(f"  {name}: {first:.4f} at step {first_step} -> {last:.4f} at step {last_step}")
    if result.final_model is not None:
        print(f"  final model: {result.final_model}")
    return 0


def add_export_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``searchgym export``."""
    parser = subparsers.add_parser(
        "export",
        help="write a Hugging Face model folder from a training checkpoint",
        description=(
            "Write the policy of a checkpoint (RUN_DIR/checkpoints/step_N, or a run folder: its newest) as a "
            "Hugging Face model folder that `searchgym eval --model`, from_pretrained and vLLM load. Both "
            "single-process and sharded checkpoints export."
        ),
    )
    parser.add_argument("checkpoint", help="a run folder or one of its checkpoints/step_N folders")
    parser.add_argument("--out", required=True, help="the model folder to write (replaced if it exists)")
    parser.set_defaults(run=run_export_command)


def run_export_command(args: argparse.Namespace) -> int:
    """Export, then print where the model went."""
    from pathlib import Path

    from searchgym.train.export import export_checkpoint  # torch and transformers load here

    target = export_checkpoint(Path(args.checkpoint), Path(args.out))
    print(f"exported {args.checkpoint} to {target}")
    return 0
