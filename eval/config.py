"""The settings of one evaluation run, validated before any work starts."""

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from searchgym.errors import SearchgymError
from searchgym.policy.budgets import TokenBudgets

if TYPE_CHECKING:  # the env package loads gymnasium: not for `searchgym --help`
    from searchgym.env.config import EnvConfig, PromptStyle

MODES = ("agent", "rag", "direct")
BACKENDS = ("hf", "vllm")
SEARCH_R1_BENCHMARKS = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
"""The seven benchmarks of the Search-R1 paper's main table, in its column order (``--benchmarks all``)."""
DATA_FILE_SUFFIXES = (".jsonl.gz", ".jsonl", ".parquet")
SPLIT_NAMES = ("test", "dev", "validation", "val", "train")  # as searchgym.env.data.SPLIT_PREFERENCE


def dataset_label(benchmark: str) -> str:
    """The column name of a benchmark: its name, a data file's name, or its folder's for a split file.

    A ``#source`` selector (one ``data_source`` of a merged Search-R1 file) names the column; a file or
    folder named after a split (FlashRAG's ``nq/test.jsonl``, a ``datasets`` split folder) is named after
    the folder it is in.

    >>> dataset_label("nq"), dataset_label("data/my_questions.jsonl.gz"), dataset_label("x/a.parquet#popqa")
    ('nq', 'my_questions', 'popqa')
    >>> dataset_label("flashrag/triviaqa/dev.jsonl"), dataset_label("saved/hotpotqa/test")
    ('triviaqa', 'hotpotqa')
    """
    head, separator, source = benchmark.rpartition("#")
    if separator and head and source:
        return source
    path = PurePath(benchmark)
    name = path.name
    for suffix in DATA_FILE_SUFFIXES:
        if name.endswith(suffix):
            name = name.removesuffix(suffix)
            break
    if name in SPLIT_NAMES and path.parent.name:
        return path.parent.name
    return name


def _default_env() -> "EnvConfig":
    from searchgym.env.config import EnvConfig  # the env package loads gymnasium: not for `searchgym --help`

    return EnvConfig()


def _default_budgets() -> TokenBudgets:
    return TokenBudgets(max_turn_tokens=DEFAULT_TURN_TOKENS)


DEFAULT_TURN_TOKENS = 500
"""Tokens a model may generate per turn unless told otherwise (or trained otherwise)."""


@dataclass(frozen=True, slots=True)
class EvalConfig:
    """What to evaluate and how.

    Attributes:
        benchmarks: dataset names (``nq``, ``wiki-mini-dev``, ...) or paths to FlashRAG jsonl / Search-R1
            parquet files, in the order the table shows them.
        model: a local model directory or hub id; None is the embedded SmolLM2-135M-Instruct.
        mode: ``agent`` (multi-turn search policy), ``rag`` (retrieve top-k with the question once, then
            answer) or ``direct`` (answer without retrieval).
        retriever_url: a running ``searchgym serve`` (or any Search-R1 compatible server).
        index: a local index directory built by ``searchgym index``.
        env: the episode protocol (turns, searches, top-k, observation budget, prompt); ``rag`` shares its
            top-k, observation budget and prompt style. ``--train-config`` takes the training run's.
        budgets: the token budgets of an episode; ``max_turn_tokens`` is every mode's tokens per turn.
        infer_prompt_style: replace ``env.prompt_style`` by what the model's tokenizer suggests (chat with
            a chat template, plain without); False when the protocol comes from a training run.
        limit: questions per dataset, sampled with ``seed``; None evaluates every question.
        seed: the sampling seed of ``limit``; the same seed gives the same questions.
        exclude: a file of example ids to leave out (one per line), e.g. overlap with training data.
        backend: ``hf`` (transformers) or ``vllm``.
        batch_size: questions decoded together.
    """

    benchmarks: tuple[str, ...]
    model: str | None = None
    mode: str = "agent"
    retriever_url: str | None = None
    index: str | None = None
    env: "EnvConfig" = field(default_factory=_default_env)
    budgets: TokenBudgets = field(default_factory=_default_budgets)
    infer_prompt_style: bool = True
    limit: int | None = None
    seed: int = 0
    exclude: str | None = None
    backend: str = "hf"
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not self.benchmarks:
            raise SearchgymError("no benchmark given: set --benchmarks (e.g. nq,hotpotqa or all)")
        if self.mode not in MODES:
            raise SearchgymError(f"unknown mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.backend not in BACKENDS:
            raise SearchgymError(f"unknown backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.retriever_url and self.index:
            raise SearchgymError("give either --retriever-url or --index, not both")
        if self.uses_retrieval and not (self.retriever_url or self.index):
            raise SearchgymError(
                f"mode {self.mode!r} searches: give --index DIR (built by `searchgym index`) or "
                "--retriever-url URL (a running `searchgym serve`), or use --mode direct"
            )
        if self.batch_size < 1:
            raise SearchgymError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise SearchgymError(f"--limit must be at least 1, got {self.limit}")
        labels = self.dataset_labels
        if len(set(labels)) != len(labels):
            raise SearchgymError(
                f"two benchmarks share a table column name ({', '.join(labels)}): rename one of the files"
            )

    @property
    def dataset_labels(self) -> tuple[str, ...]:
        """The table column (and ``Prediction.dataset``) of each benchmark, in order."""
        return tuple(dataset_label(benchmark) for benchmark in self.benchmarks)

    @property
    def max_new_tokens(self) -> int:
        """Tokens per generation call, in every mode."""
        return self.budgets.max_turn_tokens

    def env_for(self, prompt_style: "PromptStyle") -> "EnvConfig":
        """The episode protocol, with the style the model suggests unless the protocol fixes it."""
        return replace(self.env, prompt_style=prompt_style) if self.infer_prompt_style else self.env

    @property
    def uses_retrieval(self) -> bool:
        """Whether the mode calls the retriever (``agent`` and ``rag``)."""
        return self.mode != "direct"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings, as stored in ``results.json`` (``env`` and ``budgets`` nested)."""
        settings = asdict(self)
        settings["benchmarks"] = list(self.benchmarks)
        return settings

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> "EvalConfig":
        """Rebuild from ``to_dict`` output; keys this version does not know are ignored."""
        from searchgym.env.config import EnvConfig

        known = {f.name: settings[f.name] for f in fields(cls) if f.name in settings}
        known["benchmarks"] = tuple(known.get("benchmarks", ()))
        if isinstance(known.get("env"), dict):
            # JSON has lists where the config has tuples (tools, a list of reward functions).
            env: dict[str, Any] = {
                name: tuple(value) if isinstance(value, list) else value
                for name, value in known["env"].items()
            }
            known["env"] = EnvConfig(**env)
        if isinstance(known.get("budgets"), dict):
            known["budgets"] = TokenBudgets(**known["budgets"])
        return cls(**known)

    def prediction_settings(self) -> dict[str, Any]:
        """The settings that can change a prediction in this mode (retrieval ones only where it searches).

        Protocol settings are named by their place: ``env.topk``, ``budgets.max_turn_tokens``, ...
        """
        env = {f"env.{name}": value for name, value in asdict(self.env).items()}
        budgets = {f"budgets.{name}": value for name, value in asdict(self.budgets).items()}
        names = ["model", "mode", "limit", "seed", "exclude", "backend", "infer_prompt_style"]
        names += ["budgets.max_turn_tokens", "env.prompt_style"]
        if self.uses_retrieval:
            names += ["index", "retriever_url", "env.topk", "env.max_observation_tokens"]
        settings = {name: getattr(self, name) for name in names if "." not in name}
        everything = env | budgets
        if self.mode == "agent":
            return settings | everything
        return settings | {name: everything[name] for name in names if "." in name}

    def changed_settings(self, other: "EvalConfig") -> list[str]:
        """The settings that differ from ``other`` and would change a prediction.

        A resumed run must match its earlier part on these; the batch size only changes speed, and the
        benchmark list may grow or shrink (predictions are kept per dataset).
        """
        mine, theirs = self.prediction_settings(), other.prediction_settings()
        names = [*mine, *(name for name in theirs if name not in mine)]
        return [name for name in names if mine.get(name) != theirs.get(name)]


def training_protocol(path: str | Path) -> tuple["EnvConfig", TokenBudgets]:
    """The episode protocol a policy was trained with: its env settings and its token budgets.

    Args:
        path: a training config (a preset, or the ``config.yaml`` that ``searchgym train`` leaves in its
            run folder) or a run folder.
    """
    from searchgym.train.config import RUN_CONFIG_FILE, load_config  # dataclasses and YAML only

    file = Path(path)
    if file.is_dir():
        file = file / RUN_CONFIG_FILE
    if not file.is_file():
        raise SearchgymError(
            f"--train-config {path}: no training config there; give a YAML preset (configs/demo.yaml) or the "
            f"run folder of a `searchgym train` run (it holds {RUN_CONFIG_FILE})"
        )
    config = load_config(file)
    return config.env, config.token_budgets
