"""``sparsecraft recover`` and ``sparsecraft discover`` (registered through ``cli.COMMAND_MODULES``).

Only parsers here: numpy, torch and the solvers load inside the handlers.

* ``recover``: find a sparse ``x`` from ``y = A x + noise`` with one of the solvers of
  :mod:`sparsecraft.recovery`; ``A`` is a matrix (``--A``) or the Kronecker product of
  ``--factors``. Writes ``x.npy`` and ``result.json`` into ``--out``.
* ``discover``: sparse identification of ``dX/dt = Theta(X) Xi`` (a polynomial library) from a
  sampled trajectory with :class:`~sparsecraft.recovery.EquationDiscovery`. Writes
  ``equations.txt`` and ``coefficients.json`` into ``--out`` and prints the equations.

Inputs are ``.npy``, ``.npz`` holding one array, or ``.csv`` (comma-separated real numbers; a
first line that is not numbers is a header, which ``discover`` takes as the state names).
Everything the user gave is checked before solving; on an error nothing is written and
``--out`` is not created. Each output file is written atomically; the JSON file is written
last, so it is there only if the run finished.
"""

from __future__ import annotations

import argparse
import logging

from ..cli_args import add_overwrite, int_arg, number_arg, write_line
from ..outputs import check_output

log = logging.getLogger("sparsecraft.recovery.commands")

EPILOG_RECOVER = """examples:
  sparsecraft recover --y y.npy --A A.npy --method omp --k 8 --out omp/
  sparsecraft recover --y y.npy --A A.npy --method fista --lam universal --noise-var 1e-4 --out lasso/
  sparsecraft recover --y y.npy --A A.npy --method sbl --update em --x-true x.npy --out sbl/
  sparsecraft recover --y y.npy --factors F1.npy F2.npy F3.npy --method krosbl --out kro/
  sparsecraft recover --y y.npy --factors F1.npy F2.npy --method kron_omp --k 3 2 --out komp/

--factors gives A = F1 (x) F2 (x) ... (torch.kron order); every method accepts it (the dense
methods use the Kronecker operator), kron_omp and krosbl need it. y may hold one measurement
vector per column (M x B); each column is solved on its own.
"""

EPILOG_DISCOVER = """examples:
  sparsecraft discover --data lorenz.csv --dt 0.002 --window 21 --out lorenz/
  sparsecraft discover --data X.npy --derivatives dXdt.npy --method sbl --names x,y,z --out eqs/

Derivatives: --derivatives if given; else central differences of --data (second order,
one-sided at the ends), or with --window a Savitzky-Golay fit (sparsecraft.recovery.discovery
.derivative), which also smooths noise.
"""

# method -> (solver in sparsecraft.recovery, needs --factors, {option dest: solver keyword})
_COMMON = {"tol": "tol", "max_iter": "max_iter"}
METHODS = {
    "omp": ("omp", False, {"k": "n_nonzero", **_COMMON}),
    "kron_omp": ("kron_omp", True, {"k": "n_nonzero", **_COMMON}),
    "fista": ("fista", False, {"lam": "lam", "noise_var": "noise_var", **_COMMON}),
    "amp": ("amp", False, dict(_COMMON)),
    "sbl": ("sbl", False, {"noise_var": "noise_var", "update": "update", "prune": "prune", **_COMMON}),
    "block_sbl": ("block_sbl", False, {"blocks": "blocks", "noise_var": "noise_var", "prune": "prune", **_COMMON}),
    "krosbl": ("krosbl", True, {"noise_var": "noise_var", "krosbl_method": "method", "coupling": "coupling",
                                "prune": "prune", "restarts": "restarts", "restart_draws": "restart_draws",
                                "subset_restarts": "subset_restarts", "init_supports": "init_supports",
                                **_COMMON}),
}
_OPTIONS = tuple(dict.fromkeys(dest for _, _, mapping in METHODS.values() for dest in mapping))


_lam_number = number_arg("lam", minimum=0.0)


def _index_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--init-supports takes comma-separated column indices, got '{text}'") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"--init-supports takes non-negative column indices, got '{text}'")
    return values


def _lam(text: str):
    if text in ("universal", "cv"):
        return text
    try:
        return _lam_number(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"lam must be a number >= 0, 'universal' or 'cv', got '{text}'") from None


def _bad_names(names: list[str]) -> bool:
    return any(not n or any(c.isspace() for c in n) for n in names) or len(set(names)) != len(names)


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if _bad_names(names):
        raise argparse.ArgumentTypeError(f"names must be distinct, comma-separated and without spaces, got '{text}'")
    return names


def _subcommand(subparsers, name: str, files: str, epilog: str, help: str, description: str):
    """A sub-parser writing ``files`` into ``--out``, with ``--out`` and ``--overwrite``."""
    p = subparsers.add_parser(name, help=help, description=f"{description} Writes {files} to --out.",
                              epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR", help=f"folder for {files}")
    add_overwrite(p)
    return p


def register(subparsers) -> dict:
    p = _subcommand(subparsers, "recover", "x.npy and result.json", EPILOG_RECOVER,
                    "sparse recovery: find a sparse x from y = A x + noise (OMP, FISTA, AMP, SBL, KroSBL)",
                    "Recover a sparse x from measurements --y of A x, with A a matrix (--A) or Kronecker factors (--factors).")
    p.add_argument("--y", required=True, metavar="FILE", help="measurements, M or M x B (.npy, .npz, .csv)")
    a = p.add_mutually_exclusive_group(required=True)
    a.add_argument("--A", metavar="FILE", help="measurement matrix, M x N")
    a.add_argument("--factors", nargs="+", metavar="FILE", help="Kronecker factors F_i (M_i x N_i), 2 or more")
    p.add_argument("--method", required=True, choices=tuple(METHODS), help="solver")
    p.add_argument("--x-true", metavar="FILE", help="the true x: result.json gets the NMSE (dB) and support F1")
    p.add_argument("--k", nargs="+", type=int_arg("k"), metavar="K",
                   help="omp: sparsity K; kron_omp: one sparsity per factor (default: stop on --tol)")
    p.add_argument("--lam", type=_lam, help="fista: penalty, or 'universal' (needs --noise-var) or 'cv' (default)")
    p.add_argument("--noise-var", type=number_arg("noise variance", minimum=0.0), metavar="VAR",
                   help="fista, sbl, block_sbl, krosbl: known noise variance (default: estimated; 0 = noiseless)")
    p.add_argument("--update", choices=("fast", "em", "mackay"), help="sbl: update rule (default fast)")
    p.add_argument("--blocks", type=int_arg("blocks"), metavar="SIZE",
                   help="block_sbl (required): block size, dividing N")
    p.add_argument("--krosbl-method", choices=("am", "svd"), help="krosbl: M-step (default am)")
    p.add_argument("--coupling", nargs="+", type=number_arg("coupling", minimum=0.0), metavar="BETA",
                   help="krosbl (am): block coupling, one value or one per factor (0 = none)")
    p.add_argument("--prune", type=number_arg("prune", minimum=0.0, below=1.0), metavar="FRAC",
                   help="sbl, block_sbl, krosbl: drop variances below this fraction of the largest")
    p.add_argument("--restarts", type=int_arg("restarts", minimum=0), metavar="N",
                   help="krosbl: rounds of factor restarts (0 disables; default: krosbl's)")
    p.add_argument("--restart-draws", type=int_arg("restart-draws", minimum=0), metavar="N",
                   help="krosbl: random re-openings per factor and restart round "
                        "(slower, fewer wrong supports; default: krosbl's)")
    p.add_argument("--no-subset-restarts", dest="subset_restarts", action="store_const", const=False,
                   help="krosbl: restart factors flat instead of at the supports a per-mode subset search suggests, "
                        "and choose by marginal likelihood alone")
    p.add_argument("--init-supports", nargs="+", type=_index_list, metavar="I,J,...",
                   help="krosbl: warm start, one comma-separated list of column indices per factor "
                        "(e.g. a previous result's mode supports)")
    p.add_argument("--max-iter", type=int_arg("max-iter"), metavar="N", help="iteration cap (default: the solver's)")
    p.add_argument("--tol", type=number_arg("tol", minimum=0.0), help="stopping tolerance (default: the solver's)")
    p.add_argument("--device", default="cpu", help="torch device for the solve, e.g. cpu or cuda:0 (default cpu)")

    d = _subcommand(subparsers, "discover", "equations.txt and coefficients.json", EPILOG_DISCOVER,
                    "equation discovery: sparse dX/dt = Theta(X) Xi from a trajectory (SINDy)",
                    "Fit sparse polynomial dynamics to a sampled trajectory (rows = time samples, columns = state "
                    "variables) and print the equations.")
    d.add_argument("--data", required=True, metavar="FILE", help="trajectory, T x d (.npy, .npz, .csv)")
    d.add_argument("--dt", type=number_arg("dt", minimum=0.0, exclusive=True),
                   help="sampling interval (needed unless --derivatives is given)")
    d.add_argument("--derivatives", metavar="FILE", help="dX/dt at the samples, T x d (skips differentiation)")
    d.add_argument("--window", type=int_arg("window", minimum=3),
                   help="Savitzky-Golay window (odd) for the derivatives (default: central differences)")
    d.add_argument("--polyorder", type=int_arg("polyorder"), default=3,
                   help="Savitzky-Golay polynomial order (default 3)")
    d.add_argument("--method", default="stlsq", choices=("stlsq", "sbl", "lasso"), help="sparse regression (default stlsq)")
    d.add_argument("--degree", type=int_arg("degree"), default=2, help="polynomial degree of the library (default 2)")
    d.add_argument("--threshold", type=number_arg("threshold", minimum=0.0), default=0.1,
                   help="drop terms whose coefficient is smaller in magnitude (default 0.1)")
    d.add_argument("--names", type=_names, help="state names, e.g. x,y,z (default: a CSV header, else x,y,z or x0,x1,...)")
    d.add_argument("--precision", type=int_arg("precision"), default=4, help="significant digits printed (default 4)")
    return {"recover": _cmd_recover, "discover": _cmd_discover}


def _flag(dest: str) -> str:
    return "--no-subset-restarts" if dest == "subset_restarts" else "--" + dest.replace("_", "-")


# ---------------------------------------------------------------- inputs and outputs
def _load(text: str, flag: str, *, real: bool = False, vector: bool = False):
    """The array in file ``text`` (.npy, .npz with one array, .csv) and the CSV header (or None).

    ``vector``: a CSV file with one column is read as a 1-D array. Nothing is allocated from
    what a file claims before it is checked: a .npy/.npz header's shape and dtype must fit in
    the bytes the file holds and in the available memory (:func:`_array_header`); a CSV file
    gives at most one number per two bytes, so its size bounds the matrix built from it.
    """
    import zipfile
    from pathlib import Path

    import numpy as np

    from ..errors import FormatError
    from ._common import check_memory

    path = Path(text)
    what = f"{flag} '{text}'"
    if not path.is_file():
        raise FormatError(f"{what}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz", ".csv"):
        raise FormatError(f"{what}: expected a .npy, .npz or .csv file")
    header = None
    try:
        if suffix == ".csv":
            # float64 values of at most one number per two bytes ("0,"), and loadtxt's copy
            check_memory(8 * path.stat().st_size, what, FormatError)
            arr, header = _read_csv(path)
            if vector and arr.shape[1] == 1:
                arr = arr[:, 0]
        elif suffix == ".npy":
            with open(path, "rb") as fh:
                _array_header(fh, path.stat().st_size, what)
                fh.seek(0)
                arr = np.load(fh, allow_pickle=False)
        else:
            with zipfile.ZipFile(path) as zf:
                members = zf.infolist()
                if len(members) != 1:
                    raise FormatError(f"{what}: an .npz input must hold exactly one array, found {len(members)}")
                info = members[0]
                with zf.open(info) as member:
                    _array_header(member, info.file_size, what, stored=info)
            with np.load(path, allow_pickle=False) as npz:
                arr = npz[npz.files[0]]
    except FormatError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError) as exc:
        raise FormatError(f"{what}: cannot be read: {' '.join(str(exc).split())}") from None
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biufc":
        raise FormatError(f"{what}: holds {arr.dtype} values, not numbers")
    if arr.size == 0:
        raise FormatError(f"{what}: is empty")
    if real and arr.dtype.kind == "c":
        raise FormatError(f"{what}: is complex; only real data is supported here")
    if not np.isfinite(arr).all():
        raise FormatError(f"{what}: contains NaN or inf")
    return arr, header


# The most a deflate stream expands (zlib's limit is 1032:1); numpy's savez_compressed deflates.
_DEFLATE_RATIO = 1032


def _array_header(fh, size: int, what: str, stored=None):
    """Read and check the .npy header at the start of ``fh`` (``size`` bytes in all): numbers
    only, and the array it announces must fit in the bytes after the header and in memory.

    ``stored``: the ``ZipInfo`` of an .npz member, whose compressed size also bounds the data.
    Returns ``(shape, dtype)``; leaves ``fh`` after the header.
    """
    import math
    import zipfile

    from numpy.lib import format as npformat

    from ..errors import FormatError
    from ..memory import format_bytes
    from ._common import check_memory

    version = npformat.read_magic(fh)
    if version == (1, 0):
        shape, _, dtype = npformat.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, _, dtype = npformat.read_array_header_2_0(fh)
    else:
        raise FormatError(f"{what}: .npy format version {version[0]}.{version[1]} is not supported (1.0 or 2.0)")
    if dtype.hasobject or dtype.kind not in "biufc":
        raise FormatError(f"{what}: holds {dtype} values, not numbers")
    if any(n < 0 for n in shape):
        raise FormatError(f"{what}: its header gives a negative dimension in shape {shape}")
    nbytes = math.prod(shape) * dtype.itemsize
    claim = f"its header announces shape {tuple(shape)} of {dtype} ({format_bytes(nbytes)})"
    held = size - fh.tell()
    if nbytes > held:
        raise FormatError(f"{what}: {claim}, but the file holds only {held} bytes after the header")
    if stored is not None:
        bound = {zipfile.ZIP_STORED: 1, zipfile.ZIP_DEFLATED: _DEFLATE_RATIO}.get(stored.compress_type)
        if bound is not None and nbytes > bound * stored.compress_size + 1024:
            raise FormatError(f"{what}: {claim}, more than its {stored.compress_size} compressed bytes can hold")
    check_memory(nbytes, f"{what}: {claim}, which", FormatError)
    return shape, dtype


def _read_csv(path):
    """Comma-separated numbers, one row per line; a non-numeric first line is a header."""
    import warnings

    import numpy as np

    with open(path, encoding="utf-8") as fh:
        first = fh.readline()
    header = None
    try:
        [float(v) for v in first.split(",")]
    except ValueError:
        header = [h.strip() for h in first.split(",")]
    with warnings.catch_warnings():
        # a file without data rows is reported as empty by the caller, not as a warning
        warnings.simplefilter("ignore", UserWarning)
        arr = np.loadtxt(path, delimiter=",", skiprows=0 if header is None else 1, ndmin=2, dtype=np.float64)
    return arr, header


def _ndim(arr, flag: str, allowed: tuple[int, ...]):
    from ..errors import FormatError

    if arr.ndim not in allowed:
        raise FormatError(f"{flag} must have {' or '.join(map(str, allowed))} dimensions, got shape {arr.shape}")
    return arr


def _write(out, files: dict, command: str) -> None:
    """Create ``out`` (not its parents) and write ``{name: bytes}`` there, each file atomically,
    in order. A failure is a :class:`FormatError`; a folder created here is removed if still empty."""
    from ..errors import FormatError
    from ..formats.io import atomic_write
    from ..outputs import MARKER, marker_text

    created = not out.exists()
    try:
        out.mkdir(exist_ok=True)
        for name, data in {**files, MARKER: marker_text(command).encode()}.items():
            atomic_write(out / name, lambda tmp, data=data: tmp.write_bytes(data))
    except OSError as exc:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise FormatError(f"cannot write to --out '{out}': {' '.join(str(exc).split())}") from None


def _json(value) -> bytes:
    import json

    return (json.dumps(_plain(value), indent=2, allow_nan=False) + "\n").encode()


def _plain(value):
    """Tensors, numpy values and nested containers as JSON-ready Python values."""
    import math

    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, complex):
        return {"real": value.real, "imag": value.imag}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------- recover
def _check_method_options(args) -> dict:
    """The solver keywords the user set, checked against --method (before any file is read)."""
    import inspect

    from .. import recovery
    from ..errors import ConfigError

    fn_name, needs_factors, mapping = METHODS[args.method]
    if needs_factors and args.A is not None:
        raise ConfigError(f"--method {args.method} works on Kronecker factors: give --factors F1 F2 ..., not --A")
    if args.factors is not None and len(args.factors) < 2:
        raise ConfigError(f"--factors needs at least 2 matrices, got {len(args.factors)}")
    params = inspect.signature(getattr(recovery, fn_name)).parameters
    kwargs = {}
    for dest in _OPTIONS:
        value = getattr(args, dest)
        if value is None:
            continue
        if dest not in mapping:
            raise ConfigError(f"{_flag(dest)} is not used by --method {args.method}")
        if mapping[dest] not in params:
            raise ConfigError(f"{_flag(dest)} is not supported by this version of {fn_name}")
        kwargs[mapping[dest]] = value
    if args.method == "block_sbl" and args.blocks is None:
        raise ConfigError("--method block_sbl needs --blocks SIZE")
    if args.lam == "universal" and args.noise_var is None:
        raise ConfigError("--lam universal needs --noise-var")
    if args.coupling is not None and args.krosbl_method == "svd" and any(args.coupling):
        raise ConfigError("--coupling needs --krosbl-method am")
    n_factors = len(args.factors or ())
    if args.k is not None:
        want = n_factors if args.method == "kron_omp" else 1
        if len(args.k) != want:
            raise ConfigError(f"--k takes {'one sparsity per factor' if want > 1 else 'one sparsity'} "
                              f"for --method {args.method} ({want}), got {len(args.k)}")
        kwargs["n_nonzero"] = list(args.k) if args.method == "kron_omp" else args.k[0]
    if args.init_supports is not None and len(args.init_supports) != n_factors:
        raise ConfigError(f"--init-supports takes one index list per factor ({n_factors}), got {len(args.init_supports)}")
    if args.coupling is not None:
        if len(args.coupling) not in (1, n_factors):
            raise ConfigError(f"--coupling takes one value or one per factor ({n_factors}), got {len(args.coupling)}")
        kwargs["coupling"] = args.coupling[0] if len(args.coupling) == 1 else list(args.coupling)
    return kwargs


def _device(text: str):
    import torch

    from ..errors import ConfigError

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device '{text}' is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device '{text}': CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device '{text}': MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device '{text}': only cpu, cuda and mps are supported")
    return device


def _read_problem(args):
    """``(y, A or the list of factors, N, x_true or None)`` as numpy, shapes checked against each other."""
    import math

    from ._common import RecoveryError

    y = _ndim(_load(args.y, "--y", vector=True)[0], "--y", (1, 2))
    M = y.shape[0]
    if args.A is not None:
        A = _ndim(_load(args.A, "--A")[0], "--A", (2,))
        if A.shape[0] != M:
            raise RecoveryError(f"--A has {A.shape[0]} rows but --y has {M} (y = A x needs the same M)")
        N, operator = A.shape[1], A
    else:
        operator = [_ndim(_load(f, f"--factors {f}")[0], f"--factors {f}", (2,)) for f in args.factors]
        rows = [f.shape[0] for f in operator]
        if math.prod(rows) != M:
            raise RecoveryError(f"--factors have {' x '.join(map(str, rows))} = {math.prod(rows)} rows "
                                f"in their Kronecker product but --y has {M}")
        N = math.prod(f.shape[1] for f in operator)
    x_true = None
    if args.x_true is not None:
        x_true, _ = _load(args.x_true, "--x-true", vector=True)
        if x_true.shape != (N,) + y.shape[1:]:
            raise RecoveryError(f"--x-true has shape {x_true.shape} but x must be {(N,) + y.shape[1:]} "
                                f"(N = {N} columns of A{', B = %d columns of y' % y.shape[1] if y.ndim == 2 else ''})")
    return y, operator, N, x_true


def _check_sizes(args, M: int, N: int, B: int, itemsize: int) -> None:
    """Sizes against the options and the memory the solver would need (before it runs)."""
    from ._common import RecoveryError, check_memory

    if args.method == "omp" and args.k is not None and args.k[0] > min(M, N):
        raise RecoveryError(f"--k {args.k[0]} exceeds min(M, N) = {min(M, N)}")
    if args.blocks is not None and N % args.blocks:
        raise RecoveryError(f"--blocks {args.blocks} does not divide N = {N}")
    need, how = _solver_bytes(args, M, N, B, itemsize)
    check_memory(need, f"--method {args.method} with M = {M} measurements and N = {N} unknowns"
                       f"{f' (B = {B} columns of y)' if B > 1 else ''} ({how})")


def _solver_bytes(args, M: int, N: int, B: int, itemsize: int) -> tuple[int, str]:
    """A generous estimate of the bytes ``--method`` allocates, and what dominates it.

    kron_omp and krosbl are matrix-free (a few dozen length-N vectors); omp, amp and fista with
    a given penalty apply A (or the Kronecker operator) to vectors; sbl, block_sbl and
    fista's cross-validation work on the dense M x N matrix (densified from --factors, copied
    into a working set, and for fast SBL once more in numpy plus a Gram buffer of up to N x M).
    """
    vec = N * itemsize
    result = 2 * B * vec  # x, and its numpy copy
    dense = M * N * itemsize
    densified = dense if args.factors is not None else 0
    if args.method in ("kron_omp", "krosbl"):
        return 24 * vec + result, "length-N vectors"
    if args.method in ("sbl", "block_sbl"):
        return densified + 4 * dense + 16 * vec + result, "dense M x N matrices"
    if args.method == "fista" and args.lam in (None, "cv"):
        return densified + 2 * dense + 16 * vec + result, "dense M x N matrices for --lam cv"
    return 16 * vec + result, "length-N vectors"


def _metrics(x, x_true, support) -> dict:
    """NMSE (linear and dB) and the F1 score of the support against the true one."""
    import math

    import numpy as np

    err = float(np.linalg.norm(x - x_true) ** 2)
    ref = float(np.linalg.norm(x_true) ** 2)
    nmse = err / ref if ref > 0 else None
    cols = [support] if x_true.ndim == 1 else support
    truth = x_true.reshape(x_true.shape[0], -1)
    hits = found = real = 0
    for b, s in enumerate(cols):
        est = set(int(i) for i in np.asarray(s).reshape(-1))
        true = set(np.flatnonzero(truth[:, b]).tolist())
        hits, found, real = hits + len(est & true), found + len(est), real + len(true)
    f1 = 2 * hits / (found + real) if found + real else 1.0
    # an exact recovery (nmse 0) has no dB value: nmse_db is null then
    return {"nmse": nmse, "nmse_db": 10 * math.log10(nmse) if nmse else None,
            "support_f1": f1, "true_support_size": real}


def _cmd_recover(args) -> int:
    import time

    import numpy as np
    import torch

    from .. import recovery

    kwargs = _check_method_options(args)
    out = check_output(args.out, overwrite=args.overwrite, kind="folder")
    device = _device(args.device)
    y_np, given, N, x_true = _read_problem(args)
    M = y_np.shape[0]
    arrays = [y_np, *(given if args.A is None else [given])]
    itemsize = max(8, np.result_type(*arrays).itemsize)  # integers and float32 may be widened
    _check_sizes(args, M, N, y_np.shape[1] if y_np.ndim == 2 else 1, itemsize)

    fn_name, needs_factors, _ = METHODS[args.method]
    y = torch.from_numpy(np.ascontiguousarray(y_np)).to(device)
    if args.A is not None:
        operator = torch.from_numpy(np.ascontiguousarray(given)).to(device)
    else:
        factors = [torch.from_numpy(np.ascontiguousarray(f)).to(device) for f in given]
        operator = factors if needs_factors else recovery.KroneckerOperator(factors)
    log.info("%s: y %s, %s, N = %d, on %s, options %s", args.method, tuple(y.shape),
             f"A {tuple(given.shape)}" if args.A is not None else
             "factors " + " (x) ".join("x".join(map(str, f.shape)) for f in given), N, device, kwargs or "defaults")

    start = time.perf_counter()
    res = getattr(recovery, fn_name)(operator, y, **kwargs)
    seconds = time.perf_counter() - start
    x = res.x.detach().cpu().numpy() if isinstance(res.x, torch.Tensor) else np.asarray(res.x)

    support = _plain(res.support)
    result = {
        "method": args.method, "solver": fn_name, "arguments": kwargs,
        "inputs": {"y": args.y, "A": args.A, "factors": args.factors, "x_true": args.x_true, "device": str(device)},
        "shape": {"M": M, "N": N, "B": y_np.shape[1] if y_np.ndim == 2 else None,
                  "factors": None if args.A is not None else [list(f.shape) for f in given]},
        "dtype": str(x.dtype), "support": support, "n_iter": _plain(res.n_iter),
        "converged": _plain(res.converged), "seconds": seconds,
    }
    for key in ("noise_var", "lam", "residual_norm", "final_cost", "restarts_accepted", "diverged"):
        if key in res.info:
            result[key] = _plain(res.info[key])
    if x_true is not None:
        result.update(_metrics(x, x_true, support))
    _write(out, {"x.npy": _npy_bytes(x), "result.json": _json(result)}, "recover")

    batch = y_np.ndim == 2
    conv = result["converged"]
    line = (f"recovered x ({'x'.join(map(str, x.shape))}) from y ({'x'.join(map(str, y_np.shape))}) with "
            f"{args.method} in {seconds:.2f} s: {int(np.count_nonzero(x))} non-zeros, "
            + (f"{sum(conv)}/{len(conv)} columns converged" if batch else
               f"{result['n_iter']} iterations, {'converged' if conv else 'not converged'}"))
    if "noise_var" in result and not batch:
        line += f", noise variance {result['noise_var']:.3g}"
    if x_true is not None:
        nmse, db = result["nmse"], result["nmse_db"]
        line += ", NMSE " + ("n/a (x-true is zero)" if nmse is None else "0 (exact)" if db is None else f"{db:.1f} dB")
        line += f", support F1 {result['support_f1']:.3f}"
    write_line(line + f"; wrote {out / 'x.npy'} and {out / 'result.json'}")
    return 0


def _npy_bytes(x) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


# ---------------------------------------------------------------- discover
def _check_library(args, T: int, d: int) -> None:
    """Refuse a ``--degree`` whose library (``C(d + D, D)`` terms x ``T`` samples) and its fit
    would not fit in memory, before anything is built."""
    from ._common import check_memory
    from .discovery import library_size

    P = library_size(d, args.degree)
    # the library and a scaled copy, a least-squares copy, the library again for the
    # residuals; SBL also a Gram buffer of up to P x min(P, T); names and objects per term
    need = 8 * (6 * T * P + P * min(P, T)) + 300 * P
    check_memory(need, f"--degree {args.degree} on {d} states and {T} samples (a library of {P} terms)")


def _cmd_discover(args) -> int:
    import numpy as np

    from ..errors import ConfigError
    from ._common import RecoveryError
    from .discovery import default_state_names, derivative
    from .estimators import EquationDiscovery

    if args.derivatives is None and args.dt is None:
        raise ConfigError("--dt is needed to differentiate --data (or give --derivatives)")
    if args.derivatives is not None and args.window is not None:
        raise ConfigError("--window smooths computed derivatives; it is not used with --derivatives")
    if args.window is not None and (args.window % 2 == 0 or args.window <= args.polyorder):
        raise ConfigError(f"--window must be odd and larger than --polyorder {args.polyorder}, got {args.window}")
    out = check_output(args.out, overwrite=args.overwrite, kind="folder")

    X, header = _load(args.data, "--data", real=True)
    X = _ndim(X, "--data", (1, 2)).reshape(X.shape[0], -1).astype(np.float64)
    T, d = X.shape
    names = args.names or header
    if names is not None and len(names) != d:
        source = "--names" if args.names else f"the header of --data '{args.data}'"
        raise ConfigError(f"{source} gives {len(names)} names but --data has {d} columns")
    if args.names is None and header is not None and _bad_names(header):
        raise ConfigError(f"the header of --data '{args.data}' must give distinct names without spaces; "
                          f"pass --names to override it")
    _check_library(args, T, d)
    if args.derivatives is None and (T < 3 or (args.window is not None and args.window > T)):
        raise RecoveryError(f"--data has {T} samples; differentiating needs at least "
                            f"{3 if args.window is None else args.window}")
    if args.derivatives is not None:
        D, _ = _load(args.derivatives, "--derivatives", real=True)
        D = _ndim(D, "--derivatives", (1, 2)).reshape(D.shape[0], -1).astype(np.float64)
        if D.shape != X.shape:
            raise RecoveryError(f"--derivatives has shape {D.shape} but --data has {X.shape}")
        how = f"given ({args.derivatives})"
    else:
        D = derivative(X, args.dt, window=args.window, polyorder=args.polyorder)
        how = ("central differences" if args.window is None
               else f"Savitzky-Golay (window {args.window}, polyorder {args.polyorder})")
    log.info("discover: %d samples of %d states, derivatives by %s, %s, degree %d, threshold %g",
             T, d, how, args.method, args.degree, args.threshold)

    model = EquationDiscovery(args.method, degree=args.degree, threshold=args.threshold, names=names).fit(X, D)
    coef = np.asarray(model.coef_).reshape(len(model.feature_names_), d)
    equations = model.equations(precision=args.precision)
    resid = model.predict(X).reshape(T, d) - D
    rel = np.linalg.norm(resid, axis=0) / np.maximum(np.linalg.norm(D, axis=0), np.finfo(float).tiny)
    state_names = names or default_state_names(d)
    result = {
        "method": args.method, "degree": args.degree, "threshold": args.threshold,
        "states": state_names, "feature_names": model.feature_names_, "coefficients": coef,
        "terms": int(np.count_nonzero(coef)), "relative_residual": dict(zip(state_names, rel)),
        "derivatives": how, "dt": args.dt, "samples": T, "data": args.data,
    }
    _write(out, {"equations.txt": ("\n".join(equations) + "\n").encode(), "coefficients.json": _json(result)}, "discover")
    for eq in equations:
        write_line(eq)
    write_line(f"discovered {result['terms']} terms from {T} samples ({args.method}, degree {args.degree}, "
         f"threshold {args.threshold:g}); wrote {out / 'equations.txt'} and {out / 'coefficients.json'}")
    return 0
