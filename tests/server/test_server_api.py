"""The HTTP service over a real loopback server with a tiny model: auth, limits, bad input, sessions,
undo/redo, seeds, expiry, the embedding cache bound, and concurrent clients without cross-talk."""

from __future__ import annotations

import base64
import gzip
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from server_helpers import CT, TOKEN, blob_volume, running

from samadapt.server import create_app
from samadapt.server.cache import embedding_bytes
from samadapt.server.sessions import SessionStore

LIMIT = 3 << 20  # bytes: the CT test volume (0.5 MB) fits, a 4 MB body does not


@pytest.fixture(scope="module")
def server(tiny_predictor: Any) -> Iterator[str]:
    app = create_app(tiny_predictor, token=TOKEN, max_upload_bytes=LIMIT, session_ttl_s=600)
    with running(app) as url:
        yield url


@pytest.fixture
def client(server: str, client_module: Any) -> Any:
    return client_module.SamAdaptClient(server, token=TOKEN, timeout=120)


def _status(client_module: Any, call: Any) -> tuple[int, str]:
    with pytest.raises(client_module.SamAdaptError) as info:
        call()
    return info.value.status, info.value.detail


def _still_serving(client: Any) -> None:
    assert client.health()["ok"] is True
    assert client.capabilities()["name"] == "samadapt"


def test_token_is_required_everywhere_but_healthz(server: str, client_module: Any, client: Any) -> None:
    anonymous = client_module.SamAdaptClient(server, token="")
    assert anonymous.health()["ok"] is True
    assert _status(client_module, anonymous.capabilities)[0] == 401
    wrong = client_module.SamAdaptClient(server, token="not-the-token")
    assert _status(client_module, wrong.capabilities)[0] == 401
    assert _status(client_module, lambda: wrong.create_session(CT))[0] == 401
    assert _status(client_module, lambda: wrong.session("A" * 22))[0] == 401
    assert _status(client_module, lambda: anonymous._request("GET", "/info/"))[0] == 401
    caps = client.capabilities()
    assert caps["auth"] == "bearer"
    assert caps["model"]["variant"] == "tiny"
    assert {"box", "point", "roi"} <= set(caps["prompt_types"])
    assert caps["directions"] == ["up", "down", "both"]
    assert caps["limits"]["max_upload_bytes"] == LIMIT


def test_oversize_upload_is_413_and_the_server_keeps_serving(client_module: Any, client: Any) -> None:
    status, detail = _status(client_module, lambda: client.create_session(b"\0" * (LIMIT + (1 << 20))))
    assert status == 413 and "limit" in detail
    noise = np.random.default_rng(0).integers(0, 255, LIMIT, dtype=np.uint8)  # incompressible
    status, _ = _status(client_module, lambda: client.create_session_from_array(noise.reshape(-1, 1, 1)))
    assert status == 413
    _still_serving(client)


def test_malformed_volumes_are_4xx_with_one_line(client_module: Any, client: Any) -> None:
    flat, _ = blob_volume(1, (16, 16, 1))
    bad_calls = [
        lambda: client.create_session(b"this is not a volume", fmt="nifti"),
        lambda: client.create_session(gzip.compress(b"not nifti either"), fmt="nifti"),
        lambda: client.create_session(
            b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nencoding: raw\ndata file: /etc/passwd\n\n",
            fmt="nrrd",
        ),
        lambda: client.create_session(CT, fmt="dicom"),
        lambda: client.create_session_from_array(b"\0" * 10, shape=[4, 4, 4], dtype="int16"),
        lambda: client.create_session_from_array(b"\0" * 128, shape=[4, 4, 4], dtype="complex64"),
        lambda: client.create_session_from_array(flat),
        lambda: client._request("POST", "/sessions", json_body=[1, 2, 3]),
        lambda: client._request(
            "POST", "/sessions", body=b"{not json", headers={"Content-Type": "application/json"}
        ),
    ]
    for call in bad_calls:
        status, detail = _status(client_module, call)
        assert 400 <= status < 500, detail
        assert "\n" not in detail and detail
        assert "/tmp" not in detail  # server paths never leak
    _still_serving(client)


@pytest.mark.parametrize(
    "session_id",
    [
        "../../etc/passwd",
        "..%2F..%2Fetc%2Fpasswd",
        "a/b",
        "short",
        "x" * 65,
        "bad id!",
        "AAAAAAAAAAAAAAAAAAAAAA",
    ],
)
def test_path_like_and_unknown_ids_are_404(
    client_module: Any, client: Any, server: str, session_id: str
) -> None:
    for call in (
        lambda: client.session(session_id),
        lambda: client.undo(session_id),
        lambda: client.prompt(session_id, "axial", 1, box=[1, 1, 5, 5]),
        lambda: client.mask(session_id),
    ):
        assert _status(client_module, call)[0] in (404, 422)
    # the raw path too, unquoted: routing never matches a path with slashes
    request = urllib.request.Request(
        f"{server}/sessions/{urllib.parse.quote(session_id, safe='/%')}/mask",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30)
    assert info.value.code in (404, 422)
    _still_serving(client)


def test_prompt_undo_redo_seed_and_mask_download(client_module: Any, client: Any) -> None:
    array, box = blob_volume(3)
    sid = client.create_session_from_array(array, spacing=(0.8, 0.9, 2.5), origin=(10, -5, 3))
    info = client.session(sid)
    assert info["shape"] == list(array.shape) and info["spacing"] == pytest.approx([0.8, 0.9, 2.5])
    local = np.zeros(array.shape, np.uint8)
    first = client.prompt(sid, "axial", 4, box=box, label=2)
    assert first["offset"][2] == 4 and first["shape"][2] in (0, 1)
    client_module.apply_region(local, first)
    assert set(np.unique(local)) <= {0, 2}
    points = client.prompt(sid, "coronal", 10, points=[[20, 4], [2, 1]], point_labels=[1, 0], label=3)
    client_module.apply_region(local, points)
    prop = client.propagate(sid, "up", label=2)
    client_module.apply_region(local, prop)
    assert client.progress(sid)["state"] == "done"
    assert prop["slices"].keys() == {"up"}
    depth = client.session(sid)["undo_depth"]
    assert depth == 3 - sum(r["shape"] == [0, 0, 0] for r in (first, points, prop))
    for _ in range(depth):
        client_module.apply_region(local, client.undo(sid))
    assert not local.any()
    empty = client.undo(sid)
    assert empty["shape"] == [0, 0, 0] and empty["undo_depth"] == 0
    for _ in range(depth):
        client_module.apply_region(local, client.redo(sid))
    assert client.redo(sid)["shape"] == [0, 0, 0]
    downloaded = _nifti_array(client.mask(sid))
    np.testing.assert_array_equal(downloaded, local)
    seed = np.zeros(array.shape, np.uint8)
    seed[5:9, 6:9, 2:5] = 7
    client_module.apply_region(local, client.seed(sid, seed))
    np.testing.assert_array_equal(local, seed)
    part = client_module.encode_region((0, 0, 0), (2, 2, 2), bytes([1] * 8))
    client_module.apply_region(local, client.seed(sid, region=part))
    np.testing.assert_array_equal(_nifti_array(client.mask(sid)), local)
    again = client.propagate(sid, "both", label=7, axis="axial", slice_index=3)
    client_module.apply_region(local, again)
    np.testing.assert_array_equal(_nifti_array(client.mask(sid)), local)
    nrrd_bytes = client.mask(sid, fmt="nrrd")
    assert nrrd_bytes.startswith(b"NRRD")
    client.close(sid)
    assert _status(client_module, lambda: client.session(sid))[0] == 404


def test_bad_prompts_are_422_and_roi_prompts_work(client_module: Any, client: Any) -> None:
    array, box = blob_volume(5)
    sid = client.create_session_from_array(array)
    for call in (
        lambda: client.prompt(sid, "axial", 99, box=box),
        lambda: client.prompt(sid, "axial", 2, box=[10, 10, 5, 5]),
        lambda: client.prompt(sid, "axial", 2, box=[0, 0, 500, 5]),
        lambda: client.prompt(sid, "oblique", 2, box=box),
        lambda: client.prompt(sid, "axial", 2),
        lambda: client.prompt(sid, "axial", 2, box=box, label=300),
        lambda: client.prompt(sid, "axial", 2, points=[[1, 1]], point_labels=[1, 0]),
        lambda: client.propagate(sid, "sideways"),
        lambda: client.propagate(sid, "up", label=9),
        lambda: client._request("POST", f"/sessions/{sid}/prompt", json_body={"slice_index": "two"}),
        lambda: client.seed(sid, region={"offset": [0, 0, 0], "shape": [99, 1, 1], "data": ""}),
    ):
        status, detail = _status(client_module, call)
        assert status == 422, detail
        assert "\n" not in detail
    roi = [box[0], box[1], 2, box[2], box[3], 5]
    region = client.prompt(sid, "axial", None, roi=roi)
    assert region["slice_index"] == 3
    prop = client.propagate(sid, "both")
    changed = prop["offset"][2], prop["offset"][2] + prop["shape"][2]
    assert prop["shape"] == [0, 0, 0] or (changed[0] >= 2 and changed[1] <= 6)  # stays inside the ROI
    client.close(sid)


def test_raw_array_in_kji_order_and_lps_frame(client: Any) -> None:
    array, _ = blob_volume(7)
    sid = client.create_session_from_array(
        np.ascontiguousarray(array.transpose(2, 1, 0)),
        order="kji",
        frame="LPS",
        spacing=(1, 2, 3),
        origin=(5, 6, 7),
    )
    info = client.session(sid)
    assert info["shape"] == list(array.shape)
    affine = np.array(info["affine"])
    np.testing.assert_allclose(affine[:3, :3], np.diag([-1.0, -2.0, 3.0]))
    np.testing.assert_allclose(affine[:3, 3], [-5.0, -6.0, 7.0])
    client.close(sid)


def test_idle_sessions_expire(tiny_predictor: Any, client_module: Any) -> None:
    store = SessionStore(tiny_predictor, cache_bytes=1 << 26, session_ttl_s=0.5)
    app = create_app(store, sweep_interval_s=0.2)
    with running(app) as url:
        client = client_module.SamAdaptClient(url)
        sid = client.create_session_from_array(blob_volume(2)[0])
        client.prompt(sid, "axial", 3, box=blob_volume(2)[1])
        assert store.cache.count(sid) > 0
        time.sleep(1.5)
        assert _status(client_module, lambda: client.session(sid))[0] == 404
        assert store.cache.count(sid) == 0 and len(store) == 0


def test_embedding_cache_stays_within_its_byte_bound(tiny_predictor: Any, client_module: Any) -> None:
    one = embedding_bytes(tiny_predictor.embed([np.zeros((40, 48), np.float32)])[0])
    store = SessionStore(tiny_predictor, cache_bytes=3 * one + 10)
    with running(create_app(store)) as url:
        client = client_module.SamAdaptClient(url)
        array, box = blob_volume(4)
        sid = client.create_session_from_array(array)
        for k in range(array.shape[2]):
            client.prompt(sid, "axial", k, box=box)
            stats = client.capabilities()["cache"]
            assert stats["bytes"] <= 3 * one + 10 and stats["entries"] <= 3
        assert stats["evictions"] > 0
        client.prompt(sid, "axial", array.shape[2] - 1, box=box)
        assert client.capabilities()["cache"]["hits"] > 0


def test_eight_concurrent_clients_twenty_prompts_each_no_cross_talk(
    server: str, client_module: Any, tiny_predictor: Any
) -> None:
    """Each client has its own volume and label; every region it gets back holds only its label,
    and its final mask equals a serial replay of its prompts on a fresh session (same model)."""

    def plan(n: int) -> list[dict[str, Any]]:
        array, box = blob_volume(10 + n)
        rng = np.random.default_rng(n)
        steps = []
        for _ in range(20):
            k = int(rng.integers(2, 6))
            jitter = rng.integers(-2, 3, size=4).astype(float)
            b = np.clip(np.array(box) + jitter, 0, [array.shape[0] - 1, array.shape[1] - 1] * 2)
            steps.append({"axis": "axial", "slice_index": k, "boxes": [b.tolist()], "label": n + 1})
        return steps

    def work(n: int) -> tuple[int, np.ndarray, list[dict[str, Any]]]:
        client = client_module.SamAdaptClient(server, token=TOKEN, timeout=300)
        array, _ = blob_volume(10 + n)
        sid = client.create_session_from_array(array)
        local = np.zeros(array.shape, np.uint8)
        steps = plan(n)
        for step in steps:
            region = client.prompt(
                sid, step["axis"], step["slice_index"], box=step["boxes"][0], label=step["label"]
            )
            block = client_module.region_array(region)
            assert set(np.unique(block)) <= {0, n + 1}, f"client {n} got another label"
            client_module.apply_region(local, region)
        downloaded = _nifti_array(client.mask(sid))
        np.testing.assert_array_equal(downloaded, local)
        client.close(sid)
        return n, local, steps

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(8)))
    store = SessionStore(tiny_predictor, cache_bytes=1 << 28)
    for n, local, steps in results:
        from samadapt.domains.medical import Volume

        sid = store.create(Volume(blob_volume(10 + n)[0], np.eye(4)))
        session = store.get(sid)
        for step in steps:
            session.prompt(**step)
        np.testing.assert_array_equal(
            session.mask, local, err_msg=f"client {n} differs from its serial replay"
        )
        store.delete(sid)


def _nifti_array(data: bytes) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(data)).dataobj)


def test_region_encoding_round_trip(client_module: Any) -> None:
    block = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    region = {
        "offset": [1, 2, 3],
        "shape": [2, 3, 4],
        "label": 1,
        "encoding": "zlib+base64",
        "dtype": "uint8",
        "data": base64.b64encode(zlib.compress(block.tobytes())).decode(),
    }
    offset, shape, raw = client_module.decode_region(region)
    assert offset == (1, 2, 3) and shape == (2, 3, 4) and raw == block.tobytes()
    target = np.zeros((4, 6, 8), np.uint8)
    client_module.apply_region(target, region)
    np.testing.assert_array_equal(target[1:3, 2:5, 3:7], block)
    assert json.loads(json.dumps(client_module.encode_region((0, 0, 0), (1, 1, 1), b"\x05")))["shape"] == [
        1,
        1,
        1,
    ]


def test_a_slow_upload_does_not_block_other_clients(server: str, client: Any) -> None:
    """One client trickles a body; meanwhile another uploads, prompts and downloads."""
    import socket
    import urllib.parse

    host, port = urllib.parse.urlsplit(server).hostname, urllib.parse.urlsplit(server).port
    slow = socket.create_connection((host, port), timeout=30)
    try:
        slow.sendall(
            b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"X-Volume-Format: nifti\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
            b"Content-Length: 100000\r\n\r\n" + b"\0" * 100
        )
        start = time.monotonic()
        array, box = blob_volume(21)
        sid = client.create_session_from_array(array)
        client.prompt(sid, "axial", 3, box=box)
        client.mask(sid)
        client.close(sid)
        assert time.monotonic() - start < 60
        slow.sendall(b"\0" * 100)  # still connected and waiting
    finally:
        slow.close()
