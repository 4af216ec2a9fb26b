"""Peer libraries for the side-by-side benchmarks: installed at run time, never needed by the tests.

``ensure(module, package)`` imports ``module``, installing ``package`` with pip into the running
interpreter's environment first if it is missing; a peer that cannot be installed is reported
(``None`` and the reason) rather than stopping the run, so the tables can say so.
"""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys

log = logging.getLogger("benchmarks.peers")


def ensure(module: str, package: str | None = None):
    """``(module object or None, note)``: the peer, or why it is missing."""
    try:
        return importlib.import_module(module), "installed"
    except ImportError:
        pass
    package = package or module
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", package], capture_output=True, text=True)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        log.warning("peer %s could not be installed: %s", package, reason)
        return None, f"not installable here: {reason}"
    importlib.invalidate_caches()
    try:
        return importlib.import_module(module), f"installed {package} at run time"
    except ImportError as exc:
        return None, f"installed but not importable: {exc}"
