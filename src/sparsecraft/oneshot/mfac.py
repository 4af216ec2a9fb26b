"""Second-order pruning from an inverse-Fisher approximation (M-FAC / Optimal BERT Surgeon).

The Fisher of a layer is approximated from ``m`` gradients ``g_1..g_m`` (flattened weight
shape) as ``F = lam I + (1/m) sum g g^T``, block-diagonal with blocks of ``B`` consecutive
weights (Frantar et al., 2021; Kurtic et al., 2022). Per block, with ``U = G_b^T / sqrt(m)``
(``B x m``), Woodbury gives the inverse from an ``m x m`` system::

    F_b^-1 = (1/lam) (I - U (lam I + U^T U)^-1 U^T)

so the cost is ``O(n m^2)`` per layer and nothing of size ``n x n`` is formed; with at least
as many gradients as a block has weights the ``B x B`` block is inverted directly instead
(``O(n B m + n B^2)``). A weight's
score is the OBS loss increase of removing it alone, ``w^2 / (2 [F^-1]_ii)``; the optional
update moves the kept weights of each block to compensate for all pruned ones together,
``dw = -F^-1[:, Q] (F^-1[Q, Q])^-1 w_Q`` (exact within the block; the pruned weights land on
zero). ``lam`` is ``damp`` times the mean diagonal of ``(1/m) sum g g^T`` of the layer, so
one setting suits layers of any gradient scale.

The gradients (statistic ``gradient_samples``) are one per calibration batch of
``batch_size`` samples: of the model's language-modelling loss where it has one (empirical
Fisher), else of ``<output, e>`` with ``e ~ N(0, I)`` (the Fisher of a Gaussian model of the
output; encoders and classifiers without labels).

With ``fisher="token"`` the gradients are instead the per-token ones of each ``Linear``
layer, ``delta_t x_t^T`` (the signal arriving at the layer's output at token ``t`` times its
input there), and only their diagonal is kept (statistic ``token_fisher``): ``F_ij = sum_t
delta_tj^2 x_ti^2``. A batch of 32 sequences of 128 tokens then gives 4,096 gradients instead
of 32, which is what a usable Fisher needs: on all-MiniLM-L6-v2 at 50% the per-batch Fisher
scored below Wanda and the per-token one above it (``benchmarks/results/mfac.md``). Blocks
did not help there (B = 4 and 16 scored below B = 1 in a development run), so this mode has
none and no OBS update (with a diagonal Fisher it moves nothing). Cross-token terms of the
per-sequence gradient are dropped, as SparseGPT's and Wanda's Hessians do.
"""

from __future__ import annotations

import logging
from contextlib import closing, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..criteria import LayerContext, LayerResult, Solver, register_solver
from ..errors import ConfigError
from .driver import Statistic, gradients_only_for, register_statistic

__all__ = ["damping", "inverse_fisher_diag", "inverse_fisher_blocks", "mfac_scores", "obs_update",
           "gradient_samples", "token_squares", "token_fisher", "token_inverse_diag", "MFAC", "MFACOptions"]

log = logging.getLogger(__name__)


def _blocked(grads: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """``U``: ``[blocks, B, m]`` (zero-padded), scaled by 1/sqrt(m); and the pad."""
    m, n = grads.shape
    pad = (-n) % block
    g = torch.nn.functional.pad(grads.double(), (0, pad))
    return g.reshape(m, -1, block).permute(1, 2, 0) / m ** 0.5, pad


def damping(grads: torch.Tensor, damp: float) -> float:
    """``lam``: ``damp`` times the mean of ``(1/m) sum g_i^2`` (``damp`` itself for zero gradients)."""
    mean = float(grads.double().pow(2).mean(0).mean())
    return damp * mean if mean > 0 else damp


@contextmanager
def _one_thread():
    """Batched small LAPACK calls on one thread: on a busy 2-core machine the threaded batched
    solve of 368 16x16 systems took 96 s, single-threaded 0.08 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _woodbury(u: torch.Tensor, lam: float) -> torch.Tensor:
    """``X = (lam I + U^T U)^-1 U^T`` per block: ``[blocks, m, B]``."""
    k = u.transpose(1, 2) @ u
    k.diagonal(dim1=1, dim2=2).add_(lam)
    with _one_thread():
        return torch.linalg.solve(k, u.transpose(1, 2))


def _inverse_blocks(u: torch.Tensor, lam: float) -> torch.Tensor:
    """``F_b^-1`` for every block of ``u`` (``[blocks, B, m]``), ``[blocks, B, B]``: through
    Woodbury's ``m x m`` systems when there are fewer gradients than weights in a block, else
    by inverting the ``B x B`` Fisher itself (with oBERT's m = 1024 and B = 50, Woodbury would
    solve a 1024 x 1024 system per block of 50 weights)."""
    block, m = u.shape[1], u.shape[2]
    if m < block:
        eye = torch.eye(block, dtype=u.dtype)
        return (eye - u @ _woodbury(u, lam)) / lam
    fisher = u @ u.transpose(1, 2)
    fisher.diagonal(dim1=1, dim2=2).add_(lam)
    with _one_thread():  # lam > 0 makes every block positive definite
        return torch.cholesky_inverse(torch.linalg.cholesky(fisher))


def inverse_fisher_diag(grads: torch.Tensor, block: int, lam: float, chunk: int = 4096) -> torch.Tensor:
    """The diagonal of the block-diagonal ``(lam I + (1/m) G^T G)^-1`` for ``grads`` ``[m, n]``."""
    u, pad = _blocked(grads, block)
    out = []
    for s in range(0, u.shape[0], chunk):
        ub = u[s:s + chunk]
        if ub.shape[2] < block:  # the diagonal alone, without forming the blocks
            x = _woodbury(ub, lam)
            out.append((1.0 - (ub * x.transpose(1, 2)).sum(-1)) / lam)
        else:
            out.append(_inverse_blocks(ub, lam).diagonal(dim1=1, dim2=2))
    diag = torch.cat(out).reshape(-1)
    return diag[: diag.numel() - pad] if pad else diag


def inverse_fisher_blocks(grads: torch.Tensor, block: int, lam: float) -> torch.Tensor:
    """The diagonal blocks of the inverse, ``[blocks, B, B]`` (the last block zero-padded)."""
    u, _ = _blocked(grads, block)
    return _inverse_blocks(u, lam)


def mfac_scores(weight: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """OBS saliency ``w^2 / (2 [F^-1]_ii)`` in the weight's shape."""
    w = weight.detach().double().reshape(-1)
    return (w * w / (2.0 * diag.clamp_min(torch.finfo(torch.float64).tiny))).reshape(weight.shape)


def obs_update(weight: torch.Tensor, keep: torch.Tensor, grads: torch.Tensor, block: int, lam: float,
               chunk: int = 2048) -> torch.Tensor:
    """Weights after removing every ``~keep`` entry, the kept ones of each block moved by the
    exact OBS correction of that block; pruned entries are exactly zero."""
    n = weight.numel()
    w = weight.detach().double().reshape(-1)
    pad = (-n) % block
    wb = torch.nn.functional.pad(w, (0, pad)).reshape(-1, block)
    qb = torch.nn.functional.pad((~keep).reshape(-1), (0, pad)).reshape(-1, block)
    u, _ = _blocked(grads, block)
    new = torch.empty_like(wb)
    for s in range(0, wb.shape[0], chunk):
        ub, q, wq = u[s:s + chunk], qb[s:s + chunk].double(), wb[s:s + chunk]
        finv = _inverse_blocks(ub, lam)
        # A = P Finv P + (I - P): solving A z = P w gives z = (Finv_QQ)^-1 w_Q on Q, 0 elsewhere
        a = q[:, :, None] * finv * q[:, None, :] + torch.diag_embed(1.0 - q)
        with _one_thread():  # A is SPD: a principal block of Finv plus identity
            chol, _ = torch.linalg.cholesky_ex(a)
            z = torch.cholesky_solve((q * wq)[..., None], chol)
        new[s:s + chunk] = wq - (finv @ z)[..., 0]
    out = new.reshape(-1)[:n]
    out = out.masked_fill(~keep.reshape(-1), 0.0)
    return out.reshape(weight.shape).to(weight.dtype)


# -- the statistic: m gradients per target ---------------------------------------------------
def _output_tensors(out) -> list[torch.Tensor]:
    """Every floating tensor the model returns (an encoder's hidden states and its pooler)."""
    if isinstance(out, torch.Tensor):
        values = [out]
    elif hasattr(out, "values"):
        values = list(out.values())
    elif isinstance(out, (tuple, list)):
        values = list(out)
    else:
        values = []
    tensors = [v for v in values if isinstance(v, torch.Tensor) and v.dtype.is_floating_point]
    if not tensors:
        raise ConfigError(f"gradient samples need a model output tensor, got {type(out).__name__}")
    return tensors


def _calibration_losses(model: nn.Module, params: list[torch.Tensor], calibration: torch.Tensor, batch_size: int,
                        seed: int, probes: int):
    """Yields ``(loss, retain_graph)`` per backward pass the statistics take: the model's
    language-modelling loss of each batch where it has one, else ``probes`` losses ``<output,
    e>`` (``e ~ N(0, I)``, seeded) per batch, on one forward. In eval mode, with gradients for
    ``params`` only; the model's modes and flags come back afterwards."""
    from ..evaluate import is_causal_lm

    device = params[0].device if params else torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    causal = is_causal_lm(model)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with gradients_only_for(model, params):
            for start in range(0, calibration.shape[0], batch_size):
                batch = calibration[start:start + batch_size].to(device)
                if causal:
                    yield model(input_ids=batch, labels=batch, use_cache=False).loss, False
                    continue
                outputs = _output_tensors(model(batch))
                for probe in range(probes):
                    yield (sum((o * torch.randn(o.shape, generator=gen, dtype=torch.float32).to(o)).sum()
                               for o in outputs), probe < probes - 1)
    finally:
        for m, mode in modes.items():
            m.training = mode


def gradient_samples(model: nn.Module, targets, calibration: torch.Tensor, batch_size: int,
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """``{target: [m, numel]}``: one gradient per batch of ``batch_size`` calibration samples
    (see the module docstring for the loss). The model's flags and ``.grad`` are unchanged."""
    params = [t.param for t in targets]
    rows: dict[str, list[torch.Tensor]] = {t.name: [] for t in targets}
    with closing(_calibration_losses(model, params, calibration, batch_size, seed, probes=1)) as losses:
        for loss, _ in losses:
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for t, g in zip(targets, grads):
                if g is None:
                    raise ConfigError(f"layer '{t.name}': the model output does not depend on it")
                rows[t.name].append(g.detach().float().reshape(-1))
    return {name: torch.stack(r) for name, r in rows.items()}


register_statistic(Statistic("gradient_samples", "model", "gradient_samples", gradient_samples, inputs="any"))

#: Gaussian probes ``e`` per calibration batch for ``token_fisher`` on a model without a loss
#: (a development run on MiniLM at 50%, damp 1e-2, probes of the last hidden state only: mean
#: cosine 0.8582 with 1 probe, 0.8614 with 4, 0.8622 with 16)
TOKEN_PROBES = 4


def check_token_targets(targets) -> None:
    """``token_fisher`` reads each layer's input and output gradient: ``nn.Linear`` weights only."""
    for t in targets:
        if not isinstance(t.module, nn.Linear) or t.param_name != "weight":
            raise ConfigError(f"layer '{t.name}': method 'mfac' with fisher='token' prunes nn.Linear weights only, "
                              f"not {type(t.module).__name__}.{t.param_name} (use fisher='blocks')")


@contextmanager
def token_squares(targets):
    """Inside, every backward pass through a target ``nn.Linear`` adds ``sum_t (delta_t x_t^T)^2``
    (its per-token, or per-example, squared gradients) to the yielded ``{target: [out, in]}``
    float64 sums."""
    check_token_targets(targets)
    sums = {t.name: torch.zeros(t.param.shape, dtype=torch.float64, device=t.param.device) for t in targets}

    def add(name: str, x: torch.Tensor, grad: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).double().square()
        sums[name].addmm_(grad.reshape(-1, grad.shape[-1]).double().square().T, x2)

    def watch(name: str):
        def hook(_module, args, out):
            if out.requires_grad:
                x = args[0].detach()  # this call's input, for the gradient at this call's output
                out.register_hook(lambda grad: add(name, x, grad.detach()))
        return hook

    handles = [t.module.register_forward_hook(watch(t.name)) for t in targets]
    try:
        yield sums
    finally:
        for h in handles:
            h.remove()


def token_fisher(model: nn.Module, targets, calibration: torch.Tensor, batch_size: int,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """``{target: [out, in]}`` float64: the sum over calibration tokens (and probes) of the
    squared per-token gradients of each ``nn.Linear`` weight (:func:`token_squares`); the loss
    is the one of :func:`gradient_samples`, with :data:`TOKEN_PROBES` probes for models without
    one. The model's flags and ``.grad`` are unchanged."""
    params = [t.param for t in targets]
    with token_squares(targets) as sums, \
            closing(_calibration_losses(model, params, calibration, batch_size, seed, TOKEN_PROBES)) as losses:
        for loss, retain in losses:
            torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain)  # the hooks take their part
    return sums


def token_inverse_diag(sums: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """``[F^-1]_ii`` of the diagonal Fisher ``sums + lam`` (flattened) and ``lam``."""
    lam = damp * float(sums.mean()) or damp
    return 1.0 / (sums.reshape(-1) + lam), lam


register_statistic(Statistic("token_fisher", "model", "token_fisher", token_fisher, inputs="any", merge="sum"))


@dataclass(frozen=True)
class MFACOptions:
    fisher: str = "blocks"  # "blocks": from per-batch gradients; "token": diagonal, per-token gradients
    block: int | None = None  # weights per diagonal block of the Fisher (blocks: 64 when None)
    damp: float = 1e-2  # lam = damp * mean diagonal of the empirical Fisher
    update: bool = False  # OBS update of the kept weights (costs a B x B solve per block)

    def check(self):
        if self.fisher not in ("blocks", "token"):
            raise ConfigError(f"method 'mfac' option fisher must be 'blocks' or 'token', got {self.fisher!r}")
        if self.block is not None and self.block < 1:
            raise ConfigError(f"method 'mfac' option block must be >= 1, got {self.block}")
        if self.fisher == "token" and (self.block not in (None, 1) or self.update):
            raise ConfigError("method 'mfac' with fisher='token' has a diagonal Fisher: it takes no block > 1 "
                              "and no update (which would move nothing)")
        if not self.damp > 0:
            raise ConfigError(f"method 'mfac' option damp must be > 0, got {self.damp}")

    @property
    def block_size(self) -> int:
        return 1 if self.fisher == "token" else (self.block or 64)


@register_solver
class MFAC(Solver):
    """One-shot second-order pruning: scores ``w^2 / (2 [F^-1]_ii)``, then (``update``) the
    OBS correction of the kept weights. Calibration: token ids or a batch of model inputs; one
    gradient per ``batch_size`` samples (driver option), so ``m = samples / batch_size``;
    with ``fisher="token"`` one per token of every ``nn.Linear`` (see the module docstring)."""

    name = "mfac"
    requires = ("gradient_samples",)
    Options = MFACOptions
    updates_weights = True

    def __init__(self, options=None, *, seed: int = 0):
        super().__init__(options, seed=seed)
        self.requires = ("token_fisher",) if self.options.fisher == "token" else ("gradient_samples",)

    def check_targets(self, layers, sparsity) -> None:
        if self.options.fisher == "token":
            check_token_targets([target for target, _ in layers])

    def _grads(self, ctx: LayerContext) -> tuple[torch.Tensor, float]:
        grads = ctx.stats["gradient_samples"]
        return grads, damping(grads, self.options.damp)

    def _inverse_diag(self, ctx: LayerContext) -> tuple[torch.Tensor, dict]:
        if self.options.fisher == "token":
            diag, lam = token_inverse_diag(ctx.stats["token_fisher"].to(ctx.param.device), self.options.damp)
            return diag, {"fisher": "token", "damping": lam}
        grads, lam = self._grads(ctx)
        diag = inverse_fisher_diag(grads, self.options.block_size, lam)
        return diag, {"fisher_samples": int(grads.shape[0]), "damping": lam}

    def scores(self, ctx: LayerContext) -> torch.Tensor:
        return mfac_scores(ctx.param, self._inverse_diag(ctx)[0]).float()

    def solve(self, ctx, pattern, sparsity) -> LayerResult:
        diag, info = self._inverse_diag(ctx)
        keep = pattern.keep_mask(mfac_scores(ctx.param, diag).float(), sparsity, layer=ctx.name)
        if not self.options.update:
            return LayerResult(keep, info=info)
        grads, lam = self._grads(ctx)
        weight = obs_update(ctx.param, keep, grads, self.options.block_size, lam)
        return LayerResult(keep, weight.to(ctx.param.device), info)

    def reconstruct(self, ctx, keep, pattern):
        if not self.options.update:
            return None
        grads, lam = self._grads(ctx)
        return obs_update(ctx.param, keep, grads, self.options.block_size, lam)
