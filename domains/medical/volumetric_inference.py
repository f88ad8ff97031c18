"""Whole-volume inference of a volumetric (3D point-prompted) model with MONAI's sliding window.

The volume is prepared as in training (RAS orientation, resampling to the training spacing, clip +
z-score: :mod:`samadapt.domains.medical.volumetric_data`); clicks given in the original voxel grid
(or in RAS millimetres) are carried into that grid through the affines; ``sliding_window_inference``
runs patches of the training size with Gaussian blending. A patch sees the clicks inside it (in its
own voxel frame); patches without a positive click are not run and do not vote, so the result is the
weighted mean of the foreground probability over the patches that hold a click. The probability is
resampled back onto the original grid (``ResampleToMatch``), so the mask has the input's shape,
voxel order and affine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from samadapt.domains.medical.volume import Volume
from samadapt.domains.medical.volumetric_data import normalise_intensity
from samadapt.errors import InputError
from samadapt.modeling import PromptBatch

__all__ = ["mm_to_voxel", "segment_volume"]


class PointModel(Protocol):
    """What inference needs from the model: SamModel's training forward with 3D points."""

    def forward_batch(
        self, images: torch.Tensor, prompts: PromptBatch, *, multimask_output: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def mm_to_voxel(points_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(N, 3) RAS millimetres -> (N, 3) fractional voxel indexes (i, j, k) of a grid with ``affine``."""
    points = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
    homogeneous = np.c_[points, np.ones(len(points))]
    return (np.linalg.inv(affine) @ homogeneous.T).T[:, :3]


def _prepare(volume: Volume, spacing: Sequence[float] | None) -> Any:
    """The volume as a (1, X, Y, Z) MONAI MetaTensor in RAS, resampled to ``spacing``."""
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    image: Any = MetaTensor(
        torch.as_tensor(np.asarray(volume.array), dtype=torch.float32)[None],
        affine=torch.as_tensor(volume.affine),
    )
    image = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)
    if spacing is not None:
        image = Spacing(pixdim=tuple(spacing), mode="bilinear")(image)
    return image


def segment_volume(
    model: PointModel,
    volume: Volume,
    points: np.ndarray,
    labels: np.ndarray,
    *,
    roi: Sequence[int],
    spacing: Sequence[float] | None,
    clip: Sequence[float] | None,
    mean: float | None = None,
    std: float | None = None,
    overlap: float = 0.5,
    threshold: float = 0.5,
    progress: bool = False,
    device: torch.device | str = "cpu",
    on_patch: Callable[[], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Segment one object in a whole volume from 3D clicks.

    Args:
        model: a SamModel with the volumetric adapter attached (in eval mode).
        volume: the input volume, any orientation and spacing.
        points: (N, 3) voxel indexes (i, j, k) of ``volume`` (fractions allowed; see :func:`mm_to_voxel`).
        labels: (N,) 1 positive, 0 negative; at least one positive.
        roi: patch size the model was trained on (S0, S1, S2).
        spacing, clip, mean, std: the training preparation (the adapter's init args).
        overlap: sliding-window overlap. threshold: probability cut-off.
        progress: MONAI's progress bar. on_patch: called after every patch that runs the model.

    Returns:
        (mask (I, J, K) uint8 on ``volume``'s grid, foreground probability (I, J, K) float32).

    Raises:
        InputError: no positive click, or a click outside the volume.
    """
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import ResampleToMatch

    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    if len(points) != len(labels) or not (labels == 1).any():
        raise InputError("give at least one positive 3D point (and one label per point)")
    shape = np.asarray(volume.shape, dtype=np.float64)
    if (points < -0.5).any() or (points > shape - 0.5).any():
        raise InputError(f"a point lies outside the {volume.shape} volume: {points.round(1).tolist()}")
    prepared = _prepare(volume, spacing)
    to_prepared = np.linalg.inv(np.asarray(prepared.affine, dtype=np.float64)) @ volume.affine
    local = (to_prepared @ np.c_[points, np.ones(len(points))].T).T[:, :3]
    grid = np.asarray(prepared.shape[1:])
    local = np.clip(np.round(local), 0, grid - 1)
    image = normalise_intensity(prepared.as_tensor()[0], clip, mean, std)
    pads = [max(0, int(r) - int(g)) for r, g in zip(roi, grid, strict=True)]
    if any(pads):  # pad at the end so that patch coordinates stay the prepared grid's
        image = torch.nn.functional.pad(image, (0, pads[2], 0, pads[1], 0, pads[0]), value=float(image.min()))
    clicks = torch.as_tensor(local, dtype=torch.float32)
    click_labels = torch.as_tensor(labels, dtype=torch.float32)
    roi_t = torch.as_tensor([int(r) for r in roi], dtype=torch.float32)

    def predictor(patches: torch.Tensor, coords: Sequence[Sequence[slice]]) -> torch.Tensor:
        """(n, 1, r0, r1, r2) patches -> (n, 2, r0, r1, r2): [probability * ran, ran]."""
        out = patches.new_zeros(patches.shape[0], 2, *patches.shape[2:])
        for n, where in enumerate(coords):
            start = torch.tensor([float(s.start or 0) for s in list(where)[-3:]])
            inside = ((clicks >= start) & (clicks < start + roi_t)).all(dim=1)
            if not bool((inside & (click_labels == 1)).any()):
                continue
            prompt = PromptBatch(
                points=(clicks[inside] - start)[None].to(device),
                point_labels=click_labels[inside][None].to(device),
            )
            with torch.no_grad():
                logits, _ = model.forward_batch(patches[n : n + 1].to(device), prompt)
            out[n, 0] = torch.sigmoid(logits[0, 0].float()).to(out.device)
            out[n, 1] = 1.0
            if on_patch is not None:
                on_patch()
        return out

    with torch.no_grad():
        blended = sliding_window_inference(
            image[None, None],
            roi_size=[int(r) for r in roi],
            sw_batch_size=1,
            predictor=predictor,
            overlap=overlap,
            mode="gaussian",
            progress=progress,
            with_coord=True,
        )
    blended = torch.as_tensor(blended)[0]
    votes = blended[1]
    probability = torch.where(votes > 1e-6, blended[0] / votes.clamp(min=1e-6), torch.zeros_like(votes))
    probability = probability[: grid[0], : grid[1], : grid[2]]
    source = MetaTensor(probability[None], affine=prepared.affine)
    target = MetaTensor(torch.zeros(1, *volume.shape), affine=torch.as_tensor(volume.affine))
    back = ResampleToMatch(mode="bilinear", padding_mode="zeros")(source, img_dst=target)
    prob = torch.as_tensor(back)[0].numpy().astype(np.float32)
    return (prob > threshold).astype(np.uint8), prob
