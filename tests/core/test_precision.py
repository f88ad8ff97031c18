"""``auto`` precision: the threshold rule, the per-part bf16 plan, the measurement cache, ``samadapt info``.

The measured speed-up is injected through ``$SAMADAPT_BF16_SPEEDUP`` (or a fake ``measure_speedup``)
and the CPU's bf16 support is patched, so these tests decide the same way on every machine.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from samadapt import Predictor, autoprecision, build, load_model
from samadapt.autoprecision import ENV_CACHE_DIR, ENV_SPEEDUP, MIN_SPEEDUP, PLANS
from samadapt.cli import main
from samadapt.errors import InputError
from samadapt.precision import PrecisionPlan, plan_precision

CPU = torch.device("cpu")
PLANNED = re.compile(r"image_encoder\.layers\.[123]\.blocks\.\d+\.(attn|mlp)")


@pytest.fixture()
def bf16_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A CPU with bf16 instructions, a private cache dir and no injected speed-up."""
    monkeypatch.setattr(autoprecision, "cpu_supports_bf16", lambda: True)
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(ENV_SPEEDUP, raising=False)
    return tmp_path / "cache" / "precision.json"


@pytest.fixture(scope="module")
def lite() -> nn.Module:
    torch.manual_seed(0)
    return build("lite_medsam").eval().to(memory_format=torch.channels_last)


def test_auto_is_fp32_when_the_measured_speedup_is_below_the_threshold(
    bf16_cpu: Path, lite: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_SPEEDUP, "1.15")
    plan = plan_precision("auto", CPU, lite)
    assert plan.precision == "fp32" and plan.modules == ()
    assert "1.15x faster, below the 1.2x threshold" in plan.reason
    assert not bf16_cpu.exists()  # an injected number is neither measured nor cached


def test_auto_takes_the_plan_when_it_is_fast_enough(
    bf16_cpu: Path, lite: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_SPEEDUP, str(MIN_SPEEDUP + 0.5))
    plan = plan_precision("auto", CPU, lite)
    assert plan.precision == "bf16-partial" and plan.dtype == torch.bfloat16
    assert len(plan.modules) == 20  # attn + mlp of the 2 + 6 + 2 blocks of stages 1-3
    assert all(PLANNED.fullmatch(name) for name in plan.modules)
    assert "1.70x faster" in plan.reason and plan.parts in plan.describe()


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("off", "switched off"),
        ("no-bf16-cpu", "no bf16 instructions"),
        ("tiny", "no bf16 plan has been checked"),
    ],
)
def test_auto_is_fp32_without_fast_checked_bf16(
    bf16_cpu: Path, lite: nn.Module, monkeypatch: pytest.MonkeyPatch, setup: str, expected: str
) -> None:
    model = lite
    monkeypatch.setenv(ENV_SPEEDUP, "3")
    if setup == "off":
        monkeypatch.setenv(ENV_SPEEDUP, "off")
    elif setup == "no-bf16-cpu":
        monkeypatch.setattr(autoprecision, "cpu_supports_bf16", lambda: False)
    else:
        model = build("tiny")
    plan = plan_precision("auto", CPU, model)
    assert plan.precision == "fp32" and expected in plan.reason


def test_bad_override_is_a_clear_error(bf16_cpu: Path, lite: nn.Module, monkeypatch) -> None:
    monkeypatch.setenv(ENV_SPEEDUP, "fast")
    with pytest.raises(InputError, match="SAMADAPT_BF16_SPEEDUP must be a number or 'off'"):
        plan_precision("auto", CPU, lite)


def test_measurement_is_cached_per_machine_and_reused(
    bf16_cpu: Path, lite: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, ...]] = []

    def fake_measure(model, modules, device, repeats=2):
        calls.append(modules)
        return 1.6

    monkeypatch.setattr(autoprecision, "measure_speedup", fake_measure)
    monkeypatch.setattr(autoprecision, "MIN_CPU_SHARE", 0.0)  # the fake takes no CPU time at all
    first = plan_precision("auto", CPU, lite)
    assert first.precision == "bf16-partial" and "measured now" in first.reason and len(calls) == 1
    cached = json.loads(bf16_cpu.read_text())
    (key, entry), *_ = cached.items()
    assert entry["speedup"] == 1.6
    assert torch.__version__ in key and "lite_medsam" in key and PLANS["lite_medsam"].name in key
    second = plan_precision("auto", CPU, lite)
    assert second == dataclasses.replace(first, reason=second.reason) and "cached in" in second.reason
    assert len(calls) == 1  # not measured again
    bf16_cpu.write_text("{not json")  # a corrupt cache is measured again and rewritten
    assert plan_precision("auto", CPU, lite).precision == "bf16-partial" and len(calls) == 2
    assert json.loads(bf16_cpu.read_text())[key]["speedup"] == 1.6


def test_a_measurement_on_a_busy_machine_is_used_but_not_cached(
    bf16_cpu: Path, lite: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(autoprecision, "measure_speedup", lambda *args, **kwargs: 1.5)
    monkeypatch.setattr(autoprecision, "MIN_CPU_SHARE", 2.0)  # no share of the CPU is enough
    plan = plan_precision("auto", CPU, lite)
    assert plan.precision == "bf16-partial" and "busy machine" in plan.reason and "not cached" in plan.reason
    assert not bf16_cpu.exists()


def test_real_micro_benchmark_is_cheap_and_positive(lite: nn.Module) -> None:
    import time

    start = time.perf_counter()
    speedup = autoprecision.measure_speedup(lite, PLANS["lite_medsam"].modules(lite), CPU)
    assert 0.2 < speedup < 20
    assert time.perf_counter() - start < 30  # about a second on a quiet 2-core CPU


def test_planned_parts_run_in_bf16_and_the_rest_in_fp32(
    bf16_cpu: Path, lite: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_SPEEDUP, "2")
    state = {k: v.clone() for k, v in lite.state_dict().items()}
    predictor = Predictor(lite, precision="auto")
    assert predictor.precision == "bf16-partial"
    planned = set(predictor.precision_plan.modules)
    seen: dict[str, torch.dtype] = {}
    stream: dict[str, torch.dtype] = {}

    def output_dtype(name: str):
        def hook(module: nn.Module, args, output: torch.Tensor) -> None:
            seen[name] = output.dtype

        return hook

    def input_dtype(name: str):
        def hook(module: nn.Module, args) -> None:
            stream[name] = args[0].dtype

        return hook

    handles = []
    for name, module in lite.named_modules():
        if name.count(".") == 5 or name in ("image_encoder.patch_embed", "image_encoder.neck"):
            # prepend: runs before the plan's hook casts the output back to float32
            handles.append(module.register_forward_hook(output_dtype(name), prepend=True))
        if name.endswith("local_conv"):
            handles.append(module.register_forward_pre_hook(input_dtype(name)))
    try:
        x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
        embedding = predictor.encode_batch(x).embedding
    finally:
        for handle in handles:
            handle.remove()
    assert planned and planned <= set(seen)
    assert {seen[n] for n in planned} == {torch.bfloat16}
    unplanned = {n: d for n, d in seen.items() if n not in planned}
    assert any(n.endswith("local_conv") for n in unplanned) and "image_encoder.neck" in unplanned
    assert set(unplanned.values()) == {torch.float32}, unplanned
    assert set(stream.values()) == {torch.float32}  # the residual stream stays fp32
    assert embedding.dtype == torch.float32
    # no hooks left behind, parameters untouched
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lite.modules())
    after = lite.state_dict()
    assert after.keys() == state.keys()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in state.items())


def test_volume_propagation_runs_fp32_where_the_plan_was_not_checked_on_it(
    bf16_cpu: Path, lite: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auto's LiteMedSAM plan moved propagated masks on the organ table: propagation embeds at fp32."""
    from samadapt.domains.medical.propagation import VolumeSegmenter, slice_image

    monkeypatch.setenv(ENV_SPEEDUP, "2")
    predictor = Predictor(lite, precision="auto")
    assert predictor.precision == "bf16-partial" and PLANS["lite_medsam"].propagation_evidence is None
    assert predictor.propagation_plan.precision == "fp32"
    assert "propagation" in predictor.propagation_plan.reason
    image = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    plane = slice_image(image, "axial", 0)
    fp32 = Predictor(lite, precision="fp32").embed([plane])[0].embedding
    single = predictor.embed([plane])[0].embedding
    segmenter = VolumeSegmenter(predictor, image, "axial", batch_size=1)
    segmenter.embeddings([0])
    propagated = segmenter.embedding(0).embedding
    assert torch.equal(propagated, fp32)  # the slices of a propagation: fp32 exactly
    assert not torch.equal(single, fp32)  # a single image: the bf16 plan
    # an explicit request applies everywhere
    explicit = Predictor(lite, precision="bf16")
    assert explicit.propagation_plan is explicit.precision_plan


def test_plan_hooks_are_removed_when_the_encoder_fails(lite: nn.Module) -> None:
    plan = PrecisionPlan("bf16-partial", PLANS["lite_medsam"].modules(lite))
    with pytest.raises(RuntimeError), torch.inference_mode(), plan.applied(lite, CPU):
        lite.image_encoder(torch.rand(1, 3, 100, 100))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lite.modules())
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize(
    ("speedup", "expected"),
    [("1.05", "1.05x faster, below the 1.2x threshold"), ("1.9", "1.90x faster than fp32")],
)
def test_info_says_what_auto_chose_and_why(
    bf16_cpu: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], speedup, expected
) -> None:
    monkeypatch.setenv(ENV_SPEEDUP, speedup)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    chosen = "fp32" if speedup == "1.05" else "bf16-partial (bf16 in the attention and MLP branches"
    assert f"precision: auto -> {chosen}" in out
    why = next(line for line in out.splitlines() if line.strip().startswith("why:"))
    assert expected in why
    assert ("volume propagation: fp32" in out) == (speedup != "1.05")


@pytest.mark.slow
def test_chosen_plan_keeps_every_sam_med2d_mask(bf16_cpu: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quality-checked plan: mean Dice within 0.003 of fp32, no mask lower by more than 0.05."""
    import oracles

    from samadapt.weights import verified_default_checkpoint

    monkeypatch.setenv(ENV_SPEEDUP, "9")
    model = load_model(verified_default_checkpoint())
    fp32 = Predictor(model, precision="fp32")
    auto = Predictor(model, precision="auto")
    assert auto.precision == "bf16-partial"
    cases = oracles.load_sam_med2d()
    dices: dict[str, list[float]] = {"fp32": [], "auto": []}
    for group in oracles.group_by_image(cases).values():
        boxes = np.stack([c.box for c in group]).astype(np.float64)
        for name, predictor in (("fp32", fp32), ("auto", auto)):
            embedding = predictor.embed([group[0].image])[0]
            masks = predictor.predict(boxes=boxes, embedding=embedding).masks[:, 0]
            dices[name] += [oracles.dice(masks[i], c.mask) for i, c in enumerate(group)]
    delta = np.array(dices["auto"]) - np.array(dices["fp32"])
    assert len(delta) == 30
    assert abs(delta.mean()) <= 0.003, delta.mean()
    assert delta.min() >= -0.05, (delta.min(), [c.name for c in cases][int(delta.argmin())])
