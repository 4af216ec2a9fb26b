"""Training methods by name, for recipes: each method's module registers how a recipe builds it.

A registered planner reads a recipe (``sparsity``, ``pattern``, ``steps``, ``seed``,
``options``), checks every setting (type, range, and that its schedule fits inside the run's
``steps``) and returns a :class:`Plan`: how many steps the run lasts and a function that
builds the sparsity object on the model. Planning touches nothing, so a recipe is checked
completely before any data set, model or file is opened. A method that changes the model's
architecture (Sparse-IFT) also gives ``prepare(model) -> (model, prepared)``: the runner calls
it before the optimizer is built and hands ``prepared`` to ``build`` in the context.

```
@recipe_method("gmp", options={"start", "end", "frequency", "allocation"})
def _plan_gmp(recipe) -> Plan: ...
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ConfigError

__all__ = [
    "Plan", "BuildContext", "recipe_method", "method_names", "plan_method",
    "option_steps", "option_int", "option_number", "option_choice", "recipe_sparsity", "quote_hint",
]


@dataclass(frozen=True)
class BuildContext:
    """What a builder may need besides the model and optimizer (``train_size``: training
    examples, for methods whose loss is per example, like variational inference;
    ``prepared``: what the plan's ``prepare`` returned besides the model)."""

    loss_fn: Callable[[Any, Any], Any]
    batch_at: Callable[[int], Any]
    train_size: int | None = None
    prepared: Any = None


@dataclass(frozen=True)
class Plan:
    """A checked method: ``build(model, optimizer, context)`` and the run's length in steps;
    ``prepare(model) -> (model, prepared)`` for methods that replace layers before training."""

    build: Callable[[Any, Any, BuildContext], Any]
    total_steps: int
    prepare: Callable[[Any], tuple[Any, Any]] | None = None


@dataclass(frozen=True)
class _Entry:
    name: str
    options: frozenset
    planner: Callable[[Any], Plan]


_METHODS: dict[str, _Entry] = {}


def recipe_method(name: str, *, options=()):
    """Decorator: register ``planner(recipe) -> Plan`` as the recipe method ``name``;
    ``options`` are the keys it accepts under the recipe's ``options``."""

    def deco(planner):
        if name in _METHODS and _METHODS[name].planner is not planner:
            raise ValueError(f"training method '{name}' is registered twice")
        _METHODS[name] = _Entry(name, frozenset(options), planner)
        return planner

    return deco


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def plan_method(recipe) -> Plan:
    """The checked plan of ``recipe.method`` (ConfigError naming the field otherwise)."""
    entry = _METHODS.get(recipe.method)
    if entry is None:
        raise ConfigError(f"train recipe: method '{recipe.method}' unknown; known: {', '.join(_METHODS)}")
    unknown = set(recipe.options) - entry.options
    if unknown:
        raise ConfigError(
            f"train recipe: options {sorted(unknown)} do not apply to '{entry.name}'; "
            f"allowed: {sorted(entry.options) or 'none'}"
        )
    return entry.planner(recipe)


# -- option readers: every error names the field and the rule ------------------------------
def _bad(field: str, rule: str, value) -> ConfigError:
    return ConfigError(f"train recipe: {field} {rule}, got {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def option_steps(recipe, key: str, default, *, low: int = 0, high: int | None = None) -> int:
    """Option ``key`` as a step count in [low, high] (high defaults to ``recipe.steps``):
    a float <= 1.0 is a fraction of ``steps`` (0.75), anything else a whole step count."""
    value = recipe.options.get(key, default)
    field = f"options.{key}"
    high = recipe.steps if high is None else high
    if not _is_number(value):
        raise _bad(field, "must be a step count or a fraction of steps", value)
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        steps = int(round(value * recipe.steps))
    elif value != int(value):
        raise _bad(field, "must be a whole step count (or a fraction <= 1.0 of steps)", value)
    else:
        steps = int(value)
    if not low <= steps <= high:
        raise ConfigError(
            f"train recipe: {field} = {value!r} is step {steps}, outside [{low}, {high}] "
            f"(steps = {recipe.steps}); the schedule could not finish within the run"
        )
    return steps


def option_int(recipe, key: str, default, *, low: int = 1) -> int:
    value = recipe.options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _bad(f"options.{key}", f"must be an integer >= {low}", value)
    return value


def option_number(recipe, key: str, default, *, low: float = 0.0, high: float = math.inf) -> float:
    value = recipe.options.get(key, default)
    if not _is_number(value) or not low <= value <= high:
        raise _bad(f"options.{key}", f"must be a number in [{low}, {high}]", value)
    return float(value)


def option_choice(recipe, key: str, default, choices) -> str:
    value = recipe.options.get(key, default)
    if not isinstance(value, str) or value not in choices:
        raise _bad(f"options.{key}", f"must be one of {', '.join(choices)}", value)
    return value


def recipe_sparsity(recipe) -> float:
    from ..allocation import check_sparsity

    if recipe.sparsity is None:
        raise ConfigError(f"train recipe: method '{recipe.method}' needs a sparsity (a number in [0, 1))")
    return check_sparsity(recipe.sparsity, "train recipe: sparsity")


def quote_hint(field: str, value) -> ConfigError:
    """A pattern that YAML read as a number: ``2:4`` unquoted is YAML 1.1's base-60 124."""
    return ConfigError(
        f"train recipe: {field} must be a string like \"2:4\", got the number {value!r} "
        "(YAML reads an unquoted N:M as a base-60 number); quote it: \"2:4\""
    )


@recipe_method("dense")
def _plan_dense(recipe) -> Plan:
    return Plan(build=lambda model, optimizer, context: None, total_steps=recipe.steps)
