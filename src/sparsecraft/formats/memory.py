"""How much memory this process may still allocate, so sizes read from files can be refused
before they are allocated (a header must not decide how much memory we take)."""

from __future__ import annotations

import os
from pathlib import Path

from sparsecraft.errors import FormatError

__all__ = ["available_memory", "check_memory"]


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, lowered by a cgroup limit; None if unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:  # a container's own limit is often far below the machine's memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            avail = min(avail, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return avail


def check_memory(needed: int, what: str) -> None:
    """Refuse (:class:`FormatError`) when ``needed`` bytes exceed the available memory."""
    avail = available_memory()
    if avail is not None and needed > avail:
        raise FormatError(f"{what} would need {needed:,} bytes of memory, only {avail:,} are available; "
                          "refusing to allocate")
