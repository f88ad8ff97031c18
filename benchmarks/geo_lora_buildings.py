"""LoRA on part of the solaris buildings, evaluated on the rest, through the commands users run.

Data: ``sample_geotiff.tif`` (900 x 900 16-bit pan, 0.5 m, EPSG:32616) and the 43 manual building polygons of
``geotiff_labels.geojson`` (solaris test data, copied in tests/data/geo). Split by region, never by pixel:
the buildings whose centroid lies west of the median centroid easting train (the first ``--val-buildings``
of them, by id, validate); the eastern half is held out and only ever seen as test prompts. A training
crop that holds any pixel of a held-out building is dropped.

1. Training crops: for each training building, the window ``samadapt geo segment --zoom auto`` would segment
   it on (:func:`samadapt.domains.remote_sensing.segment.prompt_window`), plus ``--jitter`` copies with the
   window's side scaled by 0.8-1.3 and shifted by up to a quarter side, read through ``GeoRaster`` (the same
   global stretch as inference) and written as ``images/<name>.png`` + ``masks/<name>.png`` (a label map of
   the training buildings in the crop: one sample per building).
2. ``samadapt fit --config recipes/lora/litemedsam.yaml --data.root TRAIN --data.val_root VAL
   --trainer.max_steps STEPS --out ADAPTER`` (the recipe as shipped: rank-4 LoRA, bundled LiteMedSAM).
3. ``samadapt geo segment sample_geotiff.tif --prompts test.geojson -o base.tif`` and the same with
   ``--adapter ADAPTER``: the mean IoU of each held-out building with its prompt's instance.

    .venv/bin/python benchmarks/geo_lora_buildings.py [--steps 200] [--jitter 5] [--keep DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RASTER = REPO / "tests/data/geo/sample_geotiff.tif"
LABELS = REPO / "tests/data/geo/geotiff_labels.geojson"
SAMADAPT = str(Path(sys.executable).with_name("samadapt"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def split_buildings(val_buildings: int) -> dict[str, list[int]]:
    """Feature ids (1-based, file order) of the train / val / test buildings (west / west / east)."""
    import pyogrio.raw
    import shapely

    _, _, wkb, _ = pyogrio.raw.read(LABELS)
    easting = np.array([shapely.centroid(g).x for g in shapely.from_wkb(wkb)])
    median = float(np.median(easting))
    west = [n for n, x in enumerate(easting, start=1) if x < median]
    east = [n for n, x in enumerate(easting, start=1) if x >= median]
    return {"train": west[val_buildings:], "val": west[:val_buildings], "test": east, "split_x": [median]}


def write_test_prompts(ids: list[int], path: Path) -> None:
    """The held-out features, in file order, as a GeoJSON (prompt n of the output = ids[n-1])."""
    data = json.loads(LABELS.read_text())
    data["features"] = [f for n, f in enumerate(data["features"], start=1) if n in set(ids)]
    path.write_text(json.dumps(data))


def write_crops(split: dict[str, list[int]], root: Path, jitter: int, seed: int) -> dict[str, int]:
    """images/ + masks/ folders of zoom-window crops around the train and val buildings."""
    import pyogrio.raw
    import shapely
    from PIL import Image
    from rasterio.features import rasterize
    from rasterio.windows import Window

    from samadapt.domains.remote_sensing.raster import GeoRaster
    from samadapt.domains.remote_sensing.segment import prompt_window

    rng = np.random.default_rng(seed)
    _, _, wkb, _ = pyogrio.raw.read(LABELS)
    geoms = shapely.from_wkb(wkb)
    counts = {}
    with GeoRaster.open(RASTER) as raster:
        shape = (raster.height, raster.width)
        ids = np.zeros(shape, np.int32)
        for n, geom in enumerate(geoms, start=1):
            ids[rasterize([(geom, 1)], out_shape=shape, transform=raster.transform).astype(bool)] = n
        held_out = np.isin(ids, split["test"])
        for part in ("train", "val"):
            (root / part / "images").mkdir(parents=True)
            (root / part / "masks").mkdir(parents=True)
            kept = 0
            for n in split[part]:
                rows, cols = np.nonzero(ids == n)
                box = np.array([cols.min(), rows.min(), cols.max(), rows.max()], float)
                base, _ = prompt_window(box, "box", 256, 256, (raster.width, raster.height), "auto")
                windows = [base]
                for _ in range(jitter if part == "train" else 0):
                    side = max(16, round(base.width * rng.uniform(0.8, 1.3)))
                    dx, dy = rng.uniform(-0.25, 0.25, 2) * side
                    cx = base.col_off + base.width / 2 + dx
                    cy = base.row_off + base.height / 2 + dy
                    windows.append(Window(round(cx - side / 2), round(cy - side / 2), side, side))
                for k, window in enumerate(windows):
                    r0, c0 = int(window.row_off), int(window.col_off)
                    h, w = int(window.height), int(window.width)
                    rs = slice(max(r0, 0), min(r0 + h, shape[0]))
                    cs = slice(max(c0, 0), min(c0 + w, shape[1]))
                    if held_out[rs, cs].any():
                        continue  # never show a held-out building's pixels in training
                    image, _valid = raster.read(window)
                    crop = np.zeros((h, w), np.int32)
                    crop[rs.start - r0 : rs.stop - r0, cs.start - c0 : cs.stop - c0] = ids[rs, cs]
                    labels = np.zeros((h, w), np.uint8)
                    for value, building in enumerate(np.unique(crop[crop > 0]), start=1):
                        labels[crop == building] = value
                    if labels.max() == 0:
                        continue
                    Image.fromarray(image).save(root / part / "images" / f"b{n:02d}_{k}.png")
                    Image.fromarray(labels).save(root / part / "masks" / f"b{n:02d}_{k}.png")
                    kept += 1
            counts[f"{part}_crops"] = kept
    return counts


def run(command: list[str]) -> str:
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def test_ious(output: Path, ids: list[int]) -> np.ndarray:
    """IoU of output instance k (k-th test prompt) with building ids[k-1]."""
    import pyogrio.raw
    import rasterio
    import shapely
    from rasterio.features import rasterize

    _, _, wkb, _ = pyogrio.raw.read(LABELS)
    geoms = shapely.from_wkb(wkb)
    with rasterio.open(output) as src:
        pred_ids, transform = src.read(1), src.transform
    ious = []
    for k, n in enumerate(ids, start=1):
        truth = rasterize([(geoms[n - 1], 1)], out_shape=pred_ids.shape, transform=transform).astype(bool)
        pred = pred_ids == k
        ious.append((truth & pred).sum() / max((truth | pred).sum(), 1))
    return np.asarray(ious)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--jitter", type=int, default=5, help="jittered copies per training building")
    parser.add_argument("--val-buildings", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="keep crops, adapter and outputs here")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    import torch

    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        split = split_buildings(args.val_buildings)
        counts = write_crops(split, work / "crops", args.jitter, args.seed)
        write_test_prompts(split["test"], work / "test.geojson")
        print(
            f"split at easting {split['split_x'][0]:.1f}: train {len(split['train'])} buildings "
            f"({counts['train_crops']} crops), val {len(split['val'])} ({counts['val_crops']}), "
            f"test {len(split['test'])}",
            flush=True,
        )
        started = time.perf_counter()
        run(
            [
                SAMADAPT, "fit", "--config", str(REPO / "recipes/lora/litemedsam.yaml"),
                "--data.root", str(work / "crops/train"), "--data.val_root", str(work / "crops/val"),
                "--trainer.max_steps", str(args.steps), "--trainer.max_epochs", "1000",
                "--trainer.val_check_interval", str(max(args.steps // 4, 1)),
                "--trainer.default_root_dir", str(work / "runs"), "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false", "--seed_everything", str(args.seed),
                "--out", str(work / "adapter"),
            ]
        )  # fmt: skip
        train_seconds = time.perf_counter() - started
        results = {}
        for name, extra in (("base", []), ("lora", ["--adapter", str(work / "adapter")])):
            run(
                [
                    SAMADAPT, "geo", "segment", str(RASTER), "--prompts", str(work / "test.geojson"),
                    "-o", str(work / f"{name}.tif"), "--no-progress",
                    "--cache-dir", str(work / "cache"), *extra,
                ]
            )  # fmt: skip
            ious = test_ious(work / f"{name}.tif", split["test"])
            results[name] = {
                "mean_iou": round(float(ious.mean()), 4),
                "ious": [round(float(v), 4) for v in ious],
            }
        report = {
            "cpu": cpu_model(),
            "split": {k: v for k, v in split.items()},
            **counts,
            "steps": args.steps,
            "train_seconds": round(train_seconds, 1),
            "adapter": json.loads((work / "adapter" / "adapter.json").read_text()).get("training"),
            **results,
        }
    print(f"held-out buildings ({len(split['test'])}): mean IoU base {results['base']['mean_iou']:.3f}, "
          f"LoRA {results['lora']['mean_iou']:.3f} ({args.steps} steps, {train_seconds:.0f} s)")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
