"""Pipeline: preprocessing vs the hub image processor, mmseg sliding window, labels at size, Segmenter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from upernet_fast import inference, preprocess
from upernet_fast.inference import Segmenter, labels_at_size, slide_inference

torch.set_num_threads(1)


class FakeSegModel(nn.Module):
    """Deterministic logits that depend on local content AND on the crop as a whole (its mean and its size),
    so any windowing mistake changes the result. Returns `.logits` at the input size, like UperNet."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 3, padding=1)
        self.conv.weight.data = torch.randn(self.conv.weight.shape, generator=gen)
        self.conv.bias.data = torch.randn(num_classes, generator=gen)
        self.mix = nn.Parameter(torch.randn(num_classes, 3, generator=gen))
        self.calls: list[tuple[int, ...]] = []

    def forward(self, pixel_values: torch.Tensor):
        self.calls.append(tuple(pixel_values.shape))
        h, w = pixel_values.shape[-2:]
        context = torch.einsum("kc,bc->bk", self.mix, pixel_values.mean((2, 3)))[..., None, None]
        logits = self.conv(pixel_values) + context + 0.01 * (h + 2 * w)
        return type("Out", (), {"logits": logits})()


def naive_slide(model, img, crop, stride, num_classes):
    """mmseg 1.x `EncoderDecoder.slide_inference`, transcribed loop for loop (one window at a time, F.pad)."""
    h_stride, w_stride = stride
    h_crop, w_crop = crop
    batch_size, _, h_img, w_img = img.size()
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = img.new_zeros((batch_size, num_classes, h_img, w_img))
    count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            crop_img = img[:, :, y1:y2, x1:x2]
            crop_seg_logit = model(pixel_values=crop_img).logits
            preds += F.pad(
                crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2))
            )
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    return preds / count_mat


def random_image(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), channels), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(base.squeeze()).resize((w, h), Image.BICUBIC))
    noise = rng.integers(-20, 21, smooth.shape)
    return np.clip(smooth.astype(int) + noise, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- preprocessing
def hub_processor():
    """The processor the hub checkpoints use (`SegformerImageProcessor()` defaults), built locally.
    transformers 5 serves it with the PIL backend when torchvision is absent."""
    seg = pytest.importorskip("transformers.models.segformer.image_processing_pil_segformer")
    return seg.SegformerImageProcessorPil()


@pytest.mark.parametrize("shape", [(97, 131), (600, 480), (512, 512), (40, 700)])
def test_preprocess_equals_hub_processor_bitwise(shape):
    """Tolerance 0: same PIL resize, same float32 operations (as a lookup table)."""
    processor = hub_processor()
    assert processor.size == {"height": 512, "width": 512} or processor.size.height == 512
    image = random_image(*shape, seed=shape[0])
    expected = torch.as_tensor(np.asarray(processor(images=image, return_tensors="np").pixel_values))
    for source in (image, Image.fromarray(image)):
        got = preprocess.preprocess(source)
        assert got.dtype == torch.float32 and got.shape == (1, 3, 512, 512)
        diff = (got - expected).abs().max().item()
        assert diff == 0.0, f"max abs diff {diff}"


def test_preprocess_batch_equals_hub_processor():
    processor = hub_processor()
    images = [random_image(70, 90, seed=s) for s in range(3)]
    expected = torch.as_tensor(np.asarray(processor(images=images, return_tensors="np").pixel_values))
    assert torch.equal(preprocess.preprocess(images), expected)


def test_preprocess_matches_torchvision_processor_if_installed():
    """The torchvision backend resizes with torch's antialiased bilinear: ±1 uint8 level -> atol 1/255/std."""
    seg = pytest.importorskip("transformers.models.segformer.image_processing_segformer")
    pytest.importorskip("torchvision")
    image = random_image(300, 411, seed=3)
    expected = torch.as_tensor(
        np.asarray(seg.SegformerImageProcessor()(images=image, return_tensors="np").pixel_values)
    )
    torch.testing.assert_close(preprocess.preprocess(image), expected, atol=1.01 / 255 / 0.224, rtol=0)


def test_grayscale_and_rgba_become_rgb():
    rgb = random_image(50, 60, seed=1)
    gray = random_image(50, 60, seed=2, channels=1)
    as_rgb = np.repeat(gray[..., None], 3, axis=2)
    ref = preprocess.preprocess(as_rgb, size=None)
    for source in (gray, gray[..., None], Image.fromarray(gray)):
        assert torch.equal(preprocess.preprocess(source, size=None), ref)
    alpha = np.random.default_rng(0).integers(0, 256, (50, 60, 1), dtype=np.uint8)
    rgba = np.concatenate([rgb, alpha], axis=2)
    # transformers' convert_to_rgb: composite onto white
    white = rgb * (alpha / 255.0) + 255 * (1 - alpha / 255.0)
    got = np.asarray(preprocess.load_image(rgba), dtype=np.float64)
    assert np.abs(got - white).max() <= 1.0
    assert preprocess.load_image(Image.fromarray(rgba)).mode == "RGB"
    assert preprocess.load_image(Image.fromarray(gray.astype(np.uint16) * 257)).mode == "RGB"


def test_16_bit_and_float_pil_images_scale_by_mode(tmp_path):
    """16-bit levels are scaled by the mode, not the values: a dark 16-bit image whose every level is
    <= 255 stays dark (it was read as 8-bit levels, 257x too bright, unless one pixel exceeded 255).
    Float ("F") images hold [0, 1] like float arrays; NaN and out-of-range values are refused."""
    dark = np.full((40, 50), 200, np.uint16)
    brighter = dark.copy()
    brighter[0, 0] = 256
    for arr in (dark, brighter):
        Image.fromarray(arr).save(tmp_path / "x.png")
        with Image.open(tmp_path / "x.png") as im:
            assert im.mode.startswith("I")
        got = np.asarray(preprocess.load_image(tmp_path / "x.png"))
        assert (got[5:, 5:] == 1).all()  # 200 / 257 rounds to level 1
    assert (np.asarray(preprocess.load_image(Image.fromarray(dark.astype(np.int32) * 257))) == 200).all()
    with pytest.raises(ValueError, match="16-bit levels 0-65535"):
        preprocess.load_image(Image.fromarray(np.full((4, 4), 70000, np.int32)))
    ramp = np.linspace(0, 1, 40 * 50, dtype=np.float32).reshape(40, 50)
    expected = np.asarray(preprocess.load_image(ramp))
    assert np.array_equal(np.asarray(preprocess.load_image(Image.fromarray(ramp, mode="F"))), expected)
    ramp[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        preprocess.load_image(Image.fromarray(ramp, mode="F"))


def test_keep_ratio_size_is_mmcv_rescale():
    assert preprocess.keep_ratio_size(3000, 4000, 512) == (512, 683)  # 4000 * 512/3000 = 682.67
    assert preprocess.keep_ratio_size(480, 640, 512, 2048) == (512, 683)
    assert preprocess.keep_ratio_size(500, 10000, 512, 2048) == (102, 2048)  # long side caps
    assert preprocess.processed_size(10, 20, size=(64, 32)) == (64, 32)
    assert preprocess.processed_size(10, 20, size=None) == (10, 20)


def test_bad_inputs_raise():
    with pytest.raises(TypeError):
        preprocess.load_image(np.zeros((4, 4, 3), dtype=np.int32))  # floats in [0, 1] are accepted
    with pytest.raises(ValueError):
        preprocess.load_image(np.zeros((4, 4, 5), dtype=np.uint8))
    with pytest.raises(TypeError):
        preprocess.load_image(42)


# ----------------------------------------------------------------------------- sliding window
@pytest.mark.parametrize(
    "size,crop,stride",
    [
        ((97, 131), (40, 50), (27, 33)),
        ((61, 45), (64, 32), (43, 21)),
        ((50, 50), (50, 50), (30, 30)),
        ((33, 200), (16, 64), (16, 64)),
    ],
)
@pytest.mark.parametrize("batch_size", [1, 5])
def test_slide_inference_equals_naive_mmseg(size, crop, stride, batch_size):
    model = FakeSegModel()
    img = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    expected = naive_slide(model, img, crop, stride, 5)
    got = slide_inference(model, img, crop, stride, batch_size=batch_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_slide_windows_cover_and_stay_inside():
    windows = inference.slide_windows(97, 131, (40, 50), (27, 33))
    assert len(windows) == ((97 - 40 + 26) // 27 + 1) * ((131 - 50 + 32) // 33 + 1)
    assert all(y2 - y1 == 40 and x2 - x1 == 50 and y2 <= 97 and x2 <= 131 for y1, y2, x1, x2 in windows)


def test_slide_inference_real_upernet():
    transformers = pytest.importorskip("transformers")
    config = transformers.UperNetConfig(
        backbone_config=transformers.ConvNextConfig(
            hidden_sizes=[8, 16, 24, 32],
            depths=[1, 1, 1, 1],
            out_features=["stage1", "stage2", "stage3", "stage4"],
        ),
        hidden_size=16,
        auxiliary_in_channels=24,
        auxiliary_channels=8,
        num_labels=4,
    )
    model = transformers.UperNetForSemanticSegmentation(config).eval()
    img = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        expected = naive_slide(model, img, (64, 64), (43, 43), 4)
    torch.testing.assert_close(
        slide_inference(model, img, (64, 64), (43, 43), num_classes=4, batch_size=3),
        expected,
        rtol=1e-4,
        atol=1e-4,
    )


# ----------------------------------------------------------------------------- labels at size
def _assert_labels_match(logits, size, got):
    """Equal to argmax(F.interpolate) except where the reference's top two scores are within 1e-4 (ties)."""
    ref_scores = F.interpolate(
        logits if logits.dim() == 4 else logits[None], size=size, mode="bilinear", align_corners=False
    )
    ref = ref_scores.argmax(1)
    top2 = ref_scores.topk(2, dim=1).values
    near_tie = (top2[:, 0] - top2[:, 1]) < 1e-4
    ref = ref if logits.dim() == 4 else ref[0]
    near_tie = near_tie if logits.dim() == 4 else near_tie[0]
    assert got.dtype == torch.int64 and got.shape == ref.shape
    mismatch = (got != ref) & ~near_tie
    assert not mismatch.any(), f"{int(mismatch.sum())} mismatches, first at {mismatch.nonzero()[0].tolist()}"


@pytest.mark.parametrize(
    "in_size,out_size",
    [
        ((16, 20), (97, 131)),
        ((64, 64), (33, 47)),
        ((31, 17), (31, 60)),
        ((13, 29), (200, 29)),
        ((8, 8), (8, 8)),
    ],
)
def test_labels_at_size_equals_argmax_of_resize(in_size, out_size):
    logits = torch.randn(2, 7, *in_size, generator=torch.Generator().manual_seed(0))
    _assert_labels_match(logits, out_size, labels_at_size(logits, out_size))
    _assert_labels_match(logits[1], out_size, labels_at_size(logits[1], out_size))
    # (small row blocks of the fused op itself: tests/test_kernels_torch.py::test_resize_argmax_torch)


# ----------------------------------------------------------------------------- Segmenter
def test_segmenter_inputs_and_sizes(tmp_path):
    model = FakeSegModel()
    seg = Segmenter(model, size=(48, 64), batch_size=4)
    arr = random_image(70, 90, seed=5)
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    single = seg(arr)
    assert isinstance(single, np.ndarray) and single.dtype == np.int64 and single.shape == (70, 90)
    for source in (Image.fromarray(arr), path, str(path)):
        assert np.array_equal(seg(source), single)
    model.calls.clear()
    out = seg([arr, random_image(30, 200, seed=6), path, random_image(30, 40, seed=7, channels=1)])
    assert [o.shape for o in out] == [(70, 90), (30, 200), (70, 90), (30, 40)]
    assert np.array_equal(out[0], single) and np.array_equal(out[2], single)
    assert model.calls == [(4, 3, 48, 64)]  # one batch: all processed to the same size

    pixel_values = preprocess.preprocess(arr, size=(48, 64))
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
    _assert_labels_match(logits[0], (70, 90), torch.from_numpy(single))


def test_segmenter_groups_by_processed_size():
    model = FakeSegModel()
    seg = Segmenter(model, keep_ratio_short_side=32, batch_size=8)
    images = [random_image(64, 96, seed=1), random_image(40, 40, seed=2), random_image(128, 192, seed=3)]
    out = seg(images)
    assert [o.shape for o in out] == [(64, 96), (40, 40), (128, 192)]
    assert sorted(model.calls) == sorted([(2, 3, 32, 48), (1, 3, 32, 32)])


def test_segmenter_slide_matches_manual():
    model = FakeSegModel()
    seg = Segmenter(model, mode="slide", crop_size=(32, 32), stride=(21, 21), keep_ratio_short_side=40)
    arr = random_image(77, 101, seed=8)
    pixel_values = preprocess.preprocess(arr, keep_ratio_short_side=40)
    assert pixel_values.shape[-2:] == (40, 52)
    logits = naive_slide(model, pixel_values, (32, 32), (21, 21), 5)
    _assert_labels_match(logits[0], (77, 101), torch.from_numpy(seg(arr)))


def test_segmenter_tta_averages_probabilities():
    model = FakeSegModel()
    arr = random_image(40, 56, seed=9)
    image = preprocess.load_image(arr)
    seg = Segmenter(model, size=(32, 48), flip=True, scales=[0.5, 1.0])
    scores = seg.predict_scores([image], (32, 48))
    expected = 0
    for size in ((16, 24), (32, 48)):
        pv = preprocess.preprocess(arr, size=size)
        for flip in (False, True):
            with torch.no_grad():
                lg = model(pixel_values=pv.flip(-1) if flip else pv).logits
            lg = lg.flip(-1) if flip else lg
            expected = expected + F.interpolate(
                lg, size=(32, 48), mode="bilinear", align_corners=False
            ).softmax(1)
    torch.testing.assert_close(scores, expected / 4, rtol=1e-5, atol=1e-6)
    assert seg(arr).shape == (40, 56)


def test_large_photo_slide_never_builds_full_resolution_logits(monkeypatch):
    """4000x3000 in slide mode with 150 classes: logits live at the processed size (683x512), labels are
    produced in row blocks; no tensor near 150 x 3000 x 4000 (7.2 GB) is ever created."""

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, 150, 1)

        def forward(self, pixel_values):
            return type(
                "Out",
                (),
                {
                    "logits": self.proj(F.avg_pool2d(pixel_values, 8))
                    .repeat_interleave(8, -1)
                    .repeat_interleave(8, -2)
                },
            )()

    largest = [0]
    real_interpolate = F.interpolate

    def spy(*args, **kwargs):
        out = real_interpolate(*args, **kwargs)
        largest[0] = max(largest[0], out.numel())
        return out

    seen = []
    real_labels_at_size = inference.labels_at_size

    def spy_labels(logits, size, backend=None):
        seen.append(tuple(logits.shape))
        return real_labels_at_size(logits, size, backend)

    monkeypatch.setattr(F, "interpolate", spy)
    monkeypatch.setattr(inference, "labels_at_size", spy_labels)
    photo = np.zeros((3000, 4000, 3), dtype=np.uint8)
    photo[:, 2000:] = 200
    seg = Segmenter(Wide(), mode="slide")  # crop 512, stride 341, short side 512 (mmseg ADE20K)
    assert seg.processed_size(3000, 4000) == (512, 683)
    labels = seg(photo)
    assert labels.shape == (3000, 4000) and labels.dtype == np.int64
    assert seen == [(150, 512, 683)]  # logits accumulated at the processed size
    assert largest[0] <= 150 * 512 * 683  # no interpolation result beyond the processed size
    assert (labels[:, :1900] == labels[0, 0]).all() and (labels[:, 2100:] == labels[0, -1]).all()


def test_load_model_and_default_path():
    assert (inference.default_model_path() / "config.json").is_file()
    module = FakeSegModel()
    assert inference.load_model(module) is module


# ----------------------------------------------------------------------------- EXIF, tensors, probabilities
def exif_rotated_jpeg(path, orientation: int = 6, size=(80, 60)):
    """A JPEG stored `size` = (width, height) with an EXIF orientation tag, as phones write portrait shots."""
    stored = Image.fromarray(random_image(size[1], size[0], seed=11))
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, quality=95, exif=exif)
    return stored


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_like_transformers(tmp_path, orientation):
    """Orientation 6/8: stored 80 wide x 60 high, shown 60 wide x 80 high; the mask must be 80x60 (H x W)."""
    path = tmp_path / "phone.jpg"
    exif_rotated_jpeg(path, orientation)
    with Image.open(path) as raw:
        assert raw.size == (80, 60) and raw.getexif()[0x0112] == orientation
    expected_hw = (60, 80) if orientation == 3 else (80, 60)
    loaded = preprocess.load_image(path)
    assert (loaded.height, loaded.width) == expected_hw
    image_utils = pytest.importorskip("transformers.image_utils")
    reference = np.asarray(image_utils.load_image(str(path)))  # what transformers' pipeline segments
    assert np.array_equal(np.asarray(loaded), reference)
    seg = Segmenter(FakeSegModel(), size=(32, 32))
    assert seg(path).shape == expected_hw
    with Image.open(path) as im:
        im.load()
        assert seg(im).shape == expected_hw  # a PIL image with the tag, too
        assert im.size == (80, 60)  # the caller's image is not modified


def test_tensor_and_float_inputs_match_uint8():
    """HxWx3 / 3xHxW tensors and float arrays/tensors in [0, 1] give the uint8 array's labels."""
    seg = Segmenter(FakeSegModel(), size=(32, 48))
    arr = random_image(45, 70, seed=12)
    expected = seg(arr)
    as_float = arr.astype(np.float32) / 255
    sources = [
        torch.from_numpy(arr),  # HxWx3 uint8
        torch.from_numpy(arr).permute(2, 0, 1),  # 3xHxW uint8 (torchvision layout)
        torch.from_numpy(as_float).permute(2, 0, 1),  # 3xHxW float in [0, 1]
        torch.from_numpy(as_float),  # HxWx3 float
        torch.from_numpy(as_float).permute(2, 0, 1).to(torch.float16),
        as_float,  # float32 array
        as_float.astype(np.float64),
    ]
    for source in sources:
        assert np.array_equal(seg(source), expected), (type(source), getattr(source, "shape", None))
    out = seg([torch.from_numpy(arr).permute(2, 0, 1), arr])
    assert np.array_equal(out[0], expected) and np.array_equal(out[1], expected)
    gray = random_image(30, 40, seed=13, channels=1)
    assert seg(torch.from_numpy(gray)[None]).shape == (30, 40)  # 1xHxW


def test_bad_tensor_and_float_inputs():
    with pytest.raises(ValueError, match=r"\[0, 1\].*normalised"):
        preprocess.load_image(np.full((4, 4, 3), 2.0, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        preprocess.load_image(torch.full((3, 4, 4), -0.5))
    with pytest.raises(ValueError, match="3xHxW or HxWx3"):
        preprocess.load_image(torch.zeros(2, 3, 8, 8))
    with pytest.raises(TypeError, match="uint8 or float"):
        preprocess.load_image(torch.zeros(3, 8, 8, dtype=torch.int32))


def _reference_probs(scores, size):
    return F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0].softmax(0)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_return_probs_at_original_size(mode):
    model = FakeSegModel()
    kwargs = dict(mode="slide", crop_size=(32, 32), stride=(21, 21), keep_ratio_short_side=40)
    seg = Segmenter(model, **kwargs) if mode == "slide" else Segmenter(model, size=(32, 48))
    arr = random_image(77, 101, seed=14)
    labels, probs = seg(arr, return_probs=True)
    assert probs.shape == (5, 77, 101) and probs.dtype == np.float32 and labels.shape == (77, 101)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    image = preprocess.load_image(arr)
    scores = seg.predict_scores([image], seg.processed_size(77, 101))[0]
    np.testing.assert_allclose(probs, _reference_probs(scores, (77, 101)).numpy(), atol=2e-6, rtol=0)
    assert np.array_equal(labels, probs.argmax(0))
    assert np.array_equal(labels, seg(arr))  # the labels return_probs=False gives
    pairs = seg([arr, random_image(30, 40, seed=15)], return_probs=True)
    assert [p.shape for _, p in pairs] == [(5, 77, 101), (5, 30, 40)]


def test_return_probs_with_tta_resizes_averaged_probabilities():
    seg = Segmenter(FakeSegModel(), size=(32, 48), flip=True, scales=[0.5, 1.0])
    arr = random_image(50, 61, seed=16)
    _, probs = seg(arr, return_probs=True)
    scores = seg.predict_scores([preprocess.load_image(arr)], (32, 48))[0]  # averaged softmax
    expected = F.interpolate(scores[None], size=(50, 61), mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(probs, expected.numpy(), atol=2e-6, rtol=0)


def test_probs_at_size_blocks_and_memory(monkeypatch):
    """Row blocks give F.interpolate + softmax; no intermediate reaches the full-size C x H x W."""
    scores = torch.randn(150, 32, 43, generator=torch.Generator().manual_seed(0))
    size = (300, 401)
    largest = [0]
    real_interpolate = F.interpolate

    def spy(*args, **kwargs):
        out = real_interpolate(*args, **kwargs)
        largest[0] = max(largest[0], out.numel())
        return out

    monkeypatch.setattr(F, "interpolate", spy)
    labels, probs = inference.probs_at_size(scores, size, block_elements=150 * 401 * 16)
    monkeypatch.undo()
    assert largest[0] <= 150 * 401 * 16
    torch.testing.assert_close(probs, _reference_probs(scores, size), atol=2e-6, rtol=0)
    assert torch.equal(labels, probs.argmax(0))
    for out_size in ((32, 43), (7, 90), (64, 10)):  # same size, shrink one side, grow the other
        _, probs = inference.probs_at_size(scores[:4], out_size, block_elements=64)
        torch.testing.assert_close(probs, _reference_probs(scores[:4], out_size), atol=2e-6, rtol=0)


def test_degenerate_sizes_are_refused():
    from upernet_fast.postprocess import post_process_semantic_segmentation

    with pytest.raises(ValueError, match="image of 0x5 pixels"):
        preprocess.load_image(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="target sizes must be"):
        post_process_semantic_segmentation(torch.zeros(1, 3, 8, 8), [(0, 20)])
    with pytest.raises(ValueError, match="crop_size and stride must be positive"):
        slide_inference(FakeSegModel(), torch.zeros(1, 3, 64, 64), (32, 32), (0, 0))
    with pytest.raises(ValueError, match="batch of 0"):
        slide_inference(FakeSegModel(), torch.zeros(0, 3, 64, 64), (32, 32), (16, 16))


def test_segmenter_from_a_module():
    """A model object (transformers' or ours) is used as it is: its repr was taken for a folder path."""
    model = FakeSegModel()
    assert Segmenter.from_pretrained(model).model is model


def test_too_small_after_preprocessing_names_the_users_image():
    """A 40x4000 image in slide mode shrinks to 5x512: the error names both sizes, not only the resized one."""
    seg = Segmenter.from_pretrained(None, mode="slide")
    with pytest.raises(ValueError, match="image of 40x4000 becomes 5x512 after preprocessing"):
        seg(np.zeros((40, 4000, 3), np.uint8))
    with pytest.raises(ValueError, match="mean and std must be 3 values"):
        Segmenter(seg.model, mean=(0.5, 0.5))
