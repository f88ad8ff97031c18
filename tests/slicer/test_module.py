"""The scripted module SamAdapt.py and the extension's packaging, checked without 3D Slicer.

SamAdapt.py imports ``slicer``, ``qt``, ``ctk`` and ``vtk``, which exist only inside Slicer. Here they are
stand-ins (``Recorder`` modules that log every call made on them), so the test can import the module and
build its classes, and prove that nothing runs at import time or in the constructors. (The PyPI package
called ``slicer`` is unrelated; it must never be installed for this.)
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import types
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

EXTENSION = Path(__file__).resolve().parents[2] / "slicer_extension"
MODULE = EXTENSION / "SamAdapt"
SCRIPT = MODULE / "SamAdapt.py"


# ----------------------------------------------------------------------------------------- stand-ins


class _Call:
    """Any attribute of a stand-in module: attribute access is free, calling it is logged."""

    def __init__(self, path: str, log: list[str]) -> None:
        self._path, self._log = path, log

    def __getattr__(self, attr: str) -> _Call:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Call(f"{self._path}.{attr}", self._log)

    def __call__(self, *args: Any, **kwargs: Any) -> _Call:
        self._log.append(self._path)
        return _Call(f"{self._path}()", self._log)


class Recorder(types.ModuleType):
    """A stand-in for a Slicer-only module (slicer, qt, ctk, vtk)."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__(name)
        self._log = log

    def __getattr__(self, attr: str) -> _Call:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Call(f"{self.__name__}.{attr}", self._log)


def _stand_ins(log: list[str]) -> dict[str, types.ModuleType]:
    slicer = Recorder("slicer", log)
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent: Any) -> None:
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent: Any = None) -> None:
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent: Any = None) -> None:
            pass

    class ScriptedLoadableModuleTest(unittest.TestCase):
        pass

    for cls in (
        ScriptedLoadableModule,
        ScriptedLoadableModuleWidget,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
    ):
        setattr(scripted, cls.__name__, cls)
    util = Recorder("slicer.util", log)

    class VTKObservationMixin:
        def __init__(self) -> None:
            self.observations: list[Any] = []

    util.VTKObservationMixin = VTKObservationMixin  # type: ignore[attr-defined]
    slicer.ScriptedLoadableModule = scripted  # type: ignore[attr-defined]
    slicer.util = util  # type: ignore[attr-defined]
    return {
        "slicer": slicer,
        "slicer.ScriptedLoadableModule": scripted,
        "slicer.util": util,
        "qt": Recorder("qt", log),
        "ctk": Recorder("ctk", log),
        "vtk": Recorder("vtk", log),
    }


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> tuple[types.ModuleType, list[str]]:
    log: list[str] = []
    for name, module in _stand_ins(log).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.syspath_prepend(str(MODULE))
    spec = importlib.util.spec_from_file_location("SamAdapt_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, log


# ----------------------------------------------------------------------------------------- the script


def test_script_parses_and_has_the_four_classes() -> None:
    tree = ast.parse(SCRIPT.read_text(encoding="utf-8"))
    classes = {
        node.name: [ast.unparse(b) for b in node.bases]
        for node in tree.body
        if isinstance(node, ast.ClassDef)
    }
    assert classes["SamAdapt"] == ["ScriptedLoadableModule"]
    assert classes["SamAdaptWidget"][0] == "ScriptedLoadableModuleWidget"
    assert classes["SamAdaptLogic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["SamAdaptTest"] == ["ScriptedLoadableModuleTest"]


def test_no_module_level_statements_but_imports_and_definitions() -> None:
    tree = ast.parse(SCRIPT.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        if isinstance(node, ast.Assign):
            assert isinstance(node.value, (ast.Constant, ast.Tuple)), ast.unparse(node)
            continue
        assert isinstance(node, (ast.Import, ast.ImportFrom, ast.ClassDef, ast.FunctionDef)), ast.unparse(
            node
        )


def test_import_and_construction_have_no_side_effects(loaded: tuple[types.ModuleType, list[str]]) -> None:
    module, log = loaded
    assert log == [], f"calls at import time: {log}"
    parent = types.SimpleNamespace()
    module.SamAdapt(parent)
    assert parent.title == "SamAdapt" and parent.categories == ["Segmentation"]
    assert parent.contributors and parent.helpText and parent.acknowledgementText
    widget = module.SamAdaptWidget(None)
    assert widget.ui is None and widget.logic is None
    logic = module.SamAdaptLogic()
    assert logic.client is None and logic.server is None and logic.session is None
    assert log == [], f"calls in the constructors: {log}"


def test_logic_uses_the_library_against_a_fake_volume_node(
    loaded: tuple[types.ModuleType, list[str]],
) -> None:
    """Logic.promptFromMarkups with stand-in nodes: the markups become the samadapt prompt."""
    import numpy as np

    module, _ = loaded
    affine = np.diag([2.0, 2.0, 3.0, 1.0])

    class Points:
        PositionDefined = 1

        def __init__(self, ras: list[list[float]]) -> None:
            self.ras = ras

        def GetNumberOfControlPoints(self) -> int:
            return len(self.ras)

        def GetNthControlPointPositionStatus(self, n: int) -> int:
            return 1

        def GetNthControlPointPositionWorld(self, n: int, out: list[float]) -> None:
            out[:] = self.ras[n]

    logic = module.SamAdaptLogic()
    logic.ijkToRas = lambda node: affine.tolist()
    logic.worldToLocal = lambda node: None
    logic.shapeIjk = lambda node: (40, 30, 10)
    red = np.eye(4)
    red[:3, :3] = [[-1, 0, 0], [0, 1, 0], [0, 0, 1]]
    red[2, 3] = 12.0  # the Red view shows k = 4
    logic.sliceToRas = lambda view: red.tolist()
    prompt = logic.promptFromMarkups(
        None, "Red", {1: Points([[20.0, 10.0, 12.0]]), 0: Points([[22.0, 12.0, 12.0]])}
    )
    assert (prompt.axis, prompt.slice_index) == ("axial", 4)
    assert prompt.points == [(10.0, 5.0), (11.0, 6.0)] and prompt.point_labels == [1, 0]


def test_no_torch_anywhere_in_the_extension() -> None:
    for path in EXTENSION.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "torch" or n.startswith("torch.") for n in names), f"{path}: imports torch"


def test_library_imports_nothing_from_slicer() -> None:
    for path in (MODULE / "SamAdaptLib").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    assert name.split(".")[0] not in {"slicer", "qt", "ctk", "vtk", "torch"}, (
                        f"{path}: {name}"
                    )


def test_sources_are_ascii() -> None:
    """The Slicer extension index CI rejects non-ASCII characters in .py files."""
    for path in EXTENSION.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        bad = [(n + 1, line) for n, line in enumerate(text.splitlines()) if not line.isascii()]
        assert not bad, f"{path}: non-ASCII on lines {[n for n, _ in bad]}"


# ----------------------------------------------------------------------------------------- packaging


def test_cmake_lists_every_python_file_and_resource() -> None:
    cmake = (MODULE / "CMakeLists.txt").read_text()
    for path in MODULE.rglob("*.py"):
        rel = path.relative_to(MODULE).as_posix().replace("SamAdapt", "${MODULE_NAME}", 1)
        assert rel in cmake, f"{rel} missing from MODULE_PYTHON_SCRIPTS (it would not be packaged)"
    assert "Resources/UI/${MODULE_NAME}.ui" in cmake and "Resources/Icons/${MODULE_NAME}.png" in cmake
    assert "slicerMacroBuildScriptedModule" in cmake and "slicer_add_python_unittest" in cmake
    assert (MODULE / "Testing" / "Python" / "CMakeLists.txt").exists()


def test_extension_metadata() -> None:
    cmake = (EXTENSION / "CMakeLists.txt").read_text()
    assert re.search(r"^project\(SamAdapt\)", cmake, re.M)
    for key in (
        "HOMEPAGE",
        "CATEGORY",
        "CONTRIBUTORS",
        "DESCRIPTION",
        "ICONURL",
        "SCREENSHOTURLS",
        "DEPENDS",
    ):
        assert re.search(rf'set\(EXTENSION_{key} "[^"]+"\)', cmake), key
    assert 'set(EXTENSION_DEPENDS "NA")' in cmake
    for line in (
        "find_package(Slicer REQUIRED)",
        "add_subdirectory(SamAdapt)",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ):
        assert line in cmake


def test_icons_are_128_pngs() -> None:
    from PIL import Image

    for path in (EXTENSION / "SamAdapt.png", MODULE / "Resources" / "Icons" / "SamAdapt.png"):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (128, 128)


def test_ui_is_well_formed_and_has_every_widget_the_code_uses() -> None:
    root = ET.parse(MODULE / "Resources" / "UI" / "SamAdapt.ui").getroot()
    names = {w.get("name") for w in root.iter("widget")}
    used = set(re.findall(r"\bui\.(\w+)", SCRIPT.read_text(encoding="utf-8")))
    assert used and used <= names, f"missing from the .ui: {sorted(used - names)}"
    for required in (
        "localRadioButton",
        "remoteRadioButton",
        "serverUrlLineEdit",
        "tokenLineEdit",
        "startServerButton",
        "stopServerButton",
        "installButton",
        "inputVolumeSelector",
        "segmentSelector",
        "placePointsButton",
        "placeBoxButton",
        "foregroundRadioButton",
        "backgroundRadioButton",
        "propagateUpButton",
        "propagateDownButton",
        "propagateBothButton",
        "undoButton",
        "redoButton",
        "statusLabel",
        "progressBar",
    ):
        assert required in names
    classes = {w.get("class") for w in root.iter("widget")}
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    assert {c for c in classes if c.startswith(("q", "ctk"))} <= declared
