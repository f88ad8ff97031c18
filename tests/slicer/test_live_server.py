"""The extension's logic against the real ``samadapt serve`` over HTTP (no Slicer, tiny random model).

This is local mode as the extension runs it: ``SamAdaptLib.localserver.LocalServer`` starts
``python -m samadapt.cli serve`` on 127.0.0.1 with a random token, ``SamAdaptLib.client.SamAdaptClient``
talks to it, and ``InteractiveSession`` uploads a Slicer-ordered ([k, j, i]) array of the real CT with its
IJKToRAS (nibabel's affine stands in for Slicer's), turns a box drawn in the Red view (RAS corners) into
a prompt, propagates, undoes and redoes. After every step the local mirror (what the segment holds)
must equal the server's mask downloaded as NIfTI, on the uploaded grid.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from cli_helpers import write_tiny_checkpoint
from SamAdaptLib.client import SamAdaptClient, SamAdaptError
from SamAdaptLib.geometry import STANDARD_SLICE_TO_RAS, ijk_to_ras, prompt_from_markups
from SamAdaptLib.localserver import LocalServer, LocalServerError
from SamAdaptLib.session import InteractiveSession

CT = Path(__file__).resolve().parents[1] / "data" / "totalsegmentator" / "example_ct_sm.nii.gz"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.pth")


@pytest.fixture(scope="module")
def local_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    server = LocalServer(
        python=sys.executable,
        extra_args=["--checkpoint", str(tiny_checkpoint), "--precision", "fp32"],
        log_path=str(log),
    )
    server.start()
    try:
        server.wait_ready(SamAdaptClient(server.url, server.token, timeout=5).health, timeout=150)
    except LocalServerError:
        pytest.fail(f"samadapt serve did not start:\n{log.read_text()[-3000:]}")
    yield server
    server.stop()
    assert not server.running


def _server_mask(client: SamAdaptClient, session_id: str, affine: np.ndarray) -> np.ndarray:
    image = nib.Nifti1Image.from_bytes(gzip.decompress(client.mask(session_id)))
    np.testing.assert_allclose(image.affine, affine, atol=1e-4)  # the uploaded grid
    return np.asarray(image.dataobj).astype(np.uint8)  # [i, j, k]


def test_local_server_session_matches_the_server_mask(local_server: LocalServer) -> None:
    client = SamAdaptClient(local_server.url, token=local_server.token, timeout=120)
    assert local_server.url.startswith("http://127.0.0.1:")
    with pytest.raises(SamAdaptError) as refused:  # the local server is not open to other local users
        SamAdaptClient(local_server.url, token="wrong-token").capabilities()
    assert refused.value.status == 401
    caps = client.capabilities()
    assert caps.get("undo", True)

    image = nib.load(str(CT))
    affine = image.affine  # volumeNode.GetIJKToRASMatrix() for this file
    slicer_array = np.ascontiguousarray(np.asanyarray(image.dataobj).transpose(2, 1, 0))  # arrayFromVolume
    written: list[tuple[int, tuple[int, ...]]] = []
    segment = np.zeros(slicer_array.shape, np.uint8)

    def writer(label: int, extent: tuple[int, ...], binary: np.ndarray) -> None:
        i0, i1, j0, j1, k0, k1 = extent
        segment[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1] = binary
        written.append((label, extent))

    session = InteractiveSession.from_array(client, slicer_array, affine, writer=writer)
    assert session.shape_ijk == image.shape
    label = session.label_for("Segment_1")

    # a box drawn in the Red view on slice k = 17, from voxel (40, 30) to (80, 70)
    red = np.eye(4)
    red[:3, :3] = STANDARD_SLICE_TO_RAS["Axial"]
    red[:3, 3] = ijk_to_ras(affine, [60, 50, 17])
    corners = [ijk_to_ras(affine, [40, 30, 17]), ijk_to_ras(affine, [80, 70, 17])]
    prompt = prompt_from_markups(affine, image.shape, red, box_corners_ras=corners, current_slice=17)
    assert prompt.to_request()["box"] == [40.0, 30.0, 80.0, 70.0] and prompt.slice_index == 17

    steps = []
    change = session.prompt(prompt, label=label)
    steps.append(("prompt", change))
    assert change.extent is None or change.extent[4] == change.extent[5] == 17  # one slice
    assert session.labels.any(), "the prompt segmented nothing: the test would prove little"
    steps.append(("propagate", session.propagate("both", label=label)))
    after_propagate = session.labels.copy()
    steps.append(("undo", session.undo()))
    server = _server_mask(client, session.session_id, affine)
    np.testing.assert_array_equal(session.labels.transpose(2, 1, 0), server)
    steps.append(("redo", session.redo()))
    np.testing.assert_array_equal(session.labels, after_propagate)
    server = _server_mask(client, session.session_id, affine)
    np.testing.assert_array_equal(session.labels.transpose(2, 1, 0), server)
    np.testing.assert_array_equal(segment, session.labels == label)  # what the Slicer segment holds
    assert all(lab == label for lab, _ in written)
    session.close()
    with pytest.raises(SamAdaptError) as gone:
        client.session(session.session_id)
    assert gone.value.status == 404
    # every step changed the mask (undo and redo by as many voxels as the propagation)
    voxels = {name: c.voxels for name, c in steps}
    assert voxels["prompt"] > 0 and voxels["propagate"] > 0, voxels
    assert voxels["undo"] == voxels["redo"] == voxels["propagate"], voxels
