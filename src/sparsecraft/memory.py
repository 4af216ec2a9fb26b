"""How much memory this process may still allocate, so that sizes read from files or asked for
by a command are refused before they are allocated (a header must not decide how much memory
we take). The one home of this check for files, recovery problems and calibration; and the
two ways a streamed run keeps its resident memory flat (glibc only): freed allocations go
back to the system at once, and pages of memory-mapped files can be dropped from the process."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
from pathlib import Path

from .errors import FormatError, SparsecraftError

__all__ = ["available_memory", "check_memory", "format_bytes", "return_freed_memory", "unmap_file_pages"]

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
_MADV_DONTNEED = 4  # Linux's madvise advice number
_RETURN_ABOVE = 1 << 20
_returning = False
_libc = None


def _glibc():
    """glibc through ctypes, or None elsewhere (or when it cannot be loaded)."""
    global _libc
    if _libc is None and platform.libc_ver()[0] == "glibc":
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            _libc = False
    return _libc or None


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


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps it >= 1 (``"3.2 GiB"``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_memory(needed: float, what: str, error: type[SparsecraftError] = FormatError) -> None:
    """Refuse (``error``) when ``needed`` bytes exceed the available memory; the message names
    ``what`` and gives both amounts. Call it before allocating; unknown memory refuses nothing."""
    avail = available_memory()
    if avail is not None and needed > avail:
        raise error(f"{what} would need about {format_bytes(needed)} of memory ({int(needed):,} bytes), "
                    f"but only {format_bytes(avail)} is available; refusing to allocate")


def return_freed_memory() -> bool:
    """Make glibc's allocator hand every freed allocation of 1 MiB or more back to the
    operating system (a fixed ``M_MMAP_THRESHOLD``). True if set (now or before), False off
    glibc or when ``mallopt`` refuses.

    Why: glibc raises its threshold to the size of each large block freed (up to 32 MiB), so
    the tensors of one streamed block are then carved from the heap, whose freed holes are
    kept and scattered. On an 8-layer model with 2048 hidden units the peak grew by about
    60 MB per block that way (1.29 GB after the first block, 1.69 GB after the eighth);
    with the threshold fixed it stays at 1.42 GB from the second block on, at the same
    speed. The setting is process-wide and stays: it only ever returns memory sooner."""
    global _returning
    if _returning:
        return True
    libc = _glibc()
    if libc is None:
        return False
    _returning = bool(libc.mallopt(_M_MMAP_THRESHOLD, _RETURN_ABOVE))
    log.debug("freed allocations of %s or more go back to the system at once: %s",
              format_bytes(_RETURN_ABOVE), _returning)
    return _returning


def unmap_file_pages(address: int, nbytes: int) -> bool:
    """Drop from this process's resident memory the whole pages inside ``[address, address +
    nbytes)`` of a **shared file mapping** (``madvise(MADV_DONTNEED)``). The data stays in the
    file and the page cache (written pages included) and comes back on the next access, so
    this changes what is resident, never what is read. Never call it on anonymous memory,
    whose pages it would zero. True if done, False off glibc or when the kernel refuses."""
    libc = _glibc()
    if libc is None or nbytes <= 0:
        return False
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-address // page) * page
    end = (address + nbytes) // page * page
    if end <= start:
        return True  # no whole page inside
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) == 0
