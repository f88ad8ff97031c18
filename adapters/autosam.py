"""AutoSAM: an image-conditioned prompt generator trained through the frozen SAM core (prompt-free).

After Shaharabany et al. 2023 (``talshaharabany/AutoSAM``): SAM's prompt encoder is "overloaded" by a
network g that sees the image and outputs the **dense prompt embedding** (B, 256, 64, 64) the mask
decoder adds to the image embedding (optionally a few sparse prompt tokens too). All of SAM stays
frozen; g is trained with Dice + BCE on SAM's mask, the gradients flowing through the frozen decoder.
A shallow surrogate head h (transposed convolutions, as the paper's ``ModelH``) decodes g's features
into a mask for inspection.

Backbone choice: g runs on the core's own frozen image embedding (``EncoderOutput.embedding``,
(B, 256, 64, 64) on every official core), not on a second CNN over the pixels as the paper's HarDNet-85:

- no second backbone and no download: the encoder has already run, so g costs a few convolutions on a
  64 x 64 grid (about 1 M parameters; near-zero time next to the encoder);
- the embedding is on exactly the grid and in the feature space the dense prompt is added to, and it
  has the same shape for every encoder family (TinyViT LiteMedSAM at 256, ViT-B/L/H at 1024, the tiny
  test core), so one generator design fits every core with no per-family code;
- the cost: g cannot see pixel detail the encoder discarded (the paper's CNN sees a 512 px copy); SAM's
  decoder still upsamples with its own features, so the mask is as fine as SAM's.

The last layer starts at zero weight with SAM's "no mask" embedding as bias, so before training the
adapter reproduces SAM's own no-prompt output exactly, and training moves away from it smoothly.

One adapter per target class (``classes=[label]``), or a multi-class variant (``classes=[2, 3, 6]``):
one dense embedding per class, one mask per class. ``classes`` are label values of the training label
maps; train with the data module's ``--data.labels`` set to the same values (the recipe does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samadapt.adapter import GENERATES_PROMPTS, Adapter, AdapterError, register_adapter
from samadapt.adapters.common import dice_bce_loss
from samadapt.errors import InputError
from samadapt.modeling import EncoderOutput, PromptBatch, SamModel


class _Residual(nn.Module):
    """Two 3x3 convolutions with GroupNorm and a skip: (B, W, h, w) -> (B, W, h, w)."""

    def __init__(self, width: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.GroupNorm(groups, width),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.GroupNorm(groups, width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.body(x))


class AutoSamGenerator(nn.Module):
    """g: the image embedding -> per-class prompt embeddings, and the surrogate head h.

    Args:
        embed_dim: E, the core's prompt/embedding dimension (256 for the official cores).
        no_mask_embed: (E,) SAM's "no mask" dense embedding: the dense output's starting value.
        label_values: label value of each class, C = len(label_values).
        width: channels of g's trunk. depth: residual blocks in the trunk.
        sparse_tokens: N sparse prompt tokens per class (0: dense only, as the paper's ``ModelEmb``).
        surrogate: build the surrogate head h (False: no h, e.g. with a zero surrogate loss weight, so
            that no parameter goes untrained, which DDP refuses).
        surrogate_aux: let the surrogate head's loss train g too (else h sees detached features).

    Attributes:
        label_values: as given. last_surrogate: (B, C, 4h, 4w) logits of the surrogate head from the
            latest call in training mode (the adapter's loss reads them); None in eval mode.
    """

    def __init__(
        self,
        embed_dim: int,
        no_mask_embed: torch.Tensor,
        label_values: Sequence[int],
        width: int = 128,
        depth: int = 2,
        sparse_tokens: int = 0,
        surrogate: bool = True,
        surrogate_aux: bool = False,
    ) -> None:
        super().__init__()
        self.embed_dim, self.num_classes = embed_dim, len(label_values)
        self.label_values = [int(v) for v in label_values]
        self.sparse_tokens, self.surrogate_aux = sparse_tokens, surrogate_aux
        groups = math.gcd(8, width)
        self.stem = nn.Sequential(
            nn.Conv2d(embed_dim, width, 3, padding=1, bias=False), nn.GroupNorm(groups, width), nn.GELU()
        )
        self.trunk = nn.Sequential(*[_Residual(width, groups) for _ in range(depth)])
        self.dense_head = nn.Conv2d(width, self.num_classes * embed_dim, 1)
        nn.init.zeros_(self.dense_head.weight)  # starts as SAM's own "no prompt": zero weight, ...
        with torch.no_grad():  # ... and SAM's no_mask_embed as bias
            bias = cast(torch.Tensor, self.dense_head.bias)
            bias.copy_(no_mask_embed.detach().reshape(-1).repeat(self.num_classes))
        self.sparse_head = (
            nn.Linear(width, self.num_classes * sparse_tokens * embed_dim) if sparse_tokens else None
        )
        self.surrogate = (
            nn.Sequential(  # h: the paper's ModelH, ConvT x2 then a per-class 1x1
                nn.ConvTranspose2d(width, 64, 2, stride=2),
                nn.GELU(),
                nn.ConvTranspose2d(64, 16, 2, stride=2),
                nn.GELU(),
                nn.Conv2d(16, self.num_classes, 1),
            )
            if surrogate
            else None
        )
        self.last_surrogate: torch.Tensor | None = None

    def features(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, E, h, w) image embedding -> (B, width, h, w) trunk features."""
        return self.trunk(self.stem(embedding))

    def forward(self, encoded: EncoderOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings for the B images of ``encoded``.

        Returns:
            one class: (sparse (B, N, E), dense (B, E, h, w)); C classes: (B, C, N, E), (B, C, E, h, w).
        """
        embedding = encoded.embedding
        feats = self.features(embedding.to(self.dense_head.weight.dtype))
        batch, _, height, width = feats.shape
        dense = self.dense_head(feats).view(batch, self.num_classes, self.embed_dim, height, width)
        if self.sparse_head is not None:
            pooled = feats.mean(dim=(2, 3))  # (B, width)
            sparse = self.sparse_head(pooled).view(batch, self.num_classes, self.sparse_tokens, -1)
        else:
            sparse = dense.new_zeros(batch, self.num_classes, 0, self.embed_dim)
        if self.training and self.surrogate is not None:  # for the surrogate loss; inference skips h
            self.last_surrogate = self.surrogate(feats if self.surrogate_aux else feats.detach())
        else:
            self.last_surrogate = None
        if self.num_classes == 1:
            return sparse[:, 0], dense[:, 0]
        return sparse, dense

    def surrogate_logits(self, encoded: EncoderOutput) -> torch.Tensor:
        """h(g(I)) for inspection: (B, C, 4h, 4w) mask logits on SAM's low-res grid."""
        if self.surrogate is None:
            raise AdapterError("this AutoSAM generator has no surrogate head (surrogate_weight 0)")
        return self.surrogate(self.features(encoded.embedding.to(self.dense_head.weight.dtype)))

    def label_maps(self, predictor: Any, planes: Sequence[np.ndarray], batch_size: int = 8) -> np.ndarray:
        """Prompt-free segmentation of 2D planes (an image, or the slices of a volume) into label maps.

        Each plane is embedded by ``predictor`` (a :class:`~samadapt.predictor.Predictor` whose model
        has this generator attached) and decoded with no prompt: one mask per class. Classes get their
        label values; where two overlap, the higher predicted IoU wins.

        Args:
            planes: N arrays (H, W) or (H, W, 3), all of the same size.

        Returns:
            (N, H, W) uint16 label map (0 = background).
        """
        if not len(planes):
            raise InputError("no plane to segment")
        values = np.asarray([0, *self.label_values], dtype=np.uint16)
        out: list[np.ndarray] = []
        for first in range(0, len(planes), batch_size):
            for emb in predictor.embed(list(planes[first : first + batch_size]), batch_size=batch_size):
                pred = predictor.predict(embedding=emb)  # masks (C, 1, H, W), scores (C, 1)
                masks, scores = pred.masks[:, 0], pred.scores[:, 0]
                ranked = np.where(masks, scores[:, None, None] + 2.0, 0.0)  # (C, H, W); > 0 inside
                best = ranked.argmax(axis=0)
                out.append(np.where(masks.any(axis=0), values[best + 1], 0).astype(np.uint16))
        return np.stack(out)


@register_adapter("autosam")
class AutoSAM(Adapter):
    """AutoSAM: a trained prompt generator makes SAM prompt-free; the whole core stays frozen.

    Args:
        classes: label values of the target classes: one (a binary adapter, e.g. ``[1]``) or several
            (the multi-class variant: one dense embedding and one mask per class).
        width: channels of the generator's trunk (128: ~0.9 M parameters on 256-dim cores).
        depth: residual blocks in the trunk.
        sparse_tokens: sparse prompt tokens per class besides the dense embedding (0 as the paper).
        surrogate_weight: weight of the surrogate head's Dice + BCE (0: no surrogate head at all).
        surrogate_aux: the surrogate loss also trains g (an auxiliary loss); default False: h only
            reads g's features (inspection), as the paper's interpretability probe.

    Trainable: exactly the generator and its surrogate head (``own_parameters``); no core role.
    """

    capabilities = frozenset({GENERATES_PROMPTS})

    def __init__(
        self,
        classes: list[int] | None = None,
        width: int = 128,
        depth: int = 2,
        sparse_tokens: int = 0,
        surrogate_weight: float = 1.0,
        surrogate_aux: bool = False,
    ) -> None:
        values = [1] if classes is None else [int(v) for v in classes]
        if not values or len(set(values)) != len(values) or min(values) < 1:
            raise ValueError(f"classes must be distinct label values >= 1, got {classes}")
        if width < 1 or depth < 0 or sparse_tokens < 0 or surrogate_weight < 0:
            raise ValueError("width must be >= 1; depth, sparse_tokens, surrogate_weight >= 0")
        super().__init__(
            init_args={
                "classes": values,
                "width": width,
                "depth": depth,
                "sparse_tokens": sparse_tokens,
                "surrogate_weight": surrogate_weight,
                "surrogate_aux": surrogate_aux,
            }
        )
        self.classes = values
        self.width, self.depth, self.sparse_tokens = width, depth, sparse_tokens
        self.surrogate_weight, self.surrogate_aux = surrogate_weight, surrogate_aux
        self._selection: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def generator(self) -> AutoSamGenerator:
        if "prompt_generator" not in self._modules:
            raise AdapterError("the AutoSAM adapter is not attached to a model yet")
        return self._modules["prompt_generator"]  # type: ignore[return-value]

    def install(self, model: SamModel) -> None:
        """Create g (+ h) for the core's embedding size and set ``model.prompt_generator``."""
        encoder = model.prompt_encoder
        generator = AutoSamGenerator(
            encoder.embed_dim,
            encoder.no_mask_embed.weight[0],
            self.classes,
            width=self.width,
            depth=self.depth,
            sparse_tokens=self.sparse_tokens,
            surrogate=self.surrogate_weight > 0,
            surrogate_aux=self.surrogate_aux,
        ).to(encoder.no_mask_embed.weight.device)
        self.add_module("prompt_generator", generator)
        model.prompt_generator = generator

    # ------------------------------------------------------------------ training
    def training_inputs(
        self, batch: Mapping[str, Any], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, PromptBatch]:
        """Keep the samples of this adapter's classes (by ``meta["object"]``, the label value) and ask
        the generator for each sample's class: no points, no boxes.

        Returns:
            images (P, 3, S, S), targets (P, 1, S, S), an empty PromptBatch with ``image_index`` (P,)
            and, for several classes, ``classes`` (P,) (indexes into ``classes``).
        """
        images, masks = batch["image"], batch["mask"]
        meta = batch.get("meta")
        lookup = {v: i for i, v in enumerate(self.classes)}
        if isinstance(meta, Mapping) and "object" in meta:
            values = [int(v) for v in torch.as_tensor(meta["object"]).reshape(-1).tolist()]
        elif len(self.classes) == 1:
            values = [self.classes[0]] * masks.shape[0]  # no metadata: every mask is the one class
        else:
            raise InputError("multi-class AutoSAM needs each sample's label value (batch['meta']['object'])")
        rows = [i for i, v in enumerate(values) if v in lookup]
        if not rows:
            raise InputError(
                f"a batch holds no object of the AutoSAM classes {self.classes} (label values "
                f"{sorted(set(values))}): set --data.labels to the same values as the adapter's classes"
            )
        if len(rows) < len(values):
            keep = torch.tensor(rows, device=masks.device)
            images, masks = images[keep], masks[keep]
        index = torch.arange(len(rows))
        classes = torch.tensor([lookup[values[i]] for i in rows], dtype=torch.long)
        self._selection = (index, classes)
        prompts = PromptBatch(image_index=index, classes=classes if len(self.classes) > 1 else None)
        return images, masks, prompts

    def simulate_prompts(self, masks: torch.Tensor, generator: torch.Generator | None = None) -> PromptBatch:
        """Prompt-free: an empty batch, mask i on image i (one class only; several classes need the
        label of each mask, see :meth:`training_inputs`)."""
        if len(self.classes) > 1:
            raise AdapterError("multi-class AutoSAM trains through training_inputs (it needs the labels)")
        index = torch.arange(masks.shape[0])
        self._selection = (index, torch.zeros_like(index))
        return PromptBatch(image_index=index)

    def loss(
        self, logits: torch.Tensor, iou_predictions: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Dice + BCE on SAM's (P, 1, h, w) mask logits against (P, 1, S, S) targets, plus
        ``surrogate_weight`` x the same loss on the surrogate head's mask of the same class."""
        terms = dice_bce_loss(logits, iou_predictions, targets)
        surrogate = self.generator.last_surrogate
        if self.surrogate_weight and surrogate is not None and self._selection is not None:
            index, classes = (t.to(surrogate.device) for t in self._selection)
            if index.shape[0] == targets.shape[0] and int(index.max()) < surrogate.shape[0]:
                rows = surrogate[index, classes][:, None]  # (P, 1, 4h, 4w)
                extra = dice_bce_loss(rows, iou_predictions, targets)["loss"]
                terms["surrogate"] = extra
                terms["loss"] = terms["loss"] + self.surrogate_weight * extra
        self._selection = None
        return terms


def prompt_free_label_maps(predictor: Any, planes: Sequence[np.ndarray], batch_size: int = 8) -> np.ndarray:
    """(N, H, W) uint16 label maps of N planes from the predictor model's AutoSAM generator
    (see :meth:`AutoSamGenerator.label_maps`)."""
    generator = getattr(predictor.model, "prompt_generator", None)
    if not isinstance(generator, AutoSamGenerator):
        raise InputError("this model has no AutoSAM prompt generator attached (--adapter DIR)")
    return generator.label_maps(predictor, planes, batch_size=batch_size)
