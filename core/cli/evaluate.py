"""``samadapt evaluate``: Dice, NSD and HD95 per label between a prediction and a ground truth."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from samadapt.errors import InputError


def register(sub: Any) -> None:
    """Add the ``evaluate`` parser to the sub-parsers ``sub``."""
    ev = sub.add_parser("evaluate", help="Dice, NSD and HD95 per label between two label volumes or masks")
    ev.add_argument("prediction")
    ev.add_argument("ground_truth")
    ev.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    ev.add_argument("--labels", type=int, nargs="*", help="only these label values")
    ev.add_argument("--json", help="also write the table as JSON")


def run(args: argparse.Namespace) -> int:
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
