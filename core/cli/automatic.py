"""``samadapt segment INPUT --auto``: segment everything, in a 2D image or slice by slice in a volume.

- 2D image: an instance label PNG/TIFF (uint8 when the masks fit, else uint16; 0 background, label n is
  record n of ``--json``; larger masks are painted first, smaller ones on top).
- Volume: the generator runs on every slice along ``--axis``; the label volume has the input's grid and
  geometry. Instances are numbered per slice (label 1 of slice k and of slice k + 1 need not be the
  same object: plain SAM does not track instances across slices).
- A model with a prompt generator (an AutoSAM adapter, ``model.prompt_generator``) needs no grid: each
  image or slice gets the one prompt-free mask it produces (label 1), so a volume gives a 3D mask.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from samadapt.cli.common import (
    check_volume_flags,
    check_volume_output,
    is_volume_path,
    load_predictor,
    mask_generator,
)
from samadapt.errors import InputError

HINT = (
    "note: no mask passed the thresholds; LiteMedSAM (the default weights) was trained on boxes: try "
    "--single-mask --pred-iou-thresh 0.3 --stability-thresh 0.5 --stability-offset 0.5 (docs/prompt_free.md)"
)


def add_auto_args(parser: argparse.ArgumentParser) -> None:
    """The ``--auto`` group of ``samadapt segment``."""
    group = parser.add_argument_group("automatic masks (--auto)")
    group.add_argument(
        "--auto",
        action="store_true",
        help="segment everything with a point grid (no prompt); with an AutoSAM adapter, its own mask",
    )
    group.add_argument("--points-per-side", type=int, default=32, help="grid points per side (default 32)")
    group.add_argument(
        "--points-per-batch", type=int, default=256, help="points per decoder call (default 256)"
    )
    group.add_argument(
        "--pred-iou-thresh",
        type=float,
        default=0.88,
        help="keep masks with predicted IoU above (default 0.88)",
    )
    group.add_argument(
        "--stability-thresh",
        type=float,
        default=0.95,
        help="keep masks with stability at least (default 0.95)",
    )
    group.add_argument(
        "--min-area",
        type=int,
        default=0,
        help="fill holes and drop islands under this many pixels (default 0)",
    )
    group.add_argument(
        "--stability-offset", type=float, default=1.0, help="logit offset of the stability score (default 1)"
    )
    group.add_argument("--crop-layers", type=int, default=0, help="extra crop layers (default 0)")
    group.add_argument(
        "--single-mask",
        action="store_true",
        help="one candidate per point (the single-mask token): for LiteMedSAM, whose multimask tokens are "
        "untrained; lower --pred-iou-thresh/--stability-thresh with it (docs/prompt_free.md)",
    )
    group.add_argument("--json", metavar="FILE", help="per-mask records (score, stability, area, box, point)")


def check_auto_args(args: argparse.Namespace) -> None:
    """One-line errors for flags that make no sense with ``--auto``."""
    if getattr(args, "prompts", None):
        raise InputError("--auto takes no --prompts manifest: give one input image or volume")
    if args.box or args.points:
        raise InputError("--auto segments without prompts: drop --box/--point")
    if args.points_per_side < 1 or args.points_per_batch < 1:
        raise InputError("--points-per-side and --points-per-batch must be at least 1")
    if args.min_area < 0 or args.crop_layers < 0:
        raise InputError("--min-area and --crop-layers must be 0 or more")
    if args.json and Path(args.json).suffix.lower() != ".json":
        raise InputError(f"--json must end in .json: {Path(args.json).name}")
    if args.json and not Path(args.json).parent.exists():
        raise InputError(f"--json folder does not exist: {Path(args.json).parent}")


def _prompt_free(predictor: Any, embedding: Any) -> np.ndarray:
    """(H, W) uint16 label map from a prompt-generator model (AutoSAM), no prompt given.

    ``predict`` returns one mask per class (C, K, H, W); each class is written with its label value
    (``prompt_generator.label_values``, default 1..C) and where classes overlap the higher score wins.
    """
    result = predictor.predict(embedding=embedding)
    rows = np.arange(result.masks.shape[0])
    best = result.scores.argmax(axis=1)
    masks, scores = result.masks[rows, best], result.scores[rows, best]  # (C, H, W), (C,)
    values = getattr(predictor.model.prompt_generator, "label_values", None) or list(range(1, len(rows) + 1))
    pick = np.where(masks, scores[:, None, None] + 2.0, 0.0).argmax(axis=0)
    return np.where(masks.any(axis=0), np.asarray(values, dtype=np.uint16)[pick], 0).astype(np.uint16)


def _write_json(path: str, document: dict[str, Any]) -> None:
    from samadapt.domains.images import atomic_write

    text = json.dumps(document, indent=1) + "\n"

    def write(tmp: Path) -> None:
        tmp.write_text(text)

    atomic_write(Path(path), write)


def segment_auto(args: argparse.Namespace) -> int:
    """``--auto`` on a 2D image or a volume."""
    check_auto_args(args)
    if not args.input:
        raise InputError("give an input image or volume")
    if is_volume_path(args.input):
        return _segment_volume(args)
    return _segment_2d(args)


def _segment_2d(args: argparse.Namespace) -> int:
    from samadapt.domains import images

    image = images.read_image(args.input)
    output = Path(args.output)
    images.check_suffix(output, images.MASK_SUFFIXES, "mask output")
    predictor, described = load_predictor(args)
    start = time.perf_counter()
    if predictor.model.prompt_generator is not None:
        embedding = predictor.set_image(image)
        prompt_free = _prompt_free(predictor, embedding)
        labels: np.ndarray = prompt_free.astype(np.uint8 if prompt_free.max() <= 255 else np.uint16)
        area = int((labels > 0).sum())
        document: dict[str, Any] = {"size": list(labels.shape), "prompt_free": True, "area": area}
        what = f"prompt-free mask, {area} pixels"
    else:
        result = mask_generator(predictor, args).generate(image)
        label_map = result.label_map()
        labels = label_map.astype(np.uint8 if len(result) <= 255 else np.uint16)
        document = result.to_dict()
        what = f"{len(result)} mask(s), {result.decoder_calls} decoder call(s)"
        if not len(result):
            print(HINT)
    images.write_mask(output, labels)
    if args.json:
        _write_json(args.json, document)
    if args.overlay:
        shown = [labels == v for v in np.unique(labels) if v]
        images.write_overlay(args.overlay, images.overlay(image, shown, [], []))
    print(f"{output}: {what} ({described}, {time.perf_counter() - start:.1f} s)")
    return 0


def _segment_volume(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from samadapt.domains.medical import apply_intensity, guess_preset, read_volume, require_3d, write_volume
    from samadapt.domains.medical.propagation import put_slice, slice_count, slice_image

    output = Path(args.output)
    check_volume_output(output)
    check_volume_flags(args)
    volume = require_3d(read_volume(args.input, channel=args.channel))
    preset = None if args.window else (args.preset or guess_preset(volume))
    image = apply_intensity(volume.array, preset=preset, window=tuple(args.window) if args.window else None)
    predictor, described = load_predictor(args)
    prompt_free = predictor.model.prompt_generator is not None
    generator = None if prompt_free else mask_generator(predictor, args)
    if generator is not None and args.crop_layers:
        raise InputError("--crop-layers is for 2D images; volumes run the grid on whole slices")
    total = slice_count(volume.shape, args.axis)
    batch_size = args.batch_size or (8 if predictor.device.type == "cuda" else 2)
    labels = np.zeros(volume.shape, dtype=np.int32)
    per_slice: list[dict[str, Any]] = []
    start = time.perf_counter()
    with tqdm(
        total=total, desc="segmenting slices", unit="slice", disable=args.no_progress, leave=False
    ) as bar:
        for first in range(0, total, batch_size):
            planes = [slice_image(image, args.axis, k) for k in range(first, min(first + batch_size, total))]
            embeddings = predictor.embed(planes, batch_size=batch_size)
            for offset, (plane, embedding) in enumerate(zip(planes, embeddings, strict=True)):
                index = first + offset
                if generator is None:
                    put_slice(labels, args.axis, index, _prompt_free(predictor, embedding).astype(np.int32))
                else:
                    result = generator.generate(plane, embedding=embedding)
                    put_slice(labels, args.axis, index, result.label_map())
                    per_slice.append({"slice": index, "masks": [r.to_dict() for r in result.records]})
                bar.update(1)
    highest = int(labels.max())
    written = labels.astype(np.uint8 if highest <= 255 else np.uint16 if highest <= 65535 else np.int32)
    write_volume(output, written, volume)
    if args.json:
        document: dict[str, Any] = {"input": str(args.input), "axis": args.axis, "preset": preset}
        if generator is not None:
            document.update(settings=generator.settings, slices=per_slice, instances_numbered="per slice")
        else:
            document.update(prompt_free=True, voxels=int((labels > 0).sum()))
        _write_json(args.json, document)
    if generator is None:
        what = f"prompt-free 3D mask, {int((labels > 0).sum())} voxels"
    else:
        what = f"{sum(len(s['masks']) for s in per_slice)} mask(s) over {total} slices, numbered per slice"
    seconds = time.perf_counter() - start
    print(f"{output}: {what} along {args.axis} ({described}, preset {preset or 'window'}, {seconds:.1f} s)")
    return 0
