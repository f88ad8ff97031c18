"""``samadapt segment VOLUME``: a prompt on one slice, propagated through a medical volume."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from samadapt.cli.common import attachment_note, check_volume_flags, check_volume_output, load_predictor
from samadapt.errors import InputError

if TYPE_CHECKING:
    from samadapt.domains.medical.stopping import PropagationReport


def segment_volume(args: argparse.Namespace) -> int:
    """Segment a volume from a 2D prompt and propagate it through the slices.

    ``args`` is read, never written: the prompt a 3D ``--roi`` implies is kept in local variables.
    """
    from tqdm import tqdm

    from samadapt.domains import images
    from samadapt.domains.medical import apply_intensity, guess_preset, read_volume, require_3d, write_volume
    from samadapt.domains.medical.prompts import volume_prompts
    from samadapt.domains.medical.propagation import (
        AXES,
        Roi,
        VolumeSegmenter,
        combine_labels,
        slice_count,
        slice_image,
    )

    output = Path(args.output)
    check_volume_output(output)
    check_volume_flags(args)
    max_slices = getattr(args, "max_slices", None)
    report_path = Path(args.report) if getattr(args, "report", None) else None
    if report_path is not None:
        if report_path.suffix.lower() != ".json":
            raise InputError(f"--report must end in .json: {report_path.name}")
        if not report_path.parent.exists():
            raise InputError(f"--report folder does not exist: {report_path.parent}")
    volume = require_3d(read_volume(args.input, channel=args.channel))
    roi = Roi.from_values(args.roi, volume.shape) if args.roi else None
    slice_value: float | None = args.slice
    boxes: list[list[float]] = [list(b) for b in (args.box or [])]
    points = list(args.points or [])
    if roi is not None and slice_value is None and not boxes and not points:
        low, high = roi.slice_range(args.axis)  # prompt: the ROI's own box on its middle slice
        slice_value = (low + high) // 2
        boxes = [list(roi.plane_box(args.axis))]
    if not boxes and not points:
        raise InputError("give a prompt: --box X0 Y0 X1 Y1 and/or --point X Y on --slice K (or a 3D --roi)")
    index, prompts = volume_prompts(
        volume,
        args.axis,
        boxes=boxes,
        points=points,
        slice_value=slice_value,
        mm=args.mm,
        labels=args.label,
        point_boxes=getattr(args, "point_boxes", None) if len(boxes) > 1 else None,
    )
    note = attachment_note([p.points for p in prompts]) if points else None
    if note:
        print(note)
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
        segmenter = VolumeSegmenter(
            predictor,
            image,
            args.axis,
            batch_size=batch_size,
            progress=bar.update,
            stop=getattr(args, "stop", "auto"),
            max_slices=max_slices,
        )
        masks: list[tuple[int, np.ndarray]] = []
        reports: list[PropagationReport | None] = []
        for p in prompts:
            masks.append((p.label, segmenter.segment(p, roi)))
            reports.append(segmenter.last_report)
    seconds = time.perf_counter() - start
    labelmap = combine_labels(masks, volume.shape)
    write_volume(output, labelmap, volume, labels=names)
    if args.overlay:
        plane = slice_image(image, args.axis, index)
        plane_labels = slice_image(labelmap, args.axis, index)
        shown = [plane_labels == p.label for p in prompts]
        drawn = [p.box for p in prompts if p.box is not None]
        pts = [(x, y, lab == 1) for p in prompts for x, y, lab in p.points]
        images.write_overlay(
            args.overlay, images.overlay((plane * 255).astype(np.uint8), shown, drawn, pts, min_size=512)
        )
    if report_path is not None:
        _write_report(report_path, args, preset, names, reports)
    in_plane = tuple(a for a in range(3) if a != AXES[args.axis])
    for (value, mask), report in zip(masks, reports, strict=True):
        if getattr(args, "verbose", False) and report is not None:
            print(
                f"label {value} ({names[value]}): stop signals, {args.axis} slices from {report.prompt_slice}"
            )
            print(report.table())
        reached = np.flatnonzero(mask.any(axis=in_plane))
        span = f"slices {reached[0]}..{reached[-1]}" if reached.size else "empty"
        ends = ""
        if report is not None and report.ends:
            ends = (
                " (ended " + "; ".join(f"{d:+d}: {report.ends[d]}" for d in (1, -1) if d in report.ends) + ")"
            )
        print(f"label {value}: {int(mask.sum())} voxels, {span}{ends}")
    print(
        f"{output}: {len(prompts)} object(s) from {args.axis} slice {index} ({described}, preset "
        f"{preset or 'window ' + str(args.window)}, {segmenter.cached_slices} slices embedded, "
        f"{seconds:.1f} s)"
    )
    return 0


def _write_report(
    path: Path,
    args: argparse.Namespace,
    preset: str | None,
    names: dict[int, str],
    reports: Sequence[PropagationReport | None],
) -> None:
    """The per-slice stop signals of every object as JSON (written atomically)."""
    import json

    from samadapt.domains.images import atomic_write

    document = {
        "input": str(args.input),
        "axis": args.axis,
        "preset": preset,
        "stop": getattr(args, "stop", "auto"),
        "max_slices": getattr(args, "max_slices", None),
        "roi": list(args.roi) if args.roi else None,
        "objects": [{"name": names.get(r.label), **r.to_dict()} for r in reports if r is not None],
    }
    text = json.dumps(document, indent=1) + "\n"

    def write(tmp: Path) -> None:
        tmp.write_text(text)

    atomic_write(path, write)
