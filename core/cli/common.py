"""What every ``samadapt`` command shares: the one-line-error parser, model flags, predictor loading.

Every command module imports this one and nothing else from the CLI package, so the modules form a
tree (``samadapt.cli`` -> command modules -> ``common``) with no import cycles.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, NoReturn

from samadapt.errors import InputError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class PointAction(argparse.Action):
    """``--point X Y`` appends a positive point; ``--negative`` flips the last one to negative."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: Any = None
    ) -> None:
        points = list(getattr(namespace, "points", None) or [])
        if self.dest == "negative_flag":
            if not points:
                parser.error("--negative must follow a --point X Y")
            points[-1] = (points[-1][0], points[-1][1], 0)
        else:
            label = 0 if option == "--negative-point" else 1
            points.append((float(values[0]), float(values[1]), label))
        namespace.points = points


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The ``model`` argument group: checkpoint, variant, adapter, precision, device."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--checkpoint", metavar="PATH", help="weights (default: $SAMADAPT_CHECKPOINT, else LiteMedSAM)"
    )
    group.add_argument("--variant", help="expected variant (default: detected from the checkpoint)")
    group.add_argument(
        "--adapter",
        metavar="DIR",
        help="adapter checkpoint folder (from samadapt fit) to attach to the base weights",
    )
    group.add_argument("--precision", default="auto", choices=PRECISIONS)
    group.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")


def adapter_dir(args: argparse.Namespace) -> Path | None:
    """``--adapter DIR`` as a path, after checking that it is an existing folder (None: not given).

    Raises:
        InputError: the path does not exist or is not a folder.
    """
    value = getattr(args, "adapter", None)
    if not value:
        return None
    path = Path(value)
    if not path.exists():
        raise InputError(f"adapter folder not found: {path}")
    if not path.is_dir():
        raise InputError(f"--adapter must be a folder holding an adapter checkpoint, got a file: {path}")
    return path


def _adapter_kind(adapter: Any) -> str:
    """The registered type name of an adapter (``lora``, say), else its class name."""
    kind = getattr(adapter, "adapter_type", None)
    return kind if isinstance(kind, str) and kind else type(adapter).__name__


def load_predictor(args: argparse.Namespace) -> tuple[Any, str]:
    """The predictor the model flags ask for, and a line describing it (variant, source, precision).

    ``--adapter DIR`` is attached to the loaded base model (checked against its sha256) before the
    predictor is built.
    """
    from samadapt.checkpoint import load_model
    from samadapt.predictor import Predictor
    from samadapt.weights import checkpoint_sha256, resolve_checkpoint

    adapter_path = adapter_dir(args)
    source = resolve_checkpoint(args.checkpoint)
    model = load_model(source.path, variant=args.variant or source.variant)
    attached = ""
    if adapter_path is not None:
        from samadapt.adapter import load_adapter

        adapter = load_adapter(adapter_path, model, base_sha256=checkpoint_sha256(source.path))
        attached = f" + adapter {_adapter_kind(adapter)} from {adapter_path}"
    predictor = Predictor(model, device=args.device, precision=args.precision)
    return predictor, f"{model.variant} from {source.origin} at {predictor.precision}{attached}"


def is_volume_path(path: str) -> bool:
    """A folder (DICOM series) or a file name ending in one of the medical reader's suffixes."""
    from samadapt.domains.medical.io import READ_SUFFIXES

    p = Path(path)
    return p.is_dir() or any(p.name.lower().endswith(s) for s in READ_SUFFIXES)
