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


# ---- inference fast path (folded weights, one-gather windows, oneDNN Linears) ---------------------------


@pytest.mark.parametrize(
    "b,h,w,ws,shift", [(1, 25, 33, 7, 3), (2, 13, 17, 7, 0), (2, 4, 5, 7, 3), (1, 8, 25, 12, 6)]
)
def test_window_index_is_pad_roll_partition(b, h, w, ws, shift):
    from upernet_fast.backbones.swin import _window_index

    x = torch.arange(1, b * h * w + 1, dtype=torch.float64).view(b, h, w, 1)
    y = torch.nn.functional.pad(x, (0, 0, 0, (-w) % ws, 0, (-h) % ws))
    hp, wp = y.shape[1:3]
    y = torch.roll(y, (-shift, -shift), (1, 2))
    expected = y.view(b, hp // ws, ws, wp // ws, ws).transpose(2, 3).reshape(-1)
    gather, pad, scatter = _window_index(b, h, w, ws, shift, torch.device("cpu"))
    got = x.view(-1)[gather]
    if pad is not None:
        got[pad] = 0
    assert torch.equal(got, expected)
    assert (pad is None) == bool((expected != 0).all())
    assert torch.equal(got[scatter], x.view(-1))  # the inverse: un-partition, roll back, crop


@pytest.mark.parametrize("window,size,batch", [(7, (97, 131), 2), (12, (64, 200), 1), (7, (20, 24), 3)])
def test_fast_path_equals_reference_path_channels_last(window, size, batch):
    """no_grad → fast path; grad mode → the explicit reference path. Same values; feature maps and hidden
    states are NCHW-shaped views of channels-last memory."""
    _, ours = _pair(_config(window, ["stem", "stage1", "stage2", "stage3", "stage4"], (2, 2, 2, 2)))
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        fast = ours(x, output_hidden_states=True)
    slow = ours(x, output_hidden_states=True)
    for i, (a, b) in enumerate(
        zip(fast.feature_maps + fast.hidden_states, slow.feature_maps + slow.hidden_states)
    ):
        _close(a, b.detach(), f"output[{i}]")
        assert a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last), (
            f"output[{i}] {a.stride()}"
        )


def test_folded_weights_follow_inplace_edits_and_reloads():
    _, ours = _pair(_config(7, ["stage1", "stage2", "stage3"], (2, 2, 2, 2)))
    x = torch.randn(1, 3, 61, 75, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ours(x)  # fills every folded / packed cache
        block = ours.encoder.layers[1].blocks[1]
        block.layernorm_before.weight.mul_(1.5)  # folded into qkv
        block.layernorm_after.bias.add_(0.3)  # folded into intermediate.dense
        block.attention.self.value.bias.add_(0.2)  # qkv bias and the padded-token row
        block.output.dense.weight.mul_(0.7)  # packed plain weight
        ours.encoder.layers[0].downsample.norm.weight.mul_(1.2)  # folded into reduction
        edited = ours(x)
        fresh = SwinBackbone(ours.config | {"out_features": ours.out_features}).eval()
        fresh.load_state_dict(ours.state_dict())
        expected = fresh(x)
    for i, (a, b) in enumerate(zip(edited.feature_maps, expected.feature_maps)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"feature_maps[{i}] after in-place edits")
    # A state_dict load replaces every source in place: the caches must follow it as well.
    other, _ = _pair(_config(7, ["stage1", "stage2", "stage3"], (2, 2, 2, 2)), seed=21)
    ours.load_state_dict(SwinBackbone.remap_state_dict(other.state_dict(), ""))
    with torch.no_grad():
        r, o = other(x), ours(x)
    for i, (a, b) in enumerate(zip(o.feature_maps, r.feature_maps)):
        _close(a, b, f"feature_maps[{i}] after reload")


def test_deepcopy_and_pickle_after_fast_forward():
    import copy
    import io

    _, ours = _pair(_config(7, ["stage2", "stage4"]))
    x = torch.randn(1, 3, 70, 90, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        expected = ours(x).feature_maps  # caches now hold oneDNN-packed (storage-less) weights
        twin = copy.deepcopy(ours)
        buf = io.BytesIO()
        torch.save(ours, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        for m in (twin, loaded, ours):
            for a, b in zip(m(x).feature_maps, expected):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_float64_fast_path_tight():
    """float64 takes the fast path's generic (F.linear) branch; no fp32 rounding to hide behind."""
    ref, ours = _pair(_config(7, ["stage1", "stage2", "stage3", "stage4"], (2, 2, 2, 2)), seed=13)
    ref, ours = ref.double(), ours.double()
    x = torch.randn(2, 3, 97, 131, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    with torch.no_grad():
        r, o = ref(x), ours(x)
    for i, (a, b) in enumerate(zip(o.feature_maps, r.feature_maps)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"feature_maps[{i}]")


@pytest.mark.parametrize("act", ["relu", "gelu_pytorch_tanh", "silu"])
def test_other_activations(act):
    ref, ours = _pair(_config(7, ["stage2", "stage3", "stage4"], hidden_act=act), seed=14)
    x = torch.randn(2, 3, 97, 131, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        r, o = ref(x), ours(x)
    for i, (a, b) in enumerate(zip(o.feature_maps, r.feature_maps)):
        _close(a, b, f"feature_maps[{i}] ({act})")


@pytest.mark.slow
def test_torch_compile_matches():
    ref, ours = _pair(_config(7, ["stage1", "stage2", "stage3", "stage4"]))
    x = torch.randn(2, 3, 97, 131, generator=torch.Generator().manual_seed(15))
    compiled = torch.compile(ours)
    with torch.no_grad():
        r, o = ref(x), compiled(x)
    for i, (a, b) in enumerate(zip(o.feature_maps, r.feature_maps)):
        _close(a, b, f"feature_maps[{i}] (compiled)")
