"""Sweeps: one resumable protocol run per grid point of a defence's parameters, then a curve.

Each grid point runs into `runs_dir/<protocol>/<defense>/<param=value,...>/` through
`invbench.runner.run`, which resumes from what is on disk; so an interrupted sweep, local or on
a Ray cluster, resumes wherever the same run directories are visible.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm.auto import tqdm

from .config import RunConfig, package_versions
from .errors import InvbenchError
from .curves import Curve, CurvePoint, format_value, grid_of, run_intervals, slug
from .folder import read_run_records
from .protocols import Protocol, get_protocol
from .registry import is_file_spec
from invbench.defenses import load_defense_class, make_defense

from .cluster import ENGINES  # noqa: E402 - one list for every command


class SweepError(InvbenchError, ValueError):
    """A sweep cannot start or finish (bad --param grid, unknown engine, Ray missing or failing); one line."""


@dataclass(frozen=True)
class GridPoint:
    """One run of the sweep: the defence parameters (typed) and where the run lives."""

    params: dict[str, Any]
    out: Path

    @property
    def label(self) -> str:
        return ",".join(f"{k}={format_value(v)}" for k, v in self.params.items())


# --- the grid ------------------------------------------------------------------------------
def parse_param_lists(pairs: Iterable[str]) -> dict[str, list[str]]:
    """`("sigma=0.001,0.003", "clip=1")` -> `{"sigma": ["0.001", "0.003"], "clip": ["1"]}`."""
    grid: dict[str, list[str]] = {}
    for pair in pairs:
        name, sep, values = pair.partition("=")
        name = name.strip().replace("-", "_")  # --param noise-multiplier=... names noise_multiplier
        if not sep or not name:
            raise SweepError(f"--param expects NAME=V1,V2,..., got {pair!r}")
        if name in grid:
            raise SweepError(f"--param {name} is given twice; list all its values in one --param {name}=V1,V2,...")
        items = [v.strip() for v in values.split(",")]
        if any(v == "" for v in items):
            raise SweepError(f"--param {name}: empty value in {values!r}; expected {name}=V1,V2,...")
        duplicates = sorted({v for v in items if items.count(v) > 1})
        if duplicates:
            raise SweepError(f"--param {name}: value {duplicates[0]} is listed twice")
        grid[name] = items
    if not grid:
        raise SweepError("a sweep needs at least one --param NAME=V1,V2,... (e.g. --param sigma=0.001,0.01,0.1)")
    return grid


def grid_points(defense: str, grid: dict[str, list[Any]], run_root: Path) -> list[GridPoint]:
    """The cartesian product of the grid, each point checked by building its defence (so a bad
    value fails before any run starts) and named by the defence's own typed values."""
    if not grid or any(not isinstance(values, (list, tuple)) or not values for values in grid.values()):
        raise SweepError("a grid maps each swept parameter to a non-empty list of values")
    keys = sorted(grid)  # stable directory names whatever the --param order
    points, seen = [], {}
    for combo in itertools.product(*(grid[k] for k in keys)):
        given = dict(zip(keys, combo))
        built = make_defense(defense, given)  # DefenseError (one line) for a bad name or value
        typed = {k: built.params.get(k, v) for k, v in given.items()}
        point = GridPoint(typed, run_root / _dir_name(typed))
        if point.out in seen:  # e.g. sigma=0.1,1e-1: two spellings of one value
            raise SweepError(f"--param values {seen[point.out]} and {point.label} are the same point")
        seen[point.out] = point.label
        points.append(point)
    return points


def _dir_name(params: dict[str, Any]) -> str:
    """`sigma=0.001` or `clip=1,noise_multiplier=0.5`, safe as one path component."""
    text = ",".join(f"{k}={format_value(v)}" for k, v in params.items())
    return "".join(c if c.isalnum() or c in "=,.+-_" else "_" for c in text)


# --- running -------------------------------------------------------------------------------
def run_point(cfg: RunConfig, label: str):
    """One grid point: a full (resumable) protocol run. Module-level so Ray can ship it by name."""
    from .runner import run

    return run(cfg, echo=lambda line: print(f"[{label}] {line}", flush=True))


def _run_local(jobs: list[tuple[GridPoint, RunConfig]], echo: Callable[[str], None]) -> list:
    from . import runner

    summaries = []
    with tqdm(total=len(jobs), desc="sweep", unit="point") as bar:
        for point, cfg in jobs:
            bar.set_postfix_str(point.label)
            summaries.append(runner.run(cfg, echo=lambda line, p=point: echo(f"[{p.label}] {line}")))
            bar.update(1)
    return summaries


def _run_ray(jobs: list[tuple[GridPoint, RunConfig]], *, address: str | None, token_file: str | None = None,
             echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """Each grid point a Ray task (one GPU each where the cluster has GPUs); all points are
    awaited, so one failure does not waste the others' work (it is on disk either way). Ray is joined
    (or started) as a sharded run joins it: `invbench.cluster.connect`, its token and one-line errors."""
    from .cluster import Engine, connect, import_ray

    started_here = connect(Engine("ray", address=address, token_file=token_file), echo=echo, log_to_driver=True)
    ray = import_ray()
    try:
        has_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        echo(f"ray: {'an existing cluster at ' + address if address else 'a local instance'}, "
             f"one {'GPU' if has_gpu else 'CPU'} per grid point")
        task = ray.remote(num_gpus=1)(run_point) if has_gpu else ray.remote(num_cpus=1)(run_point)
        refs = {task.remote(cfg, point.label): i for i, (point, cfg) in enumerate(jobs)}
        results: list[Any] = [None] * len(jobs)
        failures: list[tuple[str, BaseException]] = []
        pending = list(refs)
        with tqdm(total=len(jobs), desc="sweep (ray)", unit="point") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                index = refs[done[0]]
                try:
                    results[index] = ray.get(done[0])
                except ray.exceptions.RayError as exc:  # the task raised, or its worker died
                    failures.append((jobs[index][0].label, getattr(exc, "cause", None) or exc))
                bar.update(1)
        if failures:
            label, cause = failures[0]
            message = (str(cause).strip().splitlines() or [type(cause).__name__])[-1]  # past any traceback
            raise SweepError(f"grid point {label} failed: {message} ({len(failures)} of {len(jobs)} points "
                             "failed; finished points are saved and a rerun resumes)")
        return results
    finally:
        if started_here:
            ray.shutdown()


def sweep(*, defense: str, grid: dict[str, list[Any]], protocol: Protocol | str, runs_dir: str | Path = "runs",
          engine: str = "local", address: str | None = None, token_file: str | None = None, device: str = "auto",
          echo: Callable[[str], None] = print) -> Curve:
    """Run `protocol` once per grid point of `defense`'s parameters and return the curve
    (not yet saved: see `curves.save_curve`). Every point resumes from its run directory. `token_file`:
    the Ray cluster's token (`invbench.cluster`)."""
    if engine not in ENGINES:
        raise SweepError(f"unknown engine {engine!r}; choose {' or '.join(ENGINES)}")
    if address and engine != "ray":
        raise SweepError("--address only applies to --engine ray")
    if token_file and engine != "ray":
        raise SweepError("--ray-token-file only applies to --engine ray")
    proto = get_protocol(protocol) if isinstance(protocol, str) else protocol
    name = load_defense_class(defense).name
    # Absolute, so Ray workers (whose working directory differs) write where the driver reads.
    run_root = Path(runs_dir).resolve() / proto.name / slug(name)
    points = grid_points(defense, grid, run_root)
    spec = _absolute_plugin_path(defense)  # Ray workers resolve relative paths elsewhere
    jobs = [(p, proto.run_config(defense=spec, defense_params=p.params, out=str(p.out), device=device))
            for p in points]
    echo(f"sweep: {len(points)} grid points of {name} under protocol {proto.name} into {run_root}")
    if engine == "ray":
        summaries = _run_ray(jobs, address=address, token_file=token_file, echo=echo)
    else:
        summaries = _run_local(jobs, echo)
    return Curve(protocol=proto.name, defense=name, defense_spec=defense,
                 grid=grid_of(p.params for p in points),
                 points=[CurvePoint.from_summary(p.params, s, _shown(p.out), run_intervals(read_run_records(p.out), s))
                         for p, s in zip(points, summaries)],
                 protocol_settings=proto.to_dict(), versions=summaries[0].versions or package_versions())


def _absolute_plugin_path(spec: str) -> str:
    """`my_defense.py:Class` -> `/abs/path/my_defense.py:Class`; registered names unchanged."""
    if not is_file_spec(spec):
        return spec
    path, cls = spec.rsplit(":", 1)
    return f"{Path(path).resolve()}:{cls}"


def _shown(path: Path) -> str:
    """A run directory as the curve records it: relative to the working directory when under it,
    so a committed curve names no one's home folder."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)

