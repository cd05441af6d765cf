"""`upernet-fast` CLI end to end, in process and once through the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from upernet_fast import cli
from upernet_fast.inference import default_model_path

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random 5-class UperNet in HF format (what `save_pretrained` writes)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.UperNetConfig(
        backbone_config=transformers.ConvNextConfig(
            hidden_sizes=[8, 16, 24, 32],
            depths=[1, 1, 1, 1],
            out_features=["stage1", "stage2", "stage3", "stage4"],
        ),
        hidden_size=16,
        auxiliary_in_channels=24,
        auxiliary_channels=8,
        num_labels=5,
        id2label={i: f"cls{i}" for i in range(5)},
        label2id={f"cls{i}": i for i in range(5)},
    )
    path = tmp_path_factory.mktemp("tiny")
    transformers.UperNetForSemanticSegmentation(config).save_pretrained(path)
    return path


@pytest.fixture()
def image_dir(tmp_path):
    """Real images of several sizes and modes, plus a truncated PNG; and a .txt outside the directory."""
    rng = np.random.default_rng(0)
    src = tmp_path / "images"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(src / "a.png")
    Image.fromarray(rng.integers(0, 256, (45, 33), dtype=np.uint8)).save(src / "gray.png")
    Image.fromarray(rng.integers(0, 256, (40, 64, 4), dtype=np.uint8)).save(src / "sub" / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)).save(src / "b.jpg", quality=90)
    good = (src / "a.png").read_bytes()
    (src / "truncated.png").write_bytes(good[: len(good) // 2])
    (src / "notes.md").write_text("not an image, and skipped: directories only yield image suffixes")
    bad_txt = tmp_path / "readme.txt"
    bad_txt.write_text("hello")
    return src, bad_txt


EXPECTED = {"a": (70, 90), "gray": (45, 33), "sub/rgba": (40, 64), "b": (50, 50)}


def _check_outputs(out, overlay: bool, num_labels: int):
    for stem, (h, w) in EXPECTED.items():
        label = Image.open(out / f"{stem}.png")
        assert label.mode == "P" and label.size == (w, h), (stem, label.mode, label.size)
        assert np.asarray(label).max() < num_labels
        assert (out / f"{stem}_overlay.png").is_file() == overlay
        if overlay:
            assert Image.open(out / f"{stem}_overlay.png").height >= h
    assert not (out / "truncated.png").exists()


def test_segment_in_process_with_bad_files(tiny_model_dir, image_dir, tmp_path, capsys):
    src, bad_txt = image_dir
    out = tmp_path / "out"
    status = cli.main(
        ["segment", str(src), str(bad_txt), "--model", str(tiny_model_dir), "--out", str(out), "--overlay"]
    )
    err = capsys.readouterr().err
    assert status != 0
    assert "truncated.png" in err and "readme.txt" in err
    assert "notes.md" not in err
    _check_outputs(out, overlay=True, num_labels=5)


def test_segment_slide_mode_and_tta(tiny_model_dir, image_dir, tmp_path):
    src, _ = image_dir
    (src / "truncated.png").unlink()
    out = tmp_path / "out"
    status = cli.main(
        [
            "segment",
            str(src),
            "--model",
            str(tiny_model_dir),
            "--out",
            str(out),
            "--mode",
            "slide",
            "--short-side",
            "64",
            "--flip",
            "--quiet",
        ]
    )
    assert status == 0
    _check_outputs(out, overlay=False, num_labels=5)


def test_segment_default_embedded_model_and_name_clashes(tmp_path, capsys):
    rng = np.random.default_rng(1)
    for name in ("x.png", "x.jpg"):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / name)
    status = cli.main(
        [
            "segment",
            str(tmp_path / "x.png"),
            str(tmp_path / "x.jpg"),
            "--out",
            str(tmp_path / "o"),
            "--overlay",
        ]
    )
    assert status == 0
    assert (tmp_path / "o" / "x.png").is_file() and (tmp_path / "o" / "x_jpg.png").is_file()
    assert "wrote 2 label maps" in capsys.readouterr().err


def test_segment_nothing_found(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["segment", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no images" in capsys.readouterr().err
    assert cli.main(["segment", str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.jpg does not exist" in capsys.readouterr().err


def test_console_script_subprocess(tiny_model_dir, image_dir, tmp_path):
    exe = shutil.which("upernet-fast")
    if exe is None:
        pytest.skip("console script not installed (run `pip install -e .`)")
    src, bad_txt = image_dir
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            exe,
            "segment",
            str(src),
            str(bad_txt),
            "--model",
            str(tiny_model_dir),
            "--out",
            str(out),
            "--overlay",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "truncated.png" in proc.stderr and "readme.txt" in proc.stderr
    _check_outputs(out, overlay=True, num_labels=5)


def test_info(tiny_model_dir, capsys):
    assert cli.main(["info", str(tiny_model_dir)]) == 0
    text = capsys.readouterr().out
    assert "backbone: convnext" in text and "hidden_sizes [8, 16, 24, 32]" in text
    assert "pool_scales [1, 2, 3, 6]" in text and "parameters:" in text and "4 cls4" in text
    assert cli.main(["info"]) == 0  # embedded model
    assert "circle" in capsys.readouterr().out


def test_demo(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path / "demo")]) == 0
    text = capsys.readouterr().out
    for name in ("demo_input.png", "demo_labels.png", "demo_overlay.png"):
        assert (tmp_path / "demo" / name).is_file()
    assert "mIoU" in text


def test_convert_error_is_reported(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}}, bad)
    assert cli.main(["convert", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert "unsupported" in capsys.readouterr().err


def test_embedded_model_is_present():
    assert (default_model_path() / "model.safetensors").is_file()


def test_fast_path_options(monkeypatch):
    """--backend / --exact / --no-tune reach load(): --exact turns Winograd and bf16x3 off, --no-tune the
    measured choices; nothing given leaves the defaults."""
    parser = cli.build_parser()
    args = parser.parse_args(["segment", "x.png", "--out", "o", "--exact", "--backend", "torch", "--no-tune"])
    assert cli._fast_path_kwargs(args) == {
        "backend": "torch",
        "winograd": False,
        "tune": False,
        "bf16x3": False,
    }
    args = parser.parse_args(["info"])
    assert cli._fast_path_kwargs(args) == {"backend": None, "winograd": None, "tune": None, "bf16x3": None}
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--backend", "cuda"])
    seen = {}
    import upernet_fast.inference as inference  # cmd_info imports load_model from here when it runs

    real_load = inference.load_model

    def spy(source, **kwargs):
        seen.update(kwargs)
        return real_load(source, **kwargs)

    monkeypatch.setattr(inference, "load_model", spy)
    assert cli.main(["info", "--exact"]) == 0
    assert seen == {"backend": None, "winograd": False, "tune": None, "bf16x3": False}


def test_info_plan_lists_layers_and_reasons(capsys):
    """`info --plan` prints the machine, the switches and each head layer's implementation with its reason."""
    assert cli.main(["info", "--plan", "--plan-size", "97x131", "--no-tune"]) == 0
    out = capsys.readouterr().out
    assert "plan for 97x131 on" in out and "tune False" in out
    assert "decode_head.fpn_bottleneck" in out and "default rule" in out
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["info", "--plan-size", "97by131"])


@pytest.mark.parametrize(
    "text,message",
    [
        ("97by131", "expected a size HxW"),
        ("64x", "expected a size HxW"),
        ("1x2x3", "expected a size HxW"),
        ("0x64", "sizes must be positive"),
        ("64x-1", "sizes must be positive"),
    ],
)
@pytest.mark.parametrize(
    "option", [["info", "--plan-size"], ["export", "src", "--out", "m.onnx", "--static"]]
)
def test_sizes_are_refused_by_the_parser(text, message, option, capsys):
    """--plan-size and --static go through one parser (preprocess.parse_size): a malformed or non-positive
    size stops the command with status 2 and says what a size looks like, before anything is loaded."""
    with pytest.raises(SystemExit) as stop:
        cli.build_parser().parse_args([*option, text])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- nothing lost, nothing wrong
def _save(path, height, width, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def _manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _check_mapping(out, sizes):
    """Every input has its own label map (of its own size), the manifest says where, the count is true."""
    records = _manifest(out)
    assert len(records) == len(sizes)
    outputs = [r["output"] for r in records]
    assert len(set(outputs)) == len(outputs)
    for record in records:
        h, w = sizes[record["input"]]
        assert record["status"] == "written" and record["error"] is None and record["size"] == [h, w]
        assert Image.open(record["output"]).size == (w, h)
    pngs = [p for p in out.rglob("*.png") if not p.name.endswith("_overlay.png")]
    assert len(pngs) == len(sizes)


def test_loose_files_with_clashing_names_each_get_an_output(tmp_path, capsys):
    """The issue's case: a/x.png b/x.png a/x_1.png -> three files (x_1 stays a/x_1.png's)."""
    inputs = {"a/x.png": (40, 60), "b/x.png": (44, 66), "a/x_1.png": (48, 70)}
    for i, (rel, (h, w)) in enumerate(inputs.items()):
        _save(tmp_path / rel, h, w, seed=i)
    out = tmp_path / "o"
    args = [str(tmp_path / rel) for rel in inputs]
    assert cli.main(["segment", *args, "--out", str(out), "--quiet"]) == 0
    assert "wrote 3 label maps" in capsys.readouterr().err
    _check_mapping(out, {str(tmp_path / rel): hw for rel, hw in inputs.items()})
    assert Image.open(out / "x_1.png").size == (70, 48)  # its own name, not another's


def test_folder_with_clashing_stems_is_mirrored(tmp_path, capsys):
    src = tmp_path / "photos"
    inputs = {
        "x.jpg": (40, 60),
        "x.png": (44, 66),
        "x_1.png": (48, 70),
        "sub/x.png": (36, 50),
        "x_overlay.png": (52, 40),
    }
    for i, (rel, (h, w)) in enumerate(inputs.items()):
        _save(src / rel, h, w, seed=i)
    out = tmp_path / "o"
    assert cli.main(["segment", str(src), "--out", str(out), "--overlay", "--quiet"]) == 0
    assert "wrote 5 label maps" in capsys.readouterr().err
    _check_mapping(out, {str(src / rel): hw for rel, hw in inputs.items()})
    assert Image.open(out / "sub" / "x.png").size == (50, 36)  # relative paths mirrored
    overlays = [r["overlay"] for r in _manifest(out)]
    assert len(set(overlays)) == 5 and all(Path(o).is_file() for o in overlays)


def test_exif_rotated_photo_gives_an_upright_mask(tmp_path):
    from test_pipeline import exif_rotated_jpeg

    exif_rotated_jpeg(tmp_path / "phone.jpg", orientation=6, size=(80, 60))
    assert cli.main(["segment", str(tmp_path / "phone.jpg"), "--out", str(tmp_path / "o"), "--overlay"]) == 0
    assert Image.open(tmp_path / "o" / "phone.png").size == (60, 80)  # shown 60 wide, 80 high
    assert Image.open(tmp_path / "o" / "phone_overlay.png").height == 80


def _never_load(monkeypatch):
    import upernet_fast.inference as inference

    def fail(*args, **kwargs):
        raise AssertionError("the model must not be loaded when the arguments are wrong")

    monkeypatch.setattr(inference.Segmenter, "from_pretrained", fail)


def test_usage_errors_before_loading_one_line_each(tmp_path, monkeypatch, capsys):
    _never_load(monkeypatch)
    _save(tmp_path / "a.png", 40, 60)
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    argv = [
        "segment",
        str(tmp_path / "a.png"),
        "--out",
        str(not_a_dir / "o"),
        "--model",
        str(tmp_path / "nope"),
    ]
    argv += ["--scales", "0", "1", "--short-side", "8", "--batch-size", "0"]
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 5, lines
    assert all(line.startswith("error: ") for line in lines)
    text = "\n".join(lines)
    for fragment in ("--scales", "--short-side 8", "--batch-size", "--model", "is a file, not a folder"):
        assert fragment in text
    assert "Traceback" not in text
    assert not (not_a_dir / "o").exists()


def test_out_is_a_file_or_not_writable(tmp_path, monkeypatch, capsys):
    _never_load(monkeypatch)
    _save(tmp_path / "a.png", 40, 60)
    assert cli.main(["segment", str(tmp_path / "a.png"), "--out", str(tmp_path / "a.png")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root: permissions do not stop writes, /proc does
            if not Path("/proc/self").is_dir():
                pytest.skip("running as root without /proc: no unwritable folder to try")
            locked = Path("/proc")
        assert cli.main(["segment", str(tmp_path / "a.png"), "--out", str(locked / "o")]) == 2
        assert "cannot write in" in capsys.readouterr().err
    finally:
        (tmp_path / "locked").chmod(0o700)


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["segment", "a.png", "--out", "o", "--scales", "abc"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid float value: 'abc'" in err[0]


def test_bad_model_is_one_line_exit_2(tmp_path, capsys):
    _save(tmp_path / "a.png", 40, 60)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{not json")
    assert (
        cli.main(["segment", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--model", str(model)])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --model") and "cannot load it" in err[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        cli.main(["segment", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--model", str(empty)])
        == 2
    )
    assert "no config.json" in capsys.readouterr().err


def test_too_small_image_is_skipped_and_reported(tmp_path, capsys):
    """Slide mode caps the long side at 4x the crop: a 20x2000 strip reaches the net 5 pixels high."""
    _save(tmp_path / "in" / "ok.png", 60, 80)
    _save(tmp_path / "in" / "strip.png", 20, 2000)
    _save(tmp_path / "in" / "z.png", 50, 50)
    out = tmp_path / "o"
    assert cli.main(["segment", str(tmp_path / "in"), "--out", str(out), "--mode", "slide", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "cannot segment" in err and "strip.png" in err and "image of 20x2000 becomes 5x512" in err
    assert "wrote 2 label maps" in err and "1 failed" in err
    assert (out / "ok.png").is_file() and (out / "z.png").is_file() and not (out / "strip.png").exists()
    status = {Path(r["input"]).name: r["status"] for r in _manifest(out)}
    assert status == {"ok.png": "written", "strip.png": "failed", "z.png": "written"}


def _folder(tmp_path, n=5):
    src = tmp_path / "photos"
    for i in range(n):
        _save(src / ("sub" if i % 2 else "") / f"img{i}.jpg", 40 + 3 * i, 50 + 5 * i, seed=i)
    return src


def _png_bytes(out):
    return {
        p.relative_to(out): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.suffix == ".png"
    }


def test_interrupt_summary_then_resume_matches_uninterrupted_run(tmp_path, monkeypatch, capsys):
    import upernet_fast.inference as inference

    src = _folder(tmp_path)
    full = tmp_path / "full"
    assert cli.main(["segment", str(src), "--out", str(full), "--overlay", "--quiet"]) == 0
    capsys.readouterr()

    calls = []
    real = inference.Segmenter.predict_labels

    def counting(self, images, stop_at=None):
        calls.append(1)
        if stop_at is not None and len(calls) == stop_at:
            raise KeyboardInterrupt
        return real(self, images)

    out = tmp_path / "out"
    monkeypatch.setattr(inference.Segmenter, "predict_labels", lambda self, im: counting(self, im, stop_at=3))
    assert cli.main(["segment", str(src), "--out", str(out), "--overlay", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "wrote 2 label maps" in err and "3 left" in err and "Traceback" not in err
    assert len(_png_bytes(out)) == 4  # 2 labels + 2 overlays, no half-written file
    assert not [p for p in out.rglob(".*")]  # no temporaries
    assert [r["status"] for r in _manifest(out)] == ["written", "written", "pending", "pending", "pending"]

    calls.clear()
    monkeypatch.setattr(inference.Segmenter, "predict_labels", lambda self, im: counting(self, im))
    assert cli.main(["segment", str(src), "--out", str(out), "--overlay", "--quiet"]) == 0
    assert len(calls) == 3  # the two finished images are not redone
    assert "wrote 3 label maps" in capsys.readouterr().err
    assert _png_bytes(out) == _png_bytes(full)
    assert [r["status"] for r in _manifest(out)] == ["complete", "complete", "written", "written", "written"]

    calls.clear()
    assert cli.main(["segment", str(src), "--out", str(out), "--overlay", "--quiet", "--overwrite"]) == 0
    assert len(calls) == 5
    assert _png_bytes(out) == _png_bytes(full)


def test_resume_does_not_trust_a_name_that_moved(tmp_path, capsys):
    """x.png written first; then x.jpg joins and takes the name x.png (sorted first): the old x.png file
    belongs to another input, so it is rewritten, not skipped."""
    src = tmp_path / "photos"
    _save(src / "x.png", 40, 60, seed=1)
    out = tmp_path / "o"
    assert cli.main(["segment", str(src), "--out", str(out), "--quiet"]) == 0
    _save(src / "x.jpg", 50, 30, seed=2)
    assert cli.main(["segment", str(src), "--out", str(out), "--quiet"]) == 0
    assert "wrote 2 label maps" in capsys.readouterr().err
    assert Image.open(out / "x.png").size == (30, 50) and Image.open(out / "x_png.png").size == (60, 40)


def test_resume_remembers_owners_across_runs_over_other_inputs(tmp_path, capsys):
    """a/x.png, then c/y.png, then b/x.png into one folder: the second run keeps the first run's record
    (x.png is a/x.png's), so the third rewrites x.png for b/x.png instead of taking a/x.png's map."""
    out = tmp_path / "o"
    for path, size, seed in [("a/x.png", (40, 60), 1), ("c/y.png", (30, 30), 2), ("b/x.png", (50, 20), 3)]:
        _save(tmp_path / path, *size, seed=seed)
        assert cli.main(["segment", str(tmp_path / path), "--out", str(out), "--quiet"]) == 0
    assert "wrote 1 label map" in capsys.readouterr().err.splitlines()[-1]
    assert Image.open(out / "x.png").size == (20, 50)
    records = _manifest(out)
    assert [(Path(r["input"]).parent.name, r["status"]) for r in records] == [
        ("b", "written"),
        ("c", "written"),
    ]


@pytest.mark.parametrize("overlay", [False, True])
def test_an_output_that_is_an_input_is_refused(tmp_path, capsys, overlay):
    """`segment photo.png --out .` would replace the photo with its label map (and a rerun would take the
    photo for its finished output); likewise an overlay name that is an input. Refused, nothing written."""
    name = "photo_overlay.png" if overlay else "photo.png"
    _save(tmp_path / "photo.png", 40, 60, seed=1)
    if overlay:
        _save(tmp_path / name, 40, 60, seed=2)
    before = (tmp_path / name).read_bytes()
    args = ["segment", str(tmp_path / "photo.png"), *([str(tmp_path / name)] if overlay else [])]
    for extra in ([], ["--overwrite"]):
        code = cli.main(
            [*args, "--out", str(tmp_path), "--quiet", *extra, *(["--overlay"] if overlay else [])]
        )
        assert code == 2
        assert f"would overwrite the input {tmp_path / name}" in capsys.readouterr().err
    assert (tmp_path / name).read_bytes() == before and not (tmp_path / "manifest.jsonl").exists()


def test_adding_overlay_on_rerun_writes_only_the_overlays(tmp_path):
    src = _folder(tmp_path, 2)
    out = tmp_path / "o"
    assert cli.main(["segment", str(src), "--out", str(out), "--quiet"]) == 0
    labels = _png_bytes(out)
    assert cli.main(["segment", str(src), "--out", str(out), "--quiet", "--overlay"]) == 0
    after = _png_bytes(out)
    assert len(after) == 4 and all(after[k] == v for k, v in labels.items())


SLOW_RUN = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job may inherit SIGINT ignored
import upernet_fast.inference as inference
real = inference.Segmenter.predict_labels
def slow(self, images):
    time.sleep(0.8)
    return real(self, images)
inference.Segmenter.predict_labels = slow
from upernet_fast import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_real_signal_stops_cleanly_and_resumes(tmp_path, signum, code):
    src = _folder(tmp_path, 6)
    full, out = tmp_path / "full", tmp_path / "out"
    assert cli.main(["segment", str(src), "--out", str(full), "--quiet"]) == 0
    argv = [sys.executable, "-c", SLOW_RUN, "segment", str(src), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(out.rglob("*.png"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "interrupted" in err and "left" in err and "Traceback" not in err
    done = _png_bytes(out)
    assert 2 <= len(done) < 6 and all(done[k] == v for k, v in _png_bytes(full).items() if k in done)
    assert not [p for p in out.rglob(".*")]
    assert cli.main(["segment", str(src), "--out", str(out), "--quiet"]) == 0
    assert _png_bytes(out) == _png_bytes(full)


def test_dtype_option_reaches_the_model(tmp_path, monkeypatch):
    import upernet_fast.inference as inference

    seen = {}
    real = inference.Segmenter.from_pretrained.__func__

    def spy(cls, source=None, **kwargs):
        seen.update(kwargs)
        return real(cls, source, **kwargs)

    monkeypatch.setattr(inference.Segmenter, "from_pretrained", classmethod(spy))
    _save(tmp_path / "a.png", 40, 60)
    assert (
        cli.main(["segment", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--dtype", "bfloat16"])
        == 0
    )
    assert seen["dtype"] == "bfloat16"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["segment", "a.png", "--out", "o", "--dtype", "int8"])


def test_output_folder_inside_the_input_folder_is_not_read_back(tmp_path, capsys):
    src = _folder(tmp_path, 2)
    out = src / "masks"
    assert cli.main(["segment", str(src), "--out", str(out), "--quiet", "--overlay"]) == 0
    assert cli.main(["segment", str(src), "--out", str(out), "--quiet", "--overlay"]) == 0
    assert "2 already complete" in capsys.readouterr().err
    assert len(_manifest(out)) == 2 and not (out / "masks").exists()


def test_command_errors_are_one_line(tmp_path, capsys):
    """Bad sources, sizes and output paths for info / demo / export: the reason in one line, no traceback."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = [
        (["demo", "--out", str(tmp_path / "afile")], 2, "is a file, not a folder"),
        (["info", str(tmp_path / "missing")], 1, "does not exist"),
        (["info", str(tmp_path / "empty")], 1, "no config file"),
        (["info", "--plan", "--plan-size", "10x10"], 1, "smaller than the backbone's total stride"),
        (
            ["export", str(tmp_path / "empty"), "--out", str(tmp_path / "m.onnx"), "--opset", "3"],
            1,
            "outside 18..",
        ),
    ]
    for argv, code, message in cases:
        assert cli.main(argv) == code, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    "extra,message", [(["--scales", "inf"], "positive and finite"), (["--device", "meta"], "holds no data")]
)
def test_segment_usage_errors_before_any_work(tmp_path, capsys, extra, message):
    _save(tmp_path / "a.png", 40, 40)
    assert cli.main(["segment", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_segment_dataset_usage_errors_are_status_2(tmp_path, capsys):
    """segment_dataset reports a usage error as status 2 (argparse's SystemExit would end the caller), and
    takes the command line's types (a scalar scale, a numeric string)."""
    from upernet_fast.distributed import segment_dataset

    assert segment_dataset([], tmp_path / "o").status == 2
    assert "non-empty list" in capsys.readouterr().err
    _save(tmp_path / "a.png", 40, 40)
    report = segment_dataset([tmp_path / "a.png"], tmp_path / "o", scales="x")
    assert report.status == 2 and "scales='x'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
