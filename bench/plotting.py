"""Point labels that do not collide, for the board plot and the privacy-utility curves.

Benchmark points crowd: most defences leak everything, so their points sit together at exact match
1.0 near top-1 agreement 1.0. Each label is tried one text row after another (downwards near the top
of the axes, upwards elsewhere) to the right of its point, then the same on its left, until its
rendered box stays inside the axes and overlaps no label placed before it; a label moved off its
first row gets a leader line. Call it after the axes' scales and limits are final.
"""
from __future__ import annotations

from dataclasses import dataclass

ROW_POINTS = 9  # one text row, in points (fontsize 7 plus spacing)
MAX_ROWS = 12
NEAR_ROWS = 5  # where labels may be left off, one is placed at most this many rows from its point


def plain_text(text: str) -> str:
    """Text matplotlib draws as written: a `$` would start mathtext, and a name such as
    `$\\undefinedmacro{x}$` (a plug-in's, a curve's) made every later plot of its board fail."""
    return str(text).replace("$", r"\$")


@dataclass(frozen=True)
class PointLabel:
    x: float
    y: float
    text: str
    color: str | tuple = "black"


def label_points(ax, labels: list[PointLabel], *, drop_unplaced: bool = False) -> list:
    """Annotate each point of `labels` on `ax`, top and right first; returns the annotations. A label with
    no free place is drawn over the others, or, with `drop_unplaced`, left off (the board's table names
    every point; a stack of overlapping names names none)."""
    from matplotlib.text import Text

    renderer = _renderer(ax.figure)
    ax.autoscale_view()
    to_axes = ax.transData + ax.transAxes.inverted()

    placed = sorted(((*to_axes.transform((label.x, label.y)), label) for label in labels),
                    key=lambda p: (-p[1], -p[0]))  # axes fractions; top and right first
    tries = [(row, right) for right in (True, False) for row in range(MAX_ROWS)]  # right of the point first
    inside = ax.get_window_extent(renderer)
    boxes, annotations = [], []
    for _, fy, label in placed:
        down = fy > 0.85
        for row, right in tries:
            dy = -(12 + ROW_POINTS * row) if down else 6 + ROW_POINTS * row
            annotation = ax.annotate(
                label.text, (label.x, label.y), textcoords="offset points", xytext=(5 if right else -5, dy),
                fontsize=7, color=label.color, ha="left" if right else "right", va="center", parse_math=False,
                arrowprops=dict(arrowstyle="-", lw=0.4, color="0.6") if row else None)
            annotation.update_positions(renderer)
            box = Text.get_window_extent(annotation, renderer).padded(3)  # the text alone (not its leader line), a gap around it
            fits = (inside.x0 <= box.x0 and box.x1 <= inside.x1 and not any(box.overlaps(other) for other in boxes)
                    and (not drop_unplaced or (inside.y0 <= box.y0 and box.y1 <= inside.y1 and row < NEAR_ROWS)))
            if fits or (row, right) == tries[-1]:
                break
            annotation.remove()
        if not fits and drop_unplaced:
            annotation.remove()
            continue
        boxes.append(box)
        annotations.append(annotation)
    return annotations


def _renderer(figure):
    """The figure's renderer (figures made without pyplot get an Agg canvas first)."""
    if not hasattr(figure.canvas, "get_renderer"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        FigureCanvasAgg(figure)
    return figure.canvas.get_renderer()
