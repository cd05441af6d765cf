"""Bad input gets a clear, specific error (what was wrong, what was expected), each checked here."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import upernet_fast
from conftest import make_reference
from upernet_fast import CheckpointError, FastUperNet


@pytest.fixture(scope="module")
def model():
    return upernet_fast.load(make_reference("convnext"))


@pytest.fixture
def ckpt(tmp_checkpoint):
    return tmp_checkpoint(make_reference("convnext"))


def test_wrong_rank(model):
    with pytest.raises(ValueError, match=r"\(batch, channels, height, width\).*\(3, 64, 64\)"):
        model(torch.randn(3, 64, 64))


def test_wrong_channels(model):
    with pytest.raises(ValueError, match="1 channels, the model expects 3"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="64 channels, the model expects 3"):
        model(torch.randn(1, 64, 64, 3))  # NHWC by mistake


def test_integer_dtype(model):
    with pytest.raises(TypeError, match="floating-point.*uint8"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_dtype_mismatch(model):
    with pytest.raises(TypeError, match="float64 differs from the model's torch.float32"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.float64))


def test_too_small(model):
    with pytest.raises(ValueError, match="smaller than the backbone's total stride 32"):
        model(torch.randn(1, 3, 31, 200))


def test_empty_batch_returns_empty_outputs(model):
    """transformers returns (0, num_labels, H, W) for a batch of 0; so do we, in every output form."""
    ref = make_reference("convnext")
    x = torch.randn(0, 3, 64, 80)
    out = model(x)
    assert out.logits.shape == (0, 5, 64, 80) and out.logits.dtype == torch.float32
    with torch.no_grad():
        expected = ref(x, output_hidden_states=True)
    got = model(x, output_hidden_states=True)
    assert [h.shape for h in got.hidden_states] == [h.shape for h in expected.hidden_states]
    as_tuple = model(x, return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape == (0, 5, 64, 80)
    loss = model(x, labels=torch.zeros(0, 64, 80, dtype=torch.long)).loss
    assert loss.dim() == 0 and torch.isnan(loss)  # the mean over no pixels, as transformers gives
    with pytest.raises(ValueError, match="labels must have shape"):
        model(x, labels=torch.zeros(1, 64, 80, dtype=torch.long))


def test_not_a_tensor(model):
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[0.0]])


def test_bad_labels(model):
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="labels must have shape"):
        model(x, labels=torch.zeros(1, 32, 32, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        model(x, labels=torch.zeros(1, 64, 64))


def test_training_mode_refused(model):
    model.train()
    try:
        with pytest.raises(RuntimeError, match="inference-only"):
            model(torch.randn(1, 3, 64, 64))
    finally:
        model.eval()


def _rewrite(path, mutate):
    state = load_file(path / "model.safetensors")
    mutate(state)
    save_file(state, path / "model.safetensors")


def test_missing_key_named(ckpt):
    _rewrite(ckpt, lambda s: s.pop("decode_head.classifier.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): decode_head.classifier.weight"):
        upernet_fast.load(ckpt)


def test_unexpected_key_named(ckpt):
    _rewrite(ckpt, lambda s: s.__setitem__("decode_head.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): decode_head.extra.weight"):
        upernet_fast.load(ckpt)
    with pytest.warns(UserWarning, match=r"1 unexpected key\(s\): decode_head.extra.weight.*ignored"):
        assert upernet_fast.load(ckpt, strict=False) is not None


def test_non_strict_load_names_missing_and_unexpected_keys(ckpt):
    """transformers reports "newly initialized" weights; strict=False must not leave them random silently."""

    def mutate(state):
        state.pop("decode_head.classifier.weight")
        state["decode_head.extra.bias"] = torch.zeros(3)

    _rewrite(ckpt, mutate)
    with pytest.warns(UserWarning) as record:
        upernet_fast.load(ckpt, strict=False)
    assert len(record) == 1
    message = str(record[0].message)
    assert "1 missing key(s): decode_head.classifier.weight" in message
    assert "1 unexpected key(s): decode_head.extra.bias" in message
    assert "random" in message


def test_strict_false_on_a_matching_checkpoint_is_silent(ckpt, recwarn):
    upernet_fast.load(ckpt, strict=False)
    assert not [w for w in recwarn if "strict=False" in str(w.message)]


def test_shape_mismatch_named(ckpt):
    _rewrite(ckpt, lambda s: s.__setitem__("decode_head.classifier.bias", torch.zeros(7)))
    with pytest.raises(
        CheckpointError, match=r"decode_head.classifier.bias: checkpoint \(7,\) vs model \(5,\)"
    ):
        upernet_fast.load(ckpt)


def test_truncated_safetensors(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        upernet_fast.load(ckpt)


def test_legacy_non_zip_bin_loads(ckpt, tmp_path):
    """torch < 1.6 wrote pickles, not zip archives: mmap cannot open them; transformers loads them."""
    from safetensors.torch import load_file as read

    state = read(ckpt / "model.safetensors")
    os.remove(ckpt / "model.safetensors")
    torch.save(state, ckpt / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with open(ckpt / "pytorch_model.bin", "rb") as f:
        assert f.read(2) != b"PK"  # really the legacy format
    model = upernet_fast.load(ckpt)
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_corrupt_bin(ckpt):
    os.remove(ckpt / "model.safetensors")
    (ckpt / "pytorch_model.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="pytorch_model.bin is truncated or not a PyTorch checkpoint"):
        upernet_fast.load(ckpt)


def test_no_weights(ckpt):
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights in"):
        upernet_fast.load(ckpt)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        upernet_fast.load(tmp_path / "nope")


def test_config_without_backbone_config(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["backbone_config"] = {"hidden_sizes": [8, 16]}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="backbone_config has no 'model_type'"):
        upernet_fast.load(ckpt)
    cfg["backbone_config"] = None
    cfg["backbone"] = "timm/some-net"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="needs the backbone_config"):
        upernet_fast.load(ckpt)


@pytest.mark.parametrize("model_type", ["no-such-net", "bert"])
def test_unknown_backbone_type(model_type):
    """A short message (not transformers' list of every model type): native ones, then AutoBackbone."""
    with pytest.raises(ValueError) as info:
        FastUperNet.from_config({"backbone_config": {"model_type": model_type}})
    message = str(info.value)
    assert f"unknown backbone type {model_type!r}" in message
    assert "native backbones are convnext, resnet, swin" in message and "AutoBackbone" in message
    assert len(message) < 300 and "\n" not in message


def test_unknown_backbone_without_transformers(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("simulated: transformers not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ValueError, match="no native implementation.*transformers is not installed"):
        FastUperNet.from_config({"backbone_config": {"model_type": "dinov2"}})


def test_bad_backend():
    with pytest.raises(ValueError, match="unknown backend 'cuda'; valid choices: auto, triton, torch"):
        upernet_fast.load(make_reference("convnext"), backend="cuda")


def test_wrong_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "segformer"}))
    with pytest.raises(ValueError, match="model_type is 'segformer'; expected 'upernet'"):
        upernet_fast.load(tmp_path)


@pytest.mark.parametrize(
    "device,message",
    [
        ("nonsense", "not a device name"),
        ("meta", "holds no data"),
        pytest.param(
            "cuda",
            "not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here"),
        ),
    ],
)
def test_unusable_device(ckpt, device, message):
    """torch says AssertionError for a CPU-only build's 'cuda' and lists every device type for a typo."""
    with pytest.raises(ValueError, match=f"device '{device}' .*{message}"):
        upernet_fast.load(ckpt, device=device)


@pytest.mark.parametrize(
    "edit,error,message",
    [
        (lambda c: [1, 2], TypeError, "must be a JSON object"),
        (lambda c: {**c, "hidden_size": -1}, ValueError, "hidden_size must be a positive integer, got -1"),
        (lambda c: {**c, "pool_scales": []}, ValueError, "pool_scales must be positive"),
        (
            lambda c: {
                **c,
                "backbone_config": {**c["backbone_config"], "out_features": ["stage1", "stage2"]},
            },
            ValueError,
            "auxiliary head reads backbone level 2, but out_features gives 2 level",
        ),
    ],
)
def test_bad_config_values(ckpt, edit, error, message):
    """Config values that used to fail deep inside torch (a negative dimension) or as an IndexError."""
    path = ckpt / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(error, match=message):
        upernet_fast.load(ckpt)


def test_two_levels_with_explicit_auxiliary_channels_runs_but_its_loss_explains():
    """With auxiliary_in_channels set, transformers builds a 2-level model and runs it (its loss then fails
    with an IndexError); so do we, and our loss says why."""
    ref = make_reference("convnext", out_features=["stage2", "stage4"], auxiliary_in_channels=16)
    fast = upernet_fast.load(ref)
    x = torch.randn(1, 3, 64, 64)
    assert fast(x).logits.shape == (1, 5, 64, 64)
    with pytest.raises(ValueError, match="reads backbone level 2, but the backbone gives 2 level"):
        fast(x, labels=torch.zeros(1, 64, 64, dtype=torch.long))


def test_switches_must_be_booleans(ckpt):
    with pytest.raises(TypeError, match="winograd must be True, False or None, got 'no'"):
        upernet_fast.load(ckpt, winograd="no")


def test_labels_out_of_range(model):
    labels = torch.zeros(1, 64, 64, dtype=torch.long)
    labels[0, 3, 4] = 5  # 5 classes: 0..4 (255 is the ignore index and is fine)
    labels[0, 5, 6] = 255
    with pytest.raises(ValueError, match=r"class index 5 \(1 pixel\(s\) out of range\); expected 0..4"):
        model(torch.randn(1, 3, 64, 64), labels=labels)
