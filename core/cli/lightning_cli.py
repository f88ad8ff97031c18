"""LightningCLI behind ``samadapt fit|validate|test|predict``: the task, the data module, ``--out``.

Imported only when a training command runs (it pulls in Lightning).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from samadapt.domains.segmentation_data import SegmentationDataModule
from samadapt.errors import InputError, SamadaptError
from samadapt.training import AdapterCheckpoint, SamTask

COMMANDS = ("fit", "validate", "test", "predict")


class SamadaptCLI(LightningCLI):
    """LightningCLI with ``--out DIR`` and the adapter export after ``fit``."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--out", default=None, help="folder for the trained adapter (after fit)")

    def after_predict(self) -> None:
        """Count what prediction writers could not write (a callback's ``failed`` list); ``main`` exits 1."""
        callbacks: list[Any] = getattr(self.trainer, "callbacks", [])
        self.failed_outputs = sum(len(getattr(cb, "failed", None) or []) for cb in callbacks)

    def after_fit(self) -> None:
        trainer, task = self.trainer, self.model
        assert isinstance(task, SamTask)
        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "") if callback is not None else ""
        chosen = "last"
        if best and Path(best).is_file():
            try:
                state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            except Exception as exc:  # an unreadable best checkpoint: keep the last weights, say so
                print(f"note: could not read the best checkpoint {best} ({exc}); exporting the last weights")
            else:
                task.load_state_dict(state, strict=False)
                chosen = f"best ({Path(best).name})"
        if not trainer.is_global_zero:
            return
        out = self.config[self.subcommand].get("out")
        if out is None:
            if getattr(trainer, "fast_dev_run", False) or trainer.log_dir is None:
                print("no adapter written (fast_dev_run or no log directory; pass --out DIR to keep it)")
                return
            out = Path(trainer.log_dir) / "adapter"
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v)}
        summary = {
            "steps": trainer.global_step,
            "epochs": trainer.current_epoch,
            "weights": chosen,
            "seconds": round(time.perf_counter() - task._started, 1),
            "metrics": metrics,
            "world_size": trainer.world_size,
            "data_root": str(getattr(self.datamodule, "root", "") or ""),
        }
        path = task.export(out, summary)
        print(f"adapter written to {path} ({chosen} weights; {task.parameter_report()})")


def packaged_recipe(value: str) -> str:
    """A ``--config`` value that names a recipe shipped in samadapt (``recipes/lora/litemedsam.yaml`` or
    ``lora/litemedsam.yaml``) resolves to the installed file when no such file exists here."""
    if Path(value).exists():
        return value
    from importlib import resources

    relative = value.removeprefix("recipes/")
    candidate = resources.files("samadapt.recipes").joinpath(relative)
    return str(candidate) if candidate.is_file() else value


def _resolve_configs(argv: Sequence[str]) -> list[str]:
    resolved = list(argv)
    for i, arg in enumerate(resolved):
        if arg == "--config" and i + 1 < len(resolved):
            resolved[i + 1] = packaged_recipe(resolved[i + 1])
        elif arg.startswith("--config="):
            resolved[i] = "--config=" + packaged_recipe(arg.partition("=")[2])
    return resolved


def _names_data_class(argv: Sequence[str]) -> bool:
    """Whether the configs or arguments name the data module (``data: {class_path: ...}``), as the
    volumetric recipes do; the 2D recipes give ``SegmentationDataModule``'s arguments directly."""
    import yaml

    for i, arg in enumerate(argv):
        if arg.startswith(("--data.class_path", "--data=")) or (arg == "--data" and i + 1 < len(argv)):
            return True
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None
        if arg.startswith("--config="):
            path = arg.partition("=")[2]
        if path and Path(path).is_file():
            try:
                config = yaml.safe_load(Path(path).read_text())
            except (OSError, yaml.YAMLError):
                continue  # LightningCLI reports unreadable configs itself
            data = config.get("data") if isinstance(config, dict) else None
            if isinstance(data, dict) and "class_path" in data:
                return True
    return False


def main(command: str, argv: Sequence[str]) -> int:
    """Run ``samadapt <command> ARGS`` (fit, validate, test, predict) through LightningCLI."""
    if command not in COMMANDS:
        raise InputError(f"unknown training command {command!r}; choose from {', '.join(COMMANDS)}")
    try:
        resolved = _resolve_configs(argv)
        args = [command, *resolved]
        subclass_data = _names_data_class(resolved)
        cli = SamadaptCLI(
            SamTask,
            LightningDataModule if subclass_data else SegmentationDataModule,
            subclass_mode_data=subclass_data,
            # from the console script sys.argv already holds these (and DDP relaunches from sys.argv)
            args=None if sys.argv[1:] == args else args,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [AdapterCheckpoint()]},
        )
    except SamadaptError as exc:
        print(f"samadapt {command}: error: {exc}", file=sys.stderr)
        return 1
    failed = int(getattr(cli, "failed_outputs", 0))
    if failed:
        print(
            f"samadapt {command}: {failed} input(s) failed (see above); the others were written",
            file=sys.stderr,
        )
        return 1
    return 0
