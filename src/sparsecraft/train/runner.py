"""Built-in sparse-training experiments: real data sets, small models, one training loop.

``TrainRecipe`` (YAML or Python, same fields) says which data set, model, method and
schedule; :func:`run_training` trains, checkpoints atomically every ``checkpoint_every``
steps (model, optimizer, sparsity state, with a checksum), resumes from the last checkpoint
of the same recipe, and ends with a report (test accuracy, per-layer sparsity, timings).

The pieces live in their own modules: :mod:`.datasets`, :mod:`.zoo` (models),
:mod:`.recipe`, :mod:`.registry` (methods register themselves in their own modules),
:mod:`.checkpoints` and :mod:`.loop`. This module gathers them under one name.
"""

from __future__ import annotations

from .checkpoints import CHECKPOINT
from .datasets import DATASETS, load_dataset
from .loop import accuracy, build_sparsity, run_training
from .recipe import TrainRecipe
from .registry import method_names
from .zoo import MODELS, build_model

__all__ = ["TrainRecipe", "run_training", "load_dataset", "build_model", "accuracy", "build_sparsity",
           "DATASETS", "MODELS", "METHODS", "CHECKPOINT"]  # noqa: F822 - METHODS via __getattr__


def __getattr__(name: str):
    if name == "METHODS":  # the registry's names, read when asked (methods register on import)
        return method_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
