"""``samadapt segment VOLUME --adapter DIR --point I J K [...] -o SEG.nii.gz`` for volumetric adapters.

A volumetric adapter (the 3DSAM design) segments a whole volume from 3D clicks with MONAI's sliding
window (:func:`samadapt.domains.medical.volumetric_inference.segment_volume`); the mask keeps the
input's grid, voxel order and affine. The 2D ``segment`` parser takes ``--point X Y``, so the
dispatcher hands these command lines over before parsing: :func:`wants` says whether ``argv`` names a
volumetric adapter (it reads ``adapter.json`` only; nothing heavy is imported here).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from samadapt.cli.common import Parser, adapter_dir, check_volume_output
from samadapt.errors import InputError

ADAPTER_TYPE = "volumetric"


def _adapter_value(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--adapter" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--adapter="):
            return arg.partition("=")[2]
    return None


def wants(argv: Sequence[str]) -> bool:
    """True when the ``segment`` arguments ``argv`` name an adapter folder of the volumetric type."""
    value = _adapter_value(argv)
    if not value:
        return False
    config = Path(value) / "adapter.json"
    try:
        return json.loads(config.read_text()).get("adapter_type") == ADAPTER_TYPE
    except (OSError, ValueError, AttributeError):
        return False  # let the normal path report a broken adapter folder


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="samadapt segment",
        description="Segment one object in a volume from 3D clicks with a volumetric adapter.",
    )
    parser.add_argument("input", help="volume file (NIfTI, NRRD, MHA) or DICOM series folder")
    parser.add_argument("-o", "--output", required=True, help="mask output (.nii.gz, .nrrd, .seg.nrrd, ...)")
    parser.add_argument("--adapter", required=True, metavar="DIR", help="volumetric adapter folder")
    parser.add_argument("--checkpoint", metavar="PATH", help="the base weights the adapter was trained on")
    parser.add_argument("--variant", help="expected variant (default: detected from the checkpoint)")
    parser.add_argument(
        "--point", nargs=3, type=float, action="append", default=[], metavar=("I", "J", "K"),
        help="a positive click: voxel indexes of the input (or RAS mm with --mm); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--negative-point", nargs=3, type=float, action="append", default=[], metavar=("I", "J", "K"),
        help="a negative click (not the object); repeatable",
    )  # fmt: skip
    parser.add_argument("--mm", action="store_true", help="points are RAS millimetres, not voxel indexes")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (0.5)")
    parser.add_argument("--threshold", type=float, default=0.5, help="foreground probability cut-off")
    parser.add_argument("--probability", metavar="PATH", help="also write the probability map here")
    parser.add_argument("--channel", type=int, help="channel of a 4D volume to use")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str]) -> int:
    """Run the volumetric ``segment`` command line ``argv`` (everything after ``segment``)."""
    args = build_parser().parse_args(list(argv))
    return segment(args)


def segment(args: argparse.Namespace) -> int:
    """Segment ``args.input`` from the clicks; write the mask (and the probability) on its grid."""
    import numpy as np
    import torch

    import samadapt.adapters.volumetric  # noqa: F401  registers the type (also an entry point once installed)
    from samadapt.adapter import load_adapter
    from samadapt.checkpoint import load_model
    from samadapt.domains.medical.io import read_volume, write_volume
    from samadapt.domains.medical.volumetric_inference import mm_to_voxel, segment_volume
    from samadapt.weights import checkpoint_sha256, resolve_checkpoint

    if not args.point:
        raise InputError("give at least one positive click: --point I J K")
    output = Path(args.output)
    check_volume_output(output)
    if args.probability:
        check_volume_output(Path(args.probability))
    folder = adapter_dir(args)
    assert folder is not None
    source = resolve_checkpoint(args.checkpoint)
    model = load_model(source.path, variant=args.variant or source.variant)
    adapter: Any = load_adapter(folder, model, base_sha256=checkpoint_sha256(source.path))
    if getattr(adapter, "adapter_type", "") != ADAPTER_TYPE or not hasattr(adapter, "patch_size"):
        raise InputError(f"{folder} is not a volumetric adapter")
    device = torch.device(args.device)
    model.to(device).eval()
    volume = read_volume(args.input, channel=args.channel)
    clicks = np.array(args.point + args.negative_point, dtype=np.float64)
    labels = np.array([1] * len(args.point) + [0] * len(args.negative_point))
    if args.mm:
        clicks = mm_to_voxel(clicks, volume.affine)
    started = time.perf_counter()
    patches = 0

    def count() -> None:
        nonlocal patches
        patches += 1

    mask, probability = segment_volume(
        model,
        volume,
        clicks,
        labels,
        roi=adapter.patch_size(model),
        spacing=adapter.spacing,
        clip=adapter.clip,
        mean=adapter.mean,
        std=adapter.std,
        overlap=args.overlap,
        threshold=args.threshold,
        progress=not args.no_progress,
        device=device,
        on_patch=count,
    )
    write_volume(output, mask, volume)
    if args.probability:
        write_volume(args.probability, probability, volume)
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    print(
        f"{output}: {int(mask.sum())} voxels ({mask.sum() * voxel_ml:.1f} ml) from "
        f"{len(args.point)} positive and {len(args.negative_point)} negative click(s); "
        f"{patches} patch(es) in "
        f"{time.perf_counter() - started:.1f} s ({model.variant} from {source.origin} + adapter volumetric)"
    )
    return 0
