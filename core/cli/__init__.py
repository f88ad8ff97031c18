"""``samadapt`` command line: segment, demo, info, evaluate, and the training commands.

One module per command family; each imports only :mod:`samadapt.cli.common` from this package, and
this module assembles them, so the imports form a tree without cycles. ``fit``, ``validate``,
``test`` and ``predict`` go to LightningCLI (:mod:`samadapt.cli.train`) before argparse parses.

Every error a user can cause ends in one line on stderr and a non-zero exit; outputs are written
to a temporary file and renamed, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from samadapt.cli import demo, evaluate, geo, info, segment, serve, train, volumetric
from samadapt.cli.common import Parser, is_volume_path, load_predictor
from samadapt.cli.train import TRAINING_COMMANDS
from samadapt.errors import SamadaptError

__all__ = ["TRAINING_COMMANDS", "build_parser", "is_volume_path", "load_predictor", "main"]

_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "segment": segment.run,
    "demo": demo.run,
    "info": info.run,
    "evaluate": evaluate.run,
    "serve": serve.run,
    "geo": geo.run,
}

_EPILOG = """\
fit, validate, test and predict take LightningCLI's arguments, e.g.
  samadapt fit --config recipes/lora/litemedsam.yaml --data.root DIR --out DIR
(samadapt fit --help lists them; they need pip install "samadapt[train]")"""


def build_parser() -> argparse.ArgumentParser:
    """The parser of every argparse command (the training commands are listed, not parsed)."""
    parser = Parser(
        prog="samadapt",
        description="Segment Anything for medical images and remote sensing.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    segment.register(sub)
    demo.register(sub)
    info.register(sub)
    evaluate.register(sub)
    serve.register(sub)
    geo.register(sub)
    train.register(sub)
    return parser


def _guarded(command: str, run: Callable[[], int]) -> int:
    try:
        return run()
    except SamadaptError as exc:
        print(f"samadapt {command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("samadapt: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``samadapt`` command."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in TRAINING_COMMANDS:
        command, rest = arguments[0], arguments[1:]
        return _guarded(command, lambda: train.run(command, rest))
    if arguments and arguments[0] == "segment" and volumetric.wants(arguments[1:]):
        # a volumetric adapter takes 3D clicks (--point I J K), which the 2D parser cannot
        return _guarded("segment", lambda: volumetric.main(arguments[1:]))
    args = build_parser().parse_args(arguments)
    return _guarded(args.command, lambda: _HANDLERS[args.command](args))


def _entry() -> None:
    """Console-script wrapper: exit with main()'s status."""
    raise SystemExit(main())
