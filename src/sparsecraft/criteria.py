"""Importance criteria: a layer's context -> one score per weight (higher = more important).

A criterion only scores; a pattern then decides which scores survive. Criteria that need
more than the weight (calibration statistics such as input norms, Hessians, or gradients)
declare it in ``requires``; the driver collects those before calling, so callers of
``prune_`` never change when a new criterion arrives.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from .errors import ConfigError

__all__ = [
    "LayerContext",
    "Criterion",
    "Magnitude",
    "Random",
    "register_criterion",
    "get_criterion",
    "CRITERIA",
]


@dataclass
class LayerContext:
    """Everything a criterion may look at for one target parameter."""

    name: str  # qualified parameter name, e.g. "model.layers.0.mlp.up_proj.weight"
    module: nn.Module
    param: torch.Tensor
    stats: Mapping[str, Any] = field(default_factory=dict)  # calibration statistics
    grad: torch.Tensor | None = None


class Criterion:
    """Base class: ``__call__(ctx) -> scores`` of ``ctx.param``'s shape."""

    name: ClassVar[str] = ""
    #: Names of statistics the driver must put in ``ctx.stats`` ("grad" means ctx.grad).
    requires: ClassVar[tuple[str, ...]] = ()
    #: Whether scores of different layers are comparable (needed by global allocation).
    globally_comparable: ClassVar[bool] = False

    def __call__(self, ctx: LayerContext) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


CRITERIA: dict[str, type[Criterion]] = {}


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: make a criterion available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty name")
    CRITERIA[cls.name] = cls
    return cls


def get_criterion(name: str, **kwargs) -> Criterion:
    try:
        cls = CRITERIA[name]
    except KeyError:
        raise ConfigError(
            f"unknown criterion '{name}'; known: {', '.join(sorted(CRITERIA))}"
        ) from None
    return cls(**kwargs)


@register_criterion
class Magnitude(Criterion):
    """|w|: the classic baseline."""

    name = "magnitude"
    globally_comparable = True

    def __call__(self, ctx):
        return ctx.param.detach().abs().float()


@register_criterion
class Random(Criterion):
    """Uniform random scores, seeded per layer so a run is reproducible.

    The layer's stream depends on ``seed`` and the layer name only (a CRC of the name),
    so adding or removing other targets does not change this layer's mask.
    """

    name = "random"
    globally_comparable = True

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def __call__(self, ctx):
        gen = torch.Generator(device="cpu")
        gen.manual_seed((self.seed * 1_000_003 + zlib.crc32(ctx.name.encode())) % (2**63))
        scores = torch.rand(ctx.param.shape, generator=gen, dtype=torch.float32)
        return scores.to(ctx.param.device)

    def __repr__(self):
        return f"Random(seed={self.seed})"
