"""Shared pytest set-up: tests import the reference oracles as ``import oracles``; session-wide runs."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

# auto precision measures bf16 once per machine and caches it under the user's cache dir; tests (and
# the CLI subprocesses they start) use a private one instead.
if not os.environ.get("SAMADAPT_CACHE_DIR"):
    _cache = tempfile.mkdtemp(prefix="samadapt-test-cache-")
    os.environ["SAMADAPT_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, True)


@pytest.fixture(scope="session")
def cli_liver_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``samadapt segment`` on the bundled CT, a tight box on the liver's largest axial slice, propagated.

    Run once per session (real LiteMedSAM, ~25 s on 2 cores) and shared: the CLI's own volume tests
    read it, and the server's parity test compares its HTTP session with it voxel for voxel.
    Returns {"out": the label map (liver = 5), "overlay": its PNG, "slice": k, "box": [x0, y0, x1, y1],
    "ct": the input, "seg": the ground truth, "label": 5}.
    """
    import numpy as np

    from samadapt.cli import main
    from samadapt.domains.medical import read_volume

    data = TESTS_DIR / "data" / "totalsegmentator"
    ct, seg, label = data / "example_ct_sm.nii.gz", data / "example_seg.nii.gz", 5  # 5: liver
    liver = read_volume(seg).array == label
    k = int(liver.sum(axis=(0, 1)).argmax())
    ii, jj = np.nonzero(liver[:, :, k])
    box = [int(v) for v in (ii.min(), jj.min(), ii.max(), jj.max())]
    out_dir = tmp_path_factory.mktemp("liver")
    out, overlay = out_dir / "liver.nii.gz", out_dir / "liver.png"
    args = ["segment", str(ct), "--box", *map(str, box), "--slice", str(k), "-o", str(out)]
    assert main([*args, "--label", str(label), "--overlay", str(overlay), "--no-progress"]) == 0
    return {"out": out, "overlay": overlay, "slice": k, "box": box, "ct": ct, "seg": seg, "label": label}
