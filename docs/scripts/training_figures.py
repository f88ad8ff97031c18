"""Render docs/img/training_before_after.png and docs/img/training_curve.png from a finetune_2d.py run.

Needs the folder and JSON of ``benchmarks/finetune_2d.py --keep DIR --json FILE``:

    .venv/bin/python docs/scripts/training_figures.py --keep DIR --json FILE [--recipe NAME]

- before/after: sam_med2d slices with every mask's tight box; the bundled LiteMedSAM's masks, the masks
  with the best adapter of the run (highest mean Dice after; or ``--recipe``), and the ground truth.
- curve: that run's CSV logger ``metrics.csv`` (DIR/runs/<recipe>/.../metrics.csv): train/loss per
  logged step, val/dice at each validation.
Needs matplotlib (the dev extra).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import finetune_2d  # noqa: E402
import oracles  # noqa: E402

from samadapt import Predictor, load_model  # noqa: E402
from samadapt.adapter import load_adapter  # noqa: E402
from samadapt.weights import checkpoint_sha256, verified_default_checkpoint  # noqa: E402

IMG = ROOT / "docs" / "img"
SLICES = ("amos_0004_75", "amos_0006_90", "s0114_111", "s0619_32")


def predict(cases: list[oracles.MaskCase], adapter: Path | None) -> dict[str, np.ndarray]:
    checkpoint = verified_default_checkpoint()
    model = load_model(checkpoint)
    if adapter is not None:
        load_adapter(adapter, model, base_sha256=checkpoint_sha256(checkpoint))
    predictor = Predictor(model, device="cpu", precision="fp32")
    out: dict[str, np.ndarray] = {}
    for group in oracles.group_by_image(cases).values():
        embedding = predictor.embed([group[0].image])[0]
        boxes = np.stack([c.box for c in group]).astype(np.float64)
        masks = predictor.predict(boxes=boxes, embedding=embedding).masks[:, 0]
        out.update({c.name: masks[i] for i, c in enumerate(group)})
    return out


def overlay(
    ax, image: np.ndarray, masks: list[np.ndarray], boxes: list[np.ndarray] | None, title: str
) -> None:
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, 20))[:, :3]
    shown = image.astype(np.float32) / 255.0
    for n, mask in enumerate(masks):
        shown[mask] = 0.5 * shown[mask] + 0.5 * colours[n % 20]
    ax.imshow(shown)
    for box in boxes or []:
        x0, y0, x1, y1 = box
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=0.6, ec="yellow"))
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def before_after(cases: list[oracles.MaskCase], adapter: Path, label: str, target: Path) -> None:
    base, tuned = predict(cases, None), predict(cases, adapter)
    groups = {k: v for k, v in oracles.group_by_image(cases).items() if k in SLICES}
    fig, axes = plt.subplots(len(groups), 3, figsize=(10, 3.4 * len(groups)))
    for row, (stem, group) in zip(axes, groups.items(), strict=True):
        image, boxes = group[0].image, [c.box for c in group]
        d_base = np.mean([oracles.dice(base[c.name], c.mask) for c in group])
        d_tuned = np.mean([oracles.dice(tuned[c.name], c.mask) for c in group])
        overlay(row[0], image, [base[c.name] for c in group], boxes, f"{stem}: LiteMedSAM, Dice {d_base:.3f}")
        overlay(row[1], image, [tuned[c.name] for c in group], boxes, f"+ {label}, Dice {d_tuned:.3f}")
        overlay(row[2], image, [c.mask for c in group], None, f"ground truth ({len(group)} masks)")
    fig.tight_layout()
    fig.savefig(target, dpi=90)
    plt.close(fig)
    print(f"wrote {target}")


def metrics_csv(keep: Path, recipe_file: str) -> Path:
    """The newest CSV logger file of a recipe's runs (its trainer.default_root_dir under ``keep``)."""
    import yaml

    root_dir = yaml.safe_load((ROOT / recipe_file).read_text())["trainer"]["default_root_dir"]
    found = sorted((keep / root_dir).rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no metrics.csv under {keep / root_dir}")
    return found[-1]


def curve(path: Path, label: str, target: Path) -> None:
    train: list[tuple[int, float]] = []
    val: list[tuple[int, float]] = []
    with path.open() as handle:
        for row in csv.DictReader(handle):
            step = int(row["step"])
            if row.get("train/loss"):
                train.append((step, float(row["train/loss"])))
            if row.get("val/dice"):
                val.append((step + 1, float(row["val/dice"])))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    if train:
        ax.plot(*zip(*train, strict=True), "-o", ms=3, color="tab:blue", label="train/loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train/loss (Dice + BCE + IoU MSE)", color="tab:blue")
    if val:
        twin = ax.twinx()
        twin.plot(*zip(*val, strict=True), "-s", ms=5, color="tab:red", label="val/dice")
        twin.set_ylabel("val/dice (held-out MR volume)", color="tab:red")
    ax.set_title(f"{label}: {path.parent.name}/metrics.csv", fontsize=9)
    fig.tight_layout()
    fig.savefig(target, dpi=90)
    plt.close(fig)
    print(f"wrote {target} from {path}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep", type=Path, required=True, help="the --keep folder of finetune_2d.py")
    parser.add_argument("--json", type=Path, required=True, help="the --json file of finetune_2d.py")
    parser.add_argument("--recipe", choices=list(finetune_2d.RECIPES), help="default: best mean Dice after")
    args = parser.parse_args()
    results = json.loads(args.json.read_text())["recipes"]
    name = args.recipe or max(results, key=lambda n: results[n]["dice_after"])
    label = finetune_2d.RECIPES[name][1]
    cases = oracles.load_sam_med2d(finetune_2d.SAM_MED2D)
    before_after(cases, Path(results[name]["adapter"]), label, IMG / "training_before_after.png")
    curve(metrics_csv(args.keep, results[name]["recipe"]), label, IMG / "training_curve.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
