"""Volume propagation: samadapt vs a plain per-slice loop with LiteMedSAM's reference code (one run).

Both segment the liver of the bundled TotalSegmentator CT (example_ct_sm, ct-soft window) inside the
same 3D box (the reference label's extent), starting from the box's middle slice with its 2D
rectangle and prompting every next slice with the previous mask's box plus 3 pixels of the 256 frame,
as LiteMedSAM's CVPR24 3D inference does. The reference embeds every slice of the box at fp32 with
its own modelling code; samadapt embeds slices in small batches once each (cached, channels-last,
``auto`` precision) and stops when the mask vanishes.

Usage: python benchmarks/volume_speed.py [--precision auto|bf16|fp32] [--repeats 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import oracles  # noqa: E402

from samadapt import Predictor, load_model  # noqa: E402
from samadapt.domains.medical import apply_intensity, dice, read_volume  # noqa: E402
from samadapt.domains.medical.propagation import Roi, SlicePrompt, VolumeSegmenter, mask_box  # noqa: E402
from samadapt.weights import verified_default_checkpoint  # noqa: E402

DATA = ROOT / "tests" / "data" / "totalsegmentator"
LIVER = 5
MARGIN_256 = 3.0


def reference_loop(image01: np.ndarray, box3d: tuple[int, ...]) -> np.ndarray:
    """Per-slice loop with LiteMedSAM's own code at fp32 (axial: slice k, X = i, Y = j)."""
    model = oracles.lite_medsam_reference()
    i0, j0, k0, i1, j1, k1 = box3d
    result = np.zeros(image01.shape, dtype=bool)
    middle = (k0 + k1) // 2
    rect = np.array([i0, j0, i1, j1], dtype=np.float64)
    for direction, start, stop in ((1, middle, k1), (-1, middle - 1, k0)):
        for k in range(start, stop + direction, direction):
            plane = (image01[:, :, k].T * 255).astype(np.uint8)
            embedded = oracles.reference_embed(model, plane)
            previous = result[:, :, k - direction].T if k != middle else None
            if previous is not None and previous.any():
                box = np.array(mask_box(previous, 0.0))
                box256 = oracles.official_box(box, embedded.original, "uniform")
                box256 = np.clip(box256 + np.array([-1, -1, 1, 1]) * MARGIN_256, 0, 255)
            else:
                box256 = oracles.official_box(rect, embedded.original, "official")
            _, masks = oracles.reference_decode(model, embedded, box256[None])  # (1, H, W)
            result[:, :, k] = masks[0].T
    return result


def ours(image01: np.ndarray, box3d: tuple[int, ...], precision: str) -> tuple[np.ndarray, str, int]:
    predictor = Predictor(load_model(verified_default_checkpoint()), precision=precision)
    roi = Roi.from_values(box3d, image01.shape)
    low, high = roi.slice_range("axial")
    segmenter = VolumeSegmenter(predictor, image01, "axial", batch_size=2, stop="vanish")  # as the reference
    prompt = SlicePrompt((low + high) // 2, roi.plane_box("axial"))
    return segmenter.segment(prompt, roi), predictor.precision, segmenter.cached_slices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--repeats", type=int, default=2, help="runs of each pipeline (best is reported)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    ct = read_volume(DATA / "example_ct_sm.nii.gz")
    liver = read_volume(DATA / "example_seg.nii.gz").array == LIVER
    image01 = apply_intensity(ct.array, "ct-soft")
    where = np.argwhere(liver)
    box3d = (*where.min(axis=0).tolist(), *where.max(axis=0).tolist())
    print(f"volume {ct.shape}, liver 3D box (i0 j0 k0 i1 j1 k1) = {box3d}, {torch.get_num_threads()} threads")

    # Runs alternate (reference, ours at each precision) so that drift of a shared machine hits all;
    # each pipeline's best time over --repeats runs is reported.
    precisions = list(dict.fromkeys([args.precision, "fp32"]))
    times: dict[str, list[float]] = {}
    results: dict[str, dict[str, float]] = {}
    for _ in range(args.repeats):
        start = time.perf_counter()
        reference = reference_loop(image01, box3d)
        times.setdefault("reference_fp32", []).append(time.perf_counter() - start)
        results["reference_fp32"] = {"dice": dice(reference, liver)}
        for precision in precisions:
            start = time.perf_counter()
            mask, used, embedded = ours(image01, box3d, precision)
            times.setdefault(f"samadapt_{used}", []).append(time.perf_counter() - start)
            results[f"samadapt_{used}"] = {"dice": dice(mask, liver), "slices_embedded": embedded}
    for name, row in results.items():
        row["seconds"] = min(times[name])
        row["all_seconds"] = times[name]  # type: ignore[assignment]
    t_ref = results["reference_fp32"]["seconds"]

    print(f"{'run':<22} {'seconds':>8} {'Dice':>7} {'speed-up':>9}")
    for name, row in results.items():
        print(f"{name:<22} {row['seconds']:>8.2f} {row['dice']:>7.4f} {t_ref / row['seconds']:>8.2f}x")
    best = next(iter(k for k in results if k.startswith("samadapt")))
    delta = results[best]["dice"] - results["reference_fp32"]["dice"]
    print(
        f"{best}: {t_ref / results[best]['seconds']:.2f}x faster than the reference loop, Dice {delta:+.4f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
