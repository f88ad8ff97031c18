"""Many GeoTIFFs (or a huge one) through Lightning ``predict``, spread over DDP processes, one
georeferenced output per input: ``samadapt predict --config recipes/geo/predict.yaml``.

- :class:`GeoPredictDataModule` finds the rasters (files, folders, globs) and yields one
  :class:`GeoJob` per raster. Each process gets its own share (rank ``r`` of ``w`` takes rasters
  ``r, r + w, ...`` of the sorted list) through a ``DistributedSampler`` subclass, so Lightning never
  adds its own sampler (whatever ``use_distributed_sampler`` says) and every raster is written by
  exactly one process.
- :class:`GeoPredictionWriter` runs the whole single-raster pipeline of ``samadapt geo segment``
  (:func:`~samadapt.domains.remote_sensing.pipeline.run_raster`) on each job with the task's model
  (``SamTask.predict_step`` hands the job through untouched): ``OUT/<stem>.tif`` (instance ids, the
  input's CRS, transform, shape and nodata), ``OUT/<stem><vector>`` (polygons) and ``OUT/<stem>.json``
  (instances, skipped prompts, timings, the rank that wrote it). A raster that fails is reported on
  stderr and skipped; the others are still written.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, DistributedSampler

from samadapt.domains.remote_sensing.pipeline import SegmentOptions, run_raster
from samadapt.errors import InputError

__all__ = ["PROMPT_SUFFIXES", "GeoJob", "GeoPredictDataModule", "GeoPredictionWriter", "find_rasters"]

RASTER_SUFFIXES = (".tif", ".tiff")
#: the per-raster prompt file ``<stem><suffix>`` looked up in ``prompts_dir``, in this order
PROMPT_SUFFIXES = (".geojson", ".gpkg", ".fgb", ".shp")
#: per-raster polygon file endings (``.json`` is the summary's)
OUTPUT_VECTOR_SUFFIXES = (".gpkg", ".geojson", ".fgb", ".shp")


@dataclass(frozen=True)
class GeoJob:
    """One raster to segment: its index in the sorted input list, its path, and the full options
    (output paths included)."""

    index: int
    input: str
    options: SegmentOptions


def _is_raster(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in RASTER_SUFFIXES


def find_rasters(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """(sorted, de-duplicated rasters, notes about entries that matched none) of files (any GDAL
    raster), folders (their ``*.tif``/``*.tiff``, not recursive) and glob patterns (``*.tif``/``*.tiff``).

    Raises:
        InputError: a file that does not exist, or no raster at all.
    """
    found: dict[str, Path] = {}
    notes: list[str] = []
    for entry in inputs:
        entry = os.path.expanduser(str(entry))
        if glob.has_magic(entry):
            rasters = [Path(m) for m in glob.glob(entry, recursive=True) if _is_raster(Path(m))]
        elif Path(entry).is_dir():
            rasters = [m for m in Path(entry).iterdir() if _is_raster(m)]
        elif Path(entry).is_file():  # a file named explicitly is taken whatever its ending (.vrt, .jp2)
            rasters = [Path(entry)]
        else:
            raise InputError(f"raster not found: {entry}")
        if not rasters:
            notes.append(f"no .tif/.tiff in {entry}")
        for raster in rasters:
            found.setdefault(str(raster.resolve()), raster)
    if not inputs:
        raise InputError("no inputs: give --data.init_args.inputs '[FILE.tif, FOLDER/, \"GLOB/*.tif\"]'")
    if not found:
        raise InputError(f"no rasters (.tif, .tiff) found in: {', '.join(map(str, inputs))}")
    return [found[k] for k in sorted(found)], notes


class _RankShard(DistributedSampler):
    """Indexes ``rank, rank + replicas, ...``: no padding, no repeats, every index on one rank only.

    A ``DistributedSampler`` subclass, so Lightning keeps it instead of injecting its own.
    """

    def __init__(self, size: int, replicas: int, rank: int) -> None:
        indexes: Any = range(size)  # a sized sequence is all DistributedSampler reads of its dataset
        super().__init__(indexes, num_replicas=replicas, rank=rank, shuffle=False, drop_last=False)
        self.size = size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.num_replicas))


def _jobs_batch(batch: list[GeoJob]) -> list[GeoJob]:
    """Identity collate: a batch is the list of its jobs (one)."""
    return batch


class GeoPredictDataModule(LightningDataModule):
    """One prediction job per raster (batch size 1), shared out across DDP processes without repeats.

    Args:
        inputs: rasters: files, folders (their ``*.tif``/``*.tiff``) and glob patterns (``'tiles/*.tif'``,
            ``'**'`` recursive); sorted and de-duplicated.
        output_dir: where ``<stem>.tif``, ``<stem><vector>`` and ``<stem>.json`` go (created if missing).
            Two inputs with the same file stem are refused (their outputs would collide).
        mode: ``auto`` (segment everything, tile by tile) or ``prompts`` (boxes/points from a vector file
            per raster, see ``prompts_dir``).
        prompts_dir: ``prompts`` mode: the folder holding ``<stem>.geojson|.gpkg|.fgb|.shp`` for each
            raster (each feature's bounding box, or its point; any CRS); a raster without one is reported
            and skipped.
        vector: ending of the per-raster polygon file (``.gpkg``, ``.geojson``, ``.fgb``, ``.shp``), or
            None for rasters only.
        tile: tile side in pixels (default: the model's input side). overlap: pixels shared by
            neighbouring tiles (default: tile/8).
        bands: 1-based bands shown to the model as R G B (max 3; default: the first three).
        resolution: read at this pixel size (map units); outputs stay on the input's grid.
        zoom: ``auto`` segments small boxes on an enlarged crop at the model's resolution; ``off``.
        cog: write Cloud-Optimized GeoTIFFs. simplify: simplify polygons (map units).
        cache_dir: embedding cache (default ``~/.cache/samadapt/geo``); use_cache: False neither
            reads nor writes it.
        points_per_side, points_per_batch, pred_iou_thresh, stability_thresh, stability_offset,
            min_area, single_mask, merge_iou: the automatic mode, as ``samadapt geo segment --auto``.
    """

    def __init__(
        self,
        inputs: list[str],
        output_dir: str,
        mode: Literal["auto", "prompts"] = "auto",
        prompts_dir: str | None = None,
        vector: str | None = ".gpkg",
        tile: int | None = None,
        overlap: int | None = None,
        bands: list[int] | None = None,
        resolution: float | None = None,
        zoom: Literal["auto", "off"] = "auto",
        cog: bool = False,
        simplify: float | None = None,
        cache_dir: str | None = None,
        use_cache: bool = True,
        points_per_side: int = 32,
        points_per_batch: int = 256,
        pred_iou_thresh: float = 0.88,
        stability_thresh: float = 0.95,
        stability_offset: float = 1.0,
        min_area: int = 0,
        single_mask: bool = False,
        merge_iou: float = 0.5,
    ) -> None:
        super().__init__()
        self.inputs = [str(i) for i in inputs]
        self.output_dir = Path(output_dir)
        self.prompts_dir = Path(prompts_dir) if prompts_dir else None
        self.vector = vector
        self.options = SegmentOptions(
            output="",
            mode=mode,
            bands=tuple(bands) if bands else None,
            resolution=resolution,
            tile=tile,
            overlap=overlap,
            zoom=zoom,
            cache_dir=cache_dir,
            use_cache=use_cache,
            cog=cog,
            simplify=simplify,
            software="samadapt predict (recipes/geo/predict.yaml)",
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_thresh=stability_thresh,
            stability_offset=stability_offset,
            min_area=min_area,
            single_mask=single_mask,
            merge_iou=merge_iou,
        )
        self.rasters: list[Path] = []
        self.jobs: list[GeoJob] = []

    def _check(self) -> list[str]:
        """Check the arguments and find the rasters (in ``setup``: errors then end in one line);
        returns notes for rank 0 to print."""
        vector, mode, prompts_dir = self.vector, self.options.mode, self.prompts_dir
        self.options.check()
        if vector is not None and vector.lower() not in OUTPUT_VECTOR_SUFFIXES:
            choices = ", ".join(OUTPUT_VECTOR_SUFFIXES)
            raise InputError(f"--data.init_args.vector must be one of {choices} or null, got {vector!r}")
        if mode == "prompts" and prompts_dir is None:
            raise InputError("mode prompts needs prompts_dir (a folder of <stem>.geojson|.gpkg|.fgb|.shp)")
        if mode != "prompts" and prompts_dir is not None:
            raise InputError("prompts_dir is for mode prompts (mode auto segments everything)")
        if prompts_dir is not None and not prompts_dir.is_dir():
            raise InputError(f"prompts_dir is not a folder: {prompts_dir}")
        self.rasters, notes = find_rasters(self.inputs)
        stems: dict[str, Path] = {}
        for raster in self.rasters:
            other = stems.setdefault(raster.stem, raster)
            if other is not raster:
                raise InputError(f"two inputs share the name {raster.stem}: {other}, {raster}")
            if (self.output_dir / f"{raster.stem}.tif").resolve() == raster.resolve():
                raise InputError(f"output_dir holds the input {raster}: its output would replace it")
        return notes

    def _prompt_file(self, raster: Path) -> Path | None:
        assert self.prompts_dir is not None
        for suffix in PROMPT_SUFFIXES:
            candidate = self.prompts_dir / f"{raster.stem}{suffix}"
            if candidate.is_file():
                return candidate
        return None

    def setup(self, stage: str) -> None:
        """Build the job list (the same on every process); rank 0 reports what is skipped."""
        rank = self.trainer.global_rank if self.trainer is not None else 0
        notes = self._check()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.jobs = []
        for raster in self.rasters:
            prompts = None
            if self.prompts_dir is not None:
                prompts = self._prompt_file(raster)
                if prompts is None:
                    notes.append(
                        f"skipped {raster}: no {raster.stem}.geojson|.gpkg|.fgb|.shp in {self.prompts_dir}"
                    )
                    continue
            options = dataclasses.replace(
                self.options,
                output=str(self.output_dir / f"{raster.stem}.tif"),
                vector=str(self.output_dir / f"{raster.stem}{self.vector}") if self.vector else None,
                prompts=str(prompts) if prompts is not None else None,
            )
            self.jobs.append(GeoJob(len(self.jobs), str(raster), options))
        if rank == 0:
            for note in notes:
                print(f"samadapt predict: {note}", file=sys.stderr)

    def predict_dataloader(self) -> DataLoader:
        """Batch size 1, identity collate, this process's share of the jobs."""
        trainer = self.trainer
        replicas = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        return DataLoader(
            self.jobs,  # type: ignore[arg-type]
            batch_size=1,
            sampler=_RankShard(len(self.jobs), replicas, rank),
            collate_fn=_jobs_batch,
            num_workers=0,
        )

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Jobs hold paths, not tensors: they stay as they are (Lightning's default would try to copy
        the frozen dataclass)."""
        if isinstance(batch, list) and all(isinstance(job, GeoJob) for job in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic: a hidden temporary file next to ``path``, renamed into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".json", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide the summary from other users
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


class GeoPredictionWriter(BasePredictionWriter):
    """Runs each :class:`GeoJob` through the geo pipeline with the task's model and writes its outputs.

    The model is ``pl_module.model`` (``SamTask``: the core with the adapter attached), wrapped in a
    :class:`samadapt.predictor.Predictor` in eval mode without autograd; a huge raster's tiles stream in
    and out window by window, so the per-raster pass happens here rather than in ``predict_step``.

    Args:
        precision: the predictor's precision: ``auto``, ``bf16``, ``fp16`` or ``fp32``.
        progress: a progress bar per raster on stderr (rank 0 only).
    """

    def __init__(self, precision: str = "auto", progress: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.precision = precision
        self.progress = progress
        self.written: list[str] = []
        self.failed: list[str] = []
        self._predictor: Any = None
        self._described = ""

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        from samadapt.predictor import Predictor

        model = getattr(pl_module, "model", None)
        if model is None:
            raise InputError("GeoPredictionWriter needs a task holding the SAM model as .model (SamTask)")
        pl_module.eval()
        adapter = getattr(pl_module, "adapter", None)  # an instance adapter (RsPrompter) is run per tile
        self._predictor = Predictor(model, device=pl_module.device, precision=self.precision, adapter=adapter)
        kind = getattr(adapter, "adapter_type", None) or type(adapter).__name__
        init_from = getattr(pl_module, "hparams", {}).get("init_from")
        base = getattr(pl_module, "base_name", "?")
        self._described = f"{model.variant} ({base}) at {self._predictor.precision}, adapter {kind}" + (
            f" from {init_from}" if init_from else ""
        )
        self.written, self.failed = [], []

    def write_on_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Run the batch's jobs; each job in ``prediction`` (the batch list itself, handed through by
        ``predict_step``) is replaced by its summary, so ``trainer.predict`` returns plain dicts (Lightning
        cannot move frozen dataclasses to the CPU) and a Python caller gets one summary per raster."""
        if isinstance(prediction, list):
            prediction[:] = [self._run(j, trainer) if isinstance(j, GeoJob) else j for j in prediction]

    def _run(self, job: GeoJob, trainer: Any) -> dict[str, Any]:
        rank, world_size = trainer.global_rank, trainer.world_size
        options = dataclasses.replace(job.options, progress=self.progress and rank == 0)
        try:
            summary = run_raster(lambda: (self._predictor, self._described), job.input, options)
        except Exception as exc:  # one bad raster must not stop the others
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"samadapt predict: skipped {job.input}: {message}", file=sys.stderr, flush=True)
            self.failed.append(job.input)
            return {"input": job.input, "error": message, "rank": rank}
        summary.pop("records", None)  # the polygons' attributes hold them; keep the summary small
        summary.update(rank=rank, world_size=world_size, index=job.index)
        _write_json(Path(options.output).with_suffix(".json"), summary)
        self.written.append(job.input)
        return summary

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        failed = f", {len(self.failed)} failed" if self.failed else ""
        print(
            f"samadapt predict (rank {trainer.global_rank}/{trainer.world_size}): "
            f"{len(self.written)} raster(s) written{failed}",
            flush=True,
        )
