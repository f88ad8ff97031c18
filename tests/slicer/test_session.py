"""SamAdaptLib.session.InteractiveSession driving FakeClient (a stand-in for the server, which cannot
run inside Slicer here): calls made, regions written into the mirror and into per-segment writers,
propagate, server-side and local undo/redo, seeding."""

from __future__ import annotations

import numpy as np
import pytest
from SamAdaptLib.geometry import Prompt
from SamAdaptLib.session import InteractiveSession, volume_geometry
from slicer_fakes import FakeClient


class Segments:
    """Records writer calls and keeps one binary [k, j, i] array per label (what Slicer's segments hold)."""

    def __init__(self, shape_kji: tuple[int, int, int]) -> None:
        self.shape = shape_kji
        self.arrays: dict[int, np.ndarray] = {}
        self.calls: list[tuple[int, tuple[int, ...]]] = []

    def __call__(self, label: int, extent: tuple[int, ...], binary: np.ndarray) -> None:
        i0, i1, j0, j1, k0, k1 = extent
        assert binary.shape == (k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1)
        array = self.arrays.setdefault(label, np.zeros(self.shape, np.uint8))
        array[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1] = binary
        self.calls.append((label, extent))


def _open(client: FakeClient, server_undo: bool = True) -> tuple[InteractiveSession, Segments]:
    volume = np.zeros((8, 20, 30), np.int16)  # Slicer order [k, j, i]: 30 columns, 20 rows, 8 slices
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    segments = Segments(volume.shape)
    session = InteractiveSession.from_array(client, volume, affine, writer=segments, server_undo=server_undo)
    return session, segments


def test_upload_sends_the_slicer_array_with_ras_geometry(fake_client: FakeClient) -> None:
    session, _ = _open(fake_client)
    name, kwargs = fake_client.calls[0]
    assert name == "create_session_from_array"
    assert kwargs["shape"] == (8, 20, 30) and kwargs["order"] == "kji" and kwargs["frame"] == "RAS"
    assert kwargs["spacing"] == [0.5, 0.5, 2.0] and kwargs["origin"] == [10.0, -20.0, 30.0]
    assert kwargs["direction"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert session.session_id == "fake-session-0001" and session.shape_ijk == (30, 20, 8)
    assert fake_client.mask is not None and fake_client.mask.shape == (30, 20, 8)


def test_volume_geometry_of_a_flipped_affine() -> None:
    affine = np.array([[-2.0, 0, 0, 5], [0, -2.0, 0, 6], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    spacing, origin, direction = volume_geometry(affine)
    assert spacing == [2.0, 2.0, 3.0] and origin == [5.0, 6.0, 7.0]
    assert direction == [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0]


def test_prompt_writes_the_changed_box_into_its_segment(fake_client: FakeClient) -> None:
    session, segments = _open(fake_client)
    liver, spleen = session.label_for("Segment_1"), session.label_for("Segment_2")
    assert (liver, spleen) == (1, 2) and session.label_for("Segment_1") == 1
    assert session.segment_for(2) == "Segment_2" and session.segment_for(9) is None
    change = session.prompt(Prompt("axial", 3, box=(4, 5, 10, 8)), label=liver)
    name, kwargs = fake_client.calls[-1]
    assert name == "prompt" and kwargs["axis"] == "axial" and kwargs["slice_index"] == 3
    assert kwargs["box"] == [4.0, 5.0, 10.0, 8.0] and kwargs["label"] == 1 and kwargs["points"] is None
    assert change.extent == (4, 10, 5, 8, 3, 3) and change.labels == [1] and change.voxels == 7 * 4
    expected = np.zeros((8, 20, 30), np.uint8)
    expected[3, 5:9, 4:11] = 1  # [k, j, i]
    np.testing.assert_array_equal(segments.arrays[1], expected)
    np.testing.assert_array_equal(session.labels, expected)
    np.testing.assert_array_equal(session.labels.transpose(2, 1, 0), fake_client.mask)
    # a second object: only its own segment is written
    session.prompt(Prompt("coronal", 12, box=(20, 0, 25, 6)), label=spleen)
    assert segments.calls[-1][0] == 2 and set(segments.arrays) == {1, 2}
    assert segments.arrays[2][0:7, 12, 20:26].all() and segments.arrays[2].sum() == 6 * 7
    np.testing.assert_array_equal(session.labels.transpose(2, 1, 0), fake_client.mask)


def test_points_are_sent_with_labels(fake_client: FakeClient) -> None:
    session, _ = _open(fake_client)
    session.prompt(Prompt("sagittal", 7, points=[(3.0, 2.0), (4.0, 5.0)], point_labels=[1, 0]))
    kwargs = fake_client.calls[-1][1]
    assert kwargs["axis"] == "sagittal" and kwargs["points"] == [[3.0, 2.0], [4.0, 5.0]]
    assert kwargs["point_labels"] == [1, 0]
    assert session.labels[2, 3, 7] == 1  # sagittal slice i=7, X=j=3, Y=k=2


def test_propagate_undo_redo_through_the_server(fake_client: FakeClient) -> None:
    session, segments = _open(fake_client)
    session.prompt(Prompt("axial", 3, box=(4, 5, 10, 8)), label=1)
    one_slice = session.labels.copy()
    change = session.propagate("up", label=1)
    assert fake_client.calls[-1] == (
        "propagate",
        {"session_id": session.session_id, "direction": "up", "label": 1},
    )
    assert change.extent == (4, 10, 5, 8, 4, 7)
    assert session.labels[4:, 5:9, 4:11].all() and not session.labels[:3].any()
    propagated = session.labels.copy()
    undone = session.undo()
    assert fake_client.calls[-1][0] == "undo" and undone.voxels == 4 * 28
    np.testing.assert_array_equal(session.labels, one_slice)
    np.testing.assert_array_equal(segments.arrays[1], one_slice)
    session.redo()
    np.testing.assert_array_equal(segments.arrays[1], propagated)
    session.undo()
    session.undo()
    assert not segments.arrays[1].any()
    assert session.undo().empty  # nothing left
    with pytest.raises(ValueError):
        session.propagate("sideways")


def test_local_history_when_the_server_has_no_undo(fake_client: FakeClient) -> None:
    session, segments = _open(fake_client, server_undo=False)
    session.prompt(Prompt("axial", 3, box=(4, 5, 10, 8)), label=1)
    session.propagate("down", label=1)
    calls = len(fake_client.calls)
    session.undo()
    assert len(fake_client.calls) == calls  # no server call
    assert session.labels[3].any() and not session.labels[:3].any()
    np.testing.assert_array_equal(segments.arrays[1], session.labels)
    session.undo()
    assert not segments.arrays[1].any()
    session.redo()
    session.redo()
    assert segments.arrays[1][0:4, 5:9, 4:11].all()


def test_seed_sends_ijk_and_applies(fake_client: FakeClient) -> None:
    session, segments = _open(fake_client)
    seed = np.zeros((8, 20, 30), np.uint8)
    seed[2:4, 1:3, 5:9] = 1
    seed[6, 10, 20] = 2
    change = session.seed(seed)
    assert fake_client.calls[-1] == ("seed", {"session_id": session.session_id, "shape": (30, 20, 8)})
    np.testing.assert_array_equal(fake_client.mask, seed.transpose(2, 1, 0))
    assert change.labels == [1, 2]
    np.testing.assert_array_equal(segments.arrays[1], seed == 1)
    np.testing.assert_array_equal(segments.arrays[2], seed == 2)
    with pytest.raises(ValueError, match="shape"):
        session.seed(np.zeros((3, 3, 3), np.uint8))


def test_close_is_best_effort(fake_client: FakeClient) -> None:
    session, _ = _open(fake_client)
    session.close()
    assert fake_client.calls[-1][0] == "close"

    class Broken(FakeClient):
        def close(self, session_id: str) -> None:
            raise ConnectionError("gone")

    InteractiveSession(Broken(), "x" * 10, (2, 2, 2)).close()
