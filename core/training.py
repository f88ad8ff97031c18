"""One Lightning task trains every adapter; ``samadapt fit|validate|test|predict`` run it
(through :mod:`samadapt.cli.lightning_cli`).

The task loads the base checkpoint, attaches the adapter, freezes everything but the adapter's
trainable parameters, and asks the adapter for training prompts and for the loss. Checkpoints hold
only the trainable part; after ``fit`` the adapter is exported as ``adapter.safetensors`` +
``adapter.json`` (to ``--out DIR``, default ``<log dir>/adapter``).

Needs the ``train`` extra (lightning, jsonargparse, peft, monai, torchmetrics).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from samadapt.adapter import Adapter, load_adapter_weights, save_adapter, saved_adapter
from samadapt.checkpoint import load_model
from samadapt.errors import InputError
from samadapt.modeling import SamModel
from samadapt.weights import checkpoint_sha256, resolve_checkpoint


def load_base(base: str, variant: str | None = None) -> tuple[SamModel, str, str]:
    """``default`` (the bundled LiteMedSAM) or a checkpoint path -> (model, sha256, file name)."""
    source = resolve_checkpoint(None if base in ("", "default") else base)
    model = load_model(source.path, variant=variant or source.variant)
    return model, checkpoint_sha256(source.path), source.path.name


def _to_target_size(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(P, 1, s, s) or (P, 1, d, s, s) logits resized (bi/trilinear) to the targets' spatial size."""
    if logits.shape[2:] == masks.shape[2:]:
        return logits
    mode = "bilinear" if logits.ndim == 4 else "trilinear"
    return nn.functional.interpolate(logits, size=masks.shape[2:], mode=mode, align_corners=False)


def _dice_and_iou(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample Dice and IoU of (P, 1, S, S) or (P, 1, D, S, S) logits (> 0) against {0, 1} targets."""
    pred = (logits > 0).flatten(1)
    truth = (targets > 0.5).flatten(1)
    inter = (pred & truth).sum(1).float()
    sizes = pred.sum(1).float() + truth.sum(1).float()
    dice = torch.where(sizes > 0, 2 * inter / sizes.clamp(min=1), torch.ones_like(sizes))
    union = (pred | truth).sum(1).float()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return dice, iou


class SamTask(L.LightningModule):
    """Fine-tunes a SAM core through any :class:`~samadapt.adapter.Adapter`.

    Args:
        adapter: the adapter (``class_path``/``init_args`` in a recipe). With ``init_from`` the saved
            adapter's own type and init_args are used (a different configured one is replaced, with a
            note on stderr), so a recipe evaluates any trained adapter with ``--model.init_from`` alone.
        base: base checkpoint path, or ``default`` for the bundled LiteMedSAM.
        variant: expected variant of the base (default: detected).
        input_size: run a ViT base at another input size (e.g. 512 as SAMed); None keeps it.
        lr, weight_decay: AdamW settings (MedSAM: 1e-4, 0.01).
        activation_checkpointing: recompute encoder blocks in backward (less memory, slower).
        init_from: an adapter folder (``adapter.safetensors`` + ``adapter.json``) of the same adapter
            type and base whose weights start the adapter: to validate, test or predict with a trained
            adapter, or to continue training it.
    """

    def __init__(
        self,
        adapter: Adapter | None = None,
        base: str = "default",
        variant: str | None = None,
        input_size: int | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        activation_checkpointing: bool = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["adapter"])
        self.model, self.base_sha256, self.base_name = load_base(base, variant)
        if input_size is not None and input_size != self.model.input_size:
            self.model.set_input_size(input_size)
        self.model.train()  # load_model returns eval mode; Lightning keeps each module's mode as found
        if init_from:
            saved = saved_adapter(init_from)
            if adapter is not None and (adapter.adapter_type, adapter.init_args) != (
                saved.adapter_type,
                saved.init_args,
            ):
                print(
                    f"init_from {init_from}: its {saved.adapter_type} adapter {saved.init_args}, as trained, "
                    f"replaces the configured {adapter.adapter_type} {adapter.init_args}",
                    file=sys.stderr,
                )
            adapter = saved
        if adapter is None:
            raise InputError("no adapter: give --model.adapter (a class_path) or --model.init_from DIR")
        self.adapter = adapter
        adapter.attach(self.model)
        if init_from:
            load_adapter_weights(init_from, adapter, self.model, base_sha256=self.base_sha256)
        adapter.freeze_base(self.model)
        if activation_checkpointing:
            if not hasattr(self.model.image_encoder, "activation_checkpointing"):
                raise InputError(f"{self.model.variant}: this encoder has no activation checkpointing switch")
            setattr(self.model.image_encoder, "activation_checkpointing", True)  # noqa: B010
        self.strict_loading = False  # checkpoints hold only the trainable part; the base comes from `base`
        self._started = 0.0

    @property
    def profile(self):
        """The base checkpoint's preprocessing profile; the data module prepares images with it."""
        return self.model.profile

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> SamTask:
        """Training mode, except frozen BatchNorm layers keep their running statistics (eval)."""
        super().train(mode)
        if mode:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters()
                ):
                    module.eval()
        return self

    def parameter_report(self) -> str:
        counts = self.adapter.parameter_counts(self.model)
        groups = ", ".join(
            f"{name} {value:,}" for name, value in counts.items() if name not in ("trainable", "frozen")
        )
        return (
            f"{self.adapter.adapter_type} adapter on {self.model.variant} ({self.base_name}): "
            f"trainable parameters {counts['trainable']:,} ({groups}); frozen {counts['frozen']:,}"
        )

    def on_fit_start(self) -> None:
        self._started = time.perf_counter()
        if self.trainer.is_global_zero:
            print(self.parameter_report(), flush=True)

    # ------------------------------------------------------------------ steps
    def _forward(self, batch: dict[str, Any], generator: torch.Generator | None = None):
        return self.adapter.training_forward(self.model, batch, generator)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits, iou, masks = self._forward(batch)
        terms = self.adapter.loss(logits, iou, masks)
        size = masks.shape[0]
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=size)
        for name, value in terms.items():
            if name != "loss":
                self.log(f"train/{name}", value, batch_size=size)
        return terms["loss"]

    def _evaluate(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        generator = torch.Generator().manual_seed(batch_idx)  # the same prompts every epoch
        logits, iou, masks = self._forward(batch, generator)
        terms = self.adapter.loss(logits, iou, masks)
        full = _to_target_size(logits, masks)
        dice, jaccard = _dice_and_iou(full, masks)
        size = masks.shape[0]
        self.log(f"{stage}/loss", terms["loss"], batch_size=size, sync_dist=True)
        self.log(f"{stage}/dice", dice.mean(), prog_bar=True, batch_size=size, sync_dist=True)
        self.log(f"{stage}/iou", jaccard.mean(), batch_size=size, sync_dist=True)
        self.adapter.evaluation_update(batch)

    def _log_adapter_metrics(self, stage: str) -> None:
        for name, value in self.adapter.evaluation_compute().items():  # synced by the adapter's metric
            self.log(f"{stage}/{name}", value)

    def on_validation_epoch_end(self) -> None:
        self._log_adapter_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_adapter_metrics("test")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        """Masks and predicted IoUs of a batch of images with prompts (a dict of tensors).

        Any other batch (e.g. a list of jobs naming GeoTIFFs of any size) is returned untouched: a huge
        raster's tiles stream in and out of the model window by window, so that per-raster pass lives in
        the data module's prediction writer, which calls ``self.model`` itself.
        """
        if not isinstance(batch, dict):
            return batch
        generator = torch.Generator().manual_seed(batch_idx)
        logits, iou, masks = self._forward(batch, generator)
        full = _to_target_size(logits, masks)
        return {"masks": full > 0, "iou_predictions": iou, "meta": batch.get("meta")}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.adapter.trainable_parameters(self.model).values() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])

    # ------------------------------------------------------------------ checkpoints and export
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only what training changes; the frozen base is reloaded from ``base``."""
        keep = {f"model.{k}" for k, _ in self._trainable_state_names()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def _trainable_state_names(self) -> list[tuple[str, torch.Tensor]]:
        trainable = {id(p) for p in self.adapter.trainable_parameters(self.model).values()}
        names: list[tuple[str, torch.Tensor]] = [
            (k, p) for k, p in self.model.named_parameters() if id(p) in trainable
        ]
        for role in self.adapter.unfreeze:
            names += [(f"{role}.{k}", b) for k, b in getattr(self.model, role).named_buffers()]
        return names

    def export(self, directory: str | Path, training: dict[str, Any]) -> Path:
        """Write the adapter-only checkpoint of the current weights."""
        return save_adapter(
            directory,
            self.adapter,
            self.model,
            base_sha256=self.base_sha256,
            base_name=self.base_name,
            training=training,
        )


class AdapterCheckpoint(ModelCheckpoint):
    """Best (by validation Dice) and last checkpoints; without validation only the last one."""

    def __init__(self, monitor: str = "val/dice", mode: str = "max", save_last: bool = True, **kwargs: Any):
        super().__init__(monitor=monitor, mode=mode, save_last=save_last, **kwargs)

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        if self.monitor is not None and self.monitor not in monitor_candidates:
            return  # no validation data: nothing to rank by
        super()._save_topk_checkpoint(trainer, monitor_candidates)
