
import pytest
import torch

import sparsecraft as sc
from sparsecraft import FormatError

from conftest import SmallCNN


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("pattern,expected", [("2:4", "nm"), ("unstructured", None), ("rows", None)])
def test_module_round_trip_is_bit_exact(tmp_path, cnn, pattern, expected):
    sc.prune_(cnn, sc.Magnitude(sparsity=None if ":" in pattern else 0.9, pattern=pattern)).finalize_()
    path = sc.save(cnn, tmp_path / "cnn")
    fresh = sc.load(path, model=SmallCNN())
    for (n, a), (_, b) in zip(cnn.state_dict().items(), fresh.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                                                   b.view(torch.uint8) if b.is_floating_point() else b), n
    header = sc.formats.read_header(path / "model.safetensors")
    entry = header["tensors"]["conv2.weight"]
    assert entry["pattern"] == pattern
    if expected:
        assert entry["encoding"] == expected
    assert sc.get_meta(fresh)["conv2.weight"]["pattern"] == pattern


def test_fp16_round_trip_keeps_dtype(tmp_path, cnn):
    cnn = cnn.half()
    sc.prune_(cnn, sc.Magnitude(sparsity=0.5)).finalize_()
    fresh = sc.load(sc.save(cnn, tmp_path / "half.safetensors"), model=SmallCNN())
    assert fresh.conv2.weight.dtype == torch.float16
    assert torch.equal(fresh.conv2.weight, cnn.conv2.weight)


def test_transformers_model_rebuilds_with_tied_weights(tmp_path):
    model = _tiny_llama()
    sc.prune_(model, sc.Magnitude(sparsity=None, pattern="2:4")).finalize_()
    ids = torch.randint(0, 64, (2, 16))
    path = sc.save(model, tmp_path / "llama")
    assert (path / "config.json").is_file()
    header = sc.formats.read_header(path / "model.safetensors")
    assert "lm_head.weight" not in header["tensors"]  # tied: stored once
    fresh = sc.load(path)
    assert type(fresh).__name__ == "LlamaForCausalLM"
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_save_refuses_existing_path_and_leaves_it(tmp_path, cnn):
    target = tmp_path / "ckpt"
    sc.save(cnn, target)
    before = (target / "model.safetensors").read_bytes()
    sc.prune_(cnn, sc.Magnitude(sparsity=0.5)).finalize_()
    with pytest.raises(FormatError, match="exists.*overwrite=True"):
        sc.save(cnn, target)
    assert (target / "model.safetensors").read_bytes() == before
    sc.save(cnn, target, overwrite=True)
    assert (target / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging leftovers


def test_failed_save_leaves_nothing(tmp_path, cnn, monkeypatch):
    import sparsecraft.formats

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sparsecraft.formats, "write_tensors", boom)
    with pytest.raises(OSError):
        sc.save(cnn, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_missing_truncated_and_tampered_files(tmp_path, cnn):
    with pytest.raises(FormatError, match="no sparsecraft checkpoint"):
        sc.load(tmp_path / "nothing", model=cnn)
    sc.prune_(cnn, sc.Magnitude(sparsity=0.5)).finalize_()
    path = sc.save(cnn, tmp_path / "ok.safetensors")
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(FormatError, match="truncated"):
        sc.load(cut, model=SmallCNN())
    header_len = int.from_bytes(data[:8], "little")
    flipped = bytearray(data)
    flipped[8 + header_len + 50] ^= 0xFF  # a byte inside the first tensor's data
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(FormatError, match="checksum"):
        sc.load(bad, model=SmallCNN())


def test_load_into_wrong_model_is_clear(tmp_path, cnn, tiny_lm):
    path = sc.save(cnn, tmp_path / "c.safetensors")
    with pytest.raises(FormatError, match="does not fit the model"):
        sc.load(path, model=tiny_lm)
    with pytest.raises(FormatError, match="plain module"):
        sc.load(path)
