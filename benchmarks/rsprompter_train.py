"""Short RsPrompter training on the solaris buildings; COCO mask AP on a held-out region of the raster.

Data: ``sample_geotiff.tif`` (900 x 900, 16-bit pan, 0.5 m, UTM 16N) with the 43 building polygons of
``geotiff_labels.geojson`` (solaris test data, copied in tests/data/geo), through
:class:`samadapt.domains.remote_sensing.instances.InstanceDataModule`: 256 px tiles (LiteMedSAM's native
input, no resizing), polygons rasterized tile by tile; the eastern ``--val-fraction`` of the columns is held
out (a region, never random pixels: no training tile sees a held-out pixel).

Model: the bundled LiteMedSAM (frozen image encoder) + an RsPrompter adapter (query and/or anchor) with the
recipes' settings, trained with AdamW for ``--steps`` (or ``--max-seconds``) on batches of 2 tiles. The frozen
encoder's outputs are computed once per tile and reused (no augmentation), which is what makes a CPU run
of a few minutes possible; training otherwise is exactly ``adapter.forward_encoded`` + ``adapter.loss``, the
same calls ``samadapt fit`` makes. Mask AP: torchmetrics ``MeanAveragePrecision(iou_type="segm")`` over the
held-out tiles, before training (random prompter) and after.

    .venv/bin/python benchmarks/rsprompter_train.py [--variants query anchor] [--steps 150]
        [--max-seconds 240] [--val-fraction 0.3] [--rois 8] [--detections 30] [--before] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from samadapt.adapters.rsprompter import RsPrompterQuery
from samadapt.adapters.rsprompter_anchor import RsPrompterAnchor
from samadapt.adapters.rsprompter_heads import layer_specs
from samadapt.adapters.rsprompter_matching import MaskAP
from samadapt.checkpoint import load_model
from samadapt.domains.remote_sensing.instances import InstanceDataModule, collate
from samadapt.modeling import EncoderOutput
from samadapt.weights import verified_default_checkpoint

REPO = Path(__file__).resolve().parents[1]
GEO = REPO / "tests" / "data" / "geo"


def encode_all(model, dataset, batch_size: int = 4) -> list[EncoderOutput]:
    """The frozen encoder's output of every tile, one EncoderOutput (batch of 1) per tile."""
    out: list[EncoderOutput] = []
    with torch.no_grad():
        for first in range(0, len(dataset), batch_size):
            images = torch.stack(
                [dataset[i]["image"] for i in range(first, min(first + batch_size, len(dataset)))]
            )
            encoded = model.encode(images)
            for row in range(images.shape[0]):
                out.append(encoded.select(torch.tensor([row])))
    return out


def stack(encoded: list[EncoderOutput]) -> EncoderOutput:
    return EncoderOutput(
        torch.cat([e.embedding for e in encoded]),
        [torch.cat([e.features[k] for e in encoded]) for k in range(len(encoded[0].features))],
    )


def mask_ap(adapter, model, dataset, encoded: list[EncoderOutput]) -> dict[str, float]:
    adapter.eval()
    model.eval()
    metric = MaskAP()
    with torch.no_grad():
        for i in range(len(dataset)):
            sample = dataset[i]
            preds = adapter._predict(model, encoded[i], sample["image"].shape[-1])
            metric.update(preds, [{"masks": sample["instances"] > 0.5, "labels": sample["instance_classes"]}])
    return {k: round(float(v), 4) for k, v in metric.compute().items()}


def run(variant: str, args: argparse.Namespace, model_path: Path, data: InstanceDataModule, caches) -> dict:
    torch.manual_seed(args.seed)
    model = load_model(model_path)
    if variant == "query":
        adapter = RsPrompterQuery(num_queries=args.queries, score_threshold=0.0)
        lr = args.lr_query
    else:
        adapter = RsPrompterAnchor(
            score_threshold=0.05, rois_per_image=args.rois, max_detections=args.detections
        )
        lr = args.lr_anchor
    adapter.attach(model)
    adapter.freeze_base(model)
    counts = adapter.parameter_counts(model)
    train_set, val_set = data.train_set, data.val_set
    train_cache, val_cache = caches
    before = mask_ap(adapter, model, val_set, val_cache) if args.before else None
    params = [p for p in adapter.trainable_parameters(model).values()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    rng = np.random.default_rng(args.seed)
    started, losses, steps = time.perf_counter(), [], 0
    while steps < args.steps and time.perf_counter() - started < args.max_seconds:
        model.train()
        adapter.train()
        picks = rng.choice(len(train_set), size=min(2, len(train_set)), replace=False)
        batch = collate([train_set[int(i)] for i in picks])
        encoded = stack([train_cache[int(i)] for i in picks])
        terms = adapter.loss(*adapter.forward_encoded(model, encoded, batch))
        optimizer.zero_grad()
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(terms["loss"].detach()))
        steps += 1
    seconds = time.perf_counter() - started
    after = mask_ap(adapter, model, val_set, val_cache)
    return {
        "variant": variant,
        "trainable": counts["trainable"],
        "adapter_parameters": counts["adapter"],
        "steps": steps,
        "train_seconds": round(seconds, 1),
        "lr": lr,
        "loss_first10": round(float(np.mean(losses[:10])), 4) if losses else None,
        "loss_last10": round(float(np.mean(losses[-10:])), 4) if losses else None,
        "mask_ap_before": before,
        "mask_ap_after": after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["query", "anchor"], choices=["query", "anchor"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--max-seconds", type=float, default=240.0, help="training time limit per variant")
    parser.add_argument("--val-fraction", type=float, default=0.3)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--lr-query", type=float, default=3e-4)
    parser.add_argument("--lr-anchor", type=float, default=3e-4)
    parser.add_argument("--rois", type=int, default=8, help="anchor: training RoIs per tile")
    parser.add_argument("--detections", type=int, default=30, help="anchor: detections per tile")
    parser.add_argument("--before", action="store_true", help="also measure AP before training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model_path = verified_default_checkpoint()
    model = load_model(model_path)
    model.require_features(
        [spec.index for spec in layer_specs(model.image_encoder, None)]
    )  # the adapters' layers
    data = InstanceDataModule(
        image=str(GEO / "sample_geotiff.tif"), vectors=str(GEO / "geotiff_labels.geojson"), tile=256,
        overlap=64, val_fraction=args.val_fraction, min_area=16, max_instances=args.queries, augment=False,
    )  # fmt: skip
    data.profile = model.profile
    data.setup()
    assert data.train_set is not None and data.val_set is not None
    t0 = time.perf_counter()
    caches = (encode_all(model, data.train_set), encode_all(model, data.val_set))
    report = {
        "data": "solaris sample_geotiff.tif + geotiff_labels.geojson (43 buildings), 256 px tiles",
        "split": f"eastern {args.val_fraction:.0%} of the columns held out",
        "train_tiles": len(data.train_set),
        "val_tiles": len(data.val_set),
        "train_objects": sum(len(t.classes) for t in data.train_set.tiles),
        "val_objects": sum(len(t.classes) for t in data.val_set.tiles),
        "encode_seconds": round(time.perf_counter() - t0, 1),
        "torch_threads": torch.get_num_threads(),
        "runs": [],
    }
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}), flush=True)
    for variant in args.variants:
        result = run(variant, args, model_path, data, caches)
        report["runs"].append(result)
        print(json.dumps(result), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
