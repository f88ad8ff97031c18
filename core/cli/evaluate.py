"""``samadapt evaluate``: Dice, NSD and HD95 per label, for one pair of files or two folders.

Two folders are paired file by file by name (:mod:`samadapt.domains.evaluation`); a case that cannot be
compared (label grid mismatch, unreadable file) is reported on one line and skipped, and the exit
status is then 1.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from samadapt.errors import InputError, SamadaptError

_CSV_COLUMNS = (
    "case", "prediction", "ground_truth", "label", "name", "dice", "nsd", "hd95", "pred_voxels", "gt_voxels",
    "cases",
)  # fmt: skip


def register(sub: Any) -> None:
    """Add the ``evaluate`` parser to the sub-parsers ``sub``."""
    ev = sub.add_parser(
        "evaluate", help="Dice, NSD and HD95 per label between two label volumes or masks, or two folders"
    )
    ev.add_argument("prediction", help="label volume or 2D mask, or a folder of them")
    ev.add_argument(
        "ground_truth", help="label volume or 2D mask, or a folder paired with PREDICTION by name"
    )
    ev.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    ev.add_argument("--labels", type=int, nargs="*", help="only these label values")
    ev.add_argument("--json", help="also write the table as JSON")
    ev.add_argument("--csv", help="also write the table as CSV (per case and label, then the means)")


def _write_text(path: str, text: str) -> None:
    from samadapt.domains.images import atomic_write

    def write(tmp: Path) -> None:
        tmp.write_text(text)

    atomic_write(path, write)


def _check_output(path: str | None, suffix: str, flag: str) -> None:
    if path is None:
        return
    if not path.lower().endswith(suffix):
        raise InputError(f"{flag} output must end in {suffix}: {path}")
    if not Path(path).parent.exists():
        raise InputError(f"output folder does not exist: {Path(path).parent}")


def _number(value: Any) -> str:
    return "" if value is None else str(value)


def _csv_text(cases: list[tuple[str, str, str, list[dict[str, Any]]]], means: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_CSV_COLUMNS)
    for case, pred, truth, rows in cases:
        for r in rows:
            writer.writerow(
                [case, pred, truth, r["label"], r["name"] or "", r["dice"], r["nsd"], r["hd95"],
                 r["pred_voxels"], r["gt_voxels"], ""]
            )  # fmt: skip
    for m in means:
        writer.writerow(["mean", "", "", m["label"], m["name"] or "", m["dice"], m["nsd"], m["hd95"], "", "",
                         m["cases"]])  # fmt: skip
    return buffer.getvalue()


def _print_table(
    cases: list[tuple[str, str, str, list[dict[str, Any]]]], tolerance: float, width: int
) -> None:
    print(
        f"{'case':<{width}} {'label':>6} {'name':<24} {'Dice':>7} {f'NSD@{tolerance:g}mm':>10} "
        f"{'HD95 mm':>9} {'pred vox':>9} {'gt vox':>9}"
    )
    for case, _, _, rows in cases:
        for row in rows:
            print(
                f"{case:<{width}} {row['label']!s:>6} {row['name'] or ''!s:<24} {row['dice']:>7.4f} "
                f"{row['nsd']:>10.4f} {row['hd95']:>9.2f} {_number(row.get('pred_voxels')):>9} "
                f"{_number(row.get('gt_voxels')):>9}"
            )


def _run_pair(args: argparse.Namespace) -> int:
    from samadapt.domains.evaluation import evaluate_pair, mean_rows

    rows, notes = evaluate_pair(args.prediction, args.ground_truth, args.tolerance, args.labels or None)
    for note in notes:
        print(f"note: {note}")
    table = [("", args.prediction, args.ground_truth, rows)]
    print(
        f"{'label':>6} {'name':<24} {'Dice':>7} {f'NSD@{args.tolerance:g}mm':>10} {'HD95 mm':>9} "
        f"{'pred vox':>9} {'gt vox':>9}"
    )
    for row in rows:
        print(
            f"{row['label']:>6} {row['name'] or ''!s:<24} {row['dice']:>7.4f} {row['nsd']:>10.4f} "
            f"{row['hd95']:>9.2f} {row['pred_voxels']:>9} {row['gt_voxels']:>9}"
        )
    if args.json:
        _write_text(args.json, json.dumps(rows, indent=2, default=float))
    if args.csv:
        _write_text(args.csv, _csv_text(table, mean_rows(rows)))
    return 0


def _run_folders(args: argparse.Namespace) -> int:
    from samadapt.domains.evaluation import evaluate_pair, mean_rows, pair_folders

    pairing = pair_folders(args.prediction, args.ground_truth)
    problems = 0
    for folder, name, paths in pairing.ambiguous:
        problems += 1
        files = ", ".join(p.name for p in paths)
        print(f"samadapt evaluate: case {name} skipped: ambiguous in {folder} ({files})", file=sys.stderr)
    for path in pairing.unpaired_predictions:
        print(
            f"samadapt evaluate: unpaired prediction {path.name} (no ground truth of that name)",
            file=sys.stderr,
        )
    for path in pairing.unpaired_truths:
        print(
            f"samadapt evaluate: unpaired ground truth {path.name} (no prediction of that name)",
            file=sys.stderr,
        )
    if not pairing.pairs:
        raise InputError(f"no file in {args.prediction} pairs by name with a file in {args.ground_truth}")
    cases: list[tuple[str, str, str, list[dict[str, Any]]]] = []
    for name, pred, truth in pairing.pairs:
        try:
            rows, notes = evaluate_pair(pred, truth, args.tolerance, args.labels or None)
        except SamadaptError as exc:
            problems += 1
            print(f"samadapt evaluate: case {name} skipped: {exc}", file=sys.stderr)
            continue
        for note in notes:
            print(f"note: {name}: {note}")
        cases.append((name, str(pred), str(truth), rows))
    means = mean_rows([row for _, _, _, rows in cases for row in rows])
    width = max([len("mean"), *(len(c[0]) for c in cases)])
    _print_table([*cases, ("mean", "", "", means)], args.tolerance, width)
    print(
        f"{len(cases)} case(s) evaluated, {problems} skipped, {len(pairing.unpaired_predictions)} unpaired "
        f"prediction(s), {len(pairing.unpaired_truths)} unpaired ground truth(s)"
    )
    if args.json:
        report = {
            "cases": [{"case": c, "prediction": p, "ground_truth": t, "labels": r} for c, p, t, r in cases],
            "mean": means,
            "unpaired_predictions": [p.name for p in pairing.unpaired_predictions],
            "unpaired_ground_truths": [p.name for p in pairing.unpaired_truths],
        }
        _write_text(args.json, json.dumps(report, indent=2, default=float))
    if args.csv:
        _write_text(args.csv, _csv_text(cases, means))
    return 1 if problems else 0


def run(args: argparse.Namespace) -> int:
    """Dice, NSD and HD95 per label: two files on the same grid, or two folders paired by name."""
    if args.tolerance < 0:
        raise InputError("--tolerance must be >= 0 mm")
    _check_output(args.json, ".json", "--json")
    _check_output(args.csv, ".csv", "--csv")
    pred, truth = Path(args.prediction), Path(args.ground_truth)
    for path in (pred, truth):
        if not path.exists():
            raise InputError(f"file not found: {path}")
    if pred.is_dir() and truth.is_dir():
        return _run_folders(args)
    return _run_pair(args)
