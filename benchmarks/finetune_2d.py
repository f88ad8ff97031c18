"""Fine-tune adapters on the TotalSegmentator example volumes, then measure box-prompt Dice on sam_med2d.

Training data: the three labelled volumes of ../shared/data/totalsegmentator (example_ct_sm with
example_seg, the DICOM series example_ct_dicom with example_seg_dicom, example_mr_sm with example_seg_mr;
TotalSegmentator's own output, i.e. pseudo ground truth), listed in a temporary MSD-style dataset.json.
Each recipe is trained by a separate process running exactly

    samadapt fit --config <repo>/recipes/<adapter>/<name>.yaml --data.root DIR --out DIR
                 --trainer.max_steps N --data.batch_size B
                 --trainer.val_check_interval I --trainer.limit_val_batches V
                 --trainer.log_every_n_steps L --trainer.enable_progress_bar false

(the recipe's own split: --data.val_fraction 0.2 holds out one of the three cases, chosen by the seed).
Wall time and peak RSS are taken per child (os.wait4). Test set: the 30 held-out masks of
../shared/data/sam_med2d (5 CT/MR slices, AMOS and TotalSegmentator cases), a tight box from each mask, no
jitter, samadapt's ``Predictor`` at fp32; mean Dice before (the bundled LiteMedSAM) and after (with the
adapter). Dice and cases as tests/oracles.py and benchmarks/quality_2d.py compute them.

    .venv/bin/python benchmarks/finetune_2d.py [--steps 60] [--recipes lora medsam_decoder msa]
        [--batch-size 4] [--json out.json] [--keep DIR] [--override msa=--model.adapter.init_args.prompt=box]

``--keep DIR`` keeps the data root, the logs (DIR/runs/<recipe>/) and the adapters (DIR/adapters/<recipe>/);
``--resume`` with the same ``--keep DIR`` skips the recipes that already finished there (after a crash).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TOTALSEG = SHARED_DATA / "totalsegmentator"
SAM_MED2D = SHARED_DATA / "sam_med2d"

sys.path.insert(0, str(REPO / "tests"))
warnings.filterwarnings("ignore", category=FutureWarning)  # timm's deprecated import paths

import oracles  # noqa: E402

import samadapt  # noqa: E402
from samadapt import Predictor  # noqa: E402
from samadapt.adapter import load_adapter  # noqa: E402
from samadapt.precision import cpu_model  # noqa: E402
from samadapt.weights import checkpoint_sha256, verified_default_checkpoint  # noqa: E402

#: name -> (recipe, label). All three train on the bundled LiteMedSAM (the recipes' default base).
RECIPES = {
    "lora": ("recipes/lora/litemedsam.yaml", "LiteMedSAM + LoRA r=4"),
    "medsam_decoder": ("recipes/medsam/decoder.yaml", "MedSAM decoder-only"),
    "msa": ("recipes/msa/adapter.yaml", "MSA (space + MLP adapters)"),
}
#: (image, label) pairs of the training root, in this order (the split is by position and seed).
VOLUMES = [
    ("example_ct_sm.nii.gz", "example_seg.nii.gz"),
    ("example_ct_dicom", "example_seg_dicom.nii.gz"),  # a DICOM series folder
    ("example_mr_sm.nii.gz", "example_seg_mr.nii.gz"),
]
BASE_DICE_EXPECTED = 0.690  # docs/performance.md: fp32 LiteMedSAM, tight boxes, these 30 masks
TARGET = 0.72


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def make_data_root(root: Path) -> Path:
    """ROOT/dataset.json (MSD style, paths relative to ROOT) over symlinks to the shared volumes."""
    root.mkdir(parents=True, exist_ok=True)
    training = []
    for image, label in VOLUMES:
        for name in (image, label):
            source = TOTALSEG / name
            if not source.exists():
                raise SystemExit(f"missing training file {source} (see ../shared/data/SOURCES.md)")
            link = root / name
            if not link.exists():
                link.symlink_to(source, target_is_directory=source.is_dir())
        training.append({"image": f"./{image}", "label": f"./{label}"})
    spec = {"name": "totalsegmentator examples", "training": training}
    (root / "dataset.json").write_text(json.dumps(spec, indent=2) + "\n")
    return root


def samadapt_executable() -> str:
    local = Path(sys.executable).with_name("samadapt")
    found = str(local) if local.is_file() else shutil.which("samadapt")
    if not found:
        raise SystemExit("samadapt console script not found (install the package: make demo)")
    return found


def train(
    name: str,
    data_root: Path,
    work: Path,
    args: argparse.Namespace,
    extra: list[str],
    recipe: str | None = None,
) -> dict[str, object]:
    """Run one ``samadapt fit`` child in ``work`` (its runs/ land there); wall time and peak RSS.

    ``recipe`` (a path relative to the repository) defaults to ``RECIPES[name]``; ``args`` needs
    ``steps``, ``batch_size``, ``val_checks`` and ``val_batches``.
    """
    recipe = recipe or RECIPES[name][0]
    out = work / "adapters" / name
    interval = max(1, args.steps // args.val_checks)
    command = [
        samadapt_executable(), "fit", "--config", str(REPO / recipe),
        "--data.root", str(data_root), "--out", str(out),
        "--trainer.max_steps", str(args.steps), "--data.batch_size", str(args.batch_size),
        "--trainer.val_check_interval", str(interval),
        "--trainer.limit_val_batches", str(args.val_batches),
        "--trainer.log_every_n_steps", str(max(1, min(10, args.steps // 12))),
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip
    shown = " ".join(["samadapt", *command[1:]])
    print(f"\n[{name}] {shown}", flush=True)
    log_path = work / f"{name}.log"
    load_before = load_average()
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, cwd=work, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"[{name}] samadapt fit failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    if not (out / "adapter.json").is_file():  # Lightning exits 0 after a SIGTERM, without exporting
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-10:])
        raise SystemExit(
            f"[{name}] samadapt fit wrote no adapter to {out} (stopped?); log {log_path}:\n{tail}"
        )
    peak_mib = usage.ru_maxrss / 1024  # kilobytes on Linux
    cpu_s = usage.ru_utime + usage.ru_stime
    config = json.loads((out / "adapter.json").read_text())
    training = config.get("training", {})
    print(
        f"[{name}] {wall:.0f} s ({cpu_s:.0f} CPU s), peak RSS {peak_mib:.0f} MiB, "
        f"{training.get('steps')} steps, "
        f"weights: {training.get('weights')}, load average {load_before} -> {load_average()}",
        flush=True,
    )
    return {
        "recipe": recipe,
        "command": shown,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu_s, 1),
        "peak_rss_mib": round(peak_mib),
        "trainable": int(config["parameters"]["trainable"]),
        "parameters": config["parameters"],
        "training": training,
        "adapter": str(out),
        "log": str(log_path),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def evaluate(cases: list[oracles.MaskCase], adapter: Path | None) -> list[float]:
    """Dice per case with tight boxes, fp32, the bundled LiteMedSAM with ``adapter`` (or without)."""
    checkpoint = verified_default_checkpoint()
    model = samadapt.load_model(checkpoint)
    if adapter is not None:
        load_adapter(adapter, model, base_sha256=checkpoint_sha256(checkpoint))
    predictor = Predictor(model, device="cpu", precision="fp32")
    dices: dict[str, float] = {}
    for group in oracles.group_by_image(cases).values():
        embedding = predictor.embed([group[0].image])[0]
        boxes = np.stack([c.box for c in group]).astype(np.float64)
        masks = predictor.predict(boxes=boxes, embedding=embedding).masks[:, 0]
        for i, case in enumerate(group):
            dices[case.name] = oracles.dice(masks[i], case.mask)
    return [dices[c.name] for c in cases]


def write_json(
    args: argparse.Namespace,
    cases: list[oracles.MaskCase],
    before: list[float],
    results: dict[str, dict[str, object]],
) -> None:
    names = [c.name for c in cases]
    summary = {
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "overrides": args.override,
        "test_masks": len(cases),
        "dice_before": float(np.mean(before)),
        "per_mask_before": dict(zip(names, before, strict=True)),
        "recipes": results,
    }
    args.json.write_text(json.dumps(summary, indent=2) + "\n")


def parse_overrides(values: list[str]) -> dict[str, list[str]]:
    extra: dict[str, list[str]] = {name: [] for name in RECIPES}
    for value in values:
        name, sep, arg = value.partition("=")
        if not sep or name not in RECIPES:
            raise SystemExit(
                f"--override wants RECIPE=ARG with RECIPE in {', '.join(RECIPES)}, got {value!r}"
            )
        extra[name].append(arg)
    return extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per recipe (default 60)")
    parser.add_argument(
        "--batch-size", type=int, default=4, help="samples per step (default 4, the recipes')"
    )
    parser.add_argument(
        "--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES), help="subset to train"
    )
    parser.add_argument("--val-checks", type=int, default=3, help="validations per run (default 3)")
    parser.add_argument("--val-batches", type=int, default=8, help="validation batches per check (default 8)")
    parser.add_argument(
        "--override", action="append", default=[], metavar="RECIPE=ARG",
        help="extra argument for one recipe's samadapt fit, e.g. lora=--model.lr=1e-4 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep", type=Path, help="keep data root, logs and adapters in this folder")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="with --keep: reuse the recipes already finished in that folder (DIR/<recipe>.result.json)",
    )
    args = parser.parse_args(argv)
    if args.resume and args.keep is None:
        parser.error("--resume needs --keep DIR")
    extra = parse_overrides(args.override)

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; samadapt {samadapt.__version__}")
    print(f"load average at start: {load_average()}")

    cases = oracles.load_sam_med2d(SAM_MED2D)
    print(f"test set: {len(cases)} masks on {len({c.image_name for c in cases})} slices of {SAM_MED2D}")
    before = evaluate(cases, None)
    print(f"base LiteMedSAM fp32, tight boxes: mean Dice {np.mean(before):.4f} (docs: {BASE_DICE_EXPECTED})")

    temp = None
    if args.keep is not None:
        work = args.keep.resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        temp = tempfile.TemporaryDirectory(prefix="finetune_2d_")
        work = Path(temp.name)
    results: dict[str, dict[str, object]] = {}
    try:
        data_root = make_data_root(work / "data")
        print(f"training data: {data_root / 'dataset.json'} ({len(VOLUMES)} volumes)")
        for name in args.recipes:
            saved = work / f"{name}.result.json"
            if args.resume and saved.is_file():
                run = json.loads(saved.read_text())
                print(f"\n[{name}] reused {saved} (--resume)")
            else:
                run = train(name, data_root, work, args, extra[name])
                after = evaluate(cases, Path(str(run["adapter"])))
                run["dice_before"] = float(np.mean(before))
                run["dice_after"] = float(np.mean(after))
                run["per_mask_after"] = dict(zip((c.name for c in cases), after, strict=True))
                saved.write_text(json.dumps(run, indent=2) + "\n")
            print(f"[{name}] mean Dice {run['dice_before']:.4f} -> {run['dice_after']:.4f}", flush=True)
            results[name] = run
            if args.json:  # after every recipe, so a later failure keeps what was measured
                write_json(args, cases, before, results)
    finally:
        if temp is not None:
            temp.cleanup()

    header = (
        f"{'recipe':<30} {'Dice before':>11} {'after':>7} {'delta':>7} {'train s':>8} {'CPU s':>7} "
        f"{'peak MiB':>9} {'trainable':>10}"
    )
    print(f"\n{len(cases)} sam_med2d masks, tight boxes, fp32; {args.steps} steps x batch {args.batch_size}")
    print(header)
    print("-" * len(header))
    for name, run in results.items():
        print(
            f"{RECIPES[name][1]:<30} {run['dice_before']:>11.4f} {run['dice_after']:>7.4f} "
            f"{run['dice_after'] - run['dice_before']:>+7.4f} {run['wall_s']:>8.0f} {run['cpu_s']:>7.0f} "
            f"{run['peak_rss_mib']:>9,} {run['trainable']:>10,}"
        )
    if results:
        best = max(results, key=lambda n: float(results[n]["dice_after"]))
        verdict = "meets" if float(results[best]["dice_after"]) >= TARGET else "misses"
        print(f"best: {RECIPES[best][1]} {results[best]['dice_after']:.4f} ({verdict} the {TARGET} target)")
    print(f"load average at end: {load_average()}")

    if args.json:
        write_json(args, cases, before, results)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
