"""Encodings of one tensor: pure tensor math, no file I/O.

Every encoding turns a tensor into a dict of named, contiguous CPU component tensors, and
:func:`decode` turns the components back into a bit-identical tensor.

Conventions shared by all encodings
-----------------------------------
* **2-D view.** Row-structured encodings (``csr``, ``nm``) work on the view
  ``t.reshape(rows, cols)`` with ``rows = shape[0]`` and ``cols = prod(shape[1:])`` (the
  reduction dimension of a ``Linear`` ``[out, in]`` or a ``Conv`` ``[out, in*kh*kw]``). A 1-D
  tensor is viewed as one row ``(1, L)`` and a 0-d tensor as ``(1, 1)``, so N:M of a 1-D
  tensor runs along its only dimension.
* **Zeros.** An element is a *zero* (left out of ``values``) when its bits are +0.0 or -0.0.
  Everything else is stored with its exact bits, including NaN with any payload and inf.
  Signed zeros are common (``w * mask`` gives -0.0 for every pruned negative weight), so they
  must compress; their signs are kept in an optional ``negzero`` component (below) so the
  round trip stays bit-exact. For integer and bool tensors a zero is the all-zero bit pattern.
* **Bit packing** (``mask``, ``negzero``, ``nm`` indices): bits are packed little-endian
  within each byte, i.e. bit ``i`` of the stream is ``(byte[i // 8] >> (i % 8)) & 1``; the
  last byte is padded with zero bits.
* **negzero** (``bitmask``, ``csr``, ``nm``): present only when the tensor holds at least one
  -0.0. One bit per zero element (row-major order over the whole tensor), 1 meaning -0.0.
  Size ``ceil(z / 8)`` bytes, ``z = numel - nnz``.

Components and exact sizes (``es`` = element size in bytes, ``n`` = numel, ``nnz`` = number of
non-zero elements, ``R, C`` = the 2-D view, ``s(x)`` = size of the smallest of
uint8/int16/int32/int64 that holds ``x``)
----------------------------------------------------------------------------------------

=========  ==========================================================  ==============================
encoding   components                                                   bytes
=========  ==========================================================  ==============================
dense      ``values`` (original shape)                                  ``n*es``
bitmask    ``mask`` uint8 ``[ceil(n/8)]``, ``values`` ``[nnz]``         ``ceil(n/8) + nnz*es``
csr        ``crow_indices`` ``[R+1]`` (dtype for ``nnz``),              ``(R+1)*s(nnz) + nnz*s(C-1)``
           ``col_indices`` ``[nnz]`` (dtype for ``C-1``),               ``+ nnz*es``
           ``values`` ``[nnz]``
nm         ``values`` ``[R, C/M*N]`` (kept values, group by group),     ``K*es + ceil(K*b/8)``,
           ``indices`` uint8 ``[ceil(K*b/8)]``: each kept element's     ``K = R*C/M*N``,
           position in its group, ``b = ceil(log2 M)`` bits each        ``b = ceil(log2 M)``
=========  ==========================================================  ==============================

plus ``ceil((n - nnz)/8)`` for ``negzero`` when present. :func:`theoretical_nbytes` gives the
ideal sizes without byte rounding or index-dtype rounding, for benchmarks.

Packed N:M keeps exactly N positions per group of M consecutive elements along the 2-D view's
last dimension. When a group has fewer than N non-zeros the lowest-index zero positions are
kept as padding (their stored value is the element itself, +0.0 or -0.0). It applies only when
``C % M == 0`` and every group has at most N non-zeros.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

# The hot paths run in numpy on integer views of the bits: numpy is single-threaded, and on a
# busy machine torch's intra-op threads made these element-wise passes several times slower.
from sparsecraft.errors import ConfigError, FormatError
from sparsecraft.memory import check_memory

__all__ = [
    "ENCODINGS",
    "COMMON_NM",
    "encode",
    "decode",
    "encoded_nbytes",
    "theoretical_nbytes",
    "choose_encoding",
    "is_nm",
    "tensor_stats",
    "TensorStats",
    "index_dtype",
    "view_2d_shape",
    "check_layout",
    "decode_scratch_nbytes",
]

ENCODINGS = ("dense", "bitmask", "csr", "nm")
# Tried, in this order, by choose_encoding when no N:M hint is given.
COMMON_NM = ((1, 4), (2, 4), (1, 8), (2, 8), (4, 8))

# Same-width integer dtype used to look at (and copy) the exact bits of an element.
_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Everything below the sign bit, per width, to test "+0.0 or -0.0".
_MAGNITUDE_MASK = {1: 0x7F, 2: 0x7FFF, 4: 0x7FFFFFFF, 8: 0x7FFFFFFFFFFFFFFF}
# The -0.0 bit pattern viewed as the signed integer of the same width.
_NEGZERO_BITS = {1: 0x80, 2: -(1 << 15), 4: -(1 << 31), 8: -(1 << 63)}
_NP = {torch.uint8: np.uint8, torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64}
# Floats numpy compares natively (IEEE: -0.0 == 0 and NaN != 0, exactly our zero rule); numpy's
# float16 is emulated and slow, so half floats go through their integer bits instead.
_NUMPY_FLOATS = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------- helpers


def _check_encoding(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise FormatError(f"unknown encoding {encoding!r}; valid encodings: {', '.join(ENCODINGS)}")


def _check_nm(nm) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in nm)
    except (TypeError, ValueError):
        raise ConfigError(f"N:M must be a pair of integers (N, M), got {nm!r}") from None
    if not (1 <= n < m):
        raise ConfigError(f"N:M needs 1 <= N < M, got {n}:{m}")
    return n, m


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise FormatError(f"unknown dtype {dtype!r}")
    return dt


def _check_tensor(t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise FormatError(f"expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise FormatError(f"expected a strided (dense-layout) tensor, got layout {t.layout}")
    if t.is_complex() or t.element_size() not in _BITS_DTYPE:
        raise FormatError(f"dtype {t.dtype} is not supported")
    return t.detach().to("cpu").contiguous()


def view_2d_shape(shape) -> tuple[int, int]:
    """(rows, cols) of the 2-D view used by ``csr`` and ``nm`` (see module docstring)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def index_dtype(max_value: int) -> torch.dtype:
    """Smallest of uint8/int16/int32/int64 that holds ``0..max_value`` (all safetensors types)."""
    if max_value < (1 << 8):
        return torch.uint8
    if max_value < (1 << 15):
        return torch.int16
    if max_value < (1 << 31):
        return torch.int32
    return torch.int64


def _bits(t: torch.Tensor) -> np.ndarray:
    """Flat integer view of the exact bits of a contiguous CPU tensor (no copy)."""
    return t.reshape(-1).view(_BITS_DTYPE[t.element_size()]).numpy()


def _as_tensor(bits: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Integer bits back to a tensor of ``dtype`` (no copy)."""
    return torch.from_numpy(np.ascontiguousarray(bits)).view(dtype)


def _nonzero_mask(t: torch.Tensor) -> np.ndarray:
    """Flat bool mask of stored elements: anything but +0.0/-0.0 (NaN counts as non-zero)."""
    if t.dtype in _NUMPY_FLOATS:
        return t.reshape(-1).numpy() != 0
    bits = _bits(t)
    if t.is_floating_point():  # 16- and 8-bit floats: look below the sign bit
        return (bits & bits.dtype.type(_MAGNITUDE_MASK[t.element_size()])) != 0
    return bits != 0


def _count_nonzero(t: torch.Tensor) -> int:
    if t.dtype in _NUMPY_FLOATS:
        return int(np.count_nonzero(t.reshape(-1).numpy()))  # truthiness: -0.0 is false, NaN true
    bits = _bits(t)
    if t.is_floating_point():
        bits = bits & bits.dtype.type(_MAGNITUDE_MASK[t.element_size()])
    return int(np.count_nonzero(bits))


def _has_negzero(t: torch.Tensor) -> bool:
    if not t.is_floating_point() or t.numel() == 0:
        return False
    es = t.element_size()
    if es > 1:
        # -0.0 is the most negative value of the signed integer view: a min() finds it
        # without building a bool array.
        return int(_bits(t).min()) == _NEGZERO_BITS[es]
    return bool((_bits(t) == _NEGZERO_BITS[es]).any())


def _pack_bits(mask: np.ndarray) -> np.ndarray:
    return np.packbits(mask.reshape(-1), bitorder="little")


def _unpack_bits(packed: torch.Tensor, count: int) -> np.ndarray:
    return np.unpackbits(packed.reshape(-1).numpy(), count=count, bitorder="little").view(bool)


def _index_bits(m: int) -> int:
    return max(1, (m - 1).bit_length())


def _pack_indices(idx: np.ndarray, nbits: int) -> np.ndarray:
    planes = np.empty((idx.size, nbits), dtype=np.uint8)
    for j in range(nbits):
        planes[:, j] = (idx >> j) & 1
    return np.packbits(planes.reshape(-1), bitorder="little")


def _unpack_indices(packed: torch.Tensor, count: int, nbits: int) -> np.ndarray:
    planes: np.ndarray = np.unpackbits(packed.reshape(-1).numpy(), count=count * nbits, bitorder="little")
    planes = planes.reshape(count, nbits)
    idx = np.zeros(count, dtype=np.int64)
    for j in range(nbits):
        idx |= planes[:, j].astype(np.int64) << j
    return idx


_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)


def _group_max_lut(m: int) -> np.ndarray:
    """byte -> most set bits in any of its 8/m aligned groups of m bits."""
    return np.array([max(bin((b >> s) & ((1 << m) - 1)).count("1") for s in range(0, 8, m))
                     for b in range(256)], dtype=np.uint8)


_GROUP_MAX = {m: _group_max_lut(m) for m in (2, 4, 8)}


def _max_group_count(nz: np.ndarray, m: int, packed: np.ndarray | None = None) -> int:
    """Largest number of non-zeros in any group of ``m`` consecutive elements (numel % m == 0).

    For M dividing 8 or a multiple of 8 the groups are byte-aligned in the packed mask, so a
    256-entry lookup table answers with one pass over numel/8 bytes.
    """
    if nz.size == 0:
        return 0
    if m in _GROUP_MAX or m % 8 == 0:
        packed = _pack_bits(nz) if packed is None else packed
        if m in _GROUP_MAX:
            return int(_GROUP_MAX[m][packed].max())
        return int(_POPCOUNT[packed].reshape(-1, m // 8).sum(1, dtype=np.int64).max())
    return int(np.count_nonzero(nz.reshape(-1, m), axis=1).max())


# ----------------------------------------------------------------------------- stats


@dataclass(frozen=True)
class TensorStats:
    """What the byte formulas need; computed once per tensor (see :func:`tensor_stats`)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    numel: int
    nnz: int
    has_negzero: bool

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.numel if self.numel else 0.0


def tensor_stats(t: torch.Tensor) -> TensorStats:
    """Shape, dtype, numel, non-zeros (+0.0 and -0.0 are zeros) and whether any -0.0 is present."""
    t = _check_tensor(t)
    return TensorStats(tuple(t.shape), t.dtype, t.numel(), _count_nonzero(t), _has_negzero(t))


def _nbytes_from_stats(st: TensorStats, encoding: str, nm: tuple[int, int] | None) -> int:
    es = torch.empty((), dtype=st.dtype).element_size()
    n, nnz = st.numel, st.nnz
    negzero = (n - nnz + 7) // 8 if st.has_negzero else 0
    if encoding == "dense":
        return n * es
    if encoding == "bitmask":
        return (n + 7) // 8 + nnz * es + negzero
    rows, cols = view_2d_shape(st.shape)
    if encoding == "csr":
        crow = index_dtype(nnz).itemsize
        col = index_dtype(max(cols - 1, 0)).itemsize
        return (rows + 1) * crow + nnz * (col + es) + negzero
    if encoding == "nm":
        nn, m = cast(tuple[int, int], nm)  # callers pass nm with the "nm" encoding
        k = rows * (cols // m) * nn
        return k * es + (k * _index_bits(m) + 7) // 8 + negzero
    raise AssertionError(encoding)


def _nm_fits(nz: np.ndarray, n: int, m: int, packed: np.ndarray | None = None) -> bool:
    """Every group of ``m`` has at most ``n`` non-zeros (the caller checked numel % m == 0)."""
    return _max_group_count(nz, m, packed) <= n


def _nm_problem(t: torch.Tensor, nz: np.ndarray, n: int, m: int,
                packed: np.ndarray | None = None) -> str | None:
    """Why N:M packing does not apply to ``t`` (None when it does)."""
    rows, cols = view_2d_shape(t.shape)
    if cols % m:
        return (f"last dimension of the 2-D view {rows}x{cols} (shape {tuple(t.shape)}) "
                f"is not divisible by M={m}")
    if _nm_fits(nz, n, m, packed):
        return None
    # Slow path, only to say where it fails.
    counts = np.count_nonzero(nz.reshape(rows, cols // m, m), axis=-1)
    bad = np.argwhere(counts > n)
    r, g = (int(v) for v in bad[0])
    return (f"{len(bad)} group(s) of {m} have more than {n} non-zeros, e.g. row {r}, "
            f"columns {g * m}..{g * m + m - 1} hold {int(counts[r, g])}")


# ----------------------------------------------------------------------------- public API


def is_nm(t: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` along the 2-D view's last dim has at most ``n`` non-zeros."""
    n, m = _check_nm((n, m))
    t = _check_tensor(t)
    return _nm_problem(t, _nonzero_mask(t), n, m) is None


def encode(t: torch.Tensor, encoding: str, nm: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Encode ``t``; returns component name -> contiguous CPU tensor.

    ``dense`` returns the tensor itself (detached, on CPU, contiguous: it may alias ``t``).
    Raises :class:`FormatError` for an unknown encoding or when ``nm`` does not apply.
    """
    _check_encoding(encoding)
    return _encode(_check_tensor(t), encoding, nm)


def _encode(t: torch.Tensor, encoding: str, nm, has_negzero: bool | None = None) -> dict[str, torch.Tensor]:
    if encoding == "dense":
        return {"values": t}

    nz = _nonzero_mask(t)
    bits = _bits(t)
    if encoding == "nm":
        if nm is None:
            raise FormatError("encoding 'nm' needs nm=(N, M)")
        n, m = _check_nm(nm)
        problem = _nm_problem(t, nz, n, m)
        if problem:
            raise FormatError(f"N:M {n}:{m} packing does not apply: {problem}")
        comps = _encode_nm(t, bits, nz, n, m)
    elif encoding == "bitmask":
        comps = {"mask": torch.from_numpy(_pack_bits(nz)), "values": _as_tensor(bits[nz], t.dtype)}
    else:  # csr
        rows, cols = view_2d_shape(t.shape)
        crow = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum(np.count_nonzero(nz.reshape(rows, cols), axis=1), out=crow[1:])
        flat = np.flatnonzero(nz)
        col = (flat % max(cols, 1)).astype(_NP[index_dtype(max(cols - 1, 0))])
        comps = {
            "crow_indices": torch.from_numpy(crow.astype(_NP[index_dtype(flat.size)])),
            "col_indices": torch.from_numpy(col),
            "values": _as_tensor(bits.take(flat), t.dtype),
        }
    if has_negzero is None:
        has_negzero = _has_negzero(t)
    if has_negzero:
        # Sign bits of every zero element, row-major (True = -0.0).
        signs = bits[~nz] == _NEGZERO_BITS[t.element_size()]
        comps["negzero"] = torch.from_numpy(_pack_bits(signs))
    return {k: v.contiguous() for k, v in comps.items()}


def _encode_nm(t, bits, nz, n, m):
    rows, cols = view_2d_shape(t.shape)
    groups = cols // m
    nz3 = nz.reshape(rows, groups, m)
    # Pad short groups with their lowest-index zeros: a zero is kept while its rank among the
    # group's zeros is at most the number of missing slots, n - (m - zeros in group).
    zero = ~nz3
    zero_rank = np.cumsum(zero, axis=-1, dtype=np.int16 if m < 32768 else np.int32)
    keep = nz3 | (zero & (zero_rank + (m - n) <= zero_rank[..., -1:]))
    flat = np.flatnonzero(keep)  # exactly n per group, ascending
    pos = flat % m
    values = _as_tensor(bits.take(flat), t.dtype).view(rows, groups * n)
    return {"values": values, "indices": torch.from_numpy(_pack_indices(pos, _index_bits(m)))}


def _need(components: dict, names) -> None:
    missing = [c for c in names if c not in components]
    if missing:
        raise FormatError(f"missing component(s) {missing}; got {sorted(components)}")


def _expect_numel(name: str, c: torch.Tensor, numel: int) -> None:
    if c.numel() != numel:
        raise FormatError(f"component {name!r} has {c.numel()} elements, expected {numel}")


def _all_distinct(flat: np.ndarray, numel: int) -> bool:
    seen = np.zeros(numel, dtype=bool)
    seen[flat] = True
    return int(np.count_nonzero(seen)) == flat.size


def _check_shape(shape) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and int(s) >= 0 for s in shape
    ):
        raise FormatError(f"shape {shape!r} must be a list of non-negative ints")
    return tuple(int(s) for s in shape)


def check_layout(components: dict, encoding: str, shape, dtype, nm=None) -> int:
    """Check that components of the given shapes can decode to ``shape``; returns its bytes.

    ``components`` maps a component name to a tensor, or to ``(dtype, shape)`` so that a
    file's layout can be checked before any of it is read. Every size :func:`decode` would
    allocate follows from the checked ones, so a header cannot make it allocate more than
    ``shape`` itself (whose size the caller weighs against memory).
    """
    _check_encoding(encoding)
    dtype = _as_dtype(dtype)
    if dtype.is_complex or torch.empty((), dtype=dtype).element_size() not in _BITS_DTYPE:
        raise FormatError(f"dtype {dtype} is not supported")
    shape = _check_shape(shape)
    numel = math.prod(shape)
    es = torch.empty((), dtype=dtype).element_size()
    desc = {}
    for name, c in components.items():
        cdtype, cshape = (c.dtype, tuple(c.shape)) if isinstance(c, torch.Tensor) else c
        desc[name] = (cdtype, math.prod(int(s) for s in cshape))

    def need(*names):
        missing = [c for c in names if c not in desc]
        if missing:
            raise FormatError(f"missing component(s) {missing}; got {sorted(desc)}")

    def expect(name, count):
        if desc[name][1] != count:
            raise FormatError(f"component {name!r} has {desc[name][1]} elements, expected {count}")

    def at_most(name, count):
        if desc[name][1] > count:
            raise FormatError(f"component {name!r} has {desc[name][1]} elements, more than the "
                              f"{count} that shape {list(shape)} allows")

    need("values")
    if desc["values"][0] != dtype:
        raise FormatError(f"component 'values' has dtype {desc['values'][0]}, expected {dtype}")
    known = {"dense": {"values"}, "bitmask": {"values", "mask", "negzero"},
             "csr": {"values", "crow_indices", "col_indices", "negzero"},
             "nm": {"values", "indices", "negzero"}}[encoding]
    if set(desc) - known:
        raise FormatError(f"unknown component(s) {sorted(set(desc) - known)} for encoding {encoding!r}")
    rows, cols = view_2d_shape(shape)
    if encoding == "dense":
        expect("values", numel)
    elif encoding == "bitmask":
        need("mask")
        expect("mask", (numel + 7) // 8)
        at_most("values", numel)
    elif encoding == "csr":
        need("crow_indices", "col_indices")
        expect("crow_indices", rows + 1)
        at_most("values", numel)
        expect("col_indices", desc["values"][1])
    else:
        if nm is None:
            raise FormatError("encoding 'nm' needs nm=(N, M)")
        n, m = _check_nm(nm)
        if cols % m:
            raise FormatError(f"N:M {n}:{m} does not fit shape {list(shape)}")
        need("indices")
        k = rows * (cols // m) * n
        expect("values", k)
        expect("indices", (k * _index_bits(m) + 7) // 8)
    if "negzero" in desc:
        at_most("negzero", (numel + 7) // 8)
    for name, (cdtype, _) in desc.items():
        if name != "values" and (cdtype.is_floating_point or cdtype == torch.bool):
            raise FormatError(f"component {name!r} has dtype {cdtype}, expected an integer dtype")
    return numel * es


def decode_scratch_nbytes(shape, n_values: int) -> int:
    """Upper bound of what :func:`decode` allocates besides its result: a bool per element
    (masks, the distinctness check) and int64 positions plus index bit planes per stored value."""
    return math.prod(int(s) for s in shape) + 32 * int(n_values)


def decode(components: dict[str, torch.Tensor], encoding: str, shape, dtype,
           nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Bit-exact inverse of :func:`encode`. Raises :class:`FormatError` on inconsistent components.

    The component sizes are checked against ``shape`` (:func:`check_layout`) and the result's
    size against the available memory before anything is allocated.
    """
    nbytes = check_layout(components, encoding, shape, dtype, nm)
    if encoding != "dense":  # csr and nm sizes are not bounded by their components
        check_memory(nbytes + decode_scratch_nbytes(shape, components["values"].numel()), f"decoding a {encoding} tensor of shape {list(shape)}")
    dtype = _as_dtype(dtype)
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    es = torch.empty((), dtype=dtype).element_size()
    bits_dtype = _BITS_DTYPE[es]

    _need(components, ["values"])
    values = components["values"]
    if values.dtype != dtype:
        raise FormatError(f"component 'values' has dtype {values.dtype}, expected {dtype}")
    if encoding == "dense":
        _expect_numel("values", values, numel)
        return values.reshape(shape)

    vbits = values.contiguous().reshape(-1).view(bits_dtype).numpy()
    out = np.zeros(numel, dtype=_NP[bits_dtype])
    rows, cols = view_2d_shape(shape)

    if encoding == "bitmask":
        _need(components, ["mask"])
        _expect_numel("mask", components["mask"], (numel + 7) // 8)
        nz = _unpack_bits(components["mask"], numel)
        _expect_numel("values", values, int(np.count_nonzero(nz)))
        out[nz] = vbits
    elif encoding == "csr":
        _need(components, ["crow_indices", "col_indices"])
        crow = components["crow_indices"].numpy().astype(np.int64).reshape(-1)
        col = components["col_indices"].numpy().astype(np.int64).reshape(-1)
        _expect_numel("crow_indices", components["crow_indices"], rows + 1)
        nnz = values.numel()
        _expect_numel("col_indices", components["col_indices"], nnz)
        counts = np.diff(crow)
        if crow[0] != 0 or crow[-1] != nnz or (counts < 0).any():
            raise FormatError("component 'crow_indices' is inconsistent (not 0..nnz, non-decreasing)")
        if nnz and (col.min() < 0 or col.max() >= cols):
            raise FormatError(f"component 'col_indices' holds a column outside 0..{cols - 1}")
        flat = np.repeat(np.arange(rows, dtype=np.int64) * cols, counts) + col
        # A repeated (row, col) would silently overwrite a value.
        if not _all_distinct(flat, numel):
            raise FormatError("component 'col_indices' repeats a column within a row")
        out[flat] = vbits
    else:  # nm
        if nm is None:
            raise FormatError("encoding 'nm' needs nm=(N, M)")
        n, m = _check_nm(nm)
        if cols % m:
            raise FormatError(f"N:M {n}:{m} does not fit shape {shape}")
        _need(components, ["indices"])
        k = rows * (cols // m) * n
        nbits = _index_bits(m)
        _expect_numel("values", values, k)
        _expect_numel("indices", components["indices"], (k * nbits + 7) // 8)
        pos = _unpack_indices(components["indices"], k, nbits)
        if k and int(pos.max()) >= m:
            raise FormatError(f"component 'indices' holds an in-group position >= M={m}")
        flat = (np.arange(k, dtype=np.int64) // n) * m + pos
        if not _all_distinct(flat, numel):
            raise FormatError("component 'indices' repeats a position within a group")
        out[flat] = vbits

    if "negzero" in components:
        # Stored values are exact and everything else was a zero, so the decoded tensor's
        # zero set (ignoring signs) is the original's, in the same row-major order.
        mag = out & out.dtype.type(_MAGNITUDE_MASK[es]) if dtype.is_floating_point else out
        zero_idx = np.flatnonzero(mag == 0)
        _expect_numel("negzero", components["negzero"], (zero_idx.size + 7) // 8)
        signs = _unpack_bits(components["negzero"], zero_idx.size)
        out[zero_idx[signs]] = _NEGZERO_BITS[es]
    return torch.from_numpy(out).view(dtype).reshape(shape)


def encoded_nbytes(t: torch.Tensor, encoding: str, nm: tuple[int, int] | None = None) -> int:
    """Exact total bytes of ``encode(t, encoding, nm)``'s components, without building them."""
    _check_encoding(encoding)
    t = _check_tensor(t)
    if encoding == "nm":
        if nm is None:
            raise FormatError("encoding 'nm' needs nm=(N, M)")
        n, m = _check_nm(nm)
        problem = _nm_problem(t, _nonzero_mask(t), n, m)
        if problem:
            raise FormatError(f"N:M {n}:{m} packing does not apply: {problem}")
        nm = (n, m)
    if encoding == "dense":
        return t.numel() * t.element_size()
    return _nbytes_from_stats(tensor_stats(t), encoding, nm)


def theoretical_nbytes(shape, dtype, encoding: str, nnz: int, nm: tuple[int, int] | None = None) -> float:
    """Ideal size in bytes of an encoding, for comparing against real files.

    Index fields take exactly as many bits as they need, nothing is rounded to bytes, signs of
    zeros are not counted (an ideal writer would canonicalise -0.0), and there is no container
    overhead (safetensors header, JSON metadata, alignment):

    * dense:   ``n*es``
    * bitmask: ``n/8 + nnz*es``
    * csr:     ``((R+1)*ceil(log2(nnz+1)) + nnz*ceil(log2 C)) / 8 + nnz*es``
    * nm:      ``K*es + K*log2(M)/8`` with ``K = n*N/M`` (nnz is ignored: padding is stored)
    """
    _check_encoding(encoding)
    es = torch.empty((), dtype=_as_dtype(dtype)).element_size()
    n = math.prod(int(s) for s in shape)
    if encoding == "dense":
        return float(n * es)
    if encoding == "bitmask":
        return n / 8 + nnz * es
    rows, cols = view_2d_shape(shape)
    if encoding == "csr":
        return ((rows + 1) * math.ceil(math.log2(nnz + 1)) + nnz * math.ceil(math.log2(max(cols, 1)))) / 8 + nnz * es
    nn, m = _check_nm(nm)
    k = n * nn / m
    return k * es + k * math.log2(m) / 8


def choose_encoding(t: torch.Tensor, nm_hint: tuple[int, int] | None = None) -> tuple[str, dict]:
    """Pick the smallest applicable encoding; returns ``(name, kwargs)`` for :func:`encode`.

    Candidates: dense, then N:M (only ``nm_hint`` if given, else each of :data:`COMMON_NM`
    that applies), then bitmask, then csr. A candidate must be strictly smaller than the best
    one before it, so ties keep the earlier one and dense wins when nothing beats it.
    """
    t = _check_tensor(t)
    return _choose(t, tensor_stats(t), nm_hint)


def _choose(t: torch.Tensor, st: TensorStats, nm_hint) -> tuple[str, dict]:
    pairs = [_check_nm(nm_hint)] if nm_hint is not None else list(COMMON_NM)
    candidates: list[tuple[str, dict]] = [("dense", {})] + [("nm", {"nm": p}) for p in pairs] + [("bitmask", {}), ("csr", {})]
    # Smallest first, ties in candidate order; the size formulas are cheap, so only the N:M
    # candidates that would win get the (costlier) applicability scan.
    ranked = sorted(range(len(candidates)),
                    key=lambda i: (_nbytes_from_stats(st, candidates[i][0], candidates[i][1].get("nm")), i))
    nz = packed = None
    for i in ranked:
        name, kw = candidates[i]
        if name != "nm":
            return name, kw
        n, m = kw["nm"]
        if st.nnz * m > st.numel * n:  # too many non-zeros overall to fit
            continue
        if nz is None:
            nz = _nonzero_mask(t)
            packed = _pack_bits(nz)
        if view_2d_shape(t.shape)[1] % m == 0 and _nm_fits(nz, n, m, packed):
            return name, kw
    raise AssertionError("dense always applies")
