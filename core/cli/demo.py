"""``samadapt demo``: segment the bundled CT slice and report Dice against its ground truth."""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from samadapt.cli.common import adapter_dir, add_model_args, load_predictor


def register(sub: Any) -> None:
    """Add the ``demo`` parser to the sub-parsers ``sub``."""
    demo = sub.add_parser(
        "demo", help="segment the bundled CT slice and report Dice against its ground truth"
    )
    demo.add_argument("--out", default="samadapt-demo", help="output folder (default: ./samadapt-demo)")
    add_model_args(demo)


def run(args: argparse.Namespace) -> int:
    """Liver box on the bundled AMOS slice: mask, overlay and Dice in ``args.out``."""
    from samadapt.domains import images

    adapter_dir(args)  # a wrong --adapter fails before anything is written
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
