"""Padding share of the learner's micro-batches: fixed count against token budget.

Fixed count: every row padded to the batch's longest prompt and response (the learner today); token budget:
:func:`searchgym.train.micro_batches.plan_micro_batches`.

The lengths are synthetic, shaped like Search-R1 episodes (a 150-300 token prompt; 1 to 4 turns of 30-200
policy tokens, each search turn followed by a 3 x 100-170 token observation; context capped at 4,096):

    python benchmarks/micro_batch_padding.py [--episodes 512] [--budget 16384]
"""

import argparse
import random

from searchgym.train.micro_batches import (
    EpisodeLength,
    fixed_count_padding_share,
    padding_share,
    plan_micro_batches,
)


def synthetic_lengths(count: int, seed: int) -> list[EpisodeLength]:
    """Search-agent-like episodes: most answer after one or two searches, a few use every turn."""
    rng = random.Random(seed)
    lengths = []
    for _ in range(count):
        prompt = rng.randint(150, 300)
        turns = rng.choices([1, 2, 3, 4], weights=[0.35, 0.35, 0.2, 0.1])[0]
        response = sum(rng.randint(30, 200) for _ in range(turns))
        response += sum(3 * rng.randint(100, 170) for _ in range(turns - 1))
        lengths.append(EpisodeLength(prompt, min(response, 4096 - prompt)))
    return lengths


def main() -> None:
    """Print the padding share of both layouts and the number of micro-batches of the budget plan."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=512)
    parser.add_argument("--budget", type=int, default=16384, help="padded tokens per micro-batch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lengths = synthetic_lengths(args.episodes, args.seed)
    groups = plan_micro_batches(lengths, max_tokens=args.budget)
    real = sum(e.prompt + e.response for e in lengths)
    print(f"{args.episodes} synthetic episodes, {real:,} real tokens, mean {real / len(lengths):.0f}")
    print(
        f"fixed count, padded to the batch's longest: {100 * fixed_count_padding_share(lengths):.1f}% padding"
    )
    print(
        f"token budget {args.budget:,}: {100 * padding_share(lengths, groups):.1f}% padding in {len(groups)} "
        f"micro-batches of {min(map(len, groups))}-{max(map(len, groups))} episodes"
    )


if __name__ == "__main__":
    main()
