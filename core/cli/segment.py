"""``samadapt segment``: a 2D image here; a volume (file or DICOM folder) goes to :mod:`.volume`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from samadapt.cli.automatic import add_auto_args
from samadapt.cli.common import (
    PointAction,
    adapter_dir,
    add_model_args,
    attachment_note,
    combine_masks,
    is_volume_path,
    load_predictor,
    points_by_box,
    predict_objects,
)
from samadapt.errors import InputError


def register(sub: Any) -> None:
    """Add the ``segment`` parser (2D and volume flags) to the sub-parsers ``sub``."""
    seg = sub.add_parser("segment", help="segment a 2D image (PNG/JPEG/TIFF) or a volume from a prompt")
    seg.add_argument(
        "input",
        nargs="?",
        help="image file, volume file (.nii/.nii.gz/.nrrd/.nhdr/.mha/.mhd) or DICOM folder "
        "(or none, with --prompts)",
    )
    seg.add_argument(
        "--prompts",
        metavar="FILE",
        help="manifest (.csv or .json) of many cases, one row per object; -o is then an output folder",
    )
    seg.add_argument("--box", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"), action="append")
    seg.add_argument(
        "--point",
        nargs=2,
        type=float,
        metavar=("X", "Y"),
        action=PointAction,
        dest="points",
        help="a foreground point; it goes with the --box given before it (else the first box)",
    )
    seg.add_argument(
        "--negative", nargs=0, action=PointAction, dest="negative_flag", help="last point is negative"
    )
    seg.add_argument(
        "--negative-point", nargs=2, type=float, metavar=("X", "Y"), action=PointAction, dest="points"
    )
    seg.add_argument("--multimask", action="store_true", help="2D: keep the best of three candidate masks")
    seg.add_argument(
        "-o",
        "--output",
        required=True,
        help="mask file (.png/.tif) or segmentation volume; with --prompts, the output folder",
    )
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
    vol.add_argument(
        "--stop",
        choices=("auto", "vanish"),
        default="auto",
        help="where propagation ends: auto (default: when the mask's predicted IoU, box contact or overlap "
        "with the previous slice says the object ended) or vanish (only when the mask is empty)",
    )
    vol.add_argument("--max-slices", type=int, metavar="N", help="propagate at most N slices each way")
    vol.add_argument(
        "--verbose", action="store_true", help="print every visited slice's stop signals, and why it stopped"
    )
    vol.add_argument(
        "--report", metavar="FILE.json", help="write every visited slice's stop signals per object as JSON"
    )
    add_auto_args(seg)
    add_model_args(seg)


def run(args: argparse.Namespace) -> int:
    """Segment ``args.input``: a volume path goes to the volume command, anything else is a 2D image.

    ``--prompts FILE`` runs every case of a manifest instead (:mod:`samadapt.cli.batch`); ``--auto``
    segments everything without a prompt (:mod:`samadapt.cli.automatic`).
    """
    adapter_dir(args)  # a wrong --adapter fails before any file is read
    if getattr(args, "auto", False):
        from samadapt.cli.automatic import segment_auto

        return segment_auto(args)
    if getattr(args, "prompts", None):
        from samadapt.cli.batch import segment_manifest

        return segment_manifest(args)
    if not args.input:
        raise InputError("give an input image or volume, or --prompts FILE.csv|FILE.json for many cases")
    if is_volume_path(args.input):
        from samadapt.cli.volume import segment_volume

        return segment_volume(args)
    return segment_2d(args)


def segment_2d(args: argparse.Namespace) -> int:
    """Segment a 2D image from boxes and/or points; several boxes make a label map (1, 2, ...)."""
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
    boxes: list[list[float]] = [list(b) for b in (args.box or [])]
    groups = points_by_box(points, getattr(args, "point_boxes", None), len(boxes))
    objects = [(boxes[n] if boxes else None, group) for n, group in enumerate(groups)]
    height, width = image.shape[:2]
    if boxes:
        predictor.check_boxes(np.array(boxes), (height, width))  # validate before the slow encoder
    if points:
        predictor.check_points(np.array([[x, y] for x, y, _ in points]), (height, width))
    note = attachment_note(groups) if points else None
    if note:
        print(note)
    predictor.set_image(image)
    masks = predict_objects(predictor, objects, multimask=args.multimask)
    combined: np.ndarray = masks[0] if len(masks) == 1 else combine_masks(masks)
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
