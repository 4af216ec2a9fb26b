"""Counting the training FLOPs of variational layers, sparse and dense, side by side.

:class:`TrainingFlops` watches every variational layer's training forward passes (a
forward hook reads the batch size and output positions) and counts, per pass, the
multiply-adds of the local reparameterisation: the mean ``x mu^T`` and the variance
``x^2 sigma^2^T`` (two products), forward and backward (twice the forward), i.e.
``3 * 2 * 2 * weights * batch * positions`` FLOPs with ``weights`` the layer's nonzero
means (``sparse``) or all of them (``dense``, what dense VI would do on the same run).
``add_dense_gradient`` counts the extra work of a dense weight gradient (gradient-guided
growth) for the inactive weights. Element-wise work (sampling, activations) is left out
on both sides.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TrainingFlops"]


class TrainingFlops:
    def __init__(self, layers: list[tuple[str, nn.Module]]):
        self.layers = layers
        self.sparse = 0.0
        self.dense = 0.0
        self._last: dict[str, tuple[int, int]] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in layers]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not module.training:
                return
            batch = output.shape[0]
            positions = output.numel() // max(1, batch * output.shape[1])
            weights = module.weight.numel()
            nonzero = int(torch.count_nonzero(module.weight.detach()))
            self._last[name] = (batch, positions)
            self.sparse += 12.0 * nonzero * batch * positions
            self.dense += 12.0 * weights * batch * positions
        return hook

    def add_dense_gradient(self) -> None:
        """The weight gradient of the inactive weights, for the last pass of every layer."""
        for name, m in self.layers:
            batch, positions = self._last.get(name, (0, 0))
            inactive = m.weight.numel() - int(torch.count_nonzero(m.weight.detach()))
            self.sparse += 2.0 * inactive * batch * positions

    def ratio(self) -> float:
        return self.sparse / self.dense if self.dense else float("nan")

    def state(self) -> dict[str, float]:
        return {"sparse": self.sparse, "dense": self.dense}

    def load(self, state: dict[str, float]) -> None:
        self.sparse, self.dense = float(state["sparse"]), float(state["dense"])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
