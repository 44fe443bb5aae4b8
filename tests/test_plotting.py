"""Point labels on the board plot and the curves: crowded points get labels that do not overlap."""
from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from invbench.plotting import PointLabel, label_points  # noqa: E402


def _text_boxes(fig, annotations):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [Text.get_window_extent(a, renderer) for a in annotations]


def test_crowded_labels_do_not_overlap_and_stay_on_their_points():
    fig = Figure(figsize=(6, 4), dpi=110)
    ax = fig.add_subplot()
    points = [(0.952, 1.0), (0.984, 1.0), (0.996, 1.0), (0.956, 1.0), (0.3, 0.2), (0.31, 0.21)]
    ax.scatter(*zip(*points))
    ax.set(xlim=(0, 1.03), ylim=(-0.03, 1.08))
    annotations = label_points(ax, [PointLabel(x, y, f"defence number {i}") for i, (x, y) in enumerate(points)])

    boxes = _text_boxes(fig, annotations)
    assert len(boxes) == len(points)
    for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
        assert not a.overlaps(b), f"labels {i} and {j} overlap"
    assert sorted(a.xy for a in annotations) == sorted(points)
    inside = ax.get_window_extent()
    assert all(inside.x0 <= box.x0 and box.x1 <= inside.x1 for box in boxes)  # right-edge labels run leftwards


def test_a_lone_label_sits_next_to_its_point_without_a_leader_line():
    fig = Figure(figsize=(6, 4), dpi=110)
    ax = fig.add_subplot(xscale="log")
    ax.set(xlim=(1e-5, 1), ylim=(0, 1))
    (annotation,) = label_points(ax, [PointLabel(1e-3, 0.5, "sigma=0.01")])
    assert annotation.xyann == (5, 6) and annotation.arrow_patch is None


def test_a_curves_point_labels_name_only_what_differs_between_its_points():
    """On a DP curve every point has clip=3: its labels say the noise multiplier (and epsilon) alone."""
    from types import SimpleNamespace

    from invbench.curves import CurvePoint, _point_labels

    def point(z, eps, top1):
        return CurvePoint(params={"clip": 3.0, "noise_multiplier": z}, worst_case_exact_match=1.0,
                          worst_case_token_accuracy=1.0, top1_agreement=top1, kl_clean_defended=None, epsilon=eps,
                          noise_std=3.0 * z)

    curve = SimpleNamespace(points=[point(0.1, 284.0, 0.9), point(1.0, 10.0, 0.1)])
    labels = _point_labels(curve, "top1_agreement", "worst_case_exact_match", "red")
    assert [label.text for label in labels] == ["noise_multiplier=0.1 (eps 284)", "noise_multiplier=1 (eps 10)"]
    lone = SimpleNamespace(points=[point(0.1, 284.0, 0.9)])  # one point: nothing differs, all is said
    assert [label.text for label in _point_labels(lone, "top1_agreement", "worst_case_exact_match", "red")] == [
        "clip=3,noise_multiplier=0.1 (eps 284)"]
