"""Benchmark of the guided attack against scan on SmolLM2: exactness, cost and the stop's tolerance.

    python -m invbench.studies.guided_bench --out bench/studies/GUIDED.md            # resumable: reruns skip finished runs

Every cell is a resumable `invbench run` under --runs-dir (one folder per prompt set, sigma and
attack), so an interrupted benchmark resumes where it stopped. Prompt sets: the first --c4 C4
prompts of the bundled sample (none among the ranker's training documents) and --random prompts
of uniformly random token ids, 10 tokens each. Defences: none and gaussian at each --sigmas.
guided runs on every prompt with ml scoring, and with map scoring under noise; scan, whose full
vocabulary costs ~1-2 ms x 49,152 candidate forwards per position on a 2-core CPU, runs on the
first --scan-prompts C4 prompts, and guided is compared with it on those same prompts.

The table reports exact match, token accuracy, candidate forwards per token (guided: verified;
scan: the vocabulary), seconds per token and the ratios to scan; then the certified-stop
tolerance measured on the clean runs (the true token's MSE through the KV-cached path against the
nearest wrong token's, SmolLM2 and the GPT-2-shaped gpt2-random), and the certified radius.
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import formats
from ..config import RunConfig
from ..folder import read_summary
from ..results import read_records
from ..scoring import record_problem
from ..runner import run
from ..scoring import latest_records
from ..summary import RunSummary

SIGMAS = (0.0, 0.01, 0.1, 0.3, 1.0)


@dataclass(frozen=True)
class Cell:
    """One run of the benchmark: a prompt set, a noise level and an attack configuration."""

    dataset: str  # c4 | random
    n: int
    sigma: float
    attack: str  # guided | scan
    scoring: str = "ml"

    @property
    def name(self) -> str:
        return f"{self.dataset}-n{self.n}-sigma{self.sigma:g}-{self.attack}" + ("-map" if self.scoring == "map" else "")

    def config(self, *, model: str, runs_dir: Path, tokens: int) -> RunConfig:
        options = {"scoring": self.scoring} if self.attack == "guided" else {}
        defense, params = ("gaussian", {"sigma": self.sigma}) if self.sigma else ("none", {})
        return RunConfig(model=model, dataset=self.dataset, n=self.n, tokens=tokens, device="cpu", attacks=[self.attack],
                         preset="baseline", attack_options=options, defense=defense, defense_params=params,
                         out=str(runs_dir / model / self.name))


def cells(*, c4: int, random: int, scan_prompts: int, sigmas: tuple[float, ...],
          random_sigmas: tuple[float, ...] | None = None, scan_sigmas: tuple[float, ...] | None = None) -> list[Cell]:
    """Every guided run first (minutes), then the scans (hours on a CPU). The random-token prompts
    and the scans run at `sigmas` unless given their own (both cost far more per cell)."""
    out = []
    for dataset, n, levels in (("c4", c4, sigmas), ("random", random, random_sigmas or sigmas)):
        for sigma in levels if n else ():  # n = 0: this prompt set is not run
            out.append(Cell(dataset, n, sigma, "guided"))
            if sigma:
                out.append(Cell(dataset, n, sigma, "guided", "map"))
    return out + [Cell("c4", scan_prompts, sigma, "scan") for sigma in (scan_sigmas or sigmas) if scan_prompts]


def records(folder: Path, attack: str) -> list[dict]:
    """One attack's latest record of each prompt of a finished run, in prompt order, read as the
    harness reads them (a torn or damaged line is skipped)."""
    rows = read_records(Path(folder) / "records.jsonl", check=record_problem)
    return latest_records(rows, attacks=[attack], prompt_indices={r.get("prompt_index") for r in rows})[attack]


def aggregate(rows: list[dict], *, vocab: int) -> dict[str, Any]:
    candidates = [c for r in rows for c in r.get("candidates", [vocab] * len(r["target_ids"]))]
    return {"prompts": len(rows), "exact": sum(r["exact_match"] for r in rows) / len(rows),
            "tokens": sum(r["token_accuracy"] for r in rows) / len(rows),
            "candidates": sum(candidates) / len(candidates), "median_candidates": statistics.median(candidates),
            "seconds": sum(r["seconds_per_token"] for r in rows) / len(rows),
            "certified": _share(rows, "certified"), "exhausted": _share(rows, "exhausted")}


def _share(rows: list[dict], ending: str) -> float | None:
    ends = [e for r in rows for e in r.get("ended", [])]
    return ends.count(ending) / len(ends) if ends else None


def cells_of(a: dict[str, Any], *extra: str) -> str:
    """The table cells of one aggregate (`aggregate`): n, exactness, candidates, time, `extra`
    columns (ratios to scan), then how positions ended."""
    cells = [str(a["prompts"]), f"{a['exact']:.3f}", f"{a['tokens']:.3f}",
             f"{a['candidates']:.1f} ({a['median_candidates']:g})", f"{a['seconds']:.3f}", *extra,
             formats.cell(a["certified"], ".2f"), formats.cell(a["exhausted"], ".2f")]
    return " | ".join(cells)


def table(results: dict[Cell, list[dict]], *, scan_prompts: int, vocab: int) -> list[str]:
    lines = ["| prompts | sigma | attack | n | exact match | token acc. | candidates / token: mean (median) | s / token | "
             "candidates vs scan | time vs scan | certified stops | whole vocabulary |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for cell, rows in results.items():
        scan = next((r for c, r in results.items() if c.attack == "scan" and c.sigma == cell.sigma
                     and c.dataset == cell.dataset), None)
        groups = [(rows, "")]
        if scan is not None and cell.attack == "guided":
            groups.append((rows[:scan_prompts], f" (first {scan_prompts}, as scan)"))
        for subset, note in groups:
            a = aggregate(subset, vocab=vocab)
            s = aggregate(scan, vocab=vocab) if scan is not None else None
            ratio = f"1/{s['candidates'] / a['candidates']:.0f}" if s and cell.attack == "guided" and a["candidates"] else "-"
            time_ratio = f"{a['seconds'] / s['seconds']:.4f}" if s and cell.attack == "guided" else "-"
            label = f"{cell.attack} {cell.scoring}" if cell.attack == "guided" else "scan"
            lines.append(f"| {cell.dataset}{note} | {cell.sigma:g} | {label} | {cells_of(a, ratio, time_ratio)} |")
    return lines


def tolerance_lines(results: dict[Cell, list[dict]], *, dim: int) -> list[str]:
    """The true token's MSE through the KV-cached path (guided's certified stops and scan's exact
    positions) against the nearest wrong token's (scan's runner-up on clean states)."""
    clean_guided = [r for c, rows in results.items() if c.sigma == 0 and c.attack == "guided" for r in rows]
    clean_scan = [r for c, rows in results.items() if c.sigma == 0 and c.attack == "scan" for r in rows]
    true = [loss for r in clean_guided for loss, end in zip(r["discrete_loss"][1:], r["ended"][1:])
            if end == "certified" and r["exact_match"]]
    true += [loss for r in clean_scan if r["exact_match"] for loss in r["discrete_loss"][1:]]
    wrong = [m for r in clean_scan if r["exact_match"] for m in r["margin"][1:]]
    lines = [f"- true token, positions 2+ ({len(true)} positions): MSE max {max(true):.2e}, median "
             f"{statistics.median(true):.2e}" if true else "- true token: no clean positions measured"]
    if wrong:
        lines.append(f"- nearest wrong token, positions 2+ ({len(wrong)} positions, scan on clean states): MSE min "
                     f"{min(wrong):.2e}, median {statistics.median(wrong):.2e} (gap min {math.sqrt(min(wrong) * dim):.2f})")
    return lines


def board_lines(folders: list[Path], *, vocab: int) -> list[str]:
    """guided's rows of finished leaderboard runs (e.g. a protocol's gaussian sweep): more prompts
    and heavier noise than the cells above, measured by the board, not rerun here."""
    lines = ["| run | defence | n | exact match | token acc. | candidates / token: mean (median) | s / token | "
             "certified stops | whole vocabulary |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for folder in folders:
        summary = read_summary(folder)
        if summary is None or "guided" not in summary.attacks:
            continue
        defense = summary.defense
        rows = records(folder, "guided")
        a = aggregate(rows, vocab=vocab)
        params = ", ".join(f"{k}={v}" for k, v in defense["params"].items())
        lines.append(f"| `{folder}` | {defense['name']} {params} | {cells_of(a)} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m invbench.studies.guided_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--c4", type=int, default=20, help="C4 prompts")
    parser.add_argument("--random", type=int, default=10, help="random-token prompts (0: none)")
    parser.add_argument("--scan-prompts", type=int, default=2, help="C4 prompts scan runs on (0: no scan)")
    parser.add_argument("--tokens", type=int, default=10)
    parser.add_argument("--sigmas", default=",".join(f"{s:g}" for s in SIGMAS))
    parser.add_argument("--random-sigmas", default=None, help="sigmas of the random-token prompts (default: --sigmas)")
    parser.add_argument("--scan-sigmas", default=None, help="sigmas scan runs at (default: --sigmas)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--runs-dir", default="runs/guided-bench")
    parser.add_argument("--out", default=None, help="Markdown file for the table (e.g. bench/studies/GUIDED.md)")
    parser.add_argument("--board-runs", nargs="*", default=[],
                        help="finished leaderboard run folders whose guided rows to add (read, not rerun)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    def levels(text: str | None) -> tuple[float, ...] | None:
        return tuple(float(s) for s in text.split(",")) if text else None

    runs_dir = Path(args.runs_dir)
    plan = cells(c4=args.c4, random=args.random, scan_prompts=args.scan_prompts, sigmas=levels(args.sigmas),
                 random_sigmas=levels(args.random_sigmas), scan_sigmas=levels(args.scan_sigmas))
    results: dict[Cell, list[dict]] = {}
    summaries: dict[Cell, RunSummary] = {}
    for i, cell in enumerate(plan):
        cfg = cell.config(model=args.model, runs_dir=runs_dir, tokens=args.tokens)
        print(f"[{i + 1}/{len(plan)}] {cell.name}", flush=True)
        summaries[cell] = run(cfg, echo=lambda line: print(f"  {line}", flush=True))
        results[cell] = records(Path(cfg.out), cell.attack)
    first = next(iter(summaries.values()))
    dim = first.radius["dim"] if first.radius else 576
    vocab = 49152 if args.model == "smollm2-135m" else 50257
    lines = [f"# guided against scan on {args.model}", "",
             f"Measured {dt.date.today().isoformat()} on {platform.processor() or platform.machine()} "
             f"({torch.get_num_threads()} torch threads), torch {torch.__version__}; "
             f"{args.tokens}-token prompts; gaussian noise per coordinate sigma (0: no defence).", "",
             f"Command: `python -m invbench.studies.guided_bench {shlex.join(argv if argv is not None else sys.argv[1:])}`", ""]
    lines += table(results, scan_prompts=args.scan_prompts, vocab=vocab)
    if not args.scan_prompts:
        lines += ["", f"scan was not run (--scan-prompts 0). Its cost is known without running it: every position "
                  f"verifies the whole vocabulary, {vocab:,} candidate forwards per token (about a minute per token "
                  "on a 2-core CPU), and on clean states it is exact by construction, as guided is (both commit "
                  "the unique token whose state matches). Candidate ratios against scan are vocabulary / guided's "
                  "mean (position 1 is a codebook lookup: 0 forwards)."]
    if args.board_runs:
        lines += ["", "## guided in the leaderboard runs (heavier noise, more prompts; ml scoring)", ""]
        lines += board_lines([Path(p) for p in args.board_runs], vocab=vocab)
    lines += ["", "## Certified-stop tolerance (noise-free stop)", ""] + tolerance_lines(results, dim=dim)
    radius = next((s.radius for c, s in summaries.items() if c.sigma == 0 and c.attack == "guided"
                   and c.dataset == "c4"), None)
    if radius:
        gaps = [p["first_position_gap"] for p in radius["per_prompt"]]
        lines += ["", "## Certified radius of the C4 prompts (position 1, from the codebook)", "",
                  f"- {len(gaps)} prompts: position-1 gap min {min(gaps):.3f}, median {statistics.median(gaps):.3f}, "
                  f"max {max(gaps):.3f} (L2; d = {dim})",
                  f"- radius (half gap): median {radius['median_radius']:.3f}; sigma_certified min "
                  f"{radius['min_sigma_certified']:.4f}, median {radius['median_sigma_certified']:.4f}; sigma_expected "
                  f"median {radius['median_sigma_expected']:.4f}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
