"""MedSAM intensity presets: CT windows at known HU, MR percentile normalisation, preset guessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from samadapt.domains.medical import PRESETS, Volume, apply_intensity, guess_preset, read_volume
from samadapt.errors import InputError

HU = np.array(
    [-3024, -1350, -1000, -600, -500, -160, 0, 40, 60, 140, 150, 240, 400, 1300, 3000], dtype=np.int16
)


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        # ct-soft: L40 W400 -> [-160, 240]
        ("ct-soft", {-1000: 0.0, -160: 0.0, 0: 0.4, 40: 0.5, 140: 0.75, 240: 1.0, 3000: 1.0}),
        # ct-lung: L-600 W1500 -> [-1350, 150]
        ("ct-lung", {-3024: 0.0, -1350: 0.0, -600: 0.5, 0: 0.9, 150: 1.0, 400: 1.0}),
        # ct-bone: L400 W1800 -> [-500, 1300]
        ("ct-bone", {-1000: 0.0, -500: 0.0, 400: 0.5, 1300: 1.0, 0: 500 / 1800}),
        # ct-brain: L40 W80 -> [0, 80]
        ("ct-brain", {-160: 0.0, 0: 0.0, 40: 0.5, 60: 0.75, 140: 1.0}),
    ],
)
def test_ct_windows_at_known_hu(preset: str, expected: dict[int, float]) -> None:
    out = apply_intensity(HU, preset)
    assert out.dtype == np.float32 and out.shape == HU.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    for hu, value in expected.items():
        assert out[list(HU).index(hu)] == pytest.approx(value, abs=1e-6), (preset, hu)


def test_default_is_ct_soft_and_explicit_window() -> None:
    np.testing.assert_array_equal(apply_intensity(HU), apply_intensity(HU, "ct-soft"))
    out = apply_intensity(HU, window=(50, 100))  # [0, 100]
    assert out[list(HU).index(0)] == 0.0 and out[list(HU).index(40)] == pytest.approx(0.4)
    assert out[list(HU).index(140)] == 1.0
    with pytest.raises(InputError, match="positive width"):
        apply_intensity(HU, window=(40, 0))
    with pytest.raises(InputError, match="not both"):
        apply_intensity(HU, "ct-lung", window=(40, 400))


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(InputError) as excinfo:
        apply_intensity(HU, "ct-liver")
    assert str(excinfo.value) == "unknown intensity preset 'ct-liver'; valid: " + ", ".join(PRESETS)
    assert set(PRESETS) == {"ct-soft", "ct-lung", "ct-bone", "ct-brain", "mr"}


def test_mr_percentiles_on_nonzero_voxels() -> None:
    fg = np.arange(1, 1001, dtype=np.float64)
    fg[-1] = 1e6  # a hot outlier is clipped away
    arr = np.concatenate([np.zeros(5000), fg])  # lots of background must not move the percentiles
    out = apply_intensity(arr, "mr")
    lo, hi = np.percentile(fg, [0.5, 99.5])
    assert out.dtype == np.float32
    assert np.all(out[:5000] == 0.0)
    assert out[5000] == 0.0 and out[-1] == 1.0  # value 1 is below p0.5; the outlier is above p99.5
    assert out[5000 + 499] == pytest.approx((500 - lo) / (hi - lo), abs=1e-6)
    assert 4.9 < lo < 6.1 and 994 < hi < 1000
    assert np.all(apply_intensity(np.zeros((3, 3)), "mr") == 0.0)


def test_guess_preset(data_dir: Path) -> None:
    ct = read_volume(data_dir / "example_ct_sm.nii.gz")
    assert guess_preset(ct) == "ct-soft"
    assert guess_preset(np.abs(ct.array) + 1) == "mr"
    assert guess_preset(Volume(np.zeros((2, 2, 2)), np.eye(4), {"modality": "MR"})) == "mr"
