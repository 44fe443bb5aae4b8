"""Submitting a defence to a protocol's leaderboard, and verifying an entry by rerunning it.

`submit` runs the protocol for one defence into `runs/<protocol>/<entry-id>/` (rerunning the same
submission resumes there) and writes `leaderboards/<protocol>/<entry-id>.json`: the submission's
metadata, the run's RunSummary as it is, and its transcript (what each attack recovered of each
prompt, from records.jsonl: `invbench.transcript`).

`verify` re-measures an entry. It reruns a random subset of the entry's prompts, drawn with a fresh
seed that the verification record keeps (anyone can redo the same draw with `--draw-seed`), in a new folder
that nothing else wrote, and compares:

- prompt by prompt (`invbench.prompt_checks`): each rerun prompt's recovered ids, similarity,
  search-failure flag and utility with the entry's own record of that prompt. The entry's summary
  means were checked on read to be its transcript's, so a forged mean needs forged prompts, and a
  random subset of `prompt_checks.required_subset(n)` prompts catches a forgery on a quarter of them
  with probability at least 0.99 (docs/SUBMITTING.md gives the arithmetic). Tolerances come from the
  rerun and the attack's float facts, never from the entry's claims;
- every field that the summary schema (`bench/schemas/summary.schema.json`) marks with `x-verify`,
  by that field's kind of tolerance (`KINDS`, absolute unless said otherwise):
  - fraction (exact match, token accuracy, similarity, search-failure rate, flag rate, per attack
    and the worst case): 0.05 on a full rerun (attacks and noise are seeded, so a full rerun on the
    same hardware reproduces the entry exactly). On a subset, what the prompt-by-prompt comparison
    covers is compared there; the rest (a flag rate; an entry of schema 4's similarity) must lie
    within 0.05 plus 3 standard errors of the subset's mean of the rerun's own value p:
    0.05 + 3 * sqrt(p(1 - p) / N * (n - N) / (n - 1)) (drawn without replacement), or the farther side
    of the Wilson interval around p where that is wider (at p = 0 or 1 the first is 0: `sampling_margin`);
  - detector (AUROC, TPR at 1% FPR): 0.10 on a full rerun when both runs define it;
  - utility (top-1 agreement, cosine): 1e-3, per prompt on a subset (or with the sampling margin of
    the rerun's value for an entry that did not record its prompts' utility);
  - relative (KL, perplexity ratio, the certified radius): 1e-3 of the entry's value, full reruns;
  - guarantee (epsilon, delta): 1e-3 relative on every rerun: it follows from the parameters;
  - equal (verdicts, the radius's scope, the configuration hash): equal on a full rerun;
    equal-always (the blind guess's ids): equal on every rerun;
  - per-prompt (the certified radius of each prompt): each prompt the rerun covers, 1e-3 relative;
  - size (the number of prompts): the rerun's, exactly. shown (seconds per token): never checked.
"""
from __future__ import annotations

import json
import math
import secrets
import shlex
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from . import prompt_checks, summary as summary_module, verification
from .entries import (NAME, SCALAR, SCHEMA_VERSION, check_entry, check_value, name_skeleton, parse_entry_file,
                      read_entry, slugify,
                      validate_entry_id)
from .errors import InvbenchError
from .folder import read_config, read_run_records
from .formats import cell, column
from .protocols import Protocol, get_protocol
from .registry import is_file_spec
from .results import write_json_atomic
from .summary import RunSummary
from .transcript import Transcript, build_transcript

FULL_PRIVACY_TOL = 0.05
AUROC_TOL = 0.10
UTILITY_ABS_TOL = 1e-3
UTILITY_REL_TOL = 1e-3
SUBSET_SIGMAS = 3.0
DEFENSE_NAME = "#/$defs/shown_summary/properties/defense/properties/name"  # for _preflight


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
                spec: str, transcript: Transcript, day: str | None = None, git_commit: str | None = None,
                defense_code: dict[str, Any] | None = None) -> dict[str, Any]:
    """The leaderboard entry for one finished run: the submission's metadata (with, for an outside
    defence, what identifies its code: `defenses.registry.code_identity`), the run's summary (the
    RunSummary `invbench.runner.run` returns) as it is, and what each attack recovered of each prompt
    (`run_transcript`)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "entry_id": entry_id,
        "name": name,
        "authors": authors,
        "url": url,
        "date": day or datetime.now(timezone.utc).date().isoformat(),
        "protocol": protocol.to_dict(),
        "defense_spec": recorded_spec(spec),
        "git_commit": git_commit,  # the package version alone does not pin the attacks' code
        **({"defense_code": defense_code} if defense_code is not None else {}),
        "summary": summary.to_dict(),
        "transcript": transcript.to_dict(),
    }


def run_transcript(run_dir: Path, protocol: Protocol, summary: RunSummary, *,
                   echo: Callable[[str], None] = print) -> Transcript:
    """What each attack recovered of each prompt of a finished run, from its records.jsonl, with the
    tokens' text from the protocol's model's tokenizer (loaded again: the records hold ids, and a
    resumed run's records were written before this code could add text to them)."""
    from invbench.leaks.models import load_model

    tokenizer = load_model(protocol.model, seed=protocol.seed, notify=echo).tokenizer
    records = read_run_records(run_dir)
    prompts = sorted({r["prompt_index"] for r in records if r["attack"] in summary.attacks})
    return build_transcript(records, attacks=list(summary.attacks), prompt_indices=prompts,
                            token_text=lambda token: tokenizer.decode([token]))


def _preflight(*, name: str, authors: str, url: str, described: dict[str, Any]) -> None:
    """Check what the submitter typed before spending a run on it (the whole entry is checked
    again before it is written)."""
    checks = [("--name", "#/properties/name", name), ("--authors", "#/properties/authors", authors),
              ("--url", "#/properties/url", url),
              ("the defence's name", DEFENSE_NAME, described["name"])]
    checks += [(f"--param {key}", SCALAR, value) for key, value in described["params"].items()]
    checks += [(f"--param {key}", NAME, key) for key in described["params"]]
    problems = [f"{label}: {message}" for label, part, value in checks if (message := check_value(value, part))]
    if problems:
        raise SubmitError("; ".join(problems))


def _refuse_foreign(entry_path: Path, run_dir: Path, described: dict[str, Any]) -> None:
    """An entry id belongs to one defence configuration (`described`: its name and parameters): never
    overwrite another's entry or run."""
    if entry_path.exists():
        data, problem = parse_entry_file(entry_path)  # bounded, as every entry read
        try:
            existing = None if problem else data.get("summary", data).get("defense", {})  # version 2: at the top
        except AttributeError:
            existing = None
        if not isinstance(existing, dict) or {k: existing.get(k) for k in described} != described:
            raise SubmitError(f"{entry_path} already holds a different submission; choose another --name or --entry-id")
    config = read_config(run_dir)  # a damaged config.json is refused there, in one line
    if config is not None:
        previous = config.get("defining", {}).get("defense") if isinstance(config.get("defining"), dict) else None
        if not isinstance(previous, dict) or {k: previous.get(k) for k in described} != described:
            raise SubmitError(f"{run_dir} holds a run of another defence configuration; choose another --name "
                              "or --entry-id, or remove that folder")


def _refuse_look_alike(entry_path: Path, name: str) -> None:
    """A name that looks like another entry's of the same board (`entries.name_skeleton`: case, width,
    spacing and Latin-looking Cyrillic or Greek letters aside) would make a second row that reads as the
    first: refused before any run."""
    mine = name_skeleton(name)
    for other in sorted(entry_path.parent.glob("*.json")) if entry_path.parent.is_dir() else ():
        if other == entry_path or verification.is_record(other):
            continue
        data, problem = parse_entry_file(other)
        theirs = data.get("name") if not problem and isinstance(data, dict) else None
        if isinstance(theirs, str) and name_skeleton(theirs) == mine:
            raise SubmitError(f"--name {name!r} looks the same as the name of {other.name} ({theirs!r}); choose a "
                              "distinct name")


def run_commit(run_dir: Path) -> str | None:
    """The project's git commit a run recorded in its config.json (None outside a checkout)."""
    commit = (read_config(run_dir) or {}).get("git_commit")
    return commit if isinstance(commit, str) else None


def submit(*, defense: str, defense_params: dict[str, Any], protocol: Protocol | str, name: str, authors: str = "",
           url: str = "", entry_id: str | None = None, runs_dir: Path = Path("runs"),
           board_dir: Path = Path("leaderboards"), device: str = "auto",
           echo: Callable[[str], None] = print, engine: Any = None) -> Path:
    """Run `protocol` for one defence and write its entry; returns the entry's path. Rerunning
    the same submission resumes the run where it stopped. `engine` (`invbench.cluster.Engine`): where the
    attacks run (`ray`: in shards over a cluster; the entry is the same)."""
    from invbench.defenses import make_defense
    from invbench.defenses.checks import described as checked
    from invbench.defenses.registry import code_identity

    from .runner import run

    protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
    entry_id = validate_entry_id(entry_id) if entry_id is not None else slugify(name)  # "" is refused, not ignored
    run_dir = Path(runs_dir) / protocol.name / entry_id
    entry_path = Path(board_dir) / protocol.name / f"{entry_id}.json"
    built = make_defense(defense, defense_params)  # bad parameters fail before any model loads
    checked(built, tokens=protocol.tokens)  # and a plug-in whose description or guarantee cannot be recorded
    described = {k: built.describe()[k] for k in DEFINING}
    _preflight(name=name, authors=authors, url=url, described=described)
    _refuse_foreign(entry_path, run_dir, described)
    _refuse_look_alike(entry_path, name)

    echo(f"submitting {entry_id!r} to protocol {protocol.name}: running into {run_dir}")
    cfg = protocol.run_config(defense=defense, defense_params=defense_params, out=str(run_dir), device=device)
    summary = run(cfg, echo=echo, engine=engine)
    entry = build_entry(summary, protocol=protocol, entry_id=entry_id, name=name, authors=authors, url=url,
                        spec=defense, transcript=run_transcript(run_dir, protocol, summary, echo=echo),
                        git_commit=run_commit(run_dir), defense_code=code_identity(defense))
    problems = check_entry(entry, entry_path, protocol_dir_name=protocol.name,
                           protocol_definition=protocol.to_dict())
    if problems:
        raise SubmitError("the entry would not be valid: " + "; ".join(f"{p.field}: {p.message}" for p in problems))
    if holds_the_same_results(entry_path, entry):
        echo(f"entry {entry_path} already holds these results: left as it is (rewriting it would only change its "
             "date and timing, and void its verification record)")
        return entry_path
    write_json_atomic(entry_path, entry)
    return entry_path


# What a resubmission of a finished run changes without a new result: when it was written (the entry's date), and
# the timing and environment of the session that reopened the run (these summary fields).
RESUBMISSION_SUMMARY_NOISE = ("wall_seconds", "device", "versions")


def holds_the_same_results(entry_path: Path, entry: dict[str, Any]) -> bool:
    """Whether the entry file at `entry_path` equals `entry` but for its date and RESUBMISSION_SUMMARY_NOISE (e.g.
    `invbench submit` run again on a finished run: it resumes with nothing to attack and scores again)."""
    data, problem = parse_entry_file(entry_path)
    if problem or not isinstance(data, dict) or not isinstance(data.get("summary"), dict):
        return False

    def results(whole: dict[str, Any]) -> dict[str, Any]:
        summary = {k: v for k, v in whole["summary"].items() if k not in RESUBMISSION_SUMMARY_NOISE}
        return {**{k: v for k, v in whole.items() if k != "date"}, "summary": summary}

    return results(data) == results(json.loads(json.dumps(entry)))  # as the file would hold it


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
    subset: int | None  # None: every prompt
    n_entry: int
    checks: list[MetricCheck] = field(default_factory=list)
    hardware: tuple[str, str] = ("", "")  # the entry's device, the rerun's
    commits: tuple[str | None, str | None] = (None, None)  # the entry's git commit, the rerun's
    record: Path | None = None  # the verification record written beside the entry
    seed: int | None = None  # the draw of the subset (None: every prompt)
    prompt_indices: list[int] = field(default_factory=list)  # the prompts rerun
    prompts: prompt_checks.PromptComparison | None = None

    @property
    def required(self) -> int:
        """The subset that catches a forgery on a quarter of the prompts with probability 0.99."""
        return prompt_checks.required_subset(self.n_entry)

    @property
    def ok(self) -> bool:
        return all(c.ok is not False for c in self.checks) and (self.prompts is None or self.prompts.ok)

    @property
    def failures(self) -> list[MetricCheck]:
        return [c for c in self.checks if c.ok is False]

    @property
    def failed_names(self) -> list[str]:
        return [c.metric for c in self.failures] + (self.prompts.failures if self.prompts else [])

    def format(self) -> str:
        if self.subset:
            chance = prompt_checks.detection_probability(
                n=self.n_entry, subset=self.subset,
                forged=max(1, math.ceil(prompt_checks.FORGED_FRACTION * self.n_entry - 1e-9)))
            scope = (f"random {self.subset} of {self.n_entry} prompts, seed {self.seed}: catches a forgery on a quarter "
                     f"of the prompts with probability {chance:.3f}")
        else:
            scope = f"all {self.n_entry} prompts"
        width = max([36] + [len(c.metric) for c in self.checks])
        lines = [f"verify {self.entry_path} ({scope}; rerun in {self.run_dir})",
                 f"hardware: entry {self.hardware[0]}; rerun {self.hardware[1]}",
                 f"git commit: entry {cell(self.commits[0])}; rerun {cell(self.commits[1])}"
                 + (" (different code: differences may come from it)" if self.commits[0] != self.commits[1] else ""),
                 f"{'metric':<{width}} {'entry':>10} {'rerun':>10} {'diff':>9} {'tol':>8}  result"]
        for c in self.checks:
            result = {True: "ok", False: "FAIL", None: "shown"}[c.ok]
            lines.append(f"{c.metric:<{width}} {column(c.entry):>10} {column(c.rerun):>10} "
                         f"{column(c.difference, '+.4f'):>9} {column(c.tolerance):>8}  {result}"
                         f"{f' ({c.note})' if c.note else ''}")
        if self.prompts is not None:
            p = self.prompts
            lines.append(f"prompt by prompt ({', '.join(map(str, self.prompt_indices))}): {p.compared} answers compared, "
                         f"{p.equal} identical, {p.float_ties} float ties, {len(p.failures)} differing; "
                         f"{p.utility_compared} prompts' utility compared")
            lines += [f"  FAIL {failure}" for failure in p.failures[:20]]
        verdict = "PASSED" if self.ok else f"FAILED: {', '.join(self.failed_names[:5])}"
        lines.append(f"verification {verdict}")
        if self.record:
            lines.append(f"verification record: {self.record} (commit it with the entry: the board marks the entry "
                         "verified while the entry file is unchanged)")
        return "\n".join(lines)


def sampling_margin(p: float, *, subset: int, n: int, lo: float = 0.0, hi: float = 1.0) -> float:
    """How far the mean of all `n` values in [lo, hi] may lie from p, the mean of a random `subset` of them:
    SUBSET_SIGMAS standard errors (variance at most (mu - lo)(hi - mu); finite-population correction for
    drawing without replacement), as the larger of the plug-in (Wald) margin at p and the Wilson interval's
    farther side, and never more than the unseen prompts can move the mean (all of them at lo or at hi).
    Wald alone is 0 at p = lo or hi: a C4 subset of 11 with no flagged prompt refused an entry whose 25
    prompts had 2 (drawing neither happens 3 times in 10); Wilson's upper side there is z^2 / (N' + z^2),
    N' the subset's effective size."""
    if subset >= n:
        return 0.0
    z, size = SUBSET_SIGMAS, subset * (n - 1) / (n - subset)  # size: the variance is u(1 - u) / size
    u = min(max((p - lo) / (hi - lo), 0.0), 1.0)
    wald = z * math.sqrt(u * (1 - u) / size)
    centre = (u + z * z / (2 * size)) / (1 + z * z / size)
    half = z * math.sqrt(u * (1 - u) / size + z * z / (4 * size * size)) / (1 + z * z / size)
    unseen = (n - subset) / n * max(u, 1 - u)  # the full mean is (N p + (n - N) rest) / n, rest in [lo, hi]
    return (hi - lo) * min(unseen, max(wald, u - (centre - half), centre + half - u))


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


@dataclass(frozen=True)
class Marked:
    """One field the summary schema marks for verification, with both runs' values."""

    path: tuple[str, ...]
    kind: str  # a key of KINDS; "present" for an attack the rerun lacks
    node: dict[str, Any]  # its schema node, $refs resolved (for the bounds of fractions)
    entry: Any
    rerun: Any

    @property
    def name(self) -> str:
        return ".".join(self.path)


def marked_fields(schema: dict[str, Any], entry: Any, rerun: Any) -> Iterator[Marked]:
    """Every field of `entry` (a summary as a dict) that `schema` marks with x-verify, in the
    schema's order, with the rerun's value beside it."""
    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:  # the summary schema refers only into its own $defs
            node = {**{k: v for k, v in node.items() if k != "$ref"}, **schema["$defs"][node["$ref"].split("/")[-1]]}
        return node

    def walk(node: dict[str, Any], a: Any, b: Any, path: tuple[str, ...]) -> Iterator[Marked]:
        node = resolve(node)
        if "x-verify" in node:
            yield Marked(path, node["x-verify"], node, a, b)
            return
        for alternative in node.get("oneOf", ()):
            yield from walk(alternative, a, b, path)
        if not isinstance(a, dict):
            return
        b = b if isinstance(b, dict) else {}
        named = node.get("properties", {})
        for key, sub in named.items():
            if key in a or key in b:
                yield from walk(sub, a.get(key), b.get(key), (*path, key))
        if isinstance(node.get("additionalProperties"), dict):
            for key in (k for k in a if k not in named):
                if key in b:
                    yield from walk(node["additionalProperties"], a[key], b[key], (*path, key))
                else:
                    yield Marked((*path, key), "present", {}, "present", "missing")

    yield from walk(schema, entry, rerun, ())


@dataclass(frozen=True)
class Scope:
    """What a rerun covers: all of the entry's n prompts (subset None) or a random `subset` of them, and
    which fields the prompt-by-prompt comparison already covers (`by_prompt`: field names, e.g.
    "attacks.sequence.exact_match", or their prefixes ending in ".")."""

    n: int
    subset: int | None
    by_prompt: tuple[str, ...] = ()

    @property
    def full(self) -> bool:
        return self.subset is None

    def covered(self, name: str) -> bool:
        return any(name == c or (c.endswith(".") and name.startswith(c)) for c in self.by_prompt)

    def margin(self, p: Any, node: dict[str, Any]) -> float:
        """The sampling margin of a mean over the subset, for a value within the node's bounds."""
        if self.full or p is None:
            return 0.0
        return sampling_margin(p, subset=self.subset, n=self.n, lo=node.get("minimum", 0.0), hi=node.get("maximum", 1.0))


def _size(check: MetricCheck, field: Marked, scope: Scope) -> MetricCheck:
    check.entry = scope.subset or field.entry
    check.ok = field.rerun == check.entry
    return check


def _by_prompt_or(tolerance: float) -> Callable[[MetricCheck, Marked, Scope], MetricCheck]:
    """A mean: on a subset, compared prompt by prompt where the entry recorded its prompts' values; else
    within `tolerance` plus the sampling margin of the rerun's own value (never the entry's claim)."""
    def check_kind(check: MetricCheck, field: Marked, scope: Scope) -> MetricCheck:
        if not scope.full and scope.covered(field.name):
            check.note = "compared prompt by prompt"
            return check
        rerun = field.rerun if isinstance(field.rerun, (int, float)) and not isinstance(field.rerun, bool) else None
        return _within(check, tolerance + scope.margin(rerun, field.node))
    return check_kind


_fraction = _by_prompt_or(FULL_PRIVACY_TOL)
_utility = _by_prompt_or(UTILITY_ABS_TOL)


def _full_only(compare_: Callable[[MetricCheck], MetricCheck]) -> Callable[[MetricCheck, Marked, Scope], MetricCheck]:
    """A check made on full reruns; on a subset the values are shown."""
    def check_kind(check: MetricCheck, field: Marked, scope: Scope) -> MetricCheck:
        if not scope.full:
            check.note = "not checked on a subset"
            return check
        return compare_(check)
    return check_kind


def _detector(check: MetricCheck) -> MetricCheck:
    if check.entry is None or check.rerun is None:
        check.note = "undefined in a run: not checked"
        return check
    return _within(check, AUROC_TOL)


def _equal(check: MetricCheck) -> MetricCheck:
    check.ok = check.entry == check.rerun
    return check


def _shown(check: MetricCheck, field: Marked, scope: Scope) -> MetricCheck:
    check.note = "hardware-dependent"
    return check


def _per_prompt(check: MetricCheck, field: Marked, scope: Scope) -> MetricCheck:
    """Each rerun prompt's certified radius against the entry's radius of the same prompt, within
    1e-3 relative, on full reruns and subsets alike: the gaps come from clean states, so a subset
    reproduces its prompts' values exactly (the radius's summary numbers, checked on full reruns only,
    are recomputed from these when the entry is read). Shown: the smallest radius compared."""
    def radii(prompts: Any) -> dict[Any, float]:
        return {p.get("prompt_index"): p["radius"] for p in prompts or [] if isinstance(p, dict)
                and isinstance(p.get("radius"), (int, float))} if isinstance(prompts, list) else {}

    ours, theirs = radii(field.entry), radii(field.rerun)
    if not ours or not theirs:
        check.entry = check.rerun = None
        check.note = "not recorded in the entry" if not ours else "not measured by the rerun"
        return check
    compared, missing = [i for i in theirs if i in ours], [i for i in theirs if i not in ours]
    check.entry = min(ours[i] for i in compared) if compared else None
    check.rerun = min(theirs.values())
    check.tolerance = UTILITY_REL_TOL
    off = [i for i in compared if abs(theirs[i] - ours[i]) > max(UTILITY_REL_TOL * abs(ours[i]), 1e-9)]
    check.ok = not missing and not off
    if missing:
        check.note = f"prompt {missing[0]} missing from the entry"
    elif off:
        check.note = f"prompt {off[0]}: entry {ours[off[0]]:.6g}, rerun {theirs[off[0]]:.6g}"
    else:
        check.note = f"{len(theirs)} prompts' radii, each within 0.1%"
    return check


def _present(check: MetricCheck, field: Marked, scope: Scope) -> MetricCheck:
    check.ok = False
    return check


# The tolerance of each kind of field (the summary schema's x-verify); the module docstring says why.
KINDS: dict[str, Callable[[MetricCheck, Marked, Scope], MetricCheck]] = {
    "size": _size,
    "fraction": _fraction,
    "detector": _full_only(_detector),
    "utility": _utility,
    "relative": _full_only(lambda check: _within(check, UTILITY_REL_TOL, relative=True)),
    "guarantee": lambda check, field, scope: _within(check, UTILITY_REL_TOL, relative=True),
    "equal": _full_only(_equal),
    "equal-always": lambda check, field, scope: _equal(check),
    "per-prompt": _per_prompt,
    "shown": _shown,
    "present": _present,
}


def covered_by_prompts(entry: RunSummary, transcript: Transcript | None) -> tuple[str, ...]:
    """The summary fields whose subset values the prompt-by-prompt comparison checks for this entry: each
    attack's exact match and token accuracy (from the transcript's ids), similarity and search-failure
    rate where the transcript records them per prompt, the worst case (a maximum of those), the utility
    where the summary records it per prompt, the blind accuracy where it records the guess."""
    if transcript is None:
        return ()
    answers = [a for p in transcript.prompts for a in p.attacks.values()]
    covered = ["worst_case.exact_match.", "worst_case.token_accuracy."]
    for name in entry.attacks:
        covered += [f"attacks.{name}.exact_match", f"attacks.{name}.token_accuracy"]
        if answers and all(a.similarity is not None for a in answers):
            covered += [f"attacks.{name}.similarity", "worst_case.similarity."]
        if answers and all(a.search_failure is not None for a in answers):
            covered.append(f"attacks.{name}.search_failure_rate")
    if entry.utility.get("per_prompt"):
        covered.append("utility.")
    if entry.verdict and entry.verdict.blind_guess_ids:
        covered.append("verdict.blind_token_accuracy")
    return tuple(covered)


def compare(entry: RunSummary, rerun: RunSummary, *, subset: int | None,
            by_prompt: tuple[str, ...] = ()) -> list[MetricCheck]:
    """Every field of the entry's summary that the summary schema marks with x-verify, against the
    rerun's, with the tolerance of its kind (KINDS); on a subset, the fields in `by_prompt` are left to
    the prompt-by-prompt comparison. A new field marked there is compared with no change here."""
    scope = Scope(entry.n, subset, by_prompt)
    return [KINDS[field.kind](MetricCheck(field.name, field.entry, field.rerun), field, scope)
            for field in marked_fields(summary_module.schema(), entry.to_dict(), rerun.to_dict())]


DEFINING = ("name", "params")  # what identifies a defence; the rest of its record follows from them


def check_defense_identity(recorded: dict[str, Any], spec: str) -> None:
    """The defence `spec` loads, with the entry's parameters, must be the entry's: the same name and
    parameters (its defining fields). What it derives from them (dp's noise std, every guarantee) is
    not compared here: the entry's is recomputed when it is read, and the rerun's is compared as a
    checked field. (Before: the whole describe() was compared with the entry's name and parameters,
    so no dp entry could pass.)"""
    from invbench.defenses import make_defense
    from invbench.defenses.checks import described

    built = described(make_defense(spec, recorded["params"]))
    ours, theirs = {k: built.get(k) for k in DEFINING}, {k: recorded.get(k) for k in DEFINING}
    if ours != theirs:
        raise SubmitError(f"the defence {spec!r} with the entry's parameters is {ours}, the entry's is {theirs}; "
                          "pass the defence the entry was made with (--defense)")


def draw_prompts(indices: list[int], *, subset: int, seed: int) -> list[int]:
    """`subset` of the prompt indices drawn without replacement by a generator seeded with `seed`
    (numpy's default_rng: anyone with the seed redraws the same prompts), in increasing order."""
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(sorted(indices), size=subset, replace=False))


def fresh_run_dir(runs_dir: Path, protocol: str, entry_id: str, seed: int | None) -> Path:
    """A folder no run has written: verify never reads what it did not write itself (before: records
    planted in runs/verify/<protocol>/<id>-n2 were taken as the rerun)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    path = Path(runs_dir) / "verify" / protocol / f"{entry_id}-{'all' if seed is None else f'seed{seed}'}-{stamp}"
    if path.exists():
        raise SubmitError(f"{path} already exists; verify reruns into a folder of its own only")
    return path


def verify(entry_path: Path, *, subset: int | None = None, seed: int | None = None, device: str = "auto",
           defense: str | None = None, runs_dir: Path = Path("runs"), record: bool = True,
           echo: Callable[[str], None] = print, engine: Any = None) -> VerifyReport:
    """Rerun a random subset of an entry's prompts (default `prompt_checks.required_subset(n)`; `subset`
    n or more: all of them) drawn with `seed` (default: a fresh one), in a new folder, and compare them
    prompt by prompt and every checked field. `defense` loads the defence from a plug-in file (whose
    code must be the entry's). With `record`, the result is written beside the entry
    (`invbench.verification`), with the SHA-256 of the entry file as it was read. `engine`
    (`invbench.cluster.Engine`): where the rerun's attacks run (`ray`: in shards over a cluster)."""
    from .runner import answer_objectives, run

    entry_path = Path(entry_path)
    entry = read_entry(entry_path)  # refuses an entry that disagrees with itself, its prompts or its protocol
    entry_sha256 = verification.file_sha256(entry_path)
    protocol = get_protocol(entry.meta["protocol"]["name"])
    recorded, n = entry.summary.defense, entry.summary.n
    if subset is not None and not 1 <= subset <= n:
        raise SubmitError(f"--subset must be between 1 and the entry's {n} prompts, got {subset}")
    subset = prompt_checks.required_subset(n) if subset is None else subset
    indices = [p.prompt_index for p in entry.transcript.prompts] if entry.transcript else list(range(n))
    if subset >= n:
        subset, seed, chosen = None, None, None
    else:
        seed = secrets.randbelow(2**32) if seed is None else seed
        chosen = draw_prompts(indices, subset=subset, seed=seed)
    spec = _defense_spec(entry.defense_spec, defense)
    check_defense_identity(recorded, spec)
    _check_plugin_code(entry.meta.get("defense_code"), spec)

    run_dir = fresh_run_dir(runs_dir, protocol.name, entry.entry_id, seed)
    cfg = protocol.run_config(defense=spec, defense_params=recorded["params"], out=str(run_dir), device=device,
                              prompts=chosen)
    echo(f"verify: rerunning {'all ' + str(n) if chosen is None else f'{subset} of {n}'} prompts"
         + (f" (seed {seed}: {', '.join(map(str, chosen))})" if chosen else "") + f" into {run_dir}")
    summary = run(cfg, echo=echo, engine=engine)  # engine ray: the rerun's prompts in shards over a cluster
    covered = covered_by_prompts(entry.summary, entry.transcript)
    report = VerifyReport(entry_path, run_dir, subset, n, compare(entry.summary, summary, subset=subset,
                                                                  by_prompt=covered),
                          hardware=(entry.summary.device, summary.device),
                          commits=(entry.meta.get("git_commit"), run_commit(run_dir)), seed=seed,
                          prompt_indices=chosen if chosen is not None else indices)
    if entry.transcript is not None:
        from invbench.leaks.models import load_model

        tokenizer = load_model(protocol.model, seed=protocol.seed, notify=lambda line: None).tokenizer
        report.prompts = prompt_checks.compare_prompts(
            transcript=entry.transcript, entry_utility=entry.summary.utility.get("per_prompt"),
            records=read_run_records(run_dir), rerun_utility=summary.utility.get("per_prompt"),
            attacks=list(summary.attacks), tokens=summary.tokens,
            objectives=lambda answers: answer_objectives(cfg, answers, echo=echo),
            token_text=lambda token: tokenizer.decode([token]))
    if record:
        command = shlex.join(["invbench", "verify", str(entry_path),
                              *(["--subset", str(subset), "--draw-seed", str(seed)] if subset else []),
                              *(["--defense", recorded_spec(defense)] if defense else []),
                              *([f"--device={device}"] if device != "auto" else [])])
        report.record = verification.write_record(entry_path, verification.build_record(
            report, command=command, entry_sha256=entry_sha256, versions=summary.versions))
    return report


def _check_plugin_code(recorded: Any, spec: str) -> None:
    """A plug-in's code must be the one the entry was made with (its file name and SHA-256, or its
    package version and source hash), else the rerun would measure another defence."""
    if recorded is None:
        return
    from invbench.defenses.registry import code_identity

    ours = code_identity(spec)
    if ours != recorded:
        raise SubmitError(f"the defence {spec} is not the code the entry was made with (entry: {recorded}; given: "
                          f"{ours}); pass the plug-in as submitted")


def _defense_spec(spec: str, override: str | None) -> str:
    """What to load the entry's defence from: the override, else its registered name. A plug-in
    file cannot be found from its base name, so it has to be passed."""
    if override:
        return override
    if is_file_spec(spec):
        raise SubmitError(f"this entry's defence came from a plug-in file ({spec}); pass --defense path/to/{spec}")
    return spec
