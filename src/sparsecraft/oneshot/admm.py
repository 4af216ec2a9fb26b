"""An exact layer solver: ADMM with a rising penalty, then conjugate gradients on the support.

Pure tensor math on one layer, in the spirit of ALPS (Meng et al. 2024). The problem is
SparseGPT's: with ``H`` proportional to ``X^T X`` (plus a little damping), find ``W'`` with the
pattern's zeros minimising

    f(W') = tr((W - W') H (W - W')^T) = ||W X^T - W' X^T||^2 (up to the scale of H).

**ADMM.** Split ``W'`` into a dense copy ``B`` and a sparse copy ``D`` with ``B = D``; the scaled
augmented Lagrangian alternates

* ``B = (W H + rho (D - U)) (H + rho I)^-1``: exact, from one eigendecomposition of ``H``
  made once, so a new ``rho`` costs nothing;
* ``D = P(B + U)``: the projection onto the pattern (keep the largest magnitudes: the
  ``k`` largest of the layer for unstructured, the ``N`` largest of every group for N:M);
* ``U += B - D``.

``rho`` starts small (``B`` stays near the dense optimum) and grows each ``check_every``
iterations, fast while the support still moves and slowly once it settles, which forces
``B`` and ``D`` together. The run stops when the support has not changed for
``patience`` checks and ``||B - D|| <= tol ||D||``, or after ``max_iter`` iterations.

**Back-solve.** On the final support every row is an independent least-squares problem
``min (w - w') H (w - w')^T`` over its kept entries. A batched preconditioned conjugate
gradient (Jacobi preconditioner, every row its own step sizes) solves all rows at once with
one matmul per iteration, to ``cg_tol`` relative residual: the exact optimum on the support.

**Never worse than the start.** With ``candidates`` (e.g. SparseGPT's result for the same
layer) the solver also back-solves on each candidate's support, and returns whichever of
all of them has the lowest error ``f`` measured with the undamped ``H``; a candidate's own
weights are among the choices, so the result is never worse than any candidate.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..criteria import LayerResult, Solver, register_solver
from ..errors import ConfigError, TargetError
from ..patterns import NM, Pattern, Unstructured, num_to_prune, parse_pattern, reduction_view
from .sparsegpt import sparsegpt_prune
from .support import refit_on_support, solve_on_support

__all__ = ["admm_prune", "prepare_hessian", "PreparedHessian", "solve_on_support", "layer_error", "ADMMSolver"]

log = logging.getLogger(__name__)


def layer_error(w_dense: torch.Tensor, w_sparse: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - W') H (W - W')^T)``: the layer's squared output error up to H's scale."""
    d = (reduction_view(w_dense) - reduction_view(w_sparse)).to(torch.float64)
    return float(((d @ hessian.to(d)) * d).sum())


@dataclass(frozen=True)
class PreparedHessian:
    """What ADMM needs of a Hessian, independent of the weights: layers that read the same
    input (q/k/v, gate/up) share it, so its eigendecomposition is made once."""

    dead: torch.Tensor  # inputs that never fire (zero diagonal)
    scale: float  # mean diagonal, divided out
    c: torch.Tensor  # sqrt of the damped diagonal: the unit-diagonal scaling
    h_true: torch.Tensor  # undamped, scaled (float64): judges the results
    hc: torch.Tensor  # damped, unit diagonal, compute dtype
    evals: torch.Tensor
    evecs: torch.Tensor


def prepare_hessian(hessian: torch.Tensor, percdamp: float, dtype: torch.dtype = torch.float32,
                    device=None) -> PreparedHessian:
    """Damped, unit-diagonal Hessian and its eigendecomposition (see :func:`admm_prune`)."""
    h = hessian.detach().to(device=device, dtype=torch.float64, copy=True)
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1  # a channel that never fires: its weights do nothing
    scale = float(h.diagonal().mean())
    h /= scale
    h_true = h.clone()
    h.diagonal().add_(percdamp)
    # Work with unit-diagonal H: W~ = W diag(c), H~ = diag(1/c) H diag(1/c), c = sqrt(diag H).
    # f and the zeros are unchanged, but the projection's "largest magnitude" now weighs a
    # weight by how strongly its input fires, and rho is relative to a unit diagonal.
    c = h.diagonal().sqrt()
    h = h / c[:, None] / c[None, :]
    evals, evecs = torch.linalg.eigh(h)
    return PreparedHessian(dead, scale, c, h_true, h.to(dtype), evals.to(dtype), evecs.to(dtype))


def _project(z: torch.Tensor, pattern: Pattern, num_pruned: int | None) -> torch.Tensor:
    scores = z.abs()
    if isinstance(pattern, NM):
        return pattern.keep_mask(scores)
    return Unstructured().keep_mask(scores, num_pruned=num_pruned)


def admm_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None = None,
    pattern: str | Pattern = "unstructured",
    *,
    num_pruned: int | None = None,
    candidates: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    rho: float = 0.1,
    max_iter: int = 150,
    check_every: int = 3,
    patience: int = 2,
    tol: float = 1e-3,
    percdamp: float = 0.01,
    cg_iter: int = 500,
    cg_tol: float | None = None,
    dtype: torch.dtype = torch.float32,
    layer: str = "",
    prepared: PreparedHessian | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Prune one layer by ADMM and back-solve the kept weights exactly (module docstring).

    Args:
        weight: ``[out, in]`` (or any shape whose reduction view is that).
        hessian: ``[in, in]``, proportional to ``X^T X``; its scale does not matter.
        sparsity / num_pruned: unstructured budget over the whole layer (exactly one);
            an N:M pattern fixes it.
        pattern: ``"unstructured"`` or ``"N:M"`` (or a Pattern).
        candidates: ``(weight, keep)`` pairs from other solvers for this layer; the result
            is the best of ADMM's and theirs (each back-solved), judged on the undamped H.
        rho: starting penalty, relative to the mean diagonal of H.
        max_iter, check_every, patience, tol: ADMM iterations and its stopping rule.
        percdamp: damping ``percdamp * mean(diag H)`` added to H for the solve.
        cg_iter, cg_tol: the conjugate-gradient back-solve.
        dtype: compute dtype (float32 or float64).
        layer: name for messages.
        prepared: :func:`prepare_hessian` of ``hessian`` with the same ``percdamp`` and
            ``dtype``, when several layers share it.

    Returns:
        ``(new_weight, keep_mask, info)``; ``info`` has ``error`` (``f`` of the result on
        the undamped H), ``errors`` (per source: ``admm`` and ``candidate_i``), ``source``
        (the winner), ``iterations``, ``rho`` (final), ``cg_iterations`` and
        ``num_pruned``.
    """
    pattern = parse_pattern(pattern)
    if dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"admm: dtype must be float32 or float64, got {dtype}")
    if cg_tol is None:
        cg_tol = 1e-10 if dtype == torch.float64 else 1e-5
    for name, value in (("rho", rho), ("tol", tol), ("cg_tol", cg_tol)):
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"admm: {name} must be a positive number, got {value!r}")
    for name, value in (("max_iter", max_iter), ("check_every", check_every), ("patience", patience),
                        ("cg_iter", cg_iter)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"admm: {name} must be an integer >= 1, got {value!r}")
    if not (percdamp >= 0 and math.isfinite(percdamp)):
        raise ConfigError(f"admm: percdamp must be >= 0, got {percdamp!r}")

    w0 = reduction_view(weight.detach())
    rows, cols = w0.shape
    h0 = torch.as_tensor(hessian).detach()
    if tuple(h0.shape) != (cols, cols):
        raise TargetError(f"layer '{layer}': Hessian shape {tuple(h0.shape)} does not match the "
                          f"weight's {cols} input columns (weight {tuple(weight.shape)})")
    if not torch.isfinite(h0).all() or not torch.isfinite(w0).all():
        raise TargetError(f"layer '{layer}': weight or Hessian contains NaN or inf")
    if isinstance(pattern, NM):
        pattern.check(tuple(weight.shape), layer)
        if sparsity is not None and abs(sparsity - pattern.fixed_sparsity) > 1e-9:
            raise ConfigError(f"layer '{layer}': pattern {pattern} fixes sparsity at "
                              f"{pattern.fixed_sparsity:.4f}, but {sparsity:.4f} was asked")
        if num_pruned is not None:
            raise ConfigError(f"layer '{layer}': pattern {pattern} fixes the count; drop num_pruned")
    elif isinstance(pattern, Unstructured):
        if num_pruned is None:
            if sparsity is None:
                raise ConfigError(f"layer '{layer}': unstructured ADMM needs a sparsity")
            num_pruned = num_to_prune(float(sparsity), rows * cols)
        if not 0 <= num_pruned <= rows * cols:
            raise ConfigError(f"layer '{layer}': num_pruned={num_pruned} outside [0, {rows * cols}]")
    else:
        raise ConfigError(f"layer '{layer}': ADMM supports unstructured and N:M patterns, not {pattern}")

    device = w0.device
    prep = prepared if prepared is not None else prepare_hessian(h0, percdamp, dtype, device)
    if tuple(prep.h_true.shape) != (cols, cols):
        raise TargetError(f"layer '{layer}': the prepared Hessian does not match the weight's {cols} columns")
    dead, c, scale, h_true, hc = prep.dead, prep.c, prep.scale, prep.h_true, prep.hc
    evals, evecs = prep.evals, prep.evecs
    w = w0.to(dtype=dtype, copy=True)
    w[:, dead] = 0
    w_orig = w
    w = w * c.to(dtype)[None, :]
    wh = w @ hc  # constant part of the B-update

    def b_update(target: torch.Tensor, r: float) -> torch.Tensor:
        return (((wh + r * target) @ evecs) / (evals + r)[None, :]) @ evecs.T

    d = w * _project(w, pattern, num_pruned)
    u = torch.zeros_like(w)
    keep = d != 0
    r = rho
    stable = 0
    it = 0
    for it in range(1, max_iter + 1):
        b = b_update(d - u, r)
        z = b + u
        new_keep = _project(z, pattern, num_pruned)
        d = z * new_keep
        u = z.sub_(d)  # z is not needed again
        if it % check_every:
            keep = new_keep
            continue
        changed = int((new_keep != keep).sum())
        keep = new_keep
        kept = max(1, int(keep.sum()))
        gap = float((b - d).norm()) / max(float(d.norm()), 1e-30)
        stable = stable + 1 if changed == 0 else 0
        if stable >= patience and gap <= tol:
            break
        growth = 1.3 if changed > 0.01 * kept else 1.2 if changed > 1e-4 * kept else 1.1
        old = r
        r *= growth
        u *= old / r  # the scaled dual U = Y / rho follows rho
    sources: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, (cw, ck) in enumerate(candidates or []):
        ck = reduction_view(ck).to(device=device, dtype=torch.bool)
        if tuple(ck.shape) != (rows, cols):
            raise ConfigError(f"layer '{layer}': candidate {i} mask shape {tuple(ck.shape)} != ({rows}, {cols})")
        cand = reduction_view(cw).to(device=device, dtype=dtype) * c.to(dtype)[None, :]
        sources[f"candidate_{i}"] = (cand * ck, ck)

    # The back-solve runs on ADMM's support only; candidates are judged as given, which is
    # all the "never worse" promise needs.
    solved, cg = solve_on_support(w, hc, keep, x0=d, max_iter=cg_iter, tol=cg_tol)
    errors: dict[str, float] = {}
    best = None
    for name, (cand, mask) in {"admm": (solved, keep), **sources}.items():
        err = layer_error(w_orig, cand.to(torch.float64) / c[None, :], h_true) * scale
        errors[name] = err
        if best is None or err < best[0]:
            best = (err, name, cand, mask)
    err, source, new, keep = best
    new = (new.to(torch.float64) / c[None, :] * keep).to(dtype=weight.dtype)
    if not torch.isfinite(new).all():
        raise TargetError(f"layer '{layer}': ADMM produced non-finite weights")
    info = {
        "error": err, "errors": errors, "source": source, "iterations": it, "rho": r,
        "cg_iterations": cg["iterations"], "num_pruned": int((~keep).sum()), "dead_inputs": int(dead.sum()),
    }
    log.debug("layer '%s': ADMM %d iterations, rho %.3g, winner %s, errors %s", layer, it, r, source, errors)
    return new.reshape(weight.shape), keep.reshape(weight.shape), info


@register_solver
class ADMMSolver(Solver):
    """The ``admm`` method: :func:`admm_prune` on the layer's Hessian, with SparseGPT's result
    for the same layer as a candidate (so no layer ends worse than SparseGPT leaves it)."""

    name = "admm"
    updates_weights = True
    requires = ("hessian",)
    patterns = (Unstructured, NM)

    @dataclass(frozen=True)
    class Options:
        rho: float = 0.1  # starting penalty, relative to the unit diagonal
        max_iter: int = 150  # ADMM iterations at most
        percdamp: float = 0.01  # damping as a fraction of mean(diag H), as SparseGPT's
        sparsegpt_candidate: bool = True  # also run SparseGPT and keep the better layer

        def check(self):
            if not (self.rho > 0 and math.isfinite(self.rho)):
                raise ConfigError(f"admm: rho must be a positive number, got {self.rho}")
            if self.max_iter < 1:
                raise ConfigError(f"admm: max_iter must be >= 1, got {self.max_iter}")
            if not (self.percdamp >= 0 and math.isfinite(self.percdamp)):
                raise ConfigError(f"admm: percdamp must be >= 0, got {self.percdamp}")

    _shared: tuple | None = None  # (Hessian tensor, its PreparedHessian) of the last layer

    def solve(self, ctx, pattern, sparsity):
        o = self.options
        weight, hessian = ctx.param.detach(), ctx.stats["hessian"]
        # layers reading the same input get the same Hessian object from the driver
        if self._shared is None or self._shared[0] is not hessian:
            self._shared = (hessian, prepare_hessian(hessian, o.percdamp, torch.float32, weight.device))
        candidates = []
        if o.sparsegpt_candidate:
            sw, sk, _ = sparsegpt_prune(weight, hessian, sparsity, pattern, percdamp=o.percdamp, layer=ctx.name)
            candidates.append((sw, sk))
        new, keep, info = admm_prune(weight, hessian, sparsity, pattern, candidates=candidates, rho=o.rho,
                                     max_iter=o.max_iter, percdamp=o.percdamp, layer=ctx.name,
                                     prepared=self._shared[1])
        summary = {"layer_error": info["error"], "source": "sparsegpt" if info["source"] != "admm" else "admm"}
        if o.sparsegpt_candidate:
            summary["sparsegpt_layer_error"] = info["errors"]["candidate_0"]
        return LayerResult(keep, new, summary)

    def reconstruct(self, ctx, keep, pattern):
        """The exact least-squares weights on a given mask (after a refiner changed it)."""
        return refit_on_support(ctx.param, ctx.stats["hessian"], keep, percdamp=self.options.percdamp,
                                dtype=torch.float64)[0]
