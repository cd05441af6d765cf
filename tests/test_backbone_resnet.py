"""Native ResNetBackbone vs transformers' ResNetBackbone (random, non-trivial weights and BN stats, fixed seed).

Tolerance (fp32): max |ours - ref| <= 1e-4 * max(1, max |ref|) per tensor, i.e. 1e-4 relative to the
feature scale (both sides run the same convolutions; only the summation order of the residual may differ).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoBackbone, ResNetConfig, UperNetConfig, UperNetForSemanticSegmentation  # noqa: E402

from upernet_fast.backbones.resnet import ResNetBackbone  # noqa: E402

RTOL = 1e-4


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    diff = (ours - ref).abs()
    tol = RTOL * max(1.0, ref.abs().max().item())
    worst = diff.max().item()
    assert worst <= tol, (
        f"{what}: max abs diff {worst:.3e} > tol {tol:.3e}, {(diff > tol).sum().item()} elements off"
    )


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Default BN (identity stats, unit weight, zero bias) would hide BN/shortcut mix-ups."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            elif isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)


def _pair(config: ResNetConfig, seed: int = 0):
    ref = AutoBackbone.from_config(config).eval()
    _randomize(ref, seed)
    ours = ResNetBackbone(config.to_dict()).eval()
    ours.load_state_dict(ResNetBackbone.remap_state_dict(ref.state_dict(), ""), strict=True)
    return ref, ours


CASES = [
    dict(layer_type="basic", hidden_sizes=[8, 16, 24, 32], depths=[2, 1, 2, 1]),
    dict(layer_type="bottleneck", hidden_sizes=[16, 32, 48, 64], depths=[2, 1, 2, 1]),
    dict(
        layer_type="bottleneck",
        hidden_sizes=[16, 32, 48, 64],
        depths=[1, 2, 1, 1],
        downsample_in_bottleneck=True,
        downsample_in_first_stage=True,
    ),
    dict(
        layer_type="basic",
        hidden_sizes=[8, 16, 24],
        depths=[1, 1, 1],
        downsample_in_first_stage=True,
        hidden_act="gelu",
    ),  # gelu only at the stem and after each residual sum, as in transformers
]
OUT_FEATURES = [
    ["stage1", "stage2", "stage3", "stage4"],
    ["stage2", "stage3", "stage4"],
    ["stage1", "stage2", "stage3"],
    ["stem", "stage1", "stage3"],
]


@pytest.mark.parametrize("case,out_features", list(zip(CASES, OUT_FEATURES)))
def test_outputs_match(case, out_features):
    config = ResNetConfig(embedding_size=8, out_features=out_features, **case)
    ref, ours = _pair(config)
    x = torch.randn(2, 3, 97, 131, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        r, o = ref(x, output_hidden_states=True), ours(x, output_hidden_states=True)
        o_plain = ours(x)
    assert ours.channels == list(ref.channels)
    # every stride-2 op here maps n -> ceil(n / 2)
    assert o.feature_maps[-1].shape[2:] == (-(-97 // ours.reduction), -(-131 // ours.reduction))
    assert len(o.hidden_states) == len(r.hidden_states) == len(config.depths) + 1  # stem + every stage
    assert o_plain.hidden_states is None and o_plain.attentions is None
    for i, (a, b) in enumerate(zip(o.feature_maps, r.feature_maps)):
        _close(a, b, f"feature_maps[{i}]")
    for a, b in zip(o_plain.feature_maps, o.feature_maps):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for i, (a, b) in enumerate(zip(o.hidden_states, r.hidden_states)):
        _close(a, b, f"hidden_states[{i}]")


def test_upernet_default_backbone_keys_and_reduction(tmp_path):
    # UperNetConfig's default backbone is ResNet-50 with out_features stage1..4; build it small.
    torch.manual_seed(0)
    backbone_config = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[16, 32, 48, 64],
        depths=[1, 1, 1, 1],
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    model = UperNetForSemanticSegmentation(
        UperNetConfig(backbone_config=backbone_config, hidden_size=8, auxiliary_channels=8, num_labels=3)
    ).eval()
    _randomize(model.backbone, seed=2)
    model.save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / "model.safetensors")
    ours = ResNetBackbone(model.config.backbone_config.to_dict()).eval()
    sd = {k[len("backbone.") :]: v for k, v in on_disk.items() if k.startswith("backbone.")}
    assert set(ours.state_dict()) == set(sd)  # includes BN num_batches_tracked
    ours.load_state_dict(sd, strict=True)
    assert ours.reduction == 32 and ours.channels == [16, 32, 48, 64]
    x = torch.randn(2, 3, 97, 131, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        r, o = model.backbone(x), ours(x)
    for i, (a, b) in enumerate(zip(o.feature_maps, r.feature_maps)):
        _close(a, b, f"feature_maps[{i}]")


def test_defaults_are_resnet50():
    with torch.device("meta"):
        ref = AutoBackbone.from_config(ResNetConfig(out_features=["stage1", "stage2", "stage3", "stage4"]))
        ours = ResNetBackbone({"out_features": ["stage1", "stage2", "stage3", "stage4"]})
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    assert ours.channels == [256, 512, 1024, 2048] and ours.reduction == 32
