"""RsPrompter (Chen et al., TGRS 2024): SAM made class-aware and prompt-free for remote-sensing instances.

A prompter learns to turn SAM's intermediate encoder features into *sparse prompt sets*, one per object,
each with a class; SAM's mask decoder turns each set into the object's mask. Two adapters:

- ``rsprompter_query`` (:class:`RsPrompterQuery`): Q learned queries attend to the aggregated features
  (a transformer encoder + decoder, as the reference's ``lightning`` query prompter); each query gives
  ``C + 1`` class logits (the last: no object) and K prompt tokens. Training matches queries to objects
  with the Hungarian algorithm (cost 2 x class + 5 x sigmoid CE + 5 x Dice, as the reference) and
  optimises class CE (no-object weight 0.1) + mask BCE + Dice on the matched queries.
- ``rsprompter_anchor`` (:class:`~samadapt.adapters.rsprompter_anchor.RsPrompterAnchor`, in its own module):
  anchors on the aggregated map give class scores and boxes; each box (proposal) is RoI-aligned and turned
  into K prompt tokens; SAM decodes one mask per box.

Both read every other encoder block through :class:`~samadapt.adapters.rsprompter_heads.FeatureAggregator`
(1x1 + 3x3 down-convolutions, recurrent residual fusion, a fusion head to the embedding width).

Simplified against the reference (``KyanChen/RSPrompter``, research notes §1):

- aggregator: GroupNorm instead of BatchNorm; features resized to the embedding grid (TinyViT stages have
  other sides); one output map, no simple-FPN pyramid.
- query: no Mask2Former pixel decoder, no masked attention and no "plus" mask (so the dense prompt is SAM's
  ``no_mask_embed``, and matching runs on SAM's own masks); no deep supervision; losses on the whole
  low-resolution mask instead of 12,544 importance-sampled points.
- anchor: not a two-stage Mask R-CNN: one anchor head on the single aggregated map does both the RPN's and
  the box head's jobs (class logits with background + box deltas; max-IoU assignment 0.5 / 0.4 with a
  forced best anchor per object, 256 sampled anchors, 50% positive); the ground-truth boxes are always among
  the training RoIs (as Mask R-CNN adds them to its proposals). With ``box_prompt`` (default) each RoI's
  box is also given to SAM as a box prompt next to the K learned tokens, which converges in a few hundred
  steps on CPUs; ``box_prompt: false`` is the reference (learned tokens only).
- both: scores are class probabilities (query: times the mean mask probability inside the mask, as
  Mask2Former); no IoU-head training.

Trainable: the aggregator and the prompter (``own_parameters``) plus, by default, SAM's mask decoder
(``unfreeze: [mask_decoder]``, as the reference's ``release`` branch; ``[]`` freezes all of SAM as its
``lightning`` branch). The image encoder stays frozen.

Training batches (from :class:`samadapt.domains.remote_sensing.instances.InstanceDataModule`): ``image``
(B, 3, S, S), ``instances`` (B, M, S, S) {0, 1} padded with empty masks, ``instance_classes`` (B, M) long
class indexes (-1: padding). A batch with only ``mask`` (B, 1, S, S) counts each mask as one object of
class 0.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from samadapt.adapter import GENERATES_PROMPTS, REPLACES_DECODER, Adapter, AdapterError, register_adapter
from samadapt.adapters.rsprompter_heads import (
    FeatureAggregator,
    QueryPrompter,
    layer_specs,
)
from samadapt.adapters.rsprompter_matching import (
    MaskAP,
    classification_loss,
    hungarian_match,
    iou_loss,
    mask_losses,
    match_cost,
)
from samadapt.errors import InputError
from samadapt.modeling import EncoderOutput, PromptBatch, SamModel

Instances = list[tuple[torch.Tensor, torch.Tensor]]  # per image: masks (M, S, S) bool, classes (M,)


def batch_instances(batch: Mapping[str, Any]) -> Instances:
    """Per image of a batch: (masks (M, S, S) bool, classes (M,) long), padding dropped."""
    if "instances" in batch:
        masks, classes = batch["instances"], batch["instance_classes"]
        return [(masks[b][classes[b] >= 0] > 0.5, classes[b][classes[b] >= 0]) for b in range(masks.shape[0])]
    found = []
    for mask in batch["mask"]:  # (1, S, S) each: one object of class 0 when not empty
        present = mask > 0.5
        keep = present.flatten(1).any(1)
        found.append((present[keep], torch.zeros(int(keep.sum()), dtype=torch.long, device=mask.device)))
    return found


class _Generator(nn.Module):
    """The aggregator and a prompter, reading their encoder features from the model's feature list."""

    def __init__(
        self, model: SamModel, indexes: Sequence[int], aggregator: FeatureAggregator, head: nn.Module
    ):
        super().__init__()
        self.aggregator, self.head = aggregator, head
        self.indexes = tuple(int(i) for i in indexes)
        self._model = weakref.ref(model)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_model"] = None
        return state

    def aggregate(self, encoded: EncoderOutput) -> torch.Tensor:
        """Encoder output -> (B, E, h, w) aggregated map on the embedding grid."""
        model = self._model() if self._model is not None else None
        order = model.feature_indexes if model is not None else tuple(sorted(set(self.indexes)))
        if len(encoded.features) != len(order):
            raise AdapterError(
                f"RsPrompter needs encoder features {self.indexes}; got {len(encoded.features)}"
            )
        feats = [encoded.features[order.index(i)] for i in self.indexes]
        dtype = next(self.aggregator.parameters()).dtype
        grid = (int(encoded.embedding.shape[-2]), int(encoded.embedding.shape[-1]))
        return self.aggregator([f.to(dtype) for f in feats], grid)


class _QueryGenerator(_Generator):
    """Prompt-free decoding through the core: every query is one "class" of a multi-class generator."""

    def run(self, encoded: EncoderOutput, pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> class logits (B, Q, C + 1), tokens (B, Q, K, E)."""
        return self.head(self.aggregate(encoded), pe.to(next(self.head.parameters()).dtype))

    def forward(self, encoded: EncoderOutput) -> tuple[torch.Tensor, torch.Tensor]:
        model = self._model() if self._model is not None else None
        if model is None:
            raise AdapterError("the RsPrompter generator lost its model")
        _, tokens = self.run(encoded, model.prompt_encoder.get_dense_pe())
        batch, queries = tokens.shape[:2]
        nomask = model.prompt_encoder.no_mask_embed.weight.reshape(1, 1, -1, 1, 1)
        grid = encoded.embedding.shape[-2:]
        return tokens, nomask.expand(batch, queries, -1, *grid)  # (B, Q, K, E), (B, Q, E, h, w)


class RsPrompterBase(Adapter):
    """What both variants share: the aggregator, decoding prompt sets, mask AP, instance prediction."""

    capabilities = frozenset({GENERATES_PROMPTS, REPLACES_DECODER})

    def __init__(
        self, *, num_classes: int, layers: list[int] | None, unfreeze: Sequence[str], init_args: dict
    ):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        super().__init__(unfreeze=unfreeze, init_args=init_args)
        self.num_classes = num_classes
        self.layers = None if layers is None else [int(i) for i in layers]
        self.generator: _Generator | None = None
        self._ap = MaskAP()
        self._pending: tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]] | None = None
        self._stash: Any = None

    def _instances(self, batch: Mapping[str, Any]) -> Instances:
        """:func:`batch_instances`, checked against this adapter's classes."""
        found = batch_instances(batch)
        for _, classes in found:
            if len(classes) and int(classes.max()) >= self.num_classes:
                raise InputError(
                    f"an object of class index {int(classes.max())} reached a {self.adapter_type} adapter "
                    f"with num_classes {self.num_classes}: set --data.init_args.classes to its classes"
                )
        return found

    def _specs(self, model: SamModel):
        specs = layer_specs(model.image_encoder, self.layers)
        model.require_features([s.index for s in specs])
        return specs

    def _gen(self) -> _Generator:
        if self.generator is None:
            raise AdapterError(f"the {self.adapter_type} adapter is not attached to a model yet")
        return self.generator

    def simulate_prompts(self, masks: torch.Tensor, generator: torch.Generator | None = None) -> PromptBatch:
        raise AdapterError("RsPrompter generates its own prompts (training_forward), it simulates none")

    def training_forward(
        self, model: SamModel, batch: Mapping[str, Any], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode ``batch["image"]`` (the frozen encoder), then :meth:`forward_encoded`."""
        return self.forward_encoded(model, model.encode(batch["image"]), batch, generator)

    def forward_encoded(
        self,
        model: SamModel,
        encoded: EncoderOutput,
        batch: Mapping[str, Any],
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (P, 1, 4h, 4w), IoU (P, 1), targets (P, 1, S, S)) from already encoded images (a
        frozen encoder's outputs may be cached, e.g. by a benchmark); sets what :meth:`loss` reads."""
        raise NotImplementedError

    @staticmethod
    def _decode(
        model: SamModel, encoded: EncoderOutput, image_index: torch.Tensor, sparse: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's decoder on P prompt sets (P, N, E) of images ``image_index`` (P,): (P, 1, 4h, 4w), (P, 1)."""
        per = encoded if encoded.embedding.shape[0] == 1 else encoded.select(image_index)
        nomask = model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = nomask.expand(sparse.shape[0], -1, *encoded.embedding.shape[-2:])
        return model.decode_embeddings(per.embedding, sparse, dense, features=per.features)

    # ------------------------------------------------------------------ metrics
    def _keep_for_ap(self, predictions: list[dict[str, torch.Tensor]], instances: Instances) -> None:
        targets = [{"masks": m.bool(), "labels": c} for m, c in instances]
        self._pending = (predictions, targets)

    def evaluation_update(self, batch: Mapping[str, Any]) -> None:
        """Add the predictions of the latest evaluation forward to the mask AP."""
        if self._pending is not None:
            self._ap.update(*self._pending)
            self._pending = None

    def evaluation_compute(self) -> dict[str, torch.Tensor]:
        """``map``, ``map_50``, ``map_75``: COCO mask AP (torchmetrics ``MeanAveragePrecision``)."""
        return self._ap.compute()

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict_instances(self, model: SamModel, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Instances of (B, 3, S, S) preprocessed images: per image ``masks`` (N, S, S) bool (encoder
        frame), ``scores`` (N,), ``labels`` (N,) class indexes."""
        return self._predict(model, model.encode(images), images.shape[-1])

    @torch.no_grad()
    def predict_encoded(
        self, model: SamModel, encoded: EncoderOutput, size: int
    ) -> list[dict[str, torch.Tensor]]:
        """:meth:`predict_instances` from already encoded images (a cached embedding with the features the
        aggregator reads), ``size`` the encoder's input side S."""
        return self._predict(model, encoded, size)

    def _predict(self, model: SamModel, encoded: EncoderOutput, size: int) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError


@register_adapter("rsprompter_query")
class RsPrompterQuery(RsPrompterBase):
    """RsPrompter-query: learned queries -> Q prompt sets with classes; Hungarian-matched training.

    Args:
        num_classes: C object classes (class indexes 0..C-1 in the data).
        num_queries: Q prompt sets per image (reference: 100 WHU, 70 NWPU, 30 SSDD); at least the most
            objects a tile holds.
        tokens: K sparse prompt tokens per query (reference ``lightning``: 4).
        layers: encoder blocks/stages the aggregator reads (None: every other ViT block, TinyViT stages 0-3).
        hidden: aggregator width (reference: 32).
        encoder_layers, decoder_layers, heads: the query transformer (reference ``lightning``: 1, 4, 8).
        class_weight, bce_weight, dice_weight: loss and matching weights (reference: 2, 5, 5).
        no_object_weight: CE weight of the no-object class (0.1).
        iou_weight: MSE between SAM's IoU head and each matched mask's IoU (not in the reference; it
            trains the IoU head of the unfrozen decoder, which would otherwise get no gradient).
        score_threshold: predictions below it are dropped by :meth:`predict_instances`.
        unfreeze: core roles trained too (default the mask decoder, as the reference's release branch).
    """

    def __init__(
        self,
        num_classes: int = 1,
        num_queries: int = 30,
        tokens: int = 4,
        layers: list[int] | None = None,
        hidden: int = 32,
        encoder_layers: int = 1,
        decoder_layers: int = 4,
        heads: int = 8,
        class_weight: float = 2.0,
        bce_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        iou_weight: float = 1.0,
        score_threshold: float = 0.3,
        unfreeze: list[str] | None = None,
    ) -> None:
        if num_queries < 1 or tokens < 1 or hidden < 1:
            raise ValueError("num_queries, tokens and hidden must be >= 1")
        roles = ["mask_decoder"] if unfreeze is None else list(unfreeze)
        args = {
            "num_classes": num_classes, "num_queries": num_queries, "tokens": tokens, "layers": layers,
            "hidden": hidden, "encoder_layers": encoder_layers, "decoder_layers": decoder_layers,
            "heads": heads, "class_weight": class_weight, "bce_weight": bce_weight,
            "dice_weight": dice_weight, "no_object_weight": no_object_weight, "iou_weight": iou_weight,
            "score_threshold": score_threshold, "unfreeze": roles,
        }  # fmt: skip
        super().__init__(num_classes=num_classes, layers=layers, unfreeze=roles, init_args=args)
        self.num_queries, self.tokens, self.hidden = num_queries, tokens, hidden
        self.encoder_layers, self.decoder_layers, self.heads = encoder_layers, decoder_layers, heads
        self.weights = (class_weight, bce_weight, dice_weight)
        self.no_object_weight, self.score_threshold = no_object_weight, score_threshold
        self.iou_weight = iou_weight

    def install(self, model: SamModel) -> None:
        """Create the aggregator and the query prompter; set ``model.prompt_generator`` (prompt-free
        decoding through the core gives one mask per query)."""
        specs = self._specs(model)
        dim = model.prompt_encoder.embed_dim
        aggregator = FeatureAggregator(specs, dim, self.hidden)
        head = QueryPrompter(
            dim, self.num_queries, self.num_classes, self.tokens, self.heads, self.encoder_layers,
            self.decoder_layers,
        )  # fmt: skip
        generator = _QueryGenerator(model, [s.index for s in specs], aggregator, head)
        self.generator = generator.to(next(model.parameters()).device)
        model.prompt_generator = self.generator

    def _run(
        self, model: SamModel, encoded: EncoderOutput
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> class logits (B, Q, C + 1), mask logits (B, Q, 4h, 4w), IoU predictions (B, Q)."""
        gen = self._gen()
        assert isinstance(gen, _QueryGenerator)
        class_logits, tokens = gen.run(encoded, model.prompt_encoder.get_dense_pe())
        batch, queries, k, dim = tokens.shape
        index = torch.arange(batch, device=tokens.device).repeat_interleave(queries)
        logits, iou = self._decode(model, encoded, index, tokens.reshape(batch * queries, k, dim))
        return class_logits, logits.view(batch, queries, *logits.shape[-2:]), iou.view(batch, queries)

    def forward_encoded(
        self,
        model: SamModel,
        encoded: EncoderOutput,
        batch: Mapping[str, Any],
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode all Q queries of each image, match them to the objects; return the matched rows:
        logits (P, 1, 4h, 4w), IoU (P, 1), targets (P, 1, S, S), P = matched objects in the batch."""
        images = batch["image"]
        instances = self._instances(batch)
        class_logits, logits, iou = self._run(model, encoded)
        low = logits.shape[-2:]
        rows, targets, matches = [], [], []
        for b, (masks, classes) in enumerate(instances):
            small = (
                F.interpolate(masks[:, None].float(), size=low, mode="area")[:, 0] if len(masks) else masks
            )
            with torch.no_grad():
                cost = match_cost(class_logits[b].float(), logits[b].float(), classes, small, self.weights)
            q, m = hungarian_match(cost)
            matches.append((q, classes[m.to(classes.device)]))
            rows.append(q.to(logits.device) + b * logits.shape[1])
            targets.append(masks[m.to(masks.device)].float())
        index = torch.cat(rows)
        self._stash = (class_logits, matches)
        if not self.training:
            self._keep_for_ap(self._postprocess(class_logits, logits, images.shape[-1], 0.0), instances)
        flat = logits.reshape(-1, 1, *low)
        target = torch.cat(targets)[:, None] if targets else images.new_zeros(0, 1, *images.shape[-2:])
        return flat[index], iou.reshape(-1, 1)[index], target

    def loss(
        self, logits: torch.Tensor, iou_predictions: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """class CE over all queries (unmatched: no object) + BCE + Dice on the matched masks."""
        stash, self._stash = self._stash, None
        if stash is None:
            raise AdapterError("RsPrompter loss needs training_forward first")
        class_logits, matches = stash
        cls = torch.stack(
            [
                classification_loss(class_logits[b], q, c, self.no_object_weight)
                for b, (q, c) in enumerate(matches)
            ]
        ).mean()
        bce, dice = mask_losses(logits, targets)
        iou = iou_loss(logits, iou_predictions, targets)
        w_cls, w_bce, w_dice = self.weights
        total = w_cls * cls + w_bce * bce + w_dice * dice + self.iou_weight * iou
        return {
            "loss": total, "class": cls.detach(), "bce": bce.detach(), "dice_loss": dice.detach(),
            "iou_mse": iou.detach(),
        }  # fmt: skip

    def _postprocess(
        self, class_logits: torch.Tensor, logits: torch.Tensor, size: int, threshold: float
    ) -> list[dict[str, torch.Tensor]]:
        out = []
        probs = class_logits.float().softmax(-1)[..., :-1]  # (B, Q, C)
        for b in range(logits.shape[0]):
            full = F.interpolate(
                logits[b][:, None].float(), size=(size, size), mode="bilinear", align_corners=False
            )
            masks = full[:, 0] > 0  # (Q, S, S)
            mask_prob = (full[:, 0].sigmoid() * masks).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp(
                min=1
            )
            score, label = probs[b].max(-1)
            score = score * mask_prob
            keep = (score > threshold) & masks.flatten(1).any(1)
            out.append({"masks": masks[keep], "scores": score[keep], "labels": label[keep]})
        return out

    def _predict(self, model: SamModel, encoded: EncoderOutput, size: int) -> list[dict[str, torch.Tensor]]:
        class_logits, logits, _ = self._run(model, encoded)
        return self._postprocess(class_logits, logits, size, self.score_threshold)


__all__ = ["RsPrompterBase", "RsPrompterQuery", "batch_instances"]
