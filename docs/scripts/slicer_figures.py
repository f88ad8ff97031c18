"""Draw the two pictures of docs/slicer.md: the SamAdapt panel layout and the click -> region sequence.

Run from the repository root: ``.venv/bin/python docs/scripts/slicer_figures.py``. The panel is drawn from
the widget names and texts in ``slicer_extension/SamAdapt/Resources/UI/SamAdapt.ui`` (a diagram, not a
screenshot: Slicer does not run here).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch, Rectangle

OUT = Path(__file__).resolve().parents[1] / "img"

SECTIONS = [
    (
        "Server",
        [
            [("( ) Local (this computer)", "radio"), ("( ) Remote server", "radio")],
            [("Server URL: http://127.0.0.1:8765", "field")],
            [("Token: ********", "field")],
            [
                ("Install samadapt", "button"),
                ("Start local server", "button"),
                ("Stop", "button"),
                ("Connect", "button"),
            ],
            [("Status: Connected to http://127.0.0.1:50123 (tiny_vit)", "text")],
            [("> Advanced: server command, serve options", "text")],
        ],
    ),
    (
        "Inputs",
        [
            [("Volume: [CT chest]", "field")],
            [("Segment: [Segmentation] [liver]", "field")],
            [("Intensity: [auto]", "field")],
            [("Upload volume", "button"), ("Seed from segments", "button"), ("Close session", "button")],
        ],
    ),
    (
        "Prompts",
        [
            [("(o) Foreground (+)", "radio"), ("( ) Background (-)", "radio")],
            [("Place points", "button"), ("Draw box / ROI", "button"), ("Clear prompts", "button")],
            [("Slice view: [Auto]", "field")],
            [("[x] Segment on every click", "text"), ("Segment slice", "button")],
        ],
    ),
    (
        "Propagate and history",
        [
            [("Down", "button"), ("Both", "button"), ("Up", "button")],
            [("Undo (Ctrl+Z)", "button"), ("Redo (Ctrl+Y)", "button")],
        ],
    ),
]


def panel(path: Path) -> None:
    rows = sum(len(r) + 1 for _, r in SECTIONS) + 2
    height = rows * 0.42
    fig, ax = plt.subplots(figsize=(6.2, height))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, rows)
    ax.axis("off")
    y = rows - 0.2
    colours = {"button": "#dfe6ee", "field": "#ffffff", "radio": "#f6f6f6", "text": "#f6f6f6"}
    for title, lines in SECTIONS:
        y -= 0.9
        ax.add_patch(Rectangle((0.1, y), 9.8, 0.7, color="#3b4e6b"))
        ax.text(0.3, y + 0.35, "v " + title, color="white", va="center", fontsize=10, weight="bold")
        for line in lines:
            y -= 0.85
            width = 9.4 / len(line)
            for n, (text, kind) in enumerate(line):
                x = 0.3 + n * width
                ax.add_patch(
                    FancyBboxPatch(
                        (x + 0.05, y + 0.08),
                        width - 0.1,
                        0.6,
                        boxstyle="round,pad=0.02",
                        facecolor=colours[kind],
                        edgecolor="#8899aa" if kind != "text" else "none",
                    )
                )
                ax.text(x + 0.15, y + 0.38, text, va="center", fontsize=8)
    y -= 0.9
    ax.add_patch(Rectangle((0.3, y + 0.2), 9.4, 0.35, facecolor="#ffffff", edgecolor="#8899aa"))
    ax.add_patch(Rectangle((0.3, y + 0.2), 5.6, 0.35, facecolor="#5aa469"))
    ax.text(0.35, y - 0.25, "axial slice 17 (Red view): 1234 voxels changed", fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def sequence(path: Path) -> None:
    actors = ["User", "Slicer (SamAdapt)", "SamAdaptLib", "samadapt serve"]
    steps = [
        (0, 1, "click a point / draw a box in the Red view"),
        (1, 2, "markups RAS -> IJK (RASToIJK, parent transform)"),
        (2, 2, "axis from the view's SliceToRAS; slice k"),
        (2, 3, "POST /sessions/{id}/prompt {axis, slice_index, boxes, points}"),
        (3, 3, "slice embedding (cached) -> decoder -> mask"),
        (3, 2, "changed region {offset, shape, zlib+base64 data}"),
        (2, 1, "writer(label, extent, binary box [k, j, i])"),
        (1, 0, "segment updated inside the box only"),
        (0, 1, "Propagate / Ctrl+Z / Ctrl+Y"),
        (1, 3, "POST .../propagate | undo | redo  (progress: GET /sessions/{id})"),
        (3, 1, "changed region -> same write path"),
    ]
    fig, ax = plt.subplots(figsize=(9.5, 6.2))
    xs = [1.0, 3.6, 6.2, 8.8]
    top = len(steps) + 1.0
    ax.set_xlim(0, 10)
    ax.set_ylim(0, top + 0.8)
    ax.axis("off")
    for x, name in zip(xs, actors, strict=True):
        ax.add_patch(FancyBboxPatch((x - 0.9, top), 1.8, 0.6, boxstyle="round,pad=0.05", facecolor="#3b4e6b"))
        ax.text(x, top + 0.3, name, color="white", ha="center", va="center", fontsize=9, weight="bold")
        ax.plot([x, x], [0.3, top], color="#99a", lw=1, ls="--")
    for n, (a, b, text) in enumerate(steps):
        y = top - 0.7 - n
        if a == b:
            ax.annotate(
                "",
                xy=(xs[a] + 0.05, y - 0.25),
                xytext=(xs[a] + 0.05, y + 0.05),
                arrowprops={"arrowstyle": "->", "connectionstyle": "arc3,rad=-1.2", "color": "#555"},
            )
            ax.text(xs[a] + 0.35, y - 0.1, text, fontsize=8, va="center")
        else:
            ax.annotate(
                "",
                xy=(xs[b], y),
                xytext=(xs[a], y),
                arrowprops={"arrowstyle": "->", "color": "#2a6" if b < a else "#246", "lw": 1.4},
            )
            ax.text((xs[a] + xs[b]) / 2, y + 0.15, text, fontsize=8, ha="center")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    panel(OUT / "slicer_panel.png")
    sequence(OUT / "slicer_sequence.png")
    print("wrote", OUT / "slicer_panel.png", OUT / "slicer_sequence.png")
