"""Unit groups: which slices of which tensors belong to one removable unit.

A *unit* is what structured shrinking removes as a whole: an MLP intermediate channel, an
attention head (a key/value group under GQA), a conv filter. Removing it cuts the same
index range out of several tensors at once (the rows that produce it, the columns that
consume it, the norm parameters in between); a :class:`UnitGroup` lists those
:class:`Slice` s for one layer.

Transformer blocks are searched by structure: the repeated blocks come from
:func:`sparsecraft.blocks.find_blocks`, and a small registry of *families* (gated MLP,
two-layer MLP, q/k/v/o attention with ``head_dim``, BERT-style self-attention) says how to
read one block. A new architecture is one :func:`register_family` call, not a new loop.

Attention units are two-level. The fine unit is a query head; the coarse unit (a
*bucket*) is a key/value head with the query heads that share it. Removing a bucket removes
its k/v rows and all its query heads; removing query heads inside buckets must keep the
same number in every bucket, because the attention module has one ``num_key_value_groups``
for the whole layer. Groups without GQA simply have one query head per bucket.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

__all__ = ["Slice", "UnitGroup", "Family", "FAMILIES", "register_family", "find_block_groups"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slice:
    """Index ranges of one module's tensors that belong to the units of a group.

    Unit ``u`` owns indices ``[u * width, (u + 1) * width)`` along ``dim`` of each tensor
    named in ``tensors``. ``dim`` 0 cuts outputs (weight rows, conv filters, bias, norm
    parameters), ``dim`` 1 cuts inputs (weight columns, conv input channels); a 1-D tensor
    is only ever listed with ``dim`` 0. ``coarse`` slices are indexed by bucket (k/v heads),
    the others by fine unit.
    """

    module: str
    dim: int
    width: int = 1
    tensors: tuple[str, ...] = ("weight",)
    coarse: bool = False


AttrFn = Callable[[int, int], dict[str, dict[str, Any]]]


def _no_attrs(_units: int, _buckets: int) -> dict[str, dict[str, Any]]:
    return {}


@dataclass
class UnitGroup:
    """The removable units of one layer.

    ``units`` fine units in ``units // per_bucket`` buckets of ``per_bucket`` consecutive
    units. ``attrs(kept_units, kept_buckets)`` returns the module attributes to set after
    shrinking (``{module: {attribute: value}}``), for attributes the forward pass reads
    (head counts, GQA group size); Linear/Conv/BatchNorm size attributes follow from the
    tensor shapes and are handled generically.
    """

    name: str
    kind: str  # "mlp" | "heads" | "conv"
    unit: str  # what one unit is, for messages: "channel", "query head", "filter"
    units: int
    slices: list[Slice]
    per_bucket: int = 1
    attrs: AttrFn = field(default=_no_attrs, repr=False)

    @property
    def buckets(self) -> int:
        return self.units // self.per_bucket


class Family:
    """How to find the unit groups of one kind inside one transformer block."""

    kind: str = ""

    def find(self, block: nn.Module, prefix: str) -> list[UnitGroup]:  # pragma: no cover - interface
        raise NotImplementedError


def _linear(module: nn.Module, *path: str) -> nn.Linear | None:
    for part in path:
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if isinstance(module, nn.Linear) else None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _bias(linear: nn.Linear) -> tuple[str, ...]:
    """The tensors a Linear's output units own: its rows, and its bias if it has one."""
    return ("weight", "bias") if linear.bias is not None else ("weight",)


class GatedMLP(Family):
    """``down(act(gate(x)) * up(x))``: Llama, Mistral, Qwen2, Gemma ... MLPs."""

    kind = "mlp"

    def find(self, block, prefix):
        groups = []
        for name, m in block.named_modules():
            gate, up, down = (_linear(m, a) for a in ("gate_proj", "up_proj", "down_proj"))
            if not (gate and up and down):
                continue
            if not (gate.out_features == up.out_features == down.in_features):
                continue
            base = _join(prefix, name)
            slices = [
                Slice(_join(base, "gate_proj"), 0, tensors=_bias(gate)),
                Slice(_join(base, "up_proj"), 0, tensors=_bias(up)),
                Slice(_join(base, "down_proj"), 1),
            ]
            has_size = hasattr(m, "intermediate_size")
            groups.append(UnitGroup(
                base, "mlp", "channel", gate.out_features, slices,
                attrs=(lambda k, _b, base=base: {base: {"intermediate_size": k}}) if has_size else _no_attrs,
            ))
        return groups


class TwoLayerMLP(Family):
    """``output.dense(act(intermediate.dense(x)))``: BERT, RoBERTa ... feed-forward blocks."""

    kind = "mlp"

    def find(self, block, prefix):
        up, down = _linear(block, "intermediate", "dense"), _linear(block, "output", "dense")
        if not (up and down) or up.out_features != down.in_features:
            return []
        return [UnitGroup(
            _join(prefix, "intermediate"), "mlp", "channel", up.out_features,
            [Slice(_join(prefix, "intermediate.dense"), 0, tensors=_bias(up)),
             Slice(_join(prefix, "output.dense"), 1)],
        )]


class QKVOAttention(Family):
    """``q_proj``/``k_proj``/``v_proj``/``o_proj`` with ``head_dim``: Llama-style, GQA-aware.

    The module reshapes with ``-1`` heads and ``head_dim``; the only count it reads is
    ``num_key_value_groups`` (query heads per k/v head), which is updated.
    """

    kind = "heads"

    def find(self, block, prefix):
        groups = []
        for name, m in block.named_modules():
            q, k, v, o = (_linear(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))
            head_dim = getattr(m, "head_dim", None)
            if not (q and k and v and o) or not isinstance(head_dim, int) or head_dim < 1:
                continue
            if q.out_features % head_dim or k.out_features % head_dim or k.out_features != v.out_features:
                continue
            n_q, n_kv = q.out_features // head_dim, k.out_features // head_dim
            if n_q % n_kv or o.in_features != q.out_features:
                continue
            base = _join(prefix, name)

            def attrs(kept, kept_kv, base=base, m=m):
                out = {"num_key_value_groups": kept // kept_kv}
                # some families also keep head counts on the module; keep them true
                if hasattr(m, "num_heads"):
                    out["num_heads"] = kept
                if hasattr(m, "num_key_value_heads"):
                    out["num_key_value_heads"] = kept_kv
                return {base: out}

            groups.append(UnitGroup(
                base, "heads", "query head", n_q,
                [Slice(_join(base, "q_proj"), 0, head_dim, _bias(q)),
                 Slice(_join(base, "k_proj"), 0, head_dim, _bias(k), coarse=True),
                 Slice(_join(base, "v_proj"), 0, head_dim, _bias(v), coarse=True),
                 Slice(_join(base, "o_proj"), 1, head_dim)],
                per_bucket=n_q // n_kv, attrs=attrs,
            ))
        return groups


class BertSelfAttention(Family):
    """``attention.self.{query,key,value}`` + ``attention.output.dense``: BERT-style heads.

    The module reshapes with ``-1`` heads and ``attention_head_size``; its
    ``num_attention_heads`` and ``all_head_size`` are updated so they stay true.
    """

    kind = "heads"

    def find(self, block, prefix):
        groups = []
        for name, m in block.named_modules():
            attn = getattr(m, "self", None)
            q, k, v = (_linear(attn, a) for a in ("query", "key", "value")) if attn is not None else (None,) * 3
            o = _linear(m, "output", "dense")
            size = getattr(attn, "attention_head_size", None)
            if not (q and k and v and o) or not isinstance(size, int) or size < 1:
                continue
            if not (q.out_features == k.out_features == v.out_features == o.in_features) or q.out_features % size:
                continue
            base = _join(prefix, name)
            self_name = _join(base, "self")
            groups.append(UnitGroup(
                base, "heads", "head", q.out_features // size,
                [Slice(_join(self_name, "query"), 0, size, _bias(q)),
                 Slice(_join(self_name, "key"), 0, size, _bias(k)),
                 Slice(_join(self_name, "value"), 0, size, _bias(v)),
                 Slice(_join(base, "output.dense"), 1, size)],
                attrs=lambda kept, _b, n=self_name, size=size: {
                    n: {"num_attention_heads": kept, "all_head_size": kept * size}},
            ))
        return groups


#: Families tried on every block, in order; the first family of a kind that finds
#: something in a block wins for that kind (a block has one MLP and one attention).
FAMILIES: list[Family] = [GatedMLP(), TwoLayerMLP(), QKVOAttention(), BertSelfAttention()]


def register_family(family: Family, *, first: bool = True) -> Family:
    """Teach shrinking a new block layout (tried before the built-in ones by default)."""
    if first:
        FAMILIES.insert(0, family)
    else:
        FAMILIES.append(family)
    return family


def find_block_groups(model: nn.Module, kinds: set[str]) -> list[UnitGroup]:
    """Unit groups of the requested kinds in the model's repeated transformer blocks."""
    from ..blocks import find_blocks

    blocks_name, blocks = find_blocks(model)
    groups: list[UnitGroup] = []
    for i, block in enumerate(blocks):
        prefix = _join(blocks_name, str(i))
        found: set[str] = set()
        for family in FAMILIES:
            if family.kind not in kinds or family.kind in found:
                continue
            hits = family.find(block, prefix)
            if hits:
                found.add(family.kind)
                groups.extend(hits)
    return groups
