"""Speed benchmark: every attack in reference mode and batched, side by side, in one invocation.

    python -m invbench.studies.perf --model gpt2-random --tokens 10 --batch-sizes 1,32,256 --out bench/studies/PERF.md

For each attack: reference mode on a few prompts (where the attack has one), then batched runs at
each batch size, on clean targets. Prints and writes a Markdown table: seconds per token (wall time
/ prompt-tokens), tokens per second, peak memory, exact match, speed-up over reference measured in
the same run, and the achieved fraction of the device's measured matmul throughput (FLOPs the attack
must do per token, counted from the steps and candidates it actually used).
"""
from __future__ import annotations

import argparse
import datetime as dt
import resource
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from invbench.attacks import available_attacks, make_attack
from invbench.defenses import make_defense
from invbench.leaks.models import load_model
from invbench.leaks.oracle import WhiteBox
from invbench.leaks.prompts import load_prompts

from ..config import device_name


@dataclass
class Row:
    attack: str
    mode: str
    prompts: int
    seconds_per_token: float
    tokens_per_second: float
    peak_memory_gib: float
    exact_match: float
    gflop_per_token: float
    speedup: float | None = None
    matmul_fraction: float | None = None


def matmul_tflops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 4096, repeats: int = 10) -> float:
    """Measured dense matmul throughput of this device, the ceiling the attacks are compared to."""
    size = size if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    a @ a  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    synchronize(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e12


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux: process peak


def measure(attack_name: str, options: dict, oracle: WhiteBox, targets: torch.Tensor, ids: torch.Tensor, *,
            device: torch.device, params: int, preset: str) -> Row:
    attack = make_attack(attack_name, preset=preset, overrides=options)
    none = make_defense("none", {})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    out = attack.run(oracle, targets, defense=none, prompt_indices=list(range(len(ids))), seed=0)
    synchronize(device)
    wall = time.perf_counter() - start
    n_tokens = ids.numel()
    return Row(attack_name, "reference" if options.get("reference") else "batched", len(ids), wall / n_tokens,
               n_tokens / wall, peak_memory_gib(device), float((out.tokens == ids).all(dim=1).float().mean()),
               attack.flops_per_token(out, params=params, vocab=oracle.vocab_size) / 1e9)


def format_table(rows: list[Row], *, header: str) -> str:
    lines = [header, "",
             "| attack | mode | prompts | s/token | tokens/s | peak mem GiB | exact match | GFLOP/token | speed-up vs ref | matmul fraction |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r.attack} | {r.mode} | {r.prompts} | {r.seconds_per_token:.4f} | {r.tokens_per_second:.1f} | "
                     f"{r.peak_memory_gib:.2f} | {r.exact_match:.2f} | {r.gflop_per_token:.1f} | "
                     f"{'-' if r.speedup is None else f'{r.speedup:.0f}x'} | "
                     f"{'-' if r.matmul_fraction is None else f'{r.matmul_fraction:.3f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m invbench.studies.perf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-random")
    parser.add_argument("--tokens", type=int, default=10)
    parser.add_argument("--batch-sizes", default="1,32,256")
    parser.add_argument("--reference-prompts", type=int, default=2)
    parser.add_argument("--attacks", default="guided,continuous,projection,scan")
    parser.add_argument("--preset", default="baseline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="Markdown file to write the table to (e.g. bench/studies/PERF.md).")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    loaded = load_model(args.model, seed=0)
    oracle = WhiteBox.of(loaded, device=device)
    prompts, source = load_prompts("c4", tokenizer=loaded.tokenizer, n=max(sizes + [args.reference_prompts]),
                                   tokens=args.tokens, seed=0, notify=lambda line: None)
    all_ids = torch.tensor([p.ids for p in prompts])
    targets = oracle.capture(all_ids)
    params = sum(p.numel() for p in loaded.model.base_model.parameters()) - oracle.embedding.numel()
    tflops = matmul_tflops(device)
    rows = []
    for name in args.attacks.split(","):
        reference = None
        if "reference" in available_attacks()[name].config_class.__dataclass_fields__:
            n = args.reference_prompts
            reference = measure(name, {"reference": True}, oracle, targets[:n], all_ids[:n], device=device,
                                params=params, preset=args.preset)
            rows.append(reference)
        for size in sizes:
            row = measure(name, {}, oracle, targets[:size], all_ids[:size], device=device, params=params,
                          preset=args.preset)
            if reference:
                row.speedup = reference.seconds_per_token / row.seconds_per_token
            row.matmul_fraction = row.gflop_per_token * 1e9 * row.tokens_per_second / (tflops * 1e12)
            rows.append(row)
            print(format_table(rows[-1:], header="").splitlines()[-1], flush=True)
    header = (f"Measured {dt.date.today().isoformat()} on {device_name(device)}, torch {torch.__version__}, "
              f"model {args.model}, {args.tokens}-token prompts from {source}, preset {args.preset}, no defence; "
              f"measured matmul throughput {tflops:.1f} TFLOP/s (float32).\n\n"
              f"Command: `python -m invbench.studies.perf {shlex.join(argv if argv is not None else sys.argv[1:])}`")
    table = format_table(rows, header=header)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
