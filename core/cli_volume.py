"""``samadapt segment VOLUME`` and ``samadapt evaluate``: the medical-volume side of the CLI."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from samadapt.errors import InputError


def _world_to_voxel(affine: np.ndarray, axis: int, x: float, y: float, s: float) -> np.ndarray:
    """RAS mm -> IJK, where x, y, s are the world coordinates along the voxel axes' dominant directions."""
    in_plane = [a for a in range(3) if a != axis]
    dominant = np.abs(affine[:3, :3]).argmax(axis=0)  # world component that each voxel axis follows most
    if len(set(dominant.tolist())) != 3:
        raise InputError("--mm needs a volume whose voxel axes follow distinct world axes")
    world = np.zeros(3)
    world[dominant[in_plane[0]]], world[dominant[in_plane[1]]], world[dominant[axis]] = x, y, s
    return (np.linalg.inv(affine) @ np.append(world, 1.0))[:3]


def _prompts(args: argparse.Namespace, volume: Any, axis_name: str) -> tuple[int, list[Any]]:
    from samadapt.domains.medical.propagation import AXES, SlicePrompt, plane_size, slice_count

    axis = AXES[axis_name]
    in_plane = [a for a in range(3) if a != axis]
    boxes = [list(b) for b in (args.box or [])]
    points = list(args.points or [])
    slice_value = args.slice
    if args.mm:
        if slice_value is None:
            raise InputError("--mm needs --slice given in mm too")
        for box in boxes:
            a = _world_to_voxel(volume.affine, axis, box[0], box[1], slice_value)
            b = _world_to_voxel(volume.affine, axis, box[2], box[3], slice_value)
            box[:] = [
                min(a[in_plane[0]], b[in_plane[0]]),
                min(a[in_plane[1]], b[in_plane[1]]),
                max(a[in_plane[0]], b[in_plane[0]]),
                max(a[in_plane[1]], b[in_plane[1]]),
            ]
        converted = []
        for x, y, label in points:
            v = _world_to_voxel(volume.affine, axis, x, y, slice_value)
            converted.append((float(v[in_plane[0]]), float(v[in_plane[1]]), label))
        points = converted
        centre = _world_to_voxel(volume.affine, axis, 0.0, 0.0, slice_value)
        slice_value = float(np.round(centre[axis]))
    if slice_value is None:
        raise InputError("volumes need --slice K (the slice index the prompt is drawn on) or --roi")
    if float(slice_value) != int(slice_value):
        raise InputError(f"--slice must be a whole slice index, got {slice_value}")
    index = int(slice_value)
    count = slice_count(volume.shape, axis_name)
    if not 0 <= index < count:
        raise InputError(
            f"--slice {index} is outside the volume ({count} {axis_name} slices, 0..{count - 1})"
        )
    height, width = plane_size(volume.shape, axis_name)
    for box in boxes:
        if box[2] <= box[0] or box[3] <= box[1]:
            raise InputError("box is reversed or empty: need X0 < X1 and Y0 < Y1")
        if min(box) < 0 or box[2] > width - 1 or box[3] > height - 1:
            raise InputError(f"box {box} lies outside the {width}x{height} {axis_name} slice")
    for x, y, _ in points:
        if not (0 <= x <= width - 1 and 0 <= y <= height - 1):
            raise InputError(f"point ({x}, {y}) lies outside the {width}x{height} {axis_name} slice")
    labels = list(args.label or [])
    count_objects = max(len(boxes), 1)
    if labels and len(labels) != count_objects:
        raise InputError(f"give one --label per --box ({count_objects}), got {len(labels)}")
    labels = labels or list(range(1, count_objects + 1))
    if any(v <= 0 or v > 65535 for v in labels):
        raise InputError("--label values must be between 1 and 65535")
    prompts = []
    for n in range(count_objects):
        object_box: tuple[float, float, float, float] | None = (
            (float(boxes[n][0]), float(boxes[n][1]), float(boxes[n][2]), float(boxes[n][3]))
            if boxes
            else None
        )
        prompts.append(SlicePrompt(index, object_box, points if n == 0 or not boxes else [], labels[n]))
    return index, prompts


def segment_volume(args: argparse.Namespace) -> int:
    """Segment a volume from a 2D prompt and propagate it through the slices."""
    from tqdm import tqdm

    from samadapt.cli import load_predictor
    from samadapt.domains import images
    from samadapt.domains.medical import apply_intensity, guess_preset, read_volume, require_3d, write_volume
    from samadapt.domains.medical.io import WRITE_SUFFIXES
    from samadapt.domains.medical.propagation import (
        AXES,
        Roi,
        VolumeSegmenter,
        combine_labels,
        slice_count,
        slice_image,
    )

    output = Path(args.output)
    if not any(output.name.lower().endswith(s) for s in WRITE_SUFFIXES):
        raise InputError(f"segmentation output must end in one of {', '.join(WRITE_SUFFIXES)}: {output.name}")
    if not output.parent.exists():
        raise InputError(f"output folder does not exist: {output.parent}")
    if args.preset and args.window:
        raise InputError("give either --preset or --window, not both")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    volume = require_3d(read_volume(args.input, channel=args.channel))
    roi = Roi.from_values(args.roi, volume.shape) if args.roi else None
    if roi is not None and args.slice is None and not args.box and not args.points:
        low, high = roi.slice_range(args.axis)
        args.slice = (low + high) // 2
        args.box = [list(roi.plane_box(args.axis))]
    if not args.box and not args.points:
        raise InputError("give a prompt: --box X0 Y0 X1 Y1 and/or --point X Y on --slice K (or a 3D --roi)")
    index, prompts = _prompts(args, volume, args.axis)
    given = list(args.name or [])
    if given and len(given) != len(prompts):
        raise InputError(f"give one --name per object ({len(prompts)}), got {len(given)}")
    names = {p.label: (given[n] if given else f"object_{p.label}") for n, p in enumerate(prompts)}
    preset = None if args.window else (args.preset or guess_preset(volume))
    image = apply_intensity(volume.array, preset=preset, window=tuple(args.window) if args.window else None)
    predictor, described = load_predictor(args)
    total = slice_count(volume.shape, args.axis)
    start = time.perf_counter()
    with tqdm(
        total=total, desc="embedding slices", unit="slice", disable=args.no_progress, leave=False
    ) as bar:
        batch_size = args.batch_size or (8 if predictor.device.type == "cuda" else 2)
        segmenter = VolumeSegmenter(predictor, image, args.axis, batch_size=batch_size, progress=bar.update)
        masks = [(p.label, segmenter.segment(p, roi)) for p in prompts]
    seconds = time.perf_counter() - start
    labelmap = combine_labels(masks, volume.shape)
    write_volume(output, labelmap, volume, labels=names)
    if args.overlay:
        plane = slice_image(image, args.axis, index)
        plane_labels = slice_image(labelmap, args.axis, index)
        shown = [plane_labels == p.label for p in prompts]
        boxes = [p.box for p in prompts if p.box is not None]
        pts = [(x, y, lab == 1) for x, y, lab in prompts[0].points]
        images.write_overlay(
            args.overlay, images.overlay((plane * 255).astype(np.uint8), shown, boxes, pts, min_size=512)
        )
    for value, mask in masks:
        axis_index = tuple(a for a in range(3) if a != AXES[args.axis])  # the in-plane axes
        reached = np.flatnonzero(mask.any(axis=axis_index))
        span = f"slices {reached[0]}..{reached[-1]}" if reached.size else "empty"
        print(f"label {value}: {int(mask.sum())} voxels, {span}")
    print(
        f"{output}: {len(prompts)} object(s) from {args.axis} slice {index} ({described}, preset "
        f"{preset or 'window ' + str(args.window)}, {segmenter.cached_slices} slices embedded, "
        f"{seconds:.1f} s)"
    )
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """Dice, NSD and HD95 per label between a prediction and a ground truth on the same grid."""
    from samadapt.domains.medical import evaluate_labels, read_volume, reorient_like

    if args.tolerance < 0:
        raise InputError("--tolerance must be >= 0 mm")
    pred = read_volume(args.prediction)
    truth = read_volume(args.ground_truth)
    if pred.shape != truth.shape or not np.allclose(pred.affine, truth.affine, atol=1e-4):
        try:  # the same voxels stored in another axis order (a DICOM series vs dcm2niix's NIfTI, say)
            pred = reorient_like(pred, truth)
        except InputError:
            raise InputError(
                f"label grid mismatch: prediction {pred.shape} and ground truth {truth.shape} do not share "
                "voxels (different shape, spacing, origin or direction); resample one onto the other first"
            ) from None
        print("note: prediction stored in another axis order; compared voxel for voxel after reordering")
    labels: Any = args.labels or None
    rows = evaluate_labels(pred, truth, tolerance_mm=args.tolerance, labels=labels)
    if not rows:
        raise InputError("neither volume has any nonzero label")
    print(
        f"{'label':>6} {'name':<24} {'Dice':>7} {f'NSD@{args.tolerance:g}mm':>10} {'HD95 mm':>9} "
        f"{'pred vox':>9} {'gt vox':>9}"
    )
    for row in rows:
        print(
            f"{row['label']:>6} {row['name'] or ''!s:<24} {row['dice']:>7.4f} {row['nsd']:>10.4f} "
            f"{row['hd95']:>9.2f} {row['pred_voxels']:>9} {row['gt_voxels']:>9}"
        )
    if args.json:
        from samadapt.domains.images import atomic_write

        text = json.dumps(rows, indent=2, default=float)

        def write_json(tmp: Path) -> None:
            tmp.write_text(text)

        atomic_write(args.json, write_json)
    return 0
