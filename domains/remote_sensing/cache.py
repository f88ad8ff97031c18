"""On-disk cache of per-window image embeddings, so later runs on the same raster skip the encoder.

A cached embedding is keyed by everything that changes it:

- the raster's content (``GeoRaster.content_key()``: sha256 of the file bytes, not its path or date),
- the window (column, row, width, height in the raster's read grid) and the read grid itself
  (``--resolution`` changes it: the pixel size is part of the key),
- the selected bands and the global stretch (low/high per band),
- the model: a fingerprint of every weight of the loaded model (so an attached, merged adapter counts),
  its preprocessing profile and the encoder precision.

Layout: ``ROOT/<model key[:16]>/<raster key[:16]>/<entry key>.pt``, one ``torch.save`` file per window
holding the embedding in float16 (half the disk of float32; the run that writes an entry decodes from
the same float16 values, so a cached run gives exactly the masks of the first run). Entries load with
``torch.load(weights_only=True)``. Writes go to a temporary file then ``os.replace``: a run killed half
way leaves only whole entries, and two processes writing the same entry cannot corrupt it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samadapt.modeling import EncoderOutput

__all__ = ["CACHE_VERSION", "EmbeddingCache", "default_cache_root", "model_fingerprint"]

CACHE_VERSION = 1
_STORE_DTYPE = torch.float16


def default_cache_root() -> Path:
    """``$SAMADAPT_CACHE/geo``, else ``$XDG_CACHE_HOME/samadapt/geo``, else ``~/.cache/samadapt/geo``."""
    if os.environ.get("SAMADAPT_CACHE"):
        return Path(os.environ["SAMADAPT_CACHE"]) / "geo"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "samadapt" / "geo"


def model_fingerprint(model: torch.nn.Module, precision: str = "fp32") -> str:
    """sha256 over every parameter and buffer of ``model`` (name, shape, dtype, bytes) and ``precision``.

    Hashing the loaded weights (rather than the checkpoint file) covers adapters merged into them and
    anything else that changes the encoder. About 0.1 s for LiteMedSAM's 10 M parameters.
    """
    digest = hashlib.sha256(f"precision={precision};".encode())
    profile = getattr(model, "profile", None)
    if profile is not None and hasattr(profile, "to_dict"):
        digest.update(json.dumps(profile.to_dict(), sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype};".encode())
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def _round(encoded: EncoderOutput) -> EncoderOutput:
    """The float32 embedding as the cache stores it (rounded through float16)."""

    def r(t: torch.Tensor) -> torch.Tensor:
        return t.to(_STORE_DTYPE).float()

    image = encoded.image
    return EncoderOutput(r(encoded.embedding), [r(f) for f in encoded.features], image)


class EmbeddingCache:
    """Per-window embeddings of one raster for one model, on disk.

    Args:
        root: cache folder (created on first write); default :func:`default_cache_root`.
        model_key: the model's identity, e.g. :func:`model_fingerprint` (hex string).
        raster_key: ``GeoRaster.content_key()``.
        read_key: what else changes the pixels the model sees: bands, stretch, resolution (any
            JSON-serialisable value; see :meth:`read_key_of`).
        enabled: False turns every lookup into a miss and every store into a no-op (``--no-cache``).

    Attributes:
        hits, misses: lookups served from disk / not found since creation.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None,
        model_key: str,
        raster_key: str,
        read_key: Any = None,
        *,
        enabled: bool = True,
    ) -> None:
        self.root = Path(root) if root is not None else default_cache_root()
        self.model_key = model_key
        self.raster_key = raster_key
        self.read_key = json.dumps(read_key, sort_keys=True, default=str)
        self.enabled = enabled
        self.hits = 0
        self.misses = 0
        self.folder = self.root / model_key[:16] / raster_key[:16]

    @staticmethod
    def read_key_of(raster: Any) -> dict[str, Any]:
        """What of a ``GeoRaster`` besides its bytes changes the tiles: bands, stretch, grid."""
        stretch = raster.stretch
        return {
            "bands": [int(b) for b in raster.bands],
            "low": np.asarray(stretch.low, dtype=np.float64).round(9).tolist(),
            "high": np.asarray(stretch.high, dtype=np.float64).round(9).tolist(),
            "res": [float(v) for v in raster.res],
            "size": [int(raster.width), int(raster.height)],
        }

    @classmethod
    def for_raster(
        cls,
        root: str | os.PathLike[str] | None,
        raster: Any,
        model: torch.nn.Module,
        precision: str,
        *,
        enabled: bool = True,
    ) -> EmbeddingCache:
        """The cache of ``raster`` (a ``GeoRaster``) for ``model`` run at ``precision``."""
        return cls(
            root,
            model_fingerprint(model, precision),
            raster.content_key(),
            cls.read_key_of(raster),
            enabled=enabled,
        )

    def key(self, window: Iterable[int]) -> str:
        """Entry name of a (col_off, row_off, width, height) window."""
        text = json.dumps(
            {
                "v": CACHE_VERSION,
                "model": self.model_key,
                "raster": self.raster_key,
                "read": self.read_key,
                "window": [int(v) for v in window],
            },
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()

    def path(self, window: Iterable[int]) -> Path:
        return self.folder / f"{self.key(window)}.pt"

    def load(self, window: Iterable[int], device: torch.device | str = "cpu") -> EncoderOutput | None:
        """The cached encoder output of ``window`` as float32 on ``device``, or None (a miss).

        A corrupt or unreadable entry counts as a miss (and is overwritten by the next store).
        """
        if not self.enabled:
            self.misses += 1
            return None
        path = self.path(window)
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            embedding = entry["embedding"].float().to(device)
            features = [f.float().to(device) for f in entry.get("features", [])]
            image = entry.get("image")
            image = image.float().to(device) if image is not None else None
        except FileNotFoundError:
            self.misses += 1
            return None
        except Exception:
            self.misses += 1
            return None
        self.hits += 1
        return EncoderOutput(embedding, features, image)

    def store(self, window: Iterable[int], encoded: EncoderOutput) -> EncoderOutput:
        """Save one window's encoder output (batch dimension 1); returns it as a later load will.

        The returned tensors are rounded through float16 as stored, so the masks of this run and of a
        run served from the cache are identical.
        """
        rounded = _round(encoded)
        if not self.enabled:
            return rounded
        path = self.path(window)
        path.parent.mkdir(parents=True, exist_ok=True)
        entry: dict[str, Any] = {
            "embedding": encoded.embedding.detach().to(_STORE_DTYPE).cpu().contiguous(),
            "features": [f.detach().to(_STORE_DTYPE).cpu().contiguous() for f in encoded.features],
        }
        if encoded.image is not None:
            entry["image"] = encoded.image.detach().cpu().contiguous()
        fd, tmp = tempfile.mkstemp(prefix=".tmp.", suffix=".pt", dir=path.parent)
        os.close(fd)
        try:
            torch.save(entry, tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return rounded

    def size_bytes(self) -> int:
        """Bytes this raster's entries use on disk for this model."""
        if not self.folder.exists():
            return 0
        return sum(p.stat().st_size for p in self.folder.glob("*.pt"))
