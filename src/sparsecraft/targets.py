"""Targets: which parameters of a model get sparsified.

Rules match qualified names. A rule is a shell glob (``*.mlp.*``) or, with the prefix
``re:``, a Python regular expression matched against the whole name (``re:.*mlp.*``). A rule
matches a parameter when it matches either the parameter's name
(``model.layers.0.mlp.up_proj.weight``) or its module's name (``model.layers.0.mlp.up_proj``).

Default selection: the ``weight`` of every ``Linear`` and ``Conv1d/2d/3d`` module, minus the
output head. Embeddings, norms and biases are never selected by default (they are not of
those types or not named ``weight``). The output head is the module returned by
``model.get_output_embeddings()`` when the model has that method (Hugging Face models; a
``None`` answer means no head, as for a bare encoder), else any
module named ``lm_head``, else the last ``Linear`` in registration order (a classifier).
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from torch import nn

from .errors import ConfigError, TargetError
from .patterns import Pattern, PatternMismatch, Unstructured, parse_pattern

__all__ = ["Target", "TargetSpec", "select_targets", "match_rule", "output_head_names", "resolve_patterns", "FALLBACKS"]

log = logging.getLogger(__name__)
#: What to do with a layer the pattern cannot tile.
FALLBACKS = ("error", "skip", "unstructured")

DEFAULT_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")


@dataclass(frozen=True)
class Target:
    """One (module, parameter) pair to sparsify."""

    name: str  # qualified parameter name
    module_name: str
    module: nn.Module
    param_name: str = "weight"

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)


@dataclass
class TargetSpec:
    """Rules choosing targets. Empty ``include`` means every parameter of the chosen types."""

    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=lambda: list(DEFAULT_TYPES))
    param_names: list[str] = field(default_factory=lambda: ["weight"])
    include_head: bool = False

    @classmethod
    def from_dict(cls, data: dict | None) -> "TargetSpec":
        data = dict(data or {})
        unknown = set(data) - {"include", "exclude", "types", "param_names", "include_head"}
        if unknown:
            raise ConfigError(f"targets: unknown keys {sorted(unknown)}")
        for key in ("include", "exclude", "types", "param_names"):
            if key in data and isinstance(data[key], str):
                data[key] = [data[key]]
        return cls(**data)


def match_rule(rule: str, *names: str) -> bool:
    """Whether a glob or ``re:`` rule matches any of ``names``."""
    if rule.startswith("re:"):
        try:
            pattern = re.compile(rule[3:])
        except re.error as exc:
            raise ConfigError(f"invalid regular expression in rule '{rule}': {exc}") from None
        return any(pattern.fullmatch(n) for n in names)
    return any(fnmatch.fnmatchcase(n, rule) for n in names)


def _type_matches(module: nn.Module, types: Sequence[str | type]) -> bool:
    mro_names = {c.__name__ for c in type(module).__mro__}
    for t in types:
        if isinstance(t, type):
            if isinstance(module, t):
                return True
        elif t in mro_names:
            return True
    return False


def output_head_names(model: nn.Module) -> set[str]:
    """Module names treated as the output head (see the module docstring)."""
    names = {name: mod for name, mod in model.named_modules()}
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (AttributeError, NotImplementedError):
            head = None
        # a model that can say what its head is has none when it says None (BertModel)
        return {n for n, m in names.items() if m is head} if head is not None else set()
    by_name = {n for n in names if n.split(".")[-1] == "lm_head"}
    if by_name:
        return by_name
    linears = [n for n, m in names.items() if isinstance(m, nn.Linear)]
    return {linears[-1]} if linears else set()


def _check_rules_match(rules: Iterable[str], candidates: list[tuple[str, str]], what: str):
    for rule in rules:
        if not any(match_rule(rule, p, m) for p, m in candidates):
            shown = [p for p, _ in candidates[:12]]
            more = f" ... and {len(candidates) - 12} more" if len(candidates) > 12 else ""
            raise TargetError(
                f"{what} rule '{rule}' matches no parameter; names that exist: "
                f"{', '.join(shown)}{more}"
            )


def select_targets(model: nn.Module, spec: TargetSpec | dict | None = None) -> list[Target]:
    """Targets of ``model`` chosen by ``spec``, in module registration order."""
    if spec is None or isinstance(spec, dict):
        spec = TargetSpec.from_dict(spec)
    heads = set() if spec.include_head else output_head_names(model)

    # Every parameter of a matching type is a candidate; rules are checked against them so
    # that "matches nothing" means nothing of the selected types, and the error lists them.
    candidates: list[tuple[str, str, nn.Module, str]] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if not _type_matches(module, spec.types):
            continue
        for pname in spec.param_names:
            param = getattr(module, pname, None)
            if not isinstance(param, nn.Parameter) or id(param) in seen:
                continue
            seen.add(id(param))  # tied weights are one target
            qual = f"{module_name}.{pname}" if module_name else pname
            candidates.append((qual, module_name, module, pname))
    if not candidates:
        raise TargetError(
            f"model has no parameter {spec.param_names} in modules of types {list(spec.types)}"
        )
    pairs = [(q, m) for q, m, _, _ in candidates]
    _check_rules_match(spec.include, pairs, "include")
    _check_rules_match(spec.exclude, pairs, "exclude")

    targets = []
    for qual, module_name, module, pname in candidates:
        if spec.include:
            if not any(match_rule(r, qual, module_name) for r in spec.include):
                continue
        elif module_name in heads:
            continue
        if any(match_rule(r, qual, module_name) for r in spec.exclude):
            continue
        targets.append(Target(qual, module_name, module, pname))
    if not targets:
        raise TargetError("the target rules leave no parameter to sparsify")
    return targets


def resolve_patterns(targets: Sequence[Target], pattern: str | Pattern, fallback: str = "error") -> dict[str, Pattern | None]:
    """The pattern per target after the fallback rule; None means "leave dense".

    ``fallback``: ``error`` raises the pattern's mismatch (naming the layer), ``skip``
    leaves such a layer dense, ``unstructured`` prunes it unstructured instead.
    """
    if fallback not in FALLBACKS:
        raise ConfigError(f"unknown fallback '{fallback}'; known: {', '.join(FALLBACKS)}")
    base = parse_pattern(pattern)
    out: dict[str, Pattern | None] = {}
    for t in targets:
        try:
            base.check(t.shape, t.name)
            out[t.name] = base
        except PatternMismatch as exc:
            if fallback == "error":
                raise
            log.warning("%s; fallback=%s", exc, fallback)
            out[t.name] = None if fallback == "skip" else Unstructured()
    return out
