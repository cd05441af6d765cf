"""`upernet-fast` CLI end to end, in process and once through the installed console script."""

from __future__ import annotations

import shutil
import subprocess
import sys

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
    assert (tmp_path / "o" / "x.png").is_file() and (tmp_path / "o" / "x_1.png").is_file()
    assert "wrote 2 label maps" in capsys.readouterr().err


def test_segment_nothing_found(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["segment", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no images" in capsys.readouterr().err


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


def test_bench_missing_and_passthrough(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "bench_script", lambda: tmp_path / "nope" / "e2e.py")
    assert cli.main(["bench", "--size", "64"]) == 2
    assert "e2e.py does not exist" in capsys.readouterr().err
    script = tmp_path / "e2e.py"
    script.write_text("import sys\nprint('ARGS', sys.argv[1:])\nsys.exit(3)\n")
    monkeypatch.setattr(cli, "bench_script", lambda: script)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from upernet_fast import cli; "
            f"cli.bench_script = lambda: __import__('pathlib').Path({str(script)!r}); "
            "sys.exit(cli.main(['bench', '--size', '64', '--help']))",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 3 and "ARGS ['--size', '64', '--help']" in proc.stdout


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
    """--backend / --exact / --no-tune reach load(): --exact turns Winograd off, --no-tune the measured
    choices; nothing given leaves the defaults."""
    parser = cli.build_parser()
    args = parser.parse_args(["segment", "x.png", "--out", "o", "--exact", "--backend", "torch", "--no-tune"])
    assert cli._fast_path_kwargs(args) == {"backend": "torch", "winograd": False, "tune": False}
    args = parser.parse_args(["info"])
    assert cli._fast_path_kwargs(args) == {"backend": None, "winograd": None, "tune": None}
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
    assert seen == {"backend": None, "winograd": False, "tune": None}


def test_info_plan_lists_layers_and_reasons(capsys):
    """`info --plan` prints the machine, the switches and each head layer's implementation with its reason."""
    assert cli.main(["info", "--plan", "--plan-size", "97x131", "--no-tune"]) == 0
    out = capsys.readouterr().out
    assert "plan for 97x131 on" in out and "tune False" in out
    assert "decode_head.fpn_bottleneck" in out and "default rule" in out
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["info", "--plan-size", "97by131"])
