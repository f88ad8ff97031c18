"""``samadapt geo segment --auto --adapter DIR`` with an RsPrompter adapter: its own instances, tile by tile.

Tiny random core + an untrained RsPrompter-query adapter (score threshold 0: every non-empty query is kept) on
crops of the solaris pan raster (tests/data/geo, CC BY-SA 4.0; see ATTRIBUTION.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

import torch  # noqa: E402
from cli_helpers import TESTS, run_samadapt, write_tiny_checkpoint  # noqa: E402
from rasterio.windows import Window  # noqa: E402

import samadapt  # noqa: E402
from samadapt.adapter import load_adapter, save_adapter  # noqa: E402
from samadapt.adapters.rsprompter import RsPrompterQuery  # noqa: E402
from samadapt.domains.remote_sensing.cache import EmbeddingCache  # noqa: E402
from samadapt.domains.remote_sensing.instance_tiles import AdapterInstances  # noqa: E402
from samadapt.domains.remote_sensing.raster import GeoRaster  # noqa: E402
from samadapt.domains.remote_sensing.tiling import encoder_input  # noqa: E402
from samadapt.predictor import ImageEmbedding, Predictor  # noqa: E402
from samadapt.weights import checkpoint_sha256  # noqa: E402

RASTER = TESTS / "data" / "geo" / "sample_geotiff.tif"
QUERY = {
    "num_classes": 3, "num_queries": 8, "tokens": 2, "layers": [0, 1], "hidden": 8, "heads": 2,
    "decoder_layers": 2,
}  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("geo_rsprompter")
    base = write_tiny_checkpoint(folder / "tiny.pt")
    model = samadapt.load_model(base)
    torch.manual_seed(1)
    adapter = RsPrompterQuery(score_threshold=0.0, **QUERY)
    adapter.attach(model)
    adapter_dir = save_adapter(folder / "rsprompter", adapter, model, base_sha256=checkpoint_sha256(base))
    crops = {}
    with rasterio.open(RASTER) as src:
        profile = src.profile
        for name, (col, row, size) in {"one_tile": (300, 300, 128), "tiles": (200, 200, 220)}.items():
            window = Window(col, row, size, size)
            profile.update(width=size, height=size, transform=src.window_transform(window))
            crops[name] = folder / f"{name}.tif"
            with rasterio.open(crops[name], "w", **profile) as dst:
                dst.write(src.read(window=window))
    return {"base": base, "adapter": Path(adapter_dir), **crops}


def _run(setup: dict[str, Path], raster: Path, out: Path, *extra: str) -> dict:
    proc = run_samadapt(
        "geo", "segment", raster, "--auto", "--adapter", setup["adapter"], "--checkpoint", setup["base"],
        "--precision", "fp32", "-o", out, "--json", "--no-progress", "--no-cache", *extra, cwd=out.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_one_tile_output_is_the_adapters_own_instances(setup: dict[str, Path], tmp_path: Path) -> None:
    summary = _run(setup, setup["one_tile"], tmp_path / "ids.tif", "--vector", str(tmp_path / "ids.gpkg"))
    with rasterio.open(tmp_path / "ids.tif") as out, rasterio.open(setup["one_tile"]) as src:
        assert (out.crs, out.transform, out.shape) == (src.crs, src.transform, src.shape)
        got = out.read(1).astype(np.int64)
    # the same window through the adapter in Python: predict_encoded on the encoder output
    model = samadapt.load_model(setup["base"])
    adapter = load_adapter(setup["adapter"], model, base_sha256=checkpoint_sha256(setup["base"]))
    predictor = Predictor(model, precision="fp32", adapter=adapter)
    with GeoRaster.open(setup["one_tile"]) as raster:
        image, _ = raster.read(Window(0, 0, 128, 128))
        # as embed_windows does: one row, rounded through float16 as the (here disabled) cache stores it
        cache = EmbeddingCache.for_raster(None, raster, model, predictor.precision, enabled=False)
    tensor, resized = encoder_input(image, predictor.profile)
    encoded = cache.store((0, 0, 128, 128), predictor.encode_batch(tensor).select(torch.tensor([0])))
    embedding = ImageEmbedding(encoded.embedding, (128, 128), resized, list(encoded.features))
    instances = AdapterInstances(predictor, adapter).generate(image, embedding)
    expected = instances.label_map().astype(np.int64)
    assert expected.max() >= 2  # the untrained queries give several instances: the comparison means something
    # same partition of the pixels (the raster numbers instances in raster order, the tile by size)
    pairs = np.unique(np.stack([got.ravel(), expected.ravel()]), axis=1)
    assert len(pairs.T) == len(np.unique(got)) == len(np.unique(expected))
    assert ((got == 0) == (expected == 0)).all()
    # each instance carries the adapter's class for it, in the JSON records and the vector fields
    classes = instances.settings["classes"]
    expected_class = {int(g): classes[int(e) - 1] for g, e in pairs.T if g > 0}
    assert {r["id"]: r["class"] for r in summary["records"]} == expected_class
    assert len(set(expected_class.values())) >= 2  # 3 classes, untrained: the check tells them apart
    import pyogrio

    meta, _fids, _geometry, fields = pyogrio.raw.read(tmp_path / "ids.gpkg")
    names = list(meta["fields"])
    ids, kinds = fields[names.index("id")].tolist(), fields[names.index("class")].tolist()
    written = dict(zip(ids, kinds, strict=True))
    assert written == expected_class
    assert summary["instances"] == len(np.unique(got)) - 1 and "rsprompter_query" in summary["model"]
    assert summary["mode"] == "auto"
    assert all(0.0 <= r["score"] <= 1.0 for r in summary["records"])  # class score x mask confidence


def test_several_tiles_keep_the_grid_and_merge_across_borders(setup: dict[str, Path], tmp_path: Path) -> None:
    summary = _run(setup, setup["tiles"], tmp_path / "ids.tif", "--overlap", "32")
    assert summary["tiles"] == 4 and summary["instances"] >= 1
    with rasterio.open(tmp_path / "ids.tif") as out, rasterio.open(setup["tiles"]) as src:
        assert (out.crs, out.transform, out.shape) == (src.crs, src.transform, src.shape)
        ids = out.read(1)
    assert sorted(int(v) for v in np.unique(ids) if v) == list(range(1, summary["instances"] + 1))
    assert all(0 <= r["class"] < 3 for r in summary["records"] if r["pixels"] > 0)
