"""What every benchmark script shares: where results go, how they are stamped and written,
the lock that keeps heavy runs apart, and running one configuration in a child process.

* ``RESULTS``: ``benchmarks/results``; ``write_json`` / ``write_text`` replace a file there
  atomically (a crash or Ctrl-C mid-write leaves the old file), and ``write_json`` stamps a
  dict with ``git_commit``: the short commit of the code that produced it (``-dirty`` when
  tracked files outside ``benchmarks/results`` differ from it).
* ``bench_lock()``: holds ``benchmarks/results/.train.lock`` (``flock``) for the run, so two
  timing runs never share the 2 cores. A run started under ``flock <that file> ...`` (or as a
  child of a script that holds it) does not wait for itself.
* ``run_config(script, args)``: runs ``python script args`` in a fresh process (its memory and
  threads are its own) and returns the dict the child printed with ``emit_result``;
  ``run_grid`` runs a grid of named configurations that way, writing results after each.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
LOCK = RESULTS / ".train.lock"
RESULT_PREFIX = "RESULT "

log = logging.getLogger("benchmarks")


# -- provenance -------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """Short commit of the checkout, ``-dirty`` if tracked code differs; ``unknown`` without git.

    Computed once per process, at the first call (before the run writes any result).
    """
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        # result files change while a benchmark runs: they do not make the code dirty
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":(exclude)benchmarks/results"], cwd=ROOT, capture_output=True,
                                 text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if changed else "")


def command_line(script: str | Path | None = None, argv: list[str] | None = None) -> str:
    """The command that reproduces this run, relative to the repository root."""
    script = Path(script or sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(ROOT)
    return shlex.join(["python", str(script), *(sys.argv[1:] if argv is None else argv)])


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs"


def cpu_info() -> dict:
    """CPU model, caches (bytes, per level, as Linux reports them for CPU 0) and torch's ISA."""
    info: dict = {"machine": platform.machine(), "cpus": os.cpu_count()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
                break
    caches = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        with contextlib.suppress(OSError, ValueError):
            kind = (index / "type").read_text().strip()
            if kind == "Instruction":
                continue
            size = (index / "size").read_text().strip()
            scale = {"K": 1024, "M": 1024 ** 2}.get(size[-1], 1)
            caches[f"L{(index / 'level').read_text().strip()}"] = int(size.rstrip("KM")) * scale
    info["caches"] = caches
    with contextlib.suppress(Exception):
        import torch

        info["torch_isa"] = torch.backends.cpu.get_cpu_capability()
    return info


# -- atomic writes --------------------------------------------------------------------------
def write_text(path: str | Path, text: str) -> Path:
    """Create or replace ``path`` with ``text`` atomically (via ``sparsecraft.formats.io``)."""
    from sparsecraft.formats.io import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


def write_json(path: str | Path, data, *, indent: int | None = 1, sort_keys: bool = False,
               stamp: bool = True) -> Path:
    """Write ``data`` as JSON atomically; a dict gets ``git_commit`` (the commit that wrote it last)."""
    if stamp and isinstance(data, dict):
        data["git_commit"] = git_commit()
    return write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")


def read_json(path: str | Path, default=None):
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else default


def merge_json(path: str | Path, update: dict, *, sort_keys: bool = False) -> dict:
    """Merge ``update`` into the JSON dict at ``path`` under a lock of its own; returns the merge.

    For results that several processes add to at once. The lock is a sidecar file, not
    ``LOCK``: a run that holds ``LOCK`` must still be able to store its results.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        merged = read_json(path, {})
        merged.update(update)
        write_json(path, merged, sort_keys=sort_keys)
    return merged


# -- the benchmark lock ---------------------------------------------------------------------
def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after the command name
    return pids


def _holders(path: Path) -> set[int]:
    """PIDs holding a lock on ``path`` according to /proc/locks (empty where there is none)."""
    try:
        st = path.stat()
        table = Path("/proc/locks").read_text()
    except OSError:
        return set()
    pids = set()
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->":  # "->" marks a waiter, not a holder
            continue
        _, kind, _, _, pid, dev_inode = fields[:6]
        major, minor, inode = dev_inode.split(":")
        if (kind == "FLOCK" and int(inode) == st.st_ino
                and os.makedev(int(major, 16), int(minor, 16)) == st.st_dev):
            pids.add(int(pid))
    return pids


@contextlib.contextmanager
def bench_lock(path: Path = LOCK) -> Iterator[None]:
    """Hold the benchmark lock for the block; wait for another run that holds it.

    A lock held by one of our ancestors (``flock LOCK python bench_x.py``, or a benchmark
    that runs us as its child) is ours already: taking it again would wait forever.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            ours = True
        except BlockingIOError:
            ours = False
        if not ours:
            holders = _holders(path)
            if holders & _ancestors():
                yield
                return
            log.warning("waiting for %s (held by pid %s)", path, ", ".join(map(str, sorted(holders))) or "?")
            start = time.monotonic()
            fcntl.flock(f, fcntl.LOCK_EX)
            log.warning("got %s after %.0f s", path, time.monotonic() - start)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- one configuration per process ----------------------------------------------------------
class ChildFailed(RuntimeError):
    """A configuration's child process printed no result."""


def emit_result(result: dict) -> None:
    """In the child: hand ``result`` to the parent (one line on stdout)."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_config(script: str | Path, args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``python script *args`` in a fresh process; return what it passed to ``emit_result``.

    ``env`` adds to (overrides) this process's environment. Raises ``ChildFailed`` with the
    end of the child's stderr when it printed no result.
    """
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    line = next((x for x in proc.stdout.splitlines() if x.startswith(RESULT_PREFIX)), None)
    if line is None:
        raise ChildFailed(f"{Path(script).name} {shlex.join(args)} exited {proc.returncode} without a "
                          f"result:\n{proc.stderr[-3000:]}")
    return json.loads(line[len(RESULT_PREFIX):])


def run_grid(script: str | Path, grid: dict[str, dict], names: list[str] | None, results: dict, out: Path,
             child_args: list[str], shown: Iterable[str] = ("spec",)) -> dict:
    """Run configurations of ``grid`` one child process each (``--child <spec json>`` plus
    ``child_args``, 2 OpenMP threads), writing ``results`` to ``out`` after every row.

    ``names`` None runs every row ``results["runs"]`` does not hold yet; named rows are run
    again. A row whose child fails is reported on stderr and skipped. ``shown``: the keys left
    out of the one-line summary printed per row.
    """
    for name in names or grid:
        if name in results["runs"] and not names:
            continue
        start = time.perf_counter()
        try:
            run = run_config(script, ["--child", json.dumps(grid[name]), *child_args], env={"OMP_NUM_THREADS": "2"})
        except ChildFailed as e:
            sys.stderr.write(f"{name} failed: {e}\n")
            continue
        run["wall_seconds"] = time.perf_counter() - start
        run["git_commit"] = git_commit()
        results["runs"][name] = run
        write_json(out, results)
        sys.stdout.write(f"{name}: {json.dumps({k: v for k, v in run.items() if k not in set(shown)})}\n")
        sys.stdout.flush()
    return results


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """``fig.savefig`` into ``path`` atomically (the format from the suffix)."""
    from sparsecraft.formats.io import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=dpi))
    return path
