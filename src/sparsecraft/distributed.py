"""Calibration split over processes with ``torch.distributed``.

sparsecraft never starts processes itself: ``torchrun --nproc-per-node N -m sparsecraft prune
...`` does, or a script that initialises ``torch.distributed`` before calling ``prune_``. Then:

* the calibration *batches* (``batch_size`` samples each, the driver's option) are split into
  contiguous, equal-as-possible runs, one per rank in rank order (:meth:`Ranks.batches`). A
  batch is never cut, so every batch runs through the model exactly as it would in one
  process, and the statistics differ from one process's only in the order the per-batch sums
  are added (see :mod:`sparsecraft.oneshot.stats`);
* every rank accumulates the statistics of its batches; they are summed over the ranks (raw
  sums and sample counts, in float64) before a layer is solved, so normalisations such as
  ``2/n X^T X`` use the global ``n`` and every rank solves from the same numbers and computes
  the same masks;
* rank 0 writes the output; the others wait at a barrier.

:func:`current` is ``None`` in a single process (also under ``torchrun --nproc-per-node 1``);
the code paths are then exactly those of a plain run.

A rank that fails raises on its own; the others wait in their next collective until the
launcher stops them (``torchrun`` does so as soon as one process exits with an error) or the
process group's timeout passes.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
from dataclasses import dataclass

import torch

from .errors import ConfigError

__all__ = ["Ranks", "current", "is_main", "init_from_env", "shutdown", "TIMEOUT"]

log = logging.getLogger(__name__)

#: how long a collective waits for the other ranks (process groups sparsecraft starts itself);
#: rank 0 saving and evaluating a large model is the longest wait
TIMEOUT = datetime.timedelta(hours=2)
_started_here = False


def _dist():
    import torch.distributed as dist

    return dist


@dataclass(frozen=True)
class Ranks:
    """This process's place in an initialised process group of more than one process."""

    rank: int
    world: int

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the one that logs and writes)."""
        return self.rank == 0

    @property
    def local_world(self) -> int:
        """Processes on this machine (``LOCAL_WORLD_SIZE`` from torchrun, else all): they share its memory."""
        text = os.environ.get("LOCAL_WORLD_SIZE", "")
        return int(text) if text.isdigit() and 1 <= int(text) <= self.world else self.world

    # ---- the split --------------------------------------------------------------------
    def check_split(self, samples: int, batch_size: int) -> None:
        """ConfigError unless every rank gets at least one whole calibration batch."""
        if samples < self.world:
            raise ConfigError(
                f"distributed calibration: {samples} calibration sample(s) cannot be split over {self.world} "
                f"processes; use at least {self.world} samples or fewer processes"
            )
        batches = -(-samples // batch_size)
        if batches < self.world:
            raise ConfigError(
                f"distributed calibration: {samples} samples make {batches} batch(es) of batch_size "
                f"{batch_size}, fewer than the {self.world} processes (each needs a whole batch); use "
                f"batch_size <= {samples // self.world} or fewer processes"
            )

    def batches(self, count: int) -> tuple[int, int]:
        """``[start, stop)`` of this rank's calibration batches out of ``count``."""
        return self.rank * count // self.world, (self.rank + 1) * count // self.world

    def shard(self, calibration: torch.Tensor, batch_size: int) -> torch.Tensor:
        """This rank's contiguous share of ``calibration`` (whole batches, batch dim 0)."""
        samples = calibration.shape[0]
        self.check_split(samples, batch_size)
        start, stop = self.batches(-(-samples // batch_size))
        return calibration[start * batch_size: min(stop * batch_size, samples)]

    # ---- collectives ------------------------------------------------------------------
    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (contiguous) on the device every rank reduces on: the GPU when the group has
        NCCL, else the CPU, whatever device ``t`` lives on (so all ranks take the same backend)."""
        if "nccl" in str(_dist().get_backend()):
            return t.to(torch.device("cuda", torch.cuda.current_device())).contiguous()
        return t.cpu().contiguous()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place; returns ``t``."""
        buf = self._comm(t)
        _dist().all_reduce(buf)
        if buf is not t:
            t.copy_(buf)
        return t

    def gather(self, values: list[int]) -> list[list[int]]:
        """Every rank's ``values`` (int64), in rank order."""
        t = self._comm(torch.tensor(values, dtype=torch.int64))
        out = [torch.empty_like(t) for _ in range(self.world)]
        _dist().all_gather(out, t)
        return [[int(v) for v in o.cpu()] for o in out]

    def check_same(self, items: dict[str, str]) -> None:
        """ConfigError on every rank when the ranks disagree on any of ``items``
        (``{what: canonical text}``; hashes are compared, not the texts)."""
        names = sorted(items)
        mine = [int(hashlib.sha256(items[n].encode()).hexdigest()[:15], 16) for n in names]
        everyone = self.gather(mine)
        for i, name in enumerate(names):
            differ = [r for r in range(self.world) if everyone[r][i] != everyone[0][i]]
            if differ:
                raise ConfigError(
                    f"distributed calibration: rank(s) {', '.join(map(str, differ))} have a different {name} "
                    f"than rank 0; every process must run the same command on the same model and data"
                )

    def barrier(self) -> None:
        _dist().barrier()


def current() -> Ranks | None:
    """The process group when ``torch.distributed`` is initialised with more than one rank."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Ranks(dist.get_rank(), dist.get_world_size())
    return None


def is_main() -> bool:
    """True in a single process and on rank 0."""
    ranks = current()
    return ranks is None or ranks.main


def _env_int(name: str) -> int:
    text = os.environ.get(name, "")
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} must be an integer (set by torchrun)") from None


def init_from_env(device: str | torch.device = "cpu") -> Ranks | None:
    """Start the process group a launcher such as ``torchrun`` describes in the environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); returns :func:`current`.

    Nothing happens when a group already exists, or when ``WORLD_SIZE`` is unset or 1. The
    backend is gloo for a CPU ``device``; for CUDA it is NCCL for CUDA tensors and gloo for
    CPU ones, with this process on GPU ``LOCAL_RANK``.
    """
    global _started_here
    dist = _dist()
    if not dist.is_available():
        if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
            raise ConfigError("WORLD_SIZE asks for several processes but this torch has no torch.distributed")
        return None
    if dist.is_initialized():
        return current()
    if "WORLD_SIZE" not in os.environ or _env_int("WORLD_SIZE") <= 1:
        return None
    world, rank = _env_int("WORLD_SIZE"), _env_int("RANK")
    if not 0 <= rank < world:
        raise ConfigError(f"environment: RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ConfigError(f"environment: WORLD_SIZE={world} but {' and '.join(missing)} not set; "
                          f"launch with torchrun")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(_env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=TIMEOUT)
    _started_here = True
    log.debug("rank %d of %d joined the process group (%s)", rank, world, backend)
    return current()


def shutdown() -> None:
    """End the process group if :func:`init_from_env` started it."""
    global _started_here
    if _started_here and _dist().is_initialized():
        _dist().destroy_process_group()
    _started_here = False
