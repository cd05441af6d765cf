"""`FastUperNet`: transformers' `UperNetForSemanticSegmentation` interface, state_dict and outputs,
with an inference-only fast forward (BatchNorm folded, low-resolution head rewrite, no auxiliary head
unless labels are given)."""

from __future__ import annotations

import contextlib
import itertools
import operator
import os
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, dispatch, folding
from .backbones import BackboneOutput, build_backbone
from .config import UperNetConfig
from .folding import clear_cached
from .head import UperNetFCNHead, UperNetHead, logits_dtype
from .kernels import _memory
from .outputs import SemanticSegmenterOutput

MAX_PLANS = 64  # input signatures whose plans are kept (least recently used dropped)
_HALF = (torch.bfloat16, torch.float16)  # casts whose full-precision originals `_apply` keeps for the folds

# Models by key, for the op through which torch.compile runs a model's eager forward (`_eager_logits`)
_MODELS: weakref.WeakValueDictionary[int, FastUperNet] = weakref.WeakValueDictionary()
_MODEL_KEYS = itertools.count()


@torch.library.custom_op("upernet_fast::eager_logits", mutates_args=())
def _eager_logits(pixel_values: torch.Tensor, model_key: int) -> torch.Tensor:
    """The logits of the model `model_key` by its eager forward: how torch.compile runs a FastUperNet on CPU
    (`dispatch.eager_under_compile`), one opaque op in the graph, so `fullgraph=True` still holds."""
    return _MODELS[model_key](pixel_values).logits


@_eager_logits.register_fake
def _(pixel_values: torch.Tensor, model_key: int) -> torch.Tensor:
    model = _MODELS[model_key]
    n, _, height, width = pixel_values.shape
    dtype = logits_dtype(pixel_values.dtype)
    return pixel_values.new_empty((n, model.config.num_labels, height, width), dtype=dtype)


class FastUperNet(nn.Module):
    main_input_name = "pixel_values"

    def __init__(
        self,
        config: UperNetConfig | dict[str, Any],
        backend: str | None = None,
        winograd: bool | None = None,
        tune: bool | None = None,
        bf16x3: bool | None = None,
    ) -> None:
        """`backend`: "auto" | "triton" | "torch" (None: `UPERNET_FAST_BACKEND`, else "auto");
        `winograd`: Winograd for the head's large 3x3 convs on CPU (None: `UPERNET_FAST_WINOGRAD`, else on);
        `bf16x3`: on AMX CPUs, large direct 3x3 and 1x1 float32 convs and the ConvNeXt/Swin block MLPs as
        split bfloat16 with a float32 result (~4-7e-6 relative error; None: `UPERNET_FAST_BF16X3`, else on);
        `tune`: measure CPU-dependent choices on this machine once, cached (None: `UPERNET_FAST_TUNE`, else
        on; off: the default rules). All are plain attributes: set them later to switch paths (see
        `upernet_fast.dispatch`, `upernet_fast.tuning`). So is `compile_eager` (`UPERNET_FAST_COMPILE_EAGER`,
        default on): under torch.compile on CPU, run the eager forward as one op (`dispatch.eager_under_compile`)."""
        super().__init__()
        self.config = config if isinstance(config, UperNetConfig) else UperNetConfig.from_any(config)
        self.backbone = build_backbone(self.config.backbone_config)
        self.decode_head = UperNetHead(self.config, in_channels=list(self.backbone.channels))
        self.auxiliary_head = (
            UperNetFCNHead(self.config, in_channels=list(self.backbone.channels))
            if self.config.use_auxiliary_head
            else None
        )
        self.backend = dispatch.default_backend() if backend is None else dispatch.check_backend(backend)
        self.winograd = dispatch.winograd_default() if winograd is None else bool(winograd)
        self.tune = dispatch.tune_default() if tune is None else bool(tune)
        self.bf16x3 = dispatch.bf16x3_default() if bf16x3 is None else bool(bf16x3)
        self.compile_eager = dispatch.compile_eager_default()
        self._plans: dict[tuple, dispatch.Plan] = {}  # per input signature, see `plan`
        self._precise_keys: list[int] = []  # see `_apply`
        self._register()
        self.eval()

    def _register(self) -> None:
        """A key of its own for `_eager_logits` (a copy or an unpickled model gets a new one)."""
        self._model_key = next(_MODEL_KEYS)
        _MODELS[self._model_key] = self

    # ------------------------------------------------------------------ construction and IO
    @classmethod
    def from_config(
        cls,
        config: Any,
        *,
        backend: str | None = None,
        winograd: bool | None = None,
        tune: bool | None = None,
        bf16x3: bool | None = None,
        seed: int | None = None,
    ) -> FastUperNet:
        """A randomly initialised model from a dict, a config.json path/directory or a transformers config."""
        if seed is not None:
            torch.manual_seed(seed)
        config = UperNetConfig.from_any(config)
        return cls(config, backend=backend, winograd=winograd, tune=tune, bf16x3=bf16x3)

    @classmethod
    def from_pretrained(cls, source: Any, **kwargs: Any) -> FastUperNet:
        """``upernet_fast.load(source, **kwargs)``."""
        return load(source, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `config.json` + `model.safetensors` in the layout transformers' `from_pretrained` reads."""
        checkpoint.save(self.state_dict(), self.config, save_directory)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Also accepts alternative key layouts the backbone knows (e.g. transformers 5 in-memory Swin).
        Drops the derived weights (`clear_cached_weights`): a compiled model took them as constants."""
        state_dict = self.backbone.remap_state_dict(dict(state_dict), "backbone.")
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.clear_cached_weights()
        return result

    def __getstate__(self) -> dict:
        """For `copy.deepcopy` and pickling (`torch.save(model)`): the derived weights are dropped first (oneDNN's
        prepacked ones cannot be copied or pickled; all are rebuilt on next use), and the plans with them. The
        full-precision originals kept for the folds (`_apply`) go with the copy, by parameter name, so a copy
        or a reloaded model computes exactly what this one does."""
        clear_cached(self)
        self._plans.clear()
        names = {id(t): name for name, t in self._named_tensors().items()}
        originals = {names[id(t)]: o for t, o in folding.originals(self._precise_keys) if id(t) in names}
        return {**super().__getstate__(), "_precise_keys": [], "_precise_originals": originals}

    def __setstate__(self, state: dict) -> None:
        originals = state.pop("_precise_originals", {})
        super().__setstate__(state)
        tensors = self._named_tensors()
        pairs = [(tensors[name], o) for name, o in originals.items() if name in tensors]
        self._precise_keys = folding.remember_precise(pairs)
        if "compile_eager" not in self.__dict__:  # pickled before the switch existed
            self.compile_eager = dispatch.compile_eager_default()
        self._register()

    def _named_tensors(self) -> dict[str, torch.Tensor]:
        return dict(itertools.chain(self.named_parameters(), self.named_buffers()))

    def _apply(self, fn: Any, recurse: bool = True) -> FastUperNet:
        """`nn.Module._apply` (behind `.to()`, `.bfloat16()`, ...). Where it lowers a tensor's precision (a
        float32 checkpoint loaded or cast as bfloat16), the original is kept for the folds
        (`folding.precise`: BatchNorm and LayerNorm folds rounded once, from the checkpoint's values), for as
        long as the cast tensor is unchanged: the float32 copy costs memory (230 MB for ConvNeXt-T
        UperNet in bf16), and keeps the model's results the same whenever its folds are rebuilt."""
        # the old data (also of a Parameter, whose .data the cast replaces), or its own kept original
        before = {name: folding.precise(t).detach() for name, t in self._named_tensors().items()}
        # cast to normal tensors even under torch.inference_mode() (`.bfloat16()` there): inference tensors
        # have no version counter, so their originals could not be kept. Not when the model already holds
        # inference tensors (made in inference mode): a normal .data in an inference Parameter breaks ops
        normal = not any(t.is_inference() for t in before.values())
        with torch.inference_mode(False) if normal else contextlib.nullcontext():
            result = super()._apply(fn, recurse)
        pairs = [
            (t, before[name])
            for name, t in self._named_tensors().items()
            if name in before
            and before[name].device == t.device
            and t.dtype in _HALF  # float64 -> float32 folds would gain ~1e-7 for twice the memory
            and folding.more_precise(before[name].dtype, t.dtype)
        ]
        self._forget_originals()
        self._precise_keys = folding.remember_precise(pairs)
        return result

    def _forget_originals(self) -> None:
        """Drop the originals `_apply` kept (the cast lost nothing, or the parameters are the truth now)."""
        folding.forget_precise(getattr(self, "_precise_keys", []))
        self._precise_keys = []

    def clear_cached_weights(self) -> None:
        """Forget the weights derived from the parameters (BatchNorm folds, Winograd and packed forms; rebuilt
        on next use). In-place edits are seen without it (version counters), except edits through `.data`,
        which bypass them: call this after those, and after new weights reach a `torch.compile`d model. It
        also drops the full-precision originals of a cast model (`_apply`): the parameters are the truth."""
        clear_cached(self)
        self._forget_originals()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def post_process_semantic_segmentation(
        self, outputs: Any, target_sizes: Any = None
    ) -> list[torch.Tensor]:
        """Label maps per image, as transformers' image processor returns them (see
        `upernet_fast.post_process_semantic_segmentation`)."""
        from .postprocess import post_process_semantic_segmentation

        return post_process_semantic_segmentation(outputs, target_sizes)

    # ------------------------------------------------------------------ forward
    def ops_for(self, device: torch.device | str | None = None) -> dispatch.Ops:
        """The fused ops this model runs on `device` (default: its own), with its backend and Winograd choice."""
        device = self.device if device is None else device
        return dispatch.ops_for(
            self.backend, device, winograd=self.winograd, tune=self.tune, bf16x3=self.bf16x3
        )

    def plan(self, height: int = 512, width: int = 512, batch: int = 1) -> list[dict[str, str]]:
        """Which implementation each backbone and decode-head layer runs for inputs of this size, and why
        (default rule, measured on this CPU, or forced): the frozen plan of that input signature, built by
        one forward pass on zeros if no call has built it yet (tuning, when on, happens then if this
        machine never measured these shapes)."""
        sizes = {"height": height, "width": width, "batch": batch}
        for name, value in sizes.items():
            try:  # ints and integer scalars (numpy, 0-d tensors); not floats, bools or tensors of pixels
                sizes[name] = operator.index(value)
            except TypeError:
                raise TypeError(f"plan: {name} must be an int, got {value!r}") from None
            if isinstance(value, bool) or sizes[name] < 1:
                raise ValueError(f"plan: {name} must be a positive int, got {value!r}")
        height, width, batch = sizes["height"], sizes["width"], sizes["batch"]
        x = torch.zeros(
            batch, self.backbone.num_channels, height, width, dtype=self.dtype, device=self.device
        )
        plan = self._plans.get(self._plan_key(x))
        if plan is None or not plan.frozen:
            self(x)
            plan = self._plans[self._plan_key(x)]
        names = {id(m): n for n, m in self.named_modules()}
        rows = [
            {"layer": names.get(id(owner), type(owner).__name__), "part": part, "impl": impl, "why": why}
            for owner, part, impl, why in plan.notes
        ]
        # once each: two threads making the plan's first call together both note every layer
        return list({tuple(r.values()): r for r in rows}.values())

    def _plan_key(self, pixel_values: torch.Tensor) -> tuple:
        return (
            tuple(pixel_values.shape), pixel_values.dtype, pixel_values.device,
            self.backend, self.winograd, self.tune, self.bf16x3, tuple(sorted(dispatch._overrides.items())),
        )  # fmt: skip

    def _plan_for(self, pixel_values: torch.Tensor) -> dispatch.Plan | None:
        """The plan of this input signature (None while compiling: dynamo traces the plain decisions)."""
        if torch.compiler.is_compiling():
            return None
        key = self._plan_key(pixel_values)
        plan = self._plans.pop(key, None) or dispatch.Plan(bf16x3=self.bf16x3, tune=self.tune)
        self._plans[key] = plan  # most recently used last
        while len(self._plans) > MAX_PLANS:
            self._plans.pop(next(iter(self._plans)))
        return plan

    def _check_pixel_values(self, pixel_values: Any) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must have shape (batch, channels, height, width), got {tuple(pixel_values.shape)}"
            )
        channels = self.backbone.num_channels
        if pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels, the model expects {channels} "
                f"(shape {tuple(pixel_values.shape)}; layout must be NCHW)"
            )
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values must be a floating-point tensor, got {pixel_values.dtype}; normalise images first "
                "(rescale 1/255 and ImageNet mean/std, e.g. with upernet_fast.preprocess)"
            )
        dtype, device = self.dtype, self.device
        if pixel_values.dtype != dtype:
            raise TypeError(f"pixel_values dtype {pixel_values.dtype} differs from the model's {dtype}")
        if pixel_values.device != device:
            raise ValueError(f"pixel_values are on {pixel_values.device}, the model on {device}")
        h, w = pixel_values.shape[2:]
        if min(h, w) < self.backbone.reduction:
            raise ValueError(
                f"image of {h}x{w} is smaller than the backbone's total stride {self.backbone.reduction}; "
                f"each side must be at least {self.backbone.reduction} pixels"
            )

    def _run_backbone(
        self, pixel_values: torch.Tensor, hidden: bool, attentions: bool, plan: dispatch.Plan | None
    ) -> BackboneOutput:
        """The backbone's outputs; a native backbone notes its implementation choices in `plan`."""
        if getattr(self.backbone, "is_transformers_backbone", False):
            from .backbones.hf_wrapper import run_transformers_backbone

            return run_transformers_backbone(self.backbone, pixel_values, hidden, attentions)
        return self.backbone(
            pixel_values, output_hidden_states=hidden, output_attentions=attentions, plan=plan
        )

    @torch.no_grad()
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> SemanticSegmenterOutput | tuple:
        if self.training:
            raise RuntimeError(
                "FastUperNet is inference-only (BatchNorm is folded into the convs); call .eval(), "
                "or fine-tune with transformers' UperNetForSemanticSegmentation and load the result"
            )
        self._check_pixel_values(pixel_values)
        if labels is not None and self.config.num_labels == 1:
            raise ValueError("The number of labels should be greater than one")
        if pixel_values.shape[0] == 0:
            return self._empty_batch(
                pixel_values, output_attentions, output_hidden_states, labels, return_dict
            )
        cfg = self.config
        return_dict = cfg.return_dict if return_dict is None else return_dict
        output_hidden_states = (
            cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        if (
            torch.compiler.is_compiling()
            and not torch.compiler.is_exporting()
            and dispatch.eager_under_compile(self.compile_eager, pixel_values.device)
            and labels is None
            and not output_hidden_states
            and not output_attentions
        ):  # the eager forward as one op (the traced plain ops were 1.5-3x slower on CPU)
            logits = _eager_logits(pixel_values, self._model_key)
            return SemanticSegmenterOutput(logits=logits) if return_dict else (logits,)

        ops = self.ops_for(pixel_values.device)
        ops.plan = self._plan_for(pixel_values)
        if not torch.compiler.is_compiling():
            dispatch.warn_if_emulated(pixel_values.dtype, pixel_values.device)
            if pixel_values.device.type == "cpu" and _memory.keep_memory_requested():
                _memory.keep_freed_memory()
        outputs = self._run_backbone(
            pixel_values, bool(output_hidden_states), bool(output_attentions), ops.plan
        )
        features = outputs.feature_maps
        # NCHW-contiguous logits, as transformers returns them (code may .view() them); resizing from NCHW
        # is also faster than from channels-last (bench/results/decisions.md, "Logits layout").
        # The head returns float32 logits for a bf16/fp16 model (see UperNetHead.classify).
        fused = self.decode_head(features, ops).contiguous()
        logits = ops.resize_bilinear(fused, pixel_values.shape[2:])

        loss = None
        if labels is not None:
            loss = self._loss(logits, features, labels, pixel_values.shape[2:], ops)
        if ops.plan is not None:
            self._note_native_helpers(ops, fused, logits)
            ops.plan.frozen = True  # later calls with this signature replay its decisions

        if not return_dict:
            # transformers slices the backbone output tuple (None fields dropped) the same way.
            backbone_tuple = tuple(
                v for v in (outputs.feature_maps, outputs.hidden_states, outputs.attentions) if v is not None
            )
            output = (logits,) + (backbone_tuple[1:] if output_hidden_states else backbone_tuple[2:])
            return ((loss,) + output) if loss is not None else output
        return SemanticSegmenterOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    def _note_native_helpers(self, ops: dispatch.Ops, fused: torch.Tensor, logits: torch.Tensor) -> None:
        """Note the C-or-PyTorch choices the kernels make inside the head's ops, while the plan is built:
        the Winograd tile transforms (if a conv ran as Winograd) and the logits resize of `fused`. The
        kernels decide from their inputs alone, so `dispatch` restates their test here."""
        plan = ops.plan
        if plan is None or plan.frozen:
            return
        if any(impl.startswith("Winograd") for _, _, impl, _ in plan.notes):
            impl, why = dispatch.winograd_transforms_choice(fused.device)
            plan.note(self.decode_head, "Winograd tile transforms", impl, why)
        (h, w), (height, width) = fused.shape[2:], logits.shape[2:]
        impl, why = dispatch.resize_choice(ops, fused)
        plan.note(self.decode_head, f"logits resize {h}x{w} -> {height}x{width}", impl, why)

    def _empty_batch(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None,
        output_hidden_states: bool | None,
        labels: torch.Tensor | None,
        return_dict: bool | None,
    ) -> SemanticSegmenterOutput | tuple:
        """Batch 0: empty outputs of the right shapes, as transformers returns (our fused ops reshape with
        -1, which an empty batch makes ambiguous): one zero image runs, every output keeps 0 of its rows."""
        size = tuple(pixel_values.shape[2:])
        if labels is not None and (labels.dim() != 3 or tuple(labels.shape) != (0, *size)):
            raise ValueError(
                f"labels must have shape (batch, height, width) = {(0, *size)}, got {tuple(labels.shape)}"
            )
        one = self.forward(
            pixel_values.new_zeros((1, *pixel_values.shape[1:])),
            output_attentions,
            output_hidden_states,
            None,
            True,
        )

        def empty(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value[:0]
            return tuple(empty(v) for v in value) if isinstance(value, tuple) else value

        # the mean over no pixels, as F.cross_entropy gives it (nan)
        loss = (
            None
            if labels is None
            else F.cross_entropy(empty(one.logits), labels.long(), ignore_index=self.config.loss_ignore_index)
        )
        out = SemanticSegmenterOutput(
            loss=loss,
            logits=empty(one.logits),
            hidden_states=empty(one.hidden_states),
            attentions=empty(one.attentions),
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return out if return_dict else out.to_tuple()

    def _loss(
        self,
        logits: torch.Tensor,
        features: tuple[torch.Tensor, ...],
        labels: torch.Tensor,
        size: Any,
        ops: dispatch.Ops,
    ) -> torch.Tensor:
        if labels.dim() != 3 or labels.shape[0] != logits.shape[0] or tuple(labels.shape[1:]) != tuple(size):
            raise ValueError(
                f"labels must have shape (batch, height, width) = {(logits.shape[0], *size)}, "
                f"got {tuple(labels.shape)}"
            )
        if labels.is_floating_point():
            raise TypeError(f"labels must be an integer tensor of class indices, got {labels.dtype}")
        ignore = self.config.loss_ignore_index
        bad = labels[(labels != ignore) & ((labels < 0) | (labels >= logits.shape[1]))]
        if bad.numel():
            raise ValueError(
                f"labels hold class index {int(bad[0])} ({bad.numel()} pixel(s) out of range); expected "
                f"0..{logits.shape[1] - 1} or the ignore index {ignore}"
            )
        loss = F.cross_entropy(logits, labels.long(), ignore_index=ignore)
        if self.auxiliary_head is not None:
            aux = ops.resize_bilinear(self.auxiliary_head(features, ops), size)
            loss = loss + self.config.auxiliary_loss_weight * F.cross_entropy(
                aux, labels.long(), ignore_index=ignore
            )
        return loss


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """`device` as a torch.device this process can put tensors on; a ValueError saying why not otherwise
    (torch's own errors for these are an AssertionError or a list of every device type it knows)."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a device name (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if parsed.type == "meta":
        raise ValueError("device 'meta' holds no data: load on 'cpu' (or a GPU) to run the model")
    try:
        torch.empty(0, device=parsed)
    except (AssertionError, RuntimeError) as exc:  # torch's first line says why (its dispatcher dump follows)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
        raise ValueError(
            f"device {device!r} is not available in this torch build/machine: {reason}"
        ) from None
    return parsed


def load(
    source: Any,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    backend: str | None = None,
    winograd: bool | None = None,
    tune: bool | None = None,
    bf16x3: bool | None = None,
    strict: bool = True,
) -> FastUperNet:
    """A `FastUperNet` in eval mode from a directory, a hub id, or a transformers UperNet model.

    `dtype` (or `torch_dtype`, transformers' older spelling): a floating torch dtype or its name
    ("float32"/"fp32", "bfloat16"/"bf16", "float16", "float64"); None or "auto" keeps the source's dtype (an
    in-memory model's parameters; a file's config `dtype`, else its weights'), as transformers 5 does.
    `backend` ("auto" | "triton" | "torch"; None reads `UPERNET_FAST_BACKEND`), `winograd` (None reads
    `UPERNET_FAST_WINOGRAD`, default on) and `tune` (None reads `UPERNET_FAST_TUNE`, default on: measure
    CPU-dependent choices once per machine) and `bf16x3` (None reads `UPERNET_FAST_BF16X3`, default on: on
    AMX CPUs, large direct 3x3 and 1x1 float32 convs and the block MLPs as split bfloat16) choose the fast
    paths; see
    `upernet_fast.dispatch`.
    `strict=False` loads a checkpoint with missing/unexpected keys and warns naming them."""
    switches = {"winograd": winograd, "tune": tune, "bf16x3": bf16x3, "strict": strict}
    for name, value in switches.items():  # "no" is truthy: a string would silently mean True
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be True, False or None, got {value!r}")
    dtype = checkpoint.resolve_dtype(dtype, torch_dtype)
    device = resolve_device(device)
    config, entries, stored = checkpoint.open_source(source)
    # normal tensors even when called under torch.inference_mode(): inference tensors have no version
    # counter, so a cast model could not keep its float32 originals for the folds (`FastUperNet._apply`)
    with torch.inference_mode(False):
        model = FastUperNet(config, backend=backend, winograd=winograd, tune=tune, bf16x3=bf16x3)
        checkpoint.copy_state_dict(model, entries, strict=strict)
        if dtype in (None, "auto"):
            dtype = stored
        if dtype == model.dtype:
            dtype = None
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
            if stored is None or not folding.more_precise(stored, model.dtype):
                model._forget_originals()  # built in float32 from a checkpoint that held no more than this
    return model.eval()
