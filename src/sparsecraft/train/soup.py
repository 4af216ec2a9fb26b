"""Sparse model soups (Zimmer et al., 2023): average models that share one mask.

Retraining copies of one pruned model with different seeds or data orders, each under the
same fixed mask, gives ingredients whose zeros coincide; their average keeps that mask.
:func:`sparse_soup` runs this for one or several prune-retrain rounds, each round starting
from the previous soup.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import SparsecraftError
from ..targets import TargetSpec, select_targets

__all__ = ["average_models", "sparse_soup", "zero_masks"]

log = logging.getLogger(__name__)


def zero_masks(model: nn.Module, targets: TargetSpec | dict | None = None) -> dict[str, torch.Tensor]:
    """Keep-masks (nonzero positions) of the model's targets."""
    return {t.name: t.param.detach() != 0 for t in select_targets(model, targets)}


@torch.no_grad()
def average_models(models: Sequence[nn.Module], *, targets: TargetSpec | dict | None = None) -> nn.Module:
    """A new model whose floating-point parameters and buffers are the mean of ``models``.

    The ingredients must have the same architecture and the same zeros in every target
    (that is what makes the soup sparse); integer buffers (e.g. BatchNorm's step counter)
    are taken from the first model.
    """
    if len(models) < 1:
        raise SparsecraftError("a soup needs at least one model")
    first = models[0]
    keys = list(first.state_dict().keys())
    reference = zero_masks(first, targets)
    for i, m in enumerate(models[1:], start=1):
        if list(m.state_dict().keys()) != keys:
            raise SparsecraftError(f"soup ingredient {i} has a different architecture from ingredient 0")
        for name, keep in zero_masks(m, targets).items():
            if name not in reference or not torch.equal(keep, reference[name]):
                raise SparsecraftError(
                    f"soup ingredient {i}: layer '{name}' has a different mask from ingredient 0; "
                    "ingredients must be retrained under one shared mask"
                )
    soup = copy.deepcopy(first)
    states = [m.state_dict() for m in models]
    averaged = {}
    for key, value in states[0].items():
        if torch.is_floating_point(value) or torch.is_complex(value):
            stacked = torch.stack([s[key].to(torch.float64) for s in states])
            averaged[key] = stacked.mean(dim=0).to(value.dtype)
        else:
            averaged[key] = value.clone()
    soup.load_state_dict(averaged)
    return soup


def sparse_soup(
    model: nn.Module,
    retrain: Callable[[nn.Module, int, int], nn.Module],
    seeds: Sequence[int],
    *,
    rounds: int = 1,
    prune: Callable[[nn.Module, int], nn.Module] | None = None,
    targets: TargetSpec | dict | None = None,
) -> tuple[nn.Module, list[list[nn.Module]]]:
    """Prune-retrain-average for ``rounds`` rounds.

    Each round: ``prune(model, round)`` (skipped when None, e.g. the model is already
    pruned), then ``retrain(copy, seed, round)`` for every seed on an independent copy (it
    must keep the mask, e.g. with :class:`StaticSparsity` ``criterion='existing'``), then the
    average becomes the next round's model. Returns the final soup and every round's
    ingredients.
    """
    if not seeds:
        raise SparsecraftError("a soup needs at least one seed")
    if int(rounds) != rounds or rounds < 1:
        raise SparsecraftError(f"rounds must be a positive integer, got {rounds}")
    all_ingredients = []
    current = model
    for r in range(int(rounds)):
        if prune is not None:
            current = prune(current, r)
        mask = zero_masks(current, targets)
        ingredients = []
        for seed in seeds:
            trained = retrain(copy.deepcopy(current), seed, r)
            for name, keep in zero_masks(trained, targets).items():
                if (keep & ~mask[name]).any():
                    raise SparsecraftError(
                        f"round {r}, seed {seed}: retraining revived pruned weights in '{name}'; "
                        "retrain under a fixed mask"
                    )
            ingredients.append(trained)
        current = average_models(ingredients, targets=targets)
        all_ingredients.append(ingredients)
        log.info("soup round %d: averaged %d ingredients", r + 1, len(ingredients))
    return current, all_ingredients
