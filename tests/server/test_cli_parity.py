"""Real LiteMedSAM over HTTP: upload the TotalSegmentator CT, box on the liver's largest slice, propagate,
undo, redo; the mask has the input's geometry and equals ``samadapt segment``'s for the same prompt."""

from __future__ import annotations

import argparse
import gzip
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from server_helpers import CT, running

from samadapt.cli import load_predictor
from samadapt.domains.medical import read_volume
from samadapt.server import create_app

SEG = CT.parent / "example_seg.nii.gz"
LIVER = 5  # class_map_total_and_total_mr.json: "5": "liver"


@pytest.fixture(scope="module")
def real_server() -> Iterator[str]:
    # exactly the CLI's model flags (default weights, cpu, auto precision) through the CLI's own loader
    flags = argparse.Namespace(checkpoint=None, variant=None, adapter=None, device="cpu", precision="auto")
    predictor, described = load_predictor(flags)
    with running(create_app(predictor, model_info={"description": described})) as url:
        yield url


@pytest.mark.slow
def test_box_propagate_undo_redo_equals_the_cli(
    real_server: str, client_module: Any, cli_liver_run: dict
) -> None:
    # the CLI's run: `samadapt segment CT --box ... --slice k --label 5` (tests/conftest.py, shared)
    k, box = cli_liver_run["slice"], [float(v) for v in cli_liver_run["box"]]
    assert cli_liver_run["ct"] == CT and cli_liver_run["label"] == LIVER
    expected = read_volume(cli_liver_run["out"])
    assert set(np.unique(expected.array)) == {0, LIVER}

    client = client_module.SamAdaptClient(real_server, timeout=600)
    assert client.capabilities()["model"]["variant"] == "lite_medsam"
    sid = client.create_session(CT)
    local = np.zeros(expected.shape, np.uint8)
    first = client.prompt(sid, "axial", k, box=box)
    client_module.apply_region(local, first)
    assert first["offset"][2] == k and first["shape"][2] == 1 and local.any()
    after_prompt = local.copy()
    prop = client.propagate(sid, "both")
    client_module.apply_region(local, prop)
    assert client.progress(sid)["state"] == "done"
    assert prop["slices"]["up"] + prop["slices"]["down"] > 3
    full = local.copy()
    client_module.apply_region(local, client.undo(sid))
    np.testing.assert_array_equal(local, after_prompt)
    client_module.apply_region(local, client.redo(sid))
    np.testing.assert_array_equal(local, full)

    import nibabel as nib

    served = nib.Nifti1Image.from_bytes(gzip.decompress(client.mask(sid)))
    source = read_volume(CT)
    assert served.shape == source.shape
    np.testing.assert_allclose(served.affine, source.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(served.dataobj), local)
    np.testing.assert_array_equal(local > 0, expected.array == LIVER)  # the CLI's mask, voxel for voxel
    assert set(np.unique(local)) == {0, 1}
    liver = read_volume(SEG).array == LIVER
    dice = 2 * ((local > 0) & liver).sum() / ((local > 0).sum() + liver.sum())
    assert dice > 0.85
    client.close(sid)
