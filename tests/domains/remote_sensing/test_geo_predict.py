"""``samadapt predict --config recipes/geo/predict.yaml``: many rasters through Lightning predict, one
georeferenced output per input, shared out over DDP processes without repeats (tiny random core)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
pyogrio = pytest.importorskip("pyogrio")
pytest.importorskip("lightning")

from cli_helpers import REPO, TESTS, run_samadapt, write_tiny_checkpoint  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402
from rasterio.windows import Window  # noqa: E402

import samadapt.cli  # noqa: E402

RECIPE = REPO / "recipes" / "geo" / "predict.yaml"
SAMPLE = TESTS / "data" / "geo" / "sample_geotiff.tif"
LABELS = TESTS / "data" / "geo" / "geotiff_labels.geojson"
# fast automatic mode on the tiny core: 4 grid points per tile, every mask kept
AUTO = [
    "--data.init_args.points_per_side", "2", "--data.init_args.single_mask", "true",
    "--data.init_args.pred_iou_thresh", "0", "--data.init_args.stability_thresh", "0",
]  # fmt: skip


def _crop(path: Path, col: int, row: int, size: int = 300) -> Path:
    """A size x size crop of the solaris sample (16-bit pan, EPSG:32616, 0.5 m)."""
    with rasterio.open(SAMPLE) as src:
        window = Window(col, row, size, size)
        profile = {**src.profile, "width": size, "height": size, "transform": src.window_transform(window)}
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(src.read(window=window))
    return path


def _synthetic(path: Path) -> Path:
    """3-band uint8 in EPSG:3857 with non-square pixels (2 m x 3 m), a bright square in the middle."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 60, (3, 260, 220), dtype=np.uint8)
    data[:, 100:160, 80:140] = 220
    profile = {
        "driver": "GTiff", "width": 220, "height": 260, "count": 3, "dtype": "uint8",
        "crs": "EPSG:3857", "transform": from_origin(1_000_000, 6_000_000, 2.0, 3.0),
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("geo_predict_ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def rasters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("geo_predict_in")
    return {
        "a": _crop(folder / "a.tif", 0, 0),
        "b": _synthetic(folder / "b.tif"),
        "c": _crop(folder / "c.tif", 500, 500),
    }


def _predict(tiny: Path, out: Path, cache: Path, *args: str | Path) -> int:
    argv = [
        "predict", "--config", RECIPE, "--model.base", tiny, "--data.init_args.output_dir", out,
        "--data.init_args.cache_dir", cache, "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", out.parent / "runs", *args,
    ]  # fmt: skip
    return samadapt.cli.main([str(a) for a in argv])


def _check_output(out: Path, source: Path, vector: str | None = ".gpkg") -> dict:
    """The output raster is on the input's grid, the polygons carry its CRS; returns the summary."""
    stem = source.stem
    with rasterio.open(out / f"{stem}.tif") as result, rasterio.open(source) as src:
        assert (result.crs, result.transform, result.shape) == (src.crs, src.transform, src.shape)
        assert result.count == 1 and result.nodata is not None
    if vector:
        info = pyogrio.read_info(out / f"{stem}{vector}")
        with rasterio.open(source) as src:
            assert rasterio.crs.CRS.from_user_input(info["crs"]) == src.crs
        assert {"id", "score", "area"} <= set(info["fields"])
    summary = json.loads((out / f"{stem}.json").read_text())
    assert summary["input"] == str(source) and summary["output"] == str(out / f"{stem}.tif")
    assert {"instances", "skipped", "timings", "rank", "world_size"} <= set(summary)
    return summary


def test_one_output_per_raster_and_a_bad_raster_is_skipped(
    tiny: Path, rasters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "broken.tif"
    bad.write_text("not a GeoTIFF")
    out = tmp_path / "out"
    inputs = f"[{rasters['a']}, {rasters['b']}, {rasters['a']}, '{tmp_path}/*.tif']"  # a twice: one output
    code = _predict(tiny, out, tmp_path / "cache", "--data.init_args.inputs", inputs, *AUTO)
    captured = capsys.readouterr()
    assert code == 1, captured.err[-3000:]  # one input failed: non-zero exit, the others written
    assert "1 input(s) failed" in captured.err
    assert f"skipped {bad}" in captured.err and "not recognized" in captured.err
    for name in ("a", "b"):
        summary = _check_output(out, rasters[name])
        assert summary["mode"] == "auto" and summary["rank"] == 0 and summary["world_size"] == 1
        with rasterio.open(out / f"{name}.tif") as result:
            assert result.read(1).max() >= 1  # thresholds at 0: the tiny core finds something
    names = sorted(p.name for p in out.iterdir())
    assert names == ["a.gpkg", "a.json", "a.tif", "b.gpkg", "b.json", "b.tif"]  # no temp files, no broken.*
    assert "2 raster(s) written, 1 failed" in captured.out


def test_prompts_mode_reads_one_vector_file_per_raster(
    tiny: Path, rasters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with rasterio.open(rasters["a"]) as src:
        left, bottom, right, top = src.bounds
    features = []
    for n, feature in enumerate(json.loads(LABELS.read_text())["features"]):
        xs = [x for ring in feature["geometry"]["coordinates"] for x, _ in ring]
        ys = [y for ring in feature["geometry"]["coordinates"] for _, y in ring]
        if left < min(xs) and max(xs) < right and bottom < min(ys) and max(ys) < top:
            features.append({**feature, "properties": {"id": f"bldg{n}"}})
    far = {
        "type": "Feature",
        "properties": {"id": "far"},
        "geometry": {"type": "Point", "coordinates": [0, 0]},
    }
    collection = {
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32616"}},
        "features": [*features, far],
    }
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "a.geojson").write_text(json.dumps(collection))  # b has no prompt file: reported, skipped
    out = tmp_path / "out"
    args = [
        "--data.init_args.inputs", f"[{rasters['a']}, {rasters['b']}]", "--data.init_args.mode", "prompts",
        "--data.init_args.prompts_dir", prompts, "--data.init_args.vector", ".geojson",
    ]  # fmt: skip
    code = _predict(tiny, out, tmp_path / "cache", *args)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert f"skipped {rasters['b']}: no b" in captured.err
    summary = _check_output(out, rasters["a"], ".geojson")
    assert len(features) >= 3 and summary["prompts"] == len(features) and summary["skipped"] == ["far"]
    meta, _fids, _geometry, fields = pyogrio.raw.read(out / "a.geojson")
    ids = fields[list(meta["fields"]).index("feature_id")]
    assert set(ids) <= {f["properties"]["id"] for f in features} and len(ids) == summary["instances"]
    assert sorted(p.name for p in out.iterdir()) == ["a.geojson", "a.json", "a.tif"]


def test_a_trained_adapter_is_loaded_with_init_from(
    tiny: Path, rasters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A decoder fine-tuning whose exported weights are all zero: every logit is 0, so nothing is found
    (the untouched tiny core finds something on the same raster, see the first test)."""
    import torch

    from samadapt.adapters.medsam import MedSAMFineTune
    from samadapt.training import SamTask

    task = SamTask(MedSAMFineTune(train_image_encoder=False), base=str(tiny))
    with torch.no_grad():
        for parameter in task.model.mask_decoder.parameters():
            parameter.zero_()
    adapter = task.export(tmp_path / "zeroed", {"steps": 0})
    out = tmp_path / "out"
    args = ["--data.init_args.inputs", f"[{rasters['a']}]", "--model.init_from", adapter, *AUTO]
    code = _predict(tiny, out, tmp_path / "cache", *args)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    summary = _check_output(out, rasters["a"])
    assert summary["instances"] == 0 and f"from {adapter}" in summary["model"]
    with rasterio.open(out / "a.tif") as result:
        assert result.read(1).max() == 0


def test_init_from_alone_loads_an_adapter_of_another_type_than_the_recipes(
    tiny: Path, rasters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The recipe configures a MedSAM fine-tuning; a LoRA folder given with --model.init_from alone
    replaces it (type and rank from its adapter.json), says so, and its weights are the ones used."""
    import torch

    from samadapt.adapters.lora import LoRA
    from samadapt.training import SamTask

    task = SamTask(LoRA(rank=2), base=str(tiny))
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero (no change): a large random update instead
        for parameter in task.adapter.parameters():
            parameter.normal_(0, 1)
    adapter = task.export(tmp_path / "lora", {"steps": 0})
    out, plain_out = tmp_path / "out", tmp_path / "plain"
    inputs = ["--data.init_args.inputs", f"[{rasters['a']}]", *AUTO]
    assert _predict(tiny, plain_out, tmp_path / "cache", *inputs) == 0
    capsys.readouterr()
    code = _predict(tiny, out, tmp_path / "cache2", *inputs, "--model.init_from", adapter)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "its lora adapter" in captured.err and "replaces the configured medsam" in captured.err
    summary = _check_output(out, rasters["a"])
    assert f"adapter lora from {adapter}" in summary["model"]
    assert "adapter medsam" in _check_output(plain_out, rasters["a"])["model"]
    with rasterio.open(out / "a.tif") as adapted, rasterio.open(plain_out / "a.tif") as plain:
        assert (adapted.read(1) != plain.read(1)).any()  # the LoRA weights changed the instances


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data.init_args.inputs", "[missing.tif]"], "raster not found: missing.tif"),
        (["--data.init_args.inputs", "[]"], "no inputs"),
        (["--data.init_args.inputs", "[{a}]", "--data.init_args.mode", "prompts"], "needs prompts_dir"),
        (["--data.init_args.inputs", "[{a}]", "--data.init_args.vector", ".json"], "vector must be one of"),
        (["--data.init_args.inputs", "[{a}]", "--data.init_args.tile", "8"], "--tile must be at least 16"),
    ],
)
def test_bad_arguments_end_in_one_line(
    tiny: Path,
    rasters: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    args = [a.format(a=rasters["a"]) for a in args]
    code = _predict(tiny, tmp_path / "out", tmp_path / "cache", *args)
    err = capsys.readouterr().err
    assert code == 1 and err.strip().splitlines()[-1].startswith("samadapt predict: error:"), err
    assert message in err.strip().splitlines()[-1], err
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_two_inputs_with_one_name_are_refused(
    tiny: Path, rasters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    _crop(other / "a.tif", 100, 100, 64)
    code = _predict(
        tiny, tmp_path / "out", tmp_path / "cache", "--data.init_args.inputs", f"[{rasters['a']}, {other}]"
    )
    assert code == 1 and "two inputs share the name a" in capsys.readouterr().err


def test_each_rank_takes_its_own_share_without_repeats() -> None:
    from samadapt.domains.remote_sensing.predict_data import _RankShard

    for size in range(6):
        for world in (1, 2, 3, 4):
            shares = [list(_RankShard(size, world, rank)) for rank in range(world)]
            assert sorted(i for share in shares for i in share) == list(range(size))
            assert [len(_RankShard(size, world, rank)) for rank in range(world)] == [len(s) for s in shares]


def test_ddp_two_processes_write_each_raster_once(
    tiny: Path, rasters: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    inputs = f"[{rasters['a']}, {rasters['b']}, {rasters['c']}]"
    proc = run_samadapt(
        "predict", "--config", RECIPE, "--model.base", tiny, "--data.init_args.inputs", inputs,
        "--data.init_args.output_dir", out, "--data.init_args.cache_dir", tmp_path / "cache",
        "--data.init_args.vector", ".fgb", *AUTO,
        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false",
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [_check_output(out, rasters[name], ".fgb") for name in "abc"]
    assert sorted(s["index"] for s in summaries) == [0, 1, 2]  # each job once
    assert {s["rank"] for s in summaries} == {0, 1} and {s["world_size"] for s in summaries} == {2}
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"{n}{ext}" for n in "abc" for ext in (".fgb", ".json", ".tif"))
    assert proc.stdout.count("raster(s) written") == 2  # one line per rank: 2 + 1 rasters
    assert "rank 0/2): 2 raster(s) written" in proc.stdout and "rank 1/2): 1 raster(s) written" in proc.stdout


def test_the_recipe_says_how_to_launch_it() -> None:
    text = RECIPE.read_text()
    assert text.startswith("# Many GeoTIFFs") and "samadapt predict --config recipes/geo/predict.yaml" in text
    assert "--trainer.devices 2 --trainer.strategy ddp" in text
