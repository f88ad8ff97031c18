"""Prompt robustness: a correct click against a wrong one, plain core against DeSAM; AutoSAM prompt-free.

Trains two adapters on the bundled LiteMedSAM for ONE class, the **liver** (TotalSegmentator label 5, in
both its CT and MR maps), on the TotalSegmentator example volumes (the data root of
benchmarks/finetune_2d.py: three labelled volumes, TotalSegmentator's own output as pseudo ground truth),
each by a separate process running exactly

    samadapt fit --config recipes/desam/desam.yaml  --data.root DIR --data.labels [5] --out DIR ...
    samadapt fit --config recipes/autosam/autosam.yaml --data.root DIR --data.labels [5]
                 --model.adapter.init_args.classes [5] --out DIR ...

then evaluates on the held-out **liver masks of ../shared/data/sam_med2d** (AMOS CT slices, manual labels,
other patients and another data set than the training volumes), fp32, samadapt's ``Predictor``:

- a **correct click**: one foreground point at the mask's most interior pixel (the maximum of its
  distance transform);
- a **wrong click**: one point on the background, labelled foreground as a user's slip would be:
  ``near`` = the pixel nearest to the correct click that lies ``--miss-distance`` pixels (default 12)
  outside the object (a near miss), and ``random`` = ``--random-clicks`` points drawn (seeded) on the
  body (pixels brighter than the image's 20th percentile) at least that far from the object; Dice
  averaged over them;
- for the plain core (the bundled LiteMedSAM, single-mask output) and for the core with the DeSAM
  adapter: Dice with the correct click, with the wrong clicks, and the drop;
- the AutoSAM adapter with no prompt at all, next to the plain core with a tight box on the same masks.

The plain core is also reported on all 30 sam_med2d masks (every organ) for context.

    .venv/bin/python benchmarks/prompt_robustness.py [--steps 120] [--batch-size 4] [--keep DIR]
        [--resume] [--json out.json] [--figure docs/img/desam_wrong_click.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))

from finetune_2d import SAM_MED2D, evaluate, load_average, make_data_root, oracles, train

import samadapt
from samadapt import Predictor
from samadapt.adapter import load_adapter
from samadapt.precision import cpu_model
from samadapt.weights import checkpoint_sha256, verified_default_checkpoint

LIVER = 5  # TotalSegmentator "total" and "total_mr"
TEST_ORGAN = "liver"
CLICK_MODELS = {
    "point_decoder": "LiteMedSAM, decoder point-trained",
    "desam": "LiteMedSAM + DeSAM",
}  # sam_med2d mask names: <image>_liver_000.png
#: name -> (recipe, extra fit arguments)
ADAPTERS = {
    # the plain core's decoder trained with one random foreground click per object, same data, lr and steps
    "point_decoder": (
        "recipes/medsam/decoder.yaml",
        [f"--data.labels=[{LIVER}]", "--model.adapter.init_args.prompt=point", "--model.lr=1e-4"],
    ),
    "desam": ("recipes/desam/desam.yaml", [f"--data.labels=[{LIVER}]"]),
    "autosam": (
        "recipes/autosam/autosam.yaml",
        [f"--data.labels=[{LIVER}]", f"--model.adapter.init_args.classes=[{LIVER}]"],
    ),
}


@dataclass
class Clicks:
    """The clicks of one test mask, (x, y) pixel coordinates of the original image."""

    correct: np.ndarray  # (2,)
    near: np.ndarray  # (2,)
    random: np.ndarray  # (R, 2)


def interior_point(mask: np.ndarray) -> np.ndarray:
    """(x, y) of the pixel farthest from the mask's border (ties: the first in raster order)."""
    depth = ndimage.distance_transform_edt(mask)
    row, col = np.unravel_index(int(np.argmax(depth)), mask.shape)
    return np.array([col, row], dtype=np.float64)


def wrong_clicks(image: np.ndarray, mask: np.ndarray, distance: float, count: int, seed: int) -> Clicks:
    """The correct click, the nearest near miss ``distance`` px outside the mask, random body misses."""
    correct = interior_point(mask)
    outside = ndimage.distance_transform_edt(~mask)  # distance to the object, 0 inside
    far_enough = outside >= distance
    rows, cols = np.nonzero(far_enough)
    nearest = int(np.argmin((cols - correct[0]) ** 2 + (rows - correct[1]) ** 2))
    near = np.array([cols[nearest], rows[nearest]], dtype=np.float64)
    gray = image.mean(axis=2) if image.ndim == 3 else image
    body = far_enough & (gray > np.percentile(gray, 20))
    rows, cols = np.nonzero(body)
    pick = np.random.default_rng(seed).choice(rows.size, size=count, replace=False)
    random = np.stack([cols[pick], rows[pick]], axis=1).astype(np.float64)
    return Clicks(correct, near, random)


def click_dice(
    predictor: Predictor, embedding: Any, point: np.ndarray, truth: np.ndarray
) -> tuple[float, float]:
    """Dice of the single-mask output for one foreground click, and the predicted IoU."""
    pred = predictor.predict(point_coords=point[None], point_labels=[1], embedding=embedding)
    return oracles.dice(pred.masks[0, 0], truth), float(pred.scores[0, 0])


def predictor_with(adapter: Path | None) -> Predictor:
    checkpoint = verified_default_checkpoint()
    model = samadapt.load_model(checkpoint)
    if adapter is not None:
        load_adapter(adapter, model, base_sha256=checkpoint_sha256(checkpoint))
    return Predictor(model, device="cpu", precision="fp32")


def click_rows(
    predictor: Predictor, cases: list[oracles.MaskCase], clicks: dict[str, Clicks]
) -> dict[str, dict[str, float]]:
    """Per mask: Dice and predicted IoU with the correct click, the near miss and the random misses."""
    rows: dict[str, dict[str, float]] = {}
    for group in oracles.group_by_image(cases).values():
        embedding = predictor.embed([group[0].image])[0]
        for case in group:
            c = clicks[case.name]
            correct, correct_iou = click_dice(predictor, embedding, c.correct, case.mask)
            near, near_iou = click_dice(predictor, embedding, c.near, case.mask)
            randoms = [click_dice(predictor, embedding, p, case.mask) for p in c.random]
            rows[case.name] = {
                "correct": correct,
                "near_miss": near,
                "random_miss": float(np.mean([d for d, _ in randoms])),
                "iou_pred_correct": correct_iou,
                "iou_pred_near_miss": near_iou,
                "iou_pred_random_miss": float(np.mean([s for _, s in randoms])),
            }
    return rows


def prompt_free_dice(predictor: Predictor, cases: list[oracles.MaskCase]) -> dict[str, float]:
    """AutoSAM: no prompt; the class's mask against each test mask."""
    out: dict[str, float] = {}
    for group in oracles.group_by_image(cases).values():
        embedding = predictor.embed([group[0].image])[0]
        mask = predictor.predict(embedding=embedding).masks[0, 0]
        for case in group:
            out[case.name] = oracles.dice(mask, case.mask)
    return out


def summarise(rows: dict[str, dict[str, float]]) -> dict[str, float]:
    keys = next(iter(rows.values())).keys()
    mean = {k: float(np.mean([r[k] for r in rows.values()])) for k in keys}
    mean["drop_near_miss"] = mean["correct"] - mean["near_miss"]
    mean["drop_random_miss"] = mean["correct"] - mean["random_miss"]
    return mean


def draw_figure(
    path: Path, case: oracles.MaskCase, clicks: Clicks, plain: Predictor, desam: Predictor
) -> None:
    """2 x 2 panels: plain core and DeSAM, each with the correct click and the near miss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(8, 8.4))
    models = (("LiteMedSAM, decoder point-trained", plain), ("LiteMedSAM + DeSAM", desam))
    for row, (name, predictor) in enumerate(models):
        embedding = predictor.embed([case.image])[0]
        for col, (what, point) in enumerate(
            (("correct click", clicks.correct), ("wrong click", clicks.near))
        ):
            pred = predictor.predict(point_coords=point[None], point_labels=[1], embedding=embedding)
            mask = pred.masks[0, 0]
            ax = axes[row, col]
            ax.imshow(case.image, cmap="gray")
            overlay = np.zeros((*mask.shape, 4))
            overlay[mask] = (1.0, 0.55, 0.0, 0.45)
            ax.imshow(overlay)
            ax.contour(case.mask, levels=[0.5], colors=["#00d0ff"], linewidths=1.0)
            ax.plot(*point, marker="*", color="red" if col else "lime", markersize=16, markeredgecolor="k")
            dice = oracles.dice(mask, case.mask)
            ax.set_title(
                f"{name}\n{what}: Dice {dice:.2f}, IoU pred {float(pred.scores[0, 0]):.2f}", fontsize=9
            )
            ax.axis("off")
    fig.suptitle(f"{case.name}: liver (cyan outline = manual label)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per adapter (default 120)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--val-checks", type=int, default=3)
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--adapters", nargs="+", choices=list(ADAPTERS), default=list(ADAPTERS))
    parser.add_argument("--miss-distance", type=float, default=12.0, help="pixels outside the object")
    parser.add_argument("--random-clicks", type=int, default=8, help="random background clicks per mask")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="keep data root, logs and adapters in this folder")
    parser.add_argument("--resume", action="store_true", help="with --keep: reuse finished trainings")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--figure", type=Path, help="write the wrong-click picture (needs desam)")
    args = parser.parse_args(argv)
    if args.resume and args.keep is None:
        parser.error("--resume needs --keep DIR")
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {load_average()}")

    every = oracles.load_sam_med2d(SAM_MED2D)
    cases = [c for c in every if f"_{TEST_ORGAN}_" in c.name]
    if not cases:
        raise SystemExit(f"no {TEST_ORGAN} mask in {SAM_MED2D}")
    print(f"test set: {len(cases)} {TEST_ORGAN} masks ({', '.join(c.name for c in cases)}) of {SAM_MED2D}")
    clicks = {
        c.name: wrong_clicks(c.image, c.mask, args.miss_distance, args.random_clicks, args.seed + i)
        for i, c in enumerate(every)
    }
    results: dict[str, Any] = {
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "class": f"liver (label {LIVER})",
        "test_masks": [c.name for c in cases],
        "miss_distance": args.miss_distance,
        "random_clicks": args.random_clicks,
    }
    plain = predictor_with(None)
    all_rows = click_rows(plain, every, clicks)
    results["plain_all_organs"] = summarise(all_rows)
    results["plain"] = {"per_mask": {n: all_rows[n] for n in (c.name for c in cases)}}
    results["plain"].update(summarise(results["plain"]["per_mask"]))
    boxes = dict(zip((c.name for c in cases), evaluate(cases, None), strict=True))  # tight boxes
    results["plain_box"] = {"per_mask": boxes, "mean": float(np.mean(list(boxes.values())))}

    predictors: dict[str, Predictor] = {}
    temp = None
    if args.keep is not None:
        work = args.keep.resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        temp = tempfile.TemporaryDirectory(prefix="prompt_robustness_")
        work = Path(temp.name)
    try:
        data_root = make_data_root(work / "data")
        for name in args.adapters:
            saved = work / f"{name}.result.json"
            if args.resume and saved.is_file():
                run = json.loads(saved.read_text())
                print(f"[{name}] reused {saved} (--resume)")
            else:
                recipe, extra = ADAPTERS[name]
                run = train(name, data_root, work, args, extra, recipe=recipe)
                saved.write_text(json.dumps(run, indent=2) + "\n")
            predictor = predictor_with(Path(str(run["adapter"])))
            if name in CLICK_MODELS:
                rows = click_rows(predictor, cases, clicks)
                run["per_mask"] = rows
                run.update(summarise(rows))
                predictors[name] = predictor
            else:
                free = prompt_free_dice(predictor, cases)
                run["per_mask"] = free
                run["mean"] = float(np.mean(list(free.values())))
            results[name] = run
            if args.json:
                args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    finally:
        if temp is not None:
            temp.cleanup()
    if args.figure and set(CLICK_MODELS) <= set(predictors):
        figure_case = max(cases, key=lambda c: int(c.mask.sum()))
        draw_figure(
            args.figure,
            figure_case,
            clicks[figure_case.name],
            predictors["point_decoder"],
            predictors["desam"],
        )
        print(f"wrote {args.figure}")

    print(
        f"\n{len(cases)} held-out {TEST_ORGAN} masks, fp32; adapters: {args.steps} steps x {args.batch_size}"
    )
    header = (
        f"{'model':<38} {'correct click':>13} {'near miss':>10} {'random miss':>12} "
        f"{'drop (near)':>12} {'drop (random)':>14}"
    )
    print(header)
    print("-" * len(header))
    rows_shown = [
        ("bundled LiteMedSAM (box-trained), 30", results["plain_all_organs"]),
        ("bundled LiteMedSAM (box-trained)", results["plain"]),
    ] + [(label, results[name]) for name, label in CLICK_MODELS.items() if name in results]
    for label, row in rows_shown:
        print(
            f"{label:<38} {row['correct']:>13.4f} {row['near_miss']:>10.4f} {row['random_miss']:>12.4f} "
            f"{row['drop_near_miss']:>12.4f} {row['drop_random_miss']:>14.4f}"
        )
    if set(CLICK_MODELS) <= set(results):
        desam, plain_core = results["desam"], results["point_decoder"]
        smaller = all(desam[k] < plain_core[k] for k in ("drop_near_miss", "drop_random_miss"))
        results["desam_drop_smaller"] = smaller
        print(f"DeSAM's drop is {'smaller' if smaller else 'NOT smaller'} than the point-trained core's")
    print(f"\nplain LiteMedSAM, tight box: mean Dice {results['plain_box']['mean']:.4f}")
    if "autosam" in results:
        print(f"AutoSAM ({TEST_ORGAN}), no prompt: mean Dice {results['autosam']['mean']:.4f}")
    print(f"load average at end: {load_average()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
