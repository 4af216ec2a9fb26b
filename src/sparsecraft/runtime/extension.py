"""The optional compiled CPU kernels (``csrc/sparse_kernels.cpp``), built on first use.

The extension is compiled once with ``torch.utils.cpp_extension`` (C++ compiler and ninja
needed) and cached in ``$TORCH_EXTENSIONS_DIR/sparsecraft``, or, when that variable is not
set, in ``.cache/torch_extensions`` of the source checkout (``~/.cache/sparsecraft`` for an
installed package). Later processes load the cached library in well under a second.

When it cannot be built (no compiler, no source, a build error), or when
``SPARSECRAFT_NO_EXTENSION=1``, :func:`get_extension` logs one warning saying why and returns
None; the kernels that need it then report themselves unavailable and the planner uses the
others. Nothing fails silently and nothing fails hard.

The library is compiled with ``-march=native``: the cache belongs to the machine that built
it (the cache folder's name includes a hash of the flags and the source, not of the CPU).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

__all__ = ["get_extension", "extension_status", "cache_dir", "SOURCE"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "sparse_kernels.cpp"
_NAME = "sparsecraft_kernels"
_FLAGS = ["-O3", "-march=native", "-fopenmp"]

_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "reason": None}


def cache_dir() -> Path:
    """Where the compiled library is cached (see the module docstring)."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env) / "sparsecraft"
    package = Path(__file__).resolve().parents[1]  # .../src/sparsecraft
    repo = package.parents[1]
    if package.parent.name == "src" and (repo / "pyproject.toml").is_file():
        return repo / ".cache" / "torch_extensions"
    return Path.home() / ".cache" / "sparsecraft" / "torch_extensions"


def _why_not() -> str | None:
    """Reason the extension cannot be built here, checked before invoking the compiler."""
    if os.environ.get("SPARSECRAFT_NO_EXTENSION", "") not in ("", "0"):
        return "disabled by SPARSECRAFT_NO_EXTENSION"
    if not SOURCE.is_file():
        return f"kernel source {SOURCE} is missing"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ('{compiler}' not on PATH; set CXX)"
    return None


def _build():
    from torch.utils.cpp_extension import load

    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    log.info("loading the compiled sparse kernels (first use builds them, ~40 s) in %s", folder)
    return load(
        name=_NAME,
        sources=[str(SOURCE)],
        extra_cflags=_FLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(folder),
        verbose=False,
    )


def get_extension():
    """The compiled kernel module, or None (with one logged warning) when unavailable."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            reason = _why_not()
            if reason is None:
                try:
                    _state["module"] = _build()
                except Exception as exc:  # compiler errors, missing ninja, linker errors
                    reason = f"build failed: {' '.join(str(exc).split())[:400]}"
            if reason is not None:
                _state["reason"] = reason
                log.warning("compiled sparse kernels unavailable (%s); using the pure-torch kernels", reason)
        return _state["module"]


def extension_status() -> str:
    """'loaded', 'not tried' or the reason it is unavailable."""
    if not _state["tried"]:
        return "not tried"
    return "loaded" if _state["module"] is not None else _state["reason"]


def _reset_for_tests() -> None:
    with _lock:
        _state.update(tried=False, module=None, reason=None)
