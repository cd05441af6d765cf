"""Shared builders: transformers reference models with random but NON-trivial weights.

Default initialisation hides folding and fusion bugs (BatchNorm is identity, layer scale 1e-6, position
bias 0), so every reference gets random BatchNorm statistics/affines, LayerNorm affines, layer scales and
relative-position-bias tables from a fixed seed.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests use the default fast-path rules, so which path runs does not depend on the machine's timings;
# tuning itself, and parity for every plan it can pick, are tested in test_tuning.py.
os.environ.setdefault("UPERNET_FAST_TUNE", "0")

transformers = pytest.importorskip("transformers", reason="transformers is the reference for these tests")

# Every test starts from the same global RNG state, so a draw without a generator is the same draw
# whatever ran before it (or whether it runs alone). To check that the tolerances hold for other draws
# and other random models, rerun with another seed: UPERNET_FAST_TEST_SEED=7 python -m pytest ...
# (it also shifts every make_reference seed, keeping models of different seeds apart).
TEST_SEED = int(os.environ.get("UPERNET_FAST_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _seed_global_rng() -> None:
    torch.manual_seed(TEST_SEED)


FOUR = ["stage1", "stage2", "stage3", "stage4"]

BACKBONE_CONFIGS: dict[str, dict[str, Any]] = {
    "convnext": dict(model_type="convnext", hidden_sizes=[16, 24, 32, 40], depths=[1, 1, 2, 1]),
    "swin": dict(model_type="swin", embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=7),
    "resnet": dict(
        model_type="resnet", embedding_size=16, hidden_sizes=[16, 24, 32, 40], depths=[1, 1, 1, 1]
    ),
}


def backbone_config(kind: str, out_features: list[str] | None = None, **overrides: Any):
    cfg = {**BACKBONE_CONFIGS[kind], **overrides}
    model_type = cfg.pop("model_type")
    cls = transformers.CONFIG_MAPPING[model_type]
    return cls(out_features=out_features or FOUR, **cfg)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)

    def rand(t: torch.Tensor, mean: float, std: float) -> None:
        t.copy_(mean + std * torch.randn(t.shape, generator=g))

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "relative_position_bias_table" not in name:
                fan_in = p[0].numel()
                rand(p, 0.0, 1.0 / fan_in**0.5)  # unit-scale activations, so logits are O(1)
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                rand(mod.running_mean, 0.0, 0.3)
                mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g))
                rand(mod.weight, 1.0, 0.3)
                rand(mod.bias, 0.0, 0.3)
            elif isinstance(mod, torch.nn.LayerNorm):
                rand(mod.weight, 1.0, 0.3)
                rand(mod.bias, 0.0, 0.3)
            elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and mod.bias is not None:
                rand(mod.bias, 0.0, 0.1)
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                rand(p, 0.0, 0.5)
            elif "layer_scale" in name:
                rand(p, 0.5, 0.2)
    return model


def make_reference(
    kind: str = "convnext",
    out_features: list[str] | None = None,
    seed: int = 0,
    backbone_overrides: dict[str, Any] | None = None,
    **head: Any,
):
    """A randomised transformers UperNetForSemanticSegmentation in eval mode."""
    seed += 1000 * TEST_SEED
    torch.manual_seed(seed)
    head = {"hidden_size": 32, "num_labels": 5, "auxiliary_channels": 16, **head}
    cfg = transformers.UperNetConfig(
        backbone_config=backbone_config(kind, out_features, **(backbone_overrides or {})), **head
    )
    return randomize_(transformers.UperNetForSemanticSegmentation(cfg), seed).eval()


def compare_logits(ref: torch.Tensor, out: torch.Tensor, rel_tol: float, min_agree: float = 0.999) -> dict:
    """Max abs difference relative to the logit scale, plus argmax agreement; asserts both."""
    assert ref.shape == out.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    diff = (ref - out).abs()
    scale = ref.abs().max().item()
    worst = diff.argmax().item()
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), ref.shape))
    agree = (ref.argmax(1) == out.argmax(1)).float().mean().item()
    report = dict(max_abs=diff.max().item(), scale=scale, rel=diff.max().item() / scale, agree=agree)
    bad = (diff > rel_tol * scale).sum().item()
    assert bad == 0, f"{bad} logits differ by more than {rel_tol:g} x {scale:.3g}; worst at {idx}: {report}"
    assert agree >= min_agree, f"argmax agreement {agree:.5f} < {min_agree}: {report}"
    return report


@pytest.fixture
def tmp_checkpoint(tmp_path):
    """Save a reference model with transformers' save_pretrained (the hub file format)."""

    def save(model, name: str = "ckpt", **kwargs: Any):
        path = tmp_path / name
        model.save_pretrained(path, **kwargs)
        return path

    return save
