"""sparsecraft: make neural networks sparse and keep them good and fast.

The public API is re-exported here; see the README for a tour.
"""

from __future__ import annotations

import importlib
import logging

from .allocation import allocate
from .criteria import Criterion, LayerContext, Refiner, Solver, register_criterion, register_refiner, register_solver
from .errors import ConfigError, FormatError, SparsecraftError, TargetError
from .masks import SparsityState, get_meta
from .patterns import NM, Block, Group, Pattern, Rows, Unstructured, parse_pattern
from .prune import (
    GPTQ,
    RTN,
    Magnitude,
    PruneConfig,
    RandomPrune,
    SparseGPT,
    Wanda,
    method_config,
    prune_,
    quantize_,
    register_method,
)
from .report import Report, report  # eager: the name `report` must stay the function
from .targets import Target, TargetSpec, select_targets

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

# Heavier parts load on first use so `import sparsecraft` stays fast.
_LAZY = {
    "save": ("sparsecraft.checkpoint", "save"),
    "load": ("sparsecraft.checkpoint", "load"),
    "prune_pretrained": ("sparsecraft.streaming", "prune_pretrained"),
    "models": ("sparsecraft.models", None),
    "data": ("sparsecraft.data", None),
    "formats": ("sparsecraft.formats", None),
    "recovery": ("sparsecraft.recovery", None),
    "train": ("sparsecraft.train", None),
    "structured": ("sparsecraft.structured", None),
    "runtime": ("sparsecraft.runtime", None),
    "bayes": ("sparsecraft.bayes", None),
    "quant": ("sparsecraft.quant", None),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'sparsecraft' has no attribute '{name}'")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


__all__ = [
    "prune_", "PruneConfig", "Magnitude", "RandomPrune", "Wanda", "SparseGPT", "method_config", "register_method",
    "quantize_", "GPTQ", "RTN",
    "Solver", "Refiner", "register_solver", "register_refiner",
    "SparsityState", "get_meta", "select_targets", "Target", "TargetSpec",
    "Pattern", "Unstructured", "NM", "Block", "Rows", "Group", "parse_pattern",
    "Criterion", "LayerContext", "register_criterion", "allocate",
    "SparsecraftError", "ConfigError", "TargetError", "FormatError",
    "save", "load", "prune_pretrained", "report", "Report", "models", "data", "formats", "recovery", "train", "structured", "runtime", "bayes",
    "quant",
]
