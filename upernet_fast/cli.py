"""`upernet-fast` command line: segment, info, convert, export, demo (benchmarks: `python bench/e2e.py` in a
checkout).

    upernet-fast segment photos/ extra.jpg --out masks/ --overlay [--model openmmlab/upernet-convnext-tiny]
        (folders mirrored under --out, manifest.jsonl lists input -> output; reruns skip finished files)
    upernet-fast segment photos/ --out masks/ --engine ray [--workers N] [--address auto]
        (the same files, written by an actor pool on a Ray cluster: pip install upernet_fast[ray])
    upernet-fast info [SRC]
    upernet-fast convert upernet_swin_tiny.pth --out upernet-swin-tiny/
    upernet-fast export upernet-swin-tiny/ --out model.onnx [--static 512x512] [--opset 18]
    upernet-fast demo [--out DIR]

SRC is a Hugging Face-format directory or hub id; the default is the small embedded model.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from . import dispatch
from .outputs_writer import (
    IMAGE_SUFFIXES,  # noqa: F401 - re-exported: cli.IMAGE_SUFFIXES predates outputs_writer
    MANIFEST,
    TEMP_SUFFIX,
    Manifest,
    OutputItem,
    earlier_records,
    inputs_overwritten,
    is_complete,
    owned_by,
    plan_outputs,
    read_manifest,
    remove_stale_temps,
    write_png,
)
from .outputs_writer import collect_inputs as find_inputs
from .preprocess import parse_size

RAY_OPTIONS = ("workers", "cpus_per_worker", "address")  # segment options of --engine ray only
MIN_SIDE = 32  # total stride of every native backbone: smaller inputs cannot be segmented
DEMO_SEED, DEMO_SIZE = 2062, (256, 256)  # a scene showing 5 of the 6 classes


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _label_names(model) -> dict[int, str]:
    labels = getattr(getattr(model, "config", None), "id2label", None) or {}
    return {int(k): str(v) for k, v in labels.items()}


def _num_labels(model, fallback: int) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "num_labels", 0) or len(_label_names(model)) or fallback)


# ----------------------------------------------------------------------------- segment
def collect_inputs(paths: Sequence[str]) -> list[tuple[Path, Path]]:
    """(file, output stem relative to --out) for every input, by `outputs_writer`'s naming rule."""
    return [(item.source, item.stem) for item in plan_outputs(find_inputs(paths))]


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_out_dir(out: Path) -> str | None:
    """Why `--out` cannot take our files, or None; creates nothing (a probe file comes and goes)."""
    base = _nearest_existing(out)
    if not base.is_dir():
        return f"--out {out}: {base} is a file, not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".upernet-fast-probe-", suffix=TEMP_SUFFIX):
            pass
    except OSError as e:
        return f"--out {out}: cannot write in {base} ({e.strerror or e})"
    return None


def _check_model_source(model: str | None) -> str | None:
    if model is None:
        return None
    path = Path(model)
    if path.is_dir():
        return None if (path / "config.json").is_file() else f"--model {model}: no config.json in this folder"
    if path.is_file():
        if path.name == "config.json":
            return None
        return f"--model {model}: is a file; expected a checkpoint folder (config.json + weights) or a hub id"
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return None  # a hub id: resolved (from the cache) when the model loads
    return f"--model {model} does not exist (expected a checkpoint folder or a hub id like openmmlab/upernet-convnext-tiny)"


def validate_segment_args(args: argparse.Namespace) -> list[str]:
    """Every usage error, one message each, found before anything is loaded or written."""
    errors = []
    smallest = 1.0
    if args.scales is not None and any(not 0 < s < math.inf for s in args.scales):  # `not` catches nan
        errors.append(
            f"--scales must all be positive and finite, got {' '.join(f'{s:g}' for s in args.scales)}"
        )
    elif args.scales:
        smallest = min(args.scales)
    if args.short_side is not None and not args.short_side * smallest >= MIN_SIDE:
        errors.append(
            f"--short-side {args.short_side}"
            + (f" at scale {smallest:g}" if smallest != 1.0 else "")
            + f" is below {MIN_SIDE} pixels, the backbones' total stride"
        )
    if args.batch_size < 1:
        errors.append(f"--batch-size must be at least 1, got {args.batch_size}")
    errors.extend(_engine_problems(args))
    if args.device is not None:
        from .model import resolve_device

        try:
            resolve_device(args.device)
        except ValueError as e:
            errors.append(f"--device: {e}")
    if (problem := _check_model_source(args.model)) is not None:
        errors.append(problem)
    if (problem := _check_out_dir(Path(args.out))) is not None:
        errors.append(problem)
    return errors


def _engine_problems(args: argparse.Namespace) -> list[str]:
    """Usage errors of --engine and the options only the Ray engine takes."""
    if args.engine != "ray":
        given = [f"--{name.replace('_', '-')}" for name in RAY_OPTIONS if getattr(args, name) is not None]
        return [f"{', '.join(given)} only apply to --engine ray"] if given else []
    from .distributed import ray_missing

    errors = [problem] if (problem := ray_missing()) else []
    for name in ("workers", "cpus_per_worker"):
        value = getattr(args, name)
        if value is not None and value < 1:
            errors.append(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return errors


def _check_model_fits(segmenter) -> str | None:
    """After loading: the smallest side the network would see must reach the model's total stride."""
    reduction = int(getattr(getattr(segmenter.model, "backbone", None), "reduction", 0) or 0)
    side = segmenter.keep_ratio_short_side or (min(segmenter.size) if segmenter.size else None)
    if not reduction or side is None:
        return None
    smallest = int(side * min(segmenter.scales) + 0.5)
    if segmenter.mode == "slide":
        smallest = min(smallest, min(segmenter.crop_size))
    if smallest < reduction:
        return (
            f"images would reach the network at {smallest} pixels on their short side, below the model's "
            f"total stride {reduction}; raise --short-side or the smallest of --scales"
        )
    return None


class _Terminated(BaseException):
    """SIGTERM, turned into a clean stop like Ctrl-C (a BaseException: per-image handlers let it pass)."""


@contextlib.contextmanager
def _sigterm_stops():
    """SIGTERM ends the run like Ctrl-C (summary, files intact); only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _png_size(path: Path) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(path) as im:  # header only
            return im.height, im.width
    except OSError:
        return None


@dataclasses.dataclass
class _Tally:
    """What a segment run has done so far (kept up to date, so an interrupted run can still report it)."""

    total: int = 0
    written: int = 0
    complete: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)
    done: set[OutputItem] = dataclasses.field(default_factory=set)


def _summary(out_dir: Path, tally: _Tally, left: int) -> str:
    parts = [f"wrote {tally.written} label map{'s' * (tally.written != 1)} to {out_dir}"]
    if tally.complete:
        parts.append(f"{tally.complete} already complete (kept; --overwrite redoes them)")
    if tally.failed:
        parts.append(f"{len(tally.failed)} failed")
    if left:
        parts.append(f"{left} left (run the same command again to finish)")
    return "; ".join(parts) + f"; manifest: {out_dir / MANIFEST}"


def cmd_segment(args: argparse.Namespace) -> int:
    return segment_files(args, _Tally())


def segment_files(args: argparse.Namespace, tally: _Tally) -> int:
    """The `segment` command on either engine, counting in `tally`; returns the exit status."""
    errors = validate_segment_args(args)
    items = plan_outputs(find_inputs(args.inputs, exclude=args.out))  # earlier outputs are not inputs
    if not items:
        errors.append("no images found in " + " ".join(args.inputs))
    elif not any(item.source.exists() for item in items):  # some missing: reported per file, the rest run
        errors.extend(f"{item.source} does not exist" for item in items)
    errors.extend(inputs_overwritten(items, args.out, args.overlay))
    if errors:
        for message in errors:
            _err(f"error: {message}")
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(items, out_dir)
    resume = args.resume and not args.overwrite
    owners = read_manifest(out_dir) if resume else {}

    def missing(item: OutputItem) -> list[Path]:
        """The outputs of `item` still to write (all of them without --resume)."""
        paths = item.paths(out_dir, args.overlay)
        if not resume:
            return paths
        return [p for p in paths if not (is_complete(p) and owned_by(p, item.source, owners))]

    todo = {item: missing(item) for item in items}
    tally.total = len(items)
    manifest: Manifest | None = None
    stopped: int | None = None
    engine_failed = 0
    with _sigterm_stops():
        try:
            setup = None
            if any(todo.values()):  # a finished run reruns without loading the model
                setup = _load_segmenter(args)  # the Ray engine too: a bad model is a usage error here
                if not isinstance(setup, _SegmenterSetup):
                    return setup
            manifest = Manifest(out_dir, args.overlay, earlier_records(out_dir, items))
            if args.engine == "ray":
                from .distributed import run_on_ray

                del setup  # each Ray worker loads its own copy
                engine_failed = run_on_ray(items, todo, args, out_dir, manifest, tally)
            else:
                _run(items, todo, setup, args, out_dir, manifest, tally)
        except KeyboardInterrupt:
            stopped = 130
        except _Terminated:
            stopped = 128 + signal.SIGTERM
        finally:
            if manifest is not None:
                for item in items:  # the inputs not reached keep their planned names in the record
                    if item not in tally.done:
                        manifest.record(item, "pending")
                manifest.close()
    left = len(items) - len(tally.done)
    _err(("interrupted: " if stopped else "") + _summary(out_dir, tally, left))
    if tally.failed:
        _err("failed: " + ", ".join(tally.failed))
    return stopped or engine_failed or (1 if tally.failed else 0)


class _SegmenterSetup:
    """The loaded segmenter and what writing needs from it."""

    def __init__(self, segmenter) -> None:
        from .palette import palette_for

        self.segmenter = segmenter
        self.names = segmenter.id2label
        self.palette = palette_for(_num_labels(segmenter.model, len(self.names)))


def _load_segmenter(args: argparse.Namespace) -> _SegmenterSetup | int:
    """The segmenter, or exit status 2 after one line saying why the model cannot be used."""
    from .inference import Segmenter
    from .kernels._memory import keep_freed_memory

    keep_freed_memory()  # this process is ours (CLI or Ray worker): reuse freed buffers across images

    options = {"mode": args.mode, "flip": args.flip, "batch_size": args.batch_size}
    if args.short_side:
        options["keep_ratio_short_side"] = args.short_side
    if args.scales:
        options["scales"] = args.scales
    try:
        segmenter = Segmenter.from_pretrained(
            args.model, device=args.device, dtype=args.dtype, **_fast_path_kwargs(args), **options
        )
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        _err(f"error: --model {args.model or '(embedded)'}: cannot load it: {_one_line(e)}")
        return 2
    if (problem := _check_model_fits(segmenter)) is not None:
        _err(f"error: {problem}")
        return 2
    return _SegmenterSetup(segmenter)


def segment_one(setup: _SegmenterSetup, item: OutputItem, paths: list[Path], out_dir: Path, overlay: bool):
    """Read, segment and write the outputs in `paths` of one input: (size or None, error message or None).
    Every engine calls this, so their files are the same bytes. Per-image problems (unreadable, too small,
    cannot write) come back as the message; the caller records them and goes on."""
    import numpy as np

    from .palette import label_image
    from .palette import overlay as make_overlay
    from .preprocess import load_image

    stage, size = "read", None
    try:
        image = load_image(item.source)
        size = (image.height, image.width)
        stage = "segment"
        labels = setup.segmenter.predict_labels([image])[0].numpy()
        # the PNG holds 8 (16) bits per pixel anyway; int64 would be 192 MB for 24 MP
        labels = labels.astype(np.uint8 if len(setup.palette) <= 256 else np.uint16)
        stage = "write outputs for"
        label_path = item.label_path(out_dir)
        if label_path in paths:
            write_png(label_image(labels, setup.palette), label_path)
        if overlay and item.overlay_path(out_dir) in paths:
            picture = make_overlay(image, labels, setup.palette, setup.names)
            write_png(picture, item.overlay_path(out_dir))
    except Exception as exc:  # noqa: BLE001 - one bad image must not end the run
        return size, f"cannot {stage} {item.source}: {type(exc).__name__}: {_one_line(exc)}"
    return size, None


def record_result(
    item: OutputItem, size, error: str | None, manifest: Manifest, tally: _Tally, report=None
) -> None:
    """Count one input's result and put it in the manifest (`report` prints an error line)."""
    if error is not None:
        (report or _err)(f"error: {error}")
        manifest.record(item, "failed", size, error)
        tally.failed.append(str(item.source))
    else:
        manifest.record(item, "written", size)
        tally.written += 1
    tally.done.add(item)


def record_complete(item: OutputItem, out_dir: Path, manifest: Manifest, tally: _Tally) -> None:
    manifest.record(item, "complete", _png_size(item.label_path(out_dir)))
    tally.complete += 1
    tally.done.add(item)


def _run(items, todo, setup, args, out_dir: Path, manifest: Manifest, tally: _Tally) -> None:
    """Segment and write every input in order, in this process, counting in `tally`."""
    from tqdm import tqdm

    with tqdm(total=len(items), desc="segment", unit="img", file=sys.stderr, disable=args.quiet) as bar:

        def report(line: str) -> None:
            tqdm.write(line, file=sys.stderr)

        for item in items:
            paths = todo[item]
            if not paths:
                record_complete(item, out_dir, manifest, tally)
            else:
                size, error = segment_one(setup, item, paths, out_dir, args.overlay)
                record_result(item, size, error, manifest, tally, report)
            bar.update()


# ----------------------------------------------------------------------------- info
def describe(model) -> str:
    """Architecture, parameter count and labels of a loaded UperNet."""
    config = model.config
    backbone = config.backbone_config
    backbone = backbone.to_dict() if hasattr(backbone, "to_dict") else dict(backbone or {})
    kind = backbone.get("model_type", "?")
    lines = [f"backbone: {kind}"]
    if kind == "swin":
        lines.append(
            f"  embed_dim {backbone.get('embed_dim')}, depths {backbone.get('depths')}, "
            f"num_heads {backbone.get('num_heads')}, window_size {backbone.get('window_size')}"
        )
    else:
        lines.append(f"  depths {backbone.get('depths')}, hidden_sizes {backbone.get('hidden_sizes')}")
    lines.append(f"  out_features {backbone.get('out_features')}")
    lines.append(f"decode head: hidden_size {config.hidden_size}, pool_scales {list(config.pool_scales)}")
    if getattr(config, "use_auxiliary_head", False):
        lines.append(
            f"auxiliary head: in_channels {config.auxiliary_in_channels}, "
            f"channels {config.auxiliary_channels}, num_convs {config.auxiliary_num_convs}"
        )
    else:
        lines.append("auxiliary head: none")
    params = sum(p.numel() for p in model.parameters())
    lines.append(f"parameters: {params:,} ({params * 4 / 2**20:.1f} MiB as float32)")
    names = _label_names(model)
    lines.append(f"labels ({len(names)}): " + ", ".join(f"{i} {n}" for i, n in sorted(names.items())))
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    from .inference import default_model_path, load_model

    model = load_model(args.source, **_fast_path_kwargs(args))
    print(f"source: {args.source or default_model_path()}  ({type(model).__module__}.{type(model).__name__})")
    print(describe(model))
    if args.plan:
        print(format_plan(model, *args.plan_size))
    return 0


def format_plan(model, height: int, width: int) -> str:
    """The machine, the model-wide switches and, per backbone and decode-head layer, the implementation and why."""
    from .kernels import native
    from .kernels.gemm_bf16x3 import amx_gemm_available
    from .tuning import machine_key

    m = machine_key()
    lines = [
        f"plan for {height}x{width} on {m['cpu']} ({m['isa']}, {m['threads']} threads, torch {m['torch']}; "
        f"native bf16: {dispatch.native_bf16()}; C helpers: {'built' if native.library() else 'off'}; "
        f"own AMX GEMM: {'on' if amx_gemm_available() else 'off'})",
        f"  dtype {model.dtype}, backend {model.backend}, winograd {model.winograd}, tune {model.tune}, "
        f"bf16x3 {model.bf16x3}",
    ]
    for entry in model.plan(height, width):
        lines.append(f"  {entry['layer']}  {entry['part']}\n      {entry['impl']}  ({entry['why']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- convert
def cmd_convert(args: argparse.Namespace) -> int:
    from .convert_mmseg import convert_file

    try:
        out = convert_file(args.checkpoint, args.out, pool_scales=args.pool_scales, overwrite=args.overwrite)
    except (OSError, ValueError, NotImplementedError) as exc:
        _err(f"error: cannot convert {args.checkpoint}: {exc}")
        return 1
    print(f"wrote {out / 'config.json'} and {out / 'model.safetensors'}")
    return 0


# ----------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from .onnx_export import export_onnx

    try:
        path = export_onnx(
            args.source,
            args.out,
            opset=args.opset,
            dynamic=args.static is None,
            static_size=args.static,
            overwrite=args.overwrite,
        )
    except ImportError as exc:  # the optional `onnx` extra is missing: the message says how to install it
        _err(f"error: {exc}")
        return 2
    except (OSError, ValueError, RuntimeError) as exc:
        _err(f"error: cannot export {args.source}: {exc}")
        return 1
    shape = (
        "batch x 3 x height x width"
        if args.static is None
        else f"1 x 3 x {args.static[0]} x {args.static[1]}"
    )
    print(f"wrote {path} (input pixel_values: {shape}; output logits at the input size)")
    return 0


# ----------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from .inference import Segmenter
    from .palette import label_image, overlay, palette_for
    from .synthetic import mean_iou, sample

    if (problem := _check_out_dir(Path(args.out))) is not None:
        _err(f"error: {problem}")
        return 2
    image_arr, truth = sample(DEMO_SEED, 0, DEMO_SIZE)
    image = Image.fromarray(image_arr)
    segmenter = Segmenter.from_pretrained(None, **_fast_path_kwargs(args))
    labels = segmenter(image)
    names = segmenter.id2label
    palette = palette_for(len(names))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image.save(out / "demo_input.png")
    label_image(labels, palette).save(out / "demo_labels.png")
    overlay(image, labels, palette, names).save(out / "demo_overlay.png")
    label_image(truth, palette).save(out / "demo_truth.png")
    miou, _ = mean_iou(labels, truth, len(names))
    print(f"input:   {out / 'demo_input.png'} (synthetic, seed {DEMO_SEED}, {DEMO_SIZE[1]}x{DEMO_SIZE[0]})")
    print(f"labels:  {out / 'demo_labels.png'}")
    print(f"overlay: {out / 'demo_overlay.png'}")
    print(
        f"agreement with the ground truth: pixel accuracy {float(np.mean(labels == truth)):.3f}, mIoU {miou:.3f}"
    )
    return 0


# ----------------------------------------------------------------------------- parser
def _add_fast_path_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend", default=None, choices=dispatch.BACKENDS, help="default: $UPERNET_FAST_BACKEND or auto"
    )
    parser.add_argument(
        "--exact",
        action="store_true",
        help="no Winograd and no bf16x3 convolutions (every conv exact to fp32 rounding; slower on CPU)",
    )
    parser.add_argument(
        "--no-tune",
        action="store_true",
        help="use the built-in fast-path rules instead of measuring them on this CPU (UPERNET_FAST_TUNE=0)",
    )


def _fast_path_kwargs(args: argparse.Namespace) -> dict:
    return {
        "backend": args.backend,
        "winograd": False if args.exact else None,
        "tune": False if args.no_tune else None,
        "bf16x3": False if args.exact else None,
    }


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line (argparse would print the whole usage first), status 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="upernet-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="write a label PNG (and an overlay) per image")
    seg.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIRS")
    seg.add_argument("--model", default=None, help="HF-format directory or hub id (default: embedded model)")
    seg.add_argument("--out", required=True, help="output directory")
    seg.add_argument("--mode", choices=("whole", "slide"), default="whole")
    seg.add_argument("--overlay", action="store_true", help="also write <name>_overlay.png with a legend")
    seg.add_argument(
        "--short-side",
        type=int,
        default=None,
        help="keep-ratio resize to this short side (slide mode default: the crop size)",
    )
    seg.add_argument("--flip", action="store_true", help="horizontal-flip test-time augmentation")
    seg.add_argument("--scales", type=float, nargs="+", default=None, help="multi-scale TTA factors")
    seg.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="crops / TTA views per model call (4); with --engine ray also the images per batch a worker takes",
    )
    seg.add_argument("--device", default=None)
    seg.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default=None, help="default: the checkpoint's dtype"
    )
    seg.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip inputs whose outputs already exist (default; --no-resume or --overwrite redoes them)",
    )
    seg.add_argument("--overwrite", action="store_true", help="rewrite outputs that already exist")
    _add_fast_path_options(seg)
    seg.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process (default); ray: an actor pool on a Ray cluster (pip install upernet_fast[ray])",
    )
    seg.add_argument(
        "--workers", type=int, default=None, help="ray: model copies (actors); default: one per cluster CPU"
    )
    seg.add_argument(
        "--cpus-per-worker",
        type=int,
        default=None,
        help="ray: CPUs (torch threads) per worker; default: the cluster's CPUs / --workers, at most a node's",
    )
    seg.add_argument(
        "--address",
        default=None,
        help="ray: the cluster to join ('auto', or host:port of `ray start --head`); default: start a local one",
    )
    seg.add_argument("--quiet", action="store_true", help="no progress bar")
    seg.set_defaults(func=cmd_segment)

    info = sub.add_parser("info", help="architecture, parameter count and labels of a model")
    info.add_argument("source", nargs="?", default=None, help="default: embedded model")
    info.add_argument(
        "--plan",
        action="store_true",
        help="print which implementation each backbone and head layer runs, and why",
    )
    info.add_argument(
        "--plan-size", type=_size, default=(512, 512), metavar="HxW", help="input size of the plan (512x512)"
    )
    _add_fast_path_options(info)
    info.set_defaults(func=cmd_info)

    conv = sub.add_parser("convert", help="mmsegmentation UperNet .pth -> Hugging Face-format directory")
    conv.add_argument("checkpoint")
    conv.add_argument("--out", required=True)
    conv.add_argument(
        "--pool-scales",
        type=int,
        nargs="+",
        default=None,
        help="PPM scales if the checkpoint does not record them (default 1 2 3 6)",
    )
    conv.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    conv.set_defaults(func=cmd_convert)

    export = sub.add_parser("export", help="ONNX file of the model's fast graph (dynamic batch and size)")
    export.add_argument("source", help="HF-format directory or hub id (anything upernet_fast.load takes)")
    export.add_argument("--out", required=True, help="output .onnx file")
    export.add_argument(
        "--static", type=_size, default=None, metavar="HxW", help="fixed input size (batch 1) instead"
    )
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    export.add_argument("--overwrite", action="store_true", help="replace a file already at --out")
    export.set_defaults(func=cmd_export)

    demo = sub.add_parser("demo", help="segment a bundled synthetic image with the embedded model")
    demo.add_argument("--out", default="upernet_fast_demo")
    _add_fast_path_options(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:  # e.g. while a model loads; `segment` handles its own with a summary
        _err("interrupted")
        return 130
    except (OSError, ValueError) as exc:  # a bad source or size (info, demo): the message, not a traceback
        _err(f"error: {args.command}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
