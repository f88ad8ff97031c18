"""What each precision does to masks and speed: fp32, full bf16, the quality-checked bf16 plan, and auto.

One process, the real LiteMedSAM weights, on this CPU:

- 2D: the 30 masks of tests/data/sam_med2d (a tight box per mask, as benchmarks/quality_2d.py);
- organs: every labelled organ of the TotalSegmentator volumes (as benchmarks/propagation_stop.py: a
  tight box on the largest axial slice of each label's largest component, propagated with the default
  stop rule), Dice against the component;
- speed: the LiteMedSAM encoder on one 256 x 256 input at each setting (interleaved, median), as the
  predictor runs it.

Rows: ``fp32``; ``bf16`` (the whole encoder under autocast: what ``--precision bf16`` runs); ``bf16
plan`` (only the parts in ``samadapt.autoprecision.PLANS``, forced on whatever the speed, on single
images and on propagation alike); ``auto`` (what ``--precision auto`` chooses on this machine, and
why; volume propagation embeds at fp32 where the plan was not checked on it). Reported per set: mean
Dice, its change against fp32, and the largest single drop. Targets (issue 11): auto within 0.003 of
fp32 in mean and no mask lower by more than 0.05, and auto never slower than fp32.

    .venv/bin/python benchmarks/precision_quality.py [--cases ct dicom mr] [--skip-organs] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import oracles  # noqa: E402
import propagation_stop as organs_bench  # noqa: E402

from samadapt import Predictor, load_model  # noqa: E402
from samadapt.autoprecision import ENV_SPEEDUP  # noqa: E402
from samadapt.domains.medical.propagation import SlicePrompt, VolumeSegmenter, slice_image  # noqa: E402
from samadapt.domains.medical.slices import read_volume_pair  # noqa: E402
from samadapt.precision import cpu_model  # noqa: E402
from samadapt.weights import verified_default_checkpoint  # noqa: E402

MEAN_TOLERANCE, WORST_DROP = 0.003, 0.05
SETTINGS = ("fp32", "bf16", "bf16 plan", "auto")


def predictors(model: torch.nn.Module) -> dict[str, Predictor]:
    """fp32, full bf16, the plan forced on, and auto as this machine resolves it."""
    out = {"fp32": Predictor(model, precision="fp32"), "bf16": Predictor(model, precision="bf16")}
    saved = os.environ.get(ENV_SPEEDUP)
    os.environ[ENV_SPEEDUP] = "99"  # force the plan, whatever it measures here
    try:
        forced = Predictor(model, precision="auto")
        forced.propagation_plan = forced.precision_plan  # the plan on propagation too, to show its effect
        out["bf16 plan"] = forced
    finally:
        if saved is None:
            del os.environ[ENV_SPEEDUP]
        else:
            os.environ[ENV_SPEEDUP] = saved
    out["auto"] = Predictor(model, precision="auto")
    return out


def dice_2d(runs: dict[str, Predictor]) -> dict[str, list[float]]:
    cases = oracles.load_sam_med2d()
    dices: dict[str, list[float]] = {name: [] for name in runs}
    for group in oracles.group_by_image(cases).values():
        boxes = np.stack([c.box for c in group]).astype(np.float64)
        for name, predictor in runs.items():
            embedding = predictor.embed([group[0].image])[0]
            masks = predictor.predict(boxes=boxes, embedding=embedding).masks[:, 0]
            dices[name] += [oracles.dice(masks[i], c.mask) for i, c in enumerate(group)]
    return dices


def dice_organs(runs: dict[str, Predictor], cases: list[str]) -> tuple[dict[str, list[float]], list[str]]:
    dices: dict[str, list[float]] = {name: [] for name in runs}
    names: list[str] = []
    label_names = json.loads((organs_bench.DATA / "class_map_total_and_total_mr.json").read_text())
    for case in cases:
        image_file, label_file, task = organs_bench.CASES[case]
        image, labels, _ = read_volume_pair(organs_bench.DATA / image_file, organs_bench.DATA / label_file)
        objects = []
        for value in [int(v) for v in np.unique(labels) if v != 0]:
            component = organs_bench.largest_component(labels == value)
            areas = component.sum(axis=(0, 1))
            if np.count_nonzero(areas) < organs_bench.MIN_SLICES or component.sum() < organs_bench.MIN_VOXELS:
                continue
            k = int(areas.argmax())
            box = organs_bench.tight_box(slice_image(component, "axial", k))
            objects.append((component, SlicePrompt(k, box=box)))
            names.append(f"{case}/{label_names[task].get(str(value), value)}")
        for name, predictor in runs.items():
            started = time.perf_counter()
            segmenter = VolumeSegmenter(predictor, image, "axial", batch_size=4)
            for component, prompt in objects:
                dices[name].append(organs_bench.dice(segmenter.segment(prompt), component))
            print(
                f"  {case} {name}: {len(objects)} organs in {time.perf_counter() - started:.0f} s", flush=True
            )
    return dices, names


def encoder_seconds(runs: dict[str, Predictor], repeats: int) -> dict[str, float]:
    """Median seconds per LiteMedSAM encoder pass (1 x 3 x 256 x 256), settings interleaved."""
    x = torch.rand(1, 3, 256, 256)
    for predictor in runs.values():
        for _ in range(2):
            predictor.encode_batch(x)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, predictor in runs.items():
            start = time.perf_counter()
            predictor.encode_batch(x)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def table(title: str, dices: dict[str, list[float]], labels: list[str]) -> dict[str, Any]:
    base = np.asarray(dices["fp32"])
    print(f"\n{title} ({len(base)} masks)\n")
    print("| setting | mean Dice | vs fp32 | largest drop (mask) | within target |")
    print("|---|---|---|---|---|")
    rows = {}
    for name, values in dices.items():
        delta = np.asarray(values) - base
        worst = int(delta.argmin())
        ok = abs(delta.mean()) <= MEAN_TOLERANCE and delta.min() >= -WORST_DROP
        print(
            f"| {name} | {np.mean(values):.4f} | {delta.mean():+.4f} | "
            f"{delta.min():+.3f} ({labels[worst]}) | {'yes' if ok else 'no'} |"
        )
        rows[name] = {
            "mean": float(np.mean(values)),
            "delta": float(delta.mean()),
            "worst_drop": float(delta.min()),
            "worst_mask": labels[worst],
            "within_target": bool(ok),
            "per_mask": dict(zip(labels, map(float, values), strict=True)),
        }
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cases", nargs="+", choices=list(organs_bench.CASES), default=list(organs_bench.CASES)
    )
    parser.add_argument("--skip-organs", action="store_true", help="the 2D set and the speed only")
    parser.add_argument("--repeats", type=int, default=15, help="timed encoder passes per setting")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=list(SETTINGS),
        choices=list(SETTINGS),
        help="rows to run (fp32 always)",
    )
    args = parser.parse_args(argv)
    args.settings = ["fp32", *[s for s in args.settings if s != "fp32"]]

    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    model = load_model(verified_default_checkpoint())
    runs = {name: p for name, p in predictors(model).items() if name in args.settings}
    auto = predictors(model)["auto"] if "auto" not in runs else runs["auto"]
    print(f"auto chose: {auto.precision_plan.describe()}\n  why: {auto.precision_plan.reason}")
    results: dict[str, Any] = {
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "auto": {
            "precision": auto.precision,
            "parts": auto.precision_plan.describe(),
            "why": auto.precision_plan.reason,
        },
    }

    seconds = encoder_seconds(runs, args.repeats)
    print("\nLiteMedSAM encoder, one 256 x 256 input (median, interleaved)\n")
    print("| setting | s per pass | speed-up vs fp32 |")
    print("|---|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {value:.3f} | {seconds['fp32'] / value:.2f}x |")
    results["encoder_seconds"] = seconds

    cases_2d = [c.name for c in oracles.load_sam_med2d()]
    results["sam_med2d"] = table("2D: sam_med2d, tight boxes", dice_2d(runs), cases_2d)
    if not args.skip_organs:
        print("\norgans (propagation, default stop rule):", flush=True)
        dices, names = dice_organs(runs, args.cases)
        results["organs"] = table(
            "Organs: TotalSegmentator, box on the largest slice, --stop auto", dices, names
        )
    print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
