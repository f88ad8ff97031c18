"""2D box-prompt quality on the sam_med2d slices: samadapt vs LiteMedSAM's own code (real weights).

30 masks on 4 CT/MR slices (tests/data/sam_med2d), a tight box from each mask, no jitter. Mean Dice for:
- reference: LiteMedSAM's modelling code at fp32 with the official CVPR24_LiteMedSAM_infer.py pre/post
  processing (cv2.INTER_AREA on uint8 to longest side 256 — real OpenCV if importable, else an exact
  numpy emulation —, min-max, pad; box * 256 / max(H, W) truncated to int; logits cropped, bilinear to
  the original size, sigmoid > 0.5). SOURCES.md gives 0.659 for this set-up.
- samadapt ``Predictor`` at fp32 and at ``auto``.
Then, to tell which step makes a difference, the reference with one step at a time switched to
samadapt's convention (its preprocessing; its box mapping).

    .venv/bin/python benchmarks/quality_2d.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
warnings.filterwarnings("ignore", category=FutureWarning)  # timm's deprecated import paths

import oracles  # noqa: E402

from samadapt import Predictor  # noqa: E402

EXPECTED_REFERENCE = 0.659


def reference_dice(
    model: torch.nn.Module, cases: list[oracles.MaskCase], resize: str, box_mode: str
) -> tuple[list[float], dict[str, np.ndarray]]:
    """Dice per case and the 256-frame boxes used, for one reference configuration."""
    dices: dict[str, float] = {}
    boxes_used: dict[str, np.ndarray] = {}
    for group in oracles.group_by_image(cases).values():
        embedded = oracles.reference_embed(model, group[0].image, resize=resize)
        if box_mode == "samadapt":
            from samadapt.preprocess import LITEMEDSAM_PROFILE

            raw = np.stack([c.box for c in group]).astype(np.float64).reshape(-1, 2, 2)
            box256 = LITEMEDSAM_PROFILE.coords_to_input(raw, embedded.original).reshape(-1, 4)
        else:
            box256 = np.stack([oracles.official_box(c.box, embedded.original, box_mode) for c in group])
        _, masks = oracles.reference_decode(model, embedded, box256)
        for i, case in enumerate(group):
            dices[case.name] = oracles.dice(masks[i], case.mask)
            boxes_used[case.name] = box256[i]
    return [dices[c.name] for c in cases], boxes_used


def ours_dice(predictor: Predictor, cases: list[oracles.MaskCase]) -> list[float]:
    dices: dict[str, float] = {}
    for group in oracles.group_by_image(cases).values():
        embedding = predictor.embed([group[0].image])[0]
        boxes = np.stack([c.box for c in group]).astype(np.float64)
        masks = predictor.predict(boxes=boxes, embedding=embedding).masks[:, 0]
        for i, case in enumerate(group):
            dices[case.name] = oracles.dice(masks[i], case.mask)
    return [dices[c.name] for c in cases]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: cores)"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    try:
        import cv2

        resize_impl = f"OpenCV {cv2.__version__}"
    except ImportError:
        resize_impl = "numpy emulation of cv2.INTER_AREA (OpenCV not installed)"
    cases = oracles.load_sam_med2d()
    reference = oracles.lite_medsam_reference()
    ours = oracles.lite_medsam_ours()

    ref, _ = reference_dice(reference, cases, resize="cv2", box_mode="official")
    fp32 = ours_dice(Predictor(ours, device="cpu", precision="fp32"), cases)
    auto_predictor = Predictor(ours, device="cpu", precision="auto")
    auto = ours_dice(auto_predictor, cases)

    print(
        f"{len(cases)} masks on {len({c.image_name for c in cases})} slices; reference resize: {resize_impl}"
    )
    print(f"precision 'auto' resolved to: {auto_predictor.precision}\n")
    header = (
        f"{'mask':<38} {'HxW':>8} {'box (orig px)':>20} "
        f"{'ref':>7} {'fp32':>7} {'auto':>7} {'d fp32':>7} {'d auto':>7}"
    )
    print(header)
    print("-" * len(header))
    for i, case in enumerate(cases):
        size = f"{case.image.shape[0]}x{case.image.shape[1]}"
        box = " ".join(str(int(v)) for v in case.box)
        print(
            f"{case.name:<38} {size:>8} {box:>20} {ref[i]:>7.4f} {fp32[i]:>7.4f} {auto[i]:>7.4f} "
            f"{fp32[i] - ref[i]:>+7.4f} {auto[i] - ref[i]:>+7.4f}"
        )
    print("-" * len(header))
    means = {
        "reference": float(np.mean(ref)),
        "ours_fp32": float(np.mean(fp32)),
        "ours_auto": float(np.mean(auto)),
    }
    print(
        f"{'mean Dice':<38} {'':>8} {'':>20} {means['reference']:>7.4f} {means['ours_fp32']:>7.4f} "
        f"{means['ours_auto']:>7.4f} {means['ours_fp32'] - means['reference']:>+7.4f} "
        f"{means['ours_auto'] - means['reference']:>+7.4f}"
    )
    print(f"(SOURCES.md reference: {EXPECTED_REFERENCE})\n")

    # One step at a time: which of samadapt's conventions moves the reference's Dice.
    steps = [
        ("official (cv2 resize, int box)", "cv2", "official"),
        ("cv2 resize, float box 256/max", "cv2", "uniform"),
        ("cv2 resize, samadapt box", "cv2", "samadapt"),
        ("samadapt preprocess, int box", "samadapt", "official"),
        ("samadapt preprocess + box", "samadapt", "samadapt"),
    ]
    print("reference LiteMedSAM code, one pipeline step switched at a time:")
    ablation = {}
    for label, resize, box_mode in steps:
        dices, _ = reference_dice(reference, cases, resize=resize, box_mode=box_mode)
        ablation[label] = float(np.mean(dices))
        print(f"  {label:<34} mean Dice {ablation[label]:.4f}  ({ablation[label] - means['reference']:+.4f})")
    print(f"  {'samadapt Predictor fp32':<34} mean Dice {means['ours_fp32']:.4f}")

    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "reference_resize": resize_impl,
                    "auto_precision": auto_predictor.precision,
                    "mean_dice": means,
                    "ablation_mean_dice": ablation,
                    "per_mask": [
                        {
                            "mask": c.name,
                            "box": [int(v) for v in c.box],
                            "reference": r,
                            "ours_fp32": f,
                            "ours_auto": a,
                        }
                        for c, r, f, a in zip(cases, ref, fp32, auto, strict=True)
                    ],
                },
                indent=2,
            )
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
