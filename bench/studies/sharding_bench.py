"""What sharding a run over Ray costs on this machine: the `quick` entry unsharded, sharded in this process (no Ray),
and sharded over a local Ray instance with 1 worker CPU (4 shards, and 16 of 1 prompt) and 2 worker CPUs.

    python -m invbench.studies.sharding_bench --rounds 3 --out bench/studies/SHARDING.md

Each case runs the same run (protocol `quick`, gaussian sigma 0.5, --device cpu) into a fresh folder; the cases
take turns, `--rounds` times, and the table gives medians (the machine is shared: single timings vary by seconds).
It reports the run's wall time (Ray's start not included: it is shown on its own), the attacks' own time (what the
records hold), the shards and, for Ray, the time inside the tasks and outside them, which is the coordination:
worker processes starting, scheduling, shipping each shard's states and records, the driver's checks and appends.
The summary of every case is compared with the unsharded one (timings and device aside).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import package_versions
from ..protocols import get_protocol

TIMING = {"seconds_per_token", "wall_seconds", "tokens_per_second", "device"}


@dataclass
class Case:
    name: str
    wall: float
    attack_seconds: float
    shards: int = 0
    ray_start: float | None = None
    task_seconds: list[tuple[str, float]] = field(default_factory=list)  # (worker, seconds) per shard, in order
    same_summary: bool | None = None
    same_records: bool | None = None


def strip(value):
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def folder(out: Path) -> tuple[dict, list[dict], float]:
    from ..folder import read_run_records, read_summary

    records = read_run_records(out)
    attack = sum(r["seconds_per_token"] * len(r["target_ids"]) for r in records)
    return strip(read_summary(out).to_dict()), strip(records), attack


def timed_executor():
    from ..sharding import RayExecutor

    class Timed(RayExecutor):
        """RayExecutor keeping each shard's in-task seconds and worker."""

        def __init__(self, **kw):
            super().__init__(**kw)
            self.timings: list[tuple[str, float]] = []

        def next_done(self, handles):
            handle, outcome = super().next_done(handles)
            if not isinstance(outcome, BaseException):
                self.timings.append((outcome.node, outcome.seconds))
            return handle, outcome
    return Timed


def run_case(name: str, root: Path, *, ray_cpus: int | None = None, in_process: bool = False,
             shard_size: int | None = None) -> Case:
    from .. import runner
    from ..sharding import InProcess

    cfg = get_protocol("quick").run_config(defense="gaussian", defense_params={"sigma": 0.5}, out=str(root / name),
                                           device="cpu")
    quiet = lambda line: None  # noqa: E731
    if ray_cpus is None:
        started = time.perf_counter()
        if in_process:
            runner.run_sharded(cfg, InProcess(slots=2), echo=quiet)
        else:
            runner.run(cfg, echo=quiet)
        wall = time.perf_counter() - started
        _, _, attack = folder(root / name)
        return Case(name, wall, attack, shards=8 if in_process else 0)
    import ray

    started = time.perf_counter()
    ray.init(num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False, logging_level="warning")
    ray_start = time.perf_counter() - started
    try:
        pool = timed_executor()(device="cpu")
        started = time.perf_counter()
        runner.run_sharded(cfg, pool, shard_size=shard_size, echo=quiet)
        wall = time.perf_counter() - started
    finally:
        ray.shutdown()
    _, _, attack = folder(root / name)
    return Case(name, wall, attack, shards=len(pool.timings), ray_start=ray_start, task_seconds=pool.timings)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def report(rounds: list[list[Case]], *, command: str, load: tuple[float, float]) -> str:
    names = [c.name for c in rounds[0]]
    by_name = {name: [r[i] for r in rounds] for i, name in enumerate(names)}
    wall = {name: median([c.wall for c in cases]) for name, cases in by_name.items()}
    base = wall[names[0]]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [f"# Sharding a run over Ray: the overhead on this machine ({dt.date.today().isoformat()})", "",
             f"Device: {platform.processor() or platform.machine()}, {cores} cores shared with other jobs (load "
             f"average {load[0]:.1f} before, {load[1]:.1f} after); torch {package_versions()['torch']}, Ray "
             f"{_ray_version()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.",
             f"Command: `{command}` ({len(rounds)} rounds, the cases taking turns; medians, wall's range in brackets)", "",
             "The run: protocol `quick` (tiny-gpt2, 4 C4 prompts x 3 tokens; guided, continuous, projection, scan), "
             "gaussian sigma 0.5, `--device cpu`. Wall: the run, Ray's start not included (shown apart). Attacks: the "
             "attacks' own seconds (the records' seconds per token x tokens). In tasks: the seconds inside the Ray "
             "tasks (the worker's model built and checked, the attack set up, the shard attacked). Outside: wall minus "
             "in-tasks seconds over the workers, i.e. the driver's own stages (model, capture, defence, scoring: about "
             "the unsharded wall minus its attacks) and the coordination (worker processes starting and importing "
             "torch, scheduling, shipping states and records, the driver's checks and appends).", "",
             "| case | shards | Ray start (s) | wall (s) | vs unsharded | attacks (s) | in tasks (s) | outside (s) "
             "| summary as unsharded |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in names:
        cases = by_name[name]
        c = cases[0]
        workers = len({w for w, _ in c.task_seconds}) or 1
        tasks = median([sum(s for _, s in k.task_seconds) for k in cases]) if c.task_seconds else None
        attacks = median([k.attack_seconds for k in cases])
        outside = wall[name] - (tasks if tasks is not None else attacks) / workers
        same = all(k.same_summary for k in cases)
        lines.append(
            f"| {name} | {c.shards or '-'} | {_f(median([k.ray_start for k in cases]) if c.ray_start else None)} | "
            f"{wall[name]:.1f} [{min(k.wall for k in cases):.1f}-{max(k.wall for k in cases):.1f}] | "
            f"{'-' if name == names[0] else f'{wall[name] - base:+.1f} s ({wall[name] / base:.2f}x)'} | {attacks:.1f} | "
            f"{_f(tasks)} | {outside:.1f} | "
            f"{'-' if name == names[0] else 'yes' if same else 'NO'}"
            f"{' (records bit for bit)' if name != names[0] and all(k.same_records for k in cases) else ''} |")
    return "\n".join(lines) + "\n"


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ray_version() -> str:
    try:
        import ray

        return ray.__version__
    except ImportError:
        return "not installed"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="Times each case runs (the cases take turns).")
    parser.add_argument("--out", type=Path, default=None, help="Markdown file to write (default: print only).")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = os.getloadavg()[0]
    plan = [("unsharded", {}), ("in-process shards (no Ray)", {"in_process": True}),
            ("Ray, 1 worker CPU", {"ray_cpus": 1}), ("Ray, 1 worker CPU, shards of 1 prompt", {"ray_cpus": 1, "shard_size": 1}),
            ("Ray, 2 worker CPUs", {"ray_cpus": 2})]
    rounds = []
    for round_ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="shards") as tmp:
            root = Path(tmp)
            cases = [run_case(name, root, **kw) for name, kw in plan]
            summary, records, _ = folder(root / "unsharded")
            for case in cases[1:]:
                theirs = folder(root / case.name)
                case.same_summary = theirs[0] == summary
                case.same_records = theirs[1] == records
        rounds.append(cases)
        print(f"round {round_ + 1}: " + ", ".join(f"{c.name} {c.wall:.1f} s" for c in cases), flush=True)
    text = report(rounds, command=shlex.join(["python", "-m", "invbench.studies.sharding_bench", *sys.argv[1:]]),
                  load=(load_before, os.getloadavg()[0]))
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
