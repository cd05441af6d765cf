"""ONNX export of FastUperNet's own inference graph, for any batch, height and width.

transformers' UperNet does not export with dynamic sizes: the pyramid pooling's adaptive average pooling
has no dynamic ONNX form (optimum #1397). `export_onnx` exports OUR graph instead (`ExportGraph`):

- BatchNorm folded into the convs (the head modules' cached `folded()` weights; ResNet's backbone convs are
  folded here), no auxiliary head;
- the low-resolution head rewrite (README "How it is fast"): the upsampled groups of `fpn_bottleneck` and of the PPM
  `bottleneck` are channel-mixed into their nine taps at their own resolution, then bilinearly upsampled,
  shifted and summed at the high resolution as banded resize GEMMs (`upsample_shift_add`), never
  concatenated;
- adaptive average pooling as row/column averaging matrices built from the runtime H and W with the
  reference's overlapping bin rule (start = floor(i*H/s), end = ceil((i+1)*H/s)), so it is exact at every
  input size, not just the traced one;
- every resize bilinear with align_corners=False; logits at the input size.

ConvNeXt and ResNet run their own forward (ConvNeXt's plain-op path, taken under tracing with autograd
enabled: the export traces with grad mode on); Swin runs `onnx_swin.swin_feature_maps`, the same math
written so that no window count gets specialised to the traced size. The graph is captured with
`torch.export` (non-strict, symbolic batch/height/width) and must stay dynamic: a specialised size is an
error, never a silently static file.
Output: input `pixel_values` (batch, 3, height, width), output `logits`, `id2label` (JSON) in the model's
metadata_props. Needs the optional extra `onnx` (`pip install -e .[onnx]`).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import stat
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backbones.swin import SwinBackbone
from .checkpoint import parse_dtype
from .folding import fold_batchnorm
from .model import FastUperNet
from .onnx_swin import swin_feature_maps
from .preprocess import parse_size

__all__ = ["ExportGraph", "export_onnx", "ort_session", "require_onnx"]

EXTRA = "onnx"
INSTALL_HINT = "pip install -e .[onnx] (from a source checkout) or pip install 'upernet_fast[onnx]'"
DEFAULT_OPSET = 18  # the dynamo exporter's default (and the lowest opset it writes natively)


def require_onnx(*modules: str) -> None:
    """ImportError naming the `onnx` extra when any of `modules` (default: all three) cannot be imported."""
    missing = []
    for name in modules or ("onnx", "onnxscript", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(
            f"ONNX support needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed; install the optional extra {EXTRA!r}: {INSTALL_HINT}"
        )


# ------------------------------------------------------------------------------------- dynamic-size maths
def _as_float(n: Any) -> torch.Tensor:
    """A runtime size (int or SymInt) as a float32 scalar tensor (a graph value, not a traced constant)."""
    return torch.ones((), dtype=torch.float32) * n


def adaptive_avg_matrix(n: Any, s: int, dtype: torch.dtype) -> torch.Tensor:
    """(s, n) averaging matrix of adaptive pooling to s bins over an axis of runtime length n: row i holds
    1/len over [floor(i*n/s), ceil((i+1)*n/s)). Bins overlap when s does not divide n; s may exceed n."""
    i = torch.arange(s)
    start = torch.div(i * n, s, rounding_mode="floor")
    end = torch.div((i + 1) * n + (s - 1), s, rounding_mode="floor")
    pos = torch.arange(n)
    member = ((pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])).to(dtype)
    return member / (end - start)[:, None].to(dtype)


def adaptive_avg_pool(x: torch.Tensor, s: int) -> torch.Tensor:
    """`F.adaptive_avg_pool2d(x, s)` for any runtime (H, W) of x: P_h x P_w^T, as broadcast products and
    sums (a batched matmul would reshape, and guard on the deepest map being wider than 1 while tracing)."""
    rows = adaptive_avg_matrix(x.shape[2], s, x.dtype)  # (s, H)
    cols = adaptive_avg_matrix(x.shape[3], s, x.dtype)  # (s, W)
    y = (x[:, :, None] * rows[:, :, None]).sum(3)  # (B, C, s, W)
    return (y[:, :, :, None] * cols).sum(4)  # (B, C, s, s)


def bilinear_coefficients(
    n_in: Any, n_out: Any, margin: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ATen's bilinear (align_corners=False) source indices i0, i1 and float32 weights l0, l1 of the output
    positions -margin .. n_out - 1 + margin; weights are 0 outside [0, n_out) (the zero padding of a conv
    applied after the resize). A shift by t in [-margin, margin] is the slice [margin + t : margin + t + n_out]."""
    d = torch.arange(n_out + 2 * margin) - margin
    valid = ((d >= 0) & (d < n_out)).to(torch.float32)
    d = torch.minimum(torch.clamp(d, min=0), torch.ones_like(d) * (n_out - 1))
    scale = _as_float(n_in) / _as_float(n_out)
    src = torch.clamp(scale * (d.to(torch.float32) + 0.5) - 0.5, min=0.0)
    i0 = torch.minimum(src.to(torch.int64), torch.ones_like(d) * (n_in - 1))  # src >= 0: truncation = floor
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    l1 = torch.clamp(src - i0.to(torch.float32), 0.0, 1.0)
    return i0, i1, (1.0 - l1) * valid, l1 * valid


def interpolation_matrix(n_in: Any, n_out: Any, margin: int, dtype: torch.dtype) -> torch.Tensor:
    """(n_out + 2 * margin, n_in) bilinear resize matrix (rows as in `bilinear_coefficients`, 2 non-zeros
    each; all-zero rows outside the output): `A[d] @ x` is the resized value at output position d - margin."""
    i0, i1, l0, l1 = bilinear_coefficients(n_in, n_out, margin)
    cols = torch.arange(n_in)[None, :]
    return (cols == i0[:, None]).to(dtype) * l0.to(dtype)[:, None] + (cols == i1[:, None]).to(dtype) * l1.to(
        dtype
    )[:, None]


def upsample_shift_add(taps: torch.Tensor, size: tuple[Any, Any]) -> torch.Tensor:
    """sum_t shift_t(bilinear_resize(taps[:, t], size)) for taps (B, 9, C, h, w), t = ky * 3 + kx, i.e.
    conv3x3(resize(x)) when taps are the per-tap channel mixes of x (see kernels/fpn.py for the identity).

    The resize is separable, U(z) = A_h z A_w^T, and a shift by d is A with its rows moved by d (rows
    leaving the output are zero: the conv's zero padding at high resolution), so
    out = sum_ky A_h^(ky) (sum_kx taps[ky, kx] A_w^(kx)T): three width GEMMs at the low rows, three height
    GEMMs into the output, with the dense banded matrices built from the runtime sizes. (Measured in ONNX
    Runtime, ConvNeXt-T at 256x256, 1 thread: this form is much cheaper than 12 gathers of the same math.)"""
    b, _, c, h, w = taps.shape
    H, W = size
    taps = taps.unflatten(1, (3, 3))  # (B, ky, kx, C, h, w)
    a_w = interpolation_matrix(w, W, 1, taps.dtype)  # (W + 2, w)
    a_h = interpolation_matrix(h, H, 1, taps.dtype)  # (H + 2, h)
    rows = None  # (B, ky, C, h, W)
    for kx in range(3):
        term = F.linear(taps[:, :, kx], a_w[kx : kx + W])
        rows = term if rows is None else rows + term
    out = None  # (B, C, W, H): the height pass contracts the last dim
    for ky in range(3):
        term = F.linear(rows[:, ky].transpose(2, 3), a_h[ky : ky + H])
        out = term if out is None else out + term
    return out.transpose(2, 3)


def resize_bilinear(x: torch.Tensor, size: tuple[Any, Any]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------------- the graph
def _fold_resnet(backbone: nn.Module) -> nn.Module:
    """A copy of a native ResNet backbone with every BatchNorm folded into its conv (float64 fold)."""
    from .backbones.resnet import ResNetConvLayer, ResNetShortCut

    folded = copy.deepcopy(backbone)
    for mod in folded.modules():
        if isinstance(mod, (ResNetConvLayer, ResNetShortCut)):
            conv = mod.convolution
            w, b = fold_batchnorm(conv.weight, None, mod.normalization)
            fused = nn.Conv2d(
                conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=True
            ).to(device=w.device, dtype=w.dtype)
            with torch.no_grad():
                fused.weight.copy_(w)
                fused.bias.copy_(b)
            mod.convolution, mod.normalization = fused, nn.Identity()
    return folded


def _prepare_backbone(backbone: nn.Module) -> nn.Module:
    """The backbone module to trace: native ones as they are (their plain-op paths), ResNet BN-folded."""
    from .backbones.convnext import ConvNextLayer
    from .backbones.resnet import ResNetBackbone

    if isinstance(backbone, ResNetBackbone):
        return _fold_resnet(backbone)
    for mod in backbone.modules():
        if isinstance(mod, ConvNextLayer):
            mod.folded()  # fill the fold cache eagerly: traced code reads it as a constant
    return backbone


class ExportGraph(nn.Module):
    """FastUperNet's inference forward in plain ATen ops with dynamic-size-safe index arithmetic:
    `forward(pixel_values) -> logits` at the input size. Folded weights are buffers (ONNX initializers)."""

    def __init__(self, model: FastUperNet) -> None:
        super().__init__()
        head = model.decode_head
        self.backbone = _prepare_backbone(model.backbone)
        self.swin = isinstance(model.backbone, SwinBackbone)
        self.pool_scales = list(head.pool_scales)
        self.channels = head.channels
        self.num_levels = len(head.in_channels)
        with torch.no_grad():
            for i, conv in enumerate(head.lateral_convs):
                self._keep(f"lateral{i}", *conv.folded())
            for i, block in enumerate(head.psp_modules):
                self._keep(f"psp{i}", *block.conv_module.folded())
            for i, conv in enumerate(head.fpn_convs):
                self._keep(f"fpn{i}", *conv.folded())
            self._keep_split("bottleneck", head, head.bottleneck, head.in_channels[-1], len(self.pool_scales))
            self._keep_split("fpn_bottleneck", head, head.fpn_bottleneck, self.channels, self.num_levels - 1)
            self._keep("classifier", head.classifier.weight, head.classifier.bias)

    def _keep(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.register_buffer(f"{name}_w", weight.detach().clone())
        if bias is not None:  # (no None buffers: torch.export's non-strict tracer miscounts them)
            self.register_buffer(f"{name}_b", bias.detach().clone())

    def _keep_split(self, name: str, head: nn.Module, module: nn.Module, first: int, n_low: int) -> None:
        w_direct, bias, w_taps = head._split_bottleneck(module, first, n_low)
        self._keep(f"{name}_direct", w_direct, bias)
        for i, wt in enumerate(w_taps):
            self._keep(f"{name}_taps{i}", wt, None)

    def _conv(self, name: str, x: torch.Tensor, padding: int = 0, relu: bool = True) -> torch.Tensor:
        y = F.conv2d(x, self._buffers[f"{name}_w"], self._buffers.get(f"{name}_b"), padding=padding)
        return F.relu(y) if relu else y

    def _fused_bottleneck(self, name: str, direct: torch.Tensor, low: list[torch.Tensor]) -> torch.Tensor:
        """relu(conv3x3(cat([direct, *(resize(t) for t in low)]))) without the upsampled concatenation."""
        out = self._conv(f"{name}_direct", direct, padding=1, relu=False)
        size = (direct.shape[2], direct.shape[3])
        for i, feat in enumerate(low):
            taps = self._conv(f"{name}_taps{i}", feat, relu=False)
            taps = taps.unflatten(1, (9, taps.shape[1] // 9))
            out = out + upsample_shift_add(taps, size)
        return F.relu(out)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.swin:
            features = swin_feature_maps(self.backbone, pixel_values)
        else:
            features = tuple(self.backbone(pixel_values).feature_maps)
        # One (NCHW) layout throughout: mixed layouts make the tracer compare symbolic strides.
        features = tuple(f.contiguous() for f in features)
        laterals = [self._conv(f"lateral{i}", features[i]) for i in range(self.num_levels - 1)]
        top = features[-1]
        branches = [self._conv(f"psp{i}", adaptive_avg_pool(top, s)) for i, s in enumerate(self.pool_scales)]
        laterals.append(self._fused_bottleneck("bottleneck", top, branches))
        for i in range(self.num_levels - 1, 0, -1):
            hi = laterals[i - 1]
            laterals[i - 1] = hi + resize_bilinear(laterals[i], (hi.shape[2], hi.shape[3]))
        fpn_outs = [self._conv(f"fpn{i}", laterals[i], padding=1) for i in range(self.num_levels - 1)]
        fpn_outs.append(laterals[-1])  # one level: the PPM output alone, as in transformers
        fused = self._fused_bottleneck("fpn_bottleneck", fpn_outs[0], fpn_outs[1:])
        logits = self._conv("classifier", fused, relu=False)
        return resize_bilinear(logits, (pixel_values.shape[2], pixel_values.shape[3]))


# -------------------------------------------------------------------------------------------- export
def _as_fast_model(model_or_source: Any) -> FastUperNet:
    if isinstance(model_or_source, FastUperNet):
        return model_or_source
    from .model import load

    return load(model_or_source)


def _name_dims(model: Any, names: dict[int, str]) -> None:
    """Readable names for the dynamic input/output dims (the tracer calls them s0, s1, ...)."""
    import onnx_ir as ir

    for value in (*model.graph.inputs, *model.graph.outputs):
        dims = list(value.shape)
        for axis, name in names.items():
            if not isinstance(dims[axis], int):
                dims[axis] = ir.SymbolicDim(name)
        value.shape = ir.Shape(dims)


def export_onnx(
    model_or_source: Any,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    dynamic: bool = True,
    dtype: torch.dtype | None = None,
    static_size: tuple[int, int] | str | None = None,
    overwrite: bool = True,
) -> str:
    """Export FastUperNet's inference graph (see the module docstring) to `path`; returns the path.

    `model_or_source`: a FastUperNet or anything `upernet_fast.load()` takes (directory, hub id,
    transformers model). `dynamic=True`: batch, height and width are free (traced for sides of at least
    twice the backbone's total stride; sides down to the stride itself run correctly too); `dynamic=False`
    fixes them to `static_size` (HxW; default 512x512), batch 1.
    `dtype`: export in this float dtype or its name (default: the model's): float32, or float16 with a static
    size (ONNX Runtime's CPU Conv has no bfloat16 or float64 kernel). `opset`: ONNX opset, 18 (default) up to
    the newest the installed onnx knows. The file is written under a temporary name and renamed: a failed
    export leaves an existing `path` as it was; `overwrite=False` refuses to replace one at all."""
    target = os.fspath(path)
    if os.path.isdir(target):
        raise ValueError(f"{target} is a folder; pass the path of the .onnx file to write")
    if not overwrite and os.path.exists(target):
        raise ValueError(f"{target} already exists (overwrite=True, CLI: --overwrite, replaces it)")
    require_onnx("onnx", "onnxscript")
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset is not None and not DEFAULT_OPSET <= opset <= newest:
        raise ValueError(
            f"opset {opset} is outside {DEFAULT_OPSET}..{newest}: the dynamo exporter writes {DEFAULT_OPSET} and "
            f"up, and the installed onnx knows opsets up to {newest}"
        )
    dtype = None if dtype is None else parse_dtype(dtype)
    dtype = None if dtype == "auto" else dtype
    if dtype is not None:
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(
                f"dtype {dtype} cannot be exported: ONNX Runtime's CPU Conv has no {dtype} kernel (use float32, "
                "or float16 with a static size)"
            )
        if dtype == torch.float16 and dynamic:
            raise ValueError(
                "float16 exports need a static size (dynamic=False, static_size=HxW): torch.export "
                "cannot trace the dynamic float16 graph"
            )
    model = _as_fast_model(model_or_source)
    if dtype is not None or model.device.type != "cpu":  # traced on CPU; the caller's model is left alone
        model = copy.deepcopy(model).to(device="cpu", dtype=dtype)
    static = None if static_size is None else parse_size(static_size)
    if dynamic and static is not None:
        raise ValueError("static_size fixes the input size: pass dynamic=False with it")
    graph = ExportGraph(model).eval()
    reduction = int(model.backbone.reduction)
    if dynamic:
        # Sizes that are not multiples of the strides or windows, so no size relation gets specialised.
        h, w, batch = 3 * reduction + 7, 4 * reduction + 11, 2
    else:
        (h, w), batch = static or (512, 512), 1
        if min(h, w) < reduction:
            raise ValueError(
                f"static size {h}x{w}: each side must be at least {reduction}, the backbone's stride"
            )
    example = torch.randn(batch, model.backbone.num_channels, h, w, dtype=model.dtype)
    dynamic_shapes = None
    if dynamic:
        dim = torch.export.Dim
        dynamic_shapes = {
            "pixel_values": {
                0: dim("batch", min=1, max=1024),
                2: dim("height", min=2 * reduction, max=16384),
                3: dim("width", min=2 * reduction, max=16384),
            }
        }
    with torch.enable_grad():  # ConvNeXt's plain-op path (see the module docstring)
        # torch.export first, non-strict, so a size that cannot stay dynamic fails here with the tracer's
        # reason (torch.onnx.export alone would silently retry other capture strategies).
        exported = torch.export.export(graph, (example,), dynamic_shapes=dynamic_shapes, strict=False)
    program = torch.onnx.export(
        exported,
        input_names=["pixel_values"],
        output_names=["logits"],
        opset_version=opset or DEFAULT_OPSET,
        dynamo=True,
        verbose=False,
    )
    if dynamic:
        shape = program.model.graph.inputs[0].shape
        fixed = [
            name for axis, name in ((0, "batch"), (2, "height"), (3, "width")) if isinstance(shape[axis], int)
        ]
        if fixed:  # never ship a graph that only takes the traced size
            raise RuntimeError(
                f"ONNX export specialised {', '.join(fixed)} to the traced example {tuple(example.shape)}; "
                "this model cannot be exported with dynamic sizes (pass dynamic=False for a static graph)"
            )
        _name_dims(program.model, {0: "batch", 2: "height", 3: "width"})
    labels = {str(k): str(v) for k, v in sorted(model.config.id2label.items())}
    program.model.metadata_props["id2label"] = json.dumps(labels)
    program.model.metadata_props["upernet_fast.num_labels"] = str(model.config.num_labels)
    real = os.path.realpath(target)  # a symlink at `path` is written through, as a plain open() would
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=os.path.dirname(real))
    os.close(fd)
    try:
        program.save(tmp)
        os.chmod(tmp, _file_mode(real))  # mkstemp's 0600 would make the model unreadable to others
        os.replace(tmp, real)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _file_mode(path: str) -> int:
    """The permission bits a new file at ``path`` gets from ``open()`` (the umask's), or those of the file
    already there."""
    if os.path.exists(path):
        return stat.S_IMODE(os.stat(path).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def ort_session(path: str | os.PathLike, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session for `path` with all graph optimisations and `threads` intra-op threads."""
    require_onnx("onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    # no spinning after a run: spinning threads kept both cores busy into the next (PyTorch) measurement
    # of an interleaved benchmark (seen: 10 ms forwards timed 5-90x slower after an ORT run)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
