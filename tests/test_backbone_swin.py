"""Native SwinBackbone vs transformers' SwinBackbone (random, non-trivial weights, fixed seed).

Tolerance (fp32): max |ours - ref| <= 1e-4 * max(1, max |ref|) per tensor, i.e. 1e-4 relative to the
feature scale; the two sides differ only by kernel choice (fused qkv / SDPA vs eager matmuls).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoBackbone, SwinConfig, UperNetConfig, UperNetForSemanticSegmentation  # noqa: E402

from upernet_fast.backbones.swin import SwinBackbone  # noqa: E402

RTOL = 1e-4


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    diff = (ours - ref).abs()
    tol = RTOL * max(1.0, ref.abs().max().item())
    worst = diff.max().item()
    assert worst <= tol, (
        f"{what}: max abs diff {worst:.3e} > tol {tol:.3e} at {tuple(torch.nonzero(diff == diff.max())[0].tolist())}, "
        f"{(diff > tol).sum().item()} of {diff.numel()} elements off"
    )


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """The default init (zero bias table, unit LayerNorms, std 0.02 linears) would hide most bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "relative_position_bias_table" in name:
                p.copy_(0.5 * r)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * r)
            elif p.ndim == 1 or "position_embeddings" in name:
                p.copy_(0.2 * r)
            else:  # unit-variance activations: attention far from uniform
                p.copy_(r / p[0].numel() ** 0.5)


def _pair(config: SwinConfig, attn: str = "sdpa", seed: int = 0):
    ref = AutoBackbone.from_config(config, attn_implementation=attn).eval()
    _randomize(ref, seed)
    ours = SwinBackbone(config.to_dict()).eval()
    sd = SwinBackbone.remap_state_dict({"backbone." + k: v for k, v in ref.state_dict().items()}, "backbone.")
    ours.load_state_dict({k[len("backbone.") :]: v for k, v in sd.items()}, strict=True)
    return ref, ours


def _config(
    window: int, out_features: list[str], depths=(1, 1, 2, 1), embed_dim: int = 16, **kw
) -> SwinConfig:
    return SwinConfig(
        embed_dim=embed_dim,
        depths=list(depths),
        num_heads=[1, 2, 2, 4],
        window_size=window,
        out_features=out_features,
        **kw,
    )


CASES = [
    # window, input (H, W), depths, out_features. Stage grids: 97x131 -> 25x33, 13x17, 7x9, 4x5 (<= 7).
    (7, (97, 131), (1, 1, 2, 1), ["stage2", "stage3", "stage4"]),
    (7, (64, 200), (2, 2, 2, 2), ["stage1", "stage2", "stage3"]),
    # window 12: 16x50, 8x25 (<= 12: one padded window, still shifted), 4x13, 2x7.
    (12, (64, 200), (2, 2, 2, 2), ["stage1", "stage2", "stage3", "stage4"]),
    (12, (97, 131), (1, 1, 2, 1), ["stage2", "stage3", "stage4"]),
]


@pytest.mark.parametrize("window,size,depths,out_features", CASES)
def test_feature_maps_match(window, size, depths, out_features):
    ref, ours = _pair(_config(window, out_features, depths))
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        r, o = ref(x), ours(x)
    assert ours.channels == list(ref.channels)
    assert len(o.feature_maps) == len(r.feature_maps) == len(out_features)
    assert o.hidden_states is None and o.attentions is None
    for i, (a, b) in enumerate(zip(o.feature_maps, r.feature_maps)):
        _close(a, b, f"feature_maps[{i}]")
    # The cached bias/mask path (second call) must give the same result.
    with torch.no_grad():
        o2 = ours(x)
    for a, b in zip(o2.feature_maps, o.feature_maps):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_hidden_states_and_attentions_match_eager():
    # transformers' sdpa backbone returns `attentions=()`; the eager one returns what we mirror.
    ref, ours = _pair(_config(7, ["stage2", "stage3", "stage4"]), attn="eager", seed=3)
    x = torch.randn(2, 3, 97, 131, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        r = ref(x, output_hidden_states=True, output_attentions=True)
        o = ours(x, output_hidden_states=True, output_attentions=True)
    assert len(o.hidden_states) == len(r.hidden_states) == 5  # stem + every stage, pre-downsampling
    assert len(o.attentions) == len(r.attentions) == 4  # last block of every stage
    for i, (a, b) in enumerate(zip(o.feature_maps, r.feature_maps)):
        _close(a, b, f"feature_maps[{i}]")
    for i, (a, b) in enumerate(zip(o.hidden_states, r.hidden_states)):
        _close(a, b, f"hidden_states[{i}]")
    for i, (a, b) in enumerate(zip(o.attentions, r.attentions)):
        _close(a, b, f"attentions[{i}]")


def test_odd_patch_absolute_embeddings_and_stem():
    config = _config(
        7, ["stem", "stage1", "stage3"], patch_size=3, image_size=60, use_absolute_embeddings=True
    )
    ref, ours = _pair(config, seed=5)
    assert ours.reduction == 3 * 4
    x = torch.randn(2, 3, 60, 60, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        r, o = ref(x, output_hidden_states=True), ours(x, output_hidden_states=True)
    for i, (a, b) in enumerate(zip(o.feature_maps + o.hidden_states, r.feature_maps + r.hidden_states)):
        _close(a, b, f"output[{i}]")


def test_load_on_disk_layout_from_upernet_save_pretrained(tmp_path):
    torch.manual_seed(0)
    config = UperNetConfig(
        backbone_config=_config(7, ["stage1", "stage2", "stage3", "stage4"]),
        hidden_size=8,
        auxiliary_channels=8,
        num_labels=3,
    )
    model = UperNetForSemanticSegmentation(config).eval()
    _randomize(model.backbone, seed=7)
    model.save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / "model.safetensors")
    ours = SwinBackbone(config.backbone_config.to_dict()).eval()

    expected = {
        k[len("backbone.") :]: tuple(v.shape) for k, v in on_disk.items() if k.startswith("backbone.")
    }
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected  # our names ARE the file's
    assert "swin.layernorm.weight" in expected  # transformers 5 writes its unused final norm
    assert not any("relative_position_index" in k for k in ours.state_dict())

    sd = SwinBackbone.remap_state_dict(on_disk, "backbone.")
    assert "decode_head.classifier.weight" in sd  # keys outside the prefix pass through untouched
    ours.load_state_dict({k[9:]: v for k, v in sd.items() if k.startswith("backbone.")}, strict=True)
    # Pre-5 hub files carry `relative_position_index` (dropped) and lack the unused final norm (tolerated).
    legacy = {
        k[9:]: v for k, v in sd.items() if k.startswith("backbone.") and not k.startswith("backbone.swin.")
    }
    legacy["encoder.layers.0.blocks.0.attention.self.relative_position_index"] = torch.zeros(49 * 49)
    hub = SwinBackbone(config.backbone_config.to_dict())
    hub.load_state_dict(SwinBackbone.remap_state_dict(legacy, ""), strict=True)
    assert set(ours.state_dict()) - set(SwinBackbone.remap_state_dict(legacy, "")) == set(
        SwinBackbone.optional_keys
    )

    x = torch.randn(2, 3, 97, 131, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        r, o, h = model.backbone(x), ours(x), hub(x)
    for i, (a, b, c) in enumerate(zip(o.feature_maps, r.feature_maps, h.feature_maps)):
        _close(a, b, f"feature_maps[{i}]")
        _close(c, b, f"feature_maps[{i}] (hub layout)")


def test_cache_follows_weight_updates_and_autograd():
    ref, ours = _pair(_config(7, ["stage1", "stage2"], depths=(2, 2, 2, 2)))
    x = torch.randn(1, 3, 40, 52, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours(x)  # fills the bias/mask cache
        _randomize(ref, seed=11)  # new bias tables, loaded in place below
    ours.load_state_dict(SwinBackbone.remap_state_dict(ref.state_dict(), ""))
    with torch.no_grad():
        r, o = ref(x), ours(x)
    for i, (a, b) in enumerate(zip(o.feature_maps, r.feature_maps)):
        _close(a, b, f"feature_maps[{i}] after reload")
    out = ours(x).feature_maps[-1].square().sum()  # grad mode: no cached tensor, gradients reach the table
    out.backward()
    assert ours.encoder.layers[0].blocks[1].attention.self.relative_position_bias_table.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "embed_dim,depths,heads,window",
    [
        (96, [2, 2, 6, 2], [3, 6, 12, 24], 7),
        (96, [2, 2, 18, 2], [3, 6, 12, 24], 7),
        (128, [2, 2, 18, 2], [4, 8, 16, 32], 12),
        (192, [2, 2, 18, 2], [6, 12, 24, 48], 12),
    ],
)
def test_hub_sizes_build_with_identical_parameter_shapes(embed_dim, depths, heads, window):
    config = SwinConfig(
        embed_dim=embed_dim,
        depths=depths,
        num_heads=heads,
        window_size=window,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    with torch.device("meta"):
        ref = AutoBackbone.from_config(config)
        ours = SwinBackbone(config.to_dict())
    ref_shapes = {k: tuple(v.shape) for k, v in SwinBackbone.remap_state_dict(ref.state_dict(), "").items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref_shapes
    assert ours.channels == list(ref.channels) and ours.reduction == 32
