"""Where does a propagated object end? Per-slice signals and the rule that stops propagation.

Given only a 2D box, SAM nearly always finds *something* inside the box it is shown, so a mask that
is propagated until it vanishes runs on through neighbouring tissue after the object has ended. Each
propagated slice is therefore measured with signals the model already gives, against the slices
before it, and a :class:`StopRule` decides whether the object continues:

- ``score``: the decoder's predicted IoU of the mask; ``score_ratio``: that over the best score of
  the object so far in this direction (the prompted slice included);
- ``area``: mask pixels; ``area_ratio``: area over the previous slice's mask area;
- ``iou_prev``: IoU of the mask with the previous slice's mask (same pixel grid); ``inside_prev``:
  the fraction of the mask that lies inside the previous mask (an object tapering off shrinks
  inside its previous outline, a leak moves out of it);
- ``border``: fraction of the prompt box's edge pixels that the mask covers (a mask pressed against
  its box wants to grow past it: it is filling whatever the box contains);
- ``logit``: mean decoder logit over the mask's low-resolution pixels (its confidence margin).

The default (``auto``) rule: stop at the first slice whose score falls below 0.75 of the best so far,
or whose mask covers more than 10% of its box's edge, or overlaps the previous mask with IoU below
0.3 while less than 80% of it lies inside that mask. Its thresholds and the measurements they were
chosen on are in ``docs/medical.md`` ("Where propagation stops") and ``benchmarks/propagation_stop.py``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from samadapt.errors import InputError

STOP_MODES = ("auto", "vanish")
SIGNALS = ("score", "score_ratio", "area", "area_ratio", "iou_prev", "inside_prev", "border", "logit")

Box = tuple[float, float, float, float]


@dataclass
class SliceSignals:
    """What one visited slice looked like, and what the rule made of it.

    Attributes:
        slice_index: index along the propagation axis.
        direction: +1 or -1 for a propagated slice, 0 for the prompted slice.
        box: the (x0, y0, x1, y1) box the slice was prompted with (None: points only).
        score: predicted IoU.
        score_ratio: score over the best score so far in this direction, prompted slice included
            (None on the prompted slice).
        area: mask pixels.
        area_ratio: area over the previous kept slice's area (None on the prompted slice).
        iou_prev: IoU with the previous kept slice's mask (None on the prompted slice).
        inside_prev: fraction of the mask inside the previous kept slice's mask (None on the
            prompted slice or for an empty mask).
        border: fraction of the box's edge pixels covered by the mask (None without a box).
        logit: mean low-resolution logit over the mask (None when the mask is empty there).
        kept: the mask was kept (False: the slice where propagation stopped).
        reason: why propagation stopped here ("" when it went on).
    """

    slice_index: int
    direction: int
    box: Box | None
    score: float
    score_ratio: float | None
    area: int
    area_ratio: float | None
    iou_prev: float | None
    inside_prev: float | None
    border: float | None
    logit: float | None
    kept: bool = True
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able row: every signal (None where it does not apply), ``kept`` and ``reason``."""
        row = asdict(self)
        row["box"] = [round(float(v), 2) for v in self.box] if self.box is not None else None
        for name in SIGNALS:
            value = row[name]
            if name != "area":
                row[name] = None if value is None or not math.isfinite(value) else round(float(value), 4)
        return row


def box_border_fraction(mask: np.ndarray, box: Box, limit: Box | None = None) -> float:
    """Fraction of the pixels on a box's edges (its outermost rows and columns) that a mask covers.

    The box's corners are rounded outwards to whole pixels and clipped to the image. Edges that lie
    on the image's border or on ``limit`` (an ROI rectangle the box was clipped to) are left out: a
    mask cut there touches them whatever the object does.
    """
    height, width = mask.shape
    x0, y0 = max(math.floor(box[0]), 0), max(math.floor(box[1]), 0)
    x1, y1 = min(math.ceil(box[2]), width - 1), min(math.ceil(box[3]), height - 1)
    if x1 < x0 or y1 < y0:
        return 0.0
    lx0, ly0, lx1, ly1 = (0.0, 0.0, width - 1.0, height - 1.0)
    if limit is not None:
        lx0, ly0 = max(lx0, math.floor(limit[0])), max(ly0, math.floor(limit[1]))
        lx1, ly1 = min(lx1, math.ceil(limit[2])), min(ly1, math.ceil(limit[3]))
    edges = [
        (x0 > lx0, mask[y0 : y1 + 1, x0]),
        (x1 < lx1, mask[y0 : y1 + 1, x1]),
        (y0 > ly0, mask[y0, x0 : x1 + 1]),
        (y1 < ly1, mask[y1, x0 : x1 + 1]),
    ]
    counted = [edge for free, edge in edges if free]
    if not counted:
        return 0.0
    return float(sum(int(e.sum()) for e in counted) / sum(e.size for e in counted))


def measure(
    slice_index: int,
    direction: int,
    mask: np.ndarray,
    previous: np.ndarray | None,
    box: Box | None,
    score: float,
    low_res_logits: np.ndarray | None,
    best_score: float | None = None,
    limit: Box | None = None,
) -> SliceSignals:
    """The signals of one slice's mask.

    Args:
        slice_index: the slice. direction: +1/-1 when propagated, 0 for the prompted slice.
        mask: (rows, cols) bool mask of this slice.
        previous: the previous kept slice's (rows, cols) mask, None on the prompted slice.
        box: the box this slice was prompted with.
        score: the decoder's predicted IoU.
        low_res_logits: (h, w) decoder logits in the model's low-resolution frame.
        best_score: the best score so far in this direction (None: this is the first).
        limit: an ROI rectangle the box was clipped to (see :func:`box_border_fraction`).
    """
    area = int(mask.sum())
    area_ratio = iou_prev = inside_prev = None
    if previous is not None:
        before = int(previous.sum())
        overlap = int((mask & previous).sum())
        union = area + before - overlap
        area_ratio = area / before if before else math.inf
        iou_prev = overlap / union if union else 1.0
        inside_prev = overlap / area if area else None
    logit = None
    if low_res_logits is not None:
        inside = low_res_logits[low_res_logits > 0]
        logit = float(inside.mean()) if inside.size else None
    score_ratio = None
    if direction != 0:
        reference = max(best_score, score) if best_score is not None else score
        score_ratio = score / reference if reference > 0 else 1.0
    return SliceSignals(
        slice_index=slice_index,
        direction=direction,
        box=tuple(float(v) for v in box) if box is not None else None,  # type: ignore[arg-type]
        score=float(score),
        score_ratio=score_ratio,
        area=area,
        area_ratio=area_ratio,
        iou_prev=iou_prev,
        inside_prev=inside_prev,
        border=box_border_fraction(mask, box, limit) if box is not None else None,
        logit=logit,
    )


@dataclass(frozen=True)
class StopRule:
    """Decides, slice by slice, whether a propagated object continues.

    In ``vanish`` mode propagation runs until the mask is empty (LiteMedSAM's reference behaviour).
    In ``auto`` mode it also stops at the first slice whose mask breaks any of the limits below; that
    slice's mask is dropped. A limit set to None is not checked. The defaults are the ``auto`` rule.

    Attributes:
        mode: ``auto`` or ``vanish``.
        min_score_ratio: smallest score relative to the best score so far in this direction.
        max_border: largest fraction of the prompt box's edge covered by the mask.
        min_iou_prev: smallest IoU with the previous slice's mask ...
        min_inside_prev: ... unless at least this fraction of the mask lies inside the previous mask
            (a tapering object; None: the IoU limit alone).
        max_area_ratio: largest growth of the area over the previous slice's.
        min_score: smallest predicted IoU.
        min_logit: smallest mean logit inside the mask.
        max_slices: most slices propagated in each direction (None: no cap); applies in both modes.
    """

    mode: str = "auto"
    min_score_ratio: float | None = 0.75
    max_border: float | None = 0.1
    min_iou_prev: float | None = 0.3
    min_inside_prev: float | None = 0.8
    max_area_ratio: float | None = None
    min_score: float | None = None
    min_logit: float | None = None
    max_slices: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in STOP_MODES:
            raise InputError(f"unknown stop rule {self.mode!r}; choose from {', '.join(STOP_MODES)}")
        if self.max_slices is not None and self.max_slices < 0:
            raise InputError(f"--max-slices must be 0 or more, got {self.max_slices}")

    @classmethod
    def named(cls, mode: str, max_slices: int | None = None) -> StopRule:
        """The default rule of a mode (``auto`` or ``vanish``), with an optional slice cap."""
        return cls(mode=mode, max_slices=max_slices)

    def with_max_slices(self, max_slices: int | None) -> StopRule:
        return replace(self, max_slices=max_slices)

    def thresholds(self) -> dict[str, Any]:
        """The rule as a JSON-able dict (mode, limits, cap)."""
        return asdict(self)

    def reason(self, signals: SliceSignals) -> str:
        """Why the object ends at this slice ("" if it continues). The prompted slice never stops."""
        if signals.area == 0:
            return "vanished"
        if self.mode == "vanish" or signals.direction == 0:
            return ""
        s = signals
        if _below(s.score_ratio, self.min_score_ratio):
            return f"score_ratio {s.score_ratio:.4g} < {self.min_score_ratio:g}"
        if _above(s.border, self.max_border):
            return f"border {s.border:.4g} > {self.max_border:g}"
        if _below(s.iou_prev, self.min_iou_prev) and (
            self.min_inside_prev is None or _below(s.inside_prev, self.min_inside_prev)
        ):
            why = f"iou_prev {s.iou_prev:.4g} < {self.min_iou_prev:g}"
            if self.min_inside_prev is not None:
                why += f" and inside_prev {s.inside_prev:.4g} < {self.min_inside_prev:g}"
            return why
        if _above(s.area_ratio, self.max_area_ratio):
            return f"area_ratio {s.area_ratio:.4g} > {self.max_area_ratio:g}"
        if _below(s.score, self.min_score):
            return f"score {s.score:.4g} < {self.min_score:g}"
        if _below(s.logit, self.min_logit):
            return f"logit {s.logit:.4g} < {self.min_logit:g}"
        return ""


def _below(value: float | None, limit: float | None) -> bool:
    return value is not None and limit is not None and value < limit


def _above(value: float | None, limit: float | None) -> bool:
    return value is not None and limit is not None and value > limit


@dataclass
class PropagationReport:
    """Every slice one object's propagation visited, its signals, and why each direction ended.

    Attributes:
        axis: propagation axis.
        prompt_slice: the prompted slice.
        rule: the stop rule's settings (:meth:`StopRule.thresholds`).
        rows: one :class:`SliceSignals` per visited slice: the prompted slice first, then each
            direction in visiting order; a row with ``kept`` False is where the rule stopped.
        ends: direction (+1: towards higher slice indexes, -1: lower) -> why propagation ended that
            way: a stop reason, ``vanished``, ``roi edge``, ``volume edge`` or ``max-slices N``.
        label: the object's label value.
    """

    axis: str
    prompt_slice: int
    rule: dict[str, Any]
    rows: list[SliceSignals] = field(default_factory=list)
    ends: dict[int, str] = field(default_factory=dict)
    label: int = 1

    def kept_range(self) -> tuple[int, int] | None:
        """(first, last) kept slice index, None if nothing was kept."""
        kept = [r.slice_index for r in self.rows if r.kept and r.area > 0]
        return (min(kept), max(kept)) if kept else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: label, axis, prompted slice, rule, kept slice range, ends and rows."""
        kept = self.kept_range()
        return {
            "label": self.label,
            "axis": self.axis,
            "prompt_slice": self.prompt_slice,
            "rule": self.rule,
            "kept_slices": list(kept) if kept else None,
            "ends": {f"{d:+d}": why for d, why in sorted(self.ends.items(), reverse=True)},
            "slices": [r.to_dict() for r in self.rows],
        }

    def table(self) -> str:
        """A fixed-width table of the rows, one line per visited slice, then how each direction ended."""
        lines = [
            f"{'slice':>5} {'dir':>3} {'score':>6} {'s_ratio':>7} {'area':>7} {'a_ratio':>7} {'iou_prev':>8} "
            f"{'inside':>6} {'border':>6} {'logit':>6}  kept  reason"
        ]

        def num(value: float | None, width: int, digits: int) -> str:
            if value is None or not math.isfinite(value):
                return f"{'-':>{width}}"
            return f"{value:>{width}.{digits}f}"

        for r in self.rows:
            direction = {0: "0", 1: "+1", -1: "-1"}[r.direction]
            line = (
                f"{r.slice_index:>5} {direction:>3} {num(r.score, 6, 3)} {num(r.score_ratio, 7, 3)} "
                f"{r.area:>7} {num(r.area_ratio, 7, 2)} {num(r.iou_prev, 8, 3)} {num(r.inside_prev, 6, 3)} "
                f"{num(r.border, 6, 3)} {num(r.logit, 6, 2)}  {'yes' if r.kept else 'no':>4}  {r.reason}"
            )
            lines.append(line.rstrip())
        for d in (1, -1):
            if d in self.ends:
                lines.append(
                    f"direction {d:+d} ({'higher' if d > 0 else 'lower'} slices) ended: {self.ends[d]}"
                )
        return "\n".join(lines)
