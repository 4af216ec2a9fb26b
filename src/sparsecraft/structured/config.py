"""``ShrinkConfig``: how much of which units to remove, and by which criterion.

YAML and Python build it the same way (``ShrinkConfig.from_dict``). Fractions are per layer
and uniform; a fraction ``f`` over ``u`` units removes ``floor(f*u + 0.5)`` of them (the
project's rounding rule), so the counts are exact and the report lists them.

* ``mlp``: MLP intermediate channels per block.
* ``heads``: attention heads per block. Under GQA the unit is a key/value group (its k/v
  head, all its query heads and their output-projection columns), so the fraction applies
  to the k/v groups: SmolLM2's 3 groups with ``heads=0.33`` lose 1 group (3 of 9 heads).
* ``query_heads``: query heads removed inside every remaining k/v group, the same number in
  each, so the layer keeps one ``num_key_value_groups``. Without GQA (one query head per
  k/v head) it cannot remove anything and is refused; use ``heads``.
* ``conv``: conv filters per conv layer whose channels can be followed (see ``fxdeps``).
* ``linear``: output neurons per hidden ``nn.Linear`` whose outputs can be followed into the
  next Linear (plain MLPs; the head is never shrunk).
* ``overrides``: ``{rule: fraction}``; a glob or ``re:`` rule on the layer name (the MLP,
  attention or conv module, e.g. ``model.layers.0.mlp``) replaces that layer's fraction
  (``mlp``, ``heads`` or ``conv``; ``query_heads`` is not overridden).
* ``round_to``: keep a multiple of this many MLP channels / conv filters (fast kernels like
  round sizes); the kept count is rounded to the nearest multiple, at least one multiple.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ConfigError, config_fields

__all__ = ["ShrinkConfig", "CRITERIA", "FRACTIONS"]

CRITERIA = ("magnitude", "wanda", "taylor", "lrp-epsilon", "lrp-zplus")
FRACTIONS = ("mlp", "heads", "query_heads", "conv", "linear")


def check_fraction(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{what} must be in [0, 1) (a layer cannot lose all its units), got {value}")
    return float(value)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


@dataclass
class ShrinkConfig:
    """What structured shrinking removes; validated on construction."""

    mlp: float = 0.0
    heads: float = 0.0
    query_heads: float = 0.0
    conv: float = 0.0
    linear: float = 0.0
    criterion: str = "magnitude"
    overrides: dict[str, float] = field(default_factory=dict)
    round_to: int = 1
    batch_size: int = 4  # calibration samples per forward pass (wanda, taylor)

    def __post_init__(self):
        self.validate()

    def validate(self) -> "ShrinkConfig":
        for name in FRACTIONS:
            setattr(self, name, check_fraction(getattr(self, name), name))
        if self.criterion not in CRITERIA:
            raise ConfigError(f"unknown criterion '{self.criterion}'; known: {', '.join(CRITERIA)}")
        if not isinstance(self.overrides, Mapping):
            raise ConfigError(f"overrides must map layer rules to fractions, got {type(self.overrides).__name__}")
        for rule, value in self.overrides.items():
            if not isinstance(rule, str) or not rule:
                raise ConfigError(f"override rule must be a non-empty string, got {rule!r}")
            check_fraction(value, f"override '{rule}'")
        _positive_int(self.round_to, "round_to")
        _positive_int(self.batch_size, "batch_size")
        if not any(getattr(self, n) for n in FRACTIONS) and not any(self.overrides.values()):
            raise ConfigError("nothing to shrink: set mlp, heads, query_heads, conv or linear above 0")
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.criterion != "magnitude"

    def kinds(self) -> set[str]:
        """Unit kinds asked for by a fraction above 0 (overrides may add layers of any kind)."""
        kinds = {k for k in ("mlp", "heads", "conv", "linear") if getattr(self, k)}
        if self.query_heads:
            kinds.add("heads")
        return kinds

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ShrinkConfig":
        return cls(**config_fields(cls, data, "shrink config", "unknown shrink config keys"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
