"""Masks attached to a model: apply them, keep them applied, remove the machinery.

A :class:`SparsityState` owns one boolean keep-mask per target parameter. It

* zeroes pruned weights (``apply_``);
* keeps gradients of pruned weights at zero (a hook on each parameter's gradient);
* re-applies masks after every step of attached optimizers, since momentum and Adam
  moments can otherwise move a pruned weight away from zero (``attach_optimizer``);
* saves and restores the masks with ``state_dict`` / ``load_state_dict``;
* removes hooks and masks with ``finalize_``, leaving plain zero weights behind.

The model keeps a small record of what was done to each target in the attribute
``model.sparsecraft_meta`` (pattern and sparsity per parameter name); files and reports
read it, and it survives ``finalize_``.
"""

from __future__ import annotations

import logging
import weakref
from typing import Iterable

import torch
from torch import nn

from .errors import SparsecraftError, TargetError

__all__ = ["SparsityState", "META_ATTR", "get_meta", "has_open_state"]

log = logging.getLogger(__name__)
META_ATTR = "sparsecraft_meta"
_OPEN_ATTR = "_sparsecraft_open_states"


class _OpenStates(list):
    """Weak references to a model's open states; pickles (and deep-copies) as empty.

    A state's hooks belong to this process's parameters, so a saved or copied model has no
    open state; and weak references cannot be pickled, which made ``torch.save(model)`` fail.
    """

    def __reduce__(self):
        return (_OpenStates, ())


def has_open_state(model: nn.Module) -> bool:
    """Whether a :class:`SparsityState` with masks is attached to ``model`` and not finalized."""
    states = getattr(model, _OPEN_ATTR, None) or []
    return any((s := ref()) is not None and not s.finalized and s.masks for ref in states)


def get_meta(model: nn.Module) -> dict[str, dict]:
    """Per-parameter sparsity record of ``model`` (empty if never pruned)."""
    return getattr(model, META_ATTR, None) or {}


class SparsityState:
    """Masks for a model's targets, applied and kept applied until ``finalize_``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.masks: dict[str, torch.Tensor] = {}
        # the same masks as 0/1 in the parameter's dtype: multiplying by them is an order of
        # magnitude faster than masked_fill on CPU, which matters once per training step
        self._scales: dict[str, torch.Tensor] = {}
        self.info: dict[str, dict] = {}
        self._params: dict[str, nn.Parameter] = dict(model.named_parameters())
        self._grad_hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._optim_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.finalized = False
        #: called as ``observer(name, dense_grad)`` before a gradient is masked (RigL uses
        #: it to see the gradients of pruned weights)
        self.grad_observer = None
        # the model knows its open states (weakly), so runtime code can refuse masked models
        refs = [r for r in getattr(model, _OPEN_ATTR, []) if r() is not None]
        object.__setattr__(model, _OPEN_ATTR, _OpenStates(refs + [weakref.ref(self)]))

    # -- building -------------------------------------------------------------------
    def _param(self, name: str) -> nn.Parameter:
        try:
            return self._params[name]
        except KeyError:
            raise TargetError(f"model has no parameter '{name}'") from None

    def attach(self, name: str, keep: torch.Tensor, **info) -> None:
        """Attach a keep-mask (True = stays) to parameter ``name`` and apply it."""
        self._check_open()
        param = self._param(name)
        if tuple(keep.shape) != tuple(param.shape):
            raise TargetError(
                f"layer '{name}': mask shape {tuple(keep.shape)} != parameter shape "
                f"{tuple(param.shape)}"
            )
        keep = keep.to(device=param.device, dtype=torch.bool)
        self.masks[name] = keep
        self._scales[name] = keep.to(param.dtype)
        self.info[name] = dict(info)
        if name not in self._grad_hooks:
            self._grad_hooks[name] = param.register_hook(self._make_grad_hook(name))
        with torch.no_grad():
            # masked_fill, not a product: w * 0 is -0.0 for negative w, which files must
            # then store; pruned weights are +0.0
            param.masked_fill_(~keep, 0.0)
            if param.grad is not None:  # a gradient computed before pruning must not leak
                param.grad.masked_fill_(~keep, 0.0)
        self._record_meta(name)

    def note(self, name: str, **info) -> None:
        """Record ``info`` for a target left without a mask (e.g. skipped by a fallback)."""
        param = self._param(name)
        meta = dict(get_meta(self.model))
        meta[name] = {**info, "sparsity": 1.0 - int(param.count_nonzero()) / param.numel()}
        object.__setattr__(self.model, META_ATTR, meta)

    def _make_grad_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if self.grad_observer is not None:
                self.grad_observer(name, grad)
            return grad * self._scales[name]

        return hook

    def _record_meta(self, name: str) -> None:
        meta = dict(get_meta(self.model))
        keep = self.masks[name]
        meta[name] = {
            **self.info[name],
            "sparsity": 1.0 - keep.sum().item() / keep.numel(),
        }
        # a plain attribute: not a parameter or buffer, so state dicts are unchanged
        object.__setattr__(self.model, META_ATTR, meta)

    # -- keeping masks applied ------------------------------------------------------
    @torch.no_grad()
    def apply_(self) -> None:
        """Zero every pruned weight (kept applied: pruned weights are already zero unless
        an optimizer moved them, so a multiply is enough; ``finalize_`` writes exact +0.0)."""
        self._check_open()
        for name, scale in self._scales.items():
            self._params[name].mul_(scale)

    @torch.no_grad()
    def _apply_exact_(self) -> None:
        for name, keep in self.masks.items():
            self._params[name].masked_fill_(~keep, 0.0)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.utils.hooks.RemovableHandle:
        """Re-apply masks after every ``optimizer.step()``; returns the hook's handle."""
        self._check_open()
        handle = optimizer.register_step_post_hook(lambda *_args, **_kw: self.apply_())
        self._optim_hooks.append(handle)
        return handle

    # -- introspection --------------------------------------------------------------
    def sparsity(self) -> float:
        """Fraction of pruned weights over all masked targets (before ``finalize_``)."""
        self._check_open()
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0

    def layer_sparsity(self) -> dict[str, float]:
        self._check_open()
        return {n: 1.0 - m.sum().item() / m.numel() for n, m in self.masks.items()}

    # -- persistence ----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "masks": {n: m.detach().cpu().clone() for n, m in self.masks.items()},
            "info": {n: dict(i) for n, i in self.info.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace masks from ``state_dict()``; everything is checked before anything changes."""
        self._check_open()
        masks = state.get("masks") if isinstance(state, dict) else None
        if not isinstance(masks, dict):
            raise SparsecraftError("sparsity state must be a dict with a 'masks' entry")
        for name, keep in masks.items():
            param = self._param(name)
            if tuple(keep.shape) != tuple(param.shape) or keep.dtype != torch.bool:
                raise TargetError(
                    f"layer '{name}': saved mask {tuple(keep.shape)} {keep.dtype} does not fit "
                    f"parameter {tuple(param.shape)}"
                )
        infos = state.get("info", {})
        for name in list(self.masks):
            if name not in masks:
                self._drop(name)
        for name, keep in masks.items():
            self.attach(name, keep, **infos.get(name, {}))

    # -- removal --------------------------------------------------------------------
    def _drop(self, name: str) -> None:
        handle = self._grad_hooks.pop(name, None)
        if handle is not None:
            handle.remove()
        self.masks.pop(name, None)
        self._scales.pop(name, None)
        self.info.pop(name, None)

    def finalize_(self) -> nn.Module:
        """Apply masks one last time and remove hooks and masks; returns the model. A second
        call does nothing (``prune_`` finalizes the state of a quantised model itself)."""
        if self.finalized:
            return self.model
        self._apply_exact_()
        for name in list(self.masks):
            self._drop(name)
        for handle in self._optim_hooks:
            handle.remove()
        self._optim_hooks.clear()
        self.finalized = True
        return self.model

    def _check_open(self) -> None:
        if self.finalized:
            raise SparsecraftError("this SparsityState was finalized; create a new one")

    def names(self) -> Iterable[str]:
        return self.masks.keys()

    def __repr__(self) -> str:
        if self.finalized:
            return "SparsityState(finalized)"
        return f"SparsityState({len(self.masks)} targets, sparsity={self.sparsity():.4f})"
