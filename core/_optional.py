"""Lazy imports of optional heavy dependencies with an install hint."""

from __future__ import annotations

import importlib
from types import ModuleType

from samadapt.errors import MissingDependencyError


def optional_import(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise a one-line error naming the extra that provides it.

    Args:
        module: dotted module name, e.g. ``"nibabel"``.
        extra: the samadapt extra that installs it, e.g. ``"medical"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module} is not installed; install it with: pip install 'samadapt[{extra}]'"
        ) from exc
