"""Privacy-utility curves: one point per grid point of a sweep, stored as JSON and plotted.

A curve file lives at `leaderboards/<protocol>/curves/<defense>-<date>-<hash>.json`. It is read
as data only (JSON, then checked against the committed JSON Schema `bench/schemas/curve.schema.json`):
a malformed file is reported by file and field in one line, never half-plotted.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

from jsonschema import Draft202012Validator

from .errors import InvbenchError, one_line
from .metrics import finite_or_none, json_safe
from .plotting import PointLabel, label_points, plain_text
from .scoring import latest_records
from .uncertainty import Intervals, intervals_of
from .results import write_json_atomic
from .schema_check import Failure, failures, format_checker, load_schema, read_json_file

FORMAT = "invbench-curve/1"
MAX_CURVE_BYTES = 4_000_000  # a curve is a few KB per grid point


class CurveError(InvbenchError, ValueError):
    """A curve file is missing or malformed, or there is nothing to plot; one line."""


@dataclass
class CurvePoint:
    """One grid point: the defence parameters, the worst case over attacks, and the defence's cost."""

    params: dict[str, Any]
    worst_case_exact_match: float
    worst_case_token_accuracy: float
    top1_agreement: float | None
    kl_clean_defended: float | None
    epsilon: float | None
    # Provenance and extras; optional when reading.
    worst_case_exact_match_attack: str | None = None
    worst_case_token_accuracy_attack: str | None = None
    epsilon_per_prompt: float | None = None
    perplexity_ratio: float | None = None
    cosine: float | None = None
    config_hash: str | None = None
    run_dir: str | None = None
    verdict: str | None = None  # leaks | protected | inconclusive (None: not measured)
    noise_std: float | None = None  # the defence's noise per coordinate, where it adds noise
    sigma_certified: float | None = None  # below this noise std nothing protects the prompts (radius)
    radius_scope: str | None = None  # which positions the radius covers
    # 95% intervals over the prompts (invbench.uncertainty), [low, high]; None where not measured
    worst_case_token_accuracy_interval: list[float] | None = None
    worst_case_exact_match_interval: list[float] | None = None
    top1_agreement_interval: list[float] | None = None

    @classmethod
    def from_summary(cls, params: dict[str, Any], summary, run_dir: str,
                     intervals: Intervals | None = None) -> "CurvePoint":
        """A point from a run's RunSummary (runner.run's return value), with the 95% intervals of its
        prompts where given (`run_intervals`, `Entry.intervals`)."""
        intervals = intervals or Intervals(None, None, None)
        worst, utility, defense = summary.worst_case, summary.utility, summary.defense
        noise = defense.get("derived", {}).get("noise_std", defense["params"].get("sigma"))
        return cls(params=dict(params),
                   worst_case_exact_match=worst["exact_match"].value,
                   worst_case_token_accuracy=worst["token_accuracy"].value,
                   top1_agreement=utility.get("top1_agreement"),
                   kl_clean_defended=utility.get("kl_clean_defended"),
                   epsilon=finite_or_none(defense.get("epsilon")),  # inf: no guarantee, as in the files
                   worst_case_exact_match_attack=worst["exact_match"].attack,
                   worst_case_token_accuracy_attack=worst["token_accuracy"].attack,
                   epsilon_per_prompt=finite_or_none(defense.get("epsilon_per_prompt")),
                   perplexity_ratio=finite_or_none(utility.get("perplexity_ratio")),
                   cosine=utility.get("cosine"),
                   config_hash=summary.config_hash,
                   run_dir=run_dir,
                   verdict=summary.verdict.verdict if summary.verdict else None,
                   noise_std=float(noise) if isinstance(noise, (int, float)) else None,
                   sigma_certified=summary.radius["min_sigma_certified"] if summary.radius else None,
                   radius_scope=summary.radius["scope"] if summary.radius else None,
                   worst_case_token_accuracy_interval=_pair(intervals.worst_token_accuracy),
                   worst_case_exact_match_interval=_pair(intervals.worst_exact_match),
                   top1_agreement_interval=_pair(intervals.top1_agreement))

    def label(self, *, leave_out: set[str] = frozenset()) -> str:
        """The point's parameters, `k=v` joined by commas, but those in `leave_out`."""
        return ",".join(f"{k}={format_value(v)}" for k, v in self.params.items() if k not in leave_out)


def _pair(interval: tuple[float, float] | None) -> list[float] | None:
    return list(interval) if interval is not None else None


def run_intervals(records: list[dict], summary) -> Intervals:
    """The 95% intervals of a finished run, from its records (the last of each prompt and attack, as the
    summary takes them) and its per-prompt utility."""
    latest = latest_records(records, attacks=list(summary.attacks), prompt_indices={r["prompt_index"] for r in records})
    per_prompt = summary.utility.get("per_prompt")
    return intervals_of(token_accuracy={a: [r["token_accuracy"] for r in rs] for a, rs in latest.items()},
                        exact={a: [r["exact_match"] for r in rs] for a, rs in latest.items()},
                        worst_exact_attack=summary.worst_case["exact_match"].attack,
                        top1=[p["top1_agreement"] for p in per_prompt] if per_prompt else None)


@dataclass
class Curve:
    protocol: str
    defense: str  # the defence's registered name
    points: list[CurvePoint]
    grid: dict[str, list[Any]] = field(default_factory=dict)
    defense_spec: str | None = None  # as given (a name or path/to/file.py:Class)
    protocol_settings: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    format: str = FORMAT
    source: str | None = field(default=None, compare=False)  # the file it was read from; not stored

    @property
    def date(self) -> str:
        return self.created[:10]

    @property
    def digest(self) -> str:
        """Short hash of what the curve measured: protocol, defence and each point's run config."""
        blob = json.dumps([self.protocol, self.defense_spec or self.defense,
                           [(p.params, p.config_hash) for p in self.points]], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]

    @property
    def file_name(self) -> str:
        return f"{slug(self.defense)}-{self.date}-{self.digest}.json"

    def to_dict(self) -> dict[str, Any]:
        """What the file holds: who and when first, the points last."""
        data = json_safe(asdict(self))  # JSON has no inf: a destroyed model's perplexity ratio is stored as null
        head = ("format", "protocol", "defense", "defense_spec", "created", "versions", "protocol_settings", "grid")
        return {**{k: data[k] for k in head}, "date": self.date, "points": data["points"]}


def format_value(value: Any) -> str:
    """Short, lossless text for a parameter value: 1.0 -> '1', 0.001 -> '0.001', 0.123456789 kept."""
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def slug(text: str) -> str:
    """A file-name-safe slug (`[a-z0-9-]`) of a defence name."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "defense"


def grid_of(params: Iterable[dict[str, Any]]) -> dict[str, list[Any]]:
    """Each parameter's distinct values over the points, in the points' order; keys sorted."""
    grid: dict[str, list[Any]] = {}
    for point in params:
        for key, value in point.items():
            if value not in grid.setdefault(key, []):
                grid[key].append(value)
    return dict(sorted(grid.items()))


def params_order(params: dict[str, Any]) -> tuple:
    """Sort key of a point's parameters: by name, numbers by value (sigma 3 before 10), other values
    by their text after every number."""
    def value(v: Any) -> tuple:
        return (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, str(v))
    return tuple((key, value(v)) for key, v in sorted(params.items()))


def curve_from_entries(entries: list, defense: str) -> Curve:
    """A defence's curve from a board's entries (`entries.Entry`): one point per entry of that
    defence, from the run summary the entry carries. A board's curves can so be redrawn from the
    committed entries alone, without the run folders a sweep reads (which are not committed)."""
    mine = [e for e in entries if e.summary.defense["name"] == defense]
    if not mine:
        raise CurveError(f"no entry of defence {defense!r} on this board")
    mine.sort(key=lambda e: params_order(e.summary.defense["params"]))
    points = [CurvePoint.from_summary(e.summary.defense["params"], e.summary, str(e.path), e.intervals) for e in mine]
    first = mine[0]
    return Curve(protocol=first.meta["protocol"]["name"], defense=defense, defense_spec=first.defense_spec,
                 grid=grid_of(p.params for p in points), points=points, protocol_settings=first.meta["protocol"], versions=first.summary.versions)


# --- store ---------------------------------------------------------------------------------
def curves_dir(protocol_dir: Path) -> Path:
    return Path(protocol_dir) / "curves"


def save_curve(curve: Curve, board_dir: Path) -> Path:
    """Write the curve under `board_dir/<protocol>/curves/` (atomically) and return its path. A curve
    stored before, on another day, with the same content but its date is not written again: redrawing
    a board whose entries did not change returns the stored file."""
    directory = curves_dir(Path(board_dir) / curve.protocol)
    twin = stored_twin(curve, directory)
    if twin is not None:
        return twin
    path = directory / curve.file_name
    write_json_atomic(path, curve.to_dict())
    return path


def stored_twin(curve: Curve, directory: Path) -> Path | None:
    """The stored curve file of the same digest whose content equals `curve`'s but for its date."""
    def undated(data: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in data.items() if k not in ("created", "date")}

    wanted = undated(json.loads(json.dumps(curve.to_dict())))
    for path in sorted(directory.glob(f"{slug(curve.defense)}-*-{curve.digest}.json")):
        try:
            if undated(read_json_file(path, max_bytes=MAX_CURVE_BYTES)) == wanted:
                return path
        except (OSError, ValueError):
            continue  # unreadable: not a twin (load_curve names the problem when the board reads it)
    return None


def load_curve(path: Path) -> Curve:
    """Read and validate one curve file; CurveError names the file and the bad field."""
    path = Path(path)
    try:
        data = read_json_file(path, max_bytes=MAX_CURVE_BYTES)
    except OSError as exc:
        raise CurveError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise CurveError(f"{path}: not valid JSON ({one_line(exc, limit=200)})") from None
    found = failures(_validator(), data)
    if found:
        raise CurveError(f"{path}: field {found[0].field!r} {_problem(found[0])}")
    return _curve(data, source=str(path))


def load_curves(protocol_dir: Path, *, warn: Callable[[str], None] = print) -> list[Curve]:
    """Every valid curve of a protocol, oldest first; malformed files are reported and skipped."""
    curves = []
    for path in sorted(curves_dir(protocol_dir).glob("*.json")):
        try:
            curves.append(load_curve(path))
        except CurveError as exc:
            warn(f"skipped {exc}")
    return sorted(curves, key=lambda c: c.created)


def latest_curves(curves: list[Curve]) -> dict[str, Curve]:
    """The newest curve of each defence."""
    return {c.defense: c for c in sorted(curves, key=lambda c: c.created)}


# --- validation (data only: no code runs from a curve file) -----------------------------------
# `bench/schemas/curve.schema.json` defines the file; the first field that does not fit is reported.

@lru_cache(maxsize=None)
def _validator() -> Draft202012Validator:
    return Draft202012Validator(load_schema("curve"), format_checker=format_checker())


def _problem(failure: Failure) -> str:
    """A schema failure in words: "must be a number in [0, 1], got 1.5"."""
    if failure.kind == "missing":
        return "is missing"
    return f"must be {failure.expected}, got {json.dumps(failure.value)[:40]}"


def _curve(data: dict[str, Any], *, source: str) -> Curve:
    """A curve from data that fits the schema; keys the dataclasses do not know are left out."""
    point_fields = {f.name for f in dataclasses.fields(CurvePoint)}
    points = [CurvePoint(**{k: v for k, v in point.items() if k in point_fields}) for point in data["points"]]
    return Curve(protocol=data["protocol"], defense=data["defense"], points=points, grid=data.get("grid") or {},
                 defense_spec=data.get("defense_spec"), protocol_settings=data.get("protocol_settings") or {},
                 versions=data["versions"], created=data["created"], source=source)


# --- plots --------------------------------------------------------------------------------
PLOT_SUFFIX = ".png"


def check_plot_path(path: Path) -> Path:
    """The file a plot goes to: a named .png (CurveError otherwise, before anything is read or created)."""
    path = Path(path)
    if path.suffix.lower() != PLOT_SUFFIX or not path.stem:
        raise CurveError(f"--out {str(path)!r}: a plot is written as PNG; name a .png file (e.g. curves.png)")
    return path


# The privacy metrics, one row of panels each: token accuracy (what the board ranks by) above exact match.
PRIVACY = (("worst_case_token_accuracy", "worst-case token accuracy", "--", "s"),
           ("worst_case_exact_match", "worst-case exact match", "-", "o"))


def plot_curves(curves: list[Curve], path: Path, *, title: str | None = None,
                labels: list[str] | None = None, faded: set[int] = frozenset()) -> Path:
    """Write `curve_figure` to `path` (PNG)."""
    import matplotlib.pyplot as plt

    path = check_plot_path(path)
    fig = curve_figure(curves, title=title, labels=labels, faded=faded)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curve_figure(curves: list[Curve], *, title: str | None = None, labels: list[str] | None = None,
                 faded: set[int] = frozenset()):
    """Privacy against utility, one row of panels per privacy metric (`PRIVACY`: worst-case token
    accuracy, then worst-case exact match): against top-1 agreement on the left, KL(clean || defended)
    in the middle, and, where the defences add noise, against the noise std with the certified radius
    as a marked line ("below this sigma, Gaussian noise cannot protect these prompts"). One colour per
    curve; points whose verdict is inconclusive (the attacks' misses are search failures) are drawn
    hollow. `faded` curves (by index) are drawn thin and translucent (earlier curves in a comparison).
    Returns the matplotlib figure (pyplot's: close it)."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on servers or CI
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if not curves:
        raise CurveError("no curves to plot")
    labels = labels or [c.defense for c in curves]
    noisy = any(p.noise_std for c in curves for p in c.points)
    x_keys = ("top1_agreement", "kl_clean_defended", *(("noise_std",) if noisy else ()))
    fig, grid = plt.subplots(len(PRIVACY), len(x_keys), figsize=(17 if noisy else 12, 9.6), sharey=True,
                             sharex="col", layout="constrained", squeeze=False)
    colours = plt.get_cmap("tab10")
    for i, curve in enumerate(curves):
        style = {"color": colours(i % 10), "alpha": 0.45 if i in faded else 1.0, "lw": 1.0 if i in faded else 2.0}
        for row, metric in zip(grid, PRIVACY):
            for ax, x_key in zip(row, x_keys):
                _draw(ax, curve, x_key, metric, style)
    for row, (_, words, _, _) in zip(grid, PRIVACY):
        row[0].set_ylabel(f"privacy leak: {words}\nover attacks (lower is more private)")
        row[0].set_title(f"{words} against top-1 agreement", fontsize=10)
        row[1].set_title(f"{words} against KL", fontsize=10)
        if noisy:
            row[2].set_title(f"{words} against the noise std", fontsize=10)
            _certified_radius(row[2], curves)
        for ax in row:
            ax.grid(True, alpha=0.3)
    grid[-1][0].set_xlabel("utility: top-1 agreement with the clean model (higher is better)")
    grid[-1][1].set_xlabel("cost: KL(clean || defended), nats (lower is better)")
    _kl_scale(grid[0][1], curves)  # the columns share their x axis
    if noisy:
        _noise_scale(grid[-1][2])
    grid[0][0].set_ylim(-0.03, 1.08)  # room above 1.0 for the labels of fully leaking points
    handles = [Line2D([], [], color=colours(i % 10), lw=2, alpha=0.45 if i in faded else 1.0, label=plain_text(label))
               for i, label in enumerate(labels)]
    for metric_name, ls, marker in ((words, ls, marker) for _, words, ls, marker in PRIVACY):
        handles.append(Line2D([], [], color="grey", ls=ls, marker=marker, label=f"{metric_name} ({ls} line)"))
    handles.append(Line2D([], [], color="grey", ls="", marker="|", markersize=10,
                          label="bars: 95% interval over the prompts"))
    if any(p.verdict == "inconclusive" for c in curves for p in c.points):
        handles.append(Line2D([], [], color="grey", ls="", marker="o", markerfacecolor="white",
                              label="inconclusive: misses are search failures"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)), fontsize=8)
    fig.suptitle(plain_text(title or _default_title(curves)))
    shown = [(curve, colours(i % 10)) for i, curve in enumerate(curves) if i not in faded]
    fig.canvas.draw()  # the constrained layout first: label placement measures the rendered labels
    for row, (metric, *_) in zip(grid, PRIVACY):
        for ax, x_key in zip(row[:2], x_keys[:2]):
            label_points(ax, [label for curve, colour in shown for label in _point_labels(curve, x_key, metric, colour)],
                         drop_unplaced=True)  # a stack of overlapping names names none; the curve files list every point
    return fig


def _draw(ax, curve: Curve, x_key: str, metric: tuple, style: dict) -> None:
    """One privacy metric of one curve against one utility metric. The line runs along x (ties by y),
    so a grid over several parameters still draws as a curve, not a zig-zag. Inconclusive points are
    hollow."""
    key, _, ls, marker = metric
    xy = sorted((getattr(p, x_key), getattr(p, key), p.verdict == "inconclusive") for p in _plotted(curve, x_key))
    ax.plot([x for x, _, _ in xy], [y for _, y, _ in xy], ls=ls, marker=marker, **style)
    _error_bars(ax, curve, x_key, key, style)
    hollow = [(x, y) for x, y, inconclusive in xy if inconclusive]
    if hollow:
        ax.plot(*zip(*hollow), ls="", marker=marker, markersize=8, markerfacecolor="white",
                markeredgecolor=style["color"], zorder=3)
    ax.margins(x=0.08)  # room for the labels of the outermost points


def _error_bars(ax, curve: Curve, x_key: str, y_key: str, style: dict) -> None:
    """The 95% intervals over the prompts: vertical for the privacy metric, horizontal for top-1 agreement."""
    for p in _plotted(curve, x_key):
        y_interval = getattr(p, f"{y_key}_interval")
        x_interval = getattr(p, f"{x_key}_interval", None)
        x, y = getattr(p, x_key), getattr(p, y_key)
        if y_interval is None and x_interval is None:
            continue
        def spread(value: float, interval: list[float] | None) -> list[list[float]] | None:
            return [[max(value - interval[0], 0.0)], [max(interval[1] - value, 0.0)]] if interval else None

        ax.errorbar([x], [y], yerr=spread(y, y_interval), xerr=spread(x, x_interval), fmt="none",
                    ecolor=style["color"], alpha=0.5 * style["alpha"], elinewidth=1, capsize=2, zorder=1)


def _plotted(curve: Curve, x_key: str) -> list:
    """The points that have a value on this axis (the noise axis is log: noise-free points are left out)."""
    return [p for p in curve.points if getattr(p, x_key) is not None and (x_key != "noise_std" or p.noise_std > 0)]


def _point_labels(curve: Curve, x_key: str, y_key: str, colour) -> list[PointLabel]:
    """One label per spot: grid points that land together share it. A label names only the parameters that
    differ between the curve's points (`clip=3` or `dim=576` on every point of a curve says nothing there)."""
    shared = _shared_params(curve.points)
    spots: dict[tuple[float, float], list[str]] = {}
    for p in _plotted(curve, x_key):
        eps = f" (eps {p.epsilon:.3g})" if p.epsilon is not None else ""
        spots.setdefault((getattr(p, x_key), getattr(p, y_key)), []).append((p.label(leave_out=shared) or p.label()) + eps)
    return [PointLabel(x, y, "; ".join(names), colour) for (x, y), names in spots.items()]


def _shared_params(points: list) -> set[str]:
    """The parameters every point of a curve of two or more points gives the same value."""
    if len(points) < 2:
        return set()
    first = points[0].params
    return {k for k, v in first.items() if all(k in p.params and p.params[k] == v for p in points[1:])}


def _noise_scale(ax) -> None:
    """The noise column's axis: log scale (the panels of a column share it)."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor tick labels (3x10^-3, 4x10^-3, ...) collide
    ax.set_xlabel("defence noise std per coordinate (sigma), log scale")


def _certified_radius(ax, curves: list[Curve]) -> None:
    """The certified radius on a noise panel: below it, nearest-state decoding provably recovers
    every prompt."""
    certified = [(p.sigma_certified, p.radius_scope) for c in curves for p in c.points if p.sigma_certified]
    if certified:
        sigma, scope = min(certified)
        ax.axvline(sigma, color="black", ls=":", lw=1.5, label="certified radius")
        where = "" if scope == "all positions" else " (from position 1)"
        ax.annotate(f"certified radius{where}: below sigma {sigma:.2g}\nGaussian noise cannot protect these prompts",
                    (sigma, 0.5), xycoords=("data", "axes fraction"), textcoords="offset points", xytext=(6, 0),
                    fontsize=8, rotation=90, va="center")


def _kl_scale(ax, curves: list[Curve]) -> None:
    """KL spans decades and is 0 without noise: symlog keeps 0 on the axis, with the linear part
    ending at a power of ten so that 0 and the first decade label do not collide."""
    positive = [p.kl_clean_defended for c in curves for p in c.points if (p.kl_clean_defended or 0) > 0]
    if positive:
        ax.set_xscale("symlog", linthresh=10 ** math.floor(math.log10(min(positive))))


def _default_title(curves: list[Curve]) -> str:
    protocols = sorted({c.protocol for c in curves})
    return f"privacy vs utility, protocol {', '.join(protocols)}"


def compare(defense: str, protocol_dir: Path, path: Path, *, warn: Callable[[str], None] = print) -> list[Curve]:
    """Plot a defence's latest curve against its earlier ones; returns the curves plotted, latest last."""
    curves = [c for c in load_curves(protocol_dir, warn=warn) if c.defense == defense]
    if not curves:
        raise CurveError(f"no curves of defence {defense!r} under {curves_dir(protocol_dir)}")
    labels = [f"{c.defense} {c.created} ({c.digest})" + (" latest" if i == len(curves) - 1 else "")
              for i, c in enumerate(curves)]
    plot_curves(curves, path, labels=labels, faded=set(range(len(curves) - 1)),
                title=f"{defense}: latest curve against earlier ones, protocol {Path(protocol_dir).name}")
    return curves


def compare_protocols(defense: str, protocol_dirs: list[Path], path: Path, *,
                      warn: Callable[[str], None] = print) -> list[Curve]:
    """Plot a defence's latest curve under each protocol on one figure (e.g. C4 text against
    random-token secrets); returns the curves plotted, in the protocols' order."""
    shown = []
    for protocol_dir in protocol_dirs:
        latest = latest_curves(load_curves(protocol_dir, warn=warn))
        if defense not in latest:
            raise CurveError(f"no curve of defence {defense!r} under {curves_dir(protocol_dir)}")
        shown.append(latest[defense])
    plot_curves(shown, path, labels=[f"{c.defense} ({c.protocol})" for c in shown],
                title=f"{defense}: latest curve under {', '.join(c.protocol for c in shown)}")
    return shown
