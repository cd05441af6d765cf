"""Top-level names, Swin state_dict key set == the checkpoint file's, post_process_semantic_segmentation."""

from __future__ import annotations

import pytest
import torch

import upernet_fast
from conftest import make_reference, transformers

SWIN_CONFIGS = [
    dict(window_size=5),
    dict(window_size=12),
    dict(window_size=7, depths=[2, 2, 2, 2], embed_dim=24, num_heads=[2, 2, 4, 4]),
    dict(window_size=3, depths=[1, 1, 1, 1]),
]


def test_top_level_names():
    from upernet_fast import inference

    assert upernet_fast.slide_inference is inference.slide_inference
    assert upernet_fast.Segmenter is inference.Segmenter
    for name in upernet_fast.__all__:
        assert getattr(upernet_fast, name) is not None, name
    with pytest.raises(AttributeError):
        upernet_fast.no_such_name  # noqa: B018


def _file_keys(path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("overrides", SWIN_CONFIGS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_swin_state_dict_keys_are_the_files(overrides, tmp_checkpoint):
    ref = make_reference("swin", backbone_overrides=overrides)
    path = tmp_checkpoint(ref)
    on_disk = _file_keys(path)
    assert set(upernet_fast.load(path).state_dict()) == on_disk
    assert set(upernet_fast.load(ref).state_dict()) == on_disk


@pytest.mark.parametrize("overrides", SWIN_CONFIGS[:2], ids=["ws5", "ws12"])
def test_swin_file_without_final_norm_keeps_its_key_set(overrides, tmp_checkpoint, tmp_path):
    """Hub files (written before transformers 5) and mmseg conversions have no `backbone.swin.layernorm.*`:
    the loaded model must not report it either, and save_pretrained writes the same key set back."""
    from safetensors.torch import load_file, save_file

    path = tmp_checkpoint(make_reference("swin", backbone_overrides=overrides))
    state = {k: v for k, v in load_file(path / "model.safetensors").items() if ".swin.layernorm." not in k}
    save_file(state, path / "model.safetensors")
    model = upernet_fast.load(path)
    assert set(model.state_dict()) == set(state)
    model.save_pretrained(tmp_path / "resaved")
    assert _file_keys(tmp_path / "resaved") == set(state)
    transformers.UperNetForSemanticSegmentation.from_pretrained(tmp_path / "resaved")  # still loads


def _processor():
    # The hub UperNet checkpoints name SegformerImageProcessor; without torchvision it is the PIL variant.
    cls = getattr(transformers, "SegformerImageProcessorPil", None) or transformers.SegformerImageProcessor
    return cls()


@pytest.mark.parametrize("target_sizes", [None, [(37, 51), (64, 20)], "tensor"])
def test_post_process_semantic_segmentation_matches_transformers(target_sizes):
    ref = make_reference("convnext")
    model = upernet_fast.load(ref)
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(5)))
    reference_sizes = target_sizes
    if target_sizes == "tensor":  # transformers 5.24 itself fails on a tensor (numpy sizes): give it a list
        reference_sizes = [(50, 70), (33, 97)]
        target_sizes = torch.tensor(reference_sizes)
    expected = _processor().post_process_semantic_segmentation(outputs, target_sizes=reference_sizes)
    for got in (
        upernet_fast.post_process_semantic_segmentation(outputs, target_sizes),
        model.post_process_semantic_segmentation(outputs, target_sizes=target_sizes),
        upernet_fast.post_process_semantic_segmentation(outputs.logits, target_sizes),
        upernet_fast.post_process_semantic_segmentation((outputs.logits,), target_sizes),
    ):
        assert len(got) == len(expected) == 2
        for g, e in zip(got, expected, strict=True):
            assert g.dtype == torch.int64 and g.shape == e.shape
            assert torch.equal(g, e)


def test_post_process_rejects_wrong_number_of_sizes():
    with pytest.raises(ValueError, match="2 target sizes for a batch of 1"):
        upernet_fast.post_process_semantic_segmentation(torch.zeros(1, 3, 4, 4), [(4, 4), (5, 5)])


def test_parse_size_takes_hxw_text_and_integer_pairs() -> None:
    import numpy as np

    from upernet_fast.preprocess import parse_size

    assert parse_size("512x683") == parse_size(" 512X683 ") == parse_size((512, 683)) == (512, 683)
    assert parse_size((np.int64(97), 131)) == (97, 131)
    for bad in ("512", "512x", "axb", (512.0, 683), (512,), 512, None):
        with pytest.raises(ValueError, match="expected a size HxW"):
            parse_size(bad)
    for bad in ("0x683", (512, -1)):
        with pytest.raises(ValueError, match="sizes must be positive"):
            parse_size(bad)
