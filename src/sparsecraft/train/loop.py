"""The training loop of the built-in experiments: deterministic data order, learning-rate
schedule, atomic checkpoints with resume, and the final report.

Everything that varies over a run is a function of the step (data order, learning rate), so
a resumed run is bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..formats.io import atomic_write
from .checkpoints import CHECKPOINT, read_checkpoint, restore_, write_checkpoint
from .datasets import load_dataset
from .recipe import TrainRecipe
from .registry import BuildContext
from .zoo import build_model

__all__ = ["run_training", "accuracy", "build_sparsity"]

log = logging.getLogger(__name__)


def build_sparsity(recipe: TrainRecipe, model: nn.Module, optimizer, loss_fn, batch_at):
    """The training-time sparsity object of ``recipe`` (None for dense). Methods that replace
    layers (Sparse-IFT) need :func:`run_training`, which transforms before the optimizer exists."""
    plan = recipe.plan()
    if plan.prepare is not None:
        raise ConfigError(f"method '{recipe.method}' replaces layers before the optimizer is built; "
                          "use run_training, or sparsecraft.train.to_sparse_ift_ in your own loop")
    train_size = len(batch_at.x) if isinstance(batch_at, _Batches) else None
    return plan.build(model, optimizer, BuildContext(loss_fn=loss_fn, batch_at=batch_at,
                                                              train_size=train_size))


class _Batches:
    """Batch ``t`` of an epoch-wise permutation seeded by (seed, epoch): a function of t."""

    def __init__(self, x, y, batch_size, seed):
        self.x, self.y, self.bs, self.seed = x, y, batch_size, seed
        self.per_epoch = max(1, len(x) // batch_size)
        self._epoch, self._perm = -1, None

    def __call__(self, step: int):
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._epoch = torch.randperm(len(self.x), generator=g), epoch
        idx = self._perm[i * self.bs:(i + 1) * self.bs]
        return self.x[idx], self.y[idx]


def _lr_at(recipe: TrainRecipe, step: int, horizon: int) -> float:
    if recipe.lr_schedule == "constant":
        return recipe.lr
    return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, horizon) / horizon))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    was = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    model.train(was)
    return correct / len(x)


def run_training(
    recipe: TrainRecipe,
    out: str | Path | None = None,
    *,
    resume: bool = True,
    stop_after: int | None = None,
    progress: bool = True,
    model: nn.Module | None = None,
    return_model: bool = False,
) -> dict[str, Any]:
    """Train ``recipe``; returns (and writes to ``out/report.json``) the results.

    With ``out``, a checkpoint is written every ``checkpoint_every`` steps and at the end,
    and a run whose folder holds a checkpoint of the same recipe continues from it.
    ``stop_after`` stops early after that many steps (used to test resuming).
    ``model`` starts from a given model of the recipe's architecture (e.g. a pruned one, with
    method ``static`` and option ``criterion: existing`` to keep its mask) instead of a fresh
    one; ``return_model`` puts the trained model into the result under ``"model"``.
    """
    plan = recipe.validate().plan()
    total = plan.total_steps
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 0):
        raise ConfigError(f"stop_after must be an integer >= 0, got {stop_after!r}")
    out = Path(out) if out is not None else None
    ckpt = out / CHECKPOINT if out is not None else None
    saved = None
    if ckpt is not None and resume and ckpt.is_file():
        saved = read_checkpoint(ckpt)  # verified before any data set or model is built
    torch.manual_seed(recipe.seed)
    x_train, y_train, x_test, y_test = load_dataset(recipe.data)
    fresh = build_model(recipe.model, x_train[:1])
    if model is not None:
        try:
            fresh.load_state_dict(model.state_dict())
        except RuntimeError as exc:
            raise ConfigError(
                f"the model given is not a '{recipe.model}' for data '{recipe.data}': "
                f"{' '.join(str(exc).split())[:200]}"
            ) from None
    model = fresh
    prepared = None
    if plan.prepare is not None:  # new layers (Sparse-IFT) must exist before the optimizer sees them
        model, prepared = plan.prepare(model)
    params = model.parameters()
    if recipe.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                                    weight_decay=recipe.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    batch_at = _Batches(x_train, y_train, recipe.batch_size, recipe.seed)

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    sparsity = plan.build(model, optimizer, BuildContext(loss_fn=loss_fn, batch_at=batch_at,
                                                         train_size=len(x_train), prepared=prepared))
    # variational methods add their KL part of the negative ELBO to the data loss
    loss_term = getattr(sparsity, "loss_term", None)
    step, elapsed = 0, 0.0
    if saved is not None:
        step, elapsed = restore_(ckpt, saved, recipe, total, model, optimizer, sparsity)
        log.info("resumed from %s at step %d", ckpt, step)
    if out is not None:
        out.mkdir(exist_ok=True)  # the caller checked the parent; no missing chain is created

    last = total if stop_after is None else min(total, stop_after)
    model.train()
    bar = tqdm(total=total, initial=step, desc=f"{recipe.method} {recipe.model}/{recipe.data}",
               disable=not progress, leave=False)
    t0 = time.perf_counter()
    loss = torch.tensor(float("nan"))
    while step < last:
        # methods that rewind (IMP) restart the learning-rate schedule with every round
        rewinds = hasattr(sparsity, "schedule_step")
        lr_step = sparsity.schedule_step if rewinds else step
        horizon = recipe.steps if rewinds else total
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(recipe, lr_step, horizon)
        xb, yb = batch_at(step)
        loss = loss_fn(model, (xb, yb))
        if loss_term is not None:
            loss = loss + loss_term()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if sparsity is not None:
            sparsity.step()
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if out is not None and (step % recipe.checkpoint_every == 0 or step == last):
            write_checkpoint(ckpt, {
                "recipe": recipe.to_dict(), "step": step, "elapsed": elapsed + time.perf_counter() - t0,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "sparsity": None if sparsity is None else sparsity.state_dict(),
            })
    bar.close()
    elapsed += time.perf_counter() - t0
    result = {"recipe": recipe.to_dict(), "step": step, "finished": step == total,
              "train_seconds": elapsed, "final_loss": float(loss.detach())}
    if step < total:
        return result
    if sparsity is not None:
        sparsity.finalize_()
        if hasattr(sparsity, "report"):  # variational methods: NLL, ECE, Brier, OOD entropy
            result.update(sparsity.report(x_test, y_test))
    from ..targets import select_targets
    from .base import current_sparsity

    targets = select_targets(model)
    result.update({
        "test_accuracy": accuracy(model, x_test, y_test),
        "train_accuracy": accuracy(model, x_train, y_train),
        "sparsity": current_sparsity(targets),
        "layer_sparsity": {t.name: 1.0 - int(t.param.count_nonzero()) / t.param.numel() for t in targets},
    })
    if out is not None:
        from .. import save
        from ..report import report

        save(model, out / "model.safetensors", overwrite=True)
        rep = report(model, example_input=x_test[:1])
        result["flops_dense"] = rep.totals.get("dense_flops")
        result["flops_effective"] = rep.totals.get("effective_flops")
        text = json.dumps(result, indent=2)
        atomic_write(out / "report.json", lambda tmp: tmp.write_text(text))
    if return_model:
        result["model"] = model
    return result
