"""SparseGPT (Frantar & Alistarh 2023): OBS pruning with lazy column-block updates.

Pure tensor math on one layer: ``sparsegpt_prune(weight, hessian, ...)`` returns a new
weight, its keep-mask and an info dict; the input weight is never modified, so a failure
leaves the layer as it was.

The solver, per output row ``w`` and with ``H = 2/n X^T X`` (+ damping):

* dead inputs (zero diagonal of ``H``) get ``H_jj = 1`` and a zero weight column: the
  channel never fires, so its weights do nothing and the factorisation stays regular;
* ``U`` = the upper Cholesky factor of ``H^-1``. Row ``j`` of ``U`` divided by ``U_jj``
  is the OBS update direction for column ``j`` given that columns ``< j`` are frozen,
  and ``U_jj^2 = [H_F^-1]_jj`` for the remaining columns ``F = {j, ..}``;
* columns are processed left to right; pruning column ``j`` costs
  ``w_j^2 / (2 U_jj^2)`` and moves the not-yet-processed columns optimally. Updates to
  columns beyond the current block are batched ("lazy") into one matmul per block.

Because each step is the exact conditional optimum, the reported per-row loss equals
``1/2 (w - w') H (w - w')^T`` exactly (up to rounding) for the damped ``H``.

Mask selection (adaptive, per block, on the weights as updated so far, except group:G):

* unstructured: inside each column block the lowest ``w^2 / U_jj^2`` are pruned across
  all rows of the block (as the reference implementation does). The layer prunes exactly
  ``k = floor(s * rows * cols + 0.5)`` weights: ``k`` is split over the blocks in
  proportion to their widths by largest remainder (ties to the earlier block), and each
  block prunes exactly its share (ties: lower flat index first). Per-row counts vary.
* N:M: each group of M columns is chosen when the solver reaches its first column; the
  block size is rounded down to a multiple of M so groups never straddle blocks. Two rules:
  ``nm_choice="greedy"`` (the default) is the reference implementation's: keep the N largest
  ``w^2 / U_jj^2`` (each column scored as if it were pruned alone). ``nm_choice="exact"``
  runs the sweep over the group's M columns for every choice of N kept ones
  (per row, all choices at once) and keeps the choice whose OBS loss is least: pruning one
  column moves the group's later columns, which the diagonal score does not see. Both
  are greedy across groups; ``exact`` is optimal within each group. Patterns with more than
  ``MAX_EXACT_CHOICES`` choices per group fall back to ``greedy``. On 16 SmolLM2 layers (q, o,
  gate and down of blocks 0, 10, 20 and 29; 8 x 512 dense calibration tokens) the exact
  rule's layer error was 0.979-1.002x the greedy rule's at 2:4 (median 0.9985) and
  0.951-0.998x at 4:8 (median 0.9955), for 1.04-1.70x (2:4) and 2.1-4.7x (4:8) the time: too
  little gain to be the default.
* group:G (GQSA): before the sweep every row drops its budget of groups of G columns
  (``floor(s * cols/G + 0.5)``, the same for every row) over the whole row, lowest joint loss
  first: ``w_g^T (U_gg^T U_gg)^-1 w_g``, what the sweep loses removing the group with the
  block ``U_gg`` of the upper Cholesky factor of ``H^-1`` on its columns (the sum of
  ``w^2 / U_jj^2`` ignores the coupling inside a group). On SmolLM2 at 50% (8 x 512
  calibration, 2,048 Lee tokens, no quantisation) this gave perplexity 1303 at group:16 and
  913 at group:8, where choosing each lazy block's share by ``w^2 / U_jj^2`` gave 2255 and 1129.
* ``keep_mask=``: reconstruct with a given mask (no selection).

Refit (``refit=True``; the solver's default unless quantising): the sweep's weights are optimal
for each column only given the columns it had already frozen, so they are not the best weights
for the mask it ends with. The refit solves, per row, ``min (w - w') H (w - w')^T`` over the kept
entries exactly (:func:`~sparsecraft.oneshot.support.refit_on_support`: conjugate gradients on
the damped Hessian, started from the sweep's weights); the mask is unchanged. At most
``refit_iter`` (20) iterations: on SmolLM2's block 10 (q, o, gate and down at 2:4 and 50%, 16 x 512
calibration tokens) the refit's loss over the sweep's was within 0.0005 of its converged value
(0.73-0.82) after 20 iterations, where convergence to 1e-5 took 44-66; each iteration costs a
``rows x cols x cols`` product, so wide layers pay for every one.

Quantisation (``quantize=``, GPTQ; Frantar et al. 2023): the same sweep, where each kept
weight, when its column is reached, is replaced by its value on its group's grid
(:mod:`sparsecraft.quant.grid`) and the rounding error ``(w - q) / U_jj`` is spread over the
columns to the right exactly like a pruning error (a pruned weight is the case ``q = 0``), so
pruning and quantisation are solved jointly. A group's grid is fitted when the sweep reaches
the group's first column, from its weights as updated so far that are not pruned (with N:M
only the first M columns' choice is made by then: the later columns all count; choosing all
of a grid group's N:M masks that early, from weights the sweep has not updated yet, gave
larger layer errors than pruning and then rounding). Blocks are a multiple of the group
size g. The result is exactly the grid values (``info["qweight"]`` holds the codes and grids).

Damping: ``lambda = percdamp * mean(diag H)``. If a Cholesky factorisation fails (or the
result is not finite) the solver logs a warning with the damping it used and retries
with ``percdamp`` multiplied by ``damp_growth``, up to ``max_damp_tries`` attempts, then
raises :class:`SolverError`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..criteria import LayerResult, Solver, register_solver
from ..errors import ConfigError, SparsecraftError, TargetError
from ..patterns import NM, Group, Pattern, Unstructured, num_to_prune, parse_pattern, reduction_view
from ..quant.grid import QuantSpec, dequantize_codes, fit_grid, quantize_codes
from ..quant.options import QuantOptions, check_quant_layer
from ..quant.tensor import QuantizedWeight
from .support import refit_on_support

__all__ = ["sparsegpt_prune", "SolverError", "inverse_cholesky_upper", "SparseGPTSolver"]

log = logging.getLogger(__name__)


class SolverError(SparsecraftError):
    """A solver could not finish a layer (e.g. the Hessian cannot be factored).

    Raised before anything is written back: the layer is left unchanged.
    """


def inverse_cholesky_upper(h: torch.Tensor, *, overwrite: bool = False) -> torch.Tensor | None:
    """Upper Cholesky factor of ``h^-1``, or None when ``h`` is not (numerically) PD.
    ``overwrite``: factorise in ``h``'s own memory (its values are lost), so at most two
    matrices of the layer's width are alive here, not four (a 5632-wide layer: 127 MB each)."""
    # Looked up at call time so tests can make the factorisation fail on purpose.
    info = torch.empty((), dtype=torch.int32, device=h.device)
    chol, info = torch.linalg.cholesky_ex(h, out=(h, info)) if overwrite else torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        return None
    hinv = torch.cholesky_inverse(chol)
    del chol, h  # the caller's copy, if any, is all that is left of it
    upper, info = torch.linalg.cholesky_ex(hinv, upper=True, out=(hinv, info))  # hinv is ours
    if int(info) != 0 or not torch.isfinite(upper).all():
        return None
    return upper


def _split_budget(total: int, sizes: list[int], rows: int) -> list[int]:
    """Split ``total`` over blocks proportionally to ``sizes`` (largest remainder, exact)."""
    cols = sum(sizes)
    ideal = [total * s / cols for s in sizes]
    counts = [min(math.floor(x), rows * s) for x, s in zip(ideal, sizes)]
    short = total - sum(counts)
    order = sorted(range(len(sizes)), key=lambda b: (-(ideal[b] - math.floor(ideal[b])), b))
    while short > 0:  # one pass normally suffices; loop in case caps bind
        for b in order:
            if short and counts[b] < rows * sizes[b]:
                counts[b] += 1
                short -= 1
    return counts


NM_CHOICES = ("exact", "greedy")
#: the refit's conjugate-gradient iterations at most (see the module docstring)
REFIT_ITER = 20
MAX_EXACT_CHOICES = 256  # 2:4 has 6 choices per group, 4:8 has 70, 8:16 would have 12,870


def exact_group_keep(w: torch.Tensor, u: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
    """The keep pattern of least OBS loss for one group of columns, per row.

    ``w`` is ``[rows, M]`` (the group's weights as updated so far), ``u`` the ``[M, M]``
    block of the upper Cholesky factor of ``H^-1`` on the group, ``choices`` ``[C, M]`` from
    :meth:`~sparsecraft.patterns.NM.choices`. The sweep over the group is simulated for every choice at once; its
    loss is exactly what the solver's own sweep will add for that choice.
    """
    prune = (~choices).to(w.dtype)  # [C, M]
    cur = w[:, None, :].repeat(1, choices.shape[0], 1)  # [rows, C, M]
    loss = torch.zeros(cur.shape[:2], dtype=w.dtype, device=w.device)
    d = u.diagonal()
    for j in range(w.shape[1]):
        err = cur[:, :, j] * prune[:, j] / d[j]
        loss += err * err
        cur[:, :, j:] -= err[..., None] * u[j, j:]
    return choices.to(w.device)[loss.argmin(dim=1)]


def _damp_schedule(percdamp: float, growth: float, tries: int) -> list[float]:
    base = percdamp if percdamp > 0 else 1e-3
    return [percdamp] + [base * growth**t for t in range(1, tries)]


class _Selection:
    """Which weights of a column block stay: decided before the sweep from the whole layer
    (``prepare``), at the block's start (``start``) and, for patterns chosen window by window,
    when the sweep reaches a window's first column (``window`` columns at a time, on the
    weights as updated so far)."""

    window = 0

    def prepare(self, w: torch.Tensor, upper: torch.Tensor) -> None:
        pass

    def start(self, b: int, i1: int, i2: int, w1: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(w1, dtype=torch.bool)

    def choose(self, i: int, w1: torch.Tensor, u1: torch.Tensor, k1: torch.Tensor) -> None:
        pass


class _Fixed(_Selection):
    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def start(self, b, i1, i2, w1, d):
        return self.mask[:, i1:i2].clone()


class _Budgets(_Selection):
    """Unstructured: the lowest ``w^2 / U_jj^2`` of the block, across all its rows."""

    def __init__(self, budgets: list[int]):
        self.budgets = budgets

    def start(self, b, i1, i2, w1, d):
        scores = w1.pow(2) / d.pow(2)[None, :]
        return Unstructured().keep_mask(scores, num_pruned=self.budgets[b])


class _NMChoice(_Selection):
    """N:M: every group of M chosen when the sweep reaches it (also when quantising: the
    choice sees the weights updated up to the group), by the diagonal score or, with ``exact``,
    by the least sweep loss of each group (see :func:`exact_group_keep`)."""

    def __init__(self, nm: NM, exact: bool = False):
        self.nm, self.window = nm, nm.m
        self.choices = nm.choices() if exact and math.comb(nm.m, nm.n) <= MAX_EXACT_CHOICES else None

    def choose(self, i, w1, u1, k1):
        g = slice(i, i + self.nm.m)
        if self.choices is not None:
            k1[:, g] = exact_group_keep(w1[:, g], u1[g, g], self.choices)
        else:
            d = u1.diagonal()
            k1[:, g] = self.nm.keep_mask(w1[:, g].pow(2) / d[g].pow(2)[None, :])


class _GroupChoice(_Selection):
    """group:G: each row drops its ``per_row`` groups of least sweep loss over the whole row,
    chosen once before the sweep (see the module docstring)."""

    def __init__(self, pattern: Group, per_row: int):
        self.pattern, self.per_row, self.mask = pattern, per_row, None

    def prepare(self, w: torch.Tensor, upper: torch.Tensor) -> None:
        rows, cols = w.shape
        size, n = self.pattern.size, cols // self.pattern.size
        # the sweep's inverse Hessian on each group: U_gg^T U_gg for its diagonal block of U
        ug = upper.reshape(n, size, n, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        inv_g = torch.linalg.inv(ug.transpose(1, 2) @ ug)
        wg = w.reshape(rows, n, size)
        loss = torch.einsum("rgi,gij,rgj->rg", wg, inv_g, wg)  # w_g^T (H^-1_gg)^-1 w_g
        keep = self.pattern.keep_groups(loss, self.per_row)
        self.mask = keep.repeat_interleave(size, dim=1)

    def start(self, b, i1, i2, w1, d):
        return self.mask[:, i1:i2].clone()


class _ColumnQuantizer:
    """Puts each column of the sweep on its group's grid. The grid of a group is fitted when
    the sweep reaches the group's first column, from the kept weights as updated so far.

    With ``order`` (act order: sweep position -> the column's place in the layer) the sweep
    visits the columns out of place, so a group's columns are scattered over it: the grids
    are then static, every one fitted before the sweep (:meth:`fit_static`) from the
    original weights, and codes and grids stay indexed by the layer's own columns."""

    def __init__(self, spec: QuantSpec, rows: int, cols: int, device, layer: str,
                 order: torch.Tensor | None = None):
        self.spec, self.layer, self.order = spec, layer, order
        self.codes = torch.full((rows, cols), spec.zero, dtype=torch.uint8, device=device)
        self.scale = torch.zeros(rows, cols // spec.group, device=device)
        self.offset = torch.zeros(rows, cols // spec.group, device=device)

    @property
    def static(self) -> bool:
        return self.order is not None

    def fit_static(self, w: torch.Tensor) -> None:
        """Every group's grid from ``w`` (the layer's weights in their own column order)."""
        g = self.spec.group
        everything = torch.ones(w.shape[0], g, dtype=torch.bool, device=w.device)
        for k in range(w.shape[1] // g):
            self.scale[:, k], self.offset[:, k] = fit_grid(w[:, k * g:(k + 1) * g], self.spec, everything, self.layer)

    def fit(self, j: int, w: torch.Tensor, keep: torch.Tensor) -> None:
        g = j // self.spec.group
        self.scale[:, g], self.offset[:, g] = fit_grid(w, self.spec, keep, self.layer)

    def column(self, j: int, w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The grid values of the sweep's column ``j`` (exactly 0 where pruned), in ``w``'s dtype."""
        col = j if self.order is None else int(self.order[j])
        g = col // self.spec.group
        scale, offset = self.scale[:, g], self.offset[:, g]
        codes = torch.where(keep, quantize_codes(w, scale, offset, self.spec), self.spec.zero)
        self.codes[:, col] = codes
        return torch.where(keep, dequantize_codes(codes, scale, offset), 0.0).to(w.dtype)

    def result(self, keep: torch.Tensor, sparse_group: int | None) -> QuantizedWeight:
        rows, cols = keep.shape
        group_keep = None if sparse_group is None else keep.reshape(rows, cols // sparse_group, sparse_group)[..., 0]
        return QuantizedWeight.from_codes(self.codes, self.scale, self.offset, self.spec, group_keep, sparse_group)


def _solve(
    w: torch.Tensor,
    upper: torch.Tensor,
    blocksize: int,
    select: _Selection,
    quant: _ColumnQuantizer | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the column sweep on ``w`` (modified in place); returns (w, keep, row losses)."""
    rows, cols = w.shape
    keep = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    losses = torch.zeros(rows, dtype=w.dtype, device=w.device)
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        u1 = upper[i1:i2, i1:i2]
        d = u1.diagonal()
        err1 = torch.zeros_like(w1)
        k1 = select.start(b, i1, i2, w1, d)
        for i in range(i2 - i1):
            if select.window and i % select.window == 0:
                select.choose(i, w1, u1, k1)
            if quant is None:
                err = w1[:, i] * (~k1[:, i]) / d[i]
            else:
                if not quant.static and (i1 + i) % quant.spec.group == 0:
                    quant.fit(i1 + i, w1[:, i:i + quant.spec.group], k1[:, i:i + quant.spec.group])
                err = (w1[:, i] - quant.column(i1 + i, w1[:, i], k1[:, i])) / d[i]
            losses += err * err / 2
            # Exact OBS step for the rest of the block; column i itself becomes q.
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            err1[:, i] = err
        w[:, i1:i2] = w1
        keep[:, i1:i2] = k1
        if i2 < cols:  # the lazy batch update of everything right of the block
            w[:, i2:] -= err1 @ upper[i1:i2, i2:]
    w[~keep] = 0  # exact zeros, not rounding residue
    return w, keep, losses


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None = None,
    pattern: str | Pattern = "unstructured",
    *,
    num_pruned: int | None = None,
    keep_mask: torch.Tensor | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    damp_growth: float = 10.0,
    max_damp_tries: int = 5,
    nm_choice: str = "greedy",
    dtype: torch.dtype = torch.float32,
    layer: str = "",
    quantize: QuantSpec | None = None,
    act_order: bool = False,
    refit: bool = False,
    refit_iter: int = REFIT_ITER,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Prune one layer with SparseGPT; with ``quantize``, prune and quantise it jointly (GPTQ).

    Args:
        weight: ``[out, in]`` (or any shape whose reduction view is ``[out, in]``).
        hessian: ``[in, in]``, e.g. :class:`~sparsecraft.oneshot.stats.HessianAccumulator`'s
            ``2/n X^T X``; any positive scale gives the same result.
        sparsity / num_pruned: the budget of unstructured (weights) and group:G (groups, the
            same number in every row) patterns; N:M fixes it. ``sparsity=0`` with
            ``quantize`` is plain GPTQ.
        pattern: ``"unstructured"``, ``"N:M"`` or ``"group:G"`` (or a Pattern object).
        keep_mask: if given, reconstruct with this mask instead of choosing one.
        blocksize: columns per lazy-update block.
        percdamp, damp_growth, max_damp_tries: damping and its escalation.
        nm_choice: ``"greedy"`` (the reference implementation's diagonal score) or
            ``"exact"`` (least sweep loss per group); N:M only.
        dtype: compute dtype, float32 or float64.
        layer: name used in messages.
        quantize: put every kept weight on its group's grid as the sweep reaches it (the
            quantisation error is compensated like a pruning error; see the module docstring).
        act_order: quantise (``quantize``, nothing pruned) the columns in decreasing order of
            the Hessian's diagonal, the inputs with the most energy first while the most
            columns remain to absorb their error; the grids are then fitted once, before the
            sweep, from the original weights (static groups).
        refit: after the sweep, replace the kept weights by the exact least-squares weights on
            the chosen mask (module docstring; not with ``quantize``, whose weights must stay on
            their grids).
        refit_iter: the refit's conjugate-gradient iterations at most.

    Returns:
        ``(new_weight, keep_mask, info)``: a new tensor of ``weight``'s shape, dtype and
        device with pruned entries exactly zero; the boolean keep-mask; and ``info`` with
        ``percdamp`` and ``damp`` (the values that worked), ``tries``, ``dead_inputs``,
        ``num_pruned``, ``blocksize``, ``loss`` (sum over rows of ``1/2 dHd^T``) and
        ``row_losses`` (tensor ``[out]``; with ``refit``, of the refitted weights, and
        ``refit`` holds the sweep's own ``sweep_loss`` and the conjugate gradients'
        ``iterations`` and ``residual``); with ``quantize`` also ``qweight`` (the
        :class:`~sparsecraft.quant.QuantizedWeight`; ``new_weight`` is exactly its
        dequantised values).
    """
    pattern = parse_pattern(pattern)
    if dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"sparsegpt: dtype must be float32 or float64, got {dtype}")
    if blocksize < 1:
        raise ConfigError(f"sparsegpt: blocksize must be >= 1, got {blocksize}")
    if percdamp < 0 or not math.isfinite(percdamp):
        raise ConfigError(f"sparsegpt: percdamp must be >= 0, got {percdamp}")
    if max_damp_tries < 1 or damp_growth <= 1:
        raise ConfigError("sparsegpt: need max_damp_tries >= 1 and damp_growth > 1")
    if nm_choice not in NM_CHOICES:
        raise ConfigError(f"sparsegpt: nm_choice must be one of {NM_CHOICES}, got {nm_choice!r}")
    if isinstance(refit_iter, bool) or not isinstance(refit_iter, int) or refit_iter < 1:
        raise ConfigError(f"sparsegpt: refit_iter must be an integer >= 1, got {refit_iter!r}")
    if refit and quantize is not None:
        raise ConfigError(f"layer '{layer}': sparsegpt refit changes the kept weights off their quantisation "
                          "grids: use refit with pruning alone")

    w0 = reduction_view(weight.detach())
    rows, cols = w0.shape
    h0 = torch.as_tensor(hessian).detach()
    if tuple(h0.shape) != (cols, cols):
        raise TargetError(
            f"layer '{layer}': Hessian shape {tuple(h0.shape)} does not match the weight's "
            f"{cols} input columns (weight {tuple(weight.shape)})"
        )
    if not torch.isfinite(h0).all():
        raise TargetError(f"layer '{layer}': Hessian contains NaN or inf")
    if not torch.isfinite(w0).all():
        raise TargetError(f"layer '{layer}': weight contains NaN or inf")

    # columns a decision spans: block sizes are rounded down to a multiple of it
    unit = pattern.m if isinstance(pattern, NM) else pattern.size if isinstance(pattern, Group) else 1
    if quantize is not None:
        check_quant_layer(quantize, cols, pattern, False, layer)
        unit = quantize.group  # a grid is fitted from its group's kept weights: never across blocks

    select: _Selection
    if keep_mask is not None:
        if tuple(keep_mask.shape) != tuple(weight.shape):
            raise ConfigError(
                f"layer '{layer}': keep_mask shape {tuple(keep_mask.shape)} != weight "
                f"shape {tuple(weight.shape)}"
            )
        fixed = reduction_view(keep_mask).to(device=w0.device, dtype=torch.bool)
        if isinstance(pattern, Group) and not pattern.is_valid(fixed):
            raise ConfigError(f"layer '{layer}': keep_mask is not a valid {pattern} mask")
        select = _Fixed(fixed)
        element_pruned = not bool(fixed.all()) and not isinstance(pattern, Group)
    elif isinstance(pattern, NM):
        pattern.check(tuple(weight.shape), layer)
        if sparsity is not None and abs(sparsity - pattern.fixed_sparsity) > 1e-9:
            raise ConfigError(
                f"layer '{layer}': pattern {pattern} fixes sparsity at "
                f"{pattern.fixed_sparsity:.4f}, but {sparsity:.4f} was asked"
            )
        if num_pruned is not None:
            raise ConfigError(f"layer '{layer}': pattern {pattern} fixes the count; drop num_pruned")
        blocksize = max(unit, blocksize - blocksize % unit)
        select = _NMChoice(pattern, nm_choice == "exact")
        element_pruned = True
    elif isinstance(pattern, Unstructured):
        total = rows * cols
        if num_pruned is None:
            if sparsity is None:
                raise ConfigError(f"layer '{layer}': unstructured SparseGPT needs a sparsity")
            num_pruned = num_to_prune(float(sparsity), total)
        if not 0 <= num_pruned <= total:
            raise ConfigError(f"layer '{layer}': num_pruned={num_pruned} outside [0, {total}]")
        blocksize = max(unit, blocksize - blocksize % unit)
        sizes = [min(blocksize, cols - i) for i in range(0, cols, blocksize)]
        select = _Budgets(_split_budget(int(num_pruned), sizes, rows))
        element_pruned = num_pruned > 0
    elif isinstance(pattern, Group):
        pattern.check(tuple(weight.shape), layer)
        per_row = pattern.per_row((rows, cols), sparsity, num_pruned)
        blocksize = max(unit, blocksize - blocksize % unit)
        select = _GroupChoice(pattern, per_row)
        element_pruned = False
    else:
        raise ConfigError(
            f"layer '{layer}': SparseGPT supports unstructured, N:M and group:G patterns, not {pattern}"
        )
    if quantize is not None and element_pruned:
        check_quant_layer(quantize, cols, pattern, True, layer)
    if act_order and (quantize is None or element_pruned or isinstance(pattern, Group)
                      or (keep_mask is not None and not bool(fixed.all()))):
        raise ConfigError(f"layer '{layer}': act_order quantises without pruning: it needs quantize and "
                          f"sparsity 0 (the columns are visited out of place, which pattern windows cannot be)")

    w = w0.to(dtype=dtype, copy=True)

    def undamped() -> torch.Tensor:
        """A copy of the Hessian in ``dtype``, dead inputs' diagonal set to 1 (one copy per
        attempt rather than one kept beside it: a wide layer's Hessian is 127 MB)."""
        h = h0.to(device=w.device, dtype=dtype, copy=True)
        h.diagonal()[dead] = 1
        return h if order is None else h[order][:, order]

    dead = h0.diagonal().to(device=w.device, dtype=dtype) == 0
    w[:, dead] = 0
    order = None
    h = undamped()
    mean_diag = float(h.diagonal().mean())
    if act_order:  # the sweep runs on permuted columns; grids and codes keep the layer's order
        order = torch.argsort(h.diagonal(), descending=True, stable=True)
        original = w
        w, h = w[:, order], h[order][:, order]

    schedule = _damp_schedule(percdamp, damp_growth, max_damp_tries)
    for attempt, pd in enumerate(schedule):
        damp = pd * mean_diag
        hd = h if attempt == 0 else undamped()
        h = None  # the factorisation below overwrites hd
        hd.diagonal().add_(damp)
        upper = inverse_cholesky_upper(hd, overwrite=True)
        del hd
        problem = "Cholesky factorisation failed"
        if upper is not None:
            quant = None if quantize is None else _ColumnQuantizer(quantize, rows, cols, w.device, layer, order)
            if quant is not None and quant.static:
                quant.fit_static(original)
            select.prepare(w, upper)
            new, keep, losses = _solve(w.clone(), upper, blocksize, select, quant)
            if torch.isfinite(new).all():
                break
            problem = "solver produced non-finite weights"
        nxt = (
            f"retrying with percdamp={schedule[attempt + 1]:g}"
            if attempt + 1 < len(schedule) else "giving up"
        )
        log.warning(
            "layer '%s': %s with damping %g (percdamp=%g); %s",
            layer, problem, damp, pd, nxt,
        )
    else:
        raise SolverError(
            f"layer '{layer}': SparseGPT could not factor the Hessian after "
            f"{len(schedule)} tries (percdamp up to {schedule[-1]:g}); the layer is "
            f"unchanged. Check the calibration inputs (too few samples, NaN) or raise "
            f"percdamp / max_damp_tries."
        )
    if attempt:
        log.warning("layer '%s': SparseGPT succeeded with raised percdamp=%g", layer, pd)

    info = {
        "percdamp": pd,
        "damp": damp,
        "tries": attempt + 1,
        "dead_inputs": int(dead.sum()),
        "num_pruned": int((~keep).sum()),
        "blocksize": blocksize,
        "loss": float(losses.sum()),
        "row_losses": losses,
    }
    if order is not None:  # back to the layer's column order
        inverse = torch.argsort(order)
        new, keep = new[:, inverse], keep[:, inverse]
        info["act_order"] = True
    if refit:
        del upper  # the sweep's factor; the back-solve needs only the Hessian
        new, cg = refit_on_support(w0, h0, keep, percdamp=pd, x0=new, dtype=dtype, max_iter=refit_iter)
        losses = cg.pop("row_losses")  # the sweep's loss, for the refitted weights
        info.update(refit={"sweep_loss": info["loss"], **cg}, loss=float(losses.sum()), row_losses=losses)
    if quant is not None:
        info["qweight"] = quant.result(keep, pattern.size if isinstance(pattern, Group) else None)
        new = info["qweight"].dequantize().to(new.dtype)
    new_weight = new.to(dtype=weight.dtype).reshape(weight.shape)
    return new_weight, keep.reshape(weight.shape), info


@register_solver
class SparseGPTSolver(Solver):
    """The ``sparsegpt`` method: :func:`sparsegpt_prune` on the layer's Hessian; with the option
    ``quantize`` (``int4``/``int8``, plus ``group``, ``symmetric``, ``embeddings``) it prunes and
    quantises jointly and the layers become :class:`~sparsecraft.quant.QuantLinear`."""

    name = "sparsegpt"
    updates_weights = True
    requires = ("hessian",)
    patterns = (Unstructured, NM, Group)

    @dataclass(frozen=True)
    class Options(QuantOptions):
        blocksize: int = 128  # columns per lazy-update block
        percdamp: float = 0.01  # damping as a fraction of mean(diag H)
        max_damp_tries: int = 5
        damp_growth: float = 10.0
        nm_choice: str = "greedy"  # N:M groups: least OBS loss ("exact") or the diagonal score ("greedy")
        # least-squares weights on the chosen mask after the sweep (None: on unless quantising;
        # False: the sweep's own weights, as the reference implementation returns them)
        refit: bool | None = None
        refit_iter: int = REFIT_ITER  # its conjugate-gradient iterations at most

        def check(self):
            self.check_sweep("sparsegpt")

        def check_sweep(self, owner: str) -> None:
            if self.blocksize < 1:
                raise ConfigError(f"{owner}: blocksize must be >= 1, got {self.blocksize}")
            if self.percdamp < 0:
                raise ConfigError(f"{owner}: percdamp must be >= 0, got {self.percdamp}")
            if self.max_damp_tries < 1 or self.damp_growth <= 1:
                raise ConfigError(f"{owner}: need max_damp_tries >= 1 and damp_growth > 1")
            if self.nm_choice not in NM_CHOICES:
                raise ConfigError(f"{owner}: nm_choice must be one of {NM_CHOICES}, got {self.nm_choice!r}")
            self.check_quant(owner)
            if self.refit_iter < 1:
                raise ConfigError(f"{owner}: refit_iter must be >= 1, got {self.refit_iter}")
            if self.spec() is not None and (self.refit or self.refit_iter != REFIT_ITER):
                raise ConfigError(f"{owner}: quantised weights are never refitted (the refit would move them off "
                                  "their grids); drop refit and refit_iter, or quantize")

        def refits(self) -> bool:
            return self.spec() is None if self.refit is None else self.refit

    def quantization(self):
        return self.options if self.options.spec() is not None else None

    def check_targets(self, layers, sparsity):
        spec = self.options.spec()
        if spec is None:
            return
        for t, pattern in layers:
            pruned = (sparsity or 0) > 0 or isinstance(pattern, NM)
            check_quant_layer(spec, reduction_view(t.param).shape[1], pattern, pruned, t.name)

    def _sweep_options(self) -> dict:
        """Options of :func:`sparsegpt_prune` a subclass adds (GPTQ's act order)."""
        return {}

    def _run(self, ctx, pattern, sparsity, keep=None):
        o = self.options
        weight, keep, info = sparsegpt_prune(
            ctx.param.detach(), ctx.stats["hessian"], sparsity, pattern, keep_mask=keep, blocksize=o.blocksize,
            percdamp=o.percdamp, max_damp_tries=o.max_damp_tries, damp_growth=o.damp_growth, layer=ctx.name,
            quantize=o.spec(), nm_choice=o.nm_choice, refit=o.refits(), refit_iter=o.refit_iter,
            **self._sweep_options(),
        )
        if info.get("tries", 1) > 1:
            log.warning("layer '%s': SparseGPT needed damping %.3g", ctx.name, info["percdamp"])
        return weight, keep, info

    def quantize_head(self, weight, hessian, spec, layer):
        """GPTQ (nothing pruned) of an output head, with this method's sweep settings."""
        o = self.options
        _, _, info = sparsegpt_prune(weight.detach(), hessian, 0.0, "unstructured", blocksize=o.blocksize,
                                     percdamp=o.percdamp, max_damp_tries=o.max_damp_tries, damp_growth=o.damp_growth,
                                     layer=layer, quantize=spec, **self._sweep_options())
        if info.get("tries", 1) > 1:
            log.warning("layer '%s': GPTQ needed damping %.3g", layer, info["percdamp"])
        return info["qweight"]

    def solve(self, ctx, pattern, sparsity):
        weight, keep, info = self._run(ctx, pattern, sparsity)
        # with refit, the layer's loss before and after it (1/2 tr((W - W') H (W - W')^T), damped H)
        summary = {"refit": {**info["refit"], "loss": info["loss"]}} if "refit" in info else {}
        return LayerResult(keep, weight, summary, quant=info.get("qweight"))

    def reconstruct(self, ctx, keep, pattern):
        return self._run(ctx, pattern, None, keep)[0]
