"""Render docs/img/medical_liver.png: a propagated liver mask over three orthogonal slices.

Runs the same command the docs show (``samadapt segment`` on the bundled TotalSegmentator CT), then
draws axial, coronal and sagittal slices through the liver with our mask (filled) and the reference
label (contour). Usage: ``python docs/scripts/medical_figure.py`` (needs the dev extra: matplotlib).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from samadapt.cli import main
from samadapt.domains.medical import apply_intensity, dice, read_volume

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "totalsegmentator"
LIVER = 5


def run() -> Path:
    truth = read_volume(DATA / "example_seg.nii.gz")
    liver = truth.array == LIVER
    k = int(liver.sum(axis=(0, 1)).argmax())
    ii, jj = np.nonzero(liver[:, :, k])
    box = [str(v) for v in (ii.min(), jj.min(), ii.max(), jj.max())]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "liver.nii.gz"
        command = ["segment", str(DATA / "example_ct_sm.nii.gz"), "--box", *box, "--slice", str(k)]
        command += ["--label", str(LIVER), "-o", str(out)]
        print("samadapt " + " ".join(command))
        if main(command) != 0:
            raise SystemExit(1)
        pred = read_volume(out).array == LIVER
    ct = read_volume(DATA / "example_ct_sm.nii.gz")
    image = apply_intensity(ct.array, "ct-soft")
    score = dice(pred, liver)
    ci, cj, _ = (round(float(c)) for c in np.argwhere(liver).mean(axis=0))
    spacing = ct.spacing
    views = [
        (
            f"axial (k = {k}, prompted)",
            image[:, :, k].T,
            pred[:, :, k].T,
            liver[:, :, k].T,
            spacing[1] / spacing[0],
        ),
        (
            f"coronal (j = {cj})",
            image[:, cj, :].T,
            pred[:, cj, :].T,
            liver[:, cj, :].T,
            spacing[2] / spacing[0],
        ),
        (
            f"sagittal (i = {ci})",
            image[ci, :, :].T,
            pred[ci, :, :].T,
            liver[ci, :, :].T,
            spacing[2] / spacing[1],
        ),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.9))
    for ax, (title, img, mask, ref, aspect) in zip(axes, views, strict=True):
        ax.imshow(img, cmap="gray", origin="lower", aspect=aspect, vmin=0, vmax=1)
        ax.imshow(np.ma.masked_where(~mask, mask), cmap="autumn", alpha=0.45, origin="lower", aspect=aspect)
        ax.contour(ref.astype(float), levels=[0.5], colors="lime", linewidths=1.0, origin="lower")
        if title.startswith("axial"):
            ax.add_patch(
                plt.Rectangle(
                    (float(box[0]), float(box[1])),
                    float(box[2]) - float(box[0]),
                    float(box[3]) - float(box[1]),
                    fill=False,
                    edgecolor="deepskyblue",
                    linewidth=1.2,
                )
            )
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"LiteMedSAM box on axial slice {k}, propagated through the volume: liver Dice {score:.3f}\n"
        "red: samadapt mask   green: TotalSegmentator label   blue: the prompt box\n"
        "(superior and anterior up, patient right on the right)",
        fontsize=10,
    )
    fig.tight_layout()
    target = ROOT / "docs" / "img" / "medical_liver.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=90)
    print(f"wrote {target} (Dice {score:.4f})")
    return target


if __name__ == "__main__":
    run()
