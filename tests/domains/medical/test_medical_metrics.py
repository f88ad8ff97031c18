"""Dice, NSD and HD95 on shapes with known answers, an independent brute-force oracle, evaluate_labels."""

from __future__ import annotations

import json
from itertools import product
from pathlib import Path

import numpy as np
import pytest

from samadapt.domains.medical import Volume, dice, evaluate_labels, hd95, nsd, read_volume
from samadapt.errors import InputError

SPACING = (0.5, 1.5, 3.0)


def _cubes(shift_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Two 4x4x4 cubes, the second shifted one voxel along ``shift_axis``."""
    a = np.zeros((10, 10, 10), dtype=bool)
    a[2:6, 2:6, 2:6] = True
    return a, np.roll(a, 1, axis=shift_axis)


def test_cubes_shifted_one_voxel_with_anisotropic_spacing() -> None:
    a, b = _cubes(0)
    assert dice(a, b) == pytest.approx(0.75)  # overlap 3*4*4 = 48 of 64 + 64
    # Shift along i (0.5 mm): every surface voxel is 0 or 0.5 mm from the other surface.
    assert hd95(a, b, SPACING) == pytest.approx(0.5)
    assert nsd(a, b, SPACING, 0.4) == pytest.approx(72 / 112)  # 36 of 56 surface voxels per cube are shared
    assert nsd(a, b, SPACING, 0.5) == pytest.approx(1.0)
    # Shift along k (3 mm): the two outer faces (16 voxels each) are 3 mm away, 4 more voxels are 0.5 mm away.
    a, b = _cubes(2)
    assert hd95(a, b, SPACING) == pytest.approx(3.0)
    assert nsd(a, b, SPACING, 2.0) == pytest.approx(80 / 112)
    assert nsd(a, b, SPACING, 3.0) == pytest.approx(1.0)
    assert hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(1.0)


def _brute_force(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float]:
    """Surface voxels by explicit 6-neighbour checks and all pairwise distances (no scipy)."""

    def surface(m: np.ndarray) -> np.ndarray:
        pts = []
        for idx in zip(*np.nonzero(m), strict=True):
            for axis, step in product(range(3), (-1, 1)):
                n = list(idx)
                n[axis] += step
                if not 0 <= n[axis] < m.shape[axis] or not m[tuple(n)]:
                    pts.append(idx)
                    break
        return np.array(pts, dtype=np.float64) * np.asarray(spacing)

    sp, sg = surface(pred), surface(gt)
    d = np.linalg.norm(sp[:, None, :] - sg[None, :, :], axis=-1)
    d_p, d_g = d.min(axis=1), d.min(axis=0)
    tol = 2.0
    nsd_value = (np.sum(d_p <= tol) + np.sum(d_g <= tol)) / (len(d_p) + len(d_g))
    return float(max(np.percentile(d_p, 95), np.percentile(d_g, 95))), float(nsd_value)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_blobs_match_brute_force_oracle(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (12, 10, 8)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)

    def blob() -> np.ndarray:
        centre, radii = rng.uniform(2, 7, size=3), rng.uniform(1.5, 4.0, size=3)
        return np.sum(((grid - centre) / radii) ** 2, axis=-1) <= 1.0

    pred, gt = blob() | blob(), blob()
    spacing = (0.7, 1.2, 2.5)
    expected_hd95, expected_nsd = _brute_force(pred, gt, spacing)
    assert hd95(pred, gt, spacing) == pytest.approx(expected_hd95, abs=1e-9)
    assert nsd(pred, gt, spacing, 2.0) == pytest.approx(expected_nsd, abs=1e-12)
    assert dice(pred, gt) == pytest.approx(2 * np.sum(pred & gt) / (pred.sum() + gt.sum()))


def test_empty_mask_conventions() -> None:
    empty, full = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
    full[1:3, 1:3, 1:3] = True
    assert (dice(empty, empty), nsd(empty, empty, SPACING, 1.0), hd95(empty, empty, SPACING)) == (
        1.0,
        1.0,
        0.0,
    )
    for p, g in ((empty, full), (full, empty)):
        assert (dice(p, g), nsd(p, g, SPACING, 1.0), hd95(p, g, SPACING)) == (0.0, 0.0, float("inf"))
    with pytest.raises(InputError, match="shape"):
        dice(full, full[:3])
    with pytest.raises(InputError, match="spacing must be 3 positive numbers"):
        hd95(full, full, (1.0, 0.0, 1.0))


def test_evaluate_labels_known_values() -> None:
    a, b = _cubes(2)
    gt_arr, pred_arr = a.astype(np.uint8) * 4, b.astype(np.uint8) * 4
    gt_arr[7:9, 7:9, 7:9] = 2  # label 2 only in gt
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = [5, -3, 1]
    gt = Volume(gt_arr, affine, {"labels": {4: "cube"}})
    pred = Volume(pred_arr, affine.copy())
    rows = evaluate_labels(pred, gt, tolerance_mm=2.0)
    assert [r["label"] for r in rows] == [2, 4]
    two, four = rows
    assert two == {"label": 2, "name": None, "dice": 0.0, "nsd": 0.0, "hd95": float("inf"),
                   "pred_voxels": 0, "gt_voxels": 8}  # fmt: skip
    assert four["name"] == "cube" and (four["pred_voxels"], four["gt_voxels"]) == (64, 64)
    assert four["dice"] == pytest.approx(0.75)
    assert four["nsd"] == pytest.approx(80 / 112)
    assert four["hd95"] == pytest.approx(3.0)
    named = evaluate_labels(pred, gt, labels={4: "box", 9: "nothing"})
    assert [(r["label"], r["name"], r["dice"], r["hd95"]) for r in named] == [
        (4, "box", 0.75, 3.0),
        (9, "nothing", 1.0, 0.0),
    ]


def test_evaluate_labels_grid_mismatch() -> None:
    gt = Volume(np.zeros((5, 5, 5), np.uint8), np.eye(4))
    moved = np.eye(4)
    moved[0, 3] = 0.01
    with pytest.raises(InputError, match=r"^label grid mismatch: affines differ"):
        evaluate_labels(Volume(gt.array.copy(), moved), gt)
    with pytest.raises(InputError, match=r"^label grid mismatch: prediction shape \(5, 5, 4\)"):
        evaluate_labels(Volume(np.zeros((5, 5, 4), np.uint8), np.eye(4)), gt)
    close = np.eye(4)
    close[0, 3] = 5e-5
    assert evaluate_labels(Volume(gt.array.copy(), close), gt) == []


def test_evaluate_labels_on_real_label_map(data_dir: Path) -> None:
    gt = read_volume(data_dir / "example_seg.nii.gz")
    names = json.loads((data_dir / "class_map_total_and_total_mr.json").read_text())["total"]
    pred = gt.with_array(gt.array.copy())
    pred.array[pred.array == 5] = 0  # drop the liver
    rows = {r["label"]: r for r in evaluate_labels(pred, gt, labels={int(k): v for k, v in names.items()})}
    assert rows[5]["name"] == "liver" and rows[5]["dice"] == 0.0 and rows[5]["gt_voxels"] > 1000
    present = [r for r in rows.values() if r["gt_voxels"] and r["label"] != 5]
    assert len(present) > 20
    assert all(r["dice"] == 1.0 and r["nsd"] == 1.0 and r["hd95"] == 0.0 for r in present)
