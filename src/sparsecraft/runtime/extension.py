"""The optional compiled CPU kernels (``csrc/``), built on first use.

Two libraries, each compiled once with ``torch.utils.cpp_extension`` (C++ compiler and ninja
needed) and cached in ``$TORCH_EXTENSIONS_DIR/sparsecraft``, or, when that variable is not
set, in ``.cache/torch_extensions`` of the source checkout (``~/.cache/sparsecraft`` for an
installed package). Later processes load the cached library in well under a second.

* ``sparse`` (:func:`get_extension`): ``csrc/sparse_kernels.cpp``, the CSR and
  activation-sparse kernels, compiled with ``-march=native``: its cache belongs to the
  machine that built it (the cache folder's name hashes the flags and the source, not the CPU).
* ``quant`` (:func:`get_quant_extension`): ``csrc/quant_kernels.cpp`` + ``decode_step.cpp``,
  the quantised kernels and the fused decode step, compiled for the baseline instruction set
  with AVX2 and AVX-512 loops under ``#pragma GCC target``: one build runs on every x86-64
  CPU and picks its loops at load time (``isa()``; ``SPARSECRAFT_ISA=generic|avx2|avx512``
  caps the choice, and torch's own CPU capability caps it too).

When a library cannot be built (no compiler, no source, a build error), or when
``SPARSECRAFT_NO_EXTENSION=1``, its getter logs one warning saying why and returns None; the
callers then use their pure-torch paths. Nothing fails silently and nothing fails hard.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

__all__ = ["get_extension", "extension_status", "get_quant_extension", "quant_extension_status",
           "cache_dir", "SOURCE", "QUANT_SOURCES"]

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCE = CSRC / "sparse_kernels.cpp"
QUANT_SOURCES = (CSRC / "quant_kernels.cpp", CSRC / "decode_step.cpp")
# headers are not sources, but a change to them must rebuild the library
QUANT_HEADERS = (CSRC / "quant_kernels.h", CSRC / "quant_isa.h", CSRC / "quant_body.h", CSRC / "quant_x8_avx2.h")


def cache_dir() -> Path:
    """Where the compiled libraries are cached (see the module docstring)."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env) / "sparsecraft"
    package = Path(__file__).resolve().parents[1]  # .../src/sparsecraft
    repo = package.parents[1]
    if package.parent.name == "src" and (repo / "pyproject.toml").is_file():
        return repo / ".cache" / "torch_extensions"
    return Path.home() / ".cache" / "sparsecraft" / "torch_extensions"


def _why_not() -> str | None:
    """Reason no library can be built here, checked before invoking the compiler."""
    if os.environ.get("SPARSECRAFT_NO_EXTENSION", "") not in ("", "0"):
        return "disabled by SPARSECRAFT_NO_EXTENSION"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ('{compiler}' not on PATH; set CXX)"
    return None


class _Library:
    """One lazily built extension: tried once per process, then cached (module or reason)."""

    def __init__(self, name: str, sources: tuple[Path, ...], cflags: list[str], what: str, headers=(), subdir=""):
        self.name, self.sources, self.cflags, self.what = name, sources, cflags, what
        self.headers, self.subdir = headers, subdir  # own folder: torch writes one build.ninja per folder
        self.lock = threading.Lock()
        self.tried = False
        self.module = None
        self.reason: str | None = None

    def _build(self):
        import hashlib

        from torch.utils.cpp_extension import load

        folder = cache_dir() / self.subdir
        folder.mkdir(parents=True, exist_ok=True)
        name = self.name
        if self.headers:  # ninja tracks the sources; a header change gets a new library name
            digest = hashlib.sha1(b"".join(Path(h).read_bytes() for h in self.headers)).hexdigest()[:10]
            name = f"{name}_{digest}"
        log.info("loading the compiled %s (first use builds them, ~1 min) in %s", self.what, folder)
        return load(name=name, sources=[str(s) for s in self.sources], extra_cflags=self.cflags,
                    extra_ldflags=["-fopenmp"], extra_include_paths=[str(CSRC)],
                    build_directory=str(folder), verbose=False)

    def get(self):
        with self.lock:
            if not self.tried:
                self.tried = True
                missing = [str(s) for s in (*self.sources, *self.headers) if not Path(s).is_file()]
                reason = _why_not() or (f"kernel source {missing[0]} is missing" if missing else None)
                if reason is None:
                    try:
                        self.module = self._build()
                    except Exception as exc:  # compiler errors, missing ninja, linker errors
                        reason = f"build failed: {' '.join(str(exc).split())[:400]}"
                if reason is not None:
                    self.reason = reason
                    log.warning("compiled %s unavailable (%s); using the pure-torch kernels", self.what, reason)
            return self.module

    def status(self) -> str:
        if not self.tried:
            return "not tried"
        return "loaded" if self.module is not None else str(self.reason)

    def reset(self) -> None:
        with self.lock:
            self.tried, self.module, self.reason = False, None, None


_SPARSE = _Library("sparsecraft_kernels", (SOURCE,), ["-O3", "-march=native", "-fopenmp"], "sparse kernels")
_QUANT = _Library("sparsecraft_quant", QUANT_SOURCES, ["-O3", "-fopenmp", "-Wno-psabi"], "quantised kernels",
                  headers=QUANT_HEADERS, subdir="quant")
_hooks: list = []  # called after a quant library loads (e.g. to apply SPARSECRAFT_ISA)


def get_extension():
    """The compiled sparse (CSR, activation) kernel module, or None (one logged warning)."""
    return _SPARSE.get()


def extension_status() -> str:
    """'loaded', 'not tried' or the reason the sparse kernels are unavailable."""
    return _SPARSE.status()


def get_quant_extension():
    """The compiled quantised-kernel module, or None (one logged warning)."""
    first = not _QUANT.tried
    module = _QUANT.get()
    if first and module is not None:
        for hook in _hooks:
            hook(module)
    return module


def quant_extension_status() -> str:
    """'loaded', 'not tried' or the reason the quantised kernels are unavailable."""
    return _QUANT.status()


def _reset_for_tests() -> None:
    _SPARSE.reset()
    _QUANT.reset()
