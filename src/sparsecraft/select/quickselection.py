"""QuickSelection: unsupervised feature selection from a sparse denoising autoencoder.

Atashgahi et al. (2022): a one-hidden-layer denoising autoencoder whose two layers are sparse
from the start (Erdos-Renyi, ``epsilon * (n_in + n_out)`` connections) and trained with SET
(after every epoch the fraction ``zeta`` of each layer's weakest connections is removed and
as many new ones are added at random). A feature's importance is the *strength* of its input
neuron: the sum of ``|w|`` over its remaining encoder connections. Features whose
reconstruction the network needs keep strong connections; noise features lose theirs.

The weights are truly sparse: each layer stores its connections as index lists and a value
vector (:class:`SparseLinear`); no dense ``n_features x hidden`` matrix or mask ever exists,
so memory grows with the number of connections (and ``batch_size`` times it during a step),
not with ``n_features * hidden``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.feature_selection import SelectorMixin

from ..errors import ConfigError

__all__ = ["QuickSelection", "SparseLinear"]

log = logging.getLogger(__name__)


class SparseLinear:
    """``y = x W + b`` with ``W`` (``n_in x n_out``) stored as ``rows``, ``cols``, ``values``."""

    def __init__(self, n_in: int, n_out: int, n_connections: int, gen: torch.Generator):
        self.n_in, self.n_out = n_in, n_out
        n_connections = min(n_connections, n_in * n_out)
        flat = _unique_random(n_connections, n_in * n_out, torch.empty(0, dtype=torch.long), gen)
        self.rows, self.cols = flat // n_out, flat % n_out
        bound = math.sqrt(6.0 / (n_in + n_out))  # Glorot range, as for the dense layer
        self.values = (torch.rand(n_connections, generator=gen) * 2 - 1) * bound
        self.bias = torch.zeros(n_out)
        self.values.requires_grad_(True)
        self.bias.requires_grad_(True)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # gather the inputs of every connection, weight them, add them into their outputs
        contrib = x[:, self.rows] * self.values
        out = torch.zeros(x.shape[0], self.n_out, dtype=x.dtype).index_add_(1, self.cols, contrib)
        return out + self.bias

    def parameters(self) -> list[torch.Tensor]:
        return [self.values, self.bias]

    @torch.no_grad()
    def evolve_(self, zeta: float, gen: torch.Generator) -> torch.Tensor:
        """SET: drop the ``zeta`` fraction of the smallest |w|, add as many at random; returns
        the positions (into ``values``) of the new connections, which start at zero."""
        k = int(zeta * self.nnz)
        if k == 0:
            return torch.empty(0, dtype=torch.long)
        keep = torch.argsort(self.values.abs(), descending=True, stable=True)[: self.nnz - k]
        flat = self.rows[keep] * self.n_out + self.cols[keep]
        new = _unique_random(k, self.n_in * self.n_out, flat, gen)
        flat = torch.cat([flat, new])
        values = torch.cat([self.values[keep], torch.zeros(k)])
        self.rows, self.cols = flat // self.n_out, flat % self.n_out
        self.values = values.requires_grad_(True)
        return torch.arange(self.nnz - k, self.nnz)


def _unique_random(k: int, space: int, taken: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``k`` distinct flat indices in ``[0, space)`` not in ``taken`` (rejection sampling)."""
    out = torch.empty(0, dtype=torch.long)
    if k > space - taken.numel():
        raise ConfigError(f"cannot place {k} new connections: only {space - taken.numel()} free positions")
    while out.numel() < k:
        draw = torch.randint(0, space, (2 * (k - out.numel()) + 16,), generator=gen)
        draw = torch.unique(draw)  # sorted; the shuffle below removes that order
        draw = draw[~torch.isin(draw, taken) & ~torch.isin(draw, out)]
        draw = draw[torch.randperm(draw.numel(), generator=gen)]
        out = torch.cat([out, draw[: k - out.numel()]])
    return out


def _check_array(X, what: str = "X") -> np.ndarray:
    try:
        arr = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} must hold numbers only: {exc}") from None
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ConfigError(f"{what} must be a non-empty 2-D array [samples, features], got shape {arr.shape}")
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ConfigError(f"{what} contains NaN or inf (first at row {bad[0]}, column {bad[1]})")
    return arr


class QuickSelection(SelectorMixin, BaseEstimator):
    """Select ``n_features_to_select`` features by input-neuron strength of a sparse DAE.

    ``fit(X)`` (``y`` ignored) scales each feature (``scale``: ``"standard"``, zero mean and unit
    variance; ``"minmax"``, onto [0, 1]; ``"none"``), adds Gaussian
    noise of ``noise`` to the inputs, and trains ``hidden`` sigmoid units to reconstruct the clean
    input (mean squared error; SGD with momentum and weight decay, ``epochs`` passes of
    ``batch_size``; SET after every epoch but the last). ``feature_importances_`` are the
    strengths; ``get_support``/``transform`` come from scikit-learn's ``SelectorMixin``, so the
    estimator works as a step of a ``Pipeline``. ``n_connections_`` counts the stored weights.

    Standard scaling blows up a feature that is almost constant (an MNIST border pixel that a
    handful of digits touch takes values of dozens of standard deviations there), and long
    training then grows connections towards reconstructing those few values: on MNIST, 100
    epochs ranked such pixels first (``benchmarks/results/select.md``). ``"minmax"`` keeps
    every feature within [0, 1].
    """

    SCALES = ("standard", "minmax", "none")

    def __init__(self, n_features_to_select: int = 50, hidden: int = 1000, epsilon: float = 13.0,
                 zeta: float = 0.2, epochs: int = 10, batch_size: int = 100, lr: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 2e-4, noise: float = 0.2,
                 scale: str = "standard", random_state: int = 0):
        self.n_features_to_select = n_features_to_select
        self.hidden = hidden
        self.epsilon = epsilon
        self.zeta = zeta
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.noise = noise
        self.scale = scale
        self.random_state = random_state

    def _check_params(self, n_features: int) -> None:
        for name in ("n_features_to_select", "hidden", "epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"QuickSelection {name} must be a positive integer, got {value!r}")
        if self.n_features_to_select > n_features:
            raise ConfigError(f"QuickSelection n_features_to_select={self.n_features_to_select} but X has only "
                              f"{n_features} features")
        for name, low, high in (("epsilon", 0.0, math.inf), ("zeta", 0.0, 1.0), ("lr", 0.0, math.inf),
                                ("momentum", 0.0, 1.0), ("weight_decay", 0.0, math.inf), ("noise", 0.0, math.inf)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ConfigError(f"QuickSelection {name} must be a number in [{low}, {high}], got {value!r}")
        if self.epsilon <= 0 or self.lr <= 0:
            raise ConfigError("QuickSelection epsilon and lr must be above 0")
        if self.scale not in self.SCALES:
            raise ConfigError(f"QuickSelection scale must be one of {', '.join(self.SCALES)}, got {self.scale!r}")

    def fit(self, X, y=None):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small scattered ops: threads only contend (as in oneshot.mfac)
        try:
            return self._fit(X)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, X):
        arr = _check_array(X)
        n, d = arr.shape
        self._check_params(d)
        gen = torch.Generator().manual_seed(int(self.random_state))
        if self.scale == "standard":
            shift, spread = arr.mean(0), arr.std(0)
        elif self.scale == "minmax":
            shift, spread = arr.min(0), arr.max(0) - arr.min(0)
        else:
            shift, spread = np.zeros(d), np.ones(d)
        spread[spread == 0] = 1.0
        x = torch.from_numpy(((arr - shift) / spread).astype(np.float32))
        per_layer = int(round(self.epsilon * (d + self.hidden)))
        enc = SparseLinear(d, self.hidden, per_layer, gen)
        dec = SparseLinear(self.hidden, d, per_layer, gen)
        layers = [enc, dec]
        velocity = [[torch.zeros_like(p) for p in layer.parameters()] for layer in layers]
        self.loss_curve_ = []
        for epoch in range(self.epochs):
            order = torch.randperm(n, generator=gen)
            total = 0.0
            for s in range(0, n, self.batch_size):
                xb = x[order[s:s + self.batch_size]]
                noisy = xb + self.noise * torch.randn(xb.shape, generator=gen)
                recon = dec(torch.sigmoid(enc(noisy)))
                loss = (recon - xb).pow(2).sum(1).mean()  # per-sample squared error
                params = [p for layer in layers for p in layer.parameters()]
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    i = 0
                    for li, layer in enumerate(layers):
                        for pi, p in enumerate(layer.parameters()):
                            g = grads[i] + self.weight_decay * p
                            v = velocity[li][pi]
                            v.mul_(self.momentum).add_(g)
                            p.sub_(self.lr * v)
                            i += 1
                total += float(loss.detach()) * xb.shape[0]
            self.loss_curve_.append(total / n)
            if epoch < self.epochs - 1 and self.zeta > 0:
                for li, layer in enumerate(layers):
                    keep_v = velocity[li][0]
                    order_keep = torch.argsort(layer.values.detach().abs(), descending=True, stable=True)
                    k = int(self.zeta * layer.nnz)
                    kept = order_keep[: layer.nnz - k]
                    fresh = layer.evolve_(self.zeta, gen)
                    velocity[li][0] = torch.cat([keep_v[kept], torch.zeros(fresh.numel())])
            log.debug("QuickSelection epoch %d: loss %.4f", epoch, self.loss_curve_[-1])
        strength = torch.zeros(d).index_add_(0, enc.rows, enc.values.detach().abs())
        self.feature_importances_ = strength.numpy().astype(np.float64)
        order = np.argsort(-self.feature_importances_, kind="stable")
        self.ranking_ = order
        self.n_features_in_ = d
        self.n_connections_ = enc.nnz + dec.nnz
        self.encoder_, self.decoder_ = enc, dec
        return self

    def _get_support_mask(self):
        mask = np.zeros(self.n_features_in_, dtype=bool)
        mask[self.ranking_[: self.n_features_to_select]] = True
        return mask

    def transform(self, X):
        arr = _check_array(X)
        if arr.shape[1] != self.n_features_in_:
            raise ConfigError(f"X has {arr.shape[1]} features; QuickSelection was fitted on {self.n_features_in_}")
        return arr[:, self._get_support_mask()]
