"""Where each input image's outputs go, and writing them so nothing is lost, overwritten or half-written.

Shared by the `segment` CLI and any other engine that writes label maps for a list of files.

Naming rule (each input gets its own files, the same ones on every run with the same inputs):

- a file found in a folder argument keeps its path relative to that folder: `photos/a/x.jpg` -> `a/x.png`;
  a file given by itself keeps its name: `b/y.jpg` -> `y.png`. The overlay is `<name>_overlay.png`.
- when several inputs would write the same file (`x.jpg` and `x.png`; `a/x.png` and `b/x.png` given as
  files; `x.png` whose overlay name is another input's label name `x_overlay.png`), the first in command-line
  order (folders walked in sorted order) keeps the name and each later one gets its extension added,
  `x_png.png`, then a number if that is taken as well, `x_png_2.png`. A name that any input claims as its
  own is never given to another input, so `x_1.png` keeps `x_1.png`. Names compare case-insensitively.

`manifest.jsonl` in the output folder records, one JSON line per input: input, output, overlay, size
([height, width]), status ("written", "complete" = skipped because already written, "failed", "pending" =
not reached) and error; after them, earlier runs' lines about other outputs still in the folder, so whose
file each one is survives runs over other inputs (a resumed run never takes another input's file for its
own). An output that would overwrite an input file is refused before anything runs.

PNGs are written to a temporary name in the same folder (`.<name>.<random>.tmp`, never `*.png`) and renamed
into place, so a final name only ever holds a complete file: an output is complete when its final file
exists, whatever happened to the run that wrote it.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
MANIFEST = "manifest.jsonl"
TEMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class OutputItem:
    """One input file and the stem of its outputs, relative to the output folder (`a/x` -> `a/x.png`)."""

    source: Path
    stem: Path

    def label_path(self, out_dir: str | os.PathLike) -> Path:
        return Path(out_dir) / self.stem.with_name(self.stem.name + ".png")

    def overlay_path(self, out_dir: str | os.PathLike) -> Path:
        return Path(out_dir) / self.stem.with_name(self.stem.name + "_overlay.png")

    def paths(self, out_dir: str | os.PathLike, overlay: bool) -> list[Path]:
        return [self.label_path(out_dir)] + ([self.overlay_path(out_dir)] if overlay else [])


def collect_inputs(
    paths: Sequence[str | os.PathLike], exclude: str | os.PathLike | None = None
) -> list[tuple[Path, Path]]:
    """(file, path relative to its root): explicit files as given (any suffix, so a wrong file is reported,
    not skipped; also paths that do not exist), folders' image files by suffix, recursively, sorted. Files
    under `exclude` (the output folder, when it lies inside an input folder) are not inputs; a file reached
    twice (`photos photos/a.jpg`) counts once, where it is first found."""
    skip = Path(exclude).resolve() if exclude is not None else None
    found: list[tuple[Path, Path]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not (skip is not None and p.resolve().is_relative_to(skip))
            )
            found.extend((f, f.relative_to(path)) for f in files)
        else:
            found.append((path, Path(path.name)))
    seen: set[Path] = set()
    unique = []
    for source, rel in found:
        key = source.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((source, rel))
    return unique


def _claims(stem: Path) -> tuple[str, str]:
    """The output names a stem occupies (label and overlay, whether or not overlays are written, so the
    mapping does not depend on --overlay), as case-insensitive keys."""
    return (str(stem) + ".png").casefold(), (str(stem) + "_overlay.png").casefold()


def plan_outputs(found: Iterable[tuple[Path, Path]]) -> list[OutputItem]:
    """Output stems for (file, relative path) pairs by the module's naming rule: no two inputs share a file."""
    found = list(found)
    preferred = [rel.with_suffix("") if rel.suffix else rel for _, rel in found]
    reserved = {key for stem in preferred for key in _claims(stem)}
    taken: set[str] = set()
    items = []
    for (source, rel), stem in zip(found, preferred):
        if taken.isdisjoint(_claims(stem)):
            choice = stem
        else:  # a later duplicate: never take a name another input claims as its own
            base = stem.name + (f"_{rel.suffix[1:].lower()}" if rel.suffix else "")
            choice, n = stem.with_name(base), 1
            while not (reserved.isdisjoint(_claims(choice)) and taken.isdisjoint(_claims(choice))):
                n += 1
                choice = stem.with_name(f"{base}_{n}")
        taken.update(_claims(choice))
        items.append(OutputItem(source, choice))
    return items


def inputs_overwritten(items: Sequence[OutputItem], out_dir: str | os.PathLike, overlay: bool) -> list[str]:
    """One message per planned output that is an input file (`segment photo.png --out .`): writing it would
    replace the user's image with a label map, and resuming would take the image for its own output."""
    sources = {item.source.resolve(): item.source for item in items}
    return [
        f"output {path} would overwrite the input {sources[path.resolve()]}; choose another --out"
        for item in items
        for path in item.paths(out_dir, overlay)
        if path.resolve() in sources
    ]


def write_png(image: Any, path: str | os.PathLike) -> None:
    """Save a PIL image as PNG atomically: to a temporary file in the same folder, then `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        with open(temp, "wb") as f:
            image.save(f, format="PNG")
        os.replace(temp, path)
    except BaseException:  # also Ctrl-C: never leave the temporary file behind
        temp.unlink(missing_ok=True)
        raise


def is_complete(path: str | os.PathLike) -> bool:
    """An output is complete when its final file exists (files only ever appear there by rename)."""
    return Path(path).is_file()


def remove_stale_temps(items: Iterable[OutputItem], out_dir: str | os.PathLike) -> int:
    """Delete temporary files a killed run left next to these outputs; returns how many."""
    removed = 0
    for item in items:
        for final in item.paths(out_dir, overlay=True):
            if final.parent.is_dir():
                for temp in final.parent.glob(f".{final.name}.*{TEMP_SUFFIX}"):
                    temp.unlink(missing_ok=True)
                    removed += 1
    return removed


def read_manifest(out_dir: str | os.PathLike) -> dict[str, str]:
    """{resolved output path: resolved input path} from an earlier run's manifest (empty if none/unreadable)."""
    owners: dict[str, str] = {}
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return owners
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            for key in ("output", "overlay"):
                if record.get(key):
                    owners[str(Path(record[key]).resolve())] = str(Path(record["input"]).resolve())
        except (ValueError, TypeError, KeyError, AttributeError):
            continue  # a line cut short by a killed run
    return owners


def owned_by(path: Path, source: Path, owners: dict[str, str]) -> bool:
    """False when an earlier manifest says `path` was written for a different input (the input set changed
    and the name moved): such a file must be rewritten, not taken as this input's result."""
    owner = owners.get(str(path.resolve()))
    return owner is None or owner == str(source.resolve())


def earlier_records(out_dir: str | os.PathLike, items: Iterable[OutputItem]) -> list[str]:
    """The lines of an earlier run's manifest about outputs in this folder that `items` do not claim and
    whose files still exist: kept in the new manifest, so a later run still knows whose outputs they are (`owned_by`)."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return []
    claimed = {str(p.resolve()) for item in items for p in item.paths(out_dir, overlay=True)}
    here = Path(out_dir).resolve()
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            outputs = [record[key] for key in ("output", "overlay") if record.get(key)]
        except (ValueError, TypeError, KeyError, AttributeError):
            continue  # a line cut short by a killed run
        if outputs and claimed.isdisjoint(outputs) and any(Path(o).is_file() for o in outputs):
            if all(Path(o).is_relative_to(here) for o in outputs):  # not a copied folder's old paths
                kept.append(line)
    return kept


class Manifest:
    """`manifest.jsonl`, one line per input, flushed as each input finishes (a killed run keeps its record);
    then, at `close`, the earlier runs' lines about other outputs still in the folder (`earlier_records`)."""

    def __init__(self, out_dir: str | os.PathLike, overlay: bool, earlier: Sequence[str] = ()) -> None:
        self.out_dir, self.overlay, self.earlier = Path(out_dir), overlay, list(earlier)
        self._file = open(self.out_dir / MANIFEST, "w", encoding="utf-8")

    def record(
        self, item: OutputItem, status: str, size: tuple[int, int] | None = None, error: str | None = None
    ) -> None:
        entry = {
            "input": str(item.source),
            "output": str(item.label_path(self.out_dir).resolve()),
            "overlay": str(item.overlay_path(self.out_dir).resolve()) if self.overlay else None,
            "size": list(size) if size is not None else None,
            "status": status,
            "error": error,
        }
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def close(self) -> None:
        for line in self.earlier:
            self._file.write(line + "\n")
        self._file.close()


__all__ = [
    "IMAGE_SUFFIXES",
    "MANIFEST",
    "Manifest",
    "OutputItem",
    "collect_inputs",
    "earlier_records",
    "inputs_overwritten",
    "is_complete",
    "owned_by",
    "plan_outputs",
    "read_manifest",
    "remove_stale_temps",
    "write_png",
]
