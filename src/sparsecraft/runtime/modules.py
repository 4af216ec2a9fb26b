"""``SparseLinear``: a Linear layer computed by the kernels a plan chose, per input size.

A plan maps a number of input rows (tokens, after flattening batch and sequence) to a kernel
name, e.g. ``{512: "csr_embag", 1: "csr_cpp"}`` for a layer timed on a 512-token prompt and
on one decoded token. A call with ``m`` rows uses the plan entry nearest to ``m`` on a log
scale. Only the packed forms the plan needs are kept (a plan that never picks ``dense``
holds no dense weight), as non-persistent buffers.

Files and state dicts still speak dense: ``state_dict()`` yields ``weight`` (rebuilt from the
packed form) and ``bias`` under the original names, and ``load_state_dict`` repacks an
incoming ``weight``, so ``sparsecraft.save`` works on a compiled model and the checkpoint
loads into an uncompiled one. ``layer.weight`` also returns the dense weight, rebuilt on
each access. Compiled layers are for inference: their weight is no parameter and gets no
gradient, and the packed tensors keep the dtype and device they were compiled for.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .kernels import get_kernel

__all__ = ["SparseLinear"]


class SparseLinear(nn.Module):
    """Drop-in replacement for an ``nn.Linear`` with a (mostly) zero weight."""

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None, plan: dict[int, str]):
        super().__init__()
        if not plan:
            raise ValueError("a SparseLinear needs a plan with at least one entry")
        self.out_features, self.in_features = (int(d) for d in weight.shape)
        self.plan = {int(rows): str(name) for rows, name in sorted(plan.items())}
        self.bias = bias
        self._fields: dict[str, list[str]] = {}
        self._choice: dict[int, str] = {}
        self._pack(weight)
        # files speak dense: emit `weight` on save, repack it on load
        self.register_state_dict_post_hook(SparseLinear._emit_weight)
        self.register_load_state_dict_pre_hook(SparseLinear._absorb_weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, plan: dict[int, str]) -> "SparseLinear":
        return cls(linear.weight.detach(), linear.bias, plan)

    # -- packed storage ---------------------------------------------------------------
    def _pack(self, weight: torch.Tensor) -> None:
        for name in sorted(set(self.plan.values())):
            packed = get_kernel(name).pack(weight)
            self._fields[name] = list(packed)
            for field, tensor in packed.items():
                self.register_buffer(f"{name}_{field}", tensor, persistent=False)

    def packed(self, name: str) -> dict[str, torch.Tensor]:
        return {f: getattr(self, f"{name}_{f}") for f in self._fields[name]}

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, rebuilt from the packed form (a new tensor on each access)."""
        name = next(iter(self._fields))
        return get_kernel(name).unpack(self.packed(name), (self.out_features, self.in_features))

    # -- computing --------------------------------------------------------------------
    def kernel_for(self, rows: int) -> str:
        """The planned kernel for ``rows`` input rows: the nearest planned size (log scale)."""
        name = self._choice.get(rows)
        if name is None:
            nearest = min(self.plan, key=lambda r: (abs(math.log(max(r, 1)) - math.log(max(rows, 1))), r))
            name = self._choice[rows] = self.plan[nearest]
        return name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        name = self.kernel_for(x2.shape[0])
        y = get_kernel(name).run(self.packed(name), x2, self.bias, self.out_features)
        return y.view(*lead, self.out_features)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the same weight and the same bias parameter."""
        weight = self.weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    # -- state dict hooks -------------------------------------------------------------
    @staticmethod
    def _emit_weight(module: "SparseLinear", state_dict, prefix, local_metadata) -> None:
        state_dict[prefix + "weight"] = module.weight

    @staticmethod
    def _absorb_weight(module: "SparseLinear", state_dict, prefix, local_metadata, strict,
                       missing_keys, unexpected_keys, error_msgs) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            if strict:
                missing_keys.append(key)
            return
        weight = state_dict.pop(key)
        shape = (module.out_features, module.in_features)
        if tuple(weight.shape) != shape:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                              f"{tuple(weight.shape)}, the compiled layer has shape {shape}")
            return
        current = module.packed(next(iter(module._fields)))
        like = next(t for t in current.values() if t.is_floating_point())
        module._pack(weight.detach().to(device=like.device, dtype=like.dtype))

    def extra_repr(self) -> str:
        plan = ", ".join(f"{rows} rows: {name}" for rows, name in self.plan.items())
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, plan={{{plan}}}")
