"""Everything a run needs, opened and checked before the first question: a bad input fails in seconds.

Each function raises :class:`~searchgym.errors.SearchgymError` with a message that says what to fix.
"""

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from searchgym.env import QAExample, load_dataset
from searchgym.errors import SearchgymError
from searchgym.eval.config import EvalConfig
from searchgym.eval.records import Prediction
from searchgym.eval.report import PREDICTIONS_FILE, RUN_FILE, read_predictions
from searchgym.eval.selection import check_unique_ids, read_id_file, select_examples
from searchgym.policy.generation import Generator
from searchgym.retriever.base import Retriever
from searchgym.retriever.corpus import file_sha256

PROBE_QUERY = "searchgym connectivity check"
PROBE_TIMEOUT_S = 10.0
CPU_KV_CACHE_GIB = 2.0
FINGERPRINTS_KEY = "fingerprints"
"""The key of ``run.json`` under which :func:`input_fingerprints` are kept."""


@dataclass(frozen=True, slots=True)
class EvalItem:
    """One question to evaluate and the table column it belongs to."""

    dataset: str
    example: QAExample

    @property
    def key(self) -> tuple[str, str]:
        """(dataset, example id), as :attr:`searchgym.eval.records.Prediction.key`."""
        return (self.dataset, self.example.id)


def load_items(config: EvalConfig) -> list[EvalItem]:
    """The questions of the run, per benchmark: exclusions dropped, then the seeded sample.

    Raises:
        SearchgymError: an unknown benchmark name (the message lists the valid ones), an unreadable file,
            repeated ids, an example without gold answers, or nothing left to evaluate.
    """
    exclude = read_id_file(Path(config.exclude)) if config.exclude else set()
    items: list[EvalItem] = []
    for benchmark, label in zip(config.benchmarks, config.dataset_labels, strict=True):
        examples = load_dataset(benchmark)
        check_unique_ids(label, examples)
        unscorable = next((example.id for example in examples if not example.golden_answers), None)
        if unscorable is not None:
            raise SearchgymError(
                f"{label}: example {unscorable!r} has no golden answers, so it cannot be scored"
            )
        chosen = select_examples(examples, exclude=exclude, limit=config.limit, seed=config.seed)
        if not chosen:
            raise SearchgymError(
                f"{label}: every example is excluded by {config.exclude}; nothing to evaluate"
            )
        items += [EvalItem(label, example) for example in chosen]
    return items


def check_retriever(config: EvalConfig) -> None:
    """Refuse, before the model loads, a retrieval location that cannot work.

    An index folder must exist and hold a readable manifest (the index itself opens later, in
    :func:`open_retriever`); a server must answer a probe query, with one retry only, so that a wrong URL
    fails fast.

    Raises:
        SearchgymError: the folder is missing or not an index, or the server does not answer.
    """
    if not config.uses_retrieval:
        return
    if config.index is not None:
        from searchgym.retriever.manifest import Manifest

        if not Path(config.index).is_dir():
            raise SearchgymError(
                f"index folder {config.index} does not exist: build it with "
                f"`searchgym index --corpus CORPUS --out {config.index}`"
            )
        Manifest.load(Path(config.index))
        return
    from searchgym.retriever.client import HttpRetriever

    probe(HttpRetriever(str(config.retriever_url), max_retries=1, timeout_s=PROBE_TIMEOUT_S), config)


def open_retriever(config: EvalConfig) -> Retriever | None:
    """The retriever of ``agent`` and ``rag`` runs (None for ``direct``), checked with one probe query.

    Raises:
        SearchgymError: the index cannot be opened, or the retriever does not answer.
    """
    if not config.uses_retrieval:
        return None
    from searchgym.retriever.index import load_retriever

    retriever = load_retriever(str(config.index or config.retriever_url))
    probe(retriever, config)
    return retriever


def probe(retriever: Retriever, config: EvalConfig) -> None:
    """Send one query; whatever the backend raises means the run could not search, so say it now.

    Raises:
        SearchgymError: the retriever failed.
    """
    try:
        retriever.search([PROBE_QUERY], 1)
    except Exception as error:
        raise SearchgymError(
            f"the retriever at {config.index or config.retriever_url} does not answer "
            f"({type(error).__name__}: {error}); start it with `searchgym serve --index DIR` or check the URL"
        ) from error


def load_generator(config: EvalConfig) -> Generator:
    """The policy's generation backend (transformers or vLLM), with the model loaded.

    Raises:
        SearchgymError: the model folder is missing or holds no model, the model does not load, or vLLM
            is not installed.
    """
    if config.model is not None:
        check_model_folder(config.model)
    if config.backend == "vllm":
        import torch

        from searchgym.policy.models import DEFAULT_POLICY, default_policy_path
        from searchgym.policy.vllm_backend import VLLMGenerator

        embedded = config.model in (None, DEFAULT_POLICY)
        # On CPU vLLM would otherwise reserve most of the machine's memory for its KV cache.
        kv_cache_gib = None if torch.cuda.is_available() else CPU_KV_CACHE_GIB
        return VLLMGenerator(
            default_policy_path() if embedded else str(config.model), kv_cache_gib=kv_cache_gib
        )
    from searchgym.policy.generation import TransformersGenerator
    from searchgym.policy.models import load_policy

    try:
        policy = load_policy(config.model)
    except ValueError as error:  # transformers' answer to files it cannot make sense of
        raise SearchgymError(f"cannot load the model {config.model}: {error}") from error
    return TransformersGenerator(policy, max_batch_size=config.batch_size)


def check_model_folder(model: str) -> None:
    """Refuse a local path that is not a model folder; hub ids (``org/name``) pass through to the loader.

    Raises:
        SearchgymError: the path is missing, or is a folder without ``config.json``.
    """
    path = Path(model)
    if path.exists() and not (path / "config.json").is_file():
        raise SearchgymError(
            f"{model} is not a model folder (no config.json): pass a Hugging Face model folder, "
            "e.g. the export of `searchgym train`"
        )
    if not path.exists() and (path.is_absolute() or model.startswith(".")):
        raise SearchgymError(f"model folder {model} does not exist")


def input_fingerprints(
    configs: Sequence[EvalConfig], *, model: bool = True, index: bool = True
) -> list[dict[str, str]]:
    """SHA-256 digests of what each run's settings name only by path: a local model's files and the index.

    The same path can hold other bytes later (a model trained further and exported to the same folder,
    an index rebuilt in place); a resumed run would then mix two models' predictions in one table.
    Hub ids, the embedded model and servers have no local bytes to digest; a run that does not search
    does not depend on the index. Each file is read once, however many runs name it.

    Args:
        configs: the runs' settings.
        model: digest the model (False when a loaded generator is handed in: its weights are not the
            folder's).
        index: digest the index (False when a retriever is handed in).
    """
    from searchgym.retriever.manifest import MANIFEST_NAME

    digests: dict[Path, str] = {}

    def digest(path: Path) -> str:
        if path not in digests:
            digests[path] = path_sha256(path)
        return digests[path]

    fingerprints = []
    for config in configs:
        found = {}
        if model and config.model is not None and Path(config.model).exists():
            found["model"] = digest(Path(config.model))
        manifest = None if config.index is None else Path(config.index) / MANIFEST_NAME
        # A rebuild writes a new manifest (its creation time at least), so it stands for the index. A
        # missing one is not digested: check_retriever says what is wrong with the folder.
        if index and config.uses_retrieval and manifest is not None and manifest.is_file():
            found["index"] = digest(manifest)
        fingerprints.append(found)
    return fingerprints


def path_sha256(path: Path) -> str:
    """The hex SHA-256 of a file, or of a folder's files (names and contents; hidden ones left out)."""
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if file.is_file() and not any(part.startswith(".") for part in relative.parts):
            digest.update(f"{relative.as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def run_file_document(config: EvalConfig, fingerprints: dict[str, str]) -> dict[str, Any]:
    """What ``run.json`` holds: the settings, and the fingerprints of the files they name."""
    return config.to_dict() | {FINGERPRINTS_KEY: fingerprints}


def resume_predictions(run_dir: Path, config: EvalConfig, fingerprints: dict[str, str]) -> list[Prediction]:
    """The predictions an earlier, interrupted run left in ``run_dir`` (none for a new run).

    A line cut off by the interruption is removed from the file, so that new lines append cleanly.

    Args:
        run_dir: the run directory.
        config: this run's settings.
        fingerprints: this run's :func:`input_fingerprints`; each one the earlier run also recorded must
            match.

    Raises:
        SearchgymError: the directory holds a run made with other settings, or with the same paths
            holding other files.
    """
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        if (run_dir / PREDICTIONS_FILE).exists():
            raise SearchgymError(f"{run_dir} has predictions but no {RUN_FILE}: choose another --out")
        return []
    document = json.loads(run_file.read_text(encoding="utf-8"))
    earlier = EvalConfig.from_dict(document)
    changed = config.changed_settings(earlier)
    if changed:
        raise SearchgymError(
            f"{run_dir} holds a run with other settings ({', '.join(changed)} differ): "
            "resume it with the same settings, or choose another --out"
        )
    recorded = document.get(FINGERPRINTS_KEY, {})
    rewritten = sorted(name for name, digest in fingerprints.items() if recorded.get(name, digest) != digest)
    if rewritten:
        paths = {"model": config.model, "index": config.index}
        raise SearchgymError(
            f"{run_dir} holds a run of other files at the same paths: "
            + ", ".join(f"the {name} {paths[name]}" for name in rewritten)
            + " changed since it began; choose another --out (or delete the folder to evaluate again)"
        )
    lines = read_predictions(run_dir / PREDICTIONS_FILE, repair=True)
    predictions = unique_predictions(lines)
    duplicates = len(lines) - len(predictions)
    if predictions:
        repeated = f" ({duplicates} repeated lines ignored)" if duplicates else ""
        print(
            f"searchgym eval: resuming {run_dir}: {len(predictions)} questions already done{repeated}",
            file=sys.stderr,
        )
    return predictions


def unique_predictions(predictions: list[Prediction]) -> list[Prediction]:
    """The first prediction of each (dataset, id), in file order: a repeated line is counted once."""
    seen: set[tuple[str, str]] = set()
    unique = []
    for prediction in predictions:
        if prediction.key not in seen:
            seen.add(prediction.key)
            unique.append(prediction)
    return unique
