"""Packaging: the explicit package list is complete, and the install works from outside the repo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed() -> None:
    setuptools = _config()["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    mapping: dict[str, str] = setuptools["package-dir"]
    found = set()
    for package, folder in mapping.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join([package, *rel.parts]) if rel.parts else package)
    assert found == listed, f"unlisted: {sorted(found - listed)}; stale: {sorted(listed - found)}"


def test_mapped_folders_are_regular_packages() -> None:
    for folder in _config()["tool"]["setuptools"]["package-dir"].values():
        assert (ROOT / folder / "__init__.py").is_file(), folder


def test_import_from_outside_the_repo(tmp_path: Path) -> None:
    packages = _config()["tool"]["setuptools"]["packages"]
    code = "import importlib\n" + "".join(f"importlib.import_module({p!r})\n" for p in packages)
    code += "import samadapt.adapters, samadapt.domains.medical; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_repo_folders_refuse_to_import_under_the_wrong_name(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", "import adapters"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "import samadapt.adapters" in proc.stderr


def test_every_dependency_pin_has_a_reason() -> None:
    lines = (ROOT / "pyproject.toml").read_text().splitlines()
    in_deps = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith(("dependencies = [", "[project.optional-dependencies]")):
            in_deps = True
            continue
        if in_deps and stripped.startswith("[") and not stripped.startswith('"'):
            if stripped.startswith("[tool") or stripped.startswith("[project."):
                in_deps = False
            continue
        if in_deps and stripped.startswith('"') and any(op in stripped for op in ("==", ">=", "<")):
            assert lines[i - 1].strip().startswith("#"), f"pin without a reason: {stripped}"
