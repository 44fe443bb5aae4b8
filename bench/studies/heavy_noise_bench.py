"""Old against new `sequence` on the C4 board's prompts: the same answers, for fewer forward passes?

    python -m invbench.studies.heavy_noise_bench --n 5 --out bench/studies/HEAVY-NOISE-table.md   # resumable

Each cell runs `sequence` alone, as the `c4-smollm2-10tok` protocol configures it (its budget and MAP
scoring), on the board's first --n prompts under one defence (a prompt's noise depends on its index only,
so these are the board's own defended states), once with the code of --baseline (a git ref, exported
with `git archive` and imported in a subprocess ahead of the installed package) and once with the code
installed here. Per cell it records every prompt's recovered ids, token accuracy, the attack's objective
for its answer and for the truth (a search failure: the truth scores better), the candidate forwards
(deterministic), the sequences the model ran in all (candidates and the hypotheses' prefixes, tokens
counted) and the wall seconds of `attack.run` (noisy when other jobs share the CPU). Cells are JSON files
under --runs-dir, reused when present, so an interrupted benchmark resumes.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = {  # label -> (defence, parameters), the board's entries
    "gaussian sigma 10": ("gaussian", {"sigma": 10.0}),
    "dp clip 45 Z 1": ("dp", {"clip": 45.0, "noise_multiplier": 1.0}),
    "laplace clip 600 eps 8": ("laplace", {"clip": 600.0, "epsilon": 8.0}),
    "dp clip 45 Z 0.1": ("dp", {"clip": 45.0, "noise_multiplier": 0.1}),
    "gaussian sigma 3": ("gaussian", {"sigma": 3.0}),
    "gaussian sigma 1": ("gaussian", {"sigma": 1.0}),
    "gaussian sigma 0.3": ("gaussian", {"sigma": 0.3}),
}
PROTOCOL = "c4-smollm2-10tok"


# --- one cell (runs in a subprocess, against whichever invbench its PYTHONPATH holds) -------------------------

# where a profiled run's time goes: (label, a function's file ending, its name), by cumulative time
PROFILED = (("candidate forwards", "oracle.py", "hidden_of_tokens"), ("prefixes (KV caches)", "oracle.py", "prefix"),
            ("verification order (sorts)", "guided.py", "_order"), ("learned ranker", "ranker.py", "log_probs"),
            ("prior", "oracle.py", "log_prior"))


def cell(defense: str, params: dict, n: int, out: Path, *, profile: bool = False) -> None:
    import cProfile
    import pstats

    import torch

    from invbench.protocols import get_protocol
    from invbench.attacks import available_attacks
    from invbench.runner import capture, defend, load_source, prepare
    from invbench.verdicts import is_search_failure

    torch.set_num_threads(1)
    protocol = get_protocol(PROTOCOL)
    cfg = protocol.run_config(defense=defense, defense_params=params, out=str(out.with_suffix(".unused")), device="cpu",
                                 prompts=list(range(n)))
    cfg.attacks = ["sequence"]
    known = available_attacks()["sequence"].option_names
    cfg.attack_options = {k: v for k, v in cfg.attack_options.items() if k in known}
    cfg, device, defense_obj, (attack,) = prepare(cfg, echo=lambda line: None)
    source = load_source(cfg, device, echo=lambda line: None)
    leak = defend(defense_obj, source.prompts, capture(source.oracle, source.prompts, batch_size=cfg.batch_size),
                  seed=cfg.seed)
    attack.setup(source.oracle, notify=lambda line: None)
    oracle = source.oracle
    rows = {"sequences": 0}  # every sequence the model body runs, weighted by its new tokens
    body_forward = oracle.body.forward

    def counted(*args, **kwargs):
        embeds = kwargs["inputs_embeds"]
        rows["sequences"] += embeds.shape[0] * embeds.shape[1]
        return body_forward(*args, **kwargs)

    oracle.body.forward = counted
    profiler = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    result = attack.run(oracle, leak.defended, defense=defense_obj, prompt_indices=[p.index for p in source.prompts],
                        seed=cfg.seed, notify=lambda line: None)
    seconds = time.perf_counter() - started
    where = {}
    if profiler:
        profiler.disable()
        stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive, own time, cumulative, callers)
        for label, ending, name in PROFILED:
            where[label] = sum(v[3] for (file, _, func), v in stats.items() if func == name and file.endswith(ending))
    oracle.body.forward = body_forward
    truth = torch.tensor([p.ids for p in source.prompts])
    answer_objective = attack.objective(oracle, leak.defended, result.tokens, defense=defense_obj).sum(1)
    truth_objective = attack.objective(oracle, leak.defended, truth, defense=defense_obj).sum(1)
    prompts = []
    for i, prompt in enumerate(source.prompts):
        exact = bool((result.tokens[i] == truth[i]).all())
        prompts.append({
            "index": prompt.index, "truth": truth[i].tolist(), "answer": result.tokens[i].tolist(),
            "token_accuracy": float((result.tokens[i] == truth[i]).float().mean()), "exact": exact,
            "objective": float(answer_objective[i]), "truth_objective": float(truth_objective[i]),
            "search_failure": is_search_failure(truth=float(truth_objective[i]), answer=float(answer_objective[i]),
                                                tokens=truth.shape[1], exact=exact),
            **{k: v[i].tolist() for k, v in result.extras.items() if k in ("candidates", "hypotheses", "flat", "rank")}})
    out.write_text(json.dumps({"defense": defense, "params": params, "n": n, "seconds": seconds,
                               "model_sequences": rows["sequences"], "config": attack.config_dict(), "profile": where,
                               "torch": torch.__version__, "prompts": prompts}, indent=1))


# --- the benchmark ---------------------------------------------------------------------------------------------

def baseline_tree(ref: str, into: Path) -> tuple[Path, str]:
    """The invbench package of git ref `ref`, laid out as setuptools installs it (bench/ is `invbench`,
    attacks/, defenses/ and leaks/ its subpackages), under `into`; and the commit it is."""
    root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True).stdout.strip())
    commit = subprocess.run(["git", "rev-parse", ref], capture_output=True, text=True, check=True, cwd=root).stdout.strip()
    source = into / f"src-{commit[:12]}"
    package = into / f"pkg-{commit[:12]}"
    if not (package / "invbench").is_dir():
        shutil.rmtree(source, ignore_errors=True)
        source.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", commit, "bench", "attacks", "defenses", "leaks"], capture_output=True,
                                 check=True, cwd=root).stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
        shutil.copytree(source / "bench", package / "invbench")
        for sub in ("attacks", "defenses", "leaks"):
            (package / "invbench" / sub).symlink_to((source / sub).resolve(), target_is_directory=True)
    return package, commit


def run_cell(label: str, code: str, *, n: int, runs_dir: Path, pythonpath: Path | None, profile: bool = False) -> dict:
    defense, params = ROWS[label]
    out = runs_dir / f"{label.replace(' ', '-')}-n{n}-{code}{'-profiled' if profile else ''}.json"
    if not out.exists():
        runs_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if pythonpath is not None:
            env["PYTHONPATH"] = str(pythonpath)
        print(f"{label} ({code}): running on {n} prompts", flush=True)
        subprocess.run([sys.executable, __file__, "--cell", json.dumps([defense, params, n, str(out), profile])], env=env,
                       check=True)
    return json.loads(out.read_text())


def summary_row(label: str, code: str, data: dict, baseline: dict | None) -> str:
    prompts = data["prompts"]
    n = len(prompts)
    forwards = sum(sum(p["candidates"]) for p in prompts) / n
    same = "-" if baseline is None else f"{sum(p['answer'] == q['answer'] for p, q in zip(prompts, baseline['prompts']))}/{n}"
    shift = "-" if baseline is None else \
        f"{sum(p['objective'] - q['objective'] for p, q in zip(prompts, baseline['prompts'])) / n:+.2f}"
    flat = [f for p in prompts for f in p.get("flat", [])]
    return "| " + " | ".join([
        label, code, str(n), same, f"{sum(p['exact'] for p in prompts) / n:.2f}",
        f"{sum(p['token_accuracy'] for p in prompts) / n:.3f}", f"{sum(p['search_failure'] for p in prompts)}/{n}",
        shift, f"{forwards:,.0f}", f"{data['model_sequences'] / n:,.0f}", f"{data['seconds']:.0f}",
        f"{sum(flat) / len(flat):.2f}" if flat else "-"]) + " |"


PROFILE_HEADER = ["| defence | code | n | seconds (profiled) | " + " | ".join(label for label, _, _ in PROFILED) + " | other |",
                  "| --- " * (5 + len(PROFILED)) + "|"]


def profile_row(label: str, code: str, data: dict) -> str:
    """Seconds of each part and its share of the run (under cProfile, which slows Python-level work)."""
    total = data["seconds"]
    parts = [data["profile"][name] for name, _, _ in PROFILED]
    cells = [f"{s:.0f} ({s / total:.0%})" for s in parts + [total - sum(parts)]]
    return "| " + " | ".join([label, code, str(len(data["prompts"])), f"{total:.0f}", *cells]) + " |"


HEADER = ["| defence | code | n | ids as baseline | exact | token acc. | search failures | objective vs baseline (nats / prompt) "
          "| forwards / prompt | model sequences / prompt | seconds | flat positions |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m invbench.studies.heavy_noise_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=5, help="the board's first N prompts")
    parser.add_argument("--rows", default="gaussian sigma 10,dp clip 45 Z 1,laplace clip 600 eps 8,gaussian sigma 1,gaussian sigma 0.3",
                        help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--baseline", default="main", help="git ref of the old code")
    parser.add_argument("--runs-dir", default="runs/heavy-noise")
    parser.add_argument("--out", default=None, help="Markdown table to write (default: print)")
    parser.add_argument("--profile", action="store_true", help="run the cells under cProfile instead (separate files) and "
                        "tabulate where the seconds go")
    args = parser.parse_args(argv)
    if args.cell:
        defense, params, n, out, profile = json.loads(args.cell)
        cell(defense, params, n, Path(out), profile=profile)
        return
    runs_dir = Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    labels = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in labels if r not in ROWS]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; choose from {list(ROWS)}")
    package, commit = baseline_tree(args.baseline, Path(tempfile.gettempdir()) / "invbench-baseline")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"Measured {dt.date.today().isoformat()} on {platform.machine()} ({os.cpu_count()} cores shared with other jobs, "
             f"1 torch thread); `sequence` alone with the `{PROTOCOL}` protocol's settings on its first {args.n} prompts. "
             f"baseline: {args.baseline} ({commit[:10]}); new: this checkout ({head}, uncommitted changes included).", "",
             f"Command: `python -m invbench.studies.heavy_noise_bench {' '.join(argv if argv is not None else sys.argv[1:])}`",
             "", *HEADER]
    if args.profile:
        lines[-2:] = PROFILE_HEADER
    for label in labels:
        old = run_cell(label, "baseline", n=args.n, runs_dir=runs_dir, pythonpath=package, profile=args.profile)
        new = run_cell(label, "new", n=args.n, runs_dir=runs_dir, pythonpath=None, profile=args.profile)
        if args.profile:
            lines += [profile_row(label, "baseline", old), profile_row(label, "new", new)]
        else:
            lines += [summary_row(label, "baseline", old, None), summary_row(label, "new", new, old)]
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
