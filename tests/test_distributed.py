"""`segment --engine ray`: the same files, byte for byte, as the local engine; failures, resume, no ray."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import upernet_fast
from upernet_fast import cli

ray = pytest.importorskip("ray", reason="the Ray engine's tests need ray: pip install -e .[ray]")
pytest.importorskip("ray.data", reason="the Ray engine's tests need Ray Data: pip install -e .[ray]")

from upernet_fast import distributed  # noqa: E402 - after the skip

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")  # Ray Data's own settings

# Each of the 2 workers gets 1 of the 2 CPUs, so 1 thread; the local run uses as many, so both engines run
# the same kernels with the same thread count (float sums can depend on it).
torch.set_num_threads(1)

SIZES = {"a": (70, 90), "b": (45, 33), "sub/c": (40, 64), "sub/deep/d": (96, 128), "sub/e": (50, 50)}
CORRUPT = "sub/broken.png"
OPTIONS = ["--overlay", "--no-tune", "--quiet"]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with 2 CPUs for the module, whose workers import this very upernet_fast."""
    with distributed.connected(None, num_cpus=2):
        where = ray.get(ray.remote(lambda: importlib.util.find_spec("upernet_fast").origin).remote())
        assert where == upernet_fast.__file__, "Ray workers import another upernet_fast (set PYTHONPATH)"
        yield
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Subfolders, mixed sizes and modes (RGB, gray, RGBA, JPEG) and one truncated PNG."""
    rng = np.random.default_rng(0)
    src = tmp_path_factory.mktemp("photos")
    for stem, (h, w) in SIZES.items():
        (src / stem).parent.mkdir(parents=True, exist_ok=True)
        shape = {"b": (h, w), "sub/c": (h, w, 4)}.get(stem, (h, w, 3))
        pixels = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        pixels.save(src / (stem + (".jpg" if stem == "sub/e" else ".png")))
    good = (src / "a.png").read_bytes()
    (src / CORRUPT).write_bytes(good[: len(good) // 2])
    return src


@pytest.fixture(scope="module")
def runs(cluster, images, tmp_path_factory):
    """One local and one Ray run over the same folder: (local out, ray out, ray stderr)."""
    out = tmp_path_factory.mktemp("runs")
    assert cli.main(["segment", str(images), "--out", str(out / "local"), *OPTIONS]) == 1
    ray_args = ["--engine", "ray", "--workers", "2"]
    capture = tmp_path_factory.mktemp("err") / "stderr"
    with open(capture, "w") as f:
        saved, sys.stderr = sys.stderr, f
        try:
            status = cli.main(["segment", str(images), "--out", str(out / "ray"), *OPTIONS, *ray_args])
        finally:
            sys.stderr = saved
    assert status == 1
    return out / "local", out / "ray", capture.read_text()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _manifest(root: Path) -> list[dict]:
    """The manifest's records, sorted by input, with the output paths relative to `root`."""
    records = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    for record in records:
        for key in ("output", "overlay"):
            record[key] = str(Path(record[key]).relative_to(root.resolve()))
    return sorted(records, key=lambda r: r["input"])


def test_ray_writes_the_local_engines_bytes(runs):
    local, remote, _ = runs
    expected = {f"{stem}{suffix}.png" for stem in SIZES for suffix in ("", "_overlay")} | {"manifest.jsonl"}
    assert set(_files(local)) == expected
    local_files, ray_files = _files(local), _files(remote)
    assert set(ray_files) == set(local_files)
    for name in sorted(expected - {"manifest.jsonl"}):
        assert ray_files[name] == local_files[name], name
    assert _manifest(remote) == _manifest(local)
    statuses = {r["input"]: r["status"] for r in _manifest(remote)}
    assert list(statuses.values()).count("written") == len(SIZES)
    assert [r["size"] for r in _manifest(remote) if r["input"].endswith("a.png")] == [[70, 90]]


def test_ray_reports_the_corrupt_file_by_name_and_counts_it(runs, images):
    _, remote, err = runs
    assert f"error: cannot read {images / CORRUPT}" in err
    assert f"wrote {len(SIZES)} label maps" in err and "1 failed" in err
    assert f"failed: {images / CORRUPT}" in err
    (failed,) = [r for r in _manifest(remote) if r["status"] != "written"]
    assert failed["input"] == str(images / CORRUPT) and failed["status"] == "failed" and failed["error"]


def test_ray_rerun_skips_complete_outputs_and_leaves_no_temp_files(runs, images, tmp_path):
    local, remote, _ = runs
    out = tmp_path / "again"
    shutil.copytree(remote, out)
    (out / "sub" / "c.png").unlink()  # a label lost; its overlay is still there
    (out / ".a.png.dead.tmp").write_bytes(b"left by a killed run")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}

    report = distributed.segment_dataset([images], out, workers=1, overlay=True, no_tune=True, quiet=True)
    assert (report.status, report.written, report.complete, report.left) == (1, 1, len(SIZES) - 1, 0)
    assert report.failed == [str(images / CORRUPT)]
    assert (out / "sub" / "c.png").read_bytes() == (local / "sub" / "c.png").read_bytes()
    assert all(p.stat().st_mtime_ns == t for p, t in before.items()), "a complete output was rewritten"
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    statuses = sorted(r["status"] for r in _manifest(out))
    assert statuses == ["complete"] * (len(SIZES) - 1) + ["failed", "written"]


def test_missing_ray_names_the_extra(monkeypatch, images, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    monkeypatch.setitem(sys.modules, "ray.data", None)
    out = tmp_path / "out"
    assert cli.main(["segment", str(images), "--out", str(out), "--engine", "ray"]) == 2
    err = capsys.readouterr().err
    assert "--engine ray needs Ray Data" in err and 'pip install "upernet_fast[ray]"' in err
    assert not out.exists()  # a usage error: found before anything is loaded or written
    with pytest.raises(ImportError, match=r"upernet_fast\[ray\]"):
        with distributed.connected(None):
            pass


def test_ray_options_are_checked_before_loading(images, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli.main(["segment", str(images), "--out", out, "--workers", "2"]) == 2
    assert "--workers only apply to --engine ray" in capsys.readouterr().err
    assert cli.main(["segment", str(images), "--out", out, "--engine", "ray", "--workers", "0"]) == 2
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err
    assert not os.path.exists(out)
