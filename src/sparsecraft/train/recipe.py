"""``TrainRecipe``: one built-in training run, from YAML or Python, checked completely on creation.

Every field is type-checked (a YAML ``steps: ten`` or ``seed: 1.5`` is an error naming the
field) and the method's options are planned against the run's length, so a schedule that
could not finish within ``steps`` is refused before any data set or model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError, config_fields
from .datasets import DATASETS
from .registry import Plan, method_names, plan_method, quote_hint
from .zoo import MODELS

__all__ = ["TrainRecipe", "IMAGE_DATASETS"]

IMAGE_DATASETS = ("mnist", "digits")  # what model 'cnn' can read
_MAX_SEED = 2**32  # the data order mixes the seed into a 64-bit generator seed


def _bad(msg: str) -> ConfigError:
    return ConfigError(f"train recipe: {msg}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TrainRecipe:
    """One training run. ``options`` holds method settings (see :mod:`.registry`)."""

    data: str = "mnist"
    model: str = "lenet300"
    method: str = "dense"
    sparsity: float | None = 0.9
    pattern: str = "unstructured"
    steps: int = 1500
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    checkpoint_every: int = 500

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainRecipe":
        """Check every field's type and range, then plan the method (schedule vs ``steps``)."""
        self._check_fields()
        self.plan()
        return self

    def _check_fields(self) -> None:
        for key, known in (("data", DATASETS), ("model", MODELS), ("method", method_names()),
                           ("optimizer", ("sgd", "adamw")), ("lr_schedule", ("cosine", "constant"))):
            value = getattr(self, key)
            if not isinstance(value, str):
                raise _bad(f"{key} must be a string (one of {', '.join(known)}), got {value!r}")
            if value not in known:
                raise _bad(f"{key} '{value}' unknown; known: {', '.join(known)}")
        if self.model == "cnn" and self.data not in IMAGE_DATASETS:
            raise _bad(f"model 'cnn' needs image data ({' or '.join(IMAGE_DATASETS)}), got data '{self.data}'")
        if _number(self.pattern):
            raise quote_hint("pattern", self.pattern)
        if not isinstance(self.pattern, str):
            raise _bad(f"pattern must be a string such as \"unstructured\" or \"2:4\", got {self.pattern!r}")
        if self.sparsity is not None and not _number(self.sparsity):
            raise _bad(f"sparsity must be a number in [0, 1) or null, got {self.sparsity!r}")
        for key in ("steps", "batch_size", "checkpoint_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _bad(f"{key} must be a positive integer, got {value!r}")
        if not (_number(self.lr) and self.lr > 0):
            raise _bad(f"lr must be a positive number, got {self.lr!r}")
        if not (_number(self.momentum) and 0 <= self.momentum < 1):
            raise _bad(f"momentum must be a number in [0, 1), got {self.momentum!r}")
        if not (_number(self.weight_decay) and self.weight_decay >= 0):
            raise _bad(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < _MAX_SEED:
            raise _bad(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not isinstance(self.options, dict) or not all(isinstance(k, str) for k in self.options):
            raise _bad(f"options must be a mapping of names to settings, got {self.options!r}")

    def plan(self) -> Plan:
        """The method's checked plan (builder and run length)."""
        return plan_method(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainRecipe":
        return cls(**config_fields(cls, data, "train recipe", "train recipe: unknown keys"))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainRecipe":
        from ..yaml_io import load_yaml_file

        data = load_yaml_file(path, "train recipe")  # reads an unquoted 2:4 as text, not 124
        if isinstance(data, Mapping) and "train" in data:
            data = data["train"]
        return cls.from_dict(data or {})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def total_steps(self) -> int:
        """Optimizer steps in the run (IMP trains ``rounds + 1`` rounds of ``steps``)."""
        return self.plan().total_steps
