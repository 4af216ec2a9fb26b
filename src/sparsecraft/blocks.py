"""Repeated blocks of a model, found by structure, and the inputs that reach them.

Neutral ground for everything that walks a transformer-like stack block by block (the
one-shot driver, structured shrinking): no method lives here.

* :func:`find_blocks`: the largest ``ModuleList`` of same-type modules holding targets;
* :func:`capture_block_inputs`: run the model up to the first block and record its inputs
  (hidden states plus the other arguments: attention masks, position embeddings);
* :func:`run_block`: one block over recorded batches; :func:`block_targets`: targets per block;
* :func:`check_calibration`: validate calibration token ids against the model;
* :class:`DiskActivations`: the hidden states at a block boundary in memory-mapped files,
  for calibration sets larger than memory;
* :class:`ComputeIn`: run one block in a wider dtype than it is stored in (bf16 and fp16
  models on CPUs without half-precision arithmetic).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import ConfigError, SparsecraftError, TargetError
from .memory import unmap_file_pages
from .targets import Target

__all__ = [
    "BlockBatch", "find_blocks", "check_calibration", "capture_block_inputs", "run_block",
    "block_targets", "DiskActivations", "ComputeIn", "cast_batches_", "widened_forward", "module_input_hessian",
]


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


@dataclass
class BlockBatch:
    """One calibration batch at a block boundary: the hidden states and the other inputs."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with its floating tensors (also inside tuples and lists) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def cast_batches_(batches: list[BlockBatch], dtype: torch.dtype) -> None:
    """Cast the floating tensors of every batch (hidden states, attention masks, position
    embeddings) to ``dtype`` in place; integer inputs such as positions are left alone."""
    for b in batches:
        b.hidden = _cast(b.hidden, dtype)
        b.args = _cast(b.args, dtype)
        b.kwargs = {k: _cast(v, dtype) for k, v in b.kwargs.items()}


class ComputeIn:
    """Hold one block's half-precision parameters and buffers in ``dtype`` while it runs.

    ``with ComputeIn(block, torch.float32) as wide:`` casts the block's bf16/fp16 tensors up
    on entry and back to their own dtype on exit (on failure too); the Parameter objects stay
    the same, so references to them (targets) stay valid. ``wide.round_()`` rounds the wide
    values to what the stored dtype can hold, so outputs computed afterwards are the outputs
    of the weights that will be saved. A block with nothing to widen is left alone.
    ``recurse=False`` widens the module's own tensors only, not its children's. The casts
    are made outside inference mode (so a widened forward under ``torch.inference_mode``
    leaves no inference tensors in the model).
    """

    HALF = (torch.bfloat16, torch.float16)

    def __init__(self, block: nn.Module, dtype: torch.dtype, *, recurse: bool = True):
        self.block, self.dtype, self.recurse = block, dtype, recurse
        self.params: list[tuple[nn.Parameter, torch.dtype]] = []
        self.buffers: list[tuple[nn.Module, str, torch.dtype]] = []

    def __enter__(self) -> ComputeIn:
        with torch.inference_mode(False), torch.no_grad():
            for p in self.block.parameters(recurse=self.recurse):
                if p.dtype in self.HALF and p.dtype != self.dtype:
                    self.params.append((p, p.dtype))
                    p.data = p.data.to(self.dtype)
            for module in self.block.modules() if self.recurse else [self.block]:
                for name, buf in module._buffers.items():
                    if buf is not None and buf.dtype in self.HALF and buf.dtype != self.dtype:
                        self.buffers.append((module, name, buf.dtype))
                        module._buffers[name] = buf.to(self.dtype)
        return self

    def round_(self) -> None:
        with torch.inference_mode(False), torch.no_grad():
            for p, dtype in self.params:
                p.data.copy_(p.data.to(dtype))

    def __exit__(self, *exc) -> None:
        with torch.inference_mode(False), torch.no_grad():
            for p, dtype in self.params:
                p.data = p.data.to(dtype)
            for module, name, dtype in self.buffers:
                module._buffers[name] = module._buffers[name].to(dtype)
        self.params.clear()
        self.buffers.clear()


@contextlib.contextmanager
def widened_forward(model: nn.Module, dtype: torch.dtype):
    """Inside, every forward of ``model`` computes in ``dtype``: each module holding
    half-precision tensors of its own is widened just before it runs (its floating inputs
    cast to ``dtype``) and narrowed back right after, so at most one module's weights are
    held twice. For evaluating bf16/fp16 models on a CPU without half-precision arithmetic."""
    handles, live = [], {}

    def before(module, args, kwargs):
        live[id(module)] = ComputeIn(module, dtype, recurse=False).__enter__()
        return _cast(args, dtype), {k: _cast(v, dtype) for k, v in kwargs.items()}

    def after(module, _args, _kwargs, _output):
        live.pop(id(module)).__exit__(None, None, None)

    try:
        for module in model.modules():
            own = [*module.parameters(recurse=False), *(b for b in module.buffers(recurse=False))]
            if any(t.dtype in ComputeIn.HALF and t.dtype != dtype for t in own):
                handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
                handles.append(module.register_forward_hook(after, with_kwargs=True, always_call=True))
        yield model
    finally:
        for h in handles:
            h.remove()
        for wide in live.values():  # a forward that failed half-way
            wide.__exit__(None, None, None)


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

    _run_to(model, blocks[0], hook, calibration, batch_size, "could not capture the inputs of the first block")
    return captured


def _run_to(model: nn.Module, module: nn.Module, hook, calibration: torch.Tensor, batch_size: int,
            failure: str) -> None:
    """Run ``model`` on every batch of ``calibration`` until ``module``, whose forward
    pre-hook (with kwargs) ``hook`` sees its inputs and raises :class:`_StopForward`;
    SparsecraftError(``failure``) unless every batch reached it."""
    reached = []

    def counted(mod, args, kwargs):
        reached.append(1)
        return hook(mod, args, kwargs)

    handle = module.register_forward_pre_hook(counted, with_kwargs=True)
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
    if len(reached) != math.ceil(calibration.shape[0] / batch_size):
        raise SparsecraftError(failure)


def module_input_hessian(model: nn.Module, module: nn.Linear, calibration: torch.Tensor,
                         batch_size: int) -> torch.Tensor:
    """``2/n X^T X`` of ``module``'s inputs over the calibration tokens; the model runs up
    to ``module`` only (an output head's own product, the largest of a small model, is skipped)."""
    from .oneshot.stats import HessianAccumulator

    acc = HessianAccumulator(module.in_features)

    def hook(_module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        acc.add(x.detach().float())
        raise _StopForward

    _run_to(model, module, hook, calibration, batch_size, "the calibration pass did not reach the output head")
    return acc.hessian


def block_hidden(out) -> torch.Tensor:
    """The hidden state a block returns: the output itself, or its first item (a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(block: nn.Module, batches: list[BlockBatch], into: list[torch.Tensor] | None = None,
              keep: bool = True, after: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """The block's output for every batch; with ``into``, each output is copied into the
    given tensor as soon as it is computed (so only one batch's output is in memory); with
    ``keep=False`` each output is dropped once computed (a pass run for its hooks) and the
    list is empty; ``after(i)`` once batch ``i`` is done (:meth:`DiskActivations.release`)."""
    outs = []
    with torch.inference_mode():
        for i, b in enumerate(batches):
            out = block(b.hidden, *b.args, **b.kwargs)
            out = block_hidden(out).detach()
            if into is not None:
                into[i].copy_(out)
                out = into[i]
            if keep:
                outs.append(out)
            del out  # not alive while the next batch runs
            if after is not None:
                after(i)
    return outs


def advance_(block: nn.Module, batches: list[BlockBatch]) -> None:
    """Run ``block`` over ``batches`` in place: each batch's hidden state becomes the block's
    output as soon as that is computed, so one batch's input and output are alive at a time
    rather than every batch's."""
    with torch.inference_mode():
        for b in batches:
            out = block(b.hidden, *b.args, **b.kwargs)
            b.hidden = block_hidden(out).detach()


class DiskActivations:
    """The hidden states of every calibration batch at a block boundary, kept in two
    memory-mapped files under ``folder``: one holds the current block's inputs, the other
    receives its outputs, and they swap after each block. The operating system pages them
    in and out, so the calibration set may be larger than the memory.

    :meth:`adopt` moves the batches' hidden states into the first file; :meth:`run` runs a
    block over the batches writing each output straight to the other file, then makes the
    outputs the batches' hidden states.
    """

    NAMES = ("activations-a.bin", "activations-b.bin")

    def __init__(self, batches: list[BlockBatch], folder: str | Path, *, current: int | None = None):
        """Map the two files in ``folder`` (created or resized to fit the batches) and move
        the batches' hidden states into the first. With ``current`` (0 or 1) the files are
        a previous run's, kept whole: file ``current`` already holds the batches' hidden
        states, which become views of it (a resumed run; sizes are checked first)."""
        if not batches:
            raise SparsecraftError("DiskActivations needs at least one batch")
        dtype = batches[0].hidden.dtype
        shapes = [tuple(b.hidden.shape) for b in batches]
        total = sum(math.prod(shape) for shape in shapes)
        self.files = [Path(folder) / name for name in self.NAMES]
        if current is not None:
            nbytes = total * batches[0].hidden.element_size()
            for file in self.files:
                size = file.stat().st_size if file.is_file() else None
                if size != nbytes:
                    raise SparsecraftError(f"activations file '{file}' has {size} bytes, expected {nbytes}")
        self.buffers = []
        for file in self.files:
            flat = torch.from_file(str(file), shared=True, size=total, dtype=dtype)
            views, start = [], 0
            for shape in shapes:
                n = math.prod(shape)
                views.append(flat[start:start + n].view(shape))
                start += n
            self.buffers.append(views)
        self.current = 0 if current is None else current
        with torch.no_grad():
            for b, view in zip(batches, self.buffers[self.current]):
                if current is None:
                    view.copy_(b.hidden)
                b.hidden = view

    def flush(self) -> None:
        """Write the mapped pages to the disk (fsync): what the files hold survives a crash."""
        for file in self.files:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def run(self, block: nn.Module, batches: list[BlockBatch]) -> None:
        """``block`` over ``batches``; its outputs become the batches' hidden states."""
        target = self.buffers[1 - self.current]
        run_block(block, batches, into=target, after=self.release)
        self.adopt(batches)

    def release(self, index: int) -> None:
        """Drop batch ``index``'s pages of both files from this process's resident memory
        (they stay in the files and the page cache and come back when read), so a pass over
        the batches keeps about one batch resident rather than both files whole."""
        for views in self.buffers:
            view = views[index]
            unmap_file_pages(view.data_ptr(), view.numel() * view.element_size())

    def adopt(self, batches: list[BlockBatch], outputs: list[torch.Tensor] | None = None) -> None:
        """Make the other file the batches' hidden states (after copying ``outputs`` into it)."""
        target = self.buffers[1 - self.current]
        with torch.no_grad():
            for i, b in enumerate(batches):
                if outputs is not None:
                    target[i].copy_(outputs[i])
                b.hidden = target[i]
        self.current = 1 - self.current


def block_targets(blocks: nn.ModuleList, targets: list[Target]) -> list[list[Target]]:
    by_module = {id(t.module): t for t in targets}
    per_block = []
    for block in blocks:
        per_block.append([by_module[id(m)] for m in block.modules() if id(m) in by_module])
    return per_block
