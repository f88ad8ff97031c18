"""What the ``samadapt`` commands share: the one-line-error parser, model flags, predictor loading,
and how 2D prompts become objects (points per box, decoding, label maps) for segment and its batch run.

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
    """``--point X Y`` appends a positive point; ``--negative`` flips the last one to negative.

    Each point goes with the ``--box`` given before it on the command line (points before the first
    ``--box`` go with the first box): ``namespace.point_boxes`` holds that box's index per point.
    """

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: Any = None
    ) -> None:
        points = list(getattr(namespace, "points", None) or [])
        owners = list(getattr(namespace, "point_boxes", None) or [])
        if self.dest == "negative_flag":
            if not points:
                parser.error("--negative must follow a --point X Y")
            points[-1] = (points[-1][0], points[-1][1], 0)
        else:
            label = 0 if option == "--negative-point" else 1
            points.append((float(values[0]), float(values[1]), label))
            owners.append(max(len(getattr(namespace, "box", None) or []) - 1, 0))
        namespace.points = points
        namespace.point_boxes = owners


def points_by_box(
    points: list[tuple[float, float, int]], owners: list[int] | None, boxes: int
) -> list[list[tuple[float, float, int]]]:
    """The points of each box (one group when there is no box), from ``PointAction``'s box indexes."""
    owners = owners if owners is not None and len(owners) == len(points) else [0] * len(points)
    groups: list[list[tuple[float, float, int]]] = [[] for _ in range(max(boxes, 1))]
    for point, owner in zip(points, owners, strict=True):
        groups[min(owner, len(groups) - 1)].append(point)
    return groups


def attachment_note(groups: list[list[tuple[float, float, int]]]) -> str | None:
    """A one-line note saying which box each point went with, when there are several boxes and points."""
    if len(groups) < 2 or not any(groups):
        return None
    parts = [f"box {n}: {len(g)}" for n, g in enumerate(groups, start=1)]
    return "note: each --point goes with the --box before it (points per box: " + ", ".join(parts) + ")"


def predict_objects(
    predictor: Any,
    objects: list[tuple[list[float] | None, list[tuple[float, float, int]]]],
    multimask: bool = False,
) -> list[Any]:
    """(H, W) bool mask per object of the predictor's current image; each object is (box, points).

    Objects without points decode together in one batch; each object with points decodes alone, so
    its points never reach another box.
    """
    import numpy as np

    masks: list[Any] = [None] * len(objects)
    plain = [n for n, (box, pts) in enumerate(objects) if box is not None and not pts]
    if plain:
        result = predictor.predict(boxes=[objects[n][0] for n in plain], multimask_output=multimask)
        best = result.scores.argmax(axis=1)
        for i, n in enumerate(plain):
            masks[n] = result.masks[i, best[i]]
    for n, (box, pts) in enumerate(objects):
        if masks[n] is not None:
            continue
        coords = np.array([[x, y] for x, y, _ in pts]) if pts else None
        labels = np.array([lab for _, _, lab in pts]) if pts else None
        result = predictor.predict(
            point_coords=coords, point_labels=labels, boxes=box, multimask_output=multimask
        )
        masks[n] = result.masks[0, int(result.scores[0].argmax())]
    return masks


def combine_masks(masks: list[Any], values: list[int] | None = None) -> Any:
    """(H, W) label map: object ``n`` gets ``values[n]`` (default n + 1); earlier objects keep overlaps."""
    import numpy as np

    values = values or list(range(1, len(masks) + 1))
    dtype = np.uint16 if max(values) > 255 else np.uint8
    combined = np.zeros(masks[0].shape, dtype=dtype)
    for value, mask in zip(values, masks, strict=True):
        combined[mask & (combined == 0)] = value
    return combined


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
    adapter = None
    if adapter_path is not None:
        from samadapt.adapter import load_adapter

        # merged where the method allows (LoRA): inference then runs plain SAM with its fast paths
        adapter = load_adapter(adapter_path, model, base_sha256=checkpoint_sha256(source.path), merge=True)
        attached = f" + adapter {_adapter_kind(adapter)} from {adapter_path}"
    predictor = Predictor(model, device=args.device, precision=args.precision, adapter=adapter)
    precision = predictor.precision
    if predictor.propagation_plan is not predictor.precision_plan:
        precision += f" (volume propagation: {predictor.propagation_plan.precision})"
    return predictor, f"{model.variant} from {source.origin} at {precision}{attached}"


def check_volume_flags(args: argparse.Namespace) -> None:
    """The volume flags every volume command shares: --preset/--window, --batch-size, --max-slices."""
    if getattr(args, "preset", None) and getattr(args, "window", None):
        raise InputError("give either --preset or --window, not both")
    batch_size = getattr(args, "batch_size", None)
    if batch_size is not None and batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    max_slices = getattr(args, "max_slices", None)
    if max_slices is not None and max_slices < 0:
        raise InputError(f"--max-slices must be 0 or more, got {max_slices}")


def check_volume_output(output: Path) -> None:
    """A segmentation volume's output path: a writable format, in a folder that exists."""
    from samadapt.domains.medical.io import WRITE_SUFFIXES

    if not any(output.name.lower().endswith(s) for s in WRITE_SUFFIXES):
        raise InputError(f"segmentation output must end in one of {', '.join(WRITE_SUFFIXES)}: {output.name}")
    if not output.parent.exists():
        raise InputError(f"output folder does not exist: {output.parent}")


def mask_generator(predictor: Any, args: argparse.Namespace) -> Any:
    """The automatic mask generator the ``--auto`` flags describe (``segment --auto``, ``geo --auto``);
    ``--crop-layers`` only where the command has it."""
    from samadapt.automatic import AutomaticMaskGenerator

    return AutomaticMaskGenerator(
        predictor,
        points_per_side=args.points_per_side,
        points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_thresh,
        stability_score_offset=args.stability_offset,
        min_mask_region_area=args.min_area,
        crop_n_layers=getattr(args, "crop_layers", 0),
        multimask_output=not args.single_mask,
    )


def is_volume_path(path: str) -> bool:
    """A folder (DICOM series) or a file name ending in one of the medical reader's suffixes."""
    from samadapt.domains.medical.io import READ_SUFFIXES

    p = Path(path)
    return p.is_dir() or any(p.name.lower().endswith(s) for s in READ_SUFFIXES)
