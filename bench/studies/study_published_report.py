"""Tables, the rank plot and the compact results file of the published-attacks study.

`python -m invbench.studies.study_published report --runs DIR --md FILE --png FILE --json FILE` reads
DIR/<model>/<attack>/<spec>.json (and DIR/<model>/diagnose.json) as `study_published run` and
`diagnose` wrote them, and
- rewrites the part of FILE between `<!-- tables:begin -->` and `<!-- tables:end -->` (the prose
  around it is kept; a new FILE gets just the tables),
- draws the true token's rank over steps (default vs best setting of each attack) to the PNG,
- writes every per-position record (rank trajectories included) to one compact JSON.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from invbench.formats import cell

BEGIN, END = "<!-- tables:begin -->", "<!-- tables:end -->"
THRESHOLDS = (100, 500, 1000, 2000)
PAPER = "paper"


def load_runs(runs: Path) -> dict[str, dict[str, dict[str, dict]]]:
    """model -> attack -> spec -> run file contents (records flattened into `records`)."""
    out: dict[str, dict[str, dict[str, dict]]] = {}
    for path in sorted(runs.glob("*/*/*.json")):
        data = json.loads(path.read_text())
        data["records"] = [rec for t in sorted(data["groups"], key=int) for rec in data["groups"][t]]
        # runs written before the cosine tie fix (commit "a tied rank 0 ... is not a hit") counted
        # the all-zero start as a cosine hit at step 0
        data["cosine_tie_bug"] = data["attack"] == "continuous" and "cosine_ties" not in data
        out.setdefault(data["model"], {}).setdefault(data["attack"], {})[data["spec"]] = data
    return out


def hit_step(rec: dict, attack: str, metric: str = "l1") -> int | None:
    if "skipped" in rec:
        return None
    return rec["first_hit"][metric] if attack == "continuous" else rec["first_hit"]


def final_rank(rec: dict, attack: str, metric: str = "l1") -> float:
    if "skipped" in rec:
        return math.nan
    value = rec["final_rank"][metric] if attack == "continuous" else rec["final_rank"]
    return math.inf if value is None else value  # a NaN proxy ranks nothing: worse than any rank


def _median(values: list[float]) -> float:
    xs = sorted(values)
    if not xs:
        return math.nan
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def summarise(data: dict, attack: str, metric: str | None = None) -> dict[str, Any]:
    metric = metric or data["setting"].get("metric", "l1")
    recs = [r for r in data["records"] if "skipped" not in r]
    K = data["setting"]["steps"]
    n = len(recs)
    if not n:
        return {"n": 0, "skipped": len(data["records"]), "note": data["records"][0].get("skipped", "")}
    hits = [hit_step(r, attack, metric) for r in recs]
    within = {k: (sum(h is not None and h <= k for h in hits) / n if k <= K else None) for k in THRESHOLDS}
    # median over all positions, a miss counting as later than K
    med_all = _median([h if h is not None else math.inf for h in hits])
    med_hits = _median([h for h in hits if h is not None])
    ranks = [final_rank(r, attack, metric) for r in recs]
    seconds = [r["seconds"] for r in recs]
    by_t: dict[int, list[int]] = {}
    for r, h in zip(recs, hits):
        by_t.setdefault(r["t"], [0, 0])
        by_t[r["t"]][0] += h is not None
        by_t[r["t"]][1] += 1
    out = {"n": n, "K": K, "within": within, "median_first_hit": med_all, "median_first_hit_among_hits": med_hits,
           "median_final_rank": _median(ranks), "mean_seconds": sum(seconds) / n, "by_t": by_t,
           "hits": sum(h is not None for h in hits)}
    if attack == "continuous":
        out["nonfinite"] = sum(r["nonfinite"] for r in recs)
        out["loss_exit"] = sum(r["exit"] == "loss_threshold" for r in recs)
        out["within_K_by_metric"] = {m: sum(r["first_hit"][m] is not None for r in recs) / n for m in ("l1", "l2", "cosine")}
        out["final_rank_lt"] = {c: sum(final_rank(r, attack, metric) < c for r in recs) / n for c in (1, 100, 2000, 10000)}
        loss = [r["final_loss"] for r in recs if r["final_loss"] is not None]
        out["median_final_loss"] = _median(loss)
        dist = [r["final_dist_to_truth"] for r in recs if r.get("final_dist_to_truth") is not None]
        out["median_final_dist"] = _median(dist)
        out["wrong_low_loss"] = sum(1 for r in recs if r["final_loss"] is not None and r["final_loss"] < 1e-2
                                    and r["first_hit"][metric] is None)
    else:
        out["accepted"] = sum(r["accepted"] for r in recs) / n
    return out


def best_spec(runs: dict[str, dict], attack: str) -> str:
    """The setting with the highest hit rate, among those run on every studied position (a setting
    run on the first group only is not compared on a rate of a different set of positions)."""
    full = max(len(data["records"]) for data in runs.values())

    def key(spec):
        s = summarise(runs[spec], attack)
        if not s["n"]:
            return (False, -1, 0)
        return (s["n"] == full, s["hits"] / s["n"],
                -s["median_first_hit"] if math.isfinite(s["median_first_hit"]) else -1e9)
    return max(runs, key=key)


def _fmt_num(x, digits=0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "not within K"
    return f"{x:.{digits}f}" if digits else f"{int(round(x))}"


def table(model: str, attack: str, runs: dict[str, dict]) -> list[str]:
    order = sorted(runs, key=lambda spec: (spec != PAPER, spec))
    head = ["setting", "n"] + [f"<= {k}" for k in THRESHOLDS] + ["median first hit (all / hits)", "median final rank",
                                                                 "s/position", "hits by t"]
    if attack == "continuous":
        head += ["final rank < 100 / 2000 / 10000", "within K: L1 / L2 / cos", "loss exit", "median final loss",
                 "median dist to truth", "NaN"]
    else:
        head += ["accepted"]
    lines = [f"#### {model}: {attack}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for spec in order:
        s = summarise(runs[spec], attack)
        if not s["n"]:
            lines.append(f"| `{spec}` | 0 | " + " | ".join(["-"] * (len(head) - 3)) + f" | skipped: {s['note']} |")
            continue
        by_t = " ".join(f"t{t}:{a}/{b}" for t, (a, b) in sorted(s["by_t"].items()))
        row = [f"`{spec}`", str(s["n"])] + [cell(s["within"][k], ".2f") for k in THRESHOLDS] + [
            f"{_fmt_num(s['median_first_hit'])} / {_fmt_num(s['median_first_hit_among_hits'])}",
            _fmt_num(s["median_final_rank"]), f"{s['mean_seconds']:.1f}", by_t]
        if attack == "continuous":
            m = s["within_K_by_metric"]
            lt = s["final_rank_lt"]
            cos = "n/a" if runs[spec]["setting"]["init"] == "zeros" and runs[spec].get("cosine_tie_bug") else f"{m['cosine']:.2f}"
            row += [f"{lt[100]:.2f} / {lt[2000]:.2f} / {lt[10000]:.2f}", f"{m['l1']:.2f} / {m['l2']:.2f} / {cos}",
                    f"{s['loss_exit']}/{s['n']}",
                    f"{s['median_final_loss']:.1e}", f"{s['median_final_dist']:.2f}", str(s["nonfinite"])]
        else:
            row += [f"{s['accepted']:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    any_run = next(iter(runs.values()))
    lines += ["", f"Environment of these runs: {_env_line(runs)}. Positions: {len(any_run['positions'])} "
              f"(prompt, t) pairs, t in {sorted({t for _, t in any_run['positions']})}.", ""]
    return lines


def _env_line(runs: dict[str, dict]) -> str:
    envs = {(d["env"]["torch"], d["env"]["threads"]) for d in runs.values()}
    dates = sorted(d["env"]["date"] for d in runs.values())
    torch_v = ", ".join(sorted({e[0] for e in envs}))
    threads = ", ".join(str(t) for t in sorted({e[1] for e in envs}))
    return f"torch {torch_v}, {threads} thread(s), CPU, started {dates[0]} .. {dates[-1]}"


def commands(all_runs) -> list[str]:
    seen = []
    for model in all_runs.values():
        for attack in model.values():
            for data in attack.values():
                if data["command"] not in seen:
                    seen.append(data["command"])
    return seen


def render_tables(all_runs) -> str:
    lines = [BEGIN, "", "_Generated by `python -m invbench.studies.study_published report`; do not edit by hand._", ""]
    for model, attacks in all_runs.items():
        for attack in ("continuous", "projection"):
            if attack in attacks:
                lines += table(model, attack, attacks[attack])
    lines += ["Run commands recorded in the result files (argv as run, cwd /work/study-runs):", "", "```"]
    lines += [f"python -m invbench.studies.study_published {c.split('study_published.py', 1)[-1].strip()}" for c in commands(all_runs)]
    lines += ["```", "", END]
    return "\n".join(lines)


def write_md(path: Path, tables: str) -> None:
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + tables + text[text.index(END) + len(END):]
    else:
        text = (text + "\n\n" if text else "") + tables + "\n"
    path.write_text(text)


def _series(rec: dict, K: int) -> tuple[list[int], list[int]]:
    steps, ranks = list(rec["traj_steps"]), list(rec["traj_rank"])
    if not steps:
        return [], []
    if rec.get("accepted"):  # projection: accepted at its last step (the true candidate, rank 0)
        steps.append(rec["steps_run"])
        ranks.append(0)
    elif steps[-1] < K:  # exited early: the proxy is frozen from there on
        steps.append(K)
        ranks.append(ranks[-1])
    return steps, ranks


def _rank_axes(ax, K: int) -> None:
    """Log-log axes of the true token's rank over K steps (both +1, so that 0 shows)."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1, K + 1)
    ax.set_ylim(0.8, 7e4)
    ax.set_xlabel("step + 1")
    ax.set_ylabel("rank of the true token + 1")
    ax.grid(True, which="major", alpha=0.3)


def plot(all_runs, model: str, path: Path, *, positions: int = 4) -> None:
    from matplotlib.figure import Figure

    attacks = [a for a in ("continuous", "projection") if a in all_runs.get(model, {})]
    fig = Figure(figsize=(6.2 * len(attacks), 9.0), layout="constrained")
    axes = fig.subplots(2, len(attacks), squeeze=False)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for col, attack in enumerate(attacks):
        runs = all_runs[model][attack]
        best = best_spec(runs, attack)
        default = PAPER if PAPER in runs else sorted(runs)[0]
        d_recs, b_recs = runs[default]["records"], runs[best]["records"]
        K = max(runs[default]["setting"]["steps"], runs[best]["setting"]["steps"])
        # a few positions: those the best setting recovers fastest and slowest, plus one it misses
        order = sorted(range(len(b_recs)), key=lambda i: (hit_step(b_recs[i], attack) is None,
                                                          hit_step(b_recs[i], attack) or 0))
        picks = [order[0], order[len(order) // 3], order[2 * len(order) // 3], order[-1]][:positions]
        ax = axes[0][col]
        for c, i in enumerate(dict.fromkeys(picks)):
            rec = b_recs[i]
            label = f"prompt {rec['prompt']}, t={rec['t']}"
            for recs, spec, style in ((d_recs, default, "--"), (b_recs, best, "-")):
                xs, ys = _series(recs[i], runs[spec]["setting"]["steps"])
                ax.plot([x + 1 for x in xs], [y + 1 for y in ys], style, color=colours[c % len(colours)],
                        lw=1.6 if style == "-" else 1.2, label=f"{label} ({'best' if spec == best else 'default'})")
        _rank_axes(ax, K)
        metric = "L1 to the proxy" if attack == "continuous" else "L2 to the proxy, among unbanned"
        ax.set_title(f"{attack}: 4 positions ({metric})\ndashed: default `{default}`, solid: best `{best}`", fontsize=10)
        ax.legend(fontsize=7, loc="lower left", ncol=1)
        # median and 25-75 % over all positions, each series carried to K
        ax = axes[1][col]
        grid = sorted({s for recs in (d_recs, b_recs) for r in recs for s in _series(r, K)[0]})
        for spec, recs, colour in ((default, d_recs, "tab:gray"), (best, b_recs, "tab:blue")):
            curves = []
            for r in recs:
                xs, ys = _series(r, runs[spec]["setting"]["steps"])
                if not xs:
                    continue
                curve, j = [], 0
                for g in grid:
                    while j + 1 < len(xs) and xs[j + 1] <= g:
                        j += 1
                    curve.append(ys[j] if g >= xs[0] else ys[0])
                curves.append(curve)
            if not curves:
                continue
            cols = list(zip(*curves))
            med = [_median(list(c)) + 1 for c in cols]
            lo = [sorted(c)[len(c) // 4] + 1 for c in cols]
            hi = [sorted(c)[(3 * len(c)) // 4] + 1 for c in cols]
            xs = [g + 1 for g in grid]
            ax.plot(xs, med, color=colour, lw=1.8, label=f"{'best' if spec == best else 'default'} `{spec}`: median")
            ax.fill_between(xs, lo, hi, color=colour, alpha=0.2, label="25-75 % of positions")
        _rank_axes(ax, K)
        ax.set_title(f"{attack}: all {len(b_recs)} positions", fontsize=10)
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(f"{model}: rank of the true token over steps (rank 0 = the commit candidate)", fontsize=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def compact(all_runs) -> dict:
    out: dict[str, Any] = {"schema": 1, "thresholds": THRESHOLDS, "runs": []}
    for model, attacks in all_runs.items():
        for attack, runs in attacks.items():
            for spec, data in runs.items():
                recs = []
                for r in data["records"]:
                    r = dict(r)
                    # trajectory steps are the shared grid except an early exit's last point: keep both,
                    # but as one "step:rank" string per record to stay small
                    steps, ranks = r.pop("traj_steps", []), r.pop("traj_rank", [])
                    r["traj"] = " ".join(f"{s}:{k}" for s, k in zip(steps, ranks))
                    for key in ("seconds", "final_loss", "best_loss", "final_dist_to_truth", "final_proxy_norm",
                                "true_norm", "grad_norm_median"):
                        if isinstance(r.get(key), float):
                            r[key] = float(f"{r[key]:.4g}")
                    recs.append(r)
                out["runs"].append({"model": model, "attack": attack, "spec": spec, "setting": data["setting"],
                                    "env": data["env"], "command": data["command"], "complete": data["complete"],
                                    "summary": summarise(data, attack), "records": recs})
    return out


def report(runs: Path, *, md: str | None, png: str | None, json_out: str | None) -> None:
    all_runs = load_runs(runs)
    tables = render_tables(all_runs)
    if md:
        write_md(Path(md), tables)
    else:
        print(tables)
    if png:
        model = "smollm2-135m" if "smollm2-135m" in all_runs else next(iter(all_runs))
        plot(all_runs, model, Path(png))
    if json_out:
        Path(json_out).write_text(json.dumps(_finite(compact(all_runs)), separators=(",", ":"), allow_nan=False))


def _finite(x):
    """JSON has no inf/nan: a median that is not within K (inf) or undefined (nan) becomes null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
