"""Whole-model distillation after one-shot pruning, with the masks kept.

After every block is pruned (and reconstructed, if asked), a short fine-tuning makes the
pruned model's next-token distribution match the dense model's on the calibration text: the
loss is the KL divergence from the dense model's softmax (at a temperature) to the pruned
model's, per token. The masks stay: the pruning's :class:`~sparsecraft.masks.SparsityState`
zeroes the gradients of pruned weights and re-applies the masks after every optimizer step
(``attach_optimizer``), the same machinery sparse training uses.

The last ``holdout`` calibration samples are never trained on. Their loss is measured
before training and every ``eval_every`` steps (and at the end); the best weights are kept,
the untouched ones when no evaluation beat them, so the held-out loss never rises.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..blocks import check_calibration
from ..criteria import ModelStage, register_model_stage
from ..errors import ConfigError

__all__ = ["distill_", "Distill"]

log = logging.getLogger(__name__)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) at ``temperature`` (scaled by T^2)."""
    s = F.log_softmax(student.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def _check(lr, epochs, batch_size, holdout, eval_every, temperature, time_budget) -> None:
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"distill: lr must be a positive number, got {lr!r}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("holdout", holdout)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"distill: {name} must be an integer >= 1, got {value!r}")
    if eval_every is not None and (isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1):
        raise ConfigError(f"distill: eval_every must be an integer >= 1 or None, got {eval_every!r}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ConfigError(f"distill: temperature must be > 0, got {temperature!r}")
    if time_budget is not None and not (time_budget > 0 and math.isfinite(time_budget)):
        raise ConfigError(f"distill: time_budget must be > 0 seconds, got {time_budget!r}")


def _check_holdout(samples: int, holdout: int) -> None:
    if samples <= holdout:
        raise ConfigError(
            f"distill holds out {holdout} calibration sample(s) and needs at least one more to train on; "
            f"got {samples}"
        )


def distill_(
    model: nn.Module,
    teacher: nn.Module,
    calibration: torch.Tensor,
    state,
    *,
    lr: float = 1e-5,
    epochs: int = 1,
    batch_size: int = 1,
    holdout: int = 8,
    eval_every: int | None = None,
    temperature: float = 1.0,
    time_budget: float | None = None,
    progress: bool = False,
) -> dict:
    """Fine-tune the pruned ``model`` towards ``teacher`` on ``calibration``; returns a summary.

    Args:
        model: the pruned model (changed in place; its masks are kept).
        teacher: the dense model (not changed).
        calibration: token ids ``[samples, seq_len]``; the last ``holdout`` samples judge.
        state: the :class:`~sparsecraft.masks.SparsityState` holding the masks (``prune_``'s).
        lr, epochs, batch_size: Adam's learning rate, passes over the training samples,
            samples per step.
        eval_every: steps between held-out evaluations (None: once per epoch).
        temperature: softmax temperature of the KL loss.
        time_budget: seconds; stops after the step that passes it.

    Returns:
        ``{"val_before", "val_best", "best_step", "steps", "seconds", "stopped"}``.
    """
    _check(lr, epochs, batch_size, holdout, eval_every, temperature, time_budget)
    calibration = check_calibration(model, calibration)
    _check_holdout(calibration.shape[0], holdout)
    device = next(model.parameters()).device
    train, val = calibration[:-holdout], calibration[-holdout:]
    params = [p for p in model.parameters() if p.requires_grad]
    was_training, teacher_training = model.training, teacher.training
    model.eval()  # no dropout: the teacher's outputs are deterministic targets
    teacher.eval()

    @torch.no_grad()
    def teacher_logits(ids):
        return _logits(teacher, ids)

    @torch.no_grad()
    def val_loss() -> float:
        total = 0.0
        for start in range(0, val.shape[0], batch_size):
            ids = val[start:start + batch_size].to(device)
            total += float(_kl(_logits(model, ids), teacher_logits(ids), temperature)) * ids.shape[0]
        return total / val.shape[0]

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    start_time = time.perf_counter()
    summary = {"val_before": val_loss(), "best_step": 0, "steps": 0, "stopped": "epochs"}
    best, best_state = summary["val_before"], snapshot()

    def judge() -> None:
        """Measure the held-out loss; keep these weights if they are the best so far."""
        nonlocal best, best_state
        current = val_loss()
        if current < best:
            best, best_state, summary["best_step"] = current, snapshot(), summary["steps"]
    opt = torch.optim.Adam(params, lr=lr)
    handle = state.attach_optimizer(opt)  # masks re-applied after every step
    steps_per_epoch = math.ceil(train.shape[0] / batch_size)
    every = eval_every or steps_per_epoch
    bar = tqdm(total=epochs * steps_per_epoch, desc="distill", disable=not progress, leave=False)
    order = torch.Generator().manual_seed(0)
    try:
        for _epoch in range(epochs):
            perm = torch.randperm(train.shape[0], generator=order)
            for i in range(steps_per_epoch):
                ids = train[perm[i * batch_size:(i + 1) * batch_size]].to(device)
                loss = _kl(_logits(model, ids), teacher_logits(ids), temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                summary["steps"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.4g}", best=f"{best:.4g}")
                out_of_time = time_budget is not None and time.perf_counter() - start_time > time_budget
                if summary["steps"] % every == 0 or out_of_time:
                    judge()
                if out_of_time:
                    summary["stopped"] = "time budget"
                    break
            if summary["stopped"] == "time budget":
                break
        if summary["steps"] % every and summary["stopped"] != "time budget":
            judge()
    finally:
        bar.close()
        handle.remove()
        with torch.no_grad():  # the best evaluation's weights (or the untouched ones)
            for n, p in model.named_parameters():
                p.copy_(best_state[n])
        model.train(was_training)
        teacher.train(teacher_training)
    summary.update(val_best=best, seconds=time.perf_counter() - start_time)
    log.info("distill: held-out KL %.4g -> %.4g (step %d of %d, %s)", summary["val_before"], best,
             summary["best_step"], summary["steps"], summary["stopped"])
    return summary


@register_model_stage
class Distill(ModelStage):
    """The ``distill`` stage: :func:`distill_` from a dense copy of the model, masks kept."""

    name = "distill"

    @dataclass(frozen=True)
    class Options:
        lr: float = 1e-5
        epochs: int = 1
        batch_size: int = 1
        holdout: int = 8  # calibration samples kept for judging
        eval_every: int | None = None  # steps between held-out evaluations (None: per epoch)
        temperature: float = 1.0
        time_budget: float | None = None  # seconds

        def check(self):
            _check(self.lr, self.epochs, self.batch_size, self.holdout, self.eval_every, self.temperature,
                   self.time_budget)

    def check(self, calibration) -> None:
        _check_holdout(calibration.shape[0], self.options.holdout)  # prune_ checked the ids already

    def run(self, model, teacher, calibration, state, *, progress=False):
        o = self.options
        return distill_(model, teacher, calibration, state, lr=o.lr, epochs=o.epochs, batch_size=o.batch_size,
                        holdout=o.holdout, eval_every=o.eval_every, temperature=o.temperature,
                        time_budget=o.time_budget, progress=progress)
