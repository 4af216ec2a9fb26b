"""Repeated blocks of a model, found by structure, and the inputs that reach them.

Neutral ground for everything that walks a transformer-like stack block by block (the
one-shot driver, structured shrinking): no method lives here.

* :func:`find_blocks`: the largest ``ModuleList`` of same-type modules holding targets;
* :func:`capture_block_inputs`: run the model up to the first block and record its inputs
  (hidden states plus the other arguments: attention masks, position embeddings);
* :func:`run_block`: one block over recorded batches; :func:`block_targets`: targets per block;
* :func:`check_calibration`: validate calibration token ids against the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, SparsecraftError, TargetError
from .targets import Target

__all__ = [
    "BlockBatch", "find_blocks", "check_calibration", "capture_block_inputs", "run_block",
    "block_targets",
]


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


@dataclass
class BlockBatch:
    """One calibration batch at a block boundary: the hidden states and the other inputs."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]


def find_blocks(model: nn.Module, targets: list[Target] | None = None) -> tuple[str, nn.ModuleList]:
    """The repeated blocks: the ModuleList of same-type modules holding the most parameters."""
    target_modules = {id(t.module) for t in targets} if targets else None
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if target_modules is not None and not any(
            id(m) in target_modules for block in module for m in block.modules()
        ):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (name, module), size
    if best is None:
        raise TargetError(
            "found no repeated blocks (a ModuleList of same-type layers holding targets); "
            "calibrated methods need a transformer-like stack"
        )
    return best


def check_calibration(model: nn.Module, calibration) -> torch.Tensor:
    """Validate calibration token ids ``[samples, seq_len]``; returns them as a LongTensor."""
    if calibration is None:
        raise ConfigError("this method needs calibration data (token ids [samples, seq_len])")
    if not isinstance(calibration, torch.Tensor):
        try:
            calibration = torch.as_tensor(calibration)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"calibration must be token ids [samples, seq_len]: {exc}") from None
    if calibration.dim() != 2 or calibration.shape[0] < 1 or calibration.shape[1] < 1:
        raise ConfigError(
            f"calibration must be a non-empty [samples, seq_len] tensor, got shape {tuple(calibration.shape)}"
        )
    if calibration.dtype.is_floating_point or calibration.dtype == torch.bool:
        raise ConfigError(f"calibration must hold integer token ids, got {calibration.dtype}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None:
        low, high = int(calibration.min()), int(calibration.max())
        if low < 0 or high >= vocab:
            raise ConfigError(
                f"calibration token ids span [{low}, {high}] but the model's vocabulary has "
                f"{vocab} entries: was it tokenised with another tokenizer?"
            )
    return calibration.long()


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, calibration: torch.Tensor, batch_size: int
) -> list[BlockBatch]:
    """Run the model up to the first block for every batch and record that block's inputs."""
    captured: list[BlockBatch] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = args[1:] if args else ()
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "use_cache")}
        captured.append(BlockBatch(hidden.detach(), rest, kwargs))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for start in range(0, calibration.shape[0], batch_size):
                batch = calibration[start : start + batch_size].to(device)
                try:
                    try:
                        model(batch, use_cache=False)
                    except TypeError:
                        model(batch)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    if len(captured) != math.ceil(calibration.shape[0] / batch_size):
        raise SparsecraftError("could not capture the inputs of the first block")
    return captured


def run_block(block: nn.Module, batches: list[BlockBatch]) -> list[torch.Tensor]:
    outs = []
    with torch.inference_mode():
        for b in batches:
            out = block(b.hidden, *b.args, **b.kwargs)
            outs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())
    return outs


def block_targets(blocks: nn.ModuleList, targets: list[Target]) -> list[list[Target]]:
    by_module = {id(t.module): t for t in targets}
    per_block = []
    for block in blocks:
        per_block.append([by_module[id(m)] for m in block.modules() if id(m) in by_module])
    return per_block
