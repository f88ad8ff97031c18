"""Prompt latency: one box on a cached embedding, through ``Predictor.predict``, up to the full-size mask.

The real LiteMedSAM weights (``verified_default_checkpoint()``), the bundled 512 x 512 CT slice
(core/assets/demo_ct.png) embedded once, then ``predict(boxes=...)`` timed ``--repeats`` times after
``--warmup`` untimed calls: prompt encoding, the two-way transformer, the mask head, the upsampling of
the 256 x 256 logits to 512 x 512 and the threshold, all in-process. Reports the median and p95 in
milliseconds, with where the time goes: a median per call for each step of the decoder (its methods
timed by wrapping, ``--stages N`` calls), the same call on the tiny core (random weights, next to no
arithmetic: what each call pays in Python, dispatch and threading), every tensor operation of a call
timed where it runs (``--ops N``), and ``--profile`` prints torch.profiler's table (the profiler itself
inflates small operations several times). Two experiments, not product paths, time the same decode
run other ways: replayed as an FX graph and as a TorchScript trace (``--trace-experiment N``), and
under ``torch.compile`` (``--compile-experiment N``, run last).

From the second prompt on an embedding the decoder runs its transformer factored (see
``samadapt.modeling.factored``): the image side's products with the weights are kept for the last
embedding, and each prompt pays only for its low-rank part. The first prompt on a new embedding runs
the plain path; its latency is reported too, and with ``--boxes N`` (default 16) both paths decode N
boxes at once, in the same run, as a ratio.

    .venv/bin/python benchmarks/decoder_speed.py [--repeats 200] [--threads 2] [--boxes 16] [--stages 100]
        [--ops 30] [--trace-experiment 150] [--compile-experiment 100] [--profile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from samadapt import ImageEmbedding, Predictor, load_model
from samadapt.domains.images import read_image
from samadapt.modeling import PromptBatch
from samadapt.precision import cpu_model
from samadapt.preprocess import postprocess_logits
from samadapt.weights import verified_default_checkpoint

TARGET_MS = 20.0
BOX = np.array([97, 188, 269, 355])  # the liver of demo_ct.png


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def time_calls(fn, repeats: int, warmup: int) -> list[float]:
    """Milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def batched_comparison(predictor: Predictor, embedding: ImageEmbedding, count: int, multimask: bool) -> dict:
    """``count`` boxes decoded at once: factored (a prompted embedding) vs plain (a new one), interleaved.

    Medians of 8 calls each (24 for a single box), in milliseconds.
    """
    rng = np.random.default_rng(0)
    corners = rng.integers(20, 260, size=(count, 2))
    boxes = np.concatenate([corners, corners + rng.integers(40, 240, size=(count, 2))], axis=1).clip(0, 511)
    predictor.predict(boxes=boxes, multimask_output=multimask)  # the factored path's products exist
    factored, plain = [], []
    for _ in range(24 if count == 1 else 8):
        start = time.perf_counter()
        predictor.predict(boxes=boxes, multimask_output=multimask)
        factored.append((time.perf_counter() - start) * 1000.0)
        other = ImageEmbedding(embedding.embedding.clone(), embedding.original_size, embedding.resized_size)
        start = time.perf_counter()
        predictor.predict(boxes=boxes, multimask_output=multimask, embedding=other)
        plain.append((time.perf_counter() - start) * 1000.0)
        for _ in range(2):  # back to the prompted embedding: its first prompt, then its products
            predictor.predict(boxes=boxes[:1], multimask_output=multimask)
    return {"boxes": count, "factored_ms": statistics.median(factored), "plain_ms": statistics.median(plain)}


def stage_breakdown(predictor: Predictor, calls: int) -> dict[str, float]:
    """Median milliseconds per ``predict`` spent in each step, by wrapping the decoder's methods.

    Each wrapper adds a few microseconds; the steps' sum is not the whole (token-side layers, the
    hypernetwork and IoU heads, argument checks are not wrapped).
    """
    import samadapt.predictor as predictor_module
    from samadapt.modeling import factored, mask_decoder, sam, transformer

    steps = (  # (label, owner, method), in print order
        ("prompt encoder", sam.SamModel, "embed_prompts"),
        ("image-factor cache check", mask_decoder.MaskDecoder, "_image_factors"),
        ("two-way blocks (factored)", transformer.TwoWayAttentionBlock, "forward_factored"),
        ("token->image attentions (3: 2 in the blocks, the final)", transformer.Attention, "attend_factored"),
        ("image->token attentions (2, in the blocks)", transformer.Attention, "update_factored"),
        ("image LayerNorms (2, in the blocks)", factored.FactoredRows, "layer_norm"),
        ("first transposed conv (materialised)", factored.FactoredRows, "linear"),
        ("LayerNorm, GELU, second transposed conv, mask head", mask_decoder.MaskDecoder, "_upscale_rest"),
        ("mask decoder in all", mask_decoder.MaskDecoder, "forward"),
        ("resize to 512x512", predictor_module, "postprocess_logits"),
        ("Predictor.predict in all", Predictor, "predict"),
    )
    current: dict[str, float] = {}

    def timed(label: str, method):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                current[label] = current.get(label, 0.0) + (time.perf_counter() - start) * 1000.0

        return wrapper

    originals = [(owner, name, getattr(owner, name)) for _, owner, name in steps]
    for (label, owner, name), (_, _, method) in zip(steps, originals, strict=True):
        setattr(owner, name, timed(label, method))
    totals: dict[str, list[float]] = {label: [] for label, _, _ in steps}
    try:
        for _ in range(calls):
            current.clear()
            predictor.predict(boxes=BOX)
            for label, values in totals.items():
                values.append(current.get(label, 0.0))
    finally:
        for owner, name, method in originals:
            setattr(owner, name, method)
    return {label: statistics.median(values) for label, values in totals.items()}


def operation_times(predictor: Predictor, calls: int, top: int = 25) -> dict:
    """Every tensor operation of one ``predict``, timed where it runs (median over ``calls`` calls).

    A ``TorchDispatchMode`` times each aten/oneDNN call between its entry and its return, so an
    operation's figure includes its dispatch and its threads' start, but not the Python between
    operations (the mode's own Python makes the whole call slower; the operations' sum is comparable
    to a plain call's time). Returns the count, the sum, the sum and count of small (< 30 us), medium
    (30-200 us) and large operations, and the ``top`` largest with their input shapes.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Timed(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[tuple[str, tuple, float]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            start = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            elapsed = (time.perf_counter() - start) * 1000.0
            shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
            self.rows.append((str(func), shapes, elapsed))
            return out

    per_position: dict[tuple, list[float]] = {}
    for call in range(calls + 3):  # the first 3 untimed
        mode = Timed()
        with mode:
            predictor.predict(boxes=BOX)
        if call >= 3:
            for position, (name, shapes, ms) in enumerate(mode.rows):
                per_position.setdefault((position, name, shapes), []).append(ms)
    medians = {key: statistics.median(values) for key, values in per_position.items()}
    groups = {"small (< 30 us)": (0.0, 0.03), "medium (30-200 us)": (0.03, 0.2), "large": (0.2, 1e9)}
    summary = {
        label: {
            "count": sum(lo <= ms < hi for ms in medians.values()),
            "ms": sum(ms for ms in medians.values() if lo <= ms < hi),
        }
        for label, (lo, hi) in groups.items()
    }
    largest = sorted(medians.items(), key=lambda item: -item[1])[:top]
    return {
        "count": len(medians),
        "sum_ms": sum(medians.values()),
        "groups": summary,
        "largest": [{"op": key[1], "shapes": key[2], "ms": ms} for key, ms in largest],
    }


def one_box_decode(predictor: Predictor) -> tuple[Callable[[torch.Tensor], tuple], torch.Tensor]:
    """(decode, boxes): ``decode_prompts`` on the predictor's current embedding for boxes (B, 4) in
    the model's input frame, single mask, and :data:`BOX` in that frame, for the experiments."""
    model, embedding = predictor.model, predictor.current
    encoded = embedding.encoder_output()
    size = embedding.original_size
    boxes = torch.as_tensor(
        predictor.profile.boxes_to_input(predictor.check_boxes(BOX, size), size), dtype=torch.float32
    )

    def decode(boxes: torch.Tensor) -> tuple:
        return model.decode_prompts(encoded, PromptBatch(boxes=boxes), multimask_output=False)

    return decode, boxes


def traced_replay_experiment(predictor: Predictor, calls: int) -> dict[str, float]:
    """An experiment, not a product path: the factored decode replayed as a recorded graph.

    How much of a call is Python that a graph replay would remove, two ways: an FX graph of the
    aten operations (``make_fx``: the same operations called from generated Python, without
    samadapt's own code around them) and a TorchScript trace (run by TorchScript's C++ interpreter,
    no Python per operation). ``torch.jit.trace`` is deprecated in torch 2.x (a FutureWarning) and
    cannot record oneDNN's fused linear (its ``Scalar?[]`` argument). Two internal switches are
    patched: the "a graph is being recorded" test (the factored path refuses tracers and
    compilers), until the end, and for the trace alone the fused linear (``F.linear`` instead).
    Returns median milliseconds of ``decode_prompts`` for one box over ``calls`` interleaved calls,
    the time to record the trace, and the largest logit difference between the TorchScript trace
    and the eager call.
    """
    import warnings

    from samadapt.modeling import common

    model = predictor.model
    decode, boxes = one_box_decode(predictor)
    capturing, fused = common._capturing_graph, common._fused_linear
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)  # a trace keeps the weights as constants
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks become constants
            decode(boxes)  # the image's factored products exist from here on
            expected = decode(boxes)[0]
            common._capturing_graph = lambda: False
            from torch.fx.experimental.proxy_tensor import make_fx

            recorded = make_fx(decode)(boxes)  # with the fused linear
            common._fused_linear = lambda x: False
            start = time.perf_counter()
            traced = torch.jit.trace(decode, (boxes,), check_trace=False)
            trace_ms = (time.perf_counter() - start) * 1000.0
            common._fused_linear = fused
            difference = float((traced(boxes)[0] - expected).abs().max())
            variants = {
                "eager (the product path)": decode,
                "FX graph replay (aten ops)": recorded,
                "TorchScript trace replay": traced,
            }
            times: dict[str, list[float]] = {label: [] for label in variants}
            for _ in range(calls + 10):
                for label, fn in variants.items():
                    start = time.perf_counter()
                    fn(boxes)
                    times[label].append((time.perf_counter() - start) * 1000.0)
    finally:
        common._capturing_graph, common._fused_linear = capturing, fused
        for name, p in model.named_parameters():
            p.requires_grad_(grads[name])
    result = {label: statistics.median(values[10:]) for label, values in times.items()}
    return {**result, "recording the trace": trace_ms, "max_logit_difference": difference}


def compile_experiment(predictor: Predictor, calls: int) -> dict[str, float]:
    """An experiment, not a product path: the factored decode under ``torch.compile``, vs eager.

    Inductor with frozen weights (generated C++, elementwise operations fused). The factored path
    refuses compilers, so its "a graph is being recorded" test is patched for the whole experiment
    (outside a recording it answers as the real one). Run last: inductor's compile workers and
    dynamo's state disturb what runs after them. Returns the compile time (s) and the median
    milliseconds of ``calls`` interleaved calls each.
    """
    from torch._inductor import config as inductor_config

    from samadapt.modeling import common

    decode, boxes = one_box_decode(predictor)
    capturing = common._capturing_graph
    common._capturing_graph = lambda: False
    try:
        with torch.no_grad(), inductor_config.patch(freezing=True):
            decode(boxes)
            decode(boxes)  # the image's factored products exist from here on
            compiled = torch.compile(decode)
            start = time.perf_counter()
            compiled(boxes)
            compile_s = time.perf_counter() - start
            times: dict[str, list[float]] = {"eager (the product path)": [], "torch.compile (inductor)": []}
            for _ in range(calls + 10):
                for label, fn in zip(times, (decode, compiled), strict=True):
                    start = time.perf_counter()
                    fn(boxes)
                    times[label].append((time.perf_counter() - start) * 1000.0)
    finally:
        common._capturing_graph = capturing
    return {"compile_s": compile_s, **{label: statistics.median(v[10:]) for label, v in times.items()}}


def overhead_on_tiny_core(repeats: int) -> float:
    """Median ms of the same ``predict`` on the tiny core (random weights, 8 x 8 grid, 32 channels).

    Its arithmetic is negligible, so this is about what every call pays in Python, dispatch and
    threading whatever the model's size.
    """
    from samadapt.builders import build_tiny

    tiny = Predictor(build_tiny().eval(), device="cpu", precision="fp32")
    tiny.set_image(np.zeros((512, 512), dtype=np.uint8))
    return statistics.median(time_calls(lambda: tiny.predict(boxes=BOX), repeats, 20))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=200, help="timed predict calls")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls first")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--multimask", action="store_true", help="three masks per prompt")
    parser.add_argument("--boxes", type=int, default=16, help="boxes in the batched comparison (0: skip)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's table for 20 calls")
    parser.add_argument(
        "--stages", type=int, default=100, help="predict calls for the per-step breakdown (0: skip)"
    )
    parser.add_argument(
        "--ops", type=int, default=0, help="predict calls for the per-operation timing (0: skip)"
    )
    parser.add_argument(
        "--trace-experiment",
        type=int,
        default=0,
        help="calls for the traced-replay experiment (0: skip; patches internals, see its docstring)",
    )
    parser.add_argument(
        "--compile-experiment",
        type=int,
        default=0,
        help="calls for the torch.compile experiment, run last (0: skip; patches internals)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    predictor = Predictor(load_model(verified_default_checkpoint()), device="cpu", precision="fp32")
    image = read_image(resources.files("samadapt.assets") / "demo_ct.png")
    embedding = predictor.set_image(image)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"image {image.shape[1]}x{image.shape[0]}, box {BOX.tolist()}, multimask={args.multimask}")

    def predict() -> None:
        predictor.predict(boxes=BOX, multimask_output=args.multimask)

    times = time_calls(predict, args.repeats, args.warmup)
    median, p95 = statistics.median(times), percentile(times, 95)
    fresh = [
        ImageEmbedding(embedding.embedding.clone(), embedding.original_size, embedding.resized_size)
        for _ in range(30)
    ]
    first_times, second_times = [], []
    for other in fresh:  # the first and second prompts on each of 30 new embeddings
        for record in (first_times, second_times):
            start = time.perf_counter()
            predictor.predict(boxes=BOX, multimask_output=args.multimask, embedding=other)
            record.append((time.perf_counter() - start) * 1000.0)
    first_median, second_median = statistics.median(first_times), statistics.median(second_times)
    counts = (1, args.boxes) if args.boxes > 1 else (1,)
    compared = [batched_comparison(predictor, embedding, count, args.multimask) for count in counts]

    # One call split into its stages (same work as predict, each stage timed on its own).
    model, profile = predictor.model, predictor.profile
    boxes_t = torch.as_tensor(
        profile.boxes_to_input(predictor.check_boxes(BOX, embedding.original_size), embedding.original_size),
        dtype=torch.float32,
    )
    with torch.inference_mode():
        logits, _ = model.decode_prompts(
            embedding.encoder_output(), PromptBatch(boxes=boxes_t), multimask_output=args.multimask
        )
        stages = {
            "prompt encoder": lambda: model.embed_prompts(None, boxes_t, None),
            "decode (prompts + transformer + heads)": lambda: model.decode_prompts(
                embedding.encoder_output(), PromptBatch(boxes=boxes_t), multimask_output=args.multimask
            ),
            "upsample to 512x512": lambda: postprocess_logits(
                logits, profile, embedding.resized_size, embedding.original_size
            ),
            "upsample + threshold + numpy": lambda: (
                (postprocess_logits(logits, profile, embedding.resized_size, embedding.original_size) > 0)
                .cpu()
                .numpy()
            ),
        }
        stage_ms = {name: statistics.median(time_calls(fn, 50, 5)) for name, fn in stages.items()}

    print(f"\npredict(boxes=...) on a cached embedding: median {median:.2f} ms, p95 {p95:.2f} ms")
    print(f"  ({len(times)} calls after {args.warmup} warm-up; target <= {TARGET_MS:.0f} ms)")
    print(f"first prompt on a new embedding (plain path): median {first_median:.2f} ms (30 embeddings)")
    print(f"its second prompt (computes the factored products): median {second_median:.2f} ms")
    for name, ms in stage_ms.items():
        print(f"  {name:<40} {ms:6.2f} ms (median of 50)")
    print("factored vs plain path, interleaved (medians):")
    for row in compared:
        print(
            f"  {row['boxes']:>3} box(es) at once: factored {row['factored_ms']:.1f} ms, plain "
            f"{row['plain_ms']:.1f} ms ({row['plain_ms'] / row['factored_ms']:.2f}x); "
            f"{row['factored_ms'] / row['boxes']:.2f} ms per box"
        )
    stage_table = stage_breakdown(predictor, args.stages) if args.stages else {}
    if stage_table:
        print(f"where one predict's time goes (median per call of {args.stages}, timed by wrapping):")
        for label, ms in stage_table.items():
            print(f"  {label:<58} {ms:6.2f} ms")
    ops = operation_times(predictor, args.ops) if args.ops else {}
    if ops:
        print(
            f"its {ops['count']} tensor operations, each timed where it runs (median of {args.ops} calls): "
            f"{ops['sum_ms']:.2f} ms in all"
        )
        for label, group in ops["groups"].items():
            print(f"  {label:<20} {group['count']:4d} operations {group['ms']:6.2f} ms")
        for row in ops["largest"]:
            shapes = " ".join("x".join(map(str, shape)) for shape in row["shapes"])
            print(f"  {row['ms']:6.3f} ms  {row['op']:<40} {shapes}")
    traced = traced_replay_experiment(predictor, args.trace_experiment) if args.trace_experiment else {}
    if traced:
        print(f"experiment: decode_prompts, one box, eager vs traced ({args.trace_experiment} calls):")
        for label, ms in traced.items():
            value = f"{ms:.2e}" if label == "max_logit_difference" else f"{ms:8.2f} ms"
            print(f"  {label:<30} {value}")
    tiny_ms = overhead_on_tiny_core(args.repeats)
    print(f"the same predict on the tiny core (per-call overhead, next to no arithmetic): {tiny_ms:.2f} ms")
    if args.profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                predict()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    compiled = compile_experiment(predictor, args.compile_experiment) if args.compile_experiment else {}
    if compiled:
        print(f"experiment: decode_prompts, one box, eager vs compiled ({args.compile_experiment} calls):")
        for label, value in compiled.items():
            print(f"  {label:<30} " + (f"{value:8.1f} s" if label == "compile_s" else f"{value:8.2f} ms"))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "cpu": cpu_model(),
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "median_ms": median,
                    "p95_ms": p95,
                    "first_prompt_median_ms": first_median,
                    "second_prompt_median_ms": second_median,
                    "stages_ms": stage_ms,
                    "breakdown_ms": stage_table,
                    "operations": ops,
                    "traced_replay_experiment": traced,
                    "compile_experiment": compiled,
                    "tiny_core_overhead_ms": tiny_ms,
                    "factored_vs_plain": compared,
                    "target_ms": TARGET_MS,
                },
                indent=2,
            )
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
