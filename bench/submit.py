"""Submitting a defence to a protocol's leaderboard, and verifying an entry by rerunning it.

`submit` runs the protocol for one defence into `runs/<protocol>/<entry-id>/` (rerunning the same
submission resumes there) and writes `leaderboards/<protocol>/<entry-id>.json`. `verify` reruns an
entry's protocol, or its first N prompts, and compares every metric with the entry within the
tolerances below.

Tolerances (absolute unless said otherwise):

- exact match, token accuracy, similarity (per attack, and the worst case): 0.05 on a full rerun.
  Attacks and noise are seeded, so a rerun on the same hardware reproduces the entry exactly; the
  margin absorbs floating-point differences between devices flipping a prompt or two.
- On a subset of N of the entry's n prompts the subset's mean estimates the entry's, so the
  tolerance widens by 3 standard errors of a mean of N values in [0, 1] drawn without
  replacement, with the variance bounded by p(1 - p) for the entry's value p:
  0.05 + 3 * sqrt(p(1 - p) / N * (n - N) / (n - 1)). At p = 0 or 1 every prompt behaved alike,
  and so must the subset's.
- detector AUROC: 0.10 on a full rerun when both runs define it; not checked on subsets (a few
  prompts give it no meaning) nor when one run leaves it undefined.
- utility: top-1 agreement and cosine 1e-3 (plus the sampling margin above on subsets);
  KL and perplexity ratio 1e-3 relative, full reruns only. The defence's noise is drawn on the CPU
  from per-prompt seeds, so only float error separates reruns.
- the configuration hash must be equal on a full rerun (same model recipe, prompts, defence and
  attack settings); seconds per token is shown, never checked (it measures the hardware).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .errors import InvbenchError
from .formats import cell
from .entries import (NAME, PRIVACY_METRICS, SCALAR, SCHEMA_VERSION, check_entry, check_value, read_entry,
                      slugify, validate_entry_id)
from .protocols import Protocol, get_protocol
from .registry import is_file_spec
from .folder import read_config
from .results import write_json_atomic
from .summary import RunSummary

FULL_PRIVACY_TOL = 0.05
AUROC_TOL = 0.10
UTILITY_ABS_TOL = 1e-3
UTILITY_REL_TOL = 1e-3
SUBSET_SIGMAS = 3.0
ATTACK_FIELDS = ("n", "exact_match", "token_accuracy", "similarity", "detector_auroc", "detector_note",
                 "detector_tpr_at_1pct_fpr", "detector_threshold", "detector_flag_rate", "seconds_per_token",
                 "tokens_per_second", "config", "search_failure_rate", "verdict", "diagnostics")
RADIUS_FIELDS = ("scope", "min_radius", "median_radius", "min_sigma_certified", "median_sigma_certified", "note")


class SubmitError(InvbenchError, ValueError):
    """A submission or verification cannot go ahead; printed as one line."""


# --- submit -------------------------------------------------------------------------------------

def recorded_spec(spec: str) -> str:
    """How the entry names where its defence came from: a registered name as is, a plug-in file
    by its base name only (the submitter's local path means nothing to anyone else)."""
    if is_file_spec(spec):
        path, cls = spec.rsplit(":", 1)
        return f"{Path(path).name}:{cls}"
    return spec


def build_entry(summary: RunSummary, *, protocol: Protocol, entry_id: str, name: str, authors: str, url: str,
                spec: str, day: str | None = None, git_commit: str | None = None) -> dict[str, Any]:
    """The leaderboard entry for one finished run (the RunSummary `invbench.runner.run` returns)."""
    data = summary.to_dict()
    attacks = {a: {k: m[k] for k in ATTACK_FIELDS} for a, m in data["attacks"].items()}
    verdict = data["verdict"] or {"verdict": None, "attack": None, "says": "", "blind_token_accuracy": None}
    return {
        "schema_version": SCHEMA_VERSION,
        "entry_id": entry_id,
        "name": name,
        "authors": authors,
        "url": url,
        "date": day or datetime.now(timezone.utc).date().isoformat(),
        "protocol": protocol.to_dict(),
        "model": data["model"],
        "dataset": data["dataset"],
        "n": data["n"],
        "tokens": data["tokens"],
        "seed": data["seed"],
        "defense": {**data["defense"], "spec": recorded_spec(spec)},
        "attacks": attacks,
        "worst_case": data["worst_case"],
        "detector_auroc": {a: m["detector_auroc"] for a, m in attacks.items()},
        "verdict": {k: verdict[k] for k in ("verdict", "attack", "says", "blind_token_accuracy")},
        "radius": {k: data["radius"][k] for k in RADIUS_FIELDS} if data["radius"] else None,
        "utility": data["utility"],
        "versions": data["versions"],
        "config_hash": data["config_hash"],
        "hardware": {"device": data["device"]},
        "invbench_version": __version__,
        "git_commit": git_commit,  # the package version alone does not pin the attacks' code
        "wall_seconds": data["wall_seconds"],
    }


def _preflight(*, name: str, authors: str, url: str, described: dict[str, Any]) -> None:
    """Check what the submitter typed before spending a run on it (the whole entry is checked
    again before it is written)."""
    checks = [("--name", "#/properties/name", name), ("--authors", "#/properties/authors", authors),
              ("--url", "#/properties/url", url),
              ("the defence's name", "#/properties/defense/properties/name", described["name"])]
    checks += [(f"--param {key}", SCALAR, value) for key, value in described["params"].items()]
    checks += [(f"--param {key}", NAME, key) for key in described["params"]]
    problems = [f"{label}: {message}" for label, part, value in checks if (message := check_value(value, part))]
    if problems:
        raise SubmitError("; ".join(problems))


def _refuse_foreign(entry_path: Path, run_dir: Path, described: dict[str, Any]) -> None:
    """An entry id belongs to one defence configuration: never overwrite another's entry or run."""
    if entry_path.exists():
        try:
            existing = json.loads(entry_path.read_text(encoding="utf-8")).get("defense", {})
        except (OSError, ValueError, AttributeError):
            existing = None
        if not isinstance(existing, dict) or {k: existing.get(k) for k in described} != described:
            raise SubmitError(f"{entry_path} already holds a different submission; choose another --name or --entry-id")
    config = read_config(run_dir)  # a damaged config.json is refused there, in one line
    if config is not None:
        previous = config.get("defining", {}).get("defense") if isinstance(config.get("defining"), dict) else None
        if previous != described:
            raise SubmitError(f"{run_dir} holds a run of another defence configuration; choose another --name "
                              "or --entry-id, or remove that folder")


def run_commit(run_dir: Path) -> str | None:
    """The project's git commit a run recorded in its config.json (None outside a checkout)."""
    commit = (read_config(run_dir) or {}).get("git_commit")
    return commit if isinstance(commit, str) else None


def submit(*, defense: str, defense_params: dict[str, Any], protocol: Protocol | str, name: str, authors: str = "",
           url: str = "", entry_id: str | None = None, runs_dir: Path = Path("runs"),
           board_dir: Path = Path("leaderboards"), device: str = "auto",
           echo: Callable[[str], None] = print) -> Path:
    """Run `protocol` for one defence and write its entry; returns the entry's path. Rerunning
    the same submission resumes the run where it stopped."""
    from invbench.defenses import make_defense

    from .runner import run

    protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
    entry_id = validate_entry_id(entry_id) if entry_id else slugify(name)
    run_dir = Path(runs_dir) / protocol.name / entry_id
    entry_path = Path(board_dir) / protocol.name / f"{entry_id}.json"
    described = make_defense(defense, defense_params).describe()  # bad parameters fail before any model loads
    _preflight(name=name, authors=authors, url=url, described=described)
    _refuse_foreign(entry_path, run_dir, described)

    echo(f"submitting {entry_id!r} to protocol {protocol.name}: running into {run_dir}")
    cfg = protocol.run_config(defense=defense, defense_params=defense_params, out=str(run_dir), device=device)
    summary = run(cfg, echo=echo)
    entry = build_entry(summary, protocol=protocol, entry_id=entry_id, name=name, authors=authors, url=url,
                        spec=defense, git_commit=run_commit(run_dir))
    problems = check_entry(entry, entry_path, protocol_dir_name=protocol.name,
                           protocol_definition=protocol.to_dict())
    if problems:
        raise SubmitError("the entry would not be valid: " + "; ".join(f"{p.field}: {p.message}" for p in problems))
    write_json_atomic(entry_path, entry)
    return entry_path


# --- verify -------------------------------------------------------------------------------------

@dataclass
class MetricCheck:
    """One metric of the entry against the rerun. `ok` is None when the metric is only shown."""

    metric: str
    entry: Any
    rerun: Any
    tolerance: float | None = None
    ok: bool | None = None
    note: str = ""

    @property
    def difference(self) -> float | None:
        if isinstance(self.entry, (int, float)) and isinstance(self.rerun, (int, float)):
            return self.rerun - self.entry
        return None


@dataclass
class VerifyReport:
    entry_path: Path
    run_dir: Path
    subset: int | None
    n_entry: int
    checks: list[MetricCheck] = field(default_factory=list)
    hardware: tuple[str, str] = ("", "")  # the entry's device, the rerun's
    commits: tuple[str | None, str | None] = (None, None)  # the entry's git commit, the rerun's

    @property
    def ok(self) -> bool:
        return all(c.ok is not False for c in self.checks)

    @property
    def failures(self) -> list[MetricCheck]:
        return [c for c in self.checks if c.ok is False]

    def format(self) -> str:
        scope = f"first {self.subset} of {self.n_entry} prompts" if self.subset else f"all {self.n_entry} prompts"
        lines = [f"verify {self.entry_path} ({scope}; rerun in {self.run_dir})",
                 f"hardware: entry {self.hardware[0]}; rerun {self.hardware[1]}",
                 f"git commit: entry {cell(self.commits[0])}; rerun {cell(self.commits[1])}"
                 + (" (different code: differences may come from it)" if self.commits[0] != self.commits[1] else ""),
                 f"{'metric':<36} {'entry':>10} {'rerun':>10} {'diff':>9} {'tol':>8}  result"]
        for c in self.checks:
            result = {True: "ok", False: "FAIL", None: "shown"}[c.ok]
            lines.append(f"{c.metric:<36} {cell(c.entry, '.4f'):>10} {cell(c.rerun, '.4f'):>10} {cell(c.difference, '+.4f'):>9} "
                         f"{cell(c.tolerance, '.4f'):>8}  {result}{f' ({c.note})' if c.note else ''}")
        verdict = "PASSED" if self.ok else f"FAILED: {', '.join(c.metric for c in self.failures)}"
        lines.append(f"verification {verdict}")
        return "\n".join(lines)


def sampling_margin(p: float, *, subset: int, n: int, lo: float = 0.0, hi: float = 1.0) -> float:
    """SUBSET_SIGMAS standard errors of the mean of `subset` of `n` values in [lo, hi] whose mean
    is p (variance at most (p - lo)(hi - p); finite-population correction for drawing without
    replacement)."""
    if subset >= n:
        return 0.0
    variance = max(p - lo, 0.0) * max(hi - p, 0.0)
    return SUBSET_SIGMAS * math.sqrt(variance / subset * (n - subset) / (n - 1))


def _within(check: MetricCheck, tolerance: float, *, relative: bool = False) -> MetricCheck:
    """Pass when |rerun - entry| <= tolerance (times |entry| when relative, with a 1e-6 floor so
    that a zero stays checkable); both undefined passes, one undefined fails."""
    if check.entry is None or check.rerun is None:
        check.ok = check.entry is None and check.rerun is None
        check.note = "" if check.ok else "defined in only one run"
        return check
    check.tolerance = max(tolerance * abs(check.entry), 1e-6) if relative else tolerance
    check.ok = abs(check.rerun - check.entry) <= check.tolerance + 1e-12
    return check


def compare(entry: dict[str, Any], summary: RunSummary, *, subset: int | None) -> list[MetricCheck]:
    """Every metric of the entry against the rerun's summary, with the tolerances of this module."""
    summary = summary.to_dict()
    n = entry["n"]
    full = subset is None

    def bounded(metric: str, p: Any, q: Any, base: float, lo: float = 0.0, hi: float = 1.0) -> MetricCheck:
        margin = 0.0 if full or p is None else sampling_margin(p, subset=subset, n=n, lo=lo, hi=hi)
        return _within(MetricCheck(metric, p, q), base + margin)

    checks = [MetricCheck("n", subset or n, summary["n"], ok=summary["n"] == (subset or n))]
    for attack, m in entry["attacks"].items():
        rerun = summary["attacks"].get(attack)
        if rerun is None:
            checks.append(MetricCheck(f"attacks.{attack}", "present", "missing", ok=False))
            continue
        for metric in PRIVACY_METRICS:
            checks.append(bounded(f"attacks.{attack}.{metric}", m[metric], rerun[metric], FULL_PRIVACY_TOL))
        auroc = MetricCheck(f"attacks.{attack}.detector_auroc", m["detector_auroc"], rerun["detector_auroc"])
        if full and auroc.entry is not None and auroc.rerun is not None:
            checks.append(_within(auroc, AUROC_TOL))
        else:
            auroc.note = "not checked on a subset" if not full else "undefined in a run: not checked"
            checks.append(auroc)
        checks.append(MetricCheck(f"attacks.{attack}.seconds_per_token", m["seconds_per_token"],
                                  rerun["seconds_per_token"], note="hardware-dependent"))
    worst = entry["worst_case"]["exact_match"]
    checks.append(bounded("worst_case.exact_match", worst["value"], summary["worst_case"]["exact_match"]["value"],
                          FULL_PRIVACY_TOL))
    checks += _utility_checks(entry["utility"], summary["utility"], bounded, full=full)
    if full:
        same = entry["config_hash"] == summary["config_hash"]
        checks.append(MetricCheck("config_hash", entry["config_hash"], summary["config_hash"], ok=same,
                                  note="" if same else "a different model recipe, prompts or settings"))
    return checks


def _utility_checks(entry: dict[str, Any], rerun: dict[str, Any], bounded: Callable, *,
                    full: bool) -> list[MetricCheck]:
    checks = [bounded("utility.top1_agreement", entry.get("top1_agreement"), rerun.get("top1_agreement"),
                      UTILITY_ABS_TOL),
              bounded("utility.cosine", entry.get("cosine"), rerun.get("cosine"), UTILITY_ABS_TOL, lo=-1.0)]
    for metric in ("kl_clean_defended", "perplexity_ratio"):
        check = MetricCheck(f"utility.{metric}", entry.get(metric), rerun.get(metric))
        if full:
            checks.append(_within(check, UTILITY_REL_TOL, relative=True))
        else:
            check.note = "not checked on a subset"
            checks.append(check)
    return checks


def verify(entry_path: Path, *, subset: int | None = None, device: str = "auto", defense: str | None = None,
           runs_dir: Path = Path("runs"), echo: Callable[[str], None] = print) -> VerifyReport:
    """Rerun an entry's protocol (all prompts, or the first `subset`) and compare every metric.
    `defense` loads the defence from elsewhere (a plug-in file) instead of the entry's name."""
    from invbench.defenses import make_defense

    from .runner import run

    entry = read_entry(Path(entry_path)).data  # refuses an entry whose protocol differs from the registered one
    protocol = get_protocol(entry["protocol"]["name"])
    n = entry["n"]
    if subset is not None and not 1 <= subset <= n:
        raise SubmitError(f"--subset must be between 1 and the entry's {n} prompts, got {subset}")
    subset = None if subset == n else subset
    spec = _defense_spec(entry["defense"], defense)
    described = make_defense(spec, entry["defense"]["params"]).describe()
    expected = {"name": entry["defense"]["name"], "params": entry["defense"]["params"]}
    if described != expected:
        raise SubmitError(f"the defence {spec!r} describes itself as {described}, the entry as {expected}")

    run_dir = Path(runs_dir) / "verify" / protocol.name / (entry["entry_id"] + (f"-n{subset}" if subset else ""))
    cfg = protocol.run_config(defense=spec, defense_params=entry["defense"]["params"], out=str(run_dir),
                              device=device, n=subset)
    summary = run(cfg, echo=echo)
    return VerifyReport(Path(entry_path), run_dir, subset, n, compare(entry, summary, subset=subset),
                        hardware=(entry["hardware"]["device"], summary.device),
                        commits=(entry.get("git_commit"), run_commit(run_dir)))


def _defense_spec(recorded: dict[str, Any], override: str | None) -> str:
    """What to load the entry's defence from: the override, else its registered name. A plug-in
    file cannot be found from its base name, so it has to be passed."""
    if override:
        return override
    spec = recorded.get("spec") or recorded["name"]
    if is_file_spec(spec):
        raise SubmitError(f"this entry's defence came from a plug-in file ({spec}); pass --defense path/to/{spec}")
    return spec
