"""The settings of one evaluation run, validated before any work starts."""

from dataclasses import asdict, dataclass, fields
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from searchgym.errors import SearchgymError

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
        topk: passages per search.
        max_turns: generation turns per question in ``agent`` mode (the last one must answer).
        max_searches: searches per question in ``agent`` mode; None allows one in every turn but the last.
        max_observation_tokens: the token budget of one observation (``rag`` trims its passages to it too).
        prompt_template: the ``agent`` prompt with ``{question}``; None is the built-in one.
        max_new_tokens: tokens the model may generate per turn.
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
    topk: int = 3
    max_turns: int = 4
    max_searches: int | None = None
    max_observation_tokens: int = 512
    prompt_template: str | None = None
    max_new_tokens: int = 500
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
        for name in ("topk", "max_turns", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise SearchgymError(f"{name} must be at least 1, got {getattr(self, name)}")
        self.agent_env(prompt_style="chat")  # an impossible budget or template fails here, before any work
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

    def agent_env(self, prompt_style: "PromptStyle") -> "EnvConfig":
        """The env settings of an ``agent`` episode (``rag`` shares the observation budget)."""
        from searchgym.env.config import EnvConfig

        return EnvConfig(
            max_turns=self.max_turns,
            max_searches=self.max_turns - 1 if self.max_searches is None else self.max_searches,
            topk=self.topk,
            max_observation_tokens=self.max_observation_tokens,
            prompt_style=prompt_style,
            prompt_template=self.prompt_template,
        )

    @property
    def uses_retrieval(self) -> bool:
        """Whether the mode calls the retriever (``agent`` and ``rag``)."""
        return self.mode != "direct"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings, as stored in ``results.json``."""
        settings = asdict(self)
        settings["benchmarks"] = list(self.benchmarks)
        return settings

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> "EvalConfig":
        """Rebuild from ``to_dict`` output; keys this version does not know are ignored."""
        known = {f.name: settings[f.name] for f in fields(cls) if f.name in settings}
        known["benchmarks"] = tuple(known.get("benchmarks", ()))
        return cls(**known)

    def prediction_settings(self) -> dict[str, Any]:
        """The settings that can change a prediction in this mode (retrieval ones only where it searches)."""
        names = ["model", "mode", "max_new_tokens", "limit", "seed", "exclude", "backend"]
        if self.uses_retrieval:
            names += ["index", "retriever_url", "topk", "max_observation_tokens"]
        if self.mode == "agent":
            names += ["max_turns", "max_searches", "prompt_template"]
        return {name: getattr(self, name) for name in names}

    def changed_settings(self, other: "EvalConfig") -> list[str]:
        """The settings that differ from ``other`` and would change a prediction.

        A resumed run must match its earlier part on these; the batch size only changes speed, and the
        benchmark list may grow or shrink (predictions are kept per dataset).
        """
        mine, theirs = self.prediction_settings(), other.prediction_settings()
        names = [*mine, *(name for name in theirs if name not in mine)]
        return [name for name in names if mine.get(name) != theirs.get(name)]


def training_protocol(path: str | Path) -> dict[str, Any]:
    """The ``agent`` protocol a policy was trained with, as :class:`EvalConfig` fields.

    Args:
        path: a training config (a preset, or the ``config.yaml`` that ``searchgym train`` leaves in its
            run folder) or a run folder.

    Returns:
        Its env budgets, top-k and prompt template, and its tokens per turn (``rollout.max_new_tokens``).
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
    return {
        "topk": config.env.topk,
        "max_turns": config.env.max_turns,
        "max_searches": config.env.max_searches,
        "max_observation_tokens": config.env.max_observation_tokens,
        "prompt_template": config.env.prompt_template,
        "max_new_tokens": config.rollout.max_new_tokens,
    }
