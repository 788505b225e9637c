"""Mutation check of the RL core: plant one small, realistic bug at a time; do the fast tests notice?

Each mutation below is a mistake a careful reader of an RL trainer would look for (an outcome reward on the
last padded column, critic values shifted by one, returns from whitened advantages, a flipped sign, a
denominator that counts padding, ...). The script copies the repository's tracked files to a temporary
folder once, then for each mutation edits the copy, runs the fast RL tests there (``-x``: the first failure
kills the mutant) and restores the file. It prints one line per mutation and, at the end, the survivors:
bugs no test caught. It exits 1 when a mutation survives or no longer applies (the code it targets changed:
update the mutation), so ``make test-slow`` fails on either.

Run (about a minute per mutation on a loaded 2-core CPU)::

    .venv/bin/python benchmarks/rl_mutations.py            # every mutation
    .venv/bin/python benchmarks/rl_mutations.py --only critic_values_shifted_by_one --list
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FAST_TESTS = (
    "tests/test_algorithms.py",
    "tests/test_learner.py",
    "tests/test_train_on_policy.py",
    "tests/test_train_config.py",
    "tests/test_train_dynamic_sampling.py",
)


@dataclass(frozen=True, slots=True)
class Mutation:
    """Replace ``old`` (which must occur exactly once in ``path``) with ``new``."""

    name: str
    path: str
    old: str
    new: str


ALGORITHMS, LEARNER, MODELS, CONFIG = (
    "train/algorithms.py",
    "train/learner.py",
    "train/models.py",
    "train/config.py",
)
MUTATIONS = (
    # The mistakes issue 12 lists.
    Mutation(
        "reward_on_last_padded_column",
        ALGORITHMS,
        "    last = last_policy_token_index(mask)\n    has_tokens",
        "    last = torch.full_like(last_policy_token_index(mask), mask.shape[-1] - 1)\n    has_tokens",
    ),
    Mutation(
        "critic_values_shifted_by_one",
        MODELS,
        "values[:, -batch.response_length - 1 : -1]",
        "values[:, -batch.response_length :]",
    ),
    Mutation(
        "critic_position_ids_ignore_left_padding",
        MODELS,
        "batch.sequences.attention_mask, batch.position_ids)",
        "batch.sequences.attention_mask, torch.arange(batch.sequences.input_ids.shape[1]).expand_as("
        "batch.sequences.input_ids))",
    ),
    Mutation(
        "returns_from_whitened_advantages",
        LEARNER,
        "                advantages = algorithms.masked_whiten(advantages, mask)\n"
        "            return advantages, returns",
        "                advantages = algorithms.masked_whiten(advantages, mask)\n"
        "                returns = advantages + values\n            return advantages, returns",
    ),
    Mutation(
        "entropy_bonus_sign_flipped",
        LEARNER,
        "loss = surrogate.loss - algorithm.entropy_coef * entropy_term",
        "loss = surrogate.loss + algorithm.entropy_coef * entropy_term",
    ),
    Mutation(
        "kl_loss_sign_flipped",
        LEARNER,
        "loss = loss + config.kl.coef * kl_term",
        "loss = loss - config.kl.coef * kl_term",
    ),
    Mutation(
        "token_mean_counts_padding",
        LEARNER,
        '    if aggregation == "token-mean":\n        return float(mask.sum())',
        '    if aggregation == "token-mean":\n        return float(mask.numel())',
    ),
    Mutation(
        "seq_mean_counts_empty_rows",
        LEARNER,
        "    return float((mask.sum(dim=-1) > 0).sum())",
        "    return float(mask.shape[0])",
    ),
    Mutation(
        "whitening_includes_missing_reward_rows",
        LEARNER,
        "advantages = algorithms.masked_whiten(advantages, mask)",
        "advantages = algorithms.masked_whiten(advantages, batch.policy_mask)",
    ),
    Mutation(
        "micro_batch_divides_by_its_own_count",
        LEARNER,
        "            denominator=denominator,\n            token_budget=token_budget,\n"
        "        )\n        entropy_term",
        "            denominator=None,\n            token_budget=token_budget,\n"
        "        )\n        entropy_term",
    ),
    # GAE, the surrogate and its clips.
    Mutation(
        "gae_bootstraps_from_observation_tokens",
        ALGORITHMS,
        "next_value = torch.where(is_policy[:, t], values[:, t], next_value)",
        "next_value = values[:, t]",
    ),
    Mutation(
        "ratio_inverted",
        ALGORITHMS,
        "log_ratio = torch.where(is_policy, logprobs - old_logprobs, torch.zeros_like(logprobs))",
        "log_ratio = torch.where(is_policy, old_logprobs - logprobs, torch.zeros_like(logprobs))",
    ),
    Mutation(
        "no_log_ratio_clamp",
        ALGORITHMS,
        "    log_ratio = log_ratio.clamp(-POLICY_LOG_RATIO_CLAMP, POLICY_LOG_RATIO_CLAMP)\n",
        "",
    ),
    Mutation(
        "clip_high_ignored",
        ALGORITHMS,
        "high = clip_eps if clip_eps_high is None else clip_eps_high",
        "high = clip_eps",
    ),
    Mutation(
        "dual_clip_on_positive_advantages",
        ALGORITHMS,
        "torch.where(advantages < 0, torch.minimum(token_losses, bound), token_losses)",
        "torch.minimum(token_losses, bound)",
    ),
    # The estimators.
    Mutation(
        "grpo_population_std",
        ALGORITHMS,
        "centred / (group.std() + eps)",
        "centred / (group.std(unbiased=False) + eps)",
    ),
    Mutation(
        "rloo_baseline_includes_the_sample",
        ALGORITHMS,
        "others_mean = (group.sum() - group) / (len(rows) - 1)",
        "others_mean = group.mean()",
    ),
    Mutation(
        "reinforce_pp_without_batch_normalisation",
        ALGORITHMS,
        "return masked_whiten(discounted_returns(rewards, mask, gamma=gamma), mask)",
        "return discounted_returns(rewards, mask, gamma=gamma)",
    ),
    Mutation(
        "returns_not_discounted",
        ALGORITHMS,
        "rewards[:, t] + gamma * running",
        "rewards[:, t] + running",
    ),
    Mutation(
        "dr_grpo_divides_by_std",
        LEARNER,
        'normalize_std = algorithm.name == "grpo"',
        "normalize_std = True",
    ),
    Mutation(
        "dr_grpo_divides_by_lengths",
        CONFIG,
        '            case "dr_grpo":\n                return "seq-mean-token-sum-norm"',
        '            case "dr_grpo":\n                return "token-mean"',
    ),
    Mutation(
        "rloo_kl_reward_sign_flipped",
        LEARNER,
        "scores = scores - kl_coef * algorithms.masked_row_sum(kl_penalty, mask)",
        "scores = scores + kl_coef * algorithms.masked_row_sum(kl_penalty, mask)",
    ),
    Mutation(
        "kl_reward_sign_flipped",
        ALGORITHMS,
        "-kl_coef * kl_penalty.to(scores.dtype)",
        "kl_coef * kl_penalty.to(scores.dtype)",
    ),
    Mutation(
        "k1_as_loss_allowed",
        CONFIG,
        'self.coef == 0 or self.placement != "loss" or self.estimator != "k1"',
        "True",
    ),
    # DAPO's pieces and the sampler correction.
    Mutation(
        "overlong_penalty_added",
        LEARNER,
        "batch.scores + penalty.to(batch.scores.dtype)",
        "batch.scores - penalty.to(batch.scores.dtype)",
    ),
    Mutation(
        "equal_reward_groups_kept",
        ALGORITHMS,
        "if len(rows) >= 2 and bool((group != group[0]).any()):",
        "if len(rows) >= 2:",
    ),
    Mutation(
        "dynamic_sampling_overfills", "train/dynamic_sampling.py", "    kept = kept[:target_groups]\n", ""
    ),
    Mutation(
        "importance_weight_inverted",
        ALGORITHMS,
        "(old_logprobs.detach() - sampler_logprobs)",
        "(sampler_logprobs - old_logprobs.detach())",
    ),
    Mutation(
        "importance_weight_not_applied",
        ALGORITHMS,
        "token_losses = token_losses * token_weights.detach()",
        "token_losses = token_losses",
    ),
    Mutation(
        "sampler_gap_counts_missing_reward_rows",
        LEARNER,
        "gap = algorithms.sampler_gap(old_logprobs, sampler, mask)",
        "gap = algorithms.sampler_gap(old_logprobs, sampler, batch.policy_mask)",
    ),
    # float32 where the loss reads it, under bf16 autocast.
    Mutation(
        "temperature_divides_bf16_logits",
        "policy/logprobs.py",
        "torch.log_softmax(logits.float() / scale, dim=-1)",
        "torch.log_softmax((logits / scale).float(), dim=-1)",
    ),
    Mutation(
        "value_head_under_autocast",
        MODELS,
        "        with torch.autocast(device_type=hidden.device.type, enabled=False):\n"
        "            return hidden.float() @ self.value_head.weight.float()[0]",
        "        return hidden @ self.value_head.weight[0].to(hidden.dtype)",
    ),
)


def copy_repository(destination: Path) -> None:
    """The tracked files of the repository (symbolic links kept as links) under ``destination``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    for name in filter(None, listed):
        source, target = REPO / name, destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        elif source.is_file():  # a file deleted in the work tree but still tracked is skipped
            shutil.copy2(source, target)


def run_tests(root: Path, tests: tuple[str, ...]) -> bool:
    """Whether the fast tests pass in the copy at ``root``."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=root, env=environment, capture_output=True).returncode == 0


def check(mutation: Mutation, root: Path, tests: tuple[str, ...]) -> str:
    """``killed``, ``SURVIVED`` or ``STALE`` (the code it targets is not there exactly once)."""
    path = root / mutation.path
    original = path.read_text()
    if original.count(mutation.old) != 1:
        return "STALE"
    path.write_text(original.replace(mutation.old, mutation.new))
    try:
        return "SURVIVED" if run_tests(root, tests) else "killed"
    finally:
        path.write_text(original)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="names of the mutations to check (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args()
    selected = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        print("\n".join(f"{m.name}  ({m.path})" for m in selected))
        return 0
    with tempfile.TemporaryDirectory(prefix="searchgym-mutants-") as folder:
        root = Path(folder)
        copy_repository(root)
        if not run_tests(root, FAST_TESTS):
            print("the unmutated copy fails its tests: fix them first", file=sys.stderr)
            return 1
        verdicts = {}
        for mutation in selected:
            start = time.perf_counter()
            verdicts[mutation.name] = check(mutation, root, FAST_TESTS)
            print(
                f"{verdicts[mutation.name]:8s} {mutation.name}  ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    bad = [name for name, verdict in verdicts.items() if verdict != "killed"]
    killed = len(verdicts) - len(bad)
    print(f"\n{killed} of {len(verdicts)} mutations killed; survivors or stale: {bad or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
