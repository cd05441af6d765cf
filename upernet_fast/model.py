"""`FastUperNet`: transformers' `UperNetForSemanticSegmentation` interface, state_dict and outputs,
with an inference-only fast forward (BatchNorm folded, low-resolution head rewrite, no auxiliary head
unless labels are given)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import dispatch
from .backbones import BackboneOutput, build_backbone
from .config import UperNetConfig
from .head import UperNetFCNHead, UperNetHead
from .outputs import SemanticSegmenterOutput


class FastUperNet(nn.Module):
    main_input_name = "pixel_values"

    def __init__(
        self,
        config: UperNetConfig | dict[str, Any],
        backend: str | None = None,
        winograd: bool | None = None,
    ) -> None:
        """`backend`: "auto" | "triton" | "torch" (None: `UPERNET_FAST_BACKEND`, else "auto");
        `winograd`: Winograd for the head's large 3x3 convs on CPU (None: `UPERNET_FAST_WINOGRAD`, else on).
        Both are plain attributes: set them later to switch paths (see `upernet_fast.dispatch`)."""
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
        self.eval()

    # ------------------------------------------------------------------ construction and IO
    @classmethod
    def from_config(
        cls, config: Any, *, backend: str | None = None, winograd: bool | None = None, seed: int | None = None
    ) -> FastUperNet:
        """A randomly initialised model from a dict, a config.json path/directory or a transformers config."""
        if seed is not None:
            torch.manual_seed(seed)
        return cls(UperNetConfig.from_any(config), backend=backend, winograd=winograd)

    @classmethod
    def from_pretrained(cls, source: Any, **kwargs: Any) -> FastUperNet:
        from .checkpoint import load

        return load(source, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `config.json` + `model.safetensors` in the layout transformers' `from_pretrained` reads."""
        from .checkpoint import save

        save(self, save_directory)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Also accepts alternative key layouts the backbone knows (e.g. transformers 5 in-memory Swin)."""
        state_dict = self.backbone.remap_state_dict(dict(state_dict), "backbone.")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

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
        return dispatch.ops_for(
            self.backend, self.device if device is None else device, winograd=self.winograd
        )

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

    def _run_backbone(self, pixel_values: torch.Tensor, hidden: bool, attentions: bool) -> BackboneOutput:
        if getattr(self.backbone, "is_transformers_backbone", False):
            from .backbones.hf_wrapper import run_transformers_backbone

            return run_transformers_backbone(self.backbone, pixel_values, hidden, attentions)
        return self.backbone(pixel_values, output_hidden_states=hidden, output_attentions=attentions)

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
        cfg = self.config
        return_dict = cfg.return_dict if return_dict is None else return_dict
        output_hidden_states = (
            cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions

        ops = self.ops_for(pixel_values.device)
        outputs = self._run_backbone(pixel_values, bool(output_hidden_states), bool(output_attentions))
        features = outputs.feature_maps
        # NCHW-contiguous logits, as transformers returns them (code may .view() them); resizing from NCHW
        # is also faster than from channels-last (83 vs 93 ms for 150 x 128² -> 512², conversion included).
        logits = ops.resize_bilinear(self.decode_head(features, ops).contiguous(), pixel_values.shape[2:])

        loss = None
        if labels is not None:
            loss = self._loss(logits, features, labels, pixel_values.shape[2:], ops)

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
        loss = F.cross_entropy(logits, labels.long(), ignore_index=ignore)
        if self.auxiliary_head is not None:
            aux = ops.resize_bilinear(self.auxiliary_head(features, ops), size)
            loss = loss + self.config.auxiliary_loss_weight * F.cross_entropy(
                aux, labels.long(), ignore_index=ignore
            )
        return loss
