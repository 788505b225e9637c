"""Typed dataclass trees from YAML presets and ``a.b=c`` overrides, and ``--help`` text from field docstrings.

A config is a tree of frozen dataclasses whose fields are documented by a string literal right below each
field (an "attribute docstring", as CleanRL and tyro write them). This module reads those docstrings from
the source, builds the tree from a nested dict with type checks, and explains every mistake in terms of the
dotted key to change. tyro does the same from the command line, but its syntax is ``--a.b c`` flags rather
than the ``key=value`` overrides on top of a YAML preset that searchgym (like Hydra-based trainers) uses, and
it would bring a second argument parser beside the ``searchgym`` argparse subcommands; the hundred lines here
keep one parser and one syntax.
"""

import ast
import contextlib
import dataclasses
import difflib
import functools
import inspect
import itertools
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from searchgym.errors import SearchgymError

ConfigT = TypeVar("ConfigT")


class ConfigError(SearchgymError):
    """A config value or key is wrong; the message names the dotted key and what to set."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The documentation of each field of dataclass ``cls``.

    Read from the string literal right under each field, or else from the ``Attributes:`` section of the
    class docstring (Google style, as :class:`searchgym.env.config.EnvConfig` writes it).
    """
    docs = _attributes_section(inspect.getdoc(cls) or "")
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    class_def = tree.body[0]
    assert isinstance(class_def, ast.ClassDef)
    for statement, following in itertools.pairwise(class_def.body):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            text = inspect.cleandoc(following.value.value)
            docs[statement.target.id] = " ".join(text.split())
    return docs


def _attributes_section(docstring: str) -> dict[str, str]:
    """``{name: text}`` from the ``Attributes:`` section of a Google-style docstring."""
    docs: dict[str, str] = {}
    lines = docstring.splitlines()
    if "Attributes:" not in lines:
        return docs
    current = None
    for line in lines[lines.index("Attributes:") + 1 :]:
        if line and not line.startswith(" "):
            break
        entry = re.match(r"^ {4}(\w+)(?: \(.*?\))?: (.*)$", line)
        if entry:
            current = entry.group(1)
            docs[current] = entry.group(2).strip()
        elif current and line.strip():
            docs[current] += " " + line.strip()
    return docs


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "|".join(str(choice) for choice in typing.get_args(annotation))
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if typing.get_origin(annotation) is tuple:
        names = ("..." if arg is Ellipsis else _type_name(arg) for arg in typing.get_args(annotation))
        return f"tuple[{', '.join(names)}]"
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def help_text(cls: type, prefix: str = "") -> str:
    """One entry per leaf field of the tree rooted at ``cls``: dotted key, type, default, docstring."""
    lines: list[str] = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        annotation = hints[field.name]
        if dataclasses.is_dataclass(annotation):
            lines.append(f"{key}:  {docs.get(field.name, '')}")
            # is_dataclass narrows to "instance or class"; a type hint is always the class.
            lines.append(help_text(annotation, prefix=f"{key}."))  # type: ignore[arg-type]
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        else:
            assert field.default_factory is not dataclasses.MISSING
            default = field.default_factory()
        lines.append(f"  {key} ({_type_name(annotation)}, default {default!r})")
        doc = docs.get(field.name, "")
        lines.extend(textwrap.wrap(doc, width=100, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` as ``annotation`` (int widens to float; YAML lists become tuples), or a ConfigError."""
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is a section: give a mapping of its keys, not {value!r}")
        # is_dataclass narrows to "instance or class"; a type hint is always the class.
        return build(annotation, value, prefix=f"{key}.")  # type: ignore[arg-type]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        if value is None and type(None) in typing.get_args(annotation):
            return None
        for option in typing.get_args(annotation):
            with contextlib.suppress(ConfigError):
                return _coerce(value, option, key)
        raise ConfigError(f"{key}={value!r} fits none of {_type_name(annotation)}")
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not a choice; set one of {', '.join(map(str, choices))}")
        return value
    if typing.get_origin(annotation) is dict:
        key_type, value_type = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} takes a mapping, like {{name: 1}}; got {value!r}")
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if typing.get_origin(annotation) is tuple:
        item_types = typing.get_args(annotation)
        if len(item_types) == 2 and item_types[1] is Ellipsis:
            if not isinstance(value, list | tuple):
                raise ConfigError(f"{key} takes a list, like [a, b]; got {value!r}")
            return tuple(_coerce(item, item_types[0], key) for item in value)
        if not isinstance(value, list | tuple) or len(value) != len(item_types):
            raise ConfigError(
                f"{key} takes {len(item_types)} values as a list, like [0.9, 0.99]; got {value!r}"
            )
        return tuple(_coerce(item, kind, key) for item, kind in zip(value, item_types, strict=True))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # PyYAML reads YAML 1.1, where "1e-6" (no dot) is a string; every trainer config writes it that way.
        with contextlib.suppress(ValueError):
            return float(value)
    if annotation is type(None) and value is None:
        return None
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {_type_name(annotation)}, got {value!r} ({type(value).__name__})")
    return value


def build(cls: type[ConfigT], values: dict[str, Any], *, prefix: str = "") -> ConfigT:
    """Build dataclass ``cls`` from nested ``values``; absent keys keep their defaults."""
    hints = typing.get_type_hints(cls)
    # ConfigT is any type; the config tree only ever holds dataclasses (fields() raises otherwise).
    names = [field.name for field in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; the keys here are {names}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in values.items()}
    try:
        return cls(**kwargs)
    except SearchgymError as error:
        if not prefix or prefix in str(error):
            raise
        # A section defined elsewhere (the env's) words its errors without the section's name.
        raise ConfigError(f"{prefix.rstrip('.')}: {error}") from error


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of nested ``values`` with each ``a.b.c=value`` set (the value is parsed as YAML)."""
    merged = yaml.safe_load(yaml.safe_dump(values)) or {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not key=value: write e.g. optim.actor_lr=1e-6")
        *sections, leaf = key.strip().split(".")
        node = merged
        for section in sections:
            child = node.setdefault(section, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {section} is a value, not a section")
            node = child
        node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    return merged


def load(cls: type[ConfigT], path: str | Path | None, overrides: list[str] | None = None) -> ConfigT:
    """Read the YAML preset at ``path`` (None: all defaults), apply ``overrides`` and build ``cls``."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as error:
            raise ConfigError(
                f"no config file at {path}: give a YAML preset like configs/tiny.yaml"
            ) from error
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from error
    return build(cls, apply_overrides(values, overrides or []))


def to_dict(config: Any) -> dict[str, Any]:
    """Nested plain-Python values of a config tree (tuples as lists), ready for YAML or JSON."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value
