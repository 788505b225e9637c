"""The ``Examples:`` in docstrings run as doctests, so the documentation cannot drift from the code.

Modules are imported by their package names (``searchgym.env.rewards``), as users import them.
"""

import doctest
import importlib
import os
from pathlib import Path

import pytest

import searchgym

PACKAGE = Path(searchgym.__file__).parent


def modules_with_examples() -> list[str]:
    """Dotted names of the package's modules whose source holds a ``>>>`` example."""
    names = []
    for folder, _, files in os.walk(PACKAGE, followlinks=True):
        for file in files:
            path = Path(folder, file)
            if file.endswith(".py") and ">>>" in path.read_text(encoding="utf-8"):
                parts = path.relative_to(PACKAGE).with_suffix("").parts
                names.append(".".join(("searchgym", *parts)))
    return sorted(names)


MODULES = modules_with_examples()


def test_the_package_has_examples_to_run():
    assert "searchgym.env.rewards" in MODULES and len(MODULES) >= 10


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_hold(name):
    results = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0, f"{name} has '>>>' but no example doctest runs"
    assert results.failed == 0
