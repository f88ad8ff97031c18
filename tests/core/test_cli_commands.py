"""CLI wiring: training commands forwarded to LightningCLI, --adapter, volume routing, read-only args."""

from __future__ import annotations

import argparse
import copy
import importlib.abc
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from samadapt import build
from samadapt.cli import build_parser, is_volume_path, main
from samadapt.cli.volume import segment_volume
from samadapt.domains.medical import READ_SUFFIXES, Volume, read_volume, write_volume

BACKEND = "samadapt.cli.lightning_cli"  # the module whose main(command, argv) runs LightningCLI
LIGHTNING_ARGS = [
    "--config",
    "recipes/lora/litemedsam.yaml",
    "--data.root",
    "DIR",
    "--out",
    "OUT",
    "--trainer.fast_dev_run=1",
    "--model.adapter.init_args.rank",
    "4",
    "-h",
]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(build("tiny").state_dict(), path)
    return path


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------------ training


def _fake_training(monkeypatch: pytest.MonkeyPatch, status: int = 0) -> list[tuple[str, list[str]]]:
    calls: list[tuple[str, list[str]]] = []
    module = types.ModuleType(BACKEND)

    def training_main(command: str, argv: list[str]) -> int:
        calls.append((command, argv))
        return status

    module.main = training_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, BACKEND, module)
    return calls


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict"])
def test_training_commands_forward_their_arguments_untouched(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fake_training(monkeypatch, status=3)
    assert main([command, *LIGHTNING_ARGS]) == 3
    assert calls == [(command, LIGHTNING_ARGS)]
    assert main([command]) == 3 and calls[-1] == (command, [])


def test_training_commands_are_listed_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for command in ("segment", "demo", "info", "evaluate", "fit", "validate", "test", "predict"):
        assert f"\n    {command} " in text, command
    assert "LightningCLI" in text


class _TrainingNeedingLightning(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Stands in for the LightningCLI module: a module whose import needs lightning."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> object:
        return importlib.util.spec_from_loader(fullname, self) if fullname == BACKEND else None

    def create_module(self, spec: object) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        exec("import lightning", module.__dict__)


def test_missing_lightning_gives_the_install_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delitem(sys.modules, BACKEND, raising=False)
    monkeypatch.setitem(sys.modules, "lightning", None)  # import lightning -> ModuleNotFoundError
    monkeypatch.setattr(sys, "meta_path", [_TrainingNeedingLightning(), *sys.meta_path])
    assert main(["fit", "--config", "x.yaml"]) == 1
    err = _one_line_error(capsys)
    assert err.startswith("samadapt fit: error:") and 'pip install "samadapt[train]"' in err


def test_missing_training_module_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, BACKEND, None)
    assert main(["test"]) == 1
    assert "no training module" in _one_line_error(capsys)


# -------------------------------------------------------------------------------------------- adapter


def test_adapter_flag_is_in_the_model_group() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["segment", "x.png", "--box", "1", "2", "3", "4", "-o", "m.png", "--adapter", "A"]
    )
    assert args.adapter == "A"
    assert parser.parse_args(["demo", "--adapter", "A"]).adapter == "A"


@pytest.mark.parametrize("kind", ["2d", "volume", "demo", "file"])
def test_a_missing_adapter_folder_fails_before_any_work(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import samadapt.checkpoint

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(samadapt.checkpoint, "load_model", no_model)
    adapter = tmp_path / "no-such-adapter"
    if kind == "file":
        adapter = tmp_path / "adapter.json"
        adapter.write_text("{}")
    out = tmp_path / "out"
    if kind == "demo":
        argv = ["demo", "--out", str(out)]
    else:
        source = tmp_path / ("ct.nii.gz" if kind == "volume" else "img.png")  # never read
        argv = ["segment", str(source), "--box", "1", "1", "5", "5", "--slice", "1", "-o", str(out)]
    assert main([*argv, "--adapter", str(adapter)]) == 1
    err = _one_line_error(capsys)
    assert ("not found" if kind != "file" else "must be a folder") in err and str(adapter) in err
    assert not out.exists()


def test_adapter_is_attached_before_the_predictor_and_described(
    tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wiring only (the adapter implementation has its own tests): folder, model, base sha256."""
    from samadapt.cli.common import load_predictor
    from samadapt.weights import sha256_of

    seen: dict[str, object] = {}

    class FakeAdapter:
        adapter_type = "lora"

    def load_adapter(directory: Path, model: object, *, base_sha256: str, merge: bool) -> FakeAdapter:
        seen.update(directory=directory, model=model, sha=base_sha256, merge=merge)
        return FakeAdapter()

    fake = types.ModuleType("samadapt.adapter")
    fake.load_adapter = load_adapter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "samadapt.adapter", fake)
    folder = tmp_path / "adapter"
    folder.mkdir()
    args = build_parser().parse_args(
        ["demo", "--checkpoint", str(tiny_ckpt), "--adapter", str(folder), "--precision", "fp32"]
    )
    predictor, described = load_predictor(args)
    assert seen["directory"] == folder and seen["model"] is predictor.model
    assert seen["sha"] == sha256_of(tiny_ckpt)
    assert seen["merge"] is True  # merged for inference where the adapter allows it
    assert described == f"tiny from --checkpoint at fp32 + adapter lora from {folder}"


# --------------------------------------------------------------------------------------------- volumes


def test_every_suffix_the_volume_reader_takes_goes_down_the_volume_path() -> None:
    assert {".nhdr", ".seg.nrrd", ".nii.gz", ".dcm"} <= set(READ_SUFFIXES)
    for suffix in READ_SUFFIXES:
        assert is_volume_path(f"scan{suffix.upper()}"), suffix
    assert not is_volume_path("slice.png") and not is_volume_path("slice.tif")


def _cube(tmp_path: Path, name: str) -> Path:
    array = np.zeros((24, 24, 6), np.float32)
    array[6:18, 6:18, 1:5] = 200.0
    path = tmp_path / name
    write_volume(path, array, Volume(np.zeros(array.shape), np.diag([2.0, 2.0, 3.0, 1.0])))
    return path


def test_nhdr_volume_is_segmented_as_a_volume(
    tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _cube(tmp_path, "ct.nhdr")
    out = tmp_path / "seg.nii.gz"
    argv = ["segment", str(source), "--box", "5", "5", "18", "18", "--slice", "2", "--window", "100", "400"]
    assert main([*argv, "--checkpoint", str(tiny_ckpt), "-o", str(out), "--no-progress"]) == 0, (
        capsys.readouterr()
    )
    assert read_volume(out).shape == (24, 24, 6)
    assert "object(s) from axial slice 2" in capsys.readouterr().out


def test_roi_prompt_never_writes_into_the_arguments(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    source = _cube(tmp_path, "ct.nii.gz")
    out = tmp_path / "seg.nii.gz"
    args = build_parser().parse_args(
        ["segment", str(source), "--roi", "4", "4", "1", "19", "19", "5", "--window", "100", "400",
         "--checkpoint", str(tiny_ckpt), "-o", str(out), "--no-progress"]
    )  # fmt: skip
    before = copy.deepcopy(vars(args))
    assert segment_volume(args) == 0
    assert vars(args) == before
    assert args.slice is None and args.box is None
    assert "from axial slice 3" in capsys.readouterr().out  # the ROI's middle slice: (1 + 5) // 2
    assert isinstance(args, argparse.Namespace) and out.exists()
