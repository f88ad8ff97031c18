"""DeSAM (Gao et al., MICCAI 2024): the mask decoder split into a prompt-relevant IoU module (PRIM)
and a prompt-invariant mask module (PIMM); medical.md §6, code ``yifangao112/DeSAM``.

::

    image ──encoder (frozen)──┬── blocks/stages at the first three quarter ends ──┐
                              └── embedding (B, C, h, w) ──┬───────────────┐      │
    prompt ──prompt encoder (frozen)── sparse, dense ──> PRIM: tokens + two-way   │
                                                         transformer + IoU head   │
                                                         -> IoU (P, 1)            │
                                         fusion = "image": the embedding ─> PIMM <┘
                                         fusion = "prim":  PRIM's updated image tokens ─> PIMM
                                                  PIMM -> logits (P, 1, 4h, 4w)

PIMM is the reference's U-Net/UNETR-like decoder: the deepest feature becomes C channels at h
(fused with the embedding by a residual SE block), the middle one C/2 at 2h, the shallowest C/4 at
4h (transposed-conv ups), then two up blocks and a 1x1 head. ``fusion="image"`` (default) fuses the
encoder's own embedding, so the mask cannot depend on the prompt: this is what the issue asks for
("invariant by construction"). ``fusion="prim"`` is the reference code exactly: PIMM fuses the
transformer-updated image tokens, which the prompt tokens attend into, so the mask is prompt-decoupled
by training only (PRIM learns to ignore bad prompts). Both have the same parameters.

Training (reference ``utils/datasets.py``): one point per object, from the foreground with
probability 1/2 (IoU target 1) else from the background (IoU target 0), always passed with label 1;
the mask target is always the whole object. Loss: MONAI DiceCE (sigmoid, squared) + L1 between the
IoU prediction and that target (``iou_loss="mse"`` as the reference's option). PRIM starts from
SAM's decoder (the reference loads the SAM checkpoint non-strictly); the encoder and prompt encoder
stay frozen. Inference without a prompt: :func:`grid_point_inference`.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from samadapt.adapter import REPLACES_DECODER, Adapter, AdapterError, register_adapter
from samadapt.adapters.common import mask_iou, random_points, upsample_logits
from samadapt.modeling import EncoderOutput, PromptBatch, SamModel
from samadapt.modeling.image_encoder_vit import ImageEncoderViT
from samadapt.modeling.mask_decoder import MaskDecoder
from samadapt.modeling.tiny_vit import TinyViT

FUSIONS = ("image", "prim")


# ---------------------------------------------------------------------------- PIMM blocks
class SqueezeExcite(nn.Module):
    """Channel gate: (B, C, H, W) -> same, scaled by sigmoid(fc(relu(fc(avgpool))))."""

    def __init__(self, chans: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, chans // reduction)
        self.fc1 = nn.Linear(chans, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, chans, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * gate[:, :, None, None]


class ResSEBlock(nn.Module):
    """The reference's ``UnetResSEBlock`` (MONAI conv layers): conv3x3-IN-LReLU-conv3x3-IN-SE plus
    a 1x1 conv + IN skip when the width changes, then LReLU. (B, in, H, W) -> (B, out, H, W).

    Convolutions without bias (MONAI ``get_conv_layer``'s default), InstanceNorm without affine. The
    reference also builds the 1x1 skip when it is unused (in == out); it is left out here.
    """

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm2d(out_chans)
        self.norm2 = nn.InstanceNorm2d(out_chans)
        self.se = SqueezeExcite(out_chans)
        self.skip: nn.Module = (
            nn.Sequential(nn.Conv2d(in_chans, out_chans, 1, bias=False), nn.InstanceNorm2d(out_chans))
            if in_chans != out_chans
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.norm1(self.conv1(x)), 0.01)
        y = self.se(self.norm2(self.conv2(y)))
        return F.leaky_relu(y + self.skip(x), 0.01)


def _up(chans_in: int, chans_out: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(chans_in, chans_out, kernel_size=2, stride=2, bias=False)


class PreUpBlock(nn.Module):
    """An encoder feature to a decoder level: ResSE (in -> out), then ``ups`` x (2x up + ResSE)."""

    def __init__(self, in_chans: int, out_chans: int, ups: int) -> None:
        super().__init__()
        self.block_init = ResSEBlock(in_chans, out_chans)
        self.ups = nn.ModuleList(
            nn.Sequential(_up(out_chans, out_chans), ResSEBlock(out_chans, out_chans)) for _ in range(ups)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_init(x)
        for up in self.ups:
            x = up(x)
        return x


class UpBlock(nn.Module):
    """2x up (in -> out), concatenate the skip (out channels), ResSE (2 out -> out)."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.up = _up(in_chans, out_chans)
        self.block = ResSEBlock(2 * out_chans, out_chans)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


@dataclass(frozen=True)
class FeatureSpec:
    """One encoder output PIMM reads: its index, channels and side relative to the embedding grid."""

    index: int
    chans: int
    scale: int  # feature side / embedding side (1 for ViT blocks, 2 for TinyViT stage 0)


def encoder_feature_specs(encoder: nn.Module) -> list[FeatureSpec]:
    """The outputs ending the first three quarters of the encoder, shallow to deep.

    ViT: blocks ``depth * k // 4 - 1`` for k = 1, 2, 3, which are the reference's choice (the first
    three global-attention blocks: 7, 15, 23 on ViT-H; 2, 5, 8 on ViT-B). TinyViT (four stages):
    stages 0, 1, 2 (the last stage feeds the neck, as ViT's last global block does).
    """
    if isinstance(encoder, ImageEncoderViT):
        depth = len(encoder.blocks)
        dim = int(encoder.patch_embed.proj.out_channels)
        return [FeatureSpec(max(0, depth * k // 4 - 1), dim, 1) for k in (1, 2, 3)]
    if isinstance(encoder, TinyViT):
        specs = []
        for index, layer in enumerate(list(encoder.layers)[:3]):
            merge = getattr(layer, "downsample", None)
            if merge is None:
                raise AdapterError("DeSAM: TinyViT stages 0-2 must end with patch merging")
            conv = cast(nn.Conv2d, merge.conv2.c)
            side = merge.input_resolution[0] // int(conv.stride[0])
            scale = side // encoder.out_resolution
            if scale not in (1, 2, 4) or side % encoder.out_resolution:
                raise AdapterError(f"DeSAM: TinyViT stage {index} side {side} does not fit the decoder")
            specs.append(FeatureSpec(index, int(conv.out_channels), scale))
        return specs
    raise AdapterError(f"DeSAM needs a ViT or TinyViT image encoder, not {type(encoder).__name__}")


class PIMM(nn.Module):
    """Prompt-invariant mask module: U-Net decoder over three encoder features + a fused embedding.

    Args:
        specs: the three features, shallow to deep. dim: embedding channels C (256).

    Shapes: features as (B, chans, scale*h, scale*w); embedding (B, C, h, w) -> logits (B, 1, 4h, 4w).
    """

    def __init__(self, specs: Sequence[FeatureSpec], dim: int) -> None:
        super().__init__()
        widths = [dim, dim // 2, dim // 4]  # deepest first: C at h, C/2 at 2h, C/4 at 4h
        deep_first = list(reversed(specs))
        if len(specs) != 3:
            raise AdapterError(f"PIMM reads three encoder features, got {len(specs)}")
        ups = []
        for level, spec in enumerate(deep_first):  # level l lives at 2^l x the embedding side
            if spec.scale > 2**level or 2**level % spec.scale:
                raise AdapterError(f"feature {spec.index} (x{spec.scale}) cannot feed PIMM level {level}")
            ups.append(int(math.log2(2**level // spec.scale)))
        self.context = nn.ModuleList(
            PreUpBlock(spec.chans, width, up) for spec, width, up in zip(deep_first, widths, ups, strict=True)
        )
        self.fusion = ResSEBlock(2 * dim, dim)
        self.decoder = nn.ModuleList([UpBlock(widths[0], widths[1]), UpBlock(widths[1], widths[2])])
        self.head = nn.Conv2d(widths[2], 1, 1, bias=False)

    def forward(self, features: Sequence[torch.Tensor], embedding: torch.Tensor) -> torch.Tensor:
        """features: shallow to deep, (B, chans, s*h, s*w) each; embedding (B, C, h, w)."""
        deep_first = list(reversed(features))
        skips = [block(f) for block, f in zip(self.context, deep_first, strict=True)]
        x = self.fusion(torch.cat([embedding, skips[0]], dim=1))  # reference order: embedding first
        for block, skip in zip(self.decoder, skips[1:], strict=True):
            x = block(x, skip)
        return self.head(x)


class PRIM(nn.Module):
    """Prompt-relevant IoU module: SAM's output tokens, two-way transformer and IoU head.

    ``from_decoder`` copies them from SAM's mask decoder (the upscaling and hypernetwork heads, which
    the reference keeps but never calls, are not copied).
    """

    def __init__(self, decoder: MaskDecoder) -> None:
        super().__init__()
        self.transformer = copy.deepcopy(decoder.transformer)
        self.iou_token = copy.deepcopy(decoder.iou_token)
        self.mask_tokens = copy.deepcopy(decoder.mask_tokens)
        self.iou_prediction_head = copy.deepcopy(decoder.iou_prediction_head)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 or P, C, h, w), (1, C, h, w), (P, N, C), (P, C, h, w) -> (updated image (P, C, h, w),
        IoU of the single-mask token (P, 1))."""
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1)
        tokens = torch.cat([tokens, sparse.to(tokens.dtype)], dim=1)
        batch = tokens.shape[0]
        src = image_embeddings
        if src.shape[0] != batch:
            src = torch.repeat_interleave(src, batch, dim=0)
        src = src + dense
        hs, keys = self.transformer(src, image_pe.expand(batch, -1, -1, -1), tokens)
        chans, height, width = src.shape[1:]
        updated = keys.transpose(1, 2).reshape(batch, chans, height, width)
        return updated, self.iou_prediction_head(hs[:, 0, :])[:, :1]


def _as_map(feature: torch.Tensor) -> torch.Tensor:
    """ViT (B, h, w, D) or TinyViT (B, h*w, C) -> (B, channels, h, w)."""
    if feature.ndim == 4:
        return feature.permute(0, 3, 1, 2)
    side = math.isqrt(feature.shape[1])
    return feature.transpose(1, 2).reshape(feature.shape[0], -1, side, side)


class DeSAMDecoder(nn.Module):
    """PRIM + PIMM with the core's decoder call signature; returns logits (P, 1, 4h, 4w), IoU (P, 1).

    One mask per prompt whatever ``multimask_output`` says (DeSAM has a single mask output).
    """

    def __init__(self, decoder: MaskDecoder, specs: Sequence[FeatureSpec], fusion: str) -> None:
        super().__init__()
        self.prim = PRIM(decoder)
        self.pimm = PIMM(specs, decoder.transformer_dim)
        self.indexes = tuple(spec.index for spec in specs)
        self.fusion = fusion
        self._model: weakref.ref[SamModel] | None = None  # to find our features among the model's

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_model"] = None
        return state

    def _features(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        model = self._model() if self._model is not None else None
        order = model.feature_indexes if model is not None else tuple(sorted(set(self.indexes)))
        if len(features) != len(order):
            raise AdapterError(
                f"DeSAM decoder needs encoder features {self.indexes}; got {len(features)} tensors"
            )
        return [_as_map(features[order.index(i)]) for i in self.indexes]

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool = False,
        features: Sequence[torch.Tensor] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeddings (1 or P, C, h, w) with ``features`` of the same rows, prompts (P, ...)."""
        updated, iou = self.prim(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        maps = self._features(features)
        if self.fusion == "prim":
            if maps[0].shape[0] != updated.shape[0]:
                maps = [m.expand(updated.shape[0], -1, -1, -1) for m in maps]
            return self.pimm(maps, updated), iou
        masks = self.pimm(maps, image_embeddings)  # no prompt tensor reaches this call
        if masks.shape[0] != iou.shape[0]:  # one image, P prompts: the same mask for each
            masks = masks.expand(iou.shape[0], -1, -1, -1)
        return masks, iou


@register_adapter("desam")
class DeSAM(Adapter):
    """DeSAM: SAM's decoder replaced by PRIM (IoU) + PIMM (mask); encoder and prompt encoder frozen.

    Args:
        fusion: ``image`` (PIMM fuses the encoder embedding: the mask is prompt-invariant by
            construction) or ``prim`` (the reference: PIMM fuses PRIM's prompt-updated image tokens).
        background_probability: chance that a training point comes from the background (1/2).
        background_label: the point label given to background points; the reference passes 1 for
            every point (the model is not told which points are wrong).
        iou_loss: ``l1`` (reference default) or ``mse`` between IoU prediction and the 1/0 target.
        iou_weight: weight of that term.
    """

    capabilities = frozenset({REPLACES_DECODER})

    def __init__(
        self,
        fusion: str = "image",
        background_probability: float = 0.5,
        background_label: int = 1,
        iou_loss: str = "l1",
        iou_weight: float = 1.0,
    ) -> None:
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose from {', '.join(FUSIONS)}")
        if iou_loss not in ("l1", "mse"):
            raise ValueError(f"unknown iou_loss {iou_loss!r}; choose l1 or mse")
        if not 0.0 <= background_probability <= 1.0:
            raise ValueError("background_probability must be in [0, 1]")
        super().__init__(
            unfreeze=(),
            init_args={
                "fusion": fusion,
                "background_probability": background_probability,
                "background_label": background_label,
                "iou_loss": iou_loss,
                "iou_weight": iou_weight,
            },
        )
        self.fusion = fusion
        self.background_probability = background_probability
        self.background_label = background_label
        self.iou_loss_kind = iou_loss
        self.iou_weight = iou_weight
        self.decoder: DeSAMDecoder | None = None
        self._iou_targets: torch.Tensor | None = None  # set by simulate_prompts, read by loss

    def install(self, model: SamModel) -> None:
        if not isinstance(model.mask_decoder, MaskDecoder):
            raise AdapterError(
                f"DeSAM replaces SAM's mask decoder; this model has {type(model.mask_decoder)}"
            )
        specs = encoder_feature_specs(model.image_encoder)
        device = next(model.parameters()).device
        self.decoder = DeSAMDecoder(model.mask_decoder, specs, self.fusion).to(device)
        self.decoder._model = weakref.ref(model)
        model.require_features([s.index for s in specs])
        model.mask_decoder = self.decoder

    @property
    def prim(self) -> PRIM:
        if self.decoder is None:
            raise AdapterError("DeSAM is not attached")
        return self.decoder.prim

    @property
    def pimm(self) -> PIMM:
        if self.decoder is None:
            raise AdapterError("DeSAM is not attached")
        return self.decoder.pimm

    def simulate_prompts(self, masks: torch.Tensor, generator: torch.Generator | None = None) -> PromptBatch:
        """One point per (P, 1, S, S) mask: background with ``background_probability`` (IoU target 0),
        else foreground (target 1); labels all ``background_label``/1 as the reference."""
        draw = torch.rand(masks.shape[0], generator=generator).to(masks.device)
        foreground = draw >= self.background_probability
        points, _ = random_points(masks, generator, foreground=foreground)
        labels = torch.where(foreground, 1.0, float(self.background_label))[:, None]
        self._iou_targets = foreground.float()[:, None]
        return PromptBatch(points=points, point_labels=labels)

    def loss(
        self, logits: torch.Tensor, iou_predictions: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """DiceCE (MONAI, sigmoid, squared) on logits upsampled to the targets + IoU L1/MSE.

        The IoU target is 1/0 for the foreground/background points of the last
        :meth:`simulate_prompts` call (same P); without one, the real IoU of the predicted mask.
        """
        from monai.losses import DiceCELoss

        full = upsample_logits(logits, targets.shape[-1])
        dice_ce = DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")(full, targets)
        iou_target = self._iou_targets
        self._iou_targets = None
        if iou_target is None or iou_target.shape != iou_predictions.shape:
            iou_target = mask_iou(full, targets)
        iou_target = iou_target.to(iou_predictions.device, torch.float32)
        pred = iou_predictions.float()
        iou_term = F.l1_loss(pred, iou_target) if self.iou_loss_kind == "l1" else F.mse_loss(pred, iou_target)
        return {
            "dice_ce": dice_ce,
            f"iou_{self.iou_loss_kind}": iou_term,
            "loss": dice_ce + self.iou_weight * iou_term,
        }


# ---------------------------------------------------------------------------- grid-point inference
def point_grid(side: int, size: int | tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """SAM's ``build_point_grid``: side x side cell centres over a (h, w) region -> (side*side, 2) x, y."""
    height, width = (size, size) if isinstance(size, int) else size
    offset = 1.0 / (2 * side)
    steps = torch.linspace(offset, 1 - offset, side, device=device)
    ys, xs = torch.meshgrid(steps * height, steps * width, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)


@dataclass
class GridResult:
    """Per image: logits (B, 1, 4h, 4w) of the chosen point (meaningful where ``found``), its IoU
    prediction (B,), stability score (B,), the point (B, 2) in the encoder frame and ``found`` (B,)."""

    logits: torch.Tensor
    iou: torch.Tensor
    stability: torch.Tensor
    points: torch.Tensor
    found: torch.Tensor


def stability_score(logits: torch.Tensor, offset: float = 1.0) -> torch.Tensor:
    """SAM's stability: IoU of (logits > offset) and (logits > -offset); (P, H, W) -> (P,)."""
    high = (logits > offset).flatten(1).sum(1).float()
    low = (logits > -offset).flatten(1).sum(1).float()
    return high / low.clamp(min=1.0)


@torch.no_grad()
def grid_point_inference(
    model: SamModel,
    encoded: EncoderOutput,
    *,
    grid: int = 9,
    iou_threshold: float = 0.5,
    stability_threshold: float = 0.6,
    region: tuple[int, int] | None = None,
) -> GridResult:
    """DeSAM without a prompt (reference ``run_testing``): a grid x grid point grid (label 1) decoded in
    one batch per image; the proposal kept is the one with the highest predicted IoU among those
    passing ``iou_threshold`` and ``stability_threshold`` (the first of SAM's AMG output, which the
    reference evaluates). With the default fusion every point gives the same mask, so the grid only
    decides whether the object is there (``found``).

    Args:
        encoded: B encoded images (``model.encode``), with the features the adapter asked for.
        region: (h, w) of the image inside the encoder frame (default the whole S x S frame).
    """
    size = model.input_size
    points = point_grid(grid, region or (size, size), encoded.embedding.device)  # (G, 2)
    count = points.shape[0]
    results = []
    for b in range(encoded.embedding.shape[0]):
        one = EncoderOutput(encoded.embedding[b : b + 1], [f[b : b + 1] for f in encoded.features], None)
        prompts = PromptBatch(
            points=points[:, None, :], point_labels=torch.ones(count, 1, device=points.device)
        )
        logits, iou = model.decode_prompts(one, prompts)  # (G, 1, 4h, 4w), (G, 1)
        stable = stability_score(logits[:, 0])
        score = iou[:, 0].float()
        keep = (score > iou_threshold) & (stable > stability_threshold)
        best = int(torch.where(keep, score, torch.full_like(score, -math.inf)).argmax())
        results.append((logits[best], score[best], stable[best], points[best], keep.any()))
    logits_b, iou_b, stable_b, point_b, found_b = (torch.stack(t) for t in zip(*results, strict=True))
    return GridResult(logits_b, iou_b, stable_b, point_b, found_b)
