"""Output naming (no two inputs share a file, a predictable rule), atomic PNG writes, resume checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from upernet_fast import outputs_writer as ow


def _names(pairs):
    return [str(item.stem) for item in ow.plan_outputs((Path(f), Path(r)) for f, r in pairs)]


def test_first_keeps_the_name_later_duplicates_get_their_extension():
    # the case: a/x.png, b/x.png, a/x_1.png given as files -> x_1 must stay a/x_1.png's
    assert _names([("a/x.png", "x.png"), ("b/x.png", "x.png"), ("a/x_1.png", "x_1.png")]) == [
        "x",
        "x_png",
        "x_1",
    ]
    # a folder holding x.jpg, x.png, x_1.png (sorted order)
    assert _names([("d/x.jpg", "x.jpg"), ("d/x.png", "x.png"), ("d/x_1.png", "x_1.png")]) == [
        "x",
        "x_png",
        "x_1",
    ]


def test_alternatives_never_take_a_name_an_input_claims():
    pairs = [("1/x.png", "x.png"), ("2/x.png", "x.png"), ("3/x.png", "x.png"), ("d/x_png.jpg", "x_png.jpg")]
    assert _names(pairs) == ["x", "x_png_2", "x_png_3", "x_png"]


def test_overlay_names_and_case_are_claims_too():
    # x.png's overlay is x_overlay.png: an input named x_overlay.png must not collide with it
    assert _names([("d/x.png", "x.png"), ("d/x_overlay.png", "x_overlay.png")]) == ["x", "x_overlay_png"]
    assert _names([("d/X.png", "X.png"), ("e/x.jpg", "x.jpg")]) == ["X", "x_jpg"]  # case-insensitive FS


def test_folders_are_mirrored(tmp_path):
    for rel in ("a.png", "sub/a.png", "sub/deeper/b.JPG", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = ow.collect_inputs([tmp_path])
    items = ow.plan_outputs(found)
    assert [str(i.stem) for i in items] == ["a", "sub/a", "sub/deeper/b"]
    assert items[2].label_path("o") == Path("o/sub/deeper/b.png")
    assert items[2].overlay_path("o") == Path("o/sub/deeper/b_overlay.png")
    again = ow.collect_inputs([tmp_path, tmp_path / "sub" / "a.png", tmp_path / "sub"])  # reached twice
    assert [str(rel) for _, rel in again] == ["a.png", "sub/a.png", "sub/deeper/b.JPG"]


@pytest.mark.parametrize("seed", range(5))
def test_random_name_sets_never_collide(seed):
    rng = np.random.default_rng(seed)
    stems = ["x", "x_1", "x_png", "x_jpg", "X", "x_overlay", "x_png_2"]
    pairs = []
    for i in range(40):
        stem, ext = rng.choice(stems), rng.choice([".png", ".jpg", ".JPG", ""])
        pairs.append((f"dir{i}/{stem}{ext}", f"{stem}{ext}"))
    items = ow.plan_outputs((Path(f), Path(r)) for f, r in pairs)
    claimed = [key for item in items for key in ow._claims(item.stem)]
    assert len(claimed) == len(set(claimed))
    assert [i.stem for i in items] == [i.stem for i in ow.plan_outputs((Path(f), Path(r)) for f, r in pairs)]


class _Exploding:
    """A PIL-like image whose save writes part of a file, then is interrupted."""

    def save(self, f, format):
        f.write(b"\x89PNG partial")
        raise KeyboardInterrupt


def test_write_png_is_atomic(tmp_path):
    target = tmp_path / "sub" / "x.png"
    image = Image.fromarray(np.zeros((4, 5), dtype=np.uint8))
    ow.write_png(image, target)
    assert Image.open(target).size == (5, 4) and ow.is_complete(target)
    before = target.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        ow.write_png(_Exploding(), target)
    assert target.read_bytes() == before  # the old file is untouched
    with pytest.raises(KeyboardInterrupt):
        ow.write_png(_Exploding(), tmp_path / "sub" / "y.png")
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.png"]  # no temporary left, no y.png


def test_stale_temps_are_removed_and_never_count(tmp_path):
    item = ow.OutputItem(Path("in/x.jpg"), Path("x"))
    stale = tmp_path / f".x.png.dead{ow.TEMP_SUFFIX}"
    stale.write_bytes(b"half")
    assert not ow.is_complete(item.label_path(tmp_path))
    assert ow.remove_stale_temps([item], tmp_path) == 1 and not stale.exists()


def test_manifest_round_trip_and_ownership(tmp_path):
    items = ow.plan_outputs([(tmp_path / "x.png", Path("x.png"))])
    manifest = ow.Manifest(tmp_path, overlay=True)
    manifest.record(items[0], "written", (3, 4))
    manifest.close()
    record = json.loads((tmp_path / ow.MANIFEST).read_text())
    assert record == {
        "input": str(tmp_path / "x.png"),
        "output": str((tmp_path / "x.png").resolve()),
        "overlay": str((tmp_path / "x_overlay.png").resolve()),
        "size": [3, 4],
        "status": "written",
        "error": None,
    }
    owners = ow.read_manifest(tmp_path)
    assert ow.owned_by(tmp_path / "x.png", tmp_path / "x.png", owners)
    assert not ow.owned_by(tmp_path / "x.png", tmp_path / "x.jpg", owners)
    assert ow.owned_by(tmp_path / "other.png", tmp_path / "x.jpg", owners)  # no record: nothing against it
