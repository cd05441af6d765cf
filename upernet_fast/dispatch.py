"""The one place that decides which implementation of each fused op runs: Triton or PyTorch.

Backends: ``"auto"`` (Triton for CUDA tensors when triton imports, PyTorch otherwise), ``"triton"`` (always
Triton; on CPU tensors only under the Triton interpreter, ``TRITON_INTERPRET=1`` set before import) and
``"torch"`` (the PyTorch paths). ``None`` means the environment variable ``UPERNET_FAST_BACKEND``, or
``"auto"`` when it is unset.

Per-op choice, strongest first:
  1. an active ``override(...)`` context (for benchmarks: ``with dispatch.override(conv_bn_relu="torch")``),
  2. the ``overrides`` mapping given to ``ops_for``,
  3. the model-wide ``backend``.

Winograd (CPU, beyond exact): the PyTorch path of ``conv_bn_relu`` can compute the head's large 3x3 convs
by Winograd F(4x4, 3x3) or F(6x6, 3x3) (``kernels/winograd.py``, error ~1e-5 relative). ``winograd_choice``
is the one place that decides when and which: measured on this machine (``upernet_fast.tuning``) or, with
``UPERNET_FAST_TUNE=0`` / ``load(..., tune=False)``, by the default rules below. ``UPERNET_FAST_WINOGRAD=0``
(or ``load(..., winograd=False)``) keeps every conv exact. Each decision, with its reason, is noted for
``FastUperNet.plan()`` (``upernet-fast info --plan``).

bf16x3 (CPU float32 with AMX, beyond exact): a direct 3x3 conv (not Winograd) can run as split bfloat16 on
AMX with a float32 result (``kernels/bf16x3.py``, error ~7e-6 relative). ``bf16x3_choice`` decides: only
with AMX-BF16, then measured on this machine (or the default rule ``BF16X3_WINS``). 1x1 convs
(``bf16x3_choice`` too, rule ``BF16X3_1X1_WINS``) and the ConvNeXt and Swin block MLPs
(``mlp_bf16x3_choice``) likewise, as one bf16 GEMM with a float32 result each (our AMX kernel, or MKL's;
``kernels/gemm_bf16x3.py``). ``UPERNET_FAST_BF16X3=0`` (or ``load(..., bf16x3=False)``) keeps float32 in
float32.

Typical use in the model layer::

    ops = dispatch.ops_for(backend, device)   # cheap; resolves lazily on each access
    y = ops.conv_bn_relu(x, w, b, padding=1, relu=True)
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Literal

import torch

from . import kernels, tuning
from .folding import cached
from .kernels import native
from .kernels._common import env_switch, interpreting, native_bf16, onednn_prepacked, out_memory_format
from .kernels.bf16x3 import bf16x3_possible, bf16x3_weight, conv_bf16x3
from .kernels.conv_bn_relu import gemm_by_default, gemm_possible, onednn_weight_useful
from .kernels.fpn import usa_sum_in_c
from .kernels.gemm_bf16x3 import amx_gemm_available, conv1x1_bf16x3, gemm_bf16x3_blocker, pack_weight
from .kernels.winograd import conv3x3_winograd_pair, winograd_native, winograd_weight

__all__ = [
    "BACKENDS",
    "bf16x3_choice",
    "mlp_bf16x3_choice",
    "mlp_bf16x3_decided",
    "note_mlp_bf16x3",
    "bf16x3_default",
    "compile_eager_default",
    "eager_under_compile",
    "check_backend",
    "ENV_VAR",
    "OPS",
    "Ops",
    "default_backend",
    "get_op",
    "ops_for",
    "override",
    "resolve_backend",
    "merge_into_winograd",
    "native_bf16",
    "Plan",
    "resize_choice",
    "tune_default",
    "warn_if_emulated",
    "winograd_choice",
    "winograd_default",
    "winograd_tile",
    "winograd_transforms_choice",
]

ENV_VAR = "UPERNET_FAST_BACKEND"
WINOGRAD_ENV_VAR = "UPERNET_FAST_WINOGRAD"
TUNE_ENV_VAR = "UPERNET_FAST_TUNE"
BF16X3_ENV_VAR = "UPERNET_FAST_BF16X3"
COMPILE_EAGER_ENV_VAR = "UPERNET_FAST_COMPILE_EAGER"
# Default rules, used when tuning is off (UPERNET_FAST_TUNE=0, load(tune=False)) or while compiling; with
# tuning on, `tuning.winograd_tile` measures the choice on the machine. Chosen to be right on AVX2 and
# AVX-512 machines alike (measured tables: bench/results/):
# (min channels, min map side) from which Winograd beats the direct conv ...
WINOGRAD_WINS = ((256, 8), (128, 16))
# ... and the map side from which F(6x6) is used instead of F(4x4) (AVX2: F(6x6) faster from 64 px;
# AVX-512: within 10% of F(4x4) at 64-128 px).
WINOGRAD_F6_MIN_SIDE = 64
# An upsampled input group of a Winograd bottleneck costs 9 tap GEMM rows per low-resolution pixel (plus the
# shift-add) as taps, and (m+2)²/m² rows per output pixel inside the Winograd GEMM (plus its transforms and
# the upsampled copy). Merged when the taps cost at least this factor more: with F(6x6) a 2x-upsampled group
# (9 vs 7.1 rows per low-res pixel) is merged, with F(4x4) (9 vs 9) and from 4x upsampling (9 vs 28) not.
# A flop-count rule (the GEMMs dominate on every CPU measured), not tuned.
WINOGRAD_MERGE_MARGIN = 1.15
# ... where the group's taps conv runs as a bf16x3 GEMM (AMX), a tap row costs about this much less than a
# float32 one (Xeon with AMX-BF16, 512->4608: 1.57x at 64², 1.63x at 32² on MKL's GEMM, 2.1x on our AMX
# kernel), so the 2x-upsampled group stays taps (9 / 1.5 = 6 vs 7.1 rows; any factor above 1.1 decides the
# same): ConvNeXt-T 512x512 fp32 0.444 -> 0.415 s (bench/results/decisions.md).
BF16X3_TAPS_SPEEDUP = 1.5
# (min channels, min map side) from which a direct 3x3 float32 conv runs as bf16x3 on an AMX CPU when tuning is
# off (Xeon with AMX-BF16, 512 channels: 1.66x faster at 128², 1.59x at 64², 1.28x at 32², 0.8x at 16²).
BF16X3_WINS = (256, 32)
# 1x1 float32 convs with at least this many input and output channels and pixels run as bf16x3 GEMMs on an
# AMX CPU when tuning is off (Xeon with AMX-BF16: 1.4x at 192/384/768->512, 1.5-1.8x at 512->4608;
# 0.9-1.05x for 96->512 and 512->150 at 128², the head's lateral 0 and classifier).
BF16X3_1X1_WINS = (192, 256)  # (min channels, min output pixels): a handful of rows is weight-bound
# ConvNeXt block MLPs with at least this many channels run as bf16x3 on an AMX CPU when tuning is off (Xeon
# with AMX-BF16, ConvNeXt-T blocks: 1.06-1.2x at 96 channels, 1.2-1.3x at 192, 1.5-1.8x at 384, 1.2-1.6x
# at 768).
MLP_BF16X3_MIN_CHANNELS = 192
BACKENDS = ("auto", "triton", "torch")
OPS: dict[str, Callable] = {
    "conv_bn_relu": kernels.conv_bn_relu,
    "adaptive_pool_multi": kernels.adaptive_pool_multi,
    "topdown_add": kernels.topdown_add,
    "upsample_shift_add": kernels.upsample_shift_add,
    "upsample_shift_add_sum": kernels.upsample_shift_add_sum,
    "resize_bilinear": kernels.resize_bilinear,
    "resize_argmax": kernels.resize_argmax,
}

# The concrete implementation of each op per backend, bound once: what `Ops` hands to the model layer
# (each runs its own registered torch.library op, `upernet_fast::<op>_<backend>`; nothing branches later).
IMPLEMENTATIONS: dict[str, dict[str, Callable]] = {
    name: {backend: functools.partial(fn, backend=backend) for backend in ("torch", "triton")}
    for name, fn in OPS.items()
}

Concrete = Literal["triton", "torch"]
# Active `override` blocks (process-wide). A plain dict, not a ContextVar: torch.compile (dynamo) traces
# dict lookups and guards on them, but cannot trace ContextVar.get.
_overrides: dict[str, str] = {}


def check_backend(backend: str) -> str:
    """``backend`` if it is one of ``BACKENDS``, else a ``ValueError`` naming the choices."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid choices: {', '.join(BACKENDS)}")
    return backend


def _check_op(name: str) -> str:
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; valid choices: {', '.join(OPS)}")
    return name


def default_backend() -> str:
    """``UPERNET_FAST_BACKEND`` if set (validated), else ``"auto"``."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not a backend; valid choices: {', '.join(BACKENDS)}")
    return value


def winograd_default() -> bool:
    """The switch ``UPERNET_FAST_WINOGRAD`` (default on)."""
    return env_switch(WINOGRAD_ENV_VAR)


def bf16x3_default() -> bool:
    """The switch ``UPERNET_FAST_BF16X3`` (default on)."""
    return env_switch(BF16X3_ENV_VAR)


def compile_eager_default() -> bool:
    """The switch ``UPERNET_FAST_COMPILE_EAGER`` (default on): see ``eager_under_compile``."""
    return env_switch(COMPILE_EAGER_ENV_VAR)


def eager_under_compile(switch: bool, device: torch.device) -> bool:
    """Whether ``torch.compile(model)`` runs the model's eager forward as one opaque op (its logits; traced
    otherwise into plain ops for Inductor, as ``torch.export`` always is). On CPU, by default: the traced
    graph loses the eager path's measured plan (tuned Winograd tiles, AMX bf16x3, oneDNN's fused bf16 ops,
    the C helpers), and Inductor's fusions do not make up for it. ConvNeXt-T 512x512, 2 threads, compiled /
    eager s: Xeon (AMX) fp32 1.45 / 0.50 (with Inductor's freezing 0.57 / 0.44), bf16 0.48 / 0.23; the same
    Xeon capped to AVX2 fp32 1.37 / 0.86 (bench/results/decisions.md, "torch.compile runs the eager
    forward"). Elsewhere (CUDA: unmeasured) it traces."""
    return switch and device.type == "cpu"


def amx_bf16() -> bool:
    """Whether this CPU has AMX-BF16 and PyTorch's oneDNN uses native bf16 (the only CPUs where bfloat16
    convs are fast enough, 4-7x float32, for the four passes of bf16x3 to pay off)."""
    return "amx_bf16" in native.cpu_flags() and native_bf16()


def tune_default() -> bool:
    """The switch ``UPERNET_FAST_TUNE`` (default on): measure CPU-dependent choices on this machine."""
    return env_switch(TUNE_ENV_VAR)


class Plan:
    """The implementation decisions of one model for one input signature (shape, dtype, device and the
    model's switches), made during the first forward with that signature and then frozen: later forwards
    replay them instead of deciding again, and ``FastUperNet.plan`` prints them. Each decision keeps why it
    was made (default rule, measured on this CPU, or forced by a switch)."""

    def __init__(self, bf16x3: bool = False, tune: bool = False) -> None:
        self.frozen = False
        self.bf16x3, self.tune = bf16x3, tune  # the model's switches, for the backbones' own choices
        self.choices: dict[tuple[int, str], tuple[int, str]] = {}
        self.notes: list[tuple[object, str, str, str]] = []  # (owner module, part, implementation, why)

    def note(self, owner: object, part: str, impl: str, why: str) -> None:
        if not self.frozen:
            self.notes.append((owner, part, impl, why))

    def decide(self, owner: object, name: str, decide: Callable[[], tuple]) -> tuple:
        """``decide()``, made once per plan for (owner, name) and replayed afterwards."""
        key = (id(owner), name)
        choice = self.choices.get(key)
        if choice is None:
            choice = self.choices[key] = decide()
        return choice


def winograd_choice(ops: Ops, x: torch.Tensor, weight: torch.Tensor, padding: int) -> tuple[int, str]:
    """(tile, why): the Winograd output tile (4 or 6) a stride-1 conv of ``x`` with ``weight`` runs with,
    or 0 for the exact (direct) conv. Winograd only on the PyTorch path, on CPU float32, for 3x3 kernels
    with padding 1; then measured on this machine (``tuning``) unless tuning is off, else the default rule
    (``WINOGRAD_WINS``, ``WINOGRAD_F6_MIN_SIDE``)."""
    c_out, c_in, kh, kw = weight.shape
    if not ops.winograd:
        return 0, "exact: Winograd switched off (winograd=False / UPERNET_FAST_WINOGRAD=0)"
    if (kh, kw, padding) != (3, 3, 1):
        return 0, "direct: Winograd is for 3x3 kernels with padding 1"
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return 0, f"direct: Winograd runs on CPU float32 only ({x.device.type}, {x.dtype})"
    if ops.backend_of("conv_bn_relu") != "torch":
        return 0, "direct: Triton backend"
    h, w = x.shape[2:]
    side = min(h, w)
    if not any(min(c_in, c_out) >= c and side >= s for c, s in WINOGRAD_WINS):
        default, rule = 0, f"direct below {WINOGRAD_WINS} (min channels, min side)"
    else:
        default = 6 if side >= WINOGRAD_F6_MIN_SIDE else 4
        rule = f"F({default}x{default}) {'from' if default == 6 else 'below'} {WINOGRAD_F6_MIN_SIDE} px"
    if ops.tune and not torch.compiler.is_compiling():
        tile, why = tuning.winograd_tile(c_in, c_out, h, w, default)
        if tile >= 0:
            return tile, why
        return default, f"default rule ({why}): {rule}"
    return default, f"default rule: {rule}"


def gemm_choice(ops: Ops, x: torch.Tensor, weight: torch.Tensor, padding: int) -> tuple[bool | None, str]:
    """(as one GEMM?, why) for a 1x1 conv: measured on this machine when tuning is on and the conv can run
    as a GEMM (CPU, channels-last float32/bf16), else None: the kernel's default rule
    (``kernels.conv_bn_relu.gemm_by_default``)."""
    if ops.backend_of("conv_bn_relu") != "torch":
        return None, "Triton backend"
    if not gemm_possible(x, weight):
        return None, "oneDNN: not a channels-last CPU float32/bf16 input"
    c_out, c_in = weight.shape[:2]
    if ops.tune and not torch.compiler.is_compiling():
        default = gemm_by_default(x, weight)
        gemm, why = tuning.gemm_1x1(c_in, c_out, x.shape[2], x.shape[3], x.dtype, default)
        if gemm is not None:
            return gemm, why
        return None, f"default rule ({why}): GEMM for 256+ output channels and outputs of 8+ MB"
    return None, "default rule: GEMM for 256+ output channels and outputs of 8+ MB"


def bf16x3_choice(ops: Ops, x: torch.Tensor, weight: torch.Tensor, padding: int) -> tuple[bool, str]:
    """(run as bf16x3?, why) for a 3x3 float32 conv that ``winograd_choice`` left direct, or a 1x1 conv:
    only on a CPU with AMX-BF16, for channels-last CPU float32 input on the PyTorch path; then measured on
    this machine (``tuning.bf16x3``) unless tuning is off, else the default rules ``BF16X3_WINS`` (3x3) and
    ``BF16X3_1X1_WINS`` (1x1)."""
    c_out, c_in, kh, kw = weight.shape
    if not ops.bf16x3:
        return False, "bf16x3 switched off (bf16x3=False / UPERNET_FAST_BF16X3=0)"
    if (kh, kw, padding) not in ((3, 3, 1), (1, 1, 0)) or ops.backend_of("conv_bn_relu") != "torch":
        return False, "bf16x3 is for 3x3 (padding 1) and 1x1 convs on the PyTorch path"
    if torch.compiler.is_compiling():
        return False, "float32 while compiling (the CPU checks below do not trace)"
    if kh == 3 and not bf16x3_possible(x):
        return False, "bf16x3 needs a channels-last CPU float32 input with oneDNN"
    if kh == 1:
        blocker = gemm_bf16x3_blocker(x)
        if blocker is None and not gemm_possible(x, weight):  # (the 1x1 GEMM's own test: channels-last)
            blocker = "a bf16x3 1x1 conv needs a channels-last input"
        if blocker is not None:
            return False, blocker
    if not amx_bf16():
        return False, "no AMX-BF16 on this CPU (bf16x3 would be slower than float32)"
    h, w = x.shape[2:]
    if kh == 1:
        return _bf16x3_1x1(ops.tune, c_in, c_out, x.shape[0], h, w)
    channels, side = BF16X3_WINS
    default = min(c_in, c_out) >= channels and min(h, w) >= side
    rule = f"bf16x3 from {channels} channels and {side} px" if default else f"float32 below {BF16X3_WINS}"
    if ops.tune:
        use, why = tuning.bf16x3(c_in, c_out, h, w, default, kh)
        if use is not None:
            return use, why
        return default, f"default rule ({why}): {rule}"
    return default, f"default rule: {rule}"


def bf16x3_width_choice(ops: Ops, x: torch.Tensor, weight: torch.Tensor, padding: int) -> tuple[int, str]:
    """(width, why): how many columns a bf16x3 3x3 conv's bfloat16 passes run at (``conv_bf16x3``'s
    ``width``): the input's own, or, measured on this machine (``tuning.bf16x3_width``), the next multiple
    of 16 or 32 where oneDNN's kernel at the input's width is slower (1.5x at 128x170 on a Xeon with
    AMX-BF16). Without tuning, and at multiples of 32 columns: the input's own."""
    w = x.shape[3]
    if not ops.tune:
        return w, "the input's width (tuning off)"
    if w % 32 == 0:
        return w, "the input's width (a multiple of 32)"
    return tuning.bf16x3_width(weight.shape[1], weight.shape[0], x.shape[2], w)


def _bf16x3_1x1(tune: bool, c_in: int, c_out: int, b: int, h: int, w: int) -> tuple[bool, str]:
    """(as bf16x3?, why) for a float32 1x1 conv (or Linear over the tokens of a map) once bf16x3 can run:
    measured on this machine (``tuning.bf16x3``) with ``tune``, else the default rule ``BF16X3_1X1_WINS``."""
    channels, pixels = BF16X3_1X1_WINS
    default = min(c_in, c_out) >= channels and b * h * w >= pixels
    rule = (
        f"bf16x3 from {channels} channels and {pixels} px" if default else f"float32 below {BF16X3_1X1_WINS}"
    )
    if tune:
        use, why = tuning.bf16x3(c_in, c_out, h, w, default, 1)
        if use is not None:
            return use, why
        return default, f"default rule ({why}): {rule}"
    return default, f"default rule: {rule}"


def linear_bf16x3_choice(
    plan: Plan | None, x: torch.Tensor, features: tuple[int, int], size: tuple[int, int, int]
) -> tuple[bool, str]:
    """(run as bf16x3?, why) for a backbone Linear without activation (Swin's qkv, attention output and
    patch merging) with (in, out) ``features`` over the tokens of a (B, H, W) map ``size``, i.e. a 1x1 conv,
    on CPU float32 tokens like ``x``: only in eager inference with the model's bf16x3 switch on and our AMX
    GEMM kernel (on MKL's GEMM these Linears measured no faster than float32: bench/results/decisions.md,
    "Swin Linears as bf16x3"), for features that are multiples of 32 (its tile layout); then as
    ``bf16x3_choice`` decides a 1x1 conv."""
    if plan is None:
        return False, "float32 while compiling"
    if not plan.bf16x3:
        return False, "bf16x3 switched off (bf16x3=False / UPERNET_FAST_BF16X3=0)"
    blocker = gemm_bf16x3_blocker(x)
    if blocker is not None:
        return False, blocker
    if not amx_gemm_available():
        return False, "needs our AMX GEMM kernel (AMX-BF16; UPERNET_FAST_AMX_GEMM)"
    (c_in, c_out), (b, h, w) = features, size
    if c_in % 32 or c_out % 32:
        return False, f"the AMX kernel needs features divisible by 32 ({c_in}->{c_out})"
    return _bf16x3_1x1(plan.tune, c_in, c_out, b, h, w)


def mlp_bf16x3_choice(plan: Plan | None, x: torch.Tensor, hidden: int, act: str) -> tuple[bool, str]:
    """(run as bf16x3?, why) for a ConvNeXt block MLP (C -> ``hidden`` -> C, ``act``) on channels-last ``x``
    (B, C, H, W) in eager inference: only with the model's bf16x3 switch on, erf GELU, AMX-BF16 and the
    C helpers with a bf16 GEMM (ours or MKL's); then measured on this machine (``tuning.mlp_bf16x3``) unless tuning is
    off, else the default rule ``MLP_BF16X3_MIN_CHANNELS``."""
    if plan is None:
        return False, "float32 while compiling"
    if not plan.bf16x3:
        return False, "bf16x3 switched off (bf16x3=False / UPERNET_FAST_BF16X3=0)"
    if act != "gelu":
        return False, f"the bf16x3 MLP computes the erf GELU only, not {act}"
    blocker = gemm_bf16x3_blocker(x)
    if blocker is not None:
        return False, blocker
    if not amx_bf16():
        return False, "no AMX-BF16 on this CPU (bf16x3 would be slower than float32)"
    c, h, w = x.shape[1:]
    default = c >= MLP_BF16X3_MIN_CHANNELS
    rule = f"bf16x3 from {MLP_BF16X3_MIN_CHANNELS} channels" if default else "float32 below it"
    rule = f"{rule} (MLP_BF16X3_MIN_CHANNELS)"
    if plan.tune:
        use, why = tuning.mlp_bf16x3(c, hidden, h, w, default)
        if use is not None:
            return use, why
        return default, f"default rule ({why}): {rule}"
    return default, f"default rule: {rule}"


def mlp_bf16x3_decided(
    plan: Plan | None, stage: object, x: torch.Tensor, hidden: int, act: str
) -> tuple[bool, str]:
    """``mlp_bf16x3_choice`` for the block MLPs of a backbone ``stage``, made once per plan and replayed
    (without a plan, i.e. while compiling, decided on the spot)."""
    if plan is None:
        return mlp_bf16x3_choice(plan, x, hidden, act)
    return plan.decide(stage, "mlp-bf16x3", lambda: mlp_bf16x3_choice(plan, x, hidden, act))


def note_mlp_bf16x3(plan: Plan, stage: object, part: str, why: str) -> None:
    """The plan note of a stage whose block MLPs run as bf16x3 (ConvNeXt's and Swin's alike)."""
    gemm = "our AMX bf16 GEMM" if amx_gemm_available() else "MKL bf16 GEMM"
    impl = f"bf16x3: LayerNorm + split, {gemm} (float32 out), GELU + split, GEMM + residual"
    plan.note(stage, part, impl, f"{why}; see bench/results/decisions.md, ConvNeXt MLP as bf16x3")


def winograd_tile(ops: Ops, x: torch.Tensor, weight: torch.Tensor, padding: int) -> int:
    """The tile of ``winograd_choice`` (0: direct conv)."""
    return winograd_choice(ops, x, weight, padding)[0]


def merge_into_winograd(
    tile: int, low_size: tuple[int, ...], size: tuple[int, ...], taps_bf16x3: bool = False
) -> bool:
    """Whether an input group at ``low_size``, upsampled to ``size``, should be convolved at full size
    inside the F(tile x tile) Winograd conv of the other groups rather than as low-resolution taps (whose
    1x1 conv runs as a bf16x3 GEMM when ``taps_bf16x3``)."""
    if not tile:
        return False
    per_output = ((tile + 2) / tile) ** 2
    taps = 9 * low_size[0] * low_size[1] / (BF16X3_TAPS_SPEEDUP if taps_bf16x3 else 1.0)
    return taps >= WINOGRAD_MERGE_MARGIN * per_output * size[0] * size[1]


def _native_unavailable() -> str:
    if not native.enabled():
        return f"C helpers switched off ({native.ENV_VAR}=0)"
    return "C helpers unavailable (no C compiler, a failed build or an unsupported OS; warned at first use)"


def resize_choice(ops: Ops, x: torch.Tensor) -> tuple[str, str]:
    """(implementation, why) of ``ops.resize_bilinear(x, size)``, for the plan: Triton, else the C resize
    where ``kernels/resize.py`` takes it (CPU float32 input with an NCHW output, C helpers built), else
    ATen's. The kernel's own test on its inputs, restated (tests/test_plan.py checks they agree)."""
    if ops.backend_of("resize_bilinear") == "triton":
        return "Triton", "Triton backend"
    aten = "ATen upsample_bilinear2d"
    if x.device.type != "cpu" or x.dtype != torch.float32 or out_memory_format(x) != torch.contiguous_format:
        return aten, f"the C resize takes CPU float32 NCHW inputs ({x.device.type}, {x.dtype})"
    if native.library() is None:
        return aten, _native_unavailable()
    return "C (kernels/csrc/resize.c)", "CPU float32 NCHW input, C helpers built"


def usa_sum_choice(ops: Ops, base: torch.Tensor, taps: list[torch.Tensor]) -> tuple[str, str]:
    """(implementation, why) of ``ops.upsample_shift_add_sum(base, taps)``, for the plan: the kernel's own
    test (``fpn.usa_sum_in_c``), asked rather than restated."""
    if ops.backend_of("upsample_shift_add_sum") == "triton":
        return "Triton shift-adds into a float32 copy of the base, then ReLU", "Triton backend"
    composed = "PyTorch: base widened, one shift-add per group, ReLU"
    if native.library() is None:
        return composed, _native_unavailable()
    if not usa_sum_in_c(base, taps):
        return composed, "the C pass takes channels-last CPU float32/bf16 maps"
    return (
        "one C pass (kernels/csrc/usa.c): each output pixel written once",
        "channels-last CPU maps, C helpers built",
    )


def winograd_transforms_choice(device: torch.device | str) -> tuple[str, str]:
    """(implementation, why) of the Winograd tile transforms (``kernels/winograd.py``), for the plan: in C
    when the C helpers built (Winograd runs on CPU float32 only, see ``winograd_choice``), else in
    PyTorch. The kernel's own test, restated (tests/test_plan.py checks they agree)."""
    if torch.device(device).type != "cpu":
        return "PyTorch", "not on CPU"
    if native.library() is None:
        return "PyTorch", _native_unavailable()
    return "C (kernels/csrc/winograd.c)", "CPU float32, C helpers built"


_warned_emulated: set[str] = set()


def warn_if_emulated(dtype: torch.dtype, device: torch.device) -> None:
    """Warn once per process when a bfloat16 model runs on a CPU without native bf16 (it works, but
    oneDNN then emulates bf16 and it is slower than float32)."""
    if dtype != torch.bfloat16 or device.type != "cpu" or "bf16" in _warned_emulated or native_bf16():
        return
    _warned_emulated.add("bf16")
    import warnings

    warnings.warn(
        "upernet_fast: this CPU has no native bfloat16 (no AVX512-BF16/AMX): bf16 is emulated and slower "
        "than float32 here; load the model in float32 for speed",
        RuntimeWarning,
        stacklevel=3,
    )


def taps_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3) -> (9 * Cout, Cin, 1, 1) tap weights for ``upsample_shift_add`` (re-exported so
    the model layer asks dispatch, never a kernel module)."""
    return kernels.conv3x3_taps_weight(weight)


def resolve_backend(backend: str | None, device: torch.device | str | None = None) -> Concrete:
    """The concrete backend (``"triton"`` or ``"torch"``) for tensors on ``device`` (default CPU).

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` when Triton is forced where it cannot run."""
    backend = default_backend() if backend is None else check_backend(str(backend).lower())
    dev = torch.device("cpu" if device is None else device)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if dev.type == "cuda" and kernels.HAS_TRITON else "torch"
    if not kernels.HAS_TRITON:
        raise RuntimeError("backend 'triton' requested but the `triton` package cannot be imported")
    if dev.type == "cuda":
        return "triton"
    if dev.type == "cpu":
        if not interpreting():
            raise RuntimeError(
                "backend 'triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 in the "
                "environment before importing upernet_fast (or use backend='torch' / 'auto')"
            )
        return "triton"
    raise RuntimeError(f"backend 'triton' cannot run on device {dev.type!r}; use 'torch' or 'auto'")


def get_op(name: str, backend: str | None, device: torch.device | str | None = None) -> Callable:
    """``OPS[name]`` bound to the resolved backend (``backend`` may be ``"auto"``/``None``, see
    ``resolve_backend``; an active ``override`` for this op wins)."""
    _check_op(name)
    chosen = _overrides.get(name, backend)
    return IMPLEMENTATIONS[name][resolve_backend(chosen, device)]


@contextlib.contextmanager
def override(mapping: Mapping[str, str] | None = None, /, **per_op: str) -> Iterator[None]:
    """Force backends per op inside a ``with`` block, e.g. ``override(conv_bn_relu="torch")`` or
    ``override({"resize_argmax": "triton"})``. Nested blocks stack; names and backends are validated.
    Process-wide (meant for benchmarks and tests), not per thread."""
    new = dict(mapping or {}, **per_op)
    for name, backend in new.items():
        _check_op(name)
        check_backend(backend)
    saved = dict(_overrides)
    _overrides.update(new)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


class Ops:
    """Namespace of the fused ops bound to one device and backend choice: ``ops.conv_bn_relu(...)``.

    Resolution happens on attribute access, so an ``override`` block entered later still applies."""

    def __init__(
        self,
        backend: str | None,
        device: torch.device | str | None,
        overrides: Mapping[str, str] | None = None,
        winograd: bool | None = None,
        tune: bool | None = None,
        bf16x3: bool | None = None,
    ) -> None:
        self.backend = default_backend() if backend is None else check_backend(backend)
        self.device = torch.device("cpu" if device is None else device)
        self.winograd = winograd_default() if winograd is None else bool(winograd)
        self.tune = tune_default() if tune is None else bool(tune)
        self.bf16x3 = bf16x3_default() if bf16x3 is None else bool(bf16x3)
        self.plan: Plan | None = None  # set by the model for one forward (see `Plan`)
        self.overrides = dict(overrides or {})
        for name, choice in self.overrides.items():
            _check_op(name)
            check_backend(choice)
        resolve_backend(self.backend, self.device)  # fail early (e.g. triton on CPU without interpreter)

    def backend_of(self, name: str) -> Concrete:
        """The concrete backend op ``name`` runs with right now."""
        _check_op(name)
        chosen = _overrides.get(name) or self.overrides.get(name) or self.backend
        return resolve_backend(chosen, self.device)

    def conv(
        self,
        owner: object,
        name: str,
        sources: list[torch.Tensor],
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        padding: int,
        relu: bool,
        low: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``conv_bn_relu`` with the implementation ``winograd_choice`` picks (the Winograd weight built
        once and cached on ``owner`` under ``name``, rebuilt when ``sources`` change), noted for the plan.
        ``low``: the conv of ``x + resize(low)`` (UPerNet's top-down sum), formed inside the Winograd
        transform where the conv runs as one, else by ``topdown_add`` first."""
        if low is not None and not self._topdown_in_winograd(owner, name, x, weight, padding, low):
            x, low = self.topdown_add(x, low), None
        if weight.shape[-1] == 1:
            split, why_split = self.split_choice(owner, name, x, weight, padding)
            if split:
                packed = cached(owner, f"bf16x3_{name}", sources, lambda: pack_weight(weight.flatten(1)))
                self._note(owner, name, x, weight, why_split, "bf16x3 GEMM (split bfloat16 on AMX)")
                return conv1x1_bf16x3(x, packed, bias, relu)
            gemm, why = self.choice(owner, name, x, weight, padding, gemm_choice)
            why = f"{why}; {why_split}"
            self._note(owner, name, x, weight, why, "GEMM" if gemm else "oneDNN" if gemm is False else None)
            onednn = self._onednn_weight(owner, name, sources, x, weight, padding, gemm)
            return self.conv_bn_relu(x, weight, bias, padding, relu, None, gemm, onednn)
        tile, why = self.choice(owner, name, x, weight, padding)
        if not tile:
            split, why_split = self.split_choice(owner, name, x, weight, padding)
            why = f"{why}; {why_split}"
            if split:
                pair = cached(owner, f"bf16x3_{name}", sources, lambda: bf16x3_weight(weight))
                width, why_width = self.choice(
                    owner, f"{name}:width", x, weight, padding, bf16x3_width_choice
                )
                impl = "bf16x3 (split bfloat16 on AMX)"
                if width != x.shape[3]:
                    impl, why = f"{impl}, run {width} columns wide", f"{why}; width: {why_width}"
                self._note(owner, name, x, weight, why, impl)
                return conv_bf16x3(x, pair, bias, padding, relu, width)
        wino = None
        if tile:
            wino = cached(owner, f"winograd{tile}_{name}", sources, lambda: winograd_weight(weight, tile))
        impl = f"Winograd F({tile}x{tile})" + (
            " + top-down add in its input transform" if low is not None else ""
        )
        self._note(owner, name, x, weight, why, impl if tile else None)
        onednn = None if tile else self._onednn_weight(owner, name, sources, x, weight, padding, None)
        return self.conv_bn_relu(x, weight, bias, padding, relu, wino, None, onednn, low)

    def _topdown_in_winograd(
        self, owner: object, name: str, x: torch.Tensor, weight: torch.Tensor, padding: int, low: torch.Tensor
    ) -> bool:
        """Whether ``conv``'s top-down sum ``x + resize(low)`` is formed inside its Winograd input transform:
        a 3x3 conv that runs as Winograd with the C transforms (PyTorch backend, eager)."""
        if (
            weight.shape[-1] != 3
            or self.backend_of("conv_bn_relu") != "torch"
            or torch.compiler.is_compiling()
        ):
            return False
        return bool(self.choice(owner, name, x, weight, padding)[0]) and winograd_native(x, low)

    def _onednn_weight(
        self,
        owner: object,
        name: str,
        sources: list[torch.Tensor],
        x: torch.Tensor,
        weight: torch.Tensor,
        padding: int,
        gemm: bool | None,
    ) -> torch.Tensor | None:
        """``weight`` prepacked in oneDNN's layout (cached on ``owner``) where the conv runs on oneDNN."""
        if self.backend_of("conv_bn_relu") != "torch" or not onednn_weight_useful(x, weight, gemm):
            return None
        build = lambda: onednn_prepacked(weight.to(x.dtype), x.shape, padding)  # noqa: E731
        return cached(owner, f"onednn_{name}_{x.dtype}", sources, build)

    def conv_pair(
        self,
        owner: object,
        name: str,
        sources: list[torch.Tensor],
        x: torch.Tensor,
        x2: torch.Tensor,
        weight: Callable[[], torch.Tensor],
        bias: torch.Tensor | None,
        choice: tuple[int, str],
    ) -> torch.Tensor:
        """The 3x3 conv (padding 1, no ReLU) of the channel concatenation of ``x`` and ``x2`` (never built)
        as one Winograd conv, with the (tile, why) ``choice`` the caller made for ``x`` (it checks
        ``merge_into_winograd`` with that tile first). ``weight()`` gives the folded (Cout, Cx + Cx2, 3, 3)
        weight; its Winograd transform is cached on ``owner`` under ``name``."""
        tile, why = choice
        if not tile:
            raise RuntimeError("conv_pair needs a Winograd tile; check merge_into_winograd first")
        u = cached(owner, f"winograd{tile}_{name}", sources, lambda: winograd_weight(weight(), tile))
        part = f"{name} (level-0 group + merged upsampled level 1)"
        self._note(owner, part, x, weight(), why, f"Winograd F({tile}x{tile})")
        return conv3x3_winograd_pair(x, x2, u, None if bias is None else bias.to(x.dtype), False)

    def choice(
        self,
        owner: object,
        name: str,
        x: torch.Tensor,
        weight: torch.Tensor,
        padding: int,
        decide: Callable | None = None,
    ) -> tuple:
        """``decide(self, x, weight, padding)`` (default ``winograd_choice``), made once per plan and
        replayed afterwards."""
        decide = winograd_choice if decide is None else decide
        if self.plan is None:
            return decide(self, x, weight, padding)
        return self.plan.decide(owner, name, lambda: decide(self, x, weight, padding))

    def split_choice(
        self, owner: object, name: str, x: torch.Tensor, weight: torch.Tensor, padding: int
    ) -> tuple[bool, str]:
        """``bf16x3_choice`` for ``conv``'s conv ``name`` of ``owner``, made once per plan (the one that
        ``conv`` replays when it runs that conv)."""
        return self.choice(owner, f"{name}:bf16x3", x, weight, padding, bf16x3_choice)

    def note(self, owner: object, part: str, impl: str, why: str) -> None:
        """Record one decision in the plan being built (no-op once it is frozen, or without a plan)."""
        if self.plan is not None:
            self.plan.note(owner, part, impl, why)

    def _note(
        self, owner: object, name: str, x: torch.Tensor, weight: torch.Tensor, why: str, impl: str | None
    ) -> None:
        if self.plan is None or self.plan.frozen:
            return
        k = weight.shape[-1]
        shape = f"{weight.shape[1]}->{weight.shape[0]} {k}x{k} @ {x.shape[2]}x{x.shape[3]}, {x.dtype}"
        if impl is None and self.backend_of("conv_bn_relu") != "torch":
            impl = "Triton"
        elif impl is None:  # as conv_bn_relu_torch will run it
            impl = (
                "oneDNN conv (prepacked weight)"
                if onednn_weight_useful(x, weight, False)
                else "F.conv2d (ATen's choice of kernel: its own GEMM conv for small NCHW maps)"
            )
        self.plan.note(owner, f"{name}: {shape}", impl, why)

    def __getattr__(self, name: str) -> Callable:
        if name not in OPS:
            raise AttributeError(f"{type(self).__name__} has no op {name!r}; valid ops: {', '.join(OPS)}")
        return IMPLEMENTATIONS[name][self.backend_of(name)]

    def __repr__(self) -> str:
        return (
            f"Ops(backend={self.backend!r}, device={str(self.device)!r}, overrides={self.overrides}, "
            f"winograd={self.winograd}, tune={self.tune}, bf16x3={self.bf16x3})"
        )


def ops_for(
    backend: str | None = None,
    device: torch.device | str | None = None,
    overrides: Mapping[str, str] | None = None,
    winograd: bool | None = None,
    tune: bool | None = None,
    bf16x3: bool | None = None,
) -> Ops:
    """The ops for tensors on ``device`` (see ``Ops``); ``None`` reads ``UPERNET_FAST_BACKEND``,
    ``UPERNET_FAST_WINOGRAD``, ``UPERNET_FAST_TUNE`` and ``UPERNET_FAST_BF16X3``."""
    return Ops(backend, device, overrides, winograd, tune, bf16x3)
