"""Training-time sparsity: optimizer-like objects with ``step()`` and ``state_dict()``.

```
sparsity = sc.train.RigL(model, 0.9, 100, 7500, optimizer=opt)  # update_every=100, end=7500
for x, y in loader:
    loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad(); sparsity.step()
sparsity.finalize_()
```

Methods: :class:`StaticSparsity` (random/ERK, SNIP, magnitude, existing zeros), :class:`GMP`,
:class:`IMP`, :class:`SET`, :class:`RigL`, :class:`SRSTE`, :class:`DecayingNM`; and
:func:`sparse_soup`. :func:`to_sparse_ift_` replaces layers by wider or factorised sparse
ones of equal FLOPs (Sparse-IFT, :mod:`.iso_flop`), trained with RigL or SET. The built-in experiments (``sparsecraft train``) are gathered in
:mod:`sparsecraft.train.runner`: data sets (:mod:`.datasets`), models (:mod:`.zoo`), the
recipe (:mod:`.recipe`), checksummed checkpoints (:mod:`.checkpoints`) and the loop
(:mod:`.loop`). Each method's module registers how a recipe builds it (:mod:`.registry`).
"""

from .base import StateMismatch, TrainingSparsity, current_sparsity, unwrap_model
from .dynamic import SET, DynamicSparsity, RigL, drop_and_grow
from .iso_flop import TRANSFORMS, IsoFlopResult, register_transform, to_sparse_ift_
from .nm import SRSTE, DecayingNM, NMTraining, sr_ste
from .pruning import GMP, IMP, SNIP, StaticSparsity, accumulate_gradients
from .schedules import CubicSchedule, DecaySchedule, UpdateSchedule
from .soup import average_models, sparse_soup, zero_masks

__all__ = [
    "TrainingSparsity", "StateMismatch", "current_sparsity", "unwrap_model",
    "StaticSparsity", "GMP", "IMP", "SNIP", "accumulate_gradients",
    "DynamicSparsity", "SET", "RigL", "drop_and_grow",
    "to_sparse_ift_", "IsoFlopResult", "register_transform", "TRANSFORMS",
    "NMTraining", "SRSTE", "DecayingNM", "sr_ste",
    "CubicSchedule", "UpdateSchedule", "DecaySchedule",
    "average_models", "sparse_soup", "zero_masks",
]

# the variational methods (vi, vd, ard, ssvi, turbo-vbi) register their recipes when imported
from .. import bayes as _bayes  # noqa: E402,F401
