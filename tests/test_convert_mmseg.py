"""mmsegmentation -> HF conversion: round trips through the mmseg key layout, and the Swin reorderings checked
against mmseg's own formulation (nn.Unfold patch merging, fused qkv)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import upernet_fast
from upernet_fast import convert_mmseg as cm

transformers = pytest.importorskip("transformers")


def _randomise_bn(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
            module.bias.data.copy_(torch.randn(module.num_features, generator=gen) * 0.1)


def _tiny(backbone: str, tmp_path, **head):
    from transformers import ConvNextConfig, SwinConfig, UperNetConfig, UperNetForSemanticSegmentation

    torch.manual_seed(0)
    stages = ["stage1", "stage2", "stage3", "stage4"]
    if backbone == "convnext":
        bc = ConvNextConfig(
            hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1], out_features=stages, layer_scale_init_value=0.5
        )
        aux_in = 24
    else:
        bc = SwinConfig(
            embed_dim=8,
            depths=[1, 2, 1, 1],
            num_heads=[1, 2, 2, 4],
            window_size=3,
            mlp_ratio=2.0,
            out_features=stages,
            drop_path_rate=0.0,
        )
        aux_in = 32
    config = UperNetConfig(
        backbone_config=bc,
        hidden_size=16,
        auxiliary_in_channels=aux_in,
        auxiliary_channels=8,
        num_labels=7,
        pool_scales=[1, 2, 3, 6],
        **head,
    )
    model = UperNetForSemanticSegmentation(config).eval()
    _randomise_bn(model)
    model.save_pretrained(tmp_path / "hf")
    return (
        model,
        load_file(str(tmp_path / "hf" / "model.safetensors")),
        json.loads((tmp_path / "hf/config.json").read_text()),
    )


def _assert_same_outputs(model, original_dir, converted_dir, x):
    """Converted vs original, both loaded by transformers from disk, and vs the in-memory model: 1e-6.
    (The tensors themselves are compared bitwise elsewhere; oneDNN's kernel choice can depend on the
    alignment of mmapped weights and the thread count, giving ~4e-9 differences between identical models.)"""
    from transformers import UperNetForSemanticSegmentation

    original = UperNetForSemanticSegmentation.from_pretrained(original_dir).eval()
    converted = UperNetForSemanticSegmentation.from_pretrained(converted_dir).eval()
    with torch.no_grad():
        expected, got = original(pixel_values=x).logits, converted(pixel_values=x).logits
        in_memory = model(pixel_values=x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, in_memory, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backbone", ["convnext", "swin"])
def test_round_trip_through_mmseg_layout(backbone, tmp_path):
    from transformers import UperNetForSemanticSegmentation

    model, hf_sd, hf_config = _tiny(backbone, tmp_path)
    mm = cm.hf_to_mmseg(hf_sd, hf_config)
    assert all(not k.startswith(("backbone.encoder", "backbone.embeddings")) for k in mm)
    assert "decode_head.conv_seg.weight" in mm and "auxiliary_head.conv_seg.weight" in mm
    assert "decode_head.bottleneck.bn.running_var" in mm
    if backbone == "swin":  # real mmseg checkpoints carry the index buffer; it must be dropped
        assert "backbone.stages.1.blocks.1.attn.w_msa.qkv.weight" in mm
        mm["backbone.stages.0.blocks.0.attn.w_msa.relative_position_index"] = torch.zeros(
            9, 9, dtype=torch.long
        )
    meta = {"CLASSES": [f"thing{i}" for i in range(7)]}
    config, sd = cm.convert_mmseg_checkpoint(mm, meta)
    # transformers 5 writes Swin's unused final norm (`backbone.swin.layernorm`); hub files and mmseg lack it
    hf_sd = {k: v for k, v in hf_sd.items() if ".layernorm." not in k or not k.startswith("backbone.swin.")}
    assert set(sd) == set(hf_sd), set(sd) ^ set(hf_sd)
    for k in sd:
        assert torch.equal(sd[k], hf_sd[k]), k
    bc = config["backbone_config"]
    if backbone == "convnext":
        assert bc["depths"] == [1, 2, 1, 1] and bc["hidden_sizes"] == [8, 16, 24, 32]
    else:
        assert (bc["embed_dim"], bc["depths"], bc["num_heads"], bc["window_size"], bc["mlp_ratio"]) == (
            8,
            [1, 2, 1, 1],
            [1, 2, 2, 4],
            3,
            2.0,
        )
    assert (
        config["hidden_size"] == 16
        and config["num_labels"] == 7
        and config["auxiliary_in_channels"] == hf_config["auxiliary_in_channels"]
    )
    assert config["id2label"]["3"] == "thing3"

    out = cm.save_hf(config, sd, tmp_path / "converted")
    _assert_same_outputs(
        model, tmp_path / "hf", out, torch.randn(2, 3, 61, 83)
    )  # odd: Swin pads, ConvNeXt floors
    reloaded = UperNetForSemanticSegmentation.from_pretrained(out)
    fast_load = getattr(upernet_fast, "load", None)
    if fast_load is not None:  # the converted directory must load in upernet_fast too
        x = torch.randn(1, 3, 61, 83)
        with torch.no_grad():
            torch.testing.assert_close(
                fast_load(str(out))(pixel_values=x).logits,
                reloaded.eval()(pixel_values=x).logits,
                rtol=1e-4,
                atol=1e-4,
            )
    assert reloaded.config.id2label[3] == "thing3"


def test_convert_file_and_cli(tmp_path, capsys):

    from upernet_fast.cli import main

    model, hf_sd, hf_config = _tiny("convnext", tmp_path)
    ckpt = tmp_path / "mm.pth"
    torch.save(
        {"state_dict": cm.hf_to_mmseg(hf_sd, hf_config), "meta": {"config": "pool_scales=(1, 2, 3, 6)"}}, ckpt
    )
    assert main(["convert", str(ckpt), "--out", str(tmp_path / "out")]) == 0
    _assert_same_outputs(model, tmp_path / "hf", tmp_path / "out", torch.randn(1, 3, 64, 64))
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()


def test_convert_refuses_broken_input_and_existing_checkpoints(tmp_path, capsys):
    """Nothing is written for a checkpoint that would not load (missing / extra tensor, wrong shape, no
    classifier, not a checkpoint at all), and an existing checkpoint folder is kept unless --overwrite."""
    from upernet_fast.cli import main

    _, hf_sd, hf_config = _tiny("convnext", tmp_path)
    good = cm.hf_to_mmseg(hf_sd, hf_config)
    first = sorted(k for k in good if k.startswith("backbone."))[0]
    broken = {
        "missing": ({k: v for k, v in good.items() if k != first}, "1 missing key"),
        "extra": ({**good, "decode_head.surplus.weight": torch.zeros(3)}, "unexpected key"),
        "shape": ({**good, first: torch.zeros(7, 7)}, "shape mismatch"),
        "no_classifier": (
            {k: v for k, v in good.items() if not k.startswith("decode_head.conv_seg")},
            "no 'decode_head.conv_seg.weight' tensor",
        ),
    }
    for name, (state, message) in broken.items():
        torch.save({"state_dict": state}, tmp_path / f"{name}.pth")
        assert main(["convert", str(tmp_path / f"{name}.pth"), "--out", str(tmp_path / name)]) == 1
        assert message in capsys.readouterr().err and not (tmp_path / name).exists(), name
    (tmp_path / "empty.pth").write_bytes(b"")
    assert main(["convert", str(tmp_path / "empty.pth"), "--out", str(tmp_path / "e")]) == 1
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err
    torch.save({"state_dict": good}, tmp_path / "good.pth")
    before = (tmp_path / "hf" / "model.safetensors").read_bytes()
    assert main(["convert", str(tmp_path / "good.pth"), "--out", str(tmp_path / "hf")]) == 1
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == before
    assert main(["convert", str(tmp_path / "good.pth"), "--out", str(tmp_path / "hf"), "--overwrite"]) == 0


def test_swin_patch_merging_matches_mmseg_unfold():
    """mmseg's PatchMerging (nn.Unfold, channel-major) with mmseg weights == HF's with converted weights."""
    from transformers.models.swin.modeling_swin import SwinPatchMerging

    torch.manual_seed(0)
    c, h, w = 6, 8, 10
    hf = SwinPatchMerging(c).eval()
    mm_norm, mm_red = nn.LayerNorm(4 * c), nn.Linear(4 * c, 2 * c, bias=False)
    nn.init.normal_(mm_norm.weight), nn.init.normal_(mm_norm.bias), nn.init.normal_(mm_red.weight)
    hf.norm.weight.data = cm.reverse_correct_unfold_norm_order(mm_norm.weight.data)
    hf.norm.bias.data = cm.reverse_correct_unfold_norm_order(mm_norm.bias.data)
    hf.reduction.weight.data = cm.reverse_correct_unfold_reduction_order(mm_red.weight.data)
    x = torch.randn(2, h * w, c)
    sampled = nn.Unfold(kernel_size=2, stride=2)(x.view(2, h, w, c).permute(0, 3, 1, 2)).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(hf(x, (h, w)), mm_red(mm_norm(sampled)), rtol=1e-5, atol=1e-5)
    # and the forward reorderings invert the reverse ones
    assert torch.equal(cm.correct_unfold_reduction_order(hf.reduction.weight.data), mm_red.weight.data)
    assert torch.equal(cm.correct_unfold_norm_order(hf.norm.weight.data), mm_norm.weight.data)


def test_qkv_split_matches_fused_projection(tmp_path):
    """mmseg's WindowMSA: qkv(x).reshape(B, N, 3, heads, C/heads) -> q, k, v are the three row blocks."""
    _, hf_sd, hf_config = _tiny("swin", tmp_path)
    mm = cm.hf_to_mmseg(hf_sd, hf_config)
    dim = 16  # stage 1
    qkv = nn.Linear(dim, 3 * dim)
    mm["backbone.stages.1.blocks.0.attn.w_msa.qkv.weight"] = qkv.weight.data
    mm["backbone.stages.1.blocks.0.attn.w_msa.qkv.bias"] = qkv.bias.data
    _, sd = cm.convert_mmseg_checkpoint(mm)
    x = torch.randn(5, dim)
    with torch.no_grad():
        fused = qkv(x).reshape(5, 3, dim)
    prefix = "backbone.encoder.layers.1.blocks.0.attention.self"
    for i, name in enumerate(("query", "key", "value")):
        got = x @ sd[f"{prefix}.{name}.weight"].T + sd[f"{prefix}.{name}.bias"]
        torch.testing.assert_close(got, fused[:, i])


def test_rejects_hf_and_unknown_checkpoints():
    with pytest.raises(ValueError, match="Hugging Face"):
        cm.convert_mmseg_checkpoint({"backbone.encoder.layers.0.x": torch.zeros(1)})
    with pytest.raises(ValueError, match="unsupported"):
        cm.convert_mmseg_checkpoint({"backbone.conv1.weight": torch.zeros(1)})
