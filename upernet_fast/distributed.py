"""`segment` on a Ray cluster: the same files as the local engine, written by a pool of Ray actors.

    upernet-fast segment photos/ --out masks/ --engine ray [--workers N] [--address auto]
    upernet_fast.distributed.segment_dataset(["photos/"], "masks/", workers=2)

The driver does everything that decides *what* is written, with the local engine's code: it finds the
inputs, names the outputs (`outputs_writer.plan_outputs`), skips complete ones (`--resume`), checks the
options and that the model loads, and keeps the manifest and the summary. Ray Data carries one row per input
still to do (its path and which of its outputs to write) to a fixed pool of actors; each actor loads the model
once and runs `cli.segment_one` on its rows, the very function the local engine runs per image: it reads the
file, segments it and writes the PNGs atomically (temporary name, then rename). Files are therefore the same
bytes as a local run with the same options and threads per process. Only a status row per input comes back.

Every node must see the inputs, `--out` and the model at the same paths (one machine, or a shared file
system), and have upernet_fast installed; relative paths are taken from the driver's working directory.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .outputs_writer import MANIFEST, Manifest, OutputItem

EXTRA = "ray"
INSTALL = f'pip install "upernet_fast[{EXTRA}]" (in a checkout: pip install -e ".[{EXTRA}]")'
MAX_BLOCKS = 10_000  # rows are tiny (paths); more blocks only balance better up to a point


def ray_missing() -> str | None:
    """Why the Ray engine cannot run here (Ray Data does not import), or None."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as e:
        return f"--engine ray needs Ray Data, which is not installed ({e}); install the '{EXTRA}' extra: {INSTALL}"
    return None


def _ray():
    if (problem := ray_missing()) is not None:
        raise ImportError(problem)
    import ray

    return ray


class ClusterUnreachable(ConnectionError):
    """Ray could not connect to (or start) the cluster; the message says what to check."""

    def __init__(self, address: str | None, error: BaseException) -> None:
        cause = error.__cause__ or error
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()] or [""]
        message = f"--address {address}: cannot connect to the Ray cluster" if address else "cannot start Ray"
        message += f" ({type(cause).__name__}: {lines[-1][:300]})"  # Ray puts a traceback in the message
        if "authtoken" in str(cause).lower() and not os.environ.get("RAY_AUTH_MODE"):
            # `ray start` enables token authentication; ray.init(address=...) does not assume it
            message += (
                "; the cluster uses token authentication: run with RAY_AUTH_MODE=token and its token in "
            )
            message += "~/.ray/auth_token or RAY_AUTH_TOKEN"
        super().__init__(message)


# ----------------------------------------------------------------------------- worker side
class SegmentWorker:
    """One Ray actor: loads the segmenter once, then segments and writes the rows of each batch it gets."""

    def __init__(self, args: argparse.Namespace, threads: int, cwd: str) -> None:
        import torch

        from .cli import _load_segmenter, _SegmenterSetup

        torch.set_num_threads(threads)
        with contextlib.suppress(OSError):  # relative inputs mean the driver's folder (shared file system)
            os.chdir(cwd)
        setup = _load_segmenter(args)
        if not isinstance(setup, _SegmenterSetup):
            raise RuntimeError(f"a Ray worker cannot load --model {args.model or '(embedded)'} (see above)")
        self.setup, self.out_dir, self.overlay = setup, Path(args.out), args.overlay

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from .cli import segment_one

        rows = zip(batch["source"], batch["stem"], batch["label"], batch["overlay"])
        heights, widths, errors = [], [], []
        for source, stem, label, overlay in rows:
            item = OutputItem(Path(source), Path(stem))
            wanted = ((item.label_path(self.out_dir), label), (item.overlay_path(self.out_dir), overlay))
            paths = [path for path, write in wanted if write]
            size, error = segment_one(self.setup, item, paths, self.out_dir, self.overlay)
            heights.append(size[0] if size else -1)
            widths.append(size[1] if size else -1)
            errors.append(error or "")
        return {
            "index": np.asarray(batch["index"], dtype=np.int64),
            "height": np.asarray(heights, dtype=np.int64),
            "width": np.asarray(widths, dtype=np.int64),
            "error": np.asarray(errors, dtype=object),
        }


# ----------------------------------------------------------------------------- driver side
@contextlib.contextmanager
def connected(address: str | None, num_cpus: int | None = None) -> Iterator[Any]:
    """Ray, connected: to `address` if given, else to a new local cluster with `num_cpus` CPUs (default:
    this machine's). A connection made before (a notebook, a test) is used as it is and left open; one made
    here is closed."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    options: dict[str, Any] = (
        # "local": a new cluster even when `ray start` runs on this machine (Ray would join that one)
        {"address": address} if address else {"address": "local", "num_cpus": num_cpus or os.cpu_count() or 1}
    )
    try:
        ray.init(**options, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterUnreachable(address, e) from e
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Ray Data's own progress bars off (ours counts every input, complete ones too) and its INFO lines
    (execution started / finished) hidden; its warnings still show."""
    import ray.data

    context = ray.data.DataContext.get_current()
    logger = logging.getLogger("ray.data")
    saved = context.enable_progress_bars, logger.level

    def keep(record: logging.LogRecord) -> bool:  # the notice that we turned the bars off
        return not record.getMessage().startswith("Progress bars disabled")

    context.enable_progress_bars = False
    logger.setLevel(logging.WARNING)
    logger.addFilter(keep)
    try:
        yield
    finally:
        context.enable_progress_bars, _ = saved
        logger.setLevel(saved[1])
        logger.removeFilter(keep)


def pool_size(ray, workers: int | None, cpus_per_worker: int | None) -> tuple[int, int, str | None]:
    """(workers, CPUs per worker, warning or None) that the cluster can run at once: defaults fill the
    cluster with one single-threaded worker per CPU; a worker never asks for more CPUs than a node has."""
    total = max(1, int(ray.cluster_resources().get("CPU", 1)))
    largest = max(
        (int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")), default=total
    )
    largest = max(1, largest)
    asked = (workers, cpus_per_worker)
    if cpus_per_worker is None:
        cpus_per_worker = max(1, min(total // workers, largest)) if workers else 1
    cpus_per_worker = min(cpus_per_worker, largest)
    fit = max(1, total // cpus_per_worker)
    workers = min(workers or fit, fit)
    warning = None
    if (asked[0] is not None and workers < asked[0]) or (asked[1] is not None and cpus_per_worker < asked[1]):
        warning = (
            f"the Ray cluster has {total} CPUs (at most {largest} on one node): running {workers} "
            f"worker{'s' * (workers != 1)} with {cpus_per_worker} CPU{'s' * (cpus_per_worker != 1)} each"
        )
    return workers, cpus_per_worker, warning


def _worker_args(args: argparse.Namespace) -> argparse.Namespace:
    """The options for the workers: the model and --out as absolute paths (workers may start elsewhere)."""
    args = argparse.Namespace(**vars(args))
    if args.model is not None and Path(args.model).exists():
        args.model = str(Path(args.model).absolute())
    args.out = str(Path(args.out).absolute())
    return args


def run_on_ray(items, todo, args: argparse.Namespace, out_dir: Path, manifest: Manifest, tally) -> int:
    """The Ray engine's counterpart of `cli._run`: record complete inputs, have the actor pool do the rest,
    record each result as it comes back. Returns 0, or 1 when the Ray job itself failed (the inputs not
    reached stay pending), or 2 when the cluster cannot be reached."""
    from .cli import _err

    try:
        return _run_pending(items, todo, args, out_dir, manifest, tally)
    except ClusterUnreachable as e:
        _err(f"error: {e}")
        return 2


def _run_pending(items, todo, args: argparse.Namespace, out_dir: Path, manifest: Manifest, tally) -> int:
    from tqdm import tqdm

    from .cli import _err, _one_line, record_complete, record_result

    index = {item: i for i, item in enumerate(items)}
    pending = [item for item in items if todo[item]]
    with tqdm(total=len(items), desc="segment", unit="img", file=sys.stderr, disable=args.quiet) as bar:

        def report(line: str) -> None:
            tqdm.write(line, file=sys.stderr)

        for item in items:
            if not todo[item]:
                record_complete(item, out_dir, manifest, tally)
                bar.update()
        if not pending:
            return 0
        with connected(args.address) as ray:
            workers, threads, warning = pool_size(ray, args.workers, args.cpus_per_worker)
            if warning:
                report(f"warning: {warning}")
            rows = [
                {
                    "index": index[item],
                    "source": str(item.source),
                    "stem": str(item.stem),
                    "label": item.label_path(out_dir) in todo[item],
                    "overlay": args.overlay and item.overlay_path(out_dir) in todo[item],
                }
                for item in pending
            ]
            # a block per batch, or smaller blocks when there are fewer batches than workers (all get
            # work); never more workers than blocks (an idle actor would only load the model)
            blocks = min(MAX_BLOCKS, max(math.ceil(len(rows) / args.batch_size), min(len(rows), workers)))
            workers = min(workers, blocks)
            results = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
                SegmentWorker,
                fn_constructor_args=(_worker_args(args), threads, os.getcwd()),
                batch_size=args.batch_size,
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=threads,
                num_gpus=1 if str(args.device or "").startswith("cuda") else None,
            )
            try:
                with _quiet_ray_data():
                    for row in results.iter_rows():
                        item = items[int(row["index"])]
                        size = (int(row["height"]), int(row["width"])) if row["height"] >= 0 else None
                        record_result(item, size, row["error"] or None, manifest, tally, report)
                        bar.update()
            except Exception as e:  # noqa: BLE001 - e.g. a worker that cannot load the model, or died
                _err(f"error: the Ray job stopped: {type(e).__name__}: {_one_line(e)[:2000]}")
                return 1
    return 0


# ----------------------------------------------------------------------------- Python entry point
@dataclass
class SegmentReport:
    """What `segment_dataset` did: the CLI's exit status, counts, the failed inputs and the manifest."""

    status: int
    written: int
    complete: int
    failed: list[str]
    left: int
    manifest: Path


def segment_dataset(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    workers: int | None = None,
    cpus_per_worker: int | None = None,
    address: str | None = None,
    batch_size: int = 4,
    overlay: bool = False,
    resume: bool = True,
    **options: Any,
) -> SegmentReport:
    """`upernet-fast segment INPUTS --out OUT --engine ray ...` from Python: every option of the command
    line by its long name (`mode="slide"`, `short_side=512`, `flip=True`, `scales=[0.75, 1.0]`,
    `dtype="bfloat16"`, `device`, `backend`, `exact=True`, `no_tune=True`, `overwrite=True`, `quiet=True`).
    Problems are printed to stderr as by the command; `status` is its exit status (0, 1 some inputs
    failed, 2 usage error, 130 interrupted)."""
    from . import cli

    def usage_error(message: str) -> SegmentReport:  # as the command reports it: status 2, nothing run
        cli._err(f"error: {message}")
        return SegmentReport(
            status=2, written=0, complete=0, failed=[], left=0, manifest=Path(out) / MANIFEST
        )

    if isinstance(inputs, (str, os.PathLike)) or not inputs:
        return usage_error(f"inputs must be a non-empty list of image files or folders, got {inputs!r}")
    parser = cli.build_parser()
    args = parser.parse_args(["segment", *map(str, inputs), "--out", str(out), "--engine", "ray"])
    settings = dict(
        model=None if model is None else str(model),
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        address=address,
        batch_size=batch_size,
        overlay=overlay,
        resume=resume,
        **options,
    )
    # argparse keeps sub-parsers only in its private subparsers action: the segment options and their types
    actions = {a.dest: a for a in parser._subparsers._group_actions[0].choices["segment"]._actions}
    for key, value in settings.items():
        if not hasattr(args, key):
            raise TypeError(f"segment_dataset() got an unexpected option {key!r}")
        action = actions.get(key)
        if value is not None and action is not None and action.type is not None:  # the command line's types
            many = action.nargs in ("+", "*")
            values = value if many and isinstance(value, (list, tuple)) else [value]
            try:
                converted = [action.type(v) for v in values]
            except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                return usage_error(f"{key}={value!r}: {exc}")
            value = converted if many else converted[0]
        setattr(args, key, value)
    tally = cli._Tally()
    status = cli.segment_files(args, tally)
    return SegmentReport(
        status=status,
        written=tally.written,
        complete=tally.complete,
        failed=list(tally.failed),
        left=tally.total - len(tally.done),
        manifest=Path(out) / MANIFEST,
    )


__all__ = ["EXTRA", "SegmentReport", "SegmentWorker", "ray_missing", "segment_dataset"]
