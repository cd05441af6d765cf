"""`upernet-fast` command line: segment, info, bench, convert, export, demo.

    upernet-fast segment photos/ extra.jpg --out masks/ --overlay [--model openmmlab/upernet-convnext-tiny]
    upernet-fast info [SRC]
    upernet-fast bench [ARGS passed to bench/e2e.py]
    upernet-fast convert upernet_swin_tiny.pth --out upernet-swin-tiny/
    upernet-fast export upernet-swin-tiny/ --out model.onnx [--static 512x512] [--opset 18]
    upernet-fast demo [--out DIR]

SRC is a Hugging Face-format directory or hub id; the default is the small embedded model.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from . import dispatch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
DEMO_SEED, DEMO_SIZE = 2062, (256, 256)  # a scene showing 5 of the 6 classes


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _label_names(model) -> dict[int, str]:
    labels = getattr(getattr(model, "config", None), "id2label", None) or {}
    return {int(k): str(v) for k, v in labels.items()}


def _num_labels(model, fallback: int) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "num_labels", 0) or len(_label_names(model)) or fallback)


# ----------------------------------------------------------------------------- segment
def collect_inputs(paths: Sequence[str]) -> list[tuple[Path, Path]]:
    """(file, output stem relative to --out): explicit files as given (any suffix, so a wrong file is
    reported, not skipped), directories' image files (by suffix, recursively) keeping their relative paths."""
    found: list[tuple[Path, Path]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for file in sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            ):
                found.append((file, file.relative_to(path).with_suffix("")))
        else:
            found.append((path, Path(path.stem)))
    seen: dict[Path, int] = {}
    unique = []
    for file, stem in found:  # a.jpg and a.png (or two dirs) must not overwrite each other
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        unique.append((file, stem if n == 0 else stem.with_name(f"{stem.name}_{n}")))
    return unique


def _write_outputs(image, labels, out_stem: Path, palette, names, overlay: bool) -> None:
    from .palette import label_image
    from .palette import overlay as make_overlay

    out_stem.parent.mkdir(parents=True, exist_ok=True)
    label_image(labels, palette).save(out_stem.with_name(out_stem.name + ".png"))
    if overlay:
        make_overlay(image, labels, palette, names).save(out_stem.with_name(out_stem.name + "_overlay.png"))


def cmd_segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .inference import Segmenter
    from .palette import palette_for
    from .preprocess import load_image

    inputs = collect_inputs(args.inputs)
    if not inputs:
        _err("error: no images found in " + " ".join(args.inputs))
        return 2
    options = {"mode": args.mode, "flip": args.flip, "batch_size": args.batch_size}
    if args.short_side:
        options["keep_ratio_short_side"] = args.short_side
    if args.scales:
        options["scales"] = args.scales
    segmenter = Segmenter.from_pretrained(
        args.model, device=args.device, **_fast_path_kwargs(args), **options
    )
    names = segmenter.id2label
    palette = palette_for(_num_labels(segmenter.model, len(names)))
    out_dir = Path(args.out)
    failed: list[str] = []
    for path, stem in tqdm(inputs, desc="segment", unit="img", file=sys.stderr, disable=args.quiet):
        try:
            image = load_image(path)
        except Exception as exc:  # unreadable, truncated, not an image: report, keep going
            failed.append(str(path))
            tqdm.write(f"error: cannot read {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        labels = segmenter.predict_labels([image])[0].numpy()
        _write_outputs(image, labels, out_dir / stem, palette, names, args.overlay)
    done = len(inputs) - len(failed)
    _err(
        f"wrote {done} label map{'s' * (done != 1)} to {out_dir}"
        + (f"; {len(failed)} failed" if failed else "")
    )
    if failed:
        _err("failed: " + ", ".join(failed))
    return 1 if failed else 0


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
    return 0


# ----------------------------------------------------------------------------- bench
def bench_script() -> Path:
    return Path(__file__).resolve().parents[1] / "bench" / "e2e.py"


def cmd_bench(extra: Sequence[str]) -> int:
    script = bench_script()
    if not script.is_file():
        _err(
            f"error: the end-to-end benchmark is not available: {script} does not exist "
            "(it ships with a source checkout of upernet_fast, not with the installed package)"
        )
        return 2
    return subprocess.call([sys.executable, str(script), *extra])


# ----------------------------------------------------------------------------- convert
def cmd_convert(args: argparse.Namespace) -> int:
    from .convert_mmseg import convert_file

    try:
        out = convert_file(args.checkpoint, args.out, pool_scales=args.pool_scales)
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        _err(f"error: cannot convert {args.checkpoint}: {exc}")
        return 1
    print(f"wrote {out / 'config.json'} and {out / 'model.safetensors'}")
    return 0


# ----------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from .onnx_export import export_onnx

    try:
        path = export_onnx(
            args.source, args.out, opset=args.opset, dynamic=args.static is None, static_size=args.static
        )
    except ImportError as exc:  # the optional `onnx` extra is missing: the message says how to install it
        _err(f"error: {exc}")
        return 2
    except (OSError, ValueError, RuntimeError) as exc:
        _err(f"error: cannot export {args.source}: {exc}")
        return 1
    shape = "batch x 3 x height x width" if args.static is None else f"1 x 3 x {args.static}"
    print(f"wrote {path} (input pixel_values: {shape}; output logits at the input size)")
    return 0


# ----------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from .inference import Segmenter
    from .palette import label_image, overlay, palette_for
    from .synthetic import mean_iou, sample

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
        help="no Winograd convolutions (every conv exact to fp32 rounding; slower on CPU)",
    )


def _fast_path_kwargs(args: argparse.Namespace) -> dict:
    return {"backend": args.backend, "winograd": False if args.exact else None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    seg.add_argument("--batch-size", type=int, default=4)
    seg.add_argument("--device", default=None)
    _add_fast_path_options(seg)
    seg.add_argument("--quiet", action="store_true", help="no progress bar")
    seg.set_defaults(func=cmd_segment)

    info = sub.add_parser("info", help="architecture, parameter count and labels of a model")
    info.add_argument("source", nargs="?", default=None, help="default: embedded model")
    _add_fast_path_options(info)
    info.set_defaults(func=cmd_info)

    sub.add_parser("bench", help="run bench/e2e.py; all further arguments are passed through")

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
    conv.set_defaults(func=cmd_convert)

    export = sub.add_parser("export", help="ONNX file of the model's fast graph (dynamic batch and size)")
    export.add_argument("source", help="HF-format directory or hub id (anything upernet_fast.load takes)")
    export.add_argument("--out", required=True, help="output .onnx file")
    export.add_argument("--static", default=None, metavar="HxW", help="fixed input size (batch 1) instead")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    export.set_defaults(func=cmd_export)

    demo = sub.add_parser("demo", help="segment a bundled synthetic image with the embedded model")
    demo.add_argument("--out", default="upernet_fast_demo")
    _add_fast_path_options(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # everything after `bench` belongs to bench/e2e.py, even --help
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
