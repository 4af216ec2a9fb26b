"""The one YAML reader of sparsecraft (recipes, training recipes, ``--set KEY=VALUE``).

PyYAML follows YAML 1.1, where ``2:4`` is a base-60 ("sexagesimal") integer: 2 * 60 + 4 =
124. A pattern written ``pattern: 2:4`` would silently become 124. :class:`Loader` is
``yaml.SafeLoader`` without the base-60 int and float rules, so ``2:4``, ``4:8`` or
``1:30.5`` stay strings. Floats also resolve without a dot or an exponent sign (``1e-4``,
``3e5``, ``1.0e5``), as in YAML 1.2 (YAML 1.1 reads ``1e-4`` as a string); every other scalar
resolves as in ``yaml.safe_load``.

:func:`check_types` checks a mapping's values against a dataclass's field types before the
dataclass is built, so a wrong type (``seed: abc``, ``options: [1]``) is a one-line
:class:`~sparsecraft.errors.ConfigError` naming the field, never an AttributeError later.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = ["Loader", "load_yaml", "load_yaml_file", "parse_value", "check_types"]


class Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that never reads ``N:M`` as a base-60 number."""


# Copy the resolver table (it is shared with SafeLoader by class attribute) and re-add the
# int and float rules of YAML 1.1 without their base-60 alternatives.
Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"""^(?:[-+]?0b[0-1_]+
                    |[-+]?0[0-7_]+
                    |[-+]?(?:0|[1-9][0-9_]*)
                    |[-+]?0x[0-9a-fA-F_]+)$""", re.X),
    list("-+0123456789"),
)
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)
# SafeLoader's int constructor still understands base 60; with the resolvers above no
# untagged scalar reaches it that way.


def load_yaml(text: str, what: str) -> Any:
    """Parse ``text``; a syntax error is a ConfigError naming ``what`` and the line."""
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"{what} is not valid YAML{where}: {problem}") from None


def load_yaml_file(path: str | Path, what: str = "recipe") -> Any:
    """Read and parse a YAML file; a missing or unreadable file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} file '{path}' cannot be read: {exc}") from None
    return load_yaml(text, f"{what} '{path}'")


def parse_value(text: str, what: str) -> Any:
    """A value given on the command line in YAML syntax (``--set steps=500``)."""
    return load_yaml(text, what)


# ------------------------------------------------------------------ type checks
_NUMBER = (int, float)


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if tp is Any:
        return "anything"
    if _is_union(tp):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is not Any:
            return f"a mapping of {_describe(args[0]).split(' ', 1)[-1]} to {_describe(args[1]).split(' ', 1)[-1]}"
        return "a mapping"
    if origin in (list, tuple) or tp in (list, tuple):
        return "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _fits(value, tp) -> bool:
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if _is_union(tp):
        return any(_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, _NUMBER) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            return False
        if len(args) == 2:
            return all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
        return True
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is list and args:
            return all(_fits(v, args[0]) for v in value)
        return True
    if dataclasses.is_dataclass(tp):  # built from a mapping (e.g. TargetSpec)
        return isinstance(value, (Mapping, tp))
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # a type we cannot check here; the dataclass validates it


def check_types(cls, data: Mapping, where: str) -> None:
    """Raise ConfigError if a value in ``data`` does not fit the field type of dataclass ``cls``.

    Unknown keys are left to :func:`sparsecraft.errors.config_fields`.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in data and not _fits(data[f.name], hints.get(f.name, Any)):
            value = data[f.name]
            if f.name == "pattern":  # its own message says how a number got there (quote 2:4)
                from .patterns import parse_pattern

                try:
                    parse_pattern(value)
                except ConfigError as exc:
                    raise ConfigError(f"{where}: {exc}") from None
            raise ConfigError(
                f"{where}: '{f.name}' must be {_describe(hints[f.name])}, "
                f"got {type(value).__name__} {value!r}"
            )
