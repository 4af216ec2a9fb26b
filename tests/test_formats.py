"""Tests for sparsecraft.formats: encodings (pure tensor math) and the safetensors file layer."""

from __future__ import annotations

import json
import math
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsecraft.errors import ConfigError, FormatError
from sparsecraft.formats import (
    ENCODINGS,
    choose_encoding,
    decode,
    encode,
    encoded_nbytes,
    is_nm,
    read_header,
    read_tensors,
    theoretical_nbytes,
    write_tensors,
)
from sparsecraft.formats import io as fio

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(_INT[t.element_size()])


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


def unstructured(shape, sparsity, dtype, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    t[t == 0] = 1.0  # keep the zero count exact
    flat = t.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[: round(sparsity * flat.numel())]] = 0
    return t.to(dtype)


def nm_tensor(shape, n, m, dtype, seed=0) -> torch.Tensor:
    """Exactly n non-zeros per group of m along the 2-D view's last dim."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    t[t == 0] = 1.0
    groups = t.reshape(t.shape[0], -1, m)
    drop = torch.rand(groups.shape, generator=g).argsort(-1)[..., : m - n]
    groups.scatter_(-1, drop, 0.0)
    return t.to(dtype)


def with_specials(t: torch.Tensor) -> torch.Tensor:
    """Put -0.0 on some zeros and NaNs with payloads on some non-zeros."""
    t = t.clone()
    flat = t.view(-1)
    zeros = (flat == 0).nonzero().squeeze(1)
    flat[zeros[::3]] = -0.0
    nonzeros = (flat != 0).nonzero().squeeze(1)
    nan_bits = {torch.float32: 0x7FC00123, torch.float16: 0x7E01, torch.bfloat16: 0x7FC1}
    b = bits(t)
    b[nonzeros[:2]] = nan_bits[t.dtype]
    b[nonzeros[2:3]] = nan_bits[t.dtype] | (-(1 << (8 * t.element_size() - 1)))  # negative NaN
    return t


def component_nbytes(comps: dict[str, torch.Tensor]) -> int:
    return sum(c.numel() * c.element_size() for c in comps.values())


# (case name, builder(dtype) -> tensor, N:M that applies or None)
CASES = [
    ("unstructured50", lambda dt: unstructured((48, 64), 0.5, dt), None),
    ("unstructured90", lambda dt: unstructured((48, 64), 0.9, dt), None),
    ("nm2:4", lambda dt: nm_tensor((32, 64), 2, 4, dt), (2, 4)),
    ("nm1:4", lambda dt: nm_tensor((32, 64), 1, 4, dt), (1, 4)),
    ("nm1:8", lambda dt: nm_tensor((32, 64), 1, 8, dt), (1, 8)),
    ("nm2:8", lambda dt: nm_tensor((32, 64), 2, 8, dt), (2, 8)),
    ("nm4:8", lambda dt: nm_tensor((32, 64), 4, 8, dt), (4, 8)),
    ("conv2:4", lambda dt: nm_tensor((8, 4, 3, 3), 2, 4, dt), (2, 4)),
    ("conv_unstructured", lambda dt: unstructured((6, 5, 3, 3), 0.7, dt), None),
    ("all_zero", lambda dt: torch.zeros(16, 32, dtype=dt), (2, 4)),
    ("all_negzero", lambda dt: torch.full((16, 32), -0.0, dtype=dt), (2, 4)),
    ("dense", lambda dt: unstructured((16, 32), 0.0, dt), None),
    ("specials_unstructured", lambda dt: with_specials(unstructured((40, 24), 0.6, dt)), None),
    ("specials_2:4", lambda dt: with_specials(nm_tensor((16, 32), 2, 4, dt)), (2, 4)),
    # groups with fewer than N non-zeros: padding positions hold +0.0 or -0.0
    ("short_groups_2:4", lambda dt: with_specials(nm_tensor((16, 32), 1, 4, dt)), (2, 4)),
    ("vector", lambda dt: unstructured((100,), 0.5, dt), None),
    ("scalar", lambda dt: torch.tensor(-0.0, dtype=dt), None),
    ("empty", lambda dt: torch.zeros(0, 8, dtype=dt), (2, 4)),
]


def _roundtrip_params():
    for case, build, nm in CASES:
        for enc in ENCODINGS:
            if enc == "nm" and nm is None:
                continue
            yield pytest.param(case, build, enc, nm, id=f"{case}-{enc}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case,build,encoding,nm", list(_roundtrip_params()))
def test_roundtrip_bit_exact_and_nbytes(case, build, encoding, nm, dtype):
    t = build(dtype)
    kw = {"nm": nm} if encoding == "nm" else {}
    comps = encode(t, encoding, **kw)
    for c in comps.values():
        assert c.device.type == "cpu" and c.is_contiguous()
    out = decode(comps, encoding, t.shape, t.dtype, **kw)
    assert_bit_equal(out, t)
    assert encoded_nbytes(t, encoding, **kw) == component_nbytes(comps)
    assert decode(comps, encoding, list(t.shape), str(t.dtype), **kw).dtype == t.dtype
    # zeros (of either sign) are never stored as values, except as N:M padding
    if encoding in ("bitmask", "csr"):
        assert comps["values"].numel() == int(torch.count_nonzero(t))
    if encoding != "dense":
        has_negzero = bool((bits(t) == bits(torch.tensor(-0.0, dtype=dtype))).any())
        assert ("negzero" in comps) == has_negzero


def test_known_layouts():
    t = torch.tensor([[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 4.0]])
    c = encode(t, "bitmask")
    assert c["mask"].tolist() == [0b10011010]  # little-endian bit order
    assert c["values"].tolist() == [1.5, -2.0, 3.0, 4.0]
    c = encode(t, "nm", nm=(2, 4))
    assert c["values"].tolist() == [[1.5, -2.0, 3.0, 4.0]]
    # positions 1, 3, 0, 3 at 2 bits each, little-endian: 01 11 00 11 -> 0b11001101
    assert c["indices"].tolist() == [0b11_00_11_01]
    c = encode(t.reshape(2, 4), "csr")
    assert c["crow_indices"].tolist() == [0, 2, 4] and c["crow_indices"].dtype == torch.uint8
    assert c["col_indices"].tolist() == [1, 3, 0, 3] and c["col_indices"].dtype == torch.uint8
    # short group: 1 non-zero in a 2:4 group is padded with the lowest zero position
    c = encode(torch.tensor([[0.0, 0.0, 5.0, 0.0]]), "nm", nm=(2, 4))
    assert c["values"].tolist() == [[0.0, 5.0]]
    assert c["indices"].tolist() == [0b10_00]
    # -0.0: not stored as a value, its sign is kept
    c = encode(torch.tensor([0.0, -0.0, 1.0, -0.0]), "bitmask")
    assert c["values"].tolist() == [1.0] and c["negzero"].tolist() == [0b110]


def test_csr_index_dtypes():
    assert encode(torch.ones(2, 300), "csr")["col_indices"].dtype == torch.int16
    assert encode(torch.ones(2, 300), "csr")["crow_indices"].dtype == torch.int16
    wide = torch.zeros(1, 40000)
    wide[0, 39999] = 1.0
    c = encode(wide, "csr")
    assert c["col_indices"].dtype == torch.int32 and c["col_indices"].tolist() == [39999]
    assert_bit_equal(decode(c, "csr", wide.shape, wide.dtype), wide)


def test_nm_applies_along_reduction_dim_of_conv():
    w = nm_tensor((8, 4, 3, 3), 2, 4, torch.float32)  # groups run over in*kh*kw = 36
    assert is_nm(w, 2, 4)
    assert not is_nm(w.permute(1, 0, 2, 3).contiguous(), 2, 4)
    assert encode(w, "nm", nm=(2, 4))["values"].shape == (8, 18)


def test_is_nm():
    t = nm_tensor((16, 32), 2, 4, torch.float16)
    assert is_nm(t, 2, 4) and is_nm(t, 4, 8) and is_nm(t, 3, 4)
    assert not is_nm(t, 1, 4)
    assert not is_nm(torch.ones(4, 6), 2, 4)  # 6 not divisible by 4
    t[0, 0] = t[0, 1] = t[0, 2] = 1.0
    assert not is_nm(t, 2, 4)
    for bad in [(4, 4), (0, 4), (5, 4)]:
        with pytest.raises(ConfigError):
            is_nm(t, *bad)


def test_bad_encoding_inputs():
    t = unstructured((8, 8), 0.5, torch.float32)
    with pytest.raises(FormatError, match="dense, bitmask, csr, nm"):
        encode(t, "coo")
    with pytest.raises(FormatError, match="unknown encoding"):
        encoded_nbytes(t, "zip")
    with pytest.raises(FormatError, match="unknown encoding"):
        decode({"values": t}, "coo", t.shape, t.dtype)
    with pytest.raises(FormatError, match="more than 2 non-zeros"):
        encode(torch.ones(4, 8), "nm", nm=(2, 4))
    with pytest.raises(FormatError, match="not divisible by M=4"):
        encode(torch.zeros(4, 6), "nm", nm=(2, 4))
    with pytest.raises(FormatError, match="not divisible"):
        encoded_nbytes(torch.zeros(4, 6), "nm", nm=(2, 4))
    with pytest.raises(FormatError, match="needs nm"):
        encode(t, "nm")
    with pytest.raises(ConfigError):
        encode(torch.zeros(4, 8), "nm", nm=(4, 4))
    with pytest.raises(FormatError):
        encode([1.0, 2.0], "dense")
    # inconsistent components are rejected, not silently misread
    comps = encode(t, "bitmask")
    comps["values"] = comps["values"][:-1]
    with pytest.raises(FormatError, match="values"):
        decode(comps, "bitmask", t.shape, t.dtype)
    comps = encode(t, "csr")
    comps["col_indices"] = comps["col_indices"].clone().fill_(0)
    with pytest.raises(FormatError, match="repeats"):
        decode(comps, "csr", t.shape, t.dtype)


def _sizes(t, nm=None):
    sizes = {e: encoded_nbytes(t, e) for e in ("dense", "bitmask", "csr")}
    if nm:
        sizes["nm"] = encoded_nbytes(t, "nm", nm=nm)
    return sizes


def test_choose_encoding():
    t24 = nm_tensor((64, 128), 2, 4, torch.float16)
    assert choose_encoding(t24) == ("nm", {"nm": (2, 4)})
    assert choose_encoding(t24, nm_hint=(2, 4)) == ("nm", {"nm": (2, 4)})
    # 1:8 also satisfies 1:4; the smaller packing wins
    assert choose_encoding(nm_tensor((64, 128), 1, 8, torch.float32)) == ("nm", {"nm": (1, 8)})

    u50 = unstructured((256, 512), 0.5, torch.float32)
    u90 = unstructured((256, 512), 0.9, torch.float32)
    u98 = unstructured((256, 512), 0.98, torch.float32)
    narrow90 = unstructured((256, 200), 0.9, torch.float16)  # uint8 column indices
    for t, want in [(u50, "bitmask"), (u90, "bitmask"), (u98, "csr"), (narrow90, "csr")]:
        sizes = _sizes(t)
        assert min(sizes, key=sizes.get) == want, sizes
        assert choose_encoding(t) == (want, {})
    # a hint that does not apply falls back to the other encodings
    assert choose_encoding(u50, nm_hint=(2, 4)) == ("bitmask", {})
    assert choose_encoding(unstructured((64, 64), 0.0, torch.bfloat16)) == ("dense", {})
    assert choose_encoding(torch.randn(64)) == ("dense", {})
    assert choose_encoding(torch.zeros(0, 4)) == ("dense", {})
    assert choose_encoding(u90) == choose_encoding(u90.clone())


def test_theoretical_nbytes():
    shape, n = (64, 128), 64 * 128
    assert theoretical_nbytes(shape, torch.float16, "dense", nnz=n) == 2 * n
    assert theoretical_nbytes(shape, torch.float16, "bitmask", nnz=n // 2) == n / 8 + n
    assert theoretical_nbytes(shape, "float32", "nm", nnz=n // 2, nm=(2, 4)) == n / 2 * 4 + n / 2 * 2 / 8
    csr = theoretical_nbytes(shape, torch.float32, "csr", nnz=100)
    assert csr == (65 * math.ceil(math.log2(101)) + 100 * 7) / 8 + 400
    t = nm_tensor(shape, 2, 4, torch.float16)
    # 2:4 at byte granularity has no rounding loss
    assert encoded_nbytes(t, "nm", nm=(2, 4)) == theoretical_nbytes(shape, t.dtype, "nm", n // 2, nm=(2, 4))


# ----------------------------------------------------------------------------- files


def sample_tensors():
    return {
        "model.layers.0.mlp.up_proj.weight": nm_tensor((32, 64), 2, 4, torch.float16, seed=1),
        "model.layers.0.mlp.down_proj.weight": unstructured((64, 32), 0.5, torch.float32, seed=2),
        "model.layers.0.self_attn.q_proj.weight": unstructured((32, 32), 0.97, torch.bfloat16, seed=3),
        "model.layers.0.input_layernorm.weight": torch.randn(32),
        "model.special": with_specials(unstructured((16, 16), 0.5, torch.float32, seed=4)),
        "model.zeros": torch.zeros(8, 16, dtype=torch.float16),
        "model.empty": torch.zeros(0, 4),
    }


def test_file_roundtrip(tmp_path):
    path = tmp_path / "m.safetensors"
    src = sample_tensors()
    info = {"model.layers.0.mlp.up_proj.weight": {"pattern": "2:4", "sparsity": 0.5, "layer": 0}}
    extra = {"model_class": "LlamaForCausalLM", "config": {"hidden": 32}}
    header = write_tensors(path, src, info=info, extra=extra)
    tensors, infos, got_extra = read_tensors(path)
    assert list(tensors) == list(src)
    for name, t in src.items():
        assert_bit_equal(tensors[name], t)
    assert got_extra == extra
    assert read_header(path) == header
    up = infos["model.layers.0.mlp.up_proj.weight"]
    assert (up["encoding"], up["nm"], up["pattern"]) == ("nm", [2, 4], "2:4")
    assert up["sparsity"] == 0.5 and up["target_sparsity"] == 0.5 and up["attrs"] == {"layer": 0}
    assert infos["model.layers.0.mlp.down_proj.weight"]["encoding"] == "bitmask"
    assert infos["model.layers.0.self_attn.q_proj.weight"]["encoding"] == "csr"
    assert infos["model.layers.0.input_layernorm.weight"]["pattern"] == "dense"
    # stays a valid safetensors file: components load with the plain loader
    plain = load_file(path)
    for name, t in src.items():
        entry = header["tensors"][name]
        comps = encode(t, entry["encoding"], **({"nm": tuple(entry["nm"])} if entry["nm"] else {}))
        assert set(entry["components"]) == set(comps)
        for c, key in entry["components"].items():
            assert torch.equal(bits(plain[key]), bits(comps[c]))
    assert plain["model.layers.0.input_layernorm.weight"].shape == (32,)  # dense keeps its name
    # decoded tensors own their memory (no mmap of a closed file)
    for t in tensors.values():
        t.add_(0)


def test_file_explicit_encodings_and_tied_tensors(tmp_path):
    w = unstructured((16, 16), 0.5, torch.float16)
    src = {"a": w, "b": w, "c": w[:8], "d": nm_tensor((8, 8), 2, 4, torch.float32)}
    path = tmp_path / "m.safetensors"
    header = write_tensors(path, src, info={"d": {"nm": (2, 4)}},
                           encoding={"a": "dense", "b": "dense", "c": "csr", "d": "nm"})
    assert [header["tensors"][k]["encoding"] for k in "abcd"] == ["dense", "dense", "csr", "nm"]
    got, _, _ = read_tensors(path)
    for k, t in src.items():
        assert_bit_equal(got[k], t)
    for enc in ENCODINGS[:3]:
        write_tensors(path, {"x": w}, encoding=enc, overwrite=True)
        assert read_header(path)["tensors"]["x"]["encoding"] == enc
        assert_bit_equal(read_tensors(path)[0]["x"], w)


def _layout(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        st = json.loads(f.read(n))
    return st, 8 + n


def test_truncated_file_names_tensor(tmp_path):
    path = tmp_path / "m.safetensors"
    header = write_tensors(path, sample_tensors())
    data = path.read_bytes()
    st, start = _layout(path)
    # last byte each logical tensor needs
    ends = {name: max(start + st[k]["data_offsets"][1] for k in e["components"].values())
            for name, e in header["tensors"].items()}
    cuts = sorted({len(data) - 1, len(data) - 100, start + 1, start + 700, start + 3000, start})
    cut_path = tmp_path / "cut.safetensors"
    for cut in cuts:
        cut_path.write_bytes(data[:cut])
        victims = [n for n, end in ends.items() if end > cut]
        assert victims
        with pytest.raises(FormatError, match="is truncated") as ei:
            read_tensors(cut_path)
        assert f"tensor '{victims[0]}'" in str(ei.value)
        assert f"file has {cut}" in str(ei.value)
    for cut in (0, 5, 8, start - 1):
        cut_path.write_bytes(data[:cut])
        with pytest.raises(FormatError, match="truncated header"):
            read_tensors(cut_path)
        with pytest.raises(FormatError, match="truncated header"):
            read_header(cut_path)


def test_flipped_byte_names_tensor(tmp_path):
    path = tmp_path / "m.safetensors"
    header = write_tensors(path, sample_tensors())
    data = path.read_bytes()
    st, start = _layout(path)
    bad = tmp_path / "bad.safetensors"
    for name, entry in header["tensors"].items():
        for key in entry["components"].values():
            a, b = st[key]["data_offsets"]
            if b == a:
                continue
            altered = bytearray(data)
            altered[start + (a + b) // 2] ^= 0x10
            bad.write_bytes(bytes(altered))
            with pytest.raises(FormatError, match="checksum mismatch") as ei:
                read_tensors(bad)
            assert f"tensor '{name}'" in str(ei.value) and "altered" in str(ei.value)


def rewrite_header(data: bytes, mutate, rehash: bool = True) -> bytes:
    """``data`` with its sparsecraft header changed by ``mutate(header)``; by default the header
    checksum is recomputed, as anyone able to write the file can (checksums are not signatures)."""
    n = int.from_bytes(data[:8], "little")
    st = json.loads(data[8 : 8 + n])
    header = json.loads(st["__metadata__"]["sparsecraft"])
    mutate(header)
    if rehash:
        header["header_sha256"] = fio._header_sha256(header)
    st["__metadata__"]["sparsecraft"] = json.dumps(header)
    raw = json.dumps(st).encode()
    return len(raw).to_bytes(8, "little") + raw + data[8 + n :]


def test_altered_or_malformed_header(tmp_path):
    path = tmp_path / "m.safetensors"
    header = write_tensors(path, sample_tensors())
    data = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    name = "model.layers.0.mlp.down_proj.weight"
    old = header["tensors"][name]["sha256"]
    # any change to the sparsecraft header breaks the header checksum
    bad.write_bytes(data.replace(old.encode(), ("0" * 64).encode()))
    with pytest.raises(FormatError, match="header checksum mismatch"):
        read_tensors(bad)
    # a checksum rewritten together with the header checksum: the tensor check still fires
    bad.write_bytes(rewrite_header(data, lambda h: h["tensors"][name].update(sha256="0" * 64)))
    with pytest.raises(FormatError, match=f"checksum mismatch for tensor '{name}'"):
        read_tensors(bad)
    # a checksum removed from the metadata does not switch verification off
    bad.write_bytes(rewrite_header(data, lambda h: h["tensors"][name].pop("component_sha256")))
    with pytest.raises(FormatError, match="no checksum"):
        read_tensors(bad)
    bad.write_bytes(rewrite_header(data, lambda h: h.pop("header_sha256"), rehash=False))
    with pytest.raises(FormatError, match="no 'header_sha256'"):
        read_tensors(bad)
    # broken JSON
    altered = bytearray(data)
    altered[8] = ord("]")
    bad.write_bytes(bytes(altered))
    with pytest.raises(FormatError, match="malformed"):
        read_tensors(bad)
    # a plain safetensors file is not a sparsecraft file
    save_file({"x": torch.ones(2)}, bad)
    with pytest.raises(FormatError, match="not a sparsecraft file"):
        read_header(bad)
    # a newer format version is refused
    newer = dict(header, version=99)
    newer["header_sha256"] = fio._header_sha256(newer)
    save_file({"x": torch.ones(2)}, bad, metadata={"sparsecraft": json.dumps(newer)})
    with pytest.raises(FormatError, match="version 99"):
        read_tensors(bad)


def test_missing_file(tmp_path):
    for fn in (read_tensors, read_header):
        with pytest.raises(FormatError, match="no such file"):
            fn(tmp_path / "nope.safetensors")


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_existing_path_needs_overwrite(tmp_path):
    path = tmp_path / "m.safetensors"
    write_tensors(path, {"x": torch.zeros(4, 4)})
    before = _snapshot(tmp_path)
    with pytest.raises(FormatError, match="overwrite=True"):
        write_tensors(path, {"y": torch.ones(4, 4)})
    assert _snapshot(tmp_path) == before
    write_tensors(path, {"y": torch.ones(4, 4)}, overwrite=True)
    assert list(read_tensors(path)[0]) == ["y"]
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_bad_input_writes_nothing(tmp_path):
    path = tmp_path / "m.safetensors"
    write_tensors(path, {"x": torch.zeros(4, 4)})
    before = _snapshot(tmp_path)
    t = unstructured((8, 8), 0.5, torch.float32)
    bad_calls = [
        dict(tensors={"w": t}, encoding="zip"),
        dict(tensors={"w": t}, encoding="nm"),  # no N:M hint
        dict(tensors={"w": t}, encoding={"w": "nm"}, info={"w": {"pattern": "2:4"}}),  # not 2:4
        dict(tensors={"w": t}, extra={"bad": object()}),
        dict(tensors={"w": t}, info={"other": {}}),
        dict(tensors={"a::b": t}),
        dict(tensors={"w": [1.0]}),
    ]
    for kw in bad_calls:
        with pytest.raises((FormatError, ConfigError)):
            write_tensors(path, overwrite=True, **kw)
        assert _snapshot(tmp_path) == before, kw
    with pytest.raises(FormatError, match="tensor 'w'"):
        write_tensors(path, {"w": t}, encoding="nm", info={"w": {"nm": (2, 4)}}, overwrite=True)
    with pytest.raises(FormatError, match="does not exist"):
        write_tensors(tmp_path / "missing" / "m.safetensors", {"w": t})
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_failed_write_leaves_no_temp_file(tmp_path, monkeypatch, overwrite):
    path = tmp_path / "m.safetensors"
    if overwrite:
        write_tensors(path, {"x": torch.zeros(4, 4)})
    before = _snapshot(tmp_path)

    def half_write(filename, tensors, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fio, "_save_safetensors", half_write)
    with pytest.raises(FormatError, match="No space left"):
        write_tensors(path, {"w": torch.ones(8, 8)}, overwrite=overwrite)
    assert _snapshot(tmp_path) == before
    monkeypatch.undo()

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(FormatError, match="Input/output error"):
        write_tensors(path, {"w": torch.ones(8, 8)}, overwrite=overwrite)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("m", [2, 3, 4, 6, 8, 16])
def test_is_nm_matches_brute_force(m):
    """The byte-aligned lookup (M | 8 or 8 | M) and the generic scan agree with a plain count."""
    g = torch.Generator().manual_seed(m)
    for trial in range(20):
        t = torch.randn(6, 4 * m, generator=g)
        t[torch.rand(t.shape, generator=g) < 0.5 + 0.02 * trial] = 0.0
        t.view(-1)[:: 7] = -0.0  # signed zeros count as zeros
        counts = (t.reshape(6, -1, m) != 0).sum(-1)
        for n in range(1, m):
            assert is_nm(t, n, m) == bool((counts <= n).all()), (n, m, trial)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float8_e4m3fn, torch.int8, torch.int32, torch.bool],
                         ids=lambda d: str(d).split(".")[-1])
def test_other_dtypes_roundtrip(dtype, tmp_path):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(8, 16, generator=g) * 3).to(dtype)
    t.view(-1)[::3] = 0
    if dtype.is_floating_point:
        t.view(-1)[1::7] = -0.0
    for enc, kw in [("dense", {}), ("bitmask", {}), ("csr", {})]:
        comps = encode(t, enc, **kw)
        assert_bit_equal(decode(comps, enc, t.shape, t.dtype, **kw), t)
        assert encoded_nbytes(t, enc, **kw) == component_nbytes(comps)
    write_tensors(tmp_path / "x.safetensors", {"t": t})
    assert_bit_equal(read_tensors(tmp_path / "x.safetensors")[0]["t"], t)
