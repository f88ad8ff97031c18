"""Preprocessing profiles: how a checkpoint expects its pixels.

Mixing these up is the commonest user bug, so every variant names its profile and the predictor
applies it; nothing downstream guesses.

- ``sam``: resize longest side to 1024, ImageNet mean/std on 0-255 pixels, pad bottom-right.
- ``medsam``: resize to 1024 x 1024 (aspect not kept), min-max to [0, 1].
- ``litemedsam``: resize longest side to 256, min-max to [0, 1], pad bottom-right.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from samadapt.errors import InputError

IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class PreprocessProfile:
    """How to turn an image into encoder input.

    Attributes:
        name: profile id (``sam``, ``medsam``, ``litemedsam``).
        input_size: encoder input side.
        keep_aspect: resize the longest side and pad (True) or stretch to a square (False).
        normalize: ``imagenet`` (mean/std on 0-255) or ``minmax`` (per-image to [0, 1]).
        resize: ``area`` (exact pixel-overlap averaging, as OpenCV's INTER_AREA that LiteMedSAM was
            trained with, both shrinking and enlarging), ``bilinear`` (SAM's PIL resize, antialiased)
            or ``bicubic`` (MedSAM's skimage order-3 resize, antialiased).
        quantize: work on 8-bit pixels as the reference pipeline does: non-uint8 images are
            stretched to 0-255 and rounded, and the resized image is rounded again before min-max
            (LiteMedSAM's cv2 pipeline; moving a pixel by less than one grey level changes its masks).
        integer_boxes: truncate box corners to whole pixels of the encoder frame (LiteMedSAM was
            trained and is run on integer boxes).
    """

    name: str
    input_size: int
    keep_aspect: bool
    normalize: str
    resize: str = "bilinear"
    quantize: bool = False
    integer_boxes: bool = False

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> PreprocessProfile:
        return cls(
            name=str(data["name"]),
            input_size=int(data["input_size"]),  # type: ignore[call-overload]
            keep_aspect=bool(data["keep_aspect"]),
            normalize=str(data["normalize"]),
            resize=str(data.get("resize", "bilinear")),
            quantize=bool(data.get("quantize", False)),
            integer_boxes=bool(data.get("integer_boxes", False)),
        )

    def resized_size(self, original: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of the image inside the encoder frame, before padding."""
        if not self.keep_aspect:
            return (self.input_size, self.input_size)
        scale = self.input_size / max(original)
        return (int(original[0] * scale + 0.5), int(original[1] * scale + 0.5))

    def coords_to_input(self, coords: np.ndarray, original: tuple[int, int]) -> np.ndarray:
        """Map (..., 2) x/y pixel coordinates from the original image into the encoder frame."""
        new_h, new_w = self.resized_size(original)
        out = np.asarray(coords, dtype=np.float64).copy()
        out[..., 0] *= new_w / original[1]
        out[..., 1] *= new_h / original[0]
        return out

    def boxes_to_input(self, boxes: np.ndarray, original: tuple[int, int]) -> np.ndarray:
        """Map (B, 4) x0, y0, x1, y1 boxes from the original image into the encoder frame."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if self.integer_boxes and self.keep_aspect:
            # as LiteMedSAM's reference: one ratio for both axes, corners truncated to whole pixels
            return np.trunc(boxes * (self.input_size / max(original)))
        return self.coords_to_input(boxes.reshape(-1, 2, 2), original).reshape(-1, 4)


SAM_PROFILE = PreprocessProfile("sam", 1024, keep_aspect=True, normalize="imagenet")
MEDSAM_PROFILE = PreprocessProfile("medsam", 1024, keep_aspect=False, normalize="minmax", resize="bicubic")
LITEMEDSAM_PROFILE = PreprocessProfile(
    "litemedsam", 256, keep_aspect=True, normalize="minmax", resize="area", quantize=True, integer_boxes=True
)
PROFILES = {p.name: p for p in (SAM_PROFILE, MEDSAM_PROFILE, LITEMEDSAM_PROFILE)}


def to_rgb_float(image: np.ndarray) -> np.ndarray:
    """Any 2D image array -> (H, W, 3) float32 in its own value range.

    Accepts (H, W) gray, (H, W, 1), (H, W, 3) and (H, W, 4) (alpha dropped); any integer or float dtype.
    """
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.ndim != 3 or array.shape[2] != 3:
        raise InputError(f"expected a gray or RGB image, got an array of shape {tuple(np.shape(image))}")
    if array.shape[0] < 2 or array.shape[1] < 2:
        raise InputError(f"image is too small: {array.shape[1]}x{array.shape[0]} pixels")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.number):
        raise InputError(f"unsupported pixel type {array.dtype}")
    out = array.astype(np.float32)
    if not np.isfinite(out).all():
        raise InputError("image contains NaN or infinite values")
    return out


def area_weights(in_size: int, out_size: int) -> torch.Tensor:
    """(out_size, in_size) matrix of exact pixel-overlap weights; each row sums to 1.

    Output pixel ``o`` covers input interval [o * s, (o + 1) * s) with s = in_size / out_size; its
    value is the overlap-weighted mean of the input pixels. This is OpenCV's INTER_AREA for any scale.
    """
    scale = in_size / out_size
    edges = torch.arange(out_size + 1, dtype=torch.float64) * scale
    low, high = edges[:-1, None], edges[1:, None]
    pixel = torch.arange(in_size, dtype=torch.float64)[None, :]
    overlap = (torch.minimum(high, pixel + 1) - torch.maximum(low, pixel)).clamp(min=0)
    return (overlap / overlap.sum(dim=1, keepdim=True)).float()


def resize_image(tensor: torch.Tensor, size: tuple[int, int], method: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, *size) with ``area``, ``bilinear`` or ``bicubic`` resampling."""
    if tuple(tensor.shape[-2:]) == size:
        return tensor
    if method == "area":
        rows = area_weights(tensor.shape[-2], size[0])  # (h, H)
        cols = area_weights(tensor.shape[-1], size[1])  # (w, W)
        return rows @ tensor @ cols.T
    if method in ("bilinear", "bicubic"):
        return F.interpolate(tensor, size=size, mode=method, align_corners=False, antialias=True)
    raise ValueError(f"unknown resize method {method!r}")


def preprocess(image: np.ndarray, profile: PreprocessProfile) -> tuple[torch.Tensor, tuple[int, int]]:
    """Image -> encoder input.

    Args:
        image: (H, W), (H, W, 1|3|4), any numeric dtype.
        profile: the checkpoint's preprocessing profile.

    Returns:
        ((1, 3, S, S) float32 tensor, (h, w) of the resized image inside the padded frame).
    """
    rgb = to_rgb_float(image)
    original = (rgb.shape[0], rgb.shape[1])
    tensor = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]  # (1, 3, H, W)
    new_size = profile.resized_size(original)
    if profile.normalize == "minmax":
        if profile.quantize:
            if np.asarray(image).dtype != np.uint8:
                lowest, highest = float(rgb.min()), float(rgb.max())
                tensor = torch.round((tensor - lowest) / max(highest - lowest, 1e-8) * 255.0)
            tensor = torch.floor(resize_image(tensor, new_size, profile.resize) + 0.5)  # cv2 rounds halves up
        else:
            tensor = resize_image(tensor, new_size, profile.resize)
        low, high = tensor.min(), tensor.max()
        tensor = (tensor - low) / torch.clamp(high - low, min=1e-8)
    elif profile.normalize == "imagenet":
        if rgb.min() < 0 or rgb.max() > 255 or not np.issubdtype(np.asarray(image).dtype, np.uint8):
            lowest, highest = float(rgb.min()), float(rgb.max())
            tensor = (tensor - lowest) / max(highest - lowest, 1e-8) * 255.0
        tensor = resize_image(tensor, new_size, profile.resize)
        mean = torch.tensor(IMAGENET_MEAN_255).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD_255).view(1, 3, 1, 1)
        tensor = (tensor - mean) / std
    else:
        raise ValueError(f"unknown normalisation {profile.normalize!r}")
    pad_h, pad_w = profile.input_size - new_size[0], profile.input_size - new_size[1]
    tensor = F.pad(tensor, (0, pad_w, 0, pad_h))
    return tensor.contiguous(), new_size


def preprocess_mask(mask: np.ndarray, profile: PreprocessProfile) -> torch.Tensor:
    """A mask -> the encoder frame of :func:`preprocess`, pixel for pixel with the image.

    Nearest-neighbour resize (pixel centres, ``nearest-exact``) to ``profile.resized_size``, then zero
    padding at the bottom/right exactly as the image is padded (a stretch to S x S when the profile
    does not keep the aspect ratio).

    Args:
        mask: (H, W) bool or numeric; any nonzero pixel is foreground.
        profile: the checkpoint's preprocessing profile.

    Returns:
        (1, 1, S, S) float32 tensor with values in {0, 1}.
    """
    array = np.asarray(mask)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise InputError(f"expected a 2D (H, W) mask, got an array of shape {tuple(array.shape)}")
    new_size = profile.resized_size((array.shape[0], array.shape[1]))
    tensor = torch.from_numpy(np.ascontiguousarray(array != 0, dtype=np.float32))[None, None]  # (1, 1, H, W)
    if tuple(tensor.shape[-2:]) != new_size:
        tensor = F.interpolate(tensor, size=new_size, mode="nearest-exact")
    pad_h, pad_w = profile.input_size - new_size[0], profile.input_size - new_size[1]
    return F.pad(tensor, (0, pad_w, 0, pad_h)).contiguous()


def postprocess_logits(
    low_res_logits: torch.Tensor,
    profile: PreprocessProfile,
    resized: tuple[int, int],
    original: tuple[int, int],
) -> torch.Tensor:
    """Low-res logits (B, K, s, s) in the padded encoder frame -> (B, K, H, W) at the original size.

    The logits are first scaled to the encoder frame, cropped to the unpadded image, then resized to
    the original size (bilinear), as the reference predictors do.
    """
    logits = low_res_logits.float()
    side = profile.input_size
    if logits.shape[-1] != side:
        logits = F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=False)
    logits = logits[..., : resized[0], : resized[1]]
    return F.interpolate(logits, size=original, mode="bilinear", align_corners=False)
