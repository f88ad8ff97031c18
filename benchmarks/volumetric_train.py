"""A short real training of the volumetric adapter, one click per organ, next to slice propagation (one box).

Data: ``example_ct_sm`` (122 x 101 x 30 at 3 mm) with its TotalSegmentator labels ``example_seg``. Training
sees only the part of the volume on the ``--label`` organ's side (default 2, right kidney) of the midpoint
between it and the ``--held-out-label`` organ (default 3, left kidney), never seen: a held-out region.
With ``--all-organs`` (default) every labelled organ of that part is an object, one per patch, so the clicks
say which organ to segment; ``--no-all-organs`` trains the ``--label`` organ alone. Through exactly

    samadapt fit --config recipes/volumetric/tiny.yaml --model.base tiny.pth --data.init_args.root TRAIN
        --data.init_args.one_object true --trainer.max_steps STEPS --out ADAPTER
        --data.init_args.intensity_shift 0.5 --data.init_args.intensity_scale 0.2

on the tiny core (random weights: this machine has no SAM or MedSAM ViT-B checkpoint, and LiteMedSAM's TinyViT
has no plain ViT blocks to adapt; see docs/volumetric.md), so the adapter's 3D layers learn from scratch.
"Before" is the same recipe run for one step at learning rate 0: the initialisation training starts from.
With ``--held-out-label -1`` and an organ the DICOM series also has (e.g. ``--label 1``, spleen) the held-out
case is that series instead (another patient, contrast-enhanced, 512 x 512 x 20 at 0.98 x 0.98 x 2 mm).

Evaluate: the organ's most interior voxel as one positive click,
``samadapt segment VOLUME --checkpoint tiny.pth --adapter ADAPTER --point I J K -o SEG.nii.gz``, Dice against
the organ's largest component. Next to it: slice propagation with the bundled LiteMedSAM from the tight box of
the organ's largest axial slice (default stop rule), the 2D path a user would take with one box.

    .venv/bin/python benchmarks/volumetric_train.py [--steps 800] [--label 2] [--held-out-label 3]
        [--keep DIR] [--json OUT] [--figure docs/img/volumetric_kidney.png]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests/data/totalsegmentator"
SAMADAPT = str(Path(sys.executable).with_name("samadapt"))


def run(command: list[str]) -> str:
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def largest_component(mask: np.ndarray) -> np.ndarray:
    labelled, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if count <= 1:
        return mask
    return labelled == int(np.bincount(labelled.ravel())[1:].argmax()) + 1


def interior_click(mask: np.ndarray, spacing: tuple[float, ...]) -> tuple[int, int, int]:
    """The voxel farthest (in mm) from the organ's surface."""
    distance = ndimage.distance_transform_edt(mask, sampling=spacing)
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(distance)), mask.shape))  # type: ignore[return-value]


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = int(pred.sum()) + int(truth.sum())
    return 2.0 * int((pred & truth).sum()) / total if total else 1.0


def prepare(work: Path, label: int, held_out_label: int | None) -> dict[str, dict]:
    """TRAIN folder, the held-out CT on its label's grid, and each evaluation case's organ mask.

    With ``held_out_label`` the training volume is the part of example_ct_sm on the ``label`` organ's side of
    the midpoint between the two organs (along the first axis), so the other organ is never seen.
    """
    import nibabel as nib

    from samadapt.domains.medical.io import read_volume, write_volume
    from samadapt.domains.medical.volume import reorient_like

    train = work / "train"
    (train / "imagesTr").mkdir(parents=True)
    (train / "labelsTr").mkdir(parents=True)
    ct, seg = nib.load(DATA / "example_ct_sm.nii.gz"), nib.load(DATA / "example_seg.nii.gz")
    labels = np.asarray(seg.dataobj)
    part = slice(None)
    if held_out_label is not None:
        seen_i = np.nonzero(labels == label)[0].mean()
        held_i = np.nonzero(labels == held_out_label)[0].mean()
        middle = int(np.round((seen_i + held_i) / 2))
        part = slice(0, middle) if seen_i < held_i else slice(middle, labels.shape[0])
        assert not (labels[part] == held_out_label).any(), "the organs overlap along the first axis"
    nib.save(ct.slicer[part], train / "imagesTr" / "ct.nii.gz")  # slicer keeps the affine right
    nib.save(seg.slicer[part], train / "labelsTr" / "ct.nii.gz")
    dicom_seg = read_volume(DATA / "example_seg_dicom.nii.gz")
    evaluations = [
        (f"seen organ (label {label})", DATA / "example_ct_sm.nii.gz", DATA / "example_seg.nii.gz", label)
    ]
    if held_out_label is not None:
        evaluations.append(
            (f"held-out organ (label {held_out_label}, other half)", DATA / "example_ct_sm.nii.gz",
             DATA / "example_seg.nii.gz", held_out_label)
        )  # fmt: skip
    if (np.asarray(dicom_seg.array) == label).any():
        image = work / "heldout_ct.nii.gz"
        write_volume(image, reorient_like(read_volume(DATA / "example_ct_dicom"), dicom_seg), dicom_seg)
        evaluations.append(
            (
                f"held-out volume (DICOM series, label {label})",
                image,
                DATA / "example_seg_dicom.nii.gz",
                label,
            )
        )
    cases = {}
    for name, image, label_path, value in evaluations:
        labelled = read_volume(label_path)
        organ = largest_component(np.asarray(labelled.array) == value)
        spacing = tuple(float(s) for s in labelled.spacing)
        cases[name] = {"image": image, "labels": label_path, "organ": organ, "spacing": spacing}
    return cases


def fit(
    work: Path,
    tiny: Path,
    label: int,
    steps: int,
    out: Path,
    augment: tuple[float, float],
    one_object: bool,
    lr: float | None = None,
) -> float:
    started = time.perf_counter()
    command = [
        SAMADAPT, "fit", "--config", str(REPO / "recipes/volumetric/tiny.yaml"), "--model.base", str(tiny),
        "--data.init_args.root", str(work / "train"),
        "--trainer.max_steps", str(steps), "--trainer.max_epochs", str(10 * steps),
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(work / "runs"),
        "--out", str(out), "--data.init_args.intensity_shift", str(augment[0]),
        "--data.init_args.intensity_scale", str(augment[1]),
    ]  # fmt: skip
    # one object: every organ of the training volume, one per patch (the clicks say which); else the organ
    command += (
        ["--data.init_args.one_object", "true"] if one_object else ["--data.init_args.labels", f"[{label}]"]
    )
    if lr is not None:
        command += ["--model.lr", str(lr)]
    run(command)
    return time.perf_counter() - started


def volumetric_masks(cases: dict, tiny: Path, adapter: Path, work: Path, tag: str) -> dict[str, np.ndarray]:
    from samadapt.domains.medical.io import read_volume

    masks = {}
    for n, (name, case) in enumerate(cases.items()):
        i, j, k = interior_click(case["organ"], case["spacing"])
        out = work / f"{tag}_{n}.nii.gz"
        run(
            [
                SAMADAPT, "segment", str(case["image"]), "--checkpoint", str(tiny), "--adapter", str(adapter),
                "--point", str(i), str(j), str(k), "-o", str(out),
            ]
        )  # fmt: skip
        masks[name] = np.asarray(read_volume(out).array) > 0
        case["click"] = (i, j, k)
    return masks


def propagation_masks(cases: dict) -> dict[str, np.ndarray]:
    from samadapt import Predictor, load_model
    from samadapt.domains.medical.propagation import SlicePrompt, VolumeSegmenter, mask_box, slice_image
    from samadapt.domains.medical.slices import read_volume_pair
    from samadapt.weights import verified_default_checkpoint

    predictor = Predictor(load_model(verified_default_checkpoint()), precision="fp32")
    masks = {}
    for name, case in cases.items():
        image, _labels, _preset = read_volume_pair(case["image"], case["labels"])
        areas = case["organ"].sum(axis=(0, 1))
        k = int(areas.argmax())
        x0, y0, x1, y1 = mask_box(slice_image(case["organ"], "axial", k), 0.0)  # type: ignore[misc]
        segmenter = VolumeSegmenter(predictor, image, "axial", batch_size=4)
        masks[name] = segmenter.segment(SlicePrompt(k, box=(x0, y0, x1, y1))) > 0
        case["box_slice"] = k
    return masks


def figure(path: Path, name: str, case: dict, masks: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from samadapt.domains.medical.io import read_volume

    ct = np.asarray(read_volume(case["image"]).array, dtype=np.float32)
    k = int(case["organ"].sum(axis=(0, 1)).argmax())  # the organ's largest axial slice (the box's)
    panels = [("ground truth", case["organ"]), *masks.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, (title, mask) in zip(axes, panels, strict=True):
        ax.imshow(np.clip(ct[:, :, k].T, -175, 250), cmap="gray", origin="lower")
        ax.contour(case["organ"][:, :, k].T, levels=[0.5], colors="cyan", linewidths=1.0, origin="lower")
        if title != "ground truth":
            ax.contour(mask[:, :, k].T, levels=[0.5], colors="orange", linewidths=1.2, origin="lower")
            title = f"{title}\nDice {dice(mask, case['organ']):.3f} (volume)"
        if case["click"][2] == k:
            ax.plot(case["click"][0], case["click"][1], "r+", markersize=10)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(
        f"{name}: its largest slice; cyan: label, orange: prediction (+: the click, when on this slice)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--label", type=int, default=2, help="trained organ (TotalSegmentator: 2 right kidney)"
    )
    parser.add_argument(
        "--held-out-label",
        type=int,
        default=3,
        help="organ never seen in training, on the other side of the volume (3 left kidney); -1: none",
    )
    parser.add_argument(
        "--intensity-shift",
        type=float,
        default=0.5,
        help="training intensity offsets, z-score units (contrast phases move organs ~0.5 std)",
    )
    parser.add_argument("--intensity-scale", type=float, default=0.2, help="training intensity factors")
    parser.add_argument(
        "--all-organs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="every labelled organ of the training part, one per patch (--data.init_args.one_object)",
    )
    parser.add_argument("--keep", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--figure", type=Path)
    args = parser.parse_args(argv)
    if args.held_out_label is not None and args.held_out_label < 0:
        args.held_out_label = None
    import torch

    import samadapt
    from samadapt.precision import cpu_model

    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        tiny = work / "tiny.pth"
        torch.manual_seed(0)
        samadapt.save_model(samadapt.build("tiny"), tiny)
        cases = prepare(work, args.label, args.held_out_label)
        augment = (args.intensity_shift, args.intensity_scale)
        fit(work, tiny, args.label, 1, work / "before", augment, args.all_organs, lr=0.0)
        seconds = fit(work, tiny, args.label, args.steps, work / "after", augment, args.all_organs)
        results: dict[str, dict[str, np.ndarray]] = {
            "volumetric, before training (1 click)": volumetric_masks(
                cases, tiny, work / "before", work, "b"
            ),
            f"volumetric, after {args.steps} steps (1 click)": volumetric_masks(
                cases, tiny, work / "after", work, "a"
            ),
            "slice propagation, LiteMedSAM (1 box)": propagation_masks(cases),
        }
        table = {
            method: {name: round(dice(mask, cases[name]["organ"]), 4) for name, mask in masks.items()}
            for method, masks in results.items()
        }
        held_out = list(cases)[-1]
        if args.figure:
            figure(
                args.figure, held_out, cases[held_out], {m: masks[held_out] for m, masks in results.items()}
            )
        clicks = {name: case.get("click") for name, case in cases.items()}
    names = list(cases)
    print(f"\n| Dice, label {args.label} | {' | '.join(names)} |\n|---|{'---|' * len(names)}")
    for method, row in table.items():
        print(f"| {method} | {' | '.join(f'{row[n]:.3f}' for n in names)} |")
    print(f"training: {args.steps} steps in {seconds:.0f} s; clicks {clicks}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "cpu": cpu_model(),
            "label": args.label,
            "held_out_label": args.held_out_label,
            "all_organs": args.all_organs,
            "steps": args.steps,
            "train_seconds": round(seconds, 1),
            "intensity_shift": args.intensity_shift,
            "intensity_scale": args.intensity_scale,
        }
        args.json.write_text(json.dumps({**report, "dice": table, "clicks": clicks}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
