"""The figures the README and docs quote, generated from what the code prints and the committed results.

A figure typed into a README goes stale (the main job's time, a board's answer); so the README's quoted
output and board answers are blocks between markers

    <!-- generated: NAME -->
    ...
    <!-- /generated -->

that `python -m invbench.docgen` rewrites from their sources, and tests/test_docs.py fails when a block
differs from what its source gives now:

- `main-job`: what `invbench run --defense gaussian --sigma 0.01` printed, re-rendered by today's code
  (`run_cli.format_summary`) from that run's summary.json, committed in docs/main-job/;
- `board-answers`: one row per committed board: its leak point, its entries (verified), whether any entry
  that keeps the model's top-1 agreement at the floor or above does not leak, the most private such entry
  with its 95% interval, and the first entry that protects at all, from the boards' entries;
- `published`: one row per published defence at its authors' setting and placement (`PUBLISHED`): its
  entry's verdict, worst-case token accuracy with its interval, the server's top-1 agreement and whether
  it is verified, or "not run yet" while the entry is missing.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from .formats import cell

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z-]+) -->\n)(?P<body>.*?)(<!-- /generated -->)", re.DOTALL)
MAIN_JOB = REPO / "docs" / "main-job"  # the main job's results folder (its summary.json)
BOARDS = ("c4-smollm2-10tok", "random-smollm2-10tok", "c4-smollm2-10tok-layer0", "c4-smollm2-10tok-split1", "quick")
# the published defences as their authors run them (issue 36): (mechanism and peer, authors' setting, protocol
# of its placement, entry name as bench/smollm2_boards.sh submits it)
PUBLISHED = (
    ("dχ, SplitLLM (shared radius, no snap)", "relative ε 0.1", "c4-smollm2-10tok-layer0",
     "dchi SplitLLM relative eps 0.1 (shared radius)"),
    ("dχ, SplitLLM (shared radius, no snap)", "relative ε 0.2", "c4-smollm2-10tok-layer0",
     "dchi SplitLLM relative eps 0.2 (shared radius)"),
    ("dχ, SplitLLM (shared radius, no snap)", "relative ε 0.4", "c4-smollm2-10tok-layer0",
     "dchi SplitLLM relative eps 0.4 (shared radius)"),
    ("Split-N-Denoise (no denoiser)", "η 50", "c4-smollm2-10tok-layer0", "Split-N-Denoise eta 50"),
    ("Split-N-Denoise (no denoiser)", "η 100", "c4-smollm2-10tok-layer0", "Split-N-Denoise eta 100"),
    ("Split-N-Denoise (no denoiser)", "η 150", "c4-smollm2-10tok-layer0", "Split-N-Denoise eta 150"),
    ("Laplace, VFLAIR-LLM (no clip)", "ΔF 10, ε 50", "c4-smollm2-10tok-split1", "Laplace VFLAIR-LLM DELTAF 10 eps 50"),
    ("DP-Forward (analytic Gaussian, sequence clip)", "ε 8, δ 1e-5, C 1", "c4-smollm2-10tok-split1", "DP-Forward eps 8"),
    ("Anisotropic Gaussian (inverse Fisher, Bell 2026)", "KL budget 0.1", "c4-smollm2-10tok-split1",
     "Anisotropic Gaussian KL budget 0.1 (inverse Fisher)"),
    ("Anisotropic Gaussian (inverse Fisher, Bell 2026)", "KL budget 1", "c4-smollm2-10tok-split1",
     "Anisotropic Gaussian KL budget 1 (inverse Fisher)"),
)


def main_job(folder: Path = MAIN_JOB) -> str:
    """The main job's printed table, as today's code prints that run's summary."""
    from .folder import read_summary
    from .run_cli import format_summary

    return "```\n" + format_summary(read_summary(folder)) + "\n```\n"


def leak_point(layer: int, layers: int | None = None) -> str:
    """A protocol's leak point in words."""
    if layer == -1 or (layers is not None and layer == layers):
        return "last layer"
    return "input embeddings" if layer == 0 else f"after block {layer}"


def board_answers(board_dir: Path = REPO / "leaderboards", boards: tuple[str, ...] = BOARDS) -> str:
    """One row per board with committed entries: what it answers, from its entries."""
    from .leaderboard import build_board
    from .uncertainty import Interval

    def interval(value: float | None, bounds: Interval | None) -> str:
        return f"{cell(value)} [{bounds[0]:.3f}, {bounds[1]:.3f}]" if value is not None and bounds else cell(value)

    rows = ["| board | leak point | entries (verified) | keeps top-1 >= floor and does not leak | most private entry "
            "at top-1 >= floor: worst-case token acc. [95% CI] (top-1) | first entry that protects (top-1) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name in boards:
        folder = Path(board_dir) / name
        if not folder.is_dir():
            continue
        board = build_board(folder)
        rows_all = board.ranked + board.below
        if not rows_all:
            continue
        verified = sum(r.verified.verified for r in rows_all)
        private = [r for r in board.ranked if r.entry.verdict != "leaks"]
        best = board.ranked[0].entry if board.ranked else None
        protecting = sorted((r.entry for r in rows_all if r.entry.verdict == "protected"),
                            key=lambda e: -(e.top1_agreement or 0.0))
        layer = rows_all[0].entry.summary.layer
        rows.append(" | ".join([
            f"| `{name}`", leak_point(layer), f"{len(rows_all)} ({verified})",
            ", ".join(r.entry.name for r in private) or "none",
            f"{best.name}: {interval(best.worst_token_accuracy, best.intervals.worst_token_accuracy)} "
            f"({cell(best.top1_agreement)})" if best else "-",
            f"{protecting[0].name} ({cell(protecting[0].top1_agreement)})" if protecting else "none"]) + " |")
    return "\n".join(rows) + "\n"


def published(board_dir: Path = REPO / "leaderboards", settings: tuple[tuple[str, str, str, str], ...] = PUBLISHED) -> str:
    """One row per published defence at its authors' setting and placement, from its entry."""
    from .entries import read_entry, slugify
    from .protocols import PROTOCOLS
    from .verification import entry_status

    rows = ["| defence (as its authors run it) | setting | placement | verdict | worst-case token acc. [95% CI] "
            "| server's top-1 agreement | verified |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for mechanism, setting, protocol, name in settings:
        where = leak_point(PROTOCOLS[protocol].layer)
        path = Path(board_dir) / protocol / f"{slugify(name)}.json"
        if not path.is_file():
            rows.append(f"| {mechanism} | {setting} | {where} | not run yet | - | - | - |")
            continue
        entry = read_entry(path)
        bounds = entry.intervals.worst_token_accuracy
        accuracy = cell(entry.worst_token_accuracy) + (f" [{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else "")
        checked = entry_status(entry).verified
        rows.append(f"| {mechanism} | {setting} | {where} | {entry.verdict} | {accuracy} | "
                    f"{cell(entry.top1_agreement)} | {'yes' if checked else 'not yet'} |")
    return "\n".join(rows) + "\n"


GENERATORS = {"main-job": main_job, "board-answers": board_answers, "published": published}


def regenerate(text: str) -> str:
    """`text` with every generated block rewritten from its source."""
    return BLOCK.sub(lambda m: m.group(1) + GENERATORS[m.group("name")]() + m.group(4), text)


def stale_blocks(text: str) -> list[str]:
    """The names of the blocks of `text` that differ from what their sources give now."""
    return [m.group("name") for m in BLOCK.finditer(text) if m.group("body") != GENERATORS[m.group("name")]()]


if __name__ == "__main__":
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        old = path.read_text(encoding="utf-8")
        new = regenerate(old)
        if new != old:
            path.write_text(new, encoding="utf-8")
            print(f"rewrote {path.relative_to(REPO)}", file=sys.stderr)
