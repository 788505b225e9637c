"""The import structure: every module imports only its own layer or the ones below, and no module cycles.

Layers, bottom to top: the ground (errors, paths, process set-up), ``retriever``, ``env``, ``policy``, then
``train`` and ``eval`` side by side, then the trajectory viewer, then the command line and the demo. Imports
inside functions (the lazy ones that keep heavy packages out of ``searchgym --help``) count too.
"""

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import searchgym

PACKAGE = Path(searchgym.__file__).parent
LAYERS = {
    "searchgym.errors": 0,
    "searchgym.paths": 0,
    "searchgym.runtime": 0,
    "searchgym": 0,
    "searchgym.retriever": 1,
    "searchgym.env": 2,
    "searchgym.policy": 3,
    "searchgym.train": 4,
    "searchgym.eval": 4,
    "searchgym.viewer": 5,
    "searchgym.cli": 6,
    "searchgym.demo": 6,
    "searchgym.__main__": 6,
}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (the linked layer folders included)."""
    found = {}
    paths = [Path(folder, name) for folder, _, names in os.walk(PACKAGE, followlinks=True) for name in names]
    for path in paths:
        if path.suffix != ".py" or path.relative_to(PACKAGE).parts[0] in ("data", "configs"):
            continue
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(["searchgym", *parts])] = path
    return found


def imported(path: Path, known: set[str]) -> Iterator[str]:
    """The searchgym modules a module's source imports, anywhere in it.

    ``from package import name`` is an import of the submodule ``package.name`` when there is one, and of the
    package's ``__init__`` otherwise (a name defined there).
    """
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                yield submodule if submodule in known else node.module


def layer(module: str) -> int:
    """The rank of a module's layer (its longest listed prefix)."""
    prefixes = [name for name in LAYERS if module == name or module.startswith(name + ".")]
    if not prefixes:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")
    return LAYERS[max(prefixes, key=len)]


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {
        module: {target for target in imported(path, known) if target in known and target != module}
        for module, path in found.items()
    }


def test_the_walk_sees_every_layer() -> None:
    found = modules()
    assert {
        "searchgym.retriever.server",
        "searchgym.env.vector",
        "searchgym.train.loop",
        "searchgym.cli",
    } <= set(found)
    assert "searchgym.train.learner" in graph()["searchgym.train.loop"]


def test_every_module_imports_only_its_layer_or_lower() -> None:
    upward = [
        f"{module} -> {target}"
        for module, targets in graph().items()
        for target in targets
        if layer(target) > layer(module)
    ]
    assert upward == []


def test_no_module_takes_part_in_an_import_cycle() -> None:
    edges = graph()
    cycles = []
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*trail[trail.index(target) :], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize(
    ("module", "target", "allowed"),
    [
        ("searchgym.env.vector", "searchgym.retriever.base", True),
        ("searchgym.env.vector", "searchgym.train.loop", False),
    ],
)
def test_the_layer_rule_reads_the_layers_as_documented(module: str, target: str, allowed: bool) -> None:
    assert (layer(target) <= layer(module)) is allowed


def test_the_learners_gpu_building_blocks_import_only_torch_and_transformers() -> None:
    """benchmarks/gpu_check.py runs on GPU boxes that have torch and transformers and none of these."""
    absent = ("gymnasium", "faiss", "vllm", "flask", "ray")
    script = (
        "import sys\n"
        "import searchgym.policy.logprobs, searchgym.train.models\n"
        "import searchgym.train.optim, searchgym.train.sharding\n"
        f"print(','.join(name for name in {absent!r} if name in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == ""
