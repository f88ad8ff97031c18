"""``samadapt segment --prompts MANIFEST -o OUT_DIR``: many cases in one process.

The model is loaded once; each case's image is embedded once (the 2D objects of an image share one
``set_image``, the objects of a volume share one :class:`VolumeSegmenter` and its slice cache per axis).
A case that fails (missing or unreadable file, a bad prompt) is reported on one line and skipped; the
others are written. The exit status is 1 when any case failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from samadapt.cli.common import check_volume_flags, combine_masks, load_predictor, predict_objects
from samadapt.errors import InputError, SamadaptError

# Flags that describe one case; a manifest gives these per row instead.
_PER_CASE_FLAGS = (
    ("box", "--box"),
    ("points", "--point"),
    ("slice", "--slice"),
    ("label", "--label"),
    ("name", "--name"),
    ("roi", "--roi"),
    ("overlay", "--overlay"),
    ("report", "--report"),
)


def _check_flags(args: argparse.Namespace) -> Path:
    """Refuse flags that do not go with ``--prompts``; returns the output folder (not created yet)."""
    if args.input:
        raise InputError(f"give either an input ({args.input}) or --prompts, not both")
    for attribute, flag in _PER_CASE_FLAGS:
        value = getattr(args, attribute, None)
        if value is not None and value != []:
            raise InputError(f"{flag} does not go with --prompts: give it per row in the manifest")
    check_volume_flags(args)
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"with --prompts, -o is an output folder, but {out_dir} is a file")
    if not out_dir.exists() and not out_dir.parent.exists():
        raise InputError(f"output folder's parent does not exist: {out_dir.parent}")
    return out_dir


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if not isinstance(exc, SamadaptError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _segment_2d(predictor: Any, case: Any, output: Path, multimask: bool) -> str:
    import numpy as np

    from samadapt.domains import images

    image = images.read_image(case.image)
    size = image.shape[:2]
    for obj in case.objects:  # every prompt is checked before the encoder runs
        if obj.box is not None:
            predictor.check_boxes(np.array(obj.box), size)
        if obj.points:
            predictor.check_points(np.array([[x, y] for x, y, _ in obj.points]), size)
    predictor.set_image(image)
    objects = [(list(o.box) if o.box else None, list(o.points)) for o in case.objects]
    masks = predict_objects(predictor, objects, multimask=multimask)
    labelled = len(masks) > 1 or any(o.label != 1 for o in case.objects)
    labels = [int(o.label) for o in case.objects]
    images.write_mask(output, combine_masks(masks, labels) if labelled else masks[0])
    area = int(sum(m.sum() for m in masks))
    return f"{output}: {len(masks)} object(s), {area} pixels"


def _segment_volume(predictor: Any, case: Any, output: Path, args: argparse.Namespace) -> str:
    from samadapt.domains.medical import apply_intensity, guess_preset, read_volume, require_3d, write_volume
    from samadapt.domains.medical.prompts import volume_prompts
    from samadapt.domains.medical.propagation import VolumeSegmenter, combine_labels

    volume = require_3d(read_volume(case.image, channel=args.channel))
    prompts = []
    for obj in case.objects:  # every prompt is checked before any slice is embedded
        axis = obj.axis or args.axis
        _, (prompt,) = volume_prompts(
            volume,
            axis,
            boxes=[obj.box] if obj.box else [],
            points=obj.points,
            slice_value=obj.slice,
            mm=args.mm,
            labels=[obj.label],
        )
        prompts.append((axis, prompt))
    preset = None if args.window else (args.preset or guess_preset(volume))
    image = apply_intensity(volume.array, preset=preset, window=tuple(args.window) if args.window else None)
    batch_size = args.batch_size or (8 if predictor.device.type == "cuda" else 2)
    segmenters: dict[str, VolumeSegmenter] = {}  # one per axis: the objects share its embeddings
    masks = []
    for axis, prompt in prompts:
        if axis not in segmenters:
            segmenters[axis] = VolumeSegmenter(
                predictor,
                image,
                axis,
                batch_size=batch_size,
                stop=getattr(args, "stop", "auto"),
                max_slices=getattr(args, "max_slices", None),
            )
        masks.append((prompt.label, segmenters[axis].segment(prompt)))
    labelmap = combine_labels(masks, volume.shape)
    names = {int(o.label): o.name or f"object_{o.label}" for o in case.objects}
    write_volume(output, labelmap, volume, labels=names)
    embedded = sum(s.cached_slices for s in segmenters.values())
    voxels = int(sum(int(m.sum()) for _, m in masks))
    return f"{output}: {len(masks)} object(s), {voxels} voxels, {embedded} slices embedded"


def segment_manifest(args: argparse.Namespace) -> int:
    """Segment every case of ``args.prompts`` into the folder ``args.output``; 1 if any case failed."""
    from tqdm import tqdm

    from samadapt.domains.manifest import read_manifest

    out_dir = _check_flags(args)
    cases = read_manifest(args.prompts)
    for case in cases:
        if case.output and (out_dir / case.output).resolve() == case.image.resolve():
            raise InputError(
                f"{case.output} in {out_dir} would overwrite the input {case.source}; "
                "choose another -o folder"
            )
    predictor, described = load_predictor(args)
    out_dir.mkdir(exist_ok=True)
    start = time.perf_counter()
    failed = 0
    with tqdm(total=len(cases), desc="cases", unit="case", disable=args.no_progress, leave=False) as bar:
        for case in cases:
            try:
                if case.error:
                    raise InputError(case.error)
                if case.kind == "unknown":
                    if not case.image.exists():
                        raise InputError(f"file not found: {case.image}")
                    raise InputError(f"{case.image.name} is neither a 2D image nor a volume file")
                output = out_dir / case.output
                if case.kind == "volume":
                    line = _segment_volume(predictor, case, output, args)
                else:
                    line = _segment_2d(predictor, case, output, args.multimask)
                tqdm.write(line, file=sys.stdout)
            except Exception as exc:  # one bad case never stops the others
                failed += 1
                tqdm.write(f"samadapt segment: case {case.source} failed: {_one_line(exc)}", file=sys.stderr)
            bar.update(1)
    seconds = time.perf_counter() - start
    print(
        f"{len(cases) - failed} of {len(cases)} case(s) written to {out_dir}, {failed} failed "
        f"({described}, {seconds:.1f} s)"
    )
    return 1 if failed else 0
