"""Memory and time of one training step of the volumetric (3DSAM) adapter at the design size.

Forward + backward on one (1, 1, S, S, S) patch (S = 128 by default: 32^3 tokens at scale 4) with
ViT-B dimensions (random weights: memory and time do not depend on the values), with and without
activation checkpointing. Each case runs in its own subprocess so that its peak RSS is its own.

Run (slow on a CPU: minutes per case; nice it on shared machines)::

    nice python benchmarks/volumetric_memory.py                       # both cases, CPU
    nice python benchmarks/volumetric_memory.py --cases on --size 96  # one case, smaller patch
    nice python benchmarks/volumetric_memory.py --size 64 --scale 2 --grid-depth 8 --window 4  # small.yaml
    python benchmarks/volumetric_memory.py --device cuda --json out.json

Reports per case: peak RSS (GB; the process high-water mark, the model included), the RSS of the
built model before the step, forward and backward seconds, and on CUDA the peak allocated memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_gb() -> float:
    """Current resident set size in GB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 1e9


def run_case(
    variant: str,
    size: int,
    checkpointing: bool,
    device: str,
    threads: int | None,
    max_gb: float | None,
    adapter_args: dict | None = None,
) -> dict:
    """One training step in this process; returns the measurements.

    ``max_gb`` caps the address space (RLIMIT_AS) so that a case too big for a shared machine fails
    with an allocation error instead of pushing the machine into swap or the OOM killer.
    """
    if max_gb:
        limit = int(max_gb * 1e9)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    import samadapt
    from samadapt.adapters.volumetric import VolumetricAdapter

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = samadapt.build(variant)
    adapter = VolumetricAdapter(**(adapter_args or {}))
    adapter.attach(model)
    adapter.freeze_base(model)
    model.to(device).train()
    model.image_encoder.activation_checkpointing = checkpointing  # type: ignore[union-attr]
    counts = adapter.parameter_counts(model)
    volume = torch.randn(1, 1, size, size, size, device=device)
    mask = torch.zeros_like(volume)
    mask[..., size // 4 : size // 2, size // 4 : size // 2, size // 3 : size // 2] = 1
    prompts = adapter.simulate_prompts(mask, torch.Generator().manual_seed(0))
    model_rss = _rss_gb()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    logits, iou = model.forward_batch(volume, prompts)
    loss = adapter.loss(logits, iou, mask)["loss"]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    forward_s = time.perf_counter() - start
    start = time.perf_counter()
    loss.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    backward_s = time.perf_counter() - start
    result = {
        "variant": variant,
        "size": size,
        "activation_checkpointing": checkpointing,
        "device": device,
        "threads": torch.get_num_threads(),
        "trainable": counts["trainable"],
        "frozen": counts["frozen"],
        "model_rss_gb": round(model_rss, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "forward_s": round(forward_s, 1),
        "backward_s": round(backward_s, 1),
        "scale": adapter.scale,
        "loss": float(loss),
    }
    if device.startswith("cuda"):
        result["cuda_peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="sam_vit_b")
    parser.add_argument("--size", type=int, default=128, help="patch side in voxels (128)")
    parser.add_argument("--cases", choices=["on", "off", "both"], default="both", help="checkpointing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scale", type=float, default=4.0, help="adapter scale (4; small recipe: 2)")
    parser.add_argument("--grid-depth", type=int, default=32, help="adapter grid_depth (32; small: 8)")
    parser.add_argument("--window", type=int, default=8, help="adapter window (8; small: 4)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    parser.add_argument(
        "--max-gb", type=float, default=None, help="address-space cap per case (protects shared machines)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", choices=["on", "off"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        try:
            shape = {"scale": args.scale, "grid_depth": args.grid_depth, "window": args.window}
            result = run_case(
                args.variant, args.size, args.child == "on", args.device, args.threads, args.max_gb, shape
            )
        except (MemoryError, RuntimeError) as exc:
            if "alloc" not in str(exc).lower() and not isinstance(exc, MemoryError):
                raise
            print(
                f"out of memory under the {args.max_gb} GB cap: {str(exc).splitlines()[0][:200]}",
                file=sys.stderr,
            )
            return 3
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    results = []
    for case in ["on", "off"] if args.cases == "both" else [args.cases]:
        command = [
            sys.executable,
            __file__,
            "--child",
            case,
            "--variant",
            args.variant,
            "--size",
            str(args.size),
        ]
        command += ["--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
        command += ["--max-gb", str(args.max_gb)] if args.max_gb else []
        command += [
            "--scale",
            str(args.scale),
            "--grid-depth",
            str(args.grid_depth),
            "--window",
            str(args.window),
        ]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
        except subprocess.TimeoutExpired:
            results.append({"activation_checkpointing": case == "on", "error": f"timeout {args.timeout}s"})
            continue
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            # -9 is the kernel's OOM killer: report it as what it is
            reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else tail[0]
            results.append({"activation_checkpointing": case == "on", "error": reason})
            continue
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    for r in results:
        label = "checkpointing on " if r["activation_checkpointing"] else "checkpointing off"
        if "error" in r:
            print(f"{label}: {r['error']}")
            continue
        extra = f", CUDA peak {r['cuda_peak_allocated_gb']} GB" if "cuda_peak_allocated_gb" in r else ""
        print(
            f"{label}: {r['variant']} {r['size']}^3 on {r['device']} ({r['threads']} threads): peak RSS "
            f"{r['peak_rss_gb']} GB (model {r['model_rss_gb']} GB), forward {r['forward_s']} s, "
            f"backward {r['backward_s']} s{extra}; trainable {r['trainable']:,}, frozen {r['frozen']:,}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
