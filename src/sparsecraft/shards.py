"""The tensors of a Hugging Face model folder, read one at a time from its safetensors shards.

A folder holds ``config.json`` and either one ``model.safetensors`` or an index
``model.safetensors.index.json`` whose ``weight_map`` names the shard of every tensor.
:meth:`ShardedWeights.open` checks everything the files say before any tensor is read:

* the index: size (at most :data:`MAX_INDEX_BYTES`), JSON, ``weight_map`` a mapping of
  tensor names to plain ``.safetensors`` file names in the folder, every shard present;
* every shard's header: its length against the file's length (and :data:`MAX_HEADER_BYTES`),
  JSON, for every tensor a known dtype, a shape of non-negative integers and
  ``data_offsets`` that span exactly ``shape x element size`` bytes inside the file (a
  truncated shard is refused naming the shard and the first tensor it cuts off);
* every tensor the index names is in the header of the shard it names.

:meth:`ShardedWeights.read` then reads the tensors it is asked for through safetensors'
memory-mapped ``safe_open``, one shard at a time, and checks each against its header.

:meth:`ShardedWeights.fingerprint` identifies the input for a resumed run (see its docstring).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import FormatError
from .formats.io import _ST_DTYPES

__all__ = ["ShardedWeights", "TensorSlot", "INDEX_FILE", "SINGLE_FILE", "MAX_HEADER_BYTES", "MAX_INDEX_BYTES",
           "has_safetensors"]

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: safetensors' own limit for a header; a longer one is refused before it is read
MAX_HEADER_BYTES = 100 * 2**20
#: an index names each tensor once: even a 1T-parameter model's index is a few MB
MAX_INDEX_BYTES = 64 * 2**20


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives: its shard, dtype, shape and byte span (from the file's start)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def has_safetensors(folder: str | Path) -> bool:
    """Whether ``folder`` is a Hugging Face folder whose weights are safetensors (single or sharded)."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and (
        (folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file())


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` of an index file, checked (see the module docstring)."""
    size = path.stat().st_size
    if size > MAX_INDEX_BYTES:
        raise FormatError(f"'{path}': index file has {size:,} bytes, more than the {MAX_INDEX_BYTES:,} "
                          "an index needs; refusing to read it")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"'{path}': not a valid JSON index: {e}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"'{path}': field 'weight_map' must be a non-empty mapping of tensor names to shard files")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.endswith(".safetensors") or shard != os.path.basename(shard) \
                or shard.startswith(".") or "\\" in shard or "\0" in shard:
            raise FormatError(f"'{path}': tensor '{name}' maps to {shard!r}, not a plain .safetensors file name "
                              "in the model's folder")
    return weight_map


def _read_header(path: Path) -> tuple[dict[str, TensorSlot], bytes]:
    """The tensors of one safetensors file (checked against its length) and its raw header."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FormatError(f"shard '{path}' is missing") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise FormatError(f"shard '{path}' is truncated: {size} bytes, a safetensors file needs at least 8")
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise FormatError(f"shard '{path}' is truncated: its header needs bytes 8..{8 + n}, the file has {size}")
        if n > MAX_HEADER_BYTES:
            raise FormatError(f"shard '{path}': header of {n:,} bytes is longer than safetensors allows "
                              f"({MAX_HEADER_BYTES:,})")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"shard '{path}': malformed safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise FormatError(f"shard '{path}': malformed safetensors header: not a JSON object")
    slots: dict[str, TensorSlot] = {}
    data_start = 8 + n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code = entry["dtype"]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
            if any(s < 0 for s in shape) or not isinstance(code, str):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"shard '{path}': tensor '{name}' has a malformed header entry") from None
        dtype = _ST_DTYPES.get(code)
        if dtype is None:
            raise FormatError(f"shard '{path}': tensor '{name}' has dtype {code!r}, which sparsecraft cannot read "
                              f"(known: {', '.join(sorted(_ST_DTYPES))})")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if begin < 0 or end - begin != nbytes:
            raise FormatError(f"shard '{path}': tensor '{name}' spans bytes {begin}..{end} of the data but shape "
                              f"{list(shape)} in {code} needs {nbytes}")
        if data_start + end > size:
            raise FormatError(f"shard '{path}' is truncated: tensor '{name}' needs bytes {data_start + begin}.."
                              f"{data_start + end}, the file has {size}")
        slots[name] = TensorSlot(path, dtype, shape, data_start + begin, data_start + end)
    return slots, raw


class ShardedWeights:
    """The tensors of a Hugging Face folder (see the module docstring); build with :meth:`open`."""

    def __init__(self, folder: Path, index: Path | None, slots: dict[str, TensorSlot], headers: dict[Path, bytes]):
        self.folder = folder
        self.index = index
        self.slots = slots
        self._headers = headers

    @classmethod
    def open(cls, folder: str | Path) -> "ShardedWeights":
        """Check the folder's index and every shard header; reads no tensor data."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FormatError(f"'{folder}' is not a folder")
        index = folder / INDEX_FILE
        if index.is_file():
            weight_map = _read_index(index)
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (folder / name).is_file():
                    first = next(t for t, s in weight_map.items() if s == name)
                    raise FormatError(f"shard '{folder / name}' is missing (the index '{index}' names it for "
                                      f"tensor '{first}')")
        elif (folder / SINGLE_FILE).is_file():
            weight_map, files, index = None, [SINGLE_FILE], None
        else:
            raise FormatError(f"'{folder}' holds neither {SINGLE_FILE} nor {INDEX_FILE}: streaming needs "
                              "safetensors weights")
        headers: dict[Path, bytes] = {}
        per_file: dict[str, dict[str, TensorSlot]] = {}
        for name in files:
            per_file[name], headers[folder / name] = _read_header(folder / name)
        if weight_map is None:
            slots = per_file[SINGLE_FILE]
        else:
            slots = {}
            for tensor, shard in weight_map.items():
                slot = per_file[shard].get(tensor)
                if slot is None:
                    raise FormatError(f"'{index}' names tensor '{tensor}' in shard '{folder / shard}', which does "
                                      "not hold it")
                slots[tensor] = slot
        return cls(folder, index, slots, headers)

    def nbytes(self, names=None) -> int:
        """Bytes of the tensors ``names`` (all when None) as stored."""
        return sum(self.slots[n].nbytes for n in (self.slots if names is None else names))

    def fingerprint(self) -> dict:
        """What identifies this input for a resumed run: SHA-256 of ``config.json`` and of the
        index file, and per shard its size, modification time (ns) and the SHA-256 of its
        header. Tensor bytes are not hashed (that would read the whole model); a shard
        rewritten in place changes its modification time."""
        shards = {}
        for path, raw in sorted(self._headers.items()):
            st = path.stat()
            shards[path.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                 "header_sha256": hashlib.sha256(raw).hexdigest()}
        config = self.folder / "config.json"
        return {"config_sha256": _sha256_file(config) if config.is_file() else None,
                "index_sha256": _sha256_file(self.index) if self.index is not None else None,
                "shards": shards}

    def read(self, names) -> dict[str, torch.Tensor]:
        """The tensors ``names`` read from their shards (memory-mapped), each checked against
        the dtype and shape its header gave when the folder was opened."""
        from safetensors import SafetensorError, safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            try:
                by_file.setdefault(self.slots[name].file, []).append(name)
            except KeyError:
                raise FormatError(f"'{self.folder}': no tensor '{name}' in the model's shards") from None
        out: dict[str, torch.Tensor] = {}
        for file, wanted in by_file.items():
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for name in wanted:
                        out[name] = f.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise FormatError(f"shard '{file}' cannot be read: {e}") from None
            for name in wanted:
                slot, t = self.slots[name], out[name]
                if t.dtype != slot.dtype or tuple(t.shape) != slot.shape:
                    raise FormatError(f"shard '{file}': tensor '{name}' changed since the folder was checked "
                                      f"({t.dtype} {tuple(t.shape)}, expected {slot.dtype} {slot.shape})")
        return out
