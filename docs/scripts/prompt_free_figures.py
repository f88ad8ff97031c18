"""Render docs/img/amg_ct.png (and docs/img/amg_rasterio.png): "segment everything" instance maps.

The real LiteMedSAM weights (the only real weights bundled) on the bundled
CT slice (core/assets/demo_ct.png) and, when present, on a 512 x 512 tile of ../shared/data/rasterio's
RGB.byte.tif. Each figure shows the image and the instance label map over it (one colour per mask).
LiteMedSAM was trained on boxes with the single-mask token, so SAM's defaults keep nothing: the figures
use the single-mask token and lowered thresholds (predicted IoU > 0.3, stability >= 0.5 at offset 0.5),
the settings docs/prompt_free.md recommends for it, on a 16 x 16 grid (the CPU here is shared).

    .venv/bin/python docs/scripts/prompt_free_figures.py [--grid 32] [--no-rasterio]

Needs the dev extra (matplotlib).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from samadapt import load_model
from samadapt.automatic import AutomaticMaskGenerator
from samadapt.weights import verified_default_checkpoint

ROOT = Path(__file__).resolve().parents[2]
IMG = ROOT / "docs" / "img"
RASTERIO = ROOT.parent / "shared" / "data" / "rasterio" / "RGB.byte.tif"


def colour_map(labels: np.ndarray, seed: int = 3) -> np.ndarray:
    """(H, W) labels -> (H, W, 4) RGBA, a random colour per label, background transparent."""
    rng = np.random.default_rng(seed)
    palette = np.concatenate(
        [rng.uniform(0.15, 1.0, (int(labels.max()) + 1, 3)), np.full((int(labels.max()) + 1, 1), 0.55)], 1
    )
    palette[0] = 0
    return palette[labels]


def figure(image: np.ndarray, generator: AutomaticMaskGenerator, title: str, path: Path) -> str:
    start = time.perf_counter()
    result = generator.generate(image)
    seconds = time.perf_counter() - start
    labels = result.label_map()
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2))
    for ax in axes:
        ax.imshow(image, cmap="gray")
        ax.axis("off")
    axes[1].imshow(colour_map(labels), interpolation="nearest")
    for record in result.records:
        x, y = record.point
        axes[1].plot(x, y, "w.", markersize=3)
    axes[0].set_title(title)
    side = generator.points_per_side
    axes[1].set_title(f"{len(result)} masks (LiteMedSAM, {side}x{side} grid, single-mask)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)  # a palette PNG: 3x smaller
    line = f"{path.relative_to(ROOT)}: {len(result)} masks in {seconds:.1f} s"
    print(line)
    return line


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--no-rasterio", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = load_model(verified_default_checkpoint(), variant="lite_medsam")
    torch.set_num_threads(args.threads)
    generator = AutomaticMaskGenerator(
        model,
        points_per_side=args.grid,
        pred_iou_thresh=0.3,
        stability_score_thresh=0.5,
        stability_score_offset=0.5,
        multimask_output=False,
        precision="fp32",
    )
    ct = np.asarray(Image.open(ROOT / "core" / "assets" / "demo_ct.png").convert("RGB"))
    figure(ct, generator, "CT slice (core/assets/demo_ct.png)", IMG / "amg_ct.png")
    if not args.no_rasterio and RASTERIO.exists():
        tile = np.asarray(Image.open(RASTERIO).convert("RGB"))[100:612, 150:662]
        figure(tile, generator, "Landsat RGB tile (rasterio RGB.byte.tif)", IMG / "amg_rasterio.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
