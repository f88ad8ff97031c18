"""Automatic mask generation: samadapt's generator against segment-anything's, identical ViT-B weights.

Segment-anything's ViT-B with random weights (constant parameters perturbed, as tests/oracles.py does)
and our ``sam_vit_b`` holding a strict copy; a ``--grid`` x ``--grid`` point grid on the bundled CT
slice (core/assets/demo_ct.png) resized to ``--size`` pixels. Both run fp32 on this CPU, in one process:

- time per image: the encoder timed once per implementation, plus the grid decoding timed with the
  embedding cached (ours through ``generate(image, embedding=...)``, theirs with ``set_image`` bypassed);
- agreement of the kept masks: the fraction of theirs that one of ours matches at mask IoU >= 0.5 and
  >= 0.9 (target >= 95% at 0.9), and the mask counts;
- random weights predict low IoUs and logits within +-1, so no mask passes the default thresholds (0.88 /
  0.95); agreement and decoder-only time are also reported with the thresholds off (``--low-iou``,
  ``--low-stability``, on a ``--low-grid`` grid to keep the run short; empty masks are not matched);
- LiteMedSAM (real weights) time per image at its 256 input, on the 512 x 512 slice;
- agreement with TRAINED weights: LiteMedSAM's real prompt encoder and mask decoder in segment-anything's
  ``Sam`` (tests/oracles.py) and in ours, both fed our LiteMedSAM embedding of the 512 x 512 slice,
  multimask output (segment-anything's only mode), ``--lite-grid`` grid; LiteMedSAM's multimask tokens
  were never trained (box prompts, single-mask token), so every threshold above 0 keeps nothing in both:
  the thresholds are off (``--lite-iou``/``--lite-stability``) and box NMS at 0.7 decides what is kept.

    .venv/bin/python benchmarks/amg_speed.py [--grid 32] [--size 1024] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from oracles import sam_vit_b_pair

from samadapt import Predictor, load_model
from samadapt.automatic import AutomaticMaskGenerator, point_grid
from samadapt.precision import cpu_model
from samadapt.weights import verified_default_checkpoint


def demo_slice(size: int | None = None) -> np.ndarray:
    """The bundled CT slice as (H, W, 3) uint8, resized (bilinear) to size x size when given."""
    path = resources.files("samadapt.assets") / "demo_ct.png"
    image = Image.open(str(path)).convert("RGB")
    if size is not None:
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image)


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, float]:
    """Fraction of ``theirs`` (M, H, W) bool matched by one of ``ours`` (N, H, W) at IoU >= 0.5 / 0.9."""
    theirs = theirs[theirs.flatten(1).any(1)]  # empty masks (kept with the thresholds off) match nothing
    if theirs.shape[0] == 0:
        return {"found_05": float("nan"), "found_09": float("nan"), "mean_best_iou": float("nan")}
    if ours.shape[0] == 0:
        return {"found_05": 0.0, "found_09": 0.0, "mean_best_iou": 0.0}
    a = ours.flatten(1).float()
    b = theirs.flatten(1).float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    best = (inter / union.clamp(min=1)).max(dim=0).values
    return {
        "found_05": float((best >= 0.5).float().mean()),
        "found_09": float((best >= 0.9).float().mean()),
        "mean_best_iou": float(best.mean()),
    }


def theirs_masks(records: list[dict[str, Any]], size: tuple[int, int]) -> torch.Tensor:
    if not records:
        return torch.zeros((0, *size), dtype=torch.bool)
    return torch.stack([torch.as_tensor(r["segmentation"]) for r in records])


def run_pair(
    ours: AutomaticMaskGenerator, theirs: Any, embedding: Any, image: np.ndarray, iou: float, stab: float
) -> dict[str, Any]:
    """Both generators, decoder only (embeddings cached), at one threshold setting."""
    for generator in (ours, theirs):
        generator.pred_iou_thresh, generator.stability_score_thresh = iou, stab
    start = time.perf_counter()
    their_records = theirs.generate(image)  # set_image is bypassed: the cached embedding serves
    their_decoder = time.perf_counter() - start
    start = time.perf_counter()
    result = ours.generate(image, embedding=embedding)
    our_decoder = time.perf_counter() - start
    size = (image.shape[0], image.shape[1])
    return {
        "pred_iou_thresh": iou,
        "stability_score_thresh": stab,
        "theirs_masks": len(their_records),
        "ours_masks": len(result),
        "ours_decoder_calls": result.decoder_calls,
        "theirs_decoder_s": their_decoder,
        "ours_decoder_s": our_decoder,
        "decoder_ratio": their_decoder / our_decoder,
        **agreement(result.masks.cpu(), theirs_masks(their_records, size)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", type=int, default=32, help="points per side")
    parser.add_argument("--size", type=int, default=1024, help="image side (the CT slice is resized)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--low-iou", type=float, default=0.0, help="lowered pred_iou_thresh")
    parser.add_argument("--low-stability", type=float, default=0.0, help="lowered stability_score_thresh")
    parser.add_argument("--low-grid", type=int, default=16, help="grid side for the lowered thresholds")
    parser.add_argument("--low-nms", type=float, default=0.7, help="box NMS with the lowered thresholds")
    parser.add_argument("--only-lowered", action="store_true", help="skip the default row and LiteMedSAM")
    parser.add_argument("--lite-grid", type=int, default=16, help="grid side for the LiteMedSAM agreement")
    parser.add_argument("--lite-iou", type=float, default=0.0, help="pred_iou_thresh there")
    parser.add_argument("--lite-stability", type=float, default=0.0, help="stability_score_thresh there")
    parser.add_argument(
        "--only-lite-agreement", action="store_true", help="run only the LiteMedSAM agreement section"
    )
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()}, {args.threads} threads, torch {torch.__version__}")
    if args.only_lite_agreement:
        row = lite_agreement(demo_slice(), args)
        if args.json:
            Path(args.json).write_text(json.dumps({"lite_medsam_agreement": row}, indent=1) + "\n")
        return 0
    image = demo_slice(args.size)
    ours_model, reference = sam_vit_b_pair()
    results: dict[str, Any] = {
        "cpu": cpu_model(),
        "threads": args.threads,
        "grid": args.grid,
        "size": args.size,
    }
    from segment_anything import SamAutomaticMaskGenerator
    from segment_anything.utils.amg import build_point_grid

    theirs = SamAutomaticMaskGenerator(reference, points_per_side=args.grid)
    ours = AutomaticMaskGenerator(Predictor(ours_model, precision="fp32"), points_per_side=args.grid)
    with torch.inference_mode():
        start = time.perf_counter()
        theirs.predictor.set_image(image)
        their_encoder = time.perf_counter() - start
        start = time.perf_counter()
        embedding = ours.predictor.embed([image])[0]
        our_encoder = time.perf_counter() - start
    # from here their generate() reuses the cached embedding: set_image/reset_image do nothing
    theirs.predictor.set_image = lambda *a, **k: None
    theirs.predictor.reset_image = lambda *a, **k: None
    results["encoder_s"] = {"theirs": their_encoder, "ours": our_encoder}
    print(f"ViT-B encoder at {args.size}: theirs {their_encoder:.2f} s, ours {our_encoder:.2f} s (fp32)")
    with torch.inference_mode():
        settings = (
            ("default", args.grid, 0.88, 0.95),
            ("lowered", args.low_grid, args.low_iou, args.low_stability),
        )
        for name, grid, iou, stab in settings[1:] if args.only_lowered else settings:
            nms = args.low_nms if name == "lowered" else 0.7
            ours.box_nms_thresh = theirs.box_nms_thresh = nms
            ours.grids = [point_grid(grid)]
            theirs.point_grids = [build_point_grid(grid)]
            row = run_pair(ours, theirs, embedding, image, iou, stab)
            row["grid"] = grid
            row["box_nms_thresh"] = nms
            row["theirs_s"] = their_encoder + row["theirs_decoder_s"]
            row["ours_s"] = our_encoder + row["ours_decoder_s"]
            row["ratio"] = row["theirs_s"] / row["ours_s"]
            results[name] = row
            r = row
            print(
                f"{grid}x{grid} grid, iou>{iou} stab>={stab} nms {nms}: per image theirs "
                f"{r['theirs_s']:.2f} s, ours {r['ours_s']:.2f} s (x{r['ratio']:.2f}); decoder only "
                f"theirs {r['theirs_decoder_s']:.2f} s, ours {r['ours_decoder_s']:.2f} s "
                f"(x{r['decoder_ratio']:.2f}); masks theirs {r['theirs_masks']}, ours {r['ours_masks']} "
                f"({r['ours_decoder_calls']} decoder calls); theirs found by ours: "
                f"{r['found_05']:.1%} at IoU>=0.5, {r['found_09']:.1%} at IoU>=0.9",
                flush=True,
            )
    if args.only_lowered:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        return 0
    lite = load_model(verified_default_checkpoint(), variant="lite_medsam")
    slice_256 = demo_slice()
    generator = AutomaticMaskGenerator(lite, points_per_side=args.grid, precision="fp32")
    start = time.perf_counter()
    lite_result = generator.generate(slice_256)
    lite_s = time.perf_counter() - start
    results["lite_medsam"] = {
        "seconds": lite_s,
        "masks": len(lite_result),
        "precision": generator.predictor.precision,
        "image": list(slice_256.shape[:2]),
    }
    print(
        f"LiteMedSAM (real weights, 256 input, {generator.predictor.precision}) on the "
        f"{slice_256.shape[1]}x{slice_256.shape[0]} slice: {lite_s:.2f} s per image, {len(lite_result)} masks"
    )
    results["lite_medsam_agreement"] = lite_agreement(slice_256, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def lite_agreement(image: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """Both generators on LiteMedSAM's trained decoder weights and one shared embedding (see above)."""
    from oracles import lite_medsam_decoder_in_segment_anything
    from segment_anything import SamAutomaticMaskGenerator

    lite = load_model(verified_default_checkpoint(), variant="lite_medsam")
    ours = AutomaticMaskGenerator(Predictor(lite, precision="fp32"), points_per_side=args.lite_grid)
    with torch.inference_mode():
        embedding = ours.predictor.embed([image])[0]
    theirs = SamAutomaticMaskGenerator(
        lite_medsam_decoder_in_segment_anything(), points_per_side=args.lite_grid
    )
    state = theirs.predictor  # their predictor holds our embedding; set_image/reset_image do nothing
    state.features, state.is_image_set = embedding.embedding, True
    state.original_size, state.input_size = embedding.original_size, embedding.resized_size
    state.set_image = lambda *a, **k: None
    state.reset_image = lambda *a, **k: None
    with torch.inference_mode():
        row = run_pair(ours, theirs, embedding, image, args.lite_iou, args.lite_stability)
    row["grid"] = args.lite_grid
    print(
        f"LiteMedSAM decoder weights in both, {args.lite_grid}x{args.lite_grid} grid, iou>{args.lite_iou} "
        f"stab>={args.lite_stability}: masks theirs {row['theirs_masks']}, ours {row['ours_masks']}; theirs "
        f"found by ours: {row['found_05']:.1%} at IoU>=0.5, {row['found_09']:.1%} at IoU>=0.9 (mean best IoU "
        f"{row['mean_best_iou']:.4f}); decoding theirs {row['theirs_decoder_s']:.2f} s, ours "
        f"{row['ours_decoder_s']:.2f} s (x{row['decoder_ratio']:.2f})"
    )
    return row


if __name__ == "__main__":
    raise SystemExit(main())
