"""Issue 12, files and loading: nothing a file says is used before it is checked.

Each test reproduces one defect of the issue (numbers in the test names' comments): silent
fallbacks to random weights (1), sizes from a file deciding allocations (3), the header's
class name calling any transformers callable (4), metadata outside the checksums (5), and the
smaller file defects (10: extra_files names, folder mode, torch.save of pruned models, the
inferred pattern), plus ``describe`` and the checkpoint/resize import cycle.
"""

from __future__ import annotations

import io
import json
import os
import resource
import stat
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparsecraft as sc
from sparsecraft import FormatError, models
from sparsecraft.checkpoint import describe as describe_checkpoint
from sparsecraft.formats import decode, describe, read_tensors
from sparsecraft.formats import io as fio

from conftest import SmallCNN


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def rewrite_header(file, mutate, rehash: bool = True) -> None:
    """Change the sparsecraft header of ``file`` in place with ``mutate(header)``.

    With ``rehash`` the header checksum is recomputed, as anyone who can write the file can:
    the checks below must hold even then (checksums are not signatures).
    """
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    st = json.loads(data[8 : 8 + n])
    header = json.loads(st["__metadata__"]["sparsecraft"])
    mutate(header)
    if rehash and hasattr(fio, "_header_sha256"):
        header["header_sha256"] = fio._header_sha256(header)
    st["__metadata__"]["sparsecraft"] = json.dumps(header)
    raw = json.dumps(st).encode()
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


@pytest.fixture
def llama_ckpt(tmp_path):
    model = _tiny_llama()
    sc.prune_(model, sc.Magnitude(sparsity=0.5), progress=False).finalize_()
    return model, sc.save(model, tmp_path / "llama")


# ----------------------------------------------------------------------------- defect 1


def _flip_in_header(file, needle: bytes, offset: int = 0) -> None:
    data = bytearray(file.read_bytes())
    n = int.from_bytes(data[:8], "little")
    at = bytes(data[8 : 8 + n]).index(needle) + 8 + offset
    data[at] ^= 0x01
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("where", [
    (b'\\"encoding\\"', 3),        # inside the sparsecraft JSON: a changed key
    (b'\\"sha256\\": \\"', 14),    # a checksum character: valid JSON, changed value
    (b'"sparsecraft"', 1),          # the metadata key itself: the header no longer has it
    (b'{', 0),                      # the safetensors JSON: not JSON any more
], ids=["key", "value", "metadata-key", "outer-json"])
def test_damaged_checkpoint_never_falls_back_to_transformers(llama_ckpt, where):
    """1: a folder with config.json and a damaged sparsecraft header must not load as a
    Hugging Face folder (transformers would initialise the unreadable tensors at random)."""
    _, path = llama_ckpt
    _flip_in_header(path / "model.safetensors", *where)
    with pytest.raises(FormatError, match="model.safetensors"):
        models.load(str(path))


def test_newer_format_version_is_refused_not_reinterpreted(llama_ckpt):
    _, path = llama_ckpt
    rewrite_header(path / "model.safetensors", lambda h: h.update(version=99))
    with pytest.raises(FormatError, match="version 99"):
        models.load(str(path))


def test_hugging_face_folder_with_missing_weights_is_refused(tiny_llama_dir):
    """1: transformers' MISSING report is an error, not a log line."""
    file = tiny_llama_dir / "model.safetensors"
    state = load_file(file)
    del state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(FormatError, match="missing keys: model.layers.0.mlp.up_proj.weight"):
        models.load(str(tiny_llama_dir))


def test_hugging_face_folder_with_unexpected_weights_is_refused(tiny_llama_dir):
    file = tiny_llama_dir / "model.safetensors"
    state = load_file(file)
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(2, 2)
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(FormatError, match="unexpected keys: model.layers.0.mlp.extra.weight"):
        models.load(str(tiny_llama_dir))


def test_intact_folders_still_load(llama_ckpt, tiny_llama_dir):
    model, path = llama_ckpt
    loaded, _ = models.load(str(path))
    ids = torch.randint(0, 64, (1, 8))
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    hf, _ = models.load(str(tiny_llama_dir))
    assert type(hf).__name__ == "LlamaForCausalLM"


# ----------------------------------------------------------------------------- defect 3


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_huge_config_fails_fast_without_allocating(llama_ckpt):
    """3: a config with hidden_size=10^6 is compared on the meta device, never built."""
    _, path = llama_ckpt

    def huge(h):
        h["extra"]["model"]["config"].update(hidden_size=10**6, intermediate_size=10**6)

    rewrite_header(path / "model.safetensors", huge)
    before, t0 = _peak_rss_mb(), time.perf_counter()
    with pytest.raises(FormatError, match="shape"):
        sc.load(path)
    assert time.perf_counter() - t0 < 10
    assert _peak_rss_mb() - before < 200  # the real model would need terabytes


def test_huge_layer_count_is_refused_before_building(llama_ckpt):
    _, path = llama_ckpt
    rewrite_header(path / "model.safetensors",
                   lambda h: h["extra"]["model"]["config"].update(num_hidden_layers=10**9))
    t0 = time.perf_counter()
    with pytest.raises(FormatError, match="num_hidden_layers"):
        sc.load(path)
    assert time.perf_counter() - t0 < 10


def _csr_file(path, shape):
    """A file whose one csr tensor claims ``shape`` but holds nothing (a few bytes)."""
    empty = torch.zeros(0, dtype=torch.float32)
    comps = {"crow_indices": torch.zeros(shape[0] + 1, dtype=torch.uint8),
             "col_indices": torch.zeros(0, dtype=torch.int64), "values": empty}
    entry = {"shape": list(shape), "dtype": "float32", "encoding": "csr", "nm": None,
             "pattern": "unstructured", "sparsity": 1.0, "nnz": 0, "nbytes": 0,
             "components": {c: f"w::{c}" for c in comps},
             "component_sha256": {c: fio._sha256(v) for c, v in comps.items()},
             "sha256": "0" * 64}
    header = {"format": "sparsecraft", "version": fio.FORMAT_VERSION, "tensors": {"w": entry}, "extra": {}}
    if hasattr(fio, "_header_sha256"):
        header["header_sha256"] = fio._header_sha256(header)
    save_file({f"w::{c}": v for c, v in comps.items()}, path,
              metadata={"format": "pt", "sparsecraft": json.dumps(header)})
    return path


def test_shape_claiming_a_trillion_elements_is_refused(tmp_path):
    """3: csr sizes do not bound the column count; the memory check does, before np.zeros."""
    path = _csr_file(tmp_path / "huge.safetensors", (1, 10**12))
    assert path.stat().st_size < 2000
    with pytest.raises(FormatError, match=r"would need about .* of memory \([\d,]+ bytes\)") as err:
        read_tensors(path)
    assert int(str(err.value).split(" of memory (")[1].split()[0].replace(",", "")) >= 4 * 10**12
    comps = {"crow_indices": torch.zeros(2, dtype=torch.uint8),
             "col_indices": torch.zeros(0, dtype=torch.int64), "values": torch.zeros(0)}
    with pytest.raises(FormatError, match="would need"):
        decode(comps, "csr", (1, 10**12), torch.float32)


@pytest.mark.parametrize("case", ["bitmask", "nm", "negative"])
def test_component_sizes_must_fit_the_shape(case):
    comps = {"mask": torch.zeros(1, dtype=torch.uint8), "values": torch.zeros(0)}
    with pytest.raises(FormatError):
        if case == "bitmask":  # one mask byte cannot describe 10^12 elements
            decode(comps, "bitmask", (10**12,), torch.float32)
        elif case == "nm":
            decode({"values": torch.zeros(2), "indices": torch.zeros(1, dtype=torch.uint8)},
                   "nm", (1, 10**12), torch.float32, nm=(1, 10**6))
        else:
            decode({"values": torch.zeros(8)}, "dense", (-2, -4), torch.float32)


def test_recorded_shapes_are_bounded_before_allocating(tmp_path, cnn):
    """3: apply_shapes_ allocates only shapes no larger than the model's own."""
    from sparsecraft.structured import apply_shapes_

    with pytest.raises(FormatError, match="larger than the model's"):
        apply_shapes_(cnn, {"fc": {"tensors": {"weight": [10**6, 10**6]}, "attrs": {}}})
    with pytest.raises(FormatError, match="bad shape"):
        apply_shapes_(cnn, {"fc": {"tensors": {"weight": [-1, 4]}, "attrs": {}}})
    assert cnn.fc.weight.shape == (64, 128)


# ----------------------------------------------------------------------------- defect 4


@pytest.mark.parametrize("name", ["pipeline", "Trainer", "set_seed", "PreTrainedModel", "AutoModel"])
def test_header_class_must_be_an_allowed_model_class(llama_ckpt, name, monkeypatch):
    import transformers

    called = []
    monkeypatch.setattr(transformers, "set_seed", lambda *a, **k: called.append(a))
    _, path = llama_ckpt
    rewrite_header(path / "model.safetensors", lambda h: h["extra"]["model"].update({"class": name}))
    with pytest.raises(FormatError, match=f"model.class = '{name}'"):
        sc.load(path)
    assert not called


def test_header_class_and_config_type_must_agree(llama_ckpt):
    _, path = llama_ckpt
    rewrite_header(path / "model.safetensors", lambda h: h["extra"]["model"].update({"class": "BertModel"}))
    with pytest.raises(FormatError, match="BertModel does not take a LlamaConfig"):
        sc.load(path)


# ----------------------------------------------------------------------------- defect 5


def test_aliases_are_covered_by_the_header_checksum(tmp_path, cnn):
    """5: re-tying bn1.bias to bn1.weight by editing the header is caught."""
    path = sc.save(cnn, tmp_path / "c.safetensors")

    def retie(h):
        del h["tensors"]["bn1.bias"]
        h["extra"]["aliases"]["bn1.bias"] = "bn1.weight"

    rewrite_header(path, retie, rehash=False)
    with pytest.raises(FormatError, match="header checksum mismatch"):
        sc.load(path, model=SmallCNN())


@pytest.mark.parametrize("alias,target,match", [
    ("conv1.bias", "fc.weight", "cannot share"),          # other shape
    ("no.such.weight", "fc.weight", "does not fit"),       # not a model key
    ("fc.bias", "no.such.weight", "missing tensor"),       # target not stored
    ("fc.weight", "classifier.weight", "also a stored"),   # shadows a stored tensor
])
def test_aliases_are_validated(tmp_path, cnn, alias, target, match):
    path = sc.save(cnn, tmp_path / "c.safetensors")

    def edit(h):
        if alias in h["tensors"] and match != "also a stored":
            del h["tensors"][alias]
        h["extra"]["aliases"][alias] = target

    rewrite_header(path, edit)
    with pytest.raises(FormatError, match=match):
        sc.load(path, model=SmallCNN())


@pytest.mark.parametrize("attrs,match", [
    ({"forward": 1}, "not a known size attribute"),
    ({"training": True}, "not a known size attribute"),
    ({"in_features": "128"}, "must be an int"),
    ({"in_features": 10**12}, "must be an int"),
    ({"in_features": True}, "must be an int"),
])
def test_shape_record_attributes_are_allow_listed(tmp_path, cnn, attrs, match):
    path = sc.save(cnn, tmp_path / "c.safetensors")
    rewrite_header(path, lambda h: h["extra"].update(shapes={"fc": {"tensors": {}, "attrs": attrs}}))
    fresh = SmallCNN()
    with pytest.raises(FormatError, match=match):
        sc.load(path, model=fresh)
    assert fresh.fc.forward.__self__ is fresh.fc and fresh.fc.in_features == 128


def test_shape_record_must_match_stored_tensors(tmp_path, cnn):
    path = sc.save(cnn, tmp_path / "c.safetensors")
    rewrite_header(path, lambda h: h["extra"].update(
        shapes={"fc": {"tensors": {"weight": [32, 128]}, "attrs": {"out_features": 32}}}))
    fresh = SmallCNN()
    with pytest.raises(FormatError, match="differs from the stored"):
        sc.load(path, model=fresh)
    assert fresh.fc.weight.shape == (64, 128)  # nothing resized before the refusal


def test_version_1_files_are_refused_with_a_reason(tmp_path, cnn):
    path = sc.save(cnn, tmp_path / "c.safetensors")

    def v1(h):
        h["version"] = 1
        h.pop("header_sha256", None)

    rewrite_header(path, v1, rehash=False)
    with pytest.raises(FormatError, match="version 1 is no longer read.*save the model again"):
        sc.load(path, model=SmallCNN())


# ----------------------------------------------------------------------------- defect 10


@pytest.mark.parametrize("name", ["../escape.txt", "/tmp/abs.txt", "sub/x.txt", "..", "",
                                  "model.safetensors", "config.json", ".hidden"])
def test_extra_file_names_must_be_plain(tmp_path, cnn, name):
    with pytest.raises(FormatError, match="extra_files"):
        sc.save(cnn, tmp_path / "ckpt", extra_files={name: "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert not (tmp_path.parent / "escape.txt").exists()


def test_extra_files_are_written(tmp_path, cnn):
    path = sc.save(cnn, tmp_path / "ckpt", extra_files={"report.json": "{}"})
    assert (path / "report.json").read_text() == "{}"


def test_checkpoint_folder_gets_the_umask_mode(tmp_path, cnn):
    path = sc.save(cnn, tmp_path / "ckpt")
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~fio._UMASK


def test_pruned_model_can_be_torch_saved_whole(cnn):
    state = sc.prune_(cnn, sc.Magnitude(sparsity=0.5), progress=False)
    for _ in range(2):  # with the state open, then finalized
        buf = io.BytesIO()
        torch.save(cnn, buf)
        buf.seek(0)
        again = torch.load(buf, weights_only=False)
        assert torch.equal(again.conv2.weight, cnn.conv2.weight)
        assert sc.get_meta(again) == sc.get_meta(cnn)
        if not state.finalized:
            state.finalize_()


def test_untouched_tensor_with_zeros_is_not_called_pruned(tmp_path, cnn):
    with torch.no_grad():
        cnn.fc.weight[:, :5] = 0.0  # a few zeros nobody pruned
    sc.prune_(cnn, sc.Magnitude(sparsity=0.5, targets={"include": ["conv2"]}), progress=False).finalize_()
    path = sc.save(cnn, tmp_path / "c.safetensors")
    header = sc.formats.read_header(path)
    fc = header["tensors"]["fc.weight"]
    assert fc["pattern"] == "dense" and fc["sparsity"] == pytest.approx(5 / 128)
    assert header["tensors"]["conv2.weight"]["pattern"] == "unstructured"
    assert "conv2.weight" in sc.get_meta(sc.load(path, model=SmallCNN()))
    assert "fc.weight" not in sc.get_meta(sc.load(path, model=SmallCNN()))


# ----------------------------------------------------------------------------- describe, cycle


def test_describe_lists_stored_and_dense_bytes(tmp_path, cnn):
    sc.prune_(cnn, sc.Magnitude(sparsity=0.9), progress=False).finalize_()
    path = sc.save(cnn, tmp_path / "ckpt")
    text = describe(path)
    assert text == describe_checkpoint(path)
    header = sc.formats.read_header(path / "model.safetensors")
    lines = text.splitlines()
    assert lines[1].split() == ["tensor", "shape", "dtype", "encoding", "pattern", "sparsity",
                                "stored", "B", "dense", "B"]
    row = next(line for line in lines if line.startswith("fc.weight "))
    entry = header["tensors"]["fc.weight"]
    assert row.split()[1:5] == ["64x128", "float32", entry["encoding"], "unstructured"]
    assert row.split()[-2:] == [f"{entry['nbytes']:,}", f"{64 * 128 * 4:,}"]
    stored = sum(e["nbytes"] for e in header["tensors"].values())
    dense = sum(p.numel() * 4 for p in cnn.state_dict().values() if p.dtype == torch.float32) + 8
    size = (path / "model.safetensors").stat().st_size
    assert lines[-1].startswith(f"total: stored {stored:,} bytes")
    assert f"dense {dense:,} bytes" in lines[-1] and f"ratio {stored / dense:.3f}" in lines[-1]
    assert f"file {size:,} bytes" in lines[-1]
    assert len(lines) == 2 + len(header["tensors"]) + 1


def test_resize_does_not_import_checkpoint():
    """7: structured.resize and checkpoint no longer import each other."""
    code = ("import sys, sparsecraft.structured.resize as r, sparsecraft.shapes as s; "
            "assert r.SHAPES_ATTR == s.SHAPES_ATTR; "
            "assert 'sparsecraft.checkpoint' not in sys.modules, 'checkpoint imported'")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
