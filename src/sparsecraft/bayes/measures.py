"""Uncertainty measures for any classifier, Bayesian or not.

Pure functions of predicted class probabilities ``probs [n, classes]`` and labels ``y [n]``:

* :func:`nll`: mean negative log-likelihood ``-log p(y)`` (probabilities floored at 1e-12);
* :func:`ece`: expected calibration error with ``bins`` equal-width confidence bins
  (default 15): ``sum_b |B_b|/n * |accuracy(B_b) - confidence(B_b)|``; a confidence of
  exactly ``k/bins`` falls into bin ``k-1`` (bins are closed on the right), 0 into the first;
* :func:`brier`: mean over examples of ``sum_c (p_c - [y = c])^2``;
* :func:`entropy`: predictive entropy per example (nats);
* :func:`auroc`: area under the ROC curve separating two score sets (ties count 1/2).

:func:`predict_probs` averages the softmax over ``samples`` Monte-Carlo draws of a model's
variational layers (or takes the mean weights, ``samples=None``); :func:`ood_inputs` builds the
out-of-distribution sets and :func:`uncertainty_report` puts everything together.

Out-of-distribution sets for image data: ``rotated`` (every test image turned 90 degrees)
keeps the pixel statistics of real strokes, so a model cannot flag it from low-level
intensity alone, only from shape; ``noise`` (Gaussian images with the data's mean and
standard deviation per pixel) is the easy sanity check. For 1-D signals (mnist1d),
``reversed`` flips the time axis.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .layers import bayes_layers, sampling

__all__ = ["nll", "ece", "brier", "entropy", "auroc", "predict_probs", "ood_inputs", "uncertainty_report",
           "OOD_KINDS", "check_samples"]

OOD_KINDS = ("rotated", "noise", "reversed")


def _check(probs: torch.Tensor, y: torch.Tensor | None = None) -> None:
    if not torch.is_tensor(probs) or probs.dim() != 2 or probs.shape[0] == 0:
        raise ConfigError(f"probs must be a non-empty tensor [n, classes], got {getattr(probs, 'shape', probs)!r}")
    if not torch.isfinite(probs).all() or (probs < 0).any():
        raise ConfigError("probs must be finite and >= 0")
    if not torch.allclose(probs.sum(1), torch.ones(len(probs), dtype=probs.dtype), atol=1e-4):
        raise ConfigError("probs: every row must sum to 1 (pass softmax outputs, not logits)")
    if y is not None:
        if not torch.is_tensor(y) or y.shape != probs.shape[:1]:
            raise ConfigError(f"y must be a tensor of {probs.shape[0]} labels, got {getattr(y, 'shape', y)!r}")
        if (y < 0).any() or (y >= probs.shape[1]).any():
            raise ConfigError(f"y: labels must be in [0, {probs.shape[1]})")


def nll(probs: torch.Tensor, y: torch.Tensor) -> float:
    _check(probs, y)
    return float(-torch.log(probs.gather(1, y.long()[:, None]).clamp_min(1e-12)).mean())


def ece(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    _check(probs, y)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ConfigError(f"bins must be an integer >= 1, got {bins!r}")
    conf, pred = probs.max(1)
    correct = (pred == y).to(probs.dtype)
    which = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += float(inside.sum()) / len(y) * abs(float(correct[inside].mean() - conf[inside].mean()))
    return total


def brier(probs: torch.Tensor, y: torch.Tensor) -> float:
    _check(probs, y)
    onehot = torch.nn.functional.one_hot(y.long(), probs.shape[1]).to(probs.dtype)
    return float(((probs - onehot) ** 2).sum(1).mean())


def entropy(probs: torch.Tensor) -> torch.Tensor:
    _check(probs)
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(1)


def auroc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """P(score of a positive > score of a negative) + 1/2 P(equal): Mann-Whitney U / (n m)."""
    neg, pos = torch.as_tensor(negatives).double().flatten(), torch.as_tensor(positives).double().flatten()
    if not len(neg) or not len(pos):
        raise ConfigError("auroc needs at least one score on each side")
    scores = torch.cat([neg, pos])
    order = torch.argsort(scores, stable=True)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inverse = torch.unique(scores, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    u = float(ranks[len(neg):].sum()) - len(pos) * (len(pos) + 1) / 2
    return u / (len(neg) * len(pos))


def check_samples(samples: Any) -> int | None:
    if samples is None:
        return None
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"samples (Monte-Carlo draws) must be an integer >= 1 or None (mean weights), got {samples!r}")
    return samples


@torch.no_grad()
def predict_probs(model: nn.Module, x: torch.Tensor, samples: int | None = None, *, batch: int = 1000,
                  seed: int = 0) -> torch.Tensor:
    """Softmax probabilities ``[n, classes]``: with ``samples`` (>= 1) the average over that many
    draws of the variational layers (seeded, independent of torch's global generator), else
    with the mean weights. A model without variational layers predicts once."""
    samples = check_samples(samples)
    was = model.training
    model.eval()
    layers = [m for _, m in bayes_layers(model)]
    stochastic = samples is not None and bool(layers)
    gen = torch.Generator().manual_seed(seed)
    saved = [m.noise_generator for m in layers]
    try:
        for m in layers:
            m.noise_generator = gen
        out = []
        with sampling(model, stochastic):
            for i in range(0, len(x), batch):
                xb = x[i:i + batch]
                draws = samples if stochastic else 1
                p = sum(torch.softmax(model(xb).double(), 1) for _ in range(draws)) / draws
                out.append(p)
    finally:
        for m, g in zip(layers, saved):
            m.noise_generator = g
        model.train(was)
    return torch.cat(out).float()


def ood_inputs(x: torch.Tensor, kind: str, seed: int = 0) -> torch.Tensor:
    """An out-of-distribution set with the shape of ``x`` (see the module docstring)."""
    if kind == "rotated":
        if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
            raise ConfigError(f"ood 'rotated' needs square images [n, c, h, h], got {tuple(x.shape)}")
        return torch.rot90(x, 1, dims=(-2, -1)).contiguous()
    if kind == "reversed":
        return torch.flip(x, dims=(-1,)).contiguous()
    if kind == "noise":
        g = torch.Generator().manual_seed(seed)
        mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True)
        return mean + std * torch.randn(x.shape, generator=g, dtype=x.dtype)
    raise ConfigError(f"unknown ood set '{kind}'; known: {', '.join(OOD_KINDS)}")


def uncertainty_report(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_ood: torch.Tensor | None = None,
                       *, samples: int | None = None, bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL, ECE, Brier on ``(x, y)``; with ``x_ood`` (same input shape) also the mean
    predictive entropy in and out of distribution and the AUROC of telling them apart by entropy."""
    samples = check_samples(samples)
    if x_ood is not None and tuple(x_ood.shape[1:]) != tuple(x.shape[1:]):
        raise ConfigError(
            f"x_ood: inputs of shape {tuple(x_ood.shape[1:])} differ from the test inputs' {tuple(x.shape[1:])}"
        )
    probs = predict_probs(model, x, samples)
    out = {"accuracy": float((probs.argmax(1) == y).float().mean()), "nll": nll(probs, y),
           "ece": ece(probs, y, bins), "brier": brier(probs, y)}
    if x_ood is not None:
        h_in, h_out = entropy(probs), entropy(predict_probs(model, x_ood, samples))
        out.update({"entropy_in": float(h_in.mean()), "entropy_ood": float(h_out.mean()),
                    "auroc_ood": auroc(h_in, h_out)})
    return out
