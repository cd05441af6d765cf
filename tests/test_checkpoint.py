"""Weights format: state_dict keys/shapes equal transformers' checkpoint file, round trips both ways,
every source `load()` accepts (safetensors, .bin, sharded, hub cache offline, in-memory, from_config)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors import safe_open

import upernet_fast
from conftest import compare_logits, make_reference
from upernet_fast import FastUperNet

BACKBONES = ["convnext", "swin", "resnet"]


def _file_keys(path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.mark.parametrize("kind", BACKBONES)
def test_state_dict_equals_checkpoint_file(kind, tmp_checkpoint):
    path = tmp_checkpoint(make_reference(kind))
    fast = upernet_fast.load(path)
    ours = {k: tuple(v.shape) for k, v in fast.state_dict().items()}
    assert ours == _file_keys(path)


@pytest.mark.parametrize("kind", BACKBONES)
def test_round_trip_through_transformers(kind, tmp_path):
    """ours → save_pretrained → transformers.from_pretrained → identical outputs, and back again."""
    transformers = pytest.importorskip("transformers")
    ref = make_reference(kind, seed=3)
    fast = upernet_fast.load(ref)
    fast.save_pretrained(tmp_path / "ours")
    reloaded_ref = transformers.UperNetForSemanticSegmentation.from_pretrained(tmp_path / "ours").eval()
    x = torch.randn(1, 3, 67, 93, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # transformers' own save/load round trip differs by ~1e-6 (its head), hence a tolerance
        torch.testing.assert_close(reloaded_ref(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)
    # and transformers' own file back into ours gives the same tensors
    reloaded_ref.save_pretrained(tmp_path / "theirs")
    again = upernet_fast.load(tmp_path / "theirs")
    for k, v in fast.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "upernet"


def test_bf16_model_saves_and_reloads_as_bf16(tmp_path):
    """save_pretrained of a bf16 model writes config `dtype` bfloat16 (as transformers does), so both loaders
    give a bf16 model back with the same tensors, not the source config's float32."""
    transformers = pytest.importorskip("transformers")
    src = tmp_path / "src"
    make_reference("convnext", seed=7).save_pretrained(src)  # config says float32
    fast = upernet_fast.load(src, dtype="bfloat16")
    fast.save_pretrained(tmp_path / "bf16")
    raw = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert raw["dtype"] == "bfloat16" and "torch_dtype" not in raw
    again = upernet_fast.load(tmp_path / "bf16")
    assert again.dtype == torch.bfloat16
    for k, v in fast.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    theirs = transformers.UperNetForSemanticSegmentation.from_pretrained(tmp_path / "bf16")
    assert theirs.dtype == torch.bfloat16


def test_in_memory_swin_layout_loads():
    ref = make_reference("swin", seed=4)
    fast = upernet_fast.load(ref)
    other = make_reference("swin", seed=5)
    fresh = FastUperNet.from_config(other.config)
    fresh.load_state_dict(ref.state_dict())
    for k, v in fast.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def test_pytorch_bin_and_sharded(tmp_checkpoint):
    ref = make_reference("convnext", seed=6)
    x = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x).logits
    bin_dir = tmp_checkpoint(ref, "bin")
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    os.remove(bin_dir / "model.safetensors")
    torch.save(state, bin_dir / "pytorch_model.bin")
    sharded = tmp_checkpoint(ref, "sharded", max_shard_size="20KB")
    assert any(p.name.endswith(".index.json") for p in sharded.iterdir()), "expected a sharded checkpoint"
    for path in (bin_dir, sharded):
        with torch.no_grad():
            compare_logits(expected, upernet_fast.load(path)(x).logits, 1e-4)


def test_hub_cache_offline(tmp_path, tmp_checkpoint):
    """A hub id resolves through huggingface_hub's cache with HF_HUB_OFFLINE=1 (no network here)."""
    pytest.importorskip("huggingface_hub")
    ref = make_reference("convnext", seed=7)
    src = tmp_checkpoint(ref, "src")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--openmmlab--upernet-test"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in src.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    x_path = tmp_path / "x.pt"
    torch.save(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)), x_path)
    with torch.no_grad():
        torch.save(ref(torch.load(x_path)).logits, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import torch, upernet_fast
        m = upernet_fast.load("openmmlab/upernet-test")
        with torch.no_grad():
            out = m(torch.load({str(x_path)!r})).logits
        torch.testing.assert_close(out, torch.load({str(tmp_path / "expected.pt")!r}), rtol=1e-4, atol=1e-4)
        try:
            upernet_fast.load("openmmlab/not-cached")
        except FileNotFoundError as e:
            assert "openmmlab/not-cached" in str(e), e
        else:
            raise AssertionError("uncached hub id must fail")
        print("OK")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]


def test_from_config_sources(tmp_checkpoint):
    transformers = pytest.importorskip("transformers")
    ref = make_reference("convnext", seed=8)
    path = tmp_checkpoint(ref)
    for source in (ref.config, ref.config.to_dict(), path / "config.json", path):
        model = FastUperNet.from_config(source)
        assert not model.training
        assert model.config.num_labels == 5
        assert isinstance(model.config.backbone_config, dict)
    assert isinstance(transformers.UperNetConfig, type)


def test_load_device_dtype(tmp_checkpoint):
    path = tmp_checkpoint(make_reference("convnext", seed=9))
    m = upernet_fast.load(path, dtype=torch.float64)
    assert m.dtype == torch.float64 and not m.training
    with torch.no_grad():
        out = m(torch.randn(1, 3, 64, 64, dtype=torch.float64)).logits
    assert out.dtype == torch.float64


def test_folded_weights_follow_state_dict_changes():
    """Caches of folded weights must be rebuilt when weights change after a forward."""
    ref_a, ref_b = make_reference("convnext", seed=10), make_reference("convnext", seed=11)
    fast = upernet_fast.load(ref_a)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fast(x)
        fast.load_state_dict(ref_b.state_dict())
        compare_logits(ref_b(x).logits, fast(x).logits, 1e-4)


def test_old_swin_file_without_unused_final_norm(tmp_checkpoint):
    """Older hub Swin files lack `backbone.swin.layernorm.*` (a norm SwinBackbone never applies)."""
    from safetensors.torch import load_file, save_file

    ref = make_reference("swin", seed=12)
    path = tmp_checkpoint(ref)
    state = load_file(path / "model.safetensors")
    dropped = [k for k in state if k.startswith("backbone.swin.layernorm.")]
    assert dropped, "transformers no longer writes the final Swin norm; update this test"
    for k in dropped:
        del state[k]
    save_file(state, path / "model.safetensors")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        compare_logits(ref(x).logits, upernet_fast.load(path)(x).logits, 1e-4)


@pytest.mark.parametrize(
    "given,expected",
    [
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        ("float32", torch.float32),
        ("fp32", torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_load_dtype_names(given, expected, tmp_checkpoint):
    path = tmp_checkpoint(make_reference("convnext", seed=13))
    assert upernet_fast.load(path, dtype=given).dtype == expected
    assert upernet_fast.load(path, torch_dtype=given).dtype == expected  # transformers' older spelling


def test_load_dtype_errors(tmp_checkpoint):
    path = tmp_checkpoint(make_reference("convnext", seed=13))
    with pytest.raises(ValueError, match="dtype 'int8' is not supported.*bfloat16"):
        upernet_fast.load(path, dtype="int8")
    with pytest.raises(ValueError, match="disagree"):
        upernet_fast.load(path, dtype="float32", torch_dtype="bfloat16")


def test_load_keeps_the_source_dtype(tmp_checkpoint):
    """A bf16 transformers model (in memory or saved) stays bf16 unless a dtype is given, as in transformers 5."""
    ref = make_reference("convnext", seed=14).to(torch.bfloat16)
    fast = upernet_fast.load(ref)
    assert fast.dtype == torch.bfloat16
    for k, v in ref.state_dict().items():
        if k in fast.state_dict() and v.is_floating_point():
            assert torch.equal(fast.state_dict()[k], v), k
    assert upernet_fast.load(ref, dtype="float32").dtype == torch.float32
    assert upernet_fast.load(ref, dtype="auto").dtype == torch.bfloat16
    path = tmp_checkpoint(ref, "bf16")
    assert upernet_fast.load(path).dtype == torch.bfloat16
    assert upernet_fast.load(path, dtype="fp32").dtype == torch.float32
    assert (
        upernet_fast.load(tmp_checkpoint(make_reference("convnext", seed=14), "fp32")).dtype == torch.float32
    )


def test_segmenter_from_pretrained_dtype(tmp_checkpoint):
    from upernet_fast.inference import Segmenter

    path = tmp_checkpoint(make_reference("convnext", seed=15))
    seg = Segmenter.from_pretrained(path, dtype="bfloat16", size=(64, 64))
    assert seg.model.dtype == torch.bfloat16
    labels = seg(np.zeros((40, 50, 3), dtype=np.uint8))
    assert labels.shape == (40, 50)
