"""The MONAI Label facade, driven by the real ``monailabel.client.MONAILabelClient`` over HTTP.

The ``monailabel`` wheel is a test-only tool installed without its dependencies (the client module needs
only ``requests`` besides the standard library; ``make test`` installs it). Without it these tests fail:
the real client is the point of them.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import nrrd
import numpy as np
import pytest
import requests
import SimpleITK as sitk
from server_helpers import CT, TOKEN, running

from samadapt.domains.medical import read_volume
from samadapt.predictor import Predictor
from samadapt.server import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # the client imports cgi (deprecated in 3.11)
    import monailabel.client.client as client_mod  # test-only tool: pip install --no-deps monailabel==0.8.5

MODEL = "tiny"
AUTH = {"token_type": "Bearer", "access_token": TOKEN}
SLICE = 24  # an axial slice through the liver of example_ct_sm
FOREGROUND = [[40, 45, SLICE], [50, 50, SLICE]]
BACKGROUND = [[15, 80, SLICE]]


@pytest.fixture(scope="module")
def server(tiny_predictor: Predictor) -> Iterator[str]:
    with running(create_app(tiny_predictor, token=TOKEN, max_upload_bytes=8 << 20)) as url:
        yield url


def ml_client(url: str, tmp_path: Path, token: bool = True) -> Any:
    client = client_mod.MONAILabelClient(url, tmpdir=str(tmp_path), client_id="user-xyz")
    if token:
        client.update_auth(AUTH)
    return client


def status_of(exc: Exception) -> int:
    """HTTP status of a MONAILabelClientException (infer() puts it only in the message)."""
    code = getattr(exc, "status_code", None)
    if code is not None:
        return int(code)
    return int(str(getattr(exc, "msg", exc)).split("Status: ")[1].split(";")[0])


def test_info_lists_interactive_models(server: str, tmp_path: Path) -> None:
    info = ml_client(server, tmp_path).info()
    assert "config" not in info  # the Slicer plugin reads a top-level config as "upgrade the server"
    assert set(info["models"]) == {MODEL, f"{MODEL}_3d"}
    for name, dimension in ((MODEL, 2), (f"{MODEL}_3d", 3)):
        model = info["models"][name]
        assert model["type"] == "deepgrow" and model["dimension"] == dimension
        assert isinstance(model["labels"], list) and model["description"]


def _grid_matches(result_file: str, reference: Any) -> None:
    """The label file lies on the uploaded grid: same shape, affine, and ITK geometry."""
    label = read_volume(result_file)
    assert label.shape == reference.shape
    np.testing.assert_allclose(label.affine, reference.affine, atol=1e-4)
    got, want = sitk.ReadImage(result_file), sitk.ReadImage(str(CT))
    assert got.GetSize() == want.GetSize()
    np.testing.assert_allclose(got.GetSpacing(), want.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(got.GetOrigin(), want.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(got.GetDirection(), want.GetDirection(), atol=1e-6)


def _native_result(client_module: ModuleType, url: str, tmp_path: Path, propagate: bool) -> np.ndarray:
    """The same clicks through samadapt's own API (a fresh session): the label map it ends with."""
    client = client_module.SamAdaptClient(url, token=TOKEN)
    session = client.create_session(str(CT))
    points = [p[:2] for p in FOREGROUND + BACKGROUND]
    labels = [1] * len(FOREGROUND) + [0] * len(BACKGROUND)
    client.prompt(session, "axial", SLICE, points=points, point_labels=labels)
    if propagate:
        client.propagate(session, direction="both")
    path = tmp_path / "native.nii.gz"
    path.write_bytes(client.mask(session))
    client.close(session)
    return read_volume(path).array


def test_client_session_clicks_label_on_uploaded_grid(
    server: str, tmp_path: Path, client_module: ModuleType
) -> None:
    client = ml_client(server, tmp_path)
    reference = read_volume(CT)
    created = client.create_session(str(CT))
    session_id = created["session_id"]
    assert created["session_info"]["meta"]["shape"] == list(reference.shape)
    assert client.get_session(session_id)["name"] == session_id

    params = {"label": "liver", "foreground": FOREGROUND, "background": BACKGROUND}
    result_file, answer = client.infer(MODEL, "example_ct_sm", dict(params), session_id=session_id)
    assert result_file.endswith(".nrrd") and Path(result_file).parent == tmp_path
    assert answer["label_names"] == {"liver": 1} and answer["slice"] == SLICE and answer["dimension"] == 2
    _grid_matches(result_file, reference)
    data, _ = nrrd.read(result_file, index_order="F")
    assert data.shape == reference.shape and data.dtype == np.uint8
    assert set(np.unique(data)) <= {0, 1}
    assert answer["voxels"] == int(data.sum())
    others = np.delete(data, SLICE, axis=2)
    assert not others.any(), "a 2D model's answer sets only the clicked slice"
    native = _native_result(client_module, server, tmp_path, propagate=False)
    np.testing.assert_array_equal(data[:, :, SLICE], native[:, :, SLICE] == 1)

    result_3d, answer_3d = client.infer(f"{MODEL}_3d", "example_ct_sm", dict(params), session_id=session_id)
    assert answer_3d["dimension"] == 3
    _grid_matches(result_3d, reference)
    data_3d = read_volume(result_3d).array
    native_3d = _native_result(client_module, server, tmp_path, propagate=True)
    np.testing.assert_array_equal(data_3d, (native_3d == 1).astype(np.uint8))

    # Stateless requests: repeating the 2D clicks gives the same answer after the 3D one.
    again, _ = client.infer(MODEL, "example_ct_sm", dict(params), session_id=session_id)
    np.testing.assert_array_equal(read_volume(again).array, data)

    removed = client.remove_session(session_id)
    assert removed["name"] == session_id
    with pytest.raises(client_mod.MONAILabelClientException) as gone:
        client.get_session(session_id)
    assert status_of(gone.value) == 404


def test_result_formats_and_outputs(server: str, tmp_path: Path) -> None:
    client = ml_client(server, tmp_path)
    session_id = client.create_session(str(CT))["session_id"]
    params = {"foreground": FOREGROUND, "result_extension": ".nii.gz", "label": "liver"}
    result_file, _ = client.infer(MODEL, "x", params, session_id=session_id)
    assert result_file.endswith(".nii.gz")
    _grid_matches(result_file, read_volume(CT))
    seg_file, _ = client.infer(MODEL, "x", dict(params, result_extension=".seg.nrrd"), session_id=session_id)
    assert read_volume(seg_file).meta["labels"] == {1: "liver"}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    form = {"params": json.dumps({"foreground": FOREGROUND})}
    url = f"{server}/infer/{MODEL}?session_id={session_id}"
    as_json = requests.post(url + "&output=json", data=form, headers=headers, timeout=60)
    assert as_json.status_code == 200 and as_json.json()["slice"] == SLICE
    as_image = requests.post(url + "&output=image", data=form, headers=headers, timeout=60)
    assert as_image.status_code == 200 and as_image.content[:4] == b"NRRD"
    client.remove_session(session_id)


def test_bad_requests_are_4xx_and_server_keeps_serving(server: str, tmp_path: Path) -> None:
    client = ml_client(server, tmp_path)
    session_id = client.create_session(str(CT))["session_id"]
    Error = client_mod.MONAILabelClientException
    cases: list[tuple[dict[str, Any], str, int]] = [
        ({"foreground": [[1, 1, 1]]}, "nope", 404),  # unknown model
        ({"foreground": [[1, 1, 1000]]}, MODEL, 422),  # click outside the volume
        ({"foreground": [[1, 1]]}, MODEL, 422),  # not [i, j, k]
        ({"foreground": "1,1,1"}, MODEL, 422),
        ({}, MODEL, 422),  # no click
        ({"foreground": [[1, 1, 1]], "axis": "oblique"}, MODEL, 422),
        ({"foreground": [[1, 1, 1]], "result_extension": "/../../x.nrrd"}, MODEL, 422),
        ({"foreground": [[1, 1, 1]], "roi": [1, 2, 3]}, MODEL, 422),
    ]
    for params, model, status in cases:
        with pytest.raises(Error) as info:
            client.infer(model, "x", params, session_id=session_id)
        assert status_of(info.value) == status, (params, model)
    for bad_id in ("../../etc/passwd", "nosuchsession123", "a"):
        with pytest.raises(Error) as info:
            client.infer(MODEL, "x", {"foreground": [[1, 1, 1]]}, session_id=bad_id)
        assert status_of(info.value) == 404

    headers = {"Authorization": f"Bearer {TOKEN}"}
    infer_url = f"{server}/infer/{MODEL}?session_id={session_id}"
    malformed = requests.post(infer_url, data={"params": "{not json"}, headers=headers, timeout=30)
    assert malformed.status_code == 422 and "params" in malformed.json()["detail"]
    no_session = requests.post(f"{server}/infer/{MODEL}", data={"params": "{}"}, headers=headers, timeout=30)
    assert no_session.status_code == 422

    def upload(name: str, data: bytes) -> requests.Response:
        return requests.put(
            f"{server}/session/", files=[("files", (name, data))], headers=headers, timeout=30
        )

    garbage = upload("../../evil.nii.gz", b"this is not a volume" * 20)
    assert garbage.status_code == 422 and "detail" in garbage.json()
    nhdr = b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\ndata file: /etc/passwd\n\n"
    detached = upload("x.nrrd", nhdr)
    assert detached.status_code == 422 and "data file" in detached.json()["detail"]
    long_header = nhdr.replace(b"type:", b"# padding\n" * 600 + b"type:")  # past the sniffed first 4 KiB
    detached_late = upload("x.nrrd", long_header)
    assert detached_late.status_code == 422 and "data file" in detached_late.json()["detail"]
    truncated = upload("ct.nii.gz", CT.read_bytes()[:5000])
    assert truncated.status_code == 422
    assert upload("big.nii.gz", b"\0" * (9 << 20)).status_code == 413
    assert requests.put(f"{server}/session/", headers=headers, timeout=30).status_code == 422

    assert client.info()["models"]  # still serving
    client.remove_session(session_id)


def test_token_is_required(server: str, tmp_path: Path) -> None:
    client = ml_client(server, tmp_path, token=False)
    with pytest.raises(client_mod.MONAILabelClientException) as info:
        client.info()
    assert status_of(info.value) == 401
    with pytest.raises(client_mod.MONAILabelClientException) as upload:
        client.create_session(str(CT))
    assert status_of(upload.value) == 401
