"""Benchmark of sequence-level decoding against per-position decoding (and scan) under Gaussian noise.

    python -m invbench.studies.sequence_bench --out bench/studies/SEQUENCE.md   # resumable

Per-position decoding is `guided` (each position decided alone: the codebook at position 1, the best
verified token after the committed prefix later); sequence-level decoding is `sequence` (beam search
over hypotheses, scored by the whole text's objective). The sequence cells are the SmolLM2 boards' own
runs (`c4-smollm2-10tok` and `random-smollm2-10tok` at gaussian sigma, every board prompt; a run folder
the board scripts made under --runs-dir, `<protocol>/gaussian-sigma-<s>`, is reused as it is). The
per-position cells run `guided` with the same scoring (map on C4 text, ml on random ids, whose text no
prior describes), the same learned ranker and the same seeded noise on the first --c4 / --random
prompts of the same sets (a prompt's noise depends on its index only), and the table compares both on
those prompts. `scan` (every vocabulary token at every position, beam 1 and wider) runs on the first
--scan-prompts C4 prompts, where the two are compared with it.

Every cell is a resumable `invbench run` under --runs-dir, so an interrupted benchmark resumes.
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from invbench.attacks.scan import PRECISIONS
from invbench.config import RunConfig
from invbench.entries import slugify
from invbench.folder import read_summary
from invbench.formats import cell as fmt
from invbench.protocols import get_protocol
from invbench.runner import run

from .guided_bench import aggregate, records

SCORING = {"c4": "map", "random": "ml"}
BOARDS = {"c4": "c4-smollm2-10tok", "random": "random-smollm2-10tok"}


@dataclass(frozen=True)
class Cell:
    """One run: a prompt set, a noise level and a decoder (scan with its beam)."""

    dataset: str  # c4 | random
    n: int
    sigma: float
    attack: str  # guided | sequence | scan
    beam: int = 1
    precision: str = "auto"  # scan's: bfloat16 ranks the vocabulary, float32 re-checks its shortlist and decides
    chunk_size: int | None = None  # scan's rows per forward (None: its default)

    @property
    def name(self) -> str:
        scan = f"-beam{self.beam}" + (f"-{self.precision}" if self.precision != "auto" else "") + \
            (f"-chunk{self.chunk_size}" if self.chunk_size else "")
        return f"{self.dataset}-n{self.n}-sigma{self.sigma:g}-{self.attack}" + (scan if self.attack == "scan" else "")

    @property
    def label(self) -> str:
        precision = f" ({self.precision} pass)" if self.precision != "auto" else ""
        return {"guided": "per position (guided)", "sequence": "sequence"}.get(self.attack, f"scan, beam {self.beam}{precision}")

    def config(self, *, model: str, runs_dir: Path, tokens: int) -> RunConfig:
        if self.attack == "sequence":  # the board's own run, as its script names the folder
            protocol = get_protocol(BOARDS[self.dataset])
            return protocol.run_config(defense="gaussian", defense_params={"sigma": self.sigma}, device="cpu",
                                       out=str(runs_dir / protocol.name / slugify(f"Gaussian sigma {self.sigma:g}")))
        scan = {"beam": self.beam, "precision": self.precision, **({"chunk_size": self.chunk_size} if self.chunk_size else {})}
        options = scan if self.attack == "scan" else {"scoring": SCORING[self.dataset]}
        return RunConfig(model=model, dataset=self.dataset, n=self.n, tokens=tokens, device="cpu", attacks=[self.attack],
                         preset="fast", attack_options=options, defense="gaussian", defense_params={"sigma": self.sigma},
                         out=str(runs_dir / model / self.name))


def plan(*, c4: int, random: int, c4_sigmas: list[float], random_sigmas: list[float], scan_prompts: int,
         scan_sigmas: list[float], scan_beams: list[int], scan_precision: str = "auto",
         scan_chunk_size: int | None = None) -> list[Cell]:
    """The board's sequence runs first, then per-position decoding on their first prompts, then scan (hours)."""
    boards = {"c4": get_protocol(BOARDS["c4"]).n, "random": get_protocol(BOARDS["random"]).n}
    cells = [Cell(d, boards[d], s, "sequence") for d, n, levels in (("c4", c4, c4_sigmas), ("random", random, random_sigmas))
             if n for s in levels]
    cells += [Cell(c.dataset, min(c.n, c4 if c.dataset == "c4" else random), c.sigma, "guided") for c in cells]
    cells += [Cell("c4", scan_prompts, s, "scan", b, scan_precision, scan_chunk_size) for s in scan_sigmas
              for b in scan_beams if scan_prompts]
    return cells


def row(cell: Cell, rows: list[dict], *, vocab: int, note: str = "") -> str:
    a = aggregate(rows, vocab=vocab)
    hypotheses = [h for r in rows for h in r.get("hypotheses", [])]
    cells = [f"{cell.dataset}{note}", f"{cell.sigma:g}", cell.label, str(a["prompts"]), f"{a['exact']:.3f}",
             f"{a['tokens']:.3f}", f"{a['candidates']:.1f} ({a['median_candidates']:g})", f"{a['seconds']:.2f}",
             fmt(max(hypotheses) if hypotheses else None, ".0f"),
             f"{sum(r['search_failure'] for r in rows) / len(rows):.2f}"]
    return "| " + " | ".join(cells) + " |"


HEADER = ["| prompts | sigma | decoding | n | exact match | token acc. | candidates / token: mean (median) | s / token | "
          "hypotheses per position (max) | search failures |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m invbench.studies.sequence_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--c4", type=int, default=10, help="C4 prompts")
    parser.add_argument("--random", type=int, default=5, help="random-id prompts (0: none)")
    parser.add_argument("--tokens", type=int, default=10)
    parser.add_argument("--c4-sigmas", default="0.1,0.3,1,3")
    parser.add_argument("--random-sigmas", default="0.3,1")
    parser.add_argument("--scan-prompts", type=int, default=3, help="C4 prompts scan runs on (0: no scan)")
    parser.add_argument("--scan-sigmas", default="0.3,1")
    parser.add_argument("--scan-beams", default="1,4")
    parser.add_argument("--scan-precision", default="auto", choices=PRECISIONS,
                        help="scan's full pass (auto: bfloat16 on CUDA, float32 elsewhere; bfloat16 is 2.4x faster "
                             "on a CPU with AMX, see attacks/scan.py); a float32 re-check of its shortlist decides")
    parser.add_argument("--scan-chunk-size", type=int, default=None,
                        help="scan's rows per forward (default: its own, 4096; 1024 was 1.5x faster in bfloat16 on "
                             "this 2-core CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--runs-dir", default="runs/sequence-bench")
    parser.add_argument("--out", default=None, help="Markdown file for the tables (e.g. bench/studies/SEQUENCE.md)")
    parser.add_argument("--run", default="sequence,guided,scan",
                        help="the decoders whose cells run (the others' cells are tabulated where their runs have "
                             "finished, listed as not run otherwise); '' runs nothing")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def numbers(text: str, kind=float) -> list:
        return [kind(s) for s in text.split(",") if s.strip()]

    cells = plan(c4=args.c4, random=args.random, c4_sigmas=numbers(args.c4_sigmas),
                 random_sigmas=numbers(args.random_sigmas), scan_prompts=args.scan_prompts,
                 scan_sigmas=numbers(args.scan_sigmas), scan_beams=numbers(args.scan_beams, int),
                 scan_precision=args.scan_precision, scan_chunk_size=args.scan_chunk_size)
    results: dict[Cell, list[dict]] = {}
    missing: list[Cell] = []
    for i, cell in enumerate(cells):
        cfg = cell.config(model=args.model, runs_dir=Path(args.runs_dir), tokens=args.tokens)
        if cell.attack not in args.run.split(",") and read_summary(Path(cfg.out)) is None:  # not finished
            missing.append(cell)
            continue
        print(f"[{i + 1}/{len(cells)}] {cell.name}", flush=True)
        run(cfg, echo=lambda line: print(f"  {line}", flush=True))
        results[cell] = records(Path(cfg.out), cell.attack)
    vocab = 49152 if args.model == "smollm2-135m" else 50257
    lines = [f"# Sequence-level against per-position decoding on {args.model}", "",
             f"Measured {dt.date.today().isoformat()} on {platform.processor() or platform.machine()} "
             f"({torch.get_num_threads()} torch threads), torch {torch.__version__}; {args.tokens}-token prompts; "
             "gaussian noise per coordinate sigma. Scoring as the SmolLM2 protocols: map on C4, ml on random ids.", "",
             f"Command: `python -m invbench.studies.sequence_bench {shlex.join(argv if argv is not None else sys.argv[1:])}`",
             "", *HEADER]
    decoders = [c for c in results if c.attack != "scan"]
    for cell in sorted(decoders, key=lambda c: (c.dataset, c.sigma, c.attack != "sequence")):
        lines.append(row(cell, results[cell], vocab=vocab, note=" (board)" if cell.attack == "sequence" else ""))
        per_position = next((c for c in decoders if c.attack == "guided" and (c.dataset, c.sigma) == (cell.dataset, cell.sigma)), None)
        if cell.attack == "sequence" and per_position and per_position.n < cell.n:  # both on the same prompts
            lines.append(row(cell, results[cell][:per_position.n], vocab=vocab, note=f" (first {per_position.n})"))
    if missing:
        lines += ["", "Not run yet: " + ", ".join(c.name for c in missing) + "."]
    scans = [c for c in results if c.attack == "scan"]
    if scans:
        lines += ["", f"## Against scan on the first {args.scan_prompts} C4 prompts", "",
                  "scan verifies every vocabulary token at every position (49,152 forwards per position and beam); "
                  "its beams keep the prefixes of least summed MSE (maximum likelihood). The decoders' rows are the "
                  "same runs as above, restricted to these prompts.", "", *HEADER]
        for sigma in sorted({c.sigma for c in scans}):
            for cell in [c for c in decoders if c.dataset == "c4" and c.sigma == sigma] + \
                    sorted((c for c in scans if c.sigma == sigma), key=lambda c: c.beam):
                rows = results[cell] if cell.attack == "scan" else results[cell][:args.scan_prompts]
                lines.append(row(cell, rows, vocab=vocab, note="" if cell.attack == "scan" else f" (first {args.scan_prompts})"))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
