"""Every setting of a training run: one typed dataclass tree, documented field by field.

The string under each field is its documentation; ``searchgym train --help`` prints it. Presets live in
``configs/*.yaml`` and any leaf can be overridden on the command line as ``section.key=value``.
Each section checks its own values; :class:`TrainConfig` checks how sections fit together.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from searchgym.env.config import EnvConfig
from searchgym.policy.budgets import RolloutMode, TokenBudgets
from searchgym.train import config_io
from searchgym.train.algorithms import KLEstimator, LossAggregation
from searchgym.train.config_io import ConfigError
from searchgym.train.distributed.config import RayConfig

AlgorithmName = Literal["ppo", "grpo", "rloo", "reinforce_pp", "dr_grpo"]
GROUP_ESTIMATORS: tuple[AlgorithmName, ...] = ("grpo", "rloo", "dr_grpo")
"""Estimators whose baseline is the other samples of the same prompt."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _require_positive(section: str, **values: float) -> None:
    for name, value in values.items():
        _require(value > 0, f"{section}.{name} must be > 0, got {value}")


LORA_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """LoRA adapters (peft, the ``lora`` extra) instead of training every weight; see searchgym.train.lora."""

    rank: int = 0
    """The adapters' rank r; 0 trains every weight (no adapters)."""
    alpha: int = 16
    """Scale numerator: the adapted weight is W + alpha / rank * B @ A."""
    targets: tuple[str, ...] = LORA_LLAMA_TARGETS
    """Linear layers to adapt (names or name suffixes), or [all-linear] for every linear layer but the
    LM head. The default names the attention and MLP projections of Llama, Qwen and SmolLM2."""
    dropout: float = 0.0
    """Dropout on the adapters' input during the update."""
    critic: bool = False
    """Adapters on the critic's body too (PPO); its value head is always trained in full."""

    def __post_init__(self) -> None:
        _require(self.rank >= 0, f"model.lora.rank must be >= 0 (0 turns LoRA off), got {self.rank}")
        _require(self.alpha > 0, f"model.lora.alpha must be > 0, got {self.alpha}")
        _require(0 <= self.dropout < 1, f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        _require(bool(self.targets), "model.lora.targets is empty: name layers, e.g. [q_proj, v_proj]")

    @property
    def enabled(self) -> bool:
        """Whether the policy trains adapters instead of its weights."""
        return self.rank > 0


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The policy being trained; the critic (PPO) is the same base model with a fresh value head."""

    path: str = "smollm2-135m-instruct"
    """The policy: a local Hugging Face model directory, a hub id this machine can reach, or
    `smollm2-135m-instruct` for the embedded SmolLM2-135M-Instruct."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters instead of full fine-tuning (rank 0: off)."""


@dataclass(frozen=True, kw_only=True)
class SystemConfig:
    """Where and how the tensors are computed."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` picks cuda when a GPU is visible, else cpu."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of forward and backward passes; weights and optimizer states stay float32."""
    seed: int = 0
    """Seeds python, numpy and torch; with the same seed a CPU run repeats exactly."""
    torch_threads: int | None = None
    """torch intra-op threads; null keeps torch's default. On a shared CPU, 1 is often fastest."""

    def __post_init__(self) -> None:
        _require(
            self.torch_threads is None or self.torch_threads >= 1,
            f"system.torch_threads must be >= 1 or null, got {self.torch_threads}",
        )


@dataclass(frozen=True, kw_only=True)
class LearnerConfig:
    """How the learners hold the trained models (see `docs/scaling.md` for which to pick)."""

    strategy: Literal["auto", "replicate", "shard"] = "auto"
    """`replicate`: every learner holds whole fp32 models and optimizer states, gradients all-reduced;
    `shard`: FSDP2 splits parameters, gradients and optimizer states over the learners (bf16 compute with
    fp32 gradient reduction when system.dtype=bfloat16); `auto`: shard several CUDA learners or an
    offloading one, replicate otherwise (one rank of shards holds as much and runs slower)."""
    offload: bool = False
    """With `shard`: keep parameter shards, gradients and optimizer states in CPU memory between uses (the
    optimizer steps on the CPU); what lets 3B GRPO train on one 80 GB GPU."""

    def __post_init__(self) -> None:
        _require(
            not self.offload or self.strategy != "replicate",
            "learner.offload moves FSDP shards to the CPU: set learner.strategy=shard (or auto on a GPU), "
            "or learner.offload=false",
        )


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The questions to train and evaluate on (FlashRAG jsonl: id, question, golden_answers)."""

    train: str = "wiki-mini-train"
    """Training questions: a bundled dataset name (`wiki-mini-train`, `nq`, ...) or a jsonl/parquet path."""
    dev: str = "wiki-mini-dev"
    """Dev questions for the EM evaluation during training: a dataset name or a path."""
    train_limit: int | None = None
    """Use only the first this many training questions; null uses all."""
    dev_limit: int | None = None
    """Evaluate on only the first this many dev questions; null uses all."""
    shuffle: bool = True
    """Visit the training questions in a new seeded order every epoch."""

    def __post_init__(self) -> None:
        for name in ("train_limit", "dev_limit"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"data.{name} must be >= 1 or null, got {value}")


@dataclass(frozen=True, kw_only=True)
class RetrieverConfig:
    """The search engine the environment calls."""

    index: str | None = None
    """A local index folder built by `searchgym index`; null (and no `url`): BM25 over bundled wiki-mini."""
    url: str | None = None
    """A running `searchgym serve`, or any Search-R1 compatible /retrieve endpoint."""

    def __post_init__(self) -> None:
        _require(
            self.index is None or self.url is None,
            "give either retriever.index or retriever.url, not both (set the other to null)",
        )


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """How the policy generates episodes."""

    backend: Literal["hf", "vllm"] = "hf"
    """Generation engine: `hf` (transformers, CPU or GPU) or `vllm` (GPU, weights synced every step)."""
    samples_per_prompt: int = 1
    """Episodes sampled per question (GRPO's group size; Search-R1 uses 5)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs in the update are computed at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_new_tokens: int = 500
    """Tokens the policy may generate per turn."""
    max_prompt_tokens: int = 1024
    """The longest prompt (chat template included); a longer one is an error, never truncated."""
    max_context_tokens: int = 4096
    """Prompt and response together; an episode with no room left for a turn ends truncated."""
    vllm_gpu_memory_utilization: float = 0.6
    """Share of GPU memory vLLM may take (the rest holds the trained models)."""
    mode: RolloutMode = "lockstep"
    """`lockstep`: each turn generates for every running episode, then searches for all; `async`: each
    episode goes on as soon as its own search returns, and a free sub-env takes the next question at once."""
    search_wait_s: float = 0.005
    """`async`: how long a search waits for searches of other episodes to share its retriever call."""
    max_staleness: int = 0
    """0: on-policy, each step generates with the latest weights. k > 0: the next k steps' episodes are
    generated with the current weights while the learner updates (old log-probs: the sampler's); a step
    that checkpoints or evaluates drains the pipeline first."""

    def __post_init__(self) -> None:
        _require_positive("rollout", temperature=self.temperature, max_new_tokens=self.max_new_tokens)
        _require(
            0 < self.max_prompt_tokens < self.max_context_tokens,
            f"rollout.max_prompt_tokens ({self.max_prompt_tokens}) must be positive and below "
            f"rollout.max_context_tokens ({self.max_context_tokens})",
        )
        _require(self.samples_per_prompt >= 1, "rollout.samples_per_prompt must be >= 1")
        _require(self.max_staleness >= 0, f"rollout.max_staleness must be >= 0, got {self.max_staleness}")
        _require(self.search_wait_s >= 0, f"rollout.search_wait_s must be >= 0, got {self.search_wait_s}")
        _require(0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.top_p}")
        _require(
            0 < self.vllm_gpu_memory_utilization < 1,
            f"rollout.vllm_gpu_memory_utilization must be in (0, 1), got {self.vllm_gpu_memory_utilization}",
        )


@dataclass(frozen=True, kw_only=True)
class AlgorithmConfig:
    """The policy-gradient estimator, its loss, and DAPO's options (usable with every estimator).

    See the estimator table in docs/train.md for what each name does and where it comes from.
    """

    name: AlgorithmName = "ppo"
    """`ppo`: critic + GAE; `grpo`: group-normalised scores (mean and std); `dr_grpo`: group mean only, and a
    constant loss denominator; `rloo`: leave-one-out group mean; `reinforce_pp`: token-level returns
    normalised over the whole batch (REINFORCE++). Every estimator but `ppo` trains no critic."""
    gamma: float = 1.0
    """Discount per policy token in GAE and REINFORCE++ returns (observation tokens do not count)."""
    lam: float = 1.0
    """GAE lambda: 1 is the Monte-Carlo return, lower trades variance for critic bias."""
    clip_eps: float = 0.2
    """PPO clip range of the probability ratio (below 1, and above 1 unless `clip_eps_high` is set)."""
    clip_eps_high: float | None = None
    """Clip range above 1 (DAPO's clip-higher, e.g. 0.28); null: the same as `clip_eps`."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1: on negative advantages a token's loss is at most -c x advantage; null: no
    dual clip."""
    value_clip: float = 0.5
    """How far a value prediction may move from its rollout-time value before its loss is clipped."""
    entropy_coef: float = 0.001
    """Weight of the entropy bonus (subtracted from the policy loss); 0 turns it off."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    skip_zero_advantage: bool = True
    """Leave out of the actor's forward and backward passes the episodes whose advantage is 0 on every token
    (GRPO groups that all scored alike) when nothing else in the loss reads them (`entropy_coef` 0, no KL
    loss): their gradient is exactly 0, and their tokens still count in the loss denominator, so the step
    is the same, minus their cost. The actor's entropy, clip fraction and sampler-gap metrics then cover
    the episodes that ran."""
    whiten_advantages: bool = True
    """PPO: normalise advantages to zero mean and unit variance over the batch's policy tokens."""
    loss_aggregation: LossAggregation | None = None
    """`token-mean`: every policy token weighs the same; `seq-mean`: every episode weighs the same;
    `seq-mean-token-sum-norm`: token sums over a constant (the policy-token limit), averaged over episodes.
    null: the estimator's own, `seq-mean-token-sum-norm` for dr_grpo and `token-mean` for the others."""
    truncated_is_cap: float | None = None
    """Weight each token's policy loss by min(trainer / sampler probability, cap), correcting for a sampler
    that differs from the trainer (Yao et al. 2025 use 2); needs the sampler's log-probs. null: off."""
    dynamic_sampling: bool = False
    """DAPO: drop the groups whose rewards are all equal and sample more prompts until the batch is full."""
    dynamic_sampling_max_draws: int = 4
    """Rollout batches drawn at most per step with dynamic sampling; then the step trains on what it has."""
    overlong_buffer_tokens: int = 0
    """DAPO's overlong shaping: a reward penalty that grows linearly over the last this many policy tokens
    before the limit (`env.max_turns` x `rollout.max_new_tokens`); 0 turns it off."""
    overlong_penalty: float = 1.0
    """The overlong penalty at and beyond the limit."""

    def __post_init__(self) -> None:
        _require(0 <= self.gamma <= 1, f"algorithm.gamma must be in [0, 1], got {self.gamma}")
        _require(0 <= self.lam <= 1, f"algorithm.lam must be in [0, 1], got {self.lam}")
        _require_positive("algorithm", clip_eps=self.clip_eps, value_clip=self.value_clip)
        _require(
            self.clip_eps_high is None or self.clip_eps_high > 0,
            f"algorithm.clip_eps_high must be > 0 or null, got {self.clip_eps_high}",
        )
        _require(
            self.dual_clip is None or self.dual_clip > 1,
            f"algorithm.dual_clip must be > 1 (it bounds the loss at c x |advantage|) or null, got "
            f"{self.dual_clip}",
        )
        _require(self.entropy_coef >= 0, f"algorithm.entropy_coef must be >= 0, got {self.entropy_coef}")
        _require(self.ppo_epochs >= 1, f"algorithm.ppo_epochs must be >= 1, got {self.ppo_epochs}")
        _require(
            self.name != "dr_grpo" or self.loss_aggregation in (None, "seq-mean-token-sum-norm"),
            "dr_grpo divides by a constant, not by lengths: set algorithm.loss_aggregation=null (or "
            "seq-mean-token-sum-norm), or use algorithm.name=grpo",
        )
        _require(
            self.truncated_is_cap is None or self.truncated_is_cap >= 1,
            f"algorithm.truncated_is_cap must be >= 1 or null, got {self.truncated_is_cap}",
        )
        _require(
            self.dynamic_sampling_max_draws >= 1,
            f"algorithm.dynamic_sampling_max_draws must be >= 1, got {self.dynamic_sampling_max_draws}",
        )
        _require(
            self.overlong_buffer_tokens >= 0,
            f"algorithm.overlong_buffer_tokens must be >= 0, got {self.overlong_buffer_tokens}",
        )
        penalty = self.overlong_penalty
        _require(penalty >= 0, f"algorithm.overlong_penalty must be >= 0, got {penalty}")

    @property
    def aggregation(self) -> LossAggregation:
        """The loss aggregation in force: `loss_aggregation`, or the estimator's own when that is null."""
        if self.loss_aggregation is not None:
            return self.loss_aggregation
        match self.name:
            case "dr_grpo":
                return "seq-mean-token-sum-norm"
            case "ppo" | "grpo" | "rloo" | "reinforce_pp":
                return "token-mean"


@dataclass(frozen=True, kw_only=True)
class KLConfig:
    """The pull towards the frozen reference (initial) policy."""

    coef: float = 0.001
    """KL coefficient; 0 drops the reference model altogether (no memory, no forward pass)."""
    estimator: KLEstimator = "k1"
    """Per-token estimator: `k1` (log-ratio), `k3` (Schulman's, >= 0) or `low_var_kl` (bounded k3).
    k1 is for `placement=reward` only: as a loss its expected gradient is zero."""
    placement: Literal["reward", "loss"] = "reward"
    """`reward`: subtract coef x KL from the rewards (ppo and reinforce_pp per token, rloo summed over the
    episode); `loss`: add coef x KL to the policy loss (grpo and dr_grpo, with low_var_kl as in Search-R1)."""

    def __post_init__(self) -> None:
        _require(self.coef >= 0, f"kl.coef must be >= 0, got {self.coef}")
        # The gradient of E[log pi - log ref] under samples of pi is E[grad log pi] = 0 (score-function
        # identity): k1 added to the loss pulls nowhere, whatever its coefficient.
        _require(
            self.coef == 0 or self.placement != "loss" or self.estimator != "k1",
            "kl.estimator=k1 as a loss term has zero expected gradient, so the KL would do nothing: set "
            "kl.estimator=low_var_kl (or k3), or kl.placement=reward",
        )


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW and learning-rate schedules of the actor and the critic."""

    actor_lr: float = 1e-6
    """Peak learning rate of the policy."""
    critic_lr: float = 1e-5
    """Peak learning rate of the critic (PPO)."""
    actor_warmup_ratio: float = 0.0
    """Share of the training steps over which the actor's rate rises linearly from 0."""
    critic_warmup_ratio: float = 0.0
    """Share of the training steps over which the critic's rate rises linearly from 0."""
    schedule: Literal["constant", "cosine"] = "constant"
    """After warm-up: keep the peak rate, or decay it along a cosine to `min_lr_ratio` x peak."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine schedule as a share of the peak rate."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW moment coefficients."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm of each model to this."""

    def __post_init__(self) -> None:
        _require_positive("optim", actor_lr=self.actor_lr, critic_lr=self.critic_lr)
        _require_positive("optim", max_grad_norm=self.max_grad_norm)
        for name in ("actor_warmup_ratio", "critic_warmup_ratio", "min_lr_ratio"):
            value = getattr(self, name)
            _require(0 <= value <= 1, f"optim.{name} must be in [0, 1], got {value}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(
            all(0 <= beta < 1 for beta in self.betas), f"optim.betas must lie in [0, 1), got {self.betas}"
        )


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    """How many episodes feed one training step and how they are split for the update."""

    prompts_per_step: int = 512
    """Questions rolled out per training step (Search-R1's train_batch_size)."""
    mini_batch_prompts: int = 256
    """Questions (with all their samples) per optimizer step; prompts_per_step must be a multiple of it."""
    micro_batch_size: int = 64
    """Episodes per forward/backward pass; gradients accumulate over a mini-batch's micro-batches."""
    micro_batch_tokens: int | None = None
    """When set, the update's micro-batches are filled up to this many padded tokens instead (episodes
    sorted by length, each micro-batch trimmed to its own widths; see train/micro_batches.py): the same
    loss with far less padding when episode lengths vary. null: micro_batch_size episodes a pass."""

    def __post_init__(self) -> None:
        for name in ("prompts_per_step", "mini_batch_prompts", "micro_batch_size"):
            _require(getattr(self, name) >= 1, f"batch.{name} must be >= 1, got {getattr(self, name)}")
        _require(
            self.micro_batch_tokens is None or self.micro_batch_tokens >= 1,
            f"batch.micro_batch_tokens must be >= 1 or null, got {self.micro_batch_tokens}",
        )
        _require(
            self.prompts_per_step % self.mini_batch_prompts == 0,
            f"batch.prompts_per_step ({self.prompts_per_step}) must be a multiple of "
            f"batch.mini_batch_prompts ({self.mini_batch_prompts})",
        )


@dataclass(frozen=True, kw_only=True)
class WarmStartConfig:
    """An optional supervised warm-start before RL, on protocol traces of training questions.

    Each trace is a real episode: `<search> question </search>`, the retrieved passages, `<answer> gold
    </answer>`; the loss covers the policy tokens only. It gives a model that never answers in the protocol
    a non-zero reward to start from; the paper presets leave it off.
    """

    examples: int = 0
    """Training questions turned into traces (the first ones of data.train); 0 turns the warm-start off."""
    epochs: int = 1
    """Passes over the traces."""
    lr: float = 1e-5
    """AdamW learning rate (constant)."""
    batch_size: int = 8
    """Traces per optimizer step."""

    def __post_init__(self) -> None:
        _require(self.examples >= 0, f"warmstart.examples must be >= 0, got {self.examples}")
        _require(self.epochs >= 1, f"warmstart.epochs must be >= 1, got {self.epochs}")
        _require(self.batch_size >= 1, f"warmstart.batch_size must be >= 1, got {self.batch_size}")
        _require_positive("warmstart", lr=self.lr)


@dataclass(frozen=True, kw_only=True)
class DevConfig:
    """The dev-set evaluation during training (greedy decoding, exact match)."""

    every: int = 50
    """Evaluate every this many steps (and after the last); 0 never evaluates during training."""
    before_training: bool = True
    """Also evaluate the untrained policy, so the curve starts at step 0."""
    batch_size: int = 64
    """Dev questions decoded together."""

    def __post_init__(self) -> None:
        _require(self.every >= 0, f"dev.every must be >= 0, got {self.every}")
        _require(self.batch_size >= 1, f"dev.batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Saving and resuming."""

    every: int = 100
    """Save every this many steps (and after the last); 0 saves only at the end."""
    keep_last: int = 2
    """Checkpoints kept on disk (the newest ones; the last healthy one is kept as well)."""
    resume: bool = True
    """Continue from the newest checkpoint in the run directory when there is one."""
    export_final: bool = True
    """Write the final policy as a plain Hugging Face model directory (`<run_dir>/final`)."""

    def __post_init__(self) -> None:
        _require(self.every >= 0, f"checkpoint.every must be >= 0, got {self.every}")
        _require(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """Where the run writes and what it shows."""

    run_dir: str = "runs/searchgym"
    """Folder of this run: metrics.jsonl, TensorBoard events, samples, plots, checkpoints, final model."""
    tensorboard: bool = True
    """Write TensorBoard event files beside metrics.jsonl."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs `pip install searchgym[wandb]`)."""
    progress_bar: bool = True
    """Show a console progress bar with reward, EM, response length and searches."""
    samples_every: int = 10
    """Write sample episodes as text every this many steps; 0 never."""
    num_samples: int = 2
    """Episodes written each time."""
    episodes_per_step: int = 16
    """Episodes of every step saved with their tokens, loss mask and log-probs in samples/episodes.jsonl
    (what `searchgym view` shows); the first ones of the batch, whole GRPO groups; 0 none."""
    plots: bool = True
    """Draw PNG curves of reward, dev EM, length, searches, entropy and KL at the end."""

    def __post_init__(self) -> None:
        _require(self.samples_every >= 0, f"logging.samples_every must be >= 0, got {self.samples_every}")
        _require(self.num_samples >= 0, f"logging.num_samples must be >= 0, got {self.num_samples}")
        _require(
            self.episodes_per_step >= 0,
            f"logging.episodes_per_step must be >= 0, got {self.episodes_per_step}",
        )


@dataclass(frozen=True, kw_only=True)
class GuardConfig:
    """Watches that warn when training drifts towards a known failure, and the optional roll-back."""

    min_entropy: float = 0.05
    """Warn when the policy's mean token entropy falls below this (collapse to one answer)."""
    max_kl: float = 1.0
    """Warn when the mean per-token KL to the reference exceeds this."""
    max_clip_fraction: float = 0.3
    """Warn when more than this share of tokens hit the PPO clip (updates too large)."""
    min_length_ratio: float = 0.5
    """Warn when the smoothed response length falls below this share of its running maximum."""
    min_reward_ratio: float = 0.5
    """Warn when the smoothed reward falls below this share of its best smoothed value."""
    max_missing_reward_fraction: float = 0.1
    """Warn when more than this share of the batch's rewards could not be computed."""
    smoothing: float = 0.9
    """Weight of the past in the moving averages of reward and length."""
    rollback_after: int = 0
    """Roll back to the last healthy checkpoint after this many bad steps in a row; 0 never."""

    def __post_init__(self) -> None:
        for name in ("min_length_ratio", "min_reward_ratio", "max_missing_reward_fraction", "smoothing"):
            value = getattr(self, name)
            _require(0 <= value <= 1, f"guards.{name} must be in [0, 1], got {value}")
        _require(self.rollback_after >= 0, f"guards.rollback_after must be >= 0, got {self.rollback_after}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A whole training run."""

    total_steps: int = 500
    """Training steps (one rollout batch and its update each)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy and critic models."""
    system: SystemConfig = field(default_factory=SystemConfig)
    """Device, dtype, seed."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """Replicated or sharded (FSDP2) learners, CPU offload."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and dev questions."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """The search environment: turns, searches, observation budget, prompt, reward."""
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    """The search engine."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Episode generation."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """PPO or GRPO and the loss settings."""
    kl: KLConfig = field(default_factory=KLConfig)
    """KL regularisation to the reference policy."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizers and schedules."""
    batch: BatchConfig = field(default_factory=BatchConfig)
    """Batch, mini-batch and micro-batch sizes."""
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    """Optional supervised warm-start on protocol traces before RL."""
    dev: DevConfig = field(default_factory=DevConfig)
    """Dev evaluation during training."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resume."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Outputs."""
    guards: GuardConfig = field(default_factory=GuardConfig)
    """Stability watches."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Scaling out: rollout workers, retrieval replicas and data-parallel learners as Ray actors."""

    def __post_init__(self) -> None:
        _require(self.total_steps >= 1, f"total_steps must be >= 1, got {self.total_steps}")
        self._check_algorithm()
        _require(
            self.mini_batch_trajectories % self.batch.micro_batch_size == 0,
            f"a mini-batch holds {self.mini_batch_trajectories} episodes (batch.mini_batch_prompts x "
            f"rollout.samples_per_prompt); set batch.micro_batch_size to a divisor of it",
        )
        _require(
            self.rollout.backend != "vllm" or self.system.device != "cpu",
            "rollout.backend=vllm needs a GPU: set system.device=cuda (or auto), or rollout.backend=hf",
        )
        _require(
            self.guards.rollback_after == 0 or self.checkpoint.every > 0,
            "guards.rollback_after needs checkpoints to roll back to: set checkpoint.every > 0",
        )
        _require(
            not self.algorithm.dynamic_sampling or self.rollout.max_staleness == 0,
            "algorithm.dynamic_sampling draws more episodes of a step at once, which requests generated "
            "ahead would have to wait for: set rollout.max_staleness=0 or algorithm.dynamic_sampling=false",
        )
        self._check_ray()

    def _check_ray(self) -> None:
        """The settings of other sections that a Ray run depends on."""
        ray = self.ray
        if not ray.enabled:
            return
        _require(
            self.mini_batch_trajectories % ray.num_learners == 0,
            f"a mini-batch holds {self.mini_batch_trajectories} episodes (batch.mini_batch_prompts x "
            f"rollout.samples_per_prompt), which ray.num_learners={ray.num_learners} learners cannot share "
            "evenly: make it a multiple of ray.num_learners",
        )
        _require(
            self.retriever.url is None or ray.num_retriever_replicas == 0,
            f"retriever.url points at a running server, and ray.num_retriever_replicas="
            f"{ray.num_retriever_replicas} would start retrieval actors beside it: set "
            "ray.num_retriever_replicas=0 to use the server, or retriever.url=null",
        )
        _require(
            self.rollout.backend != "vllm" or ray.gpus_per_rollout_worker > 0,
            "rollout.backend=vllm runs an engine on a GPU in each rollout worker: set "
            "ray.gpus_per_rollout_worker=1 (or rollout.backend=hf)",
        )
        _require(
            self.system.device != "cuda" or ray.gpus_per_learner > 0,
            "system.device=cuda but the learners get no GPU: set ray.gpus_per_learner=1 "
            "(or system.device=auto)",
        )
        _require(
            ray.max_restarts == 0 or self.checkpoint.resume,
            f"ray.max_restarts={ray.max_restarts} resumes from the last checkpoint after an actor dies, "
            "which checkpoint.resume=false forbids: set checkpoint.resume=true or ray.max_restarts=0",
        )

    def _check_algorithm(self) -> None:
        """How the estimator and DAPO's options fit the rollout and the KL settings."""
        name = self.algorithm.name
        _require(
            name not in GROUP_ESTIMATORS or self.rollout.samples_per_prompt >= 2,
            f"{name} compares the samples of one prompt: set rollout.samples_per_prompt >= 2 "
            "(Search-R1 uses 5)",
        )
        _require(
            name not in ("grpo", "dr_grpo") or self.kl.coef == 0 or self.kl.placement == "loss",
            f"{name} uses outcome scores only, so a KL reward penalty would be ignored: set "
            "kl.placement=loss and kl.estimator=low_var_kl (as Search-R1), or kl.coef=0",
        )
        _require(
            not self.algorithm.dynamic_sampling or self.rollout.samples_per_prompt >= 2,
            "algorithm.dynamic_sampling drops groups whose samples all scored alike: set "
            "rollout.samples_per_prompt >= 2",
        )
        _require(
            self.algorithm.overlong_buffer_tokens < self.policy_token_limit,
            f"algorithm.overlong_buffer_tokens ({self.algorithm.overlong_buffer_tokens}) must be below the "
            f"policy-token limit env.max_turns x rollout.max_new_tokens ({self.policy_token_limit})",
        )

    @property
    def uses_critic(self) -> bool:
        """PPO trains a critic; the other estimators do not."""
        return self.algorithm.name == "ppo"

    @property
    def policy_token_limit(self) -> int:
        """The most policy tokens an episode can hold: `env.max_turns` turns of `rollout.max_new_tokens`.

        The constant denominator of `seq-mean-token-sum-norm` and the limit of overlong shaping.
        """
        return self.env.max_turns * self.rollout.max_new_tokens

    @property
    def uses_reference(self) -> bool:
        """A frozen reference model is kept only when the KL coefficient is non-zero."""
        return self.kl.coef > 0

    @property
    def update_is_on_policy(self) -> bool:
        """The update takes a single optimizer step on the batch (one epoch, one mini-batch).

        Its policy is then the one that sampled the batch, so the update's own forward pass supplies the
        old log-probs and the experience phase skips a whole forward pass of the policy — unless a KL reward
        penalty needs them before the advantages.
        """
        kl_in_reward = self.uses_reference and self.kl.placement == "reward"
        return self.algorithm.ppo_epochs == 1 and self.mini_batches_per_step == 1 and not kl_in_reward

    @property
    def trajectories_per_step(self) -> int:
        """Episodes per training step."""
        return self.batch.prompts_per_step * self.rollout.samples_per_prompt

    @property
    def mini_batch_trajectories(self) -> int:
        """Episodes per optimizer step."""
        return self.batch.mini_batch_prompts * self.rollout.samples_per_prompt

    @property
    def mini_batches_per_step(self) -> int:
        """Optimizer steps per training step and epoch."""
        return self.batch.prompts_per_step // self.batch.mini_batch_prompts

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches whose gradients add up to one optimizer step."""
        return self.mini_batch_trajectories // self.batch.micro_batch_size

    @property
    def token_budgets(self) -> TokenBudgets:
        """The episodes' token budgets: a turn's tokens from ``rollout``, an observation's from ``env``."""
        return TokenBudgets(
            max_prompt_tokens=self.rollout.max_prompt_tokens,
            max_turn_tokens=self.rollout.max_new_tokens,
            max_observation_tokens=self.env.max_observation_tokens,
            max_context_tokens=self.rollout.max_context_tokens,
        )

    @property
    def run_dir(self) -> Path:
        """The run's output folder."""
        return Path(self.logging.run_dir)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested values (as the YAML presets write them)."""
        return config_io.to_dict(self)


RUN_CONFIG_FILE = "config.yaml"
"""A run folder's resolved config: `--config` reads it, `searchgym eval --train-config` takes its protocol."""


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """The config of the YAML preset at ``path`` (None: defaults) with ``section.key=value`` overrides."""
    return config_io.load(TrainConfig, path, overrides)


def config_help() -> str:
    """Every key of the config tree with its type, default and documentation, for ``--help``."""
    return config_io.help_text(TrainConfig)
