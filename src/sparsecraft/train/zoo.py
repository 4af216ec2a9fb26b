"""Small models for the built-in experiments: ``lenet300`` (LeNet-300-100), ``cnn``
(LeNet-5-like, for image data sets), ``mlp`` (two hidden layers of 256)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError

__all__ = ["MODELS", "MLP", "LeNet5", "build_model"]

MODELS = ("lenet300", "cnn", "mlp")


class MLP(nn.Module):
    def __init__(self, inputs: int, hidden: tuple[int, ...], classes: int):
        super().__init__()
        sizes = (inputs, *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.head = nn.Linear(sizes[-1], classes)

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.head(x)


class LeNet5(nn.Module):
    """Two 5x5 convolutions (8 and 16 filters) with pooling, then 64 hidden units."""

    def __init__(self, side: int, classes: int):
        super().__init__()
        k = 5 if side >= 20 else 3
        self.conv1 = nn.Conv2d(1, 8, k)
        self.conv2 = nn.Conv2d(8, 16, k)
        s = ((side - k + 1) // 2 - k + 1) // 2 if side >= 20 else side - 2 * (k - 1)
        self.pool = side >= 20
        self.fc = nn.Linear(16 * s * s, 64)
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(x, 2) if self.pool else x
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2) if self.pool else x
        return self.head(F.relu(self.fc(x.flatten(1))))


def build_model(name: str, example: torch.Tensor, classes: int = 10) -> nn.Module:
    inputs = example[0].numel()
    if name == "lenet300":
        return MLP(inputs, (300, 100), classes)
    if name == "mlp":
        return MLP(inputs, (256, 256), classes)
    if name == "cnn":
        if example.dim() != 4:
            raise ConfigError("model 'cnn' needs image data (mnist or digits)")
        return LeNet5(example.shape[-1], classes)
    raise ConfigError(f"unknown model '{name}'; known: {', '.join(MODELS)}")
