"""ONNX export (upernet_fast.onnx_export): one dynamic-shape file per backbone, run in ONNX Runtime at odd
sizes and batches against transformers; the exact dynamic-size building blocks; the missing-extra error."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

import upernet_fast
from conftest import compare_logits, make_reference
from upernet_fast.kernels import conv3x3_taps_weight
from upernet_fast.onnx_export import ExportGraph, adaptive_avg_pool, require_onnx, upsample_shift_add

# Odd, non-multiple-of-32 sizes, batch 2, and one whose deepest map is a single pixel / Swin window.
SIZES = [(1, 97, 131), (2, 224, 160), (1, 320, 448), (1, 45, 64)]
REL_TOL, MIN_AGREE = 1e-3, 0.999


def test_adaptive_avg_pool_exact_at_any_size():
    for h, w in [(13, 7), (6, 6), (2, 5), (1, 1), (25, 31)]:
        x = torch.randn(2, 3, h, w, dtype=torch.float64)
        for s in (1, 2, 3, 6):
            torch.testing.assert_close(adaptive_avg_pool(x, s), F.adaptive_avg_pool2d(x, s))


def test_upsample_shift_add_is_conv_of_upsampled():
    # float32: the interpolation weights are ATen's float32 op-math ones
    low = torch.randn(2, 3, 5, 6)
    weight = torch.randn(4, 3, 3, 3)
    taps = F.conv2d(low, conv3x3_taps_weight(weight)).unflatten(1, (9, 4))
    for size in [(17, 23), (10, 12), (5, 6), (11, 3)]:
        up = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
        expected = F.conv2d(up, weight, padding=1)
        torch.testing.assert_close(upsample_shift_add(taps, size), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["convnext", "swin", "resnet"])
def test_export_graph_matches_transformers_eagerly(kind):
    ref = make_reference(kind)
    graph = ExportGraph(upernet_fast.load(ref))
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        expected = ref(x).logits
    with torch.enable_grad():  # as traced (ConvNeXt's plain-op path)
        got = graph(x).detach()
    compare_logits(expected, got, 1e-4)


@pytest.mark.parametrize("kind", ["convnext", "swin", "resnet"])
def test_onnx_runtime_matches_transformers_at_any_size(kind, tmp_path):
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(
            name, reason=f"{name} is not installed (the optional extra: pip install -e .[onnx])"
        )
    ref = make_reference(kind)
    path = upernet_fast.export_onnx(ref, tmp_path / f"{kind}.onnx")
    session = upernet_fast.ort_session(path, threads=1)
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("pixel_values", "logits")
    assert inp.shape == ["batch", 3, "height", "width"]
    import onnx

    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    assert json.loads(meta["id2label"]) == {str(k): v for k, v in ref.config.id2label.items()}
    names = {node.op_type for node in onnx.load(path, load_external_data=False).graph.node}
    assert "BatchNormalization" not in names  # folded
    g = torch.Generator().manual_seed(3)
    for batch, h, w in SIZES:
        x = torch.randn(batch, 3, h, w, generator=g)
        with torch.no_grad():
            expected = ref(x).logits
        got = torch.from_numpy(session.run(["logits"], {"pixel_values": x.numpy()})[0])
        compare_logits(expected, got, REL_TOL, MIN_AGREE)


def test_missing_extra_names_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"pip install -e \.\[onnx\].*upernet_fast\[onnx\]"):
        require_onnx()
    with pytest.raises(ImportError, match="onnxscript"):
        upernet_fast.export_onnx(make_reference("convnext"), tmp_path / "m.onnx")


def test_cli_export_reports_missing_extra(monkeypatch, tmp_path, capsys):
    from upernet_fast.cli import main

    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["export", "whatever", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "upernet_fast[onnx]" in capsys.readouterr().err


def test_one_level_model_exports_and_matches(tmp_path):
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(
            name, reason=f"{name} is not installed (the optional extra: pip install -e .[onnx])"
        )
    ref = make_reference("convnext", out_features=["stage4"], use_auxiliary_head=False)
    (tmp_path / "one.onnx").write_bytes(b"an older file")  # replaced: overwrite=True is the default
    (tmp_path / "one.onnx").chmod(0o640)
    (tmp_path / "link.onnx").symlink_to(tmp_path / "one.onnx")  # written through, as open() would
    session = upernet_fast.ort_session(upernet_fast.export_onnx(ref, tmp_path / "link.onnx"), threads=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.onnx", "one.onnx"]  # no temporary file left
    assert (tmp_path / "link.onnx").is_symlink() and (tmp_path / "one.onnx").stat().st_mode & 0o777 == 0o640
    x = torch.randn(2, 3, 64, 97, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ref(x).logits
    got = torch.from_numpy(session.run(["logits"], {"pixel_values": x.numpy()})[0])
    compare_logits(expected, got, REL_TOL, MIN_AGREE)


def test_cli_export_keeps_an_existing_file(tmp_path, capsys):
    """`upernet-fast export` replaces a file only with --overwrite (as `convert` does); checked before the
    model is loaded. A folder as --out is refused either way."""
    from upernet_fast.cli import main

    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    assert main(["export", "no/such/checkpoint", "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["export", "no/such/checkpoint", "--out", str(tmp_path), "--overwrite"]) == 1
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"opset": 3}, "opset 3 is outside 18.."),
        ({"opset": 999}, "opset 999 is outside 18.."),
        ({"dtype": "bfloat16", "dynamic": False}, "no torch.bfloat16 kernel"),
        ({"dtype": torch.float16}, "float16 exports need a static size"),
        ({"dynamic": False, "static_size": "16x64"}, "each side must be at least 32"),
        ({"dynamic": False, "static_size": "512x"}, "expected a size HxW"),
        ({"dynamic": False, "static_size": (0, 64)}, "sizes must be positive"),
        ({"dynamic": False, "static_size": (64.5, 64)}, "expected a size HxW"),
    ],
)
def test_export_refuses_what_it_cannot_write(tmp_path, kwargs, message):
    """Each of these used to write a file ONNX Runtime cannot load (or that declares another opset), or to
    fail with a raw torch.export error."""
    for name in ("onnx", "onnxscript"):
        pytest.importorskip(
            name, reason=f"{name} is not installed (the optional extra: pip install -e .[onnx])"
        )
    with pytest.raises(ValueError, match=message):
        upernet_fast.export_onnx(make_reference("convnext"), tmp_path / "m.onnx", **kwargs)
    assert not (tmp_path / "m.onnx").exists()
