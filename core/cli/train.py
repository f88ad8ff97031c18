"""``samadapt fit|validate|test|predict``: forwarded untouched to LightningCLI (:mod:`.lightning_cli`).

LightningCLI parses these commands' arguments (``--config``, ``--data.root``, ``--trainer.*``), so
:func:`samadapt.cli.main` hands them over before argparse sees them; the parsers added here only list
the commands in ``samadapt --help``.
"""

from __future__ import annotations

from typing import Any

from samadapt.errors import MissingDependencyError, SamadaptError

TRAINING_COMMANDS = {
    "fit": "train an adapter from a recipe (samadapt fit --config recipes/... [--data.root DIR ...])",
    "validate": "run the validation loop of a recipe on a trained adapter",
    "test": "run the test loop of a recipe and report its metrics",
    "predict": "run a trained adapter over a data set and write its predictions",
}

# Top-level modules of the ``train`` extra: a missing one gets the install hint instead of a traceback.
_TRAIN_PACKAGES = frozenset(
    {
        "lightning",
        "lightning_fabric",
        "pytorch_lightning",
        "lightning_utilities",
        "jsonargparse",
        "peft",
        "monai",
        "torchmetrics",
        "tensorboard",
    }
)
INSTALL_HINT = 'pip install "samadapt[train]"'


def register(sub: Any) -> None:
    """List the training commands in ``samadapt --help`` (their arguments are LightningCLI's)."""
    for name, text in TRAINING_COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)


def run(command: str, argv: list[str]) -> int:
    """``samadapt.cli.lightning_cli.main(command, argv)``, imported only now (it pulls in Lightning).

    Raises:
        MissingDependencyError: a package of the ``train`` extra is not installed.
        SamadaptError: this installation has no training module.
    """
    try:
        from samadapt.cli.lightning_cli import main as training_main
    except ImportError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing in _TRAIN_PACKAGES:
            raise MissingDependencyError(
                f"training needs {missing}, which is not installed; install it with: {INSTALL_HINT}"
            ) from None
        if isinstance(exc, ModuleNotFoundError) and exc.name in (
            "samadapt.training",
            "samadapt.cli.lightning_cli",
        ):
            raise SamadaptError(
                f"this samadapt installation has no training module; {INSTALL_HINT}"
            ) from None
        raise
    return int(training_main(command, list(argv)))
