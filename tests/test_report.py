import json

import sparsecraft as sc


def test_report_counts_sparsity_bytes_and_flops(cnn):
    sc.prune_(cnn, sc.Magnitude(sparsity=0.75)).finalize_()
    rep = sc.report(cnn, input_shape=(2, 4, 8, 8))
    by = {l.name: l for l in rep.layers}
    conv2 = by["conv2.weight"]
    assert conv2.numel == 32 * 16 * 9 and conv2.nonzeros == int((cnn.conv2.weight != 0).sum())
    assert abs(conv2.sparsity - 0.75) < 1e-3
    # 2 images x 8x8 outputs; 2 FLOPs per multiply-accumulate
    assert conv2.dense_flops == 2 * (2 * 64) * conv2.numel
    assert conv2.effective_flops == 2 * (2 * 64) * conv2.nonzeros
    fc = by["fc.weight"]
    assert fc.dense_flops == 2 * 2 * fc.numel  # two samples, one position each
    assert conv2.dense_bytes == conv2.numel * 4 and conv2.compressed_bytes < conv2.dense_bytes
    assert rep.totals["nonzeros"] == sum(l.nonzeros for l in rep.layers)
    assert "total (4 targets)" in str(rep)
    data = json.loads(rep.to_json())
    assert data["totals"]["effective_flops"] == sum(l.effective_flops for l in rep.layers)


def test_report_nm_uses_packed_encoding_and_plot(tmp_path, tiny_lm):
    sc.prune_(tiny_lm, sc.Magnitude(sparsity=None, pattern="2:4")).finalize_()
    rep = sc.report(tiny_lm, input_shape=(1, 8))
    assert all(l.encoding == "nm2:4" and l.pattern == "2:4" for l in rep.layers)
    assert rep.layers[0].dense_flops == 2 * 8 * 32 * 64
    png = rep.plot(tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_on_dense_model_uses_default_targets(tiny_lm):
    rep = sc.report(tiny_lm)
    assert [l.name for l in rep.layers] == [t.name for t in sc.select_targets(tiny_lm)]
    assert rep.totals["sparsity"] == 0.0 and rep.layers[0].encoding == "dense"
    assert "dense_flops" not in rep.totals
