"""What Hugging Face ``transformers`` can load of a model sparsecraft changed.

* :func:`hf_config`: the transformers config that describes the model *as it is now*. A
  structurally shrunk model (:mod:`sparsecraft.structured`) has smaller MLPs or fewer heads;
  when every block has the same new sizes and the config has fields for them
  (``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``),
  the returned config carries them. The candidate is verified: the model class built from it
  (on the meta device, no memory) must have exactly the model's tensor shapes; otherwise
  :class:`HFConfig` says why not (``config`` None).
* :func:`write_dense_hf`: a folder of plain dense safetensors shards + ``config.json`` that
  ``transformers.AutoModelForCausalLM.from_pretrained`` (or the model's own auto class) loads:
  the ``dense-hf`` output format, for tools that know nothing about sparsity. Pruned weights
  are stored as zeros; the files are as large as the dense model's.

How to read a size from a block is a small registry of rules (:func:`register_size_rule`): a
new architecture family is one call. Modules outside the repeated blocks are never resized by
shrinking, so only the blocks are read.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import FormatError, TargetError
from .shapes import SHAPES_ATTR

__all__ = ["HFConfig", "hf_config", "check_dense_hf", "write_dense_hf", "SIZE_RULES", "register_size_rule",
           "DEFAULT_SHARD_SIZE"]

log = logging.getLogger(__name__)

#: largest dense-hf shard (transformers' notation); a larger model gets several files and an index
DEFAULT_SHARD_SIZE = "2GB"

#: (config field, rule): a rule reads the field's value from one module of a block, or None
SIZE_RULES: list[tuple[str, Callable[[nn.Module], int | None]]] = []


def register_size_rule(field: str, rule: Callable[[nn.Module], int | None]) -> None:
    """Teach :func:`hf_config` to read config ``field`` from a block's modules."""
    SIZE_RULES.append((field, rule))


def _linear(module: nn.Module, *path: str) -> nn.Linear | None:
    for name in path:
        module = getattr(module, name, None)
    return module if isinstance(module, nn.Linear) else None


def _gated_mlp(m):  # Llama, Mistral, Qwen2, Gemma ...
    up = _linear(m, "up_proj")
    return up.out_features if up is not None and _linear(m, "gate_proj") and _linear(m, "down_proj") else None


def _two_layer_mlp(m):  # BERT-style: intermediate.dense
    up = _linear(m, "intermediate", "dense")
    return up.out_features if up is not None and _linear(m, "output", "dense") else None


def _head_dim(m) -> int | None:
    head_dim = getattr(m, "head_dim", None)
    ok = isinstance(head_dim, int) and head_dim > 0 and all(_linear(m, p) for p in ("q_proj", "k_proj", "v_proj"))
    return head_dim if ok else None


def _query_heads(m):
    d = _head_dim(m)
    return m.q_proj.out_features // d if d else None


def _kv_heads(m):
    d = _head_dim(m)
    return m.k_proj.out_features // d if d else None


def _bert_heads(m):
    value = getattr(m, "num_attention_heads", None)
    return value if isinstance(value, int) and hasattr(m, "attention_head_size") and _linear(m, "query") else None


for _field, _rule in (("intermediate_size", _gated_mlp), ("intermediate_size", _two_layer_mlp),
                      ("num_attention_heads", _query_heads), ("num_key_value_heads", _kv_heads),
                      ("head_dim", _head_dim), ("num_attention_heads", _bert_heads)):
    register_size_rule(_field, _rule)


@dataclass(frozen=True)
class HFConfig:
    """The config for a model as it is (``config``), or None with the ``reason`` it has none.

    ``uniform``: every block has the same sizes; ``changed``: the config fields that differ
    from the model's own config.
    """

    config: object | None
    uniform: bool
    changed: dict
    reason: str = ""

    def record(self, pruned: bool = False) -> dict:
        """What a checkpoint's header says about it (``extra["shrink"]``); ``pruned``: the
        checkpoint also stores pruned (compressed) tensors, which transformers cannot read."""
        note = self.reason or ("config.json holds the new sizes; " + (
            "the pruned tensors are stored compressed: save with format dense-hf for transformers" if pruned
            else "transformers loads the folder"))
        return {"uniform": self.uniform, "hf_config": self.config is not None, "sizes": dict(self.changed),
                "note": note}


def _is_transformers(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return hasattr(model, "save_pretrained") and config is not None and hasattr(config, "to_dict")


def _block_sizes(model: nn.Module) -> dict[str, list[int]]:
    from .blocks import find_blocks

    _, blocks = find_blocks(model)
    sizes: dict[str, list[int]] = {}
    for block in blocks:
        found: dict[str, int] = {}
        for module in block.modules():
            for field, rule in SIZE_RULES:
                value = rule(module)
                if value is not None and field not in found:
                    found[field] = int(value)
        for field, value in found.items():
            sizes.setdefault(field, []).append(value)
    return sizes


def _first_mismatch(model: nn.Module, config) -> str | None:
    """The first tensor whose shape the model class built from ``config`` does not reproduce."""
    try:
        with torch.device("meta"):
            skeleton = type(model)(config)
    except Exception as e:  # a config transformers accepts may still not build
        return f"{type(model).__name__} cannot be built from the new sizes ({e})"
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    extra = sorted(set(expected) - set(model.state_dict()))
    if extra:
        return f"{type(config).__name__} gives tensors the model does not have ({', '.join(extra[:3])})"
    for name, t in model.state_dict().items():
        if expected.get(name) != tuple(t.shape):
            return (f"tensor '{name}' is {list(t.shape)} but {type(config).__name__} gives "
                    f"{list(expected[name]) if name in expected else 'no such tensor'}")
    return None


def hf_config(model: nn.Module) -> HFConfig:
    """The transformers config describing ``model``'s current sizes (see the module docstring)."""
    if not _is_transformers(model):
        return HFConfig(None, True, {}, f"{type(model).__name__} is not a transformers model (no config)")
    config = model.config
    if not getattr(model, SHAPES_ATTR, None):
        return HFConfig(config, True, {})
    try:
        sizes = _block_sizes(model)
    except TargetError as e:  # no repeated blocks: nothing to read sizes from
        return HFConfig(None, False, {}, f"the shrunk sizes cannot be read from the model ({e})")
    original = config.to_dict()
    uneven = {f: sorted(set(v)) for f, v in sizes.items() if len(set(v)) > 1}
    if uneven:
        detail = "; ".join(f"{f} {', '.join(map(str, v))}" for f, v in sorted(uneven.items()))
        return HFConfig(None, False, {}, f"non-uniform shrink: the blocks have different sizes ({detail}); "
                                         f"a transformers config holds one size per field")
    changed = {f: v[0] for f, v in sizes.items() if f in original and original[f] != v[0]}
    if not changed:
        return HFConfig(config, True, {})
    candidate = copy.deepcopy(config)
    for field, value in sizes.items():  # unchanged fields too: head_dim must be explicit once heads change
        if field in original:
            setattr(candidate, field, value[0])
    problem = _first_mismatch(model, candidate)
    if problem is not None:
        return HFConfig(None, True, changed, f"{type(config).__name__} cannot express this shrink: {problem}")
    return HFConfig(candidate, True, changed)


def check_dense_hf(model: nn.Module):
    """The config a dense-hf folder of ``model`` gets; FormatError when transformers cannot
    express the model (not a transformers model, or a shrink its config cannot describe)."""
    if not _is_transformers(model):
        raise FormatError(f"format dense-hf needs a transformers model; {type(model).__name__} is not one "
                          f"(save it in the sparsecraft format)")
    found = hf_config(model)
    if found.config is None:
        raise FormatError(f"format dense-hf: {found.reason}; save in the sparsecraft format instead "
                          f"(sparsecraft.load reads it)")
    return found.config


def write_dense_hf(model: nn.Module, folder: Path, *, max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> None:
    """Write ``model`` into the existing, empty ``folder`` as transformers would save it
    (dense safetensors shards, index when sharded, ``config.json``) with the config of
    :func:`check_dense_hf`. The caller makes the folder appear atomically."""
    config = check_dense_hf(model)
    original = model.config
    try:
        model.config = config  # the shrunk sizes, for the length of the save
        model.save_pretrained(str(folder), max_shard_size=max_shard_size)
    finally:
        model.config = original
    written = sorted(p.name for p in folder.iterdir())
    if not any(name.endswith(".safetensors") for name in written):
        raise FormatError(f"transformers wrote no safetensors file into '{folder}' (got {written})")
