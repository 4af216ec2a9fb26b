"""One file on disk: encoded tensors in a safetensors file with a JSON header.

Layout
------
A plain safetensors file (8-byte little-endian header length, JSON header, byte buffer), so
``safetensors.torch.load_file`` reads it and returns the *component* tensors. Component keys:
a dense tensor is stored under its own name (other tools see it as is); any other encoding
stores ``"<name>::<component>"`` (``"::"`` is therefore not allowed in names).

The safetensors header's ``__metadata__`` holds ``"format": "pt"`` and ``"sparsecraft"``, a
JSON string::

    {
      "format": "sparsecraft",
      "version": 2,
      "tensors": {
        "<name>": {
          "shape": [576, 1536], "dtype": "float16",
          "encoding": "nm", "nm": [2, 4],          # nm is null unless encoding == "nm"
          "pattern": "2:4",                          # caller's, else inferred
          "sparsity": 0.5, "nnz": 442368,            # measured (+0.0 and -0.0 are zeros)
          "target_sparsity": 0.5,                    # only if the caller gave "sparsity"
          "nbytes": 608256,                          # encoded bytes (sum of components)
          "components": {"values": "<name>::values", "indices": "<name>::indices"},
          "component_sha256": {"values": "...", "indices": "..."},
          "sha256": "...",                           # of the decoded tensor's raw bytes
          "attrs": {...}                             # other keys the caller put in info[name]
        }
      },
      "extra": {...},                                # free-form, for model-level information
      "header_sha256": "..."                         # of the canonical JSON of all the above
    }

Reading parses the safetensors layout directly so that a truncated, altered or malformed file
fails with a :class:`~sparsecraft.errors.FormatError` naming the logical tensor. The whole
sparsecraft header is checked against ``header_sha256`` (SHA-256 of the header without that
field, as JSON with sorted keys and no spaces) before anything in it is used; then each
tensor's layout is checked against its shape (so no size in the header can make us allocate
more than the file and the machine's available memory justify); then every component against
its SHA-256 before decoding, and the decoded tensor against ``sha256``.

Version 1 files (no ``header_sha256``) are refused: their metadata was outside every
checksum, so a load could not tell a corrupted header from a good one.

What the checksums protect against: accidental corruption (flipped bits, a truncated or
half-copied file, a header edited by mistake). What they do not: they are not signatures.
Anyone who can write the file can rewrite a tensor *and* its checksums; only a file from a
source you trust is a trusted file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Callable

import torch

from sparsecraft.errors import FormatError, SparsecraftError
from sparsecraft.formats import encodings as enc
from sparsecraft.memory import available_memory, check_memory

__all__ = ["FORMAT_VERSION", "write_tensors", "read_tensors", "read_header", "atomic_write",
           "read_plan", "claims_sparsecraft", "available_memory", "check_memory", "describe", "describe_header"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
#: the key of the whole-header checksum (everything else in the header is covered by it)
HEADER_SHA_KEY = "header_sha256"
_SEP = "::"
_INFO_KEYS = ("pattern", "sparsity", "nm")

# safetensors dtype codes -> torch dtypes (only those torch can hold in this process).
_ST_DTYPES = {
    code: getattr(torch, name)
    for code, name in [
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
        ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"),
        ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"), ("U8", "uint8"), ("BOOL", "bool"),
    ]
    if hasattr(torch, name)
}


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


_UMASK = _umask()  # read once: os.umask can only be read by setting it


def _sha256(t: torch.Tensor) -> str:
    if t.numel() == 0:  # an empty tensor cannot be viewed as bytes
        return hashlib.sha256(b"").hexdigest()
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(raw)).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_nm(value) -> tuple[int, int] | None:
    """An N:M hint from ``(n, m)``, ``[n, m]`` or a ``"n:m"`` pattern string."""
    if value is None:
        return None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
        return enc._check_nm((match[1], match[2])) if match else None
    return enc._check_nm(value)


def _check_names(tensors: dict, info: dict, encoding) -> None:
    if not isinstance(tensors, dict):
        raise FormatError(f"tensors must be a dict of name -> Tensor, got {type(tensors).__name__}")
    for name, t in tensors.items():
        if not isinstance(name, str) or not name or _SEP in name or name == "__metadata__":
            raise FormatError(f"invalid tensor name {name!r}: must be a non-empty string without {_SEP!r}")
        if not isinstance(t, torch.Tensor):
            raise FormatError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
    unknown = [n for n in info if n not in tensors]
    if isinstance(encoding, dict):
        unknown += [n for n in encoding if n not in tensors]
    if unknown:
        raise FormatError(f"info/encoding given for unknown tensor(s) {sorted(set(unknown))}")


def _encode_one(name: str, t: torch.Tensor, meta: dict, encoding: str) -> tuple[dict, dict]:
    """Encode one tensor; returns (components, header entry). Errors name the tensor."""
    try:
        nm_hint = _parse_nm(meta.get("nm")) or _parse_nm(meta.get("pattern"))
        t = enc._check_tensor(t)
        stats = enc.tensor_stats(t)  # once: choosing, encoding and the header all need it
        if encoding == "auto":
            encoding, kwargs = enc._choose(t, stats, nm_hint)
        elif encoding == "nm":
            if nm_hint is None:
                raise FormatError("encoding 'nm' needs an N:M hint: info[name]['nm'] or an 'N:M' pattern")
            kwargs = {"nm": nm_hint}
        else:
            enc._check_encoding(encoding)
            kwargs = {}
        comps = enc._encode(t, encoding, kwargs.get("nm"), has_negzero=stats.has_negzero)
    except SparsecraftError as e:
        raise type(e)(f"tensor {name!r}: {e}") from None

    nm = list(kwargs["nm"]) if encoding == "nm" else None
    pattern = meta.get("pattern")
    if pattern is None:  # inferred from what was stored
        pattern = f"{nm[0]}:{nm[1]}" if nm else ("unstructured" if stats.nnz < stats.numel else "dense")
    entry = {
        "shape": list(t.shape),
        "dtype": _dtype_name(t.dtype),
        "encoding": encoding,
        "nm": nm,
        "pattern": str(pattern),
        "sparsity": stats.sparsity,
        "nnz": stats.nnz,
    }
    if meta.get("sparsity") is not None:
        entry["target_sparsity"] = float(meta["sparsity"])
    entry["nbytes"] = sum(c.numel() * c.element_size() for c in comps.values())
    entry["components"] = {c: (name if encoding == "dense" else f"{name}{_SEP}{c}") for c in comps}
    entry["component_sha256"] = {c: _sha256(v) for c, v in comps.items()}
    entry["sha256"] = entry["component_sha256"]["values"] if encoding == "dense" else _sha256(t)
    attrs = {k: v for k, v in meta.items() if k not in _INFO_KEYS}
    if attrs:
        entry["attrs"] = attrs
    return comps, entry


_ST_CODES = {dtype: code for code, dtype in _ST_DTYPES.items()}


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` in the safetensors layout (what ``safetensors.torch.save_file``
    writes: tensors ordered by alignment then name, contiguous, the header padded to 8
    bytes) with a header whose bytes depend only on the input: safetensors' own writer
    orders the metadata map differently from run to run, and a resumed run must write the
    same bytes as an uninterrupted one."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    entries, offset = {}, 0
    for key in order:
        t = tensors[key]
        n = t.numel() * t.element_size()
        entries[key] = {"dtype": _ST_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key in order:
            t = tensors[key]
            if t.numel():
                f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))


def _header_sha256(header: dict) -> str:
    """SHA-256 of the header without its own checksum, as canonical JSON."""
    body = {k: v for k, v in header.items() if k != HEADER_SHA_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[Path], object], *, overwrite: bool = True) -> None:
    """Create or replace ``path`` atomically with what ``write(tmp)`` writes to the path ``tmp``.

    ``tmp`` is a new empty file next to ``path``; once ``write`` returns it is fsynced, given
    ``path``'s current mode (a new file gets the usual ``0o666 & ~umask``), moved into place and
    the directory is fsynced. So ``path`` holds either its old content or the complete new
    file. On any failure the temporary file is removed and the exception propagates unchanged.
    With ``overwrite`` false an existing ``path`` is never replaced, not even one created by
    someone else meanwhile: :class:`FileExistsError`.
    """
    path = Path(os.fspath(path))
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_UMASK
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # link() refuses to clobber, unlike replace()
            tmp.unlink()
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_tensors(path, tensors: dict[str, torch.Tensor], info: dict[str, dict] | None = None,
                  extra: dict | None = None, overwrite: bool = False,
                  encoding: str | dict[str, str] = "auto") -> dict:
    """Encode ``tensors`` and write them to ``path`` atomically; returns the header written.

    ``info[name]`` may carry ``"pattern"`` (free string, e.g. ``"2:4"``), ``"sparsity"`` (the
    target, stored as ``target_sparsity``) and ``"nm"`` (an ``(N, M)`` hint; an ``"N:M"``
    pattern also serves as one); other JSON keys are kept under ``attrs``. ``encoding`` is
    ``"auto"`` (smallest, see :func:`~sparsecraft.formats.encodings.choose_encoding`), one
    encoding name for all tensors, or a dict name -> encoding (missing names: auto).

    Everything is encoded and validated before the file system is touched. The file is written
    to a temporary file in the same directory, fsynced, then moved into place, so ``path``
    holds either its old content or the complete new file, and a failed write leaves no
    temporary file behind. Raises :class:`FormatError` when ``path`` exists and ``overwrite``
    is false, when its directory is missing, or for bad input.
    """
    path = Path(os.fspath(path))
    info = dict(info or {})
    extra = dict(extra or {})
    parent = path.parent
    if not parent.is_dir():
        raise FormatError(f"cannot write {path}: directory {parent} does not exist")
    if path.is_dir():
        raise FormatError(f"cannot write {path}: it is a directory")
    if path.exists() and not overwrite:
        raise FormatError(f"{path} exists; pass overwrite=True to replace it")
    _check_names(tensors, info, encoding)
    for name, meta in info.items():
        if not isinstance(meta, dict):
            raise FormatError(f"info[{name!r}] must be a dict, got {type(meta).__name__}")

    flat: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for name, t in tensors.items():
        choice = encoding.get(name, "auto") if isinstance(encoding, dict) else encoding
        comps, entry = _encode_one(name, t, info.get(name, {}), choice)
        for c, v in comps.items():
            flat[entry["components"][c]] = v
        entries[name] = entry
        log.debug("encoded %s as %s (%d bytes)", name, entry["encoding"], entry["nbytes"])
    header = {"format": "sparsecraft", "version": FORMAT_VERSION, "tensors": entries, "extra": extra}
    try:
        header[HEADER_SHA_KEY] = _header_sha256(header)
        header_json = json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise FormatError(f"info/extra must be JSON-serialisable (no NaN/inf): {e}") from None

    try:
        atomic_write(path, lambda tmp: _save_safetensors(tmp, flat, {"format": "pt", "sparsecraft": header_json}),
                     overwrite=overwrite)
    except FileExistsError:  # created by someone else since the check above
        raise FormatError(f"{path} exists; pass overwrite=True to replace it") from None
    except FormatError:
        raise
    except Exception as e:
        raise FormatError(f"could not write {path}: {e}") from e
    log.info("wrote %d tensors to %s (%d bytes)", len(entries), path, path.stat().st_size)
    return header


# ----------------------------------------------------------------------------- reading


def _read_layout(f, path: Path, size: int) -> tuple[dict, dict, int]:
    """Parse the safetensors header: (safetensors header, sparsecraft header, data start)."""
    if size < 8:
        raise FormatError(f"{path}: truncated header: file has {size} bytes, a safetensors file needs at least 8")
    n = int.from_bytes(f.read(8), "little")
    if n > size - 8:
        raise FormatError(f"{path}: truncated header: header needs bytes 8..{8 + n}, file has {size}")
    try:
        st_header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: malformed safetensors header (not valid JSON): {e}") from None
    if not isinstance(st_header, dict):
        raise FormatError(f"{path}: malformed safetensors header: expected a JSON object")
    meta = st_header.get("__metadata__")
    if not isinstance(meta, dict) or "sparsecraft" not in meta:
        raise FormatError(f"{path}: not a sparsecraft file (no 'sparsecraft' metadata); "
                          "plain safetensors files load with safetensors.torch.load_file")
    try:
        header = json.loads(meta["sparsecraft"])
    except (TypeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: malformed sparsecraft metadata (not valid JSON): {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), dict):
        raise FormatError(f"{path}: malformed sparsecraft metadata: no 'tensors' table")
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise FormatError(f"{path}: format version {version!r} is not supported "
                          f"(this sparsecraft reads up to {FORMAT_VERSION})")
    if version < FORMAT_VERSION:
        raise FormatError(f"{path}: format version {version} is no longer read: its metadata is not "
                          f"covered by a checksum; save the model again with this sparsecraft "
                          f"(format {FORMAT_VERSION})")
    want = header.get(HEADER_SHA_KEY)
    if not isinstance(want, str):
        raise FormatError(f"{path}: sparsecraft header has no '{HEADER_SHA_KEY}' checksum")
    try:
        got = _header_sha256(header)
    except ValueError as e:  # NaN/inf smuggled into the JSON
        raise FormatError(f"{path}: malformed sparsecraft metadata: {e}") from None
    if got != want:
        raise FormatError(f"{path}: header checksum mismatch: the sparsecraft header (tensor table, "
                          "aliases, model record) was altered or corrupted")
    return st_header, header, 8 + n


def read_header(path) -> dict:
    """The sparsecraft header of ``path`` (what :func:`write_tensors` returned); reads no tensor data."""
    path = Path(os.fspath(path))
    try:
        with open(path, "rb") as f:
            return _read_layout(f, path, os.fstat(f.fileno()).st_size)[1]
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory, not a file") from None


def _component_spans(name: str, entry: dict, st_header: dict, data_start: int, size: int,
                     path: Path) -> dict[str, tuple[str, torch.dtype, list[int], int, int]]:
    """Validate where each component of ``name`` lives: comp -> (key, dtype, shape, start, end)."""
    spans = {}
    if not isinstance(entry, dict):
        raise FormatError(f"{path}: tensor {name!r} has a malformed header entry")
    comps = entry.get("components")
    if not isinstance(comps, dict) or not comps:
        raise FormatError(f"{path}: tensor {name!r} has no component table in the header")
    for comp, key in comps.items():
        desc = st_header.get(key)
        if not isinstance(desc, dict):
            raise FormatError(f"{path}: tensor {name!r} is missing component {comp!r} (key {key!r})")
        try:
            dtype = _ST_DTYPES[desc["dtype"]]
            shape = [int(s) for s in desc["shape"]]
            begin, end = (int(x) for x in desc["data_offsets"])
            if any(s < 0 for s in shape):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: tensor {name!r}: malformed header entry for {key!r}: {desc}") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if begin < 0 or end - begin != nbytes:
            raise FormatError(f"{path}: tensor {name!r}: header entry for {key!r} has data_offsets "
                              f"{[begin, end]} but shape {shape} needs {nbytes} bytes")
        a, b = data_start + begin, data_start + end
        if b > size:
            raise FormatError(f"{path}: tensor {name!r} is truncated: component {comp!r} needs bytes "
                              f"{a}..{b}, file has {size}")
        spans[comp] = (key, dtype, shape, a, b)
    return spans


def _read_component(f, dtype: torch.dtype, shape: list[int], start: int, end: int) -> torch.Tensor:
    n = end - start
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    # Own buffer per component (not an mmap), so nothing aliases the file after it closes.
    buf = bytearray(n)
    f.seek(start)
    if f.readinto(buf) != n:
        raise EOFError
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def _check_layouts(path: Path, entries: dict, spans: dict) -> int:
    """Check every tensor's components against its shape; returns the bytes decoding needs."""
    total = scratch = 0
    for name, entry in entries.items():
        try:
            nbytes = enc.check_layout({c: (dt, shp) for c, (_, dt, shp, _, _) in spans[name].items()},
                                      entry.get("encoding"), entry.get("shape"), entry.get("dtype"),
                                      entry.get("nm"))
        except SparsecraftError as e:
            raise FormatError(f"{path}: tensor {name!r} has an inconsistent layout: {e}") from None
        comp_bytes = sum(b - a for (_, _, _, a, b) in spans[name].values())
        total += nbytes
        if entry["encoding"] != "dense":  # components and index arrays live while decoding
            n_values = math.prod(spans[name]["values"][2])
            scratch = max(scratch, comp_bytes + enc.decode_scratch_nbytes(entry["shape"], n_values))
    return total + scratch


def _open(path: Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory, not a file") from None


def _plan(f, path: Path):
    size = os.fstat(f.fileno()).st_size
    st_header, header, data_start = _read_layout(f, path, size)
    entries = header["tensors"]
    spans = {name: _component_spans(name, e, st_header, data_start, size, path)
             for name, e in entries.items()}
    return header, spans, _check_layouts(path, entries, spans)


def read_plan(path) -> tuple[dict, int]:
    """Validate ``path`` as :func:`read_tensors` would, without reading tensor data.

    Returns ``(header, bytes of memory reading it needs)``; raises :class:`FormatError` for
    everything read_tensors checks before reading (header and its checksum, every component
    inside the file, component sizes that fit each tensor's shape).
    """
    path = Path(os.fspath(path))
    with _open(path) as f:
        header, _, needed = _plan(f, path)
    return header, needed


def read_tensors(path) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict]:
    """Read and decode every tensor of ``path``: ``(tensors, per-tensor header entries, extra)``.

    Raises :class:`FormatError` for a missing file, a truncated, altered or malformed header, a
    tensor whose components do not fit its shape or whose bytes run past the end of the file,
    a file that would need more memory than is available, or a checksum mismatch (these name
    the tensor). All layouts and sizes are validated before any data is read or allocated.
    """
    path = Path(os.fspath(path))
    with _open(path) as f:
        header, spans, needed = _plan(f, path)
        check_memory(needed, f"reading {path}")
        entries = header["tensors"]
        tensors: dict[str, torch.Tensor] = {}
        for name, entry in entries.items():
            comps = {}
            for comp, (_key, dtype, shape, a, b) in spans[name].items():
                try:
                    comps[comp] = _read_component(f, dtype, shape, a, b)
                except EOFError:
                    raise FormatError(f"{path}: tensor {name!r} is truncated: component {comp!r} "
                                      f"needs bytes {a}..{b}, file ended early") from None
                want = (entry.get("component_sha256") or {}).get(comp)
                if want is None:
                    raise FormatError(f"{path}: tensor {name!r} has no checksum for component {comp!r}")
                if _sha256(comps[comp]) != want:
                    raise FormatError(f"{path}: checksum mismatch for tensor {name!r} (component "
                                      f"{comp!r}): the file was altered or corrupted")
            try:
                t = enc.decode(comps, entry["encoding"], entry["shape"], entry["dtype"], nm=entry.get("nm"))
            except (ValueError, KeyError, TypeError, RuntimeError) as e:  # FormatError is a ValueError
                raise FormatError(f"{path}: tensor {name!r} cannot be decoded: {e}") from None
            # A dense tensor is its component, already verified above.
            if entry["encoding"] != "dense" and _sha256(t) != entry.get("sha256"):
                raise FormatError(f"{path}: checksum mismatch for tensor {name!r}: the decoded data "
                                  "differs from what was written; the file was altered or corrupted")
            tensors[name] = t
    log.debug("read %d tensors from %s", len(tensors), path)
    return tensors, {n: dict(e) for n, e in entries.items()}, header.get("extra", {})


# ----------------------------------------------------------------------------- inspecting

# how far claims_sparsecraft looks when the length prefix itself is damaged
_SNIFF_BYTES = 1 << 20


def claims_sparsecraft(path) -> bool:
    """Whether the file at ``path`` presents itself as a sparsecraft file, even a broken one.

    True when its safetensors header (or, if the length prefix is damaged, the first MiB)
    contains the bytes ``sparsecraft``: a valid file has the word twice (the metadata key and
    ``"format": "sparsecraft"``), so one damaged byte cannot hide it. A file that claims it
    must load as sparsecraft or fail; it is never handed to another loader.
    """
    path = Path(os.fspath(path))
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            limit = 8 + n if 0 < n <= size - 8 else min(size, _SNIFF_BYTES)
            f.seek(0)
            return b"sparsecraft" in f.read(min(limit, size))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return False


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def describe(path) -> str:
    """A table of the file's tensors: what ``sparsecraft info`` prints.

    ``path`` is a tensor file or a checkpoint folder (its ``model.safetensors``). One line per
    tensor: name, shape, dtype, encoding, pattern, measured sparsity, stored bytes (its
    encoded components) and dense bytes (shape x element size); then a totals line with
    stored vs dense bytes, their ratio and the file's size. Reads only the header.
    """
    path = Path(os.fspath(path))
    file = path / "model.safetensors" if path.is_dir() else path
    header = read_header(file)
    return describe_header(f"{file}  (format version {header.get('version')}", header, file.stat().st_size)


def describe_header(title: str, header: dict, size: int) -> str:
    """:func:`describe`'s table for a header already read (``title`` starts its first line;
    ``size`` is the bytes of the file, or of every shard of a sharded checkpoint)."""
    rows = []
    stored_total = dense_total = 0
    for name, e in header["tensors"].items():
        shape = e.get("shape") or []
        try:
            es = torch.empty((), dtype=enc._as_dtype(e.get("dtype"))).element_size()
        except SparsecraftError:
            es = 0
        dense = math.prod(int(s) for s in shape) * es
        stored = int(e.get("nbytes") or 0)
        stored_total += stored
        dense_total += dense
        sparsity = e.get("sparsity")
        rows.append((name, "x".join(map(str, shape)) or "scalar", str(e.get("dtype", "")),
                     str(e.get("encoding", "")), str(e.get("pattern", "")),
                     "" if sparsity is None else f"{float(sparsity):.4f}", f"{stored:,}", f"{dense:,}"))
    heads = ("tensor", "shape", "dtype", "encoding", "pattern", "sparsity", "stored B", "dense B")
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(heads)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    ratio = f"{stored_total / dense_total:.3f}" if dense_total else "n/a"
    out = [f"{title}, {len(rows)} tensors)", line(heads)]
    out += [line(r) for r in rows]
    out.append(f"total: stored {stored_total:,} bytes ({_human(stored_total)}) vs dense {dense_total:,} "
               f"bytes ({_human(dense_total)}), ratio {ratio}; file {size:,} bytes ({_human(size)})")
    return "\n".join(out)
