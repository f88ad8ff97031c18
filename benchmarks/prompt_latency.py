"""Prompt latency over HTTP: a box on a slice whose embedding is cached, through ``samadapt serve``.

Starts the real server (``samadapt serve`` in its own process, loopback, a random port, the real
LiteMedSAM weights from ``verified_default_checkpoint()``, CPU), uploads
tests/data/totalsegmentator/example_ct_sm.nii.gz with the torch-free client the Slicer extension uses
(slicer_extension/SamAdapt/SamAdaptLib/client.py), sends a first box on axial slice 24 (this computes and
caches the slice's embedding; its time is reported apart), then times ``--prompts`` box prompts on that
slice: each is a full request (JSON in, the changed region out, zlib+base64) measured at the client.
The box alternates between the liver's box on that slice (from example_seg.nii.gz, label 5) and the
same box 2 voxels larger, so every answer carries a real changed region.

Next to it: the in-process decoder time, ``Predictor.predict(boxes=...)`` on a cached embedding of the
same slice with the same boxes (the part of a request that is model work), and, when the ``monailabel``
client is installed, the same boxes through the MONAI Label facade (``POST /infer/<model>`` with a
``roi``; each answer is the whole label volume as .nrrd, as MONAI Label clients expect).

Target: HTTP median < 100 ms on this CPU.

    .venv/bin/python benchmarks/prompt_latency.py [--prompts 50] [--precision auto] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from samadapt import Predictor, load_model
from samadapt.domains.medical import apply_intensity, guess_preset, read_volume
from samadapt.domains.medical.propagation import slice_image
from samadapt.precision import cpu_model
from samadapt.weights import verified_default_checkpoint

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "totalsegmentator"
CT = DATA / "example_ct_sm.nii.gz"
SEG = DATA / "example_seg.nii.gz"
CLIENT_PY = REPO / "slicer_extension" / "SamAdapt" / "SamAdaptLib" / "client.py"
AXIS, SLICE, LIVER = "axial", 24, 5
TARGET_MS = 100.0


def load_client() -> ModuleType:
    """The torch-free client, imported from its file as the Slicer extension ships it."""
    spec = importlib.util.spec_from_file_location("samadapt_slicer_client", CLIENT_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def liver_boxes() -> list[list[float]]:
    """The liver's (x0, y0, x1, y1) on the axial slice (X = i, Y = j), and the same box grown by 2."""
    seg = read_volume(SEG).array[:, :, SLICE] == LIVER
    i, j = np.nonzero(seg)
    box = [float(i.min()), float(j.min()), float(i.max()), float(j.max())]
    grown = [max(box[0] - 2, 0.0), max(box[1] - 2, 0.0), box[2] + 2, box[3] + 2]
    return [box, grown]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def serve(checkpoint: Path, precision: str, log: Path) -> Iterator[str]:
    """``samadapt serve`` on a free loopback port in its own process; yields its URL."""
    port = free_port()
    command = [
        sys.executable, "-m", "samadapt.cli", "serve", "--port", str(port), "--device", "cpu",
        "--checkpoint", str(checkpoint), "--precision", precision,
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"samadapt serve exited ({process.returncode}):\n{log.read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("samadapt serve did not answer /healthz within 180 s")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def timed(fn: Callable[[int], Any], count: int, warmup: int) -> list[float]:
    """Milliseconds of ``count`` calls ``fn(n)`` after ``warmup`` untimed ones."""
    for n in range(warmup):
        fn(n)
    times = []
    for n in range(count):
        start = time.perf_counter()
        fn(n)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {
        "median_ms": float(statistics.median(times)),
        "p95_ms": float(np.percentile(np.asarray(times), 95)),
        "min_ms": float(min(times)),
        "n": len(times),
    }


def in_process(checkpoint: Path, precision: str) -> tuple[Callable[[list[float]], Any], str]:
    """A predictor with the slice's embedding cached; returns ``predict(box)`` and the precision used."""
    predictor = Predictor(load_model(checkpoint), device="cpu", precision=precision)
    volume = read_volume(CT)
    image = apply_intensity(volume.array, preset=guess_preset(volume))
    embedding = predictor.set_image(slice_image(image, AXIS, SLICE))

    def predict(box: list[float]) -> Any:
        return predictor.predict(boxes=box, embedding=embedding)

    return predict, str(predictor.precision)


def prompts_and_decoder(
    url: str, predict: Callable[[list[float]], Any], boxes: list[list[float]], prompts: int, warmup: int
) -> dict[str, Any]:
    """HTTP prompts interleaved with in-process decodes of the same box, so both see the same CPU load
    (the machine may be shared). The in-process call runs in a worker thread, as the server runs its
    model work (FastAPI's thread pool)."""
    client = load_client().SamAdaptClient(url, timeout=120)
    start = time.perf_counter()
    session = client.create_session(str(CT))
    upload_ms = (time.perf_counter() - start) * 1000.0
    start = time.perf_counter()
    first = client.prompt(session, AXIS, SLICE, box=boxes[0])
    first_ms = (time.perf_counter() - start) * 1000.0
    if not first.get("shape") or min(first["shape"]) == 0:
        raise RuntimeError("the first prompt changed nothing; the benchmark box is wrong")
    http_ms: list[float] = []
    local_ms: list[float] = []
    sizes: list[int] = []
    with ThreadPoolExecutor(1) as worker:
        for n in range(warmup + prompts):
            box = boxes[n % 2]
            start = time.perf_counter()
            region = client.prompt(session, AXIS, SLICE, box=box)
            middle = time.perf_counter()
            worker.submit(predict, box).result()
            end = time.perf_counter()
            if n >= warmup:
                http_ms.append((middle - start) * 1000.0)
                local_ms.append((end - middle) * 1000.0)
                sizes.append(len(region.get("data", "")))
    server_precision = client.capabilities()["model"]["precision"]
    client.close(session)
    return {
        "server_precision": server_precision,
        "upload_ms": upload_ms,
        "first_prompt_ms": first_ms,
        "prompts": summary(http_ms),
        "decoder": summary(local_ms),
        "mean_region_b64_bytes": float(np.mean(sizes)),
    }


def over_monailabel(url: str, boxes: list[list[float]], count: int) -> dict[str, Any] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the client imports cgi
            from monailabel.client import MONAILabelClient
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        client = MONAILabelClient(url, tmpdir=tmp)
        models = client.info()["models"]
        model = next(name for name, info in models.items() if info["dimension"] == 2)
        session = client.create_session(str(CT))["session_id"]

        def infer(n: int) -> None:
            x0, y0, x1, y1 = boxes[n % 2]
            params = {"roi": [x0, x1, y0, y1, SLICE, SLICE], "label": "liver"}
            result, _ = client.infer(model, "example_ct_sm", params, session_id=session)
            os.unlink(result)

        times = timed(infer, count, 2)  # the first warm-up request embeds the slice
        client.remove_session(session)
    return summary(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=50, help="timed prompts after the embedding is cached")
    parser.add_argument("--warmup", type=int, default=3, help="untimed prompts first")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--monailabel", type=int, default=20, help="facade requests to time (0: skip)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    checkpoint = verified_default_checkpoint()
    boxes = liver_boxes()
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {os.cpu_count()} logical CPUs")
    print(f"volume {CT.name}, {AXIS} slice {SLICE}, boxes {boxes}")
    predict, precision = in_process(checkpoint, args.precision)
    with (
        tempfile.TemporaryDirectory() as tmp,
        serve(checkpoint, args.precision, Path(tmp) / "serve.log") as url,
    ):
        http = prompts_and_decoder(url, predict, boxes, args.prompts, args.warmup)
        facade = over_monailabel(url, boxes, args.monailabel) if args.monailabel else None

    p, d = http["prompts"], http["decoder"]
    verdict = "meets" if p["median_ms"] < TARGET_MS else "MISSES"
    print(
        f"upload {http['upload_ms']:.0f} ms; first prompt (embeds the slice) {http['first_prompt_ms']:.0f} ms"
    )
    print(
        f"HTTP box prompt, embedding cached: median {p['median_ms']:.1f} ms, p95 {p['p95_ms']:.1f} ms "
        f"({p['n']} prompts; {verdict} the {TARGET_MS:.0f} ms target; server precision "
        f"{http['server_precision']})"
    )
    print(
        f"in-process Predictor.predict, same boxes: median {d['median_ms']:.1f} ms, p95 {d['p95_ms']:.1f} ms "
        f"(precision {precision})"
    )
    print(f"HTTP overhead (median difference): {p['median_ms'] - d['median_ms']:.1f} ms")
    if facade is not None:
        print(
            f"MONAI Label facade /infer (whole label volume as .nrrd): median {facade['median_ms']:.1f} ms, "
            f"p95 {facade['p95_ms']:.1f} ms ({facade['n']} requests)"
        )
    if args.json:
        result = {
            "cpu": cpu_model(),
            "torch": torch.__version__,
            "logical_cpus": os.cpu_count(),
            "volume": CT.name,
            "axis": AXIS,
            "slice": SLICE,
            "boxes": boxes,
            "http": http,
            "precision": precision,
            "monailabel_facade": facade,
            "target_median_ms": TARGET_MS,
        }
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
