"""Plain 2D images: PNG/JPEG/TIFF in, binary masks and overlays out (atomic writes)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from samadapt.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
OVERLAY_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
OVERLAY_COLORS = ((255, 64, 64), (64, 200, 255), (255, 200, 0), (120, 255, 120), (200, 120, 255))


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a 2D image as (H, W) or (H, W, C) in its stored dtype (uint8, uint16, float...).

    Raises:
        InputError: missing, unreadable, unsupported or not a 2D image.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise InputError(f"image not found: {path}")
    if path.is_dir():
        raise InputError(f"expected an image file, got a folder: {path}")
    try:
        with Image.open(path) as opened:
            opened.load()
            if opened.mode in ("I;16", "I;16B", "I;16L"):
                return np.array(opened, dtype=np.uint16)
            array = np.array(opened.convert("RGB") if opened.mode == "P" else opened)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"cannot read image {path.name}: {exc}") from None
    if array.ndim not in (2, 3) or array.size == 0:
        raise InputError(f"{path.name} is not a 2D image (array shape {array.shape})")
    return array


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it into place.

    Nothing is left behind on failure: the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    if not path.parent.exists():
        raise InputError(f"output folder does not exist: {path.parent}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix="".join(path.suffixes), dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_suffix(path: Path, allowed: Sequence[str], what: str) -> None:
    """Refuse an output path whose extension is not one of ``allowed`` (before any slow work)."""
    if path.suffix.lower() not in allowed:
        raise InputError(f"{what} must end in one of {', '.join(allowed)}: {path.name}")


def write_mask(path: str | os.PathLike[str], mask: np.ndarray) -> None:
    """Write a (H, W) bool/label mask: binary masks as 0/255 uint8, label maps as uint8/uint16 values."""
    from PIL import Image

    path = Path(path)
    check_suffix(path, MASK_SUFFIXES, "mask output")
    array = np.asarray(mask)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.max(initial=0) > 255:
        array = array.astype(np.uint16)
    else:
        array = array.astype(np.uint8)
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format=_pil_format(path)))


def _pil_format(path: Path) -> str:
    return {".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP", ".jpg": "JPEG", ".jpeg": "JPEG"}[
        path.suffix.lower()
    ]


def display_rgb(image: np.ndarray) -> np.ndarray:
    """Any 2D image -> (H, W, 3) uint8 for display (min-max stretch for non-uint8 data)."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.dtype != np.uint8:
        array = array.astype(np.float64)
        low, high = np.percentile(array, (0.5, 99.5)) if array.size else (0.0, 1.0)
        array = (np.clip((array - low) / max(high - low, 1e-8), 0, 1) * 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return array


def overlay(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    boxes: Sequence[Sequence[float]] = (),
    points: Sequence[tuple[float, float, bool]] = (),
    alpha: float = 0.45,
    min_size: int = 0,
) -> np.ndarray:
    """Blend masks (each (H, W) bool) over the image, draw box outlines and points: (H', W', 3) uint8.

    Images smaller than ``min_size`` are enlarged by a whole factor (nearest neighbour) so that small
    slices stay legible; boxes and points are scaled with them.
    """
    from PIL import Image, ImageDraw

    factor = max(1, min_size // max(np.shape(image)[:2])) if min_size else 1
    if factor > 1:
        image = np.repeat(np.repeat(display_rgb(image), factor, axis=0), factor, axis=1)
        masks = [np.repeat(np.repeat(m, factor, axis=0), factor, axis=1) for m in masks]
        boxes = [[(v + 0.5) * factor - 0.5 for v in box] for box in boxes]
        points = [((x + 0.5) * factor - 0.5, (y + 0.5) * factor - 0.5, pos) for x, y, pos in points]
    rgb = display_rgb(image).astype(np.float64)
    for i, mask in enumerate(masks):
        color = np.array(OVERLAY_COLORS[i % len(OVERLAY_COLORS)], dtype=np.float64)
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * color
    canvas = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for i, box in enumerate(boxes):
        draw.rectangle([float(v) for v in box], outline=OVERLAY_COLORS[i % len(OVERLAY_COLORS)], width=2)
    for x, y, positive in points:
        r = 4
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(0, 255, 0) if positive else (255, 0, 0))
    return np.array(canvas)


def write_overlay(path: str | os.PathLike[str], rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 picture (PNG/JPEG/TIFF) atomically."""
    from PIL import Image

    path = Path(path)
    check_suffix(path, OVERLAY_SUFFIXES, "overlay output")
    atomic_write(path, lambda tmp: Image.fromarray(rgb).save(tmp, format=_pil_format(path)))


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a mask image as (H, W) bool (any nonzero pixel is foreground)."""
    array = read_image(path)
    if array.ndim == 3:
        array = array[:, :, 0]
    return array > 0


def read_label_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a 2D mask or label map as (H, W) integers: 0 = background, every other value one object.

    Gray and 16-bit images keep their values (a binary 0/255 mask is one object, value 255); palette
    PNGs give their palette indices; colour masks (RGB/RGBA with differing channels) give one value per
    distinct non-black colour, numbered 1, 2, ... in sorted colour order.

    Raises:
        InputError: missing, unreadable or not a 2D image.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"mask not found: {path}")
    try:
        with Image.open(path) as opened:
            opened.load()
            array = np.array(opened)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"cannot read mask {path.name}: {exc}") from None
    if array.ndim == 3:
        array = array[:, :, :3] if array.shape[2] >= 3 else array[:, :, :1]  # alpha dropped
        if np.all(array == array[:, :, :1]):
            array = array[:, :, 0]
        else:
            colors, inverse = np.unique(array.reshape(-1, 3), axis=0, return_inverse=True)
            offset = 0 if not colors[0].any() else 1  # black, if present, sorts first and stays 0
            array = (np.arange(len(colors)) + offset)[inverse.reshape(-1)].reshape(array.shape[:2])
    if array.ndim != 2 or array.size == 0:
        raise InputError(f"{path.name} is not a 2D mask (array shape {array.shape})")
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise InputError(f"mask {path.name} has non-integer values; expected a binary mask or label map")
        array = array.astype(np.int64)
    if array.dtype.kind not in "iu" or array.min(initial=0) < 0:
        raise InputError(f"mask {path.name} has negative or non-integer values; expected a label map")
    top = int(array.max(initial=0))
    return array.astype(np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.int64)
