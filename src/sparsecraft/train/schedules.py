"""Step-based schedules: when to change masks and by how much.

Schedules count optimizer steps, never epochs: step ``t`` means ``t`` calls of
``optimizer.step()`` have happened. Each schedule is a small immutable object with pure
methods, so a training-time sparsity object can ask it about any step (including after a
resume) without keeping extra state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..allocation import check_sparsity
from ..errors import ConfigError

__all__ = ["CubicSchedule", "UpdateSchedule", "DecaySchedule", "check_steps"]


def check_steps(start: int, end: int, what: str = "schedule") -> tuple[int, int]:
    if int(start) != start or int(end) != end:
        raise ConfigError(f"{what}: start and end must be whole steps, got {start} and {end}")
    start, end = int(start), int(end)
    if start < 0:
        raise ConfigError(f"{what}: start must be >= 0, got {start}")
    if end < start:
        raise ConfigError(f"{what}: end ({end}) comes before start ({start})")
    return start, end


@dataclass(frozen=True)
class CubicSchedule:
    """Gradual pruning (Zhu & Gupta): sparsity rises from ``initial`` to ``final`` on a cubic.

    Pruning happens at ``start``, every ``frequency`` steps after it, and at ``end`` (always a
    pruning step even when ``end - start`` is not a multiple of ``frequency``), where the
    sparsity is exactly ``final``. ``s(t) = final + (initial - final) * (1 - p)^3`` with
    ``p = (t - start) / (end - start)``.
    """

    final: float
    start: int
    end: int
    frequency: int = 100
    initial: float = 0.0

    def __post_init__(self):
        check_sparsity(self.final, "final sparsity")
        check_sparsity(self.initial, "initial sparsity")
        check_steps(self.start, self.end, "cubic schedule")
        if int(self.frequency) != self.frequency or self.frequency < 1:
            raise ConfigError(f"cubic schedule: frequency must be a positive step count, got {self.frequency}")
        if self.final < self.initial:
            raise ConfigError(
                f"cubic schedule prunes only: final sparsity {self.final} is below the initial "
                f"{self.initial}"
            )

    def is_pruning_step(self, step: int) -> bool:
        if step < self.start or step > self.end:
            return False
        return step == self.end or (step - self.start) % self.frequency == 0

    def sparsity(self, step: int) -> float:
        if step <= self.start:
            return self.initial
        if step >= self.end:
            return self.final
        p = (step - self.start) / (self.end - self.start)
        return self.final + (self.initial - self.final) * (1.0 - p) ** 3

    def pruning_steps(self) -> list[int]:
        steps = list(range(self.start, self.end, self.frequency))
        return steps + [self.end]


@dataclass(frozen=True)
class UpdateSchedule:
    """Prune-and-regrow cadence (SET, RigL): every ``every`` steps until ``end`` (exclusive).

    The update fraction decays from ``fraction`` at step 0 to 0 at ``end``: ``cosine``
    (RigL's default), ``linear`` or ``constant``.
    """

    every: int
    end: int
    fraction: float = 0.3
    decay: str = "cosine"

    def __post_init__(self):
        if int(self.every) != self.every or self.every < 1:
            raise ConfigError(f"update schedule: every must be a positive step count, got {self.every}")
        check_steps(0, self.end, "update schedule")
        if not (isinstance(self.fraction, (int, float)) and 0.0 < self.fraction <= 1.0):
            raise ConfigError(f"update fraction must be in (0, 1], got {self.fraction}")
        if self.decay not in ("cosine", "linear", "constant"):
            raise ConfigError(f"unknown fraction decay '{self.decay}'; known: cosine, linear, constant")

    def is_update_step(self, step: int) -> bool:
        return 0 < step < self.end and step % self.every == 0

    def fraction_at(self, step: int) -> float:
        if step >= self.end:
            return 0.0
        p = step / self.end
        if self.decay == "cosine":
            return self.fraction * 0.5 * (1.0 + math.cos(math.pi * p))
        if self.decay == "linear":
            return self.fraction * (1.0 - p)
        return self.fraction


@dataclass(frozen=True)
class DecaySchedule:
    """A factor that falls from ``initial`` at ``start`` to 0 at ``end`` (linear or cosine).

    N:M training with decaying gradient flow scales the pruned weights (and with them their
    share of the gradient) by this factor.
    """

    start: int
    end: int
    initial: float = 1.0
    shape: str = "linear"

    def __post_init__(self):
        check_steps(self.start, self.end, "decay schedule")
        if not 0.0 <= self.initial <= 1.0:
            raise ConfigError(f"decay schedule: initial factor must be in [0, 1], got {self.initial}")
        if self.shape not in ("linear", "cosine"):
            raise ConfigError(f"unknown decay shape '{self.shape}'; known: linear, cosine")

    def factor(self, step: int) -> float:
        if step <= self.start:
            return self.initial
        if step >= self.end:
            return 0.0
        p = (step - self.start) / (self.end - self.start)
        if self.shape == "cosine":
            return self.initial * 0.5 * (1.0 + math.cos(math.pi * p))
        return self.initial * (1.0 - p)
