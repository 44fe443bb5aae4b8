"""Leaderboard entries: one JSON file per defence configuration, `leaderboards/<protocol>/<entry-id>.json`.

An entry is read as JSON only (never executed or unpickled) and checked against the schema below
every time it is read. A malformed entry is reported by file and field and skipped, so the board
never shows half an entry. The schema is a small explicit validator rather than JSON Schema so
that every message names the field path in words: "field attacks.scan.exact_match: expected a
number in [0, 1]".
"""
from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Callable

from .errors import InvbenchError
from .metrics import worst_case
from .verdicts import run_verdict

SCHEMA_VERSION = 2  # 2: verdicts (per attack and for the entry) and the certified radius
ENTRY_ID_PATTERN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
ENTRY_ID_MAX = 64
MAX_ENTRY_BYTES = 1_000_000  # an entry is a few KB; refuse anything that could stall the renderer
MAX_TEXT = 300  # names, authors, parameter values
# http(s) only (no javascript: or data: links) and no characters that could leave an attribute or a Markdown link
URL_PATTERN = re.compile(r"https?://[^\s<>()\[\]{}|\\^`\"']+")
CONFIG_HASH_PATTERN = re.compile(r"[0-9a-f]{16}")
GIT_COMMIT_PATTERN = re.compile(r"[0-9a-f]{7,40}")
PRIVACY_METRICS = ("exact_match", "token_accuracy", "similarity")
VERDICTS = ("leaks", "protected", "inconclusive", None)


class EntryError(InvbenchError, ValueError):
    """A bad entry id, or an entry file that does not pass the schema; printed as one line."""


# --- entry ids ------------------------------------------------------------------------------

def validate_entry_id(entry_id: Any) -> str:
    """Return `entry_id` if it is a slug (`[a-z0-9]` words joined by single hyphens), else raise.
    Ids become file names, so anything path-like is refused outright."""
    if not isinstance(entry_id, str):
        raise EntryError(f"entry id must be a string, got {type(entry_id).__name__}")
    if any(sep in entry_id for sep in ("/", "\\", "..")) or entry_id.startswith("."):
        raise EntryError(f"entry id {short(entry_id)} looks like a path; use lowercase letters, digits and hyphens")
    if len(entry_id) > ENTRY_ID_MAX:
        raise EntryError(f"entry id {short(entry_id)} is longer than {ENTRY_ID_MAX} characters")
    if not ENTRY_ID_PATTERN.fullmatch(entry_id):
        raise EntryError(f"entry id {short(entry_id)} is not a slug: use lowercase letters, digits and single hyphens "
                         "(no leading or trailing hyphen)")
    return entry_id


def slugify(name: str) -> str:
    """An entry id from a display name: accents dropped, lowercase, runs of anything else to one
    hyphen, cut to ENTRY_ID_MAX characters. Raises when nothing usable is left."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")
    slug = slug[:ENTRY_ID_MAX].rstrip("-")
    if not slug:
        raise EntryError(f"cannot make an entry id from the name {name!r}; pass an id of letters and digits")
    return validate_entry_id(slug)


# --- the schema -------------------------------------------------------------------------------
# A checker takes a value and returns an error message (what was expected), or None when it fits.

Checker = Callable[[Any], "str | None"]


def short(value: Any, limit: int = 60) -> str:
    """repr of a submitted value for a message, cut so a huge value cannot flood the board."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _key(name: str) -> str:
    """A submitted key inside a field path, cut like `short`."""
    return name if len(name) <= 64 else name[:61] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def number(lo: float | None = None, hi: float | None = None, *, nullable: bool = False,
           lo_open: bool = False) -> Checker:
    lo_text = "-inf" if lo is None else f"{lo:g}"
    hi_text = "inf" if hi is None else f"{hi:g}"
    what = f"a number in {'(' if lo_open else '['}{lo_text}, {hi_text}{']' if hi is not None else ')'}"
    what += " or null" if nullable else ""

    def check(value: Any) -> str | None:
        if value is None and nullable:
            return None
        if not _is_number(value):
            return f"expected {what}"
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        if too_low or (hi is not None and value > hi):
            return f"expected {what}, got {short(value)}"
        return None
    return check


FRACTION = number(0, 1)
FRACTION_OR_NULL = number(0, 1, nullable=True)


def integer(lo: int | None = None) -> Checker:
    def check(value: Any) -> str | None:
        if not isinstance(value, int) or isinstance(value, bool):
            return "expected an integer"
        if lo is not None and value < lo:
            return f"expected an integer >= {lo}, got {value}"
        return None
    return check


def text(*, max_len: int = MAX_TEXT, nullable: bool = False, allow_empty: bool = False) -> Checker:
    """One line of text: control characters (newlines included) would break Markdown rows."""
    def check(value: Any) -> str | None:
        if value is None and nullable:
            return None
        if not isinstance(value, str):
            return "expected a string" + (" or null" if nullable else "")
        if not value.strip() and not allow_empty:
            return "expected a non-empty string"
        if len(value) > max_len:
            return f"expected at most {max_len} characters, got {len(value)}"
        if any(unicodedata.category(c).startswith("C") for c in value):
            return "expected one line of text without control characters"
        return None
    return check


def pattern(regex: re.Pattern, what: str, *, allow_empty: bool = False) -> Checker:
    def check(value: Any) -> str | None:
        if allow_empty and value == "":
            return None
        if not isinstance(value, str) or not regex.fullmatch(value):
            return f"expected {what}"
        return None
    return check


def iso_date(value: Any) -> str | None:
    try:
        date.fromisoformat(value)
    except (TypeError, ValueError):
        return "expected a date YYYY-MM-DD"
    return None if len(value) == 10 else "expected a date YYYY-MM-DD"


def scalar(value: Any) -> str | None:
    """A defence parameter value: a number, a bool, null or one line of text."""
    if value is None or isinstance(value, bool) or _is_number(value):
        return None
    if isinstance(value, str):
        return text(allow_empty=True)(value)
    return "expected a number, a boolean, null or a string"


@dataclass(frozen=True)
class Problem:
    """Why an entry was skipped: its file, the field path and what was wrong."""

    path: Path
    field: str
    message: str

    def __str__(self) -> str:
        where = f"field {self.field}: " if self.field else ""
        return f"{self.path}: {where}{self.message}"


class _Validator:
    """Walks one entry, collecting every problem rather than stopping at the first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[Problem] = []

    def fail(self, field: str, message: str) -> None:
        self.problems.append(Problem(self.path, field, message))

    def obj(self, data: Any, field: str) -> dict | None:
        if not isinstance(data, dict):
            self.fail(field, "expected an object")
            return None
        return data

    def fields(self, data: dict, prefix: str, spec: dict[str, Checker]) -> None:
        for key, checker in spec.items():
            field = f"{prefix}{key}"
            if key not in data:
                self.fail(field, "missing")
                continue
            message = checker(data[key])
            if message:
                self.fail(field, message)

    def mapping(self, data: Any, field: str, keys: Checker, values: Checker) -> dict | None:
        data = self.obj(data, field)
        for key, value in (data or {}).items():
            if message := keys(key):
                self.fail(f"{field}.{_key(key)}", f"bad name: {message}")
            elif message := values(value):
                self.fail(f"{field}.{_key(key)}", message)
        return data


NAME = pattern(re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}"), "a name of letters, digits, '_', '.' or '-'")

GIT_COMMIT = pattern(GIT_COMMIT_PATTERN, "a git commit (hex) or null")

TOP_LEVEL: dict[str, Checker] = {
    "schema_version": lambda v: None if v == SCHEMA_VERSION else f"expected {SCHEMA_VERSION}",
    "entry_id": lambda v: _message(validate_entry_id, v),
    "name": text(),
    "authors": text(allow_empty=True),
    "url": pattern(URL_PATTERN, "an http(s) URL or an empty string", allow_empty=True),
    "date": iso_date,
    "model": text(),
    "dataset": text(),
    "n": integer(1),
    "tokens": integer(1),
    "seed": integer(),
    "config_hash": pattern(CONFIG_HASH_PATTERN, "16 hex digits"),
    "invbench_version": text(max_len=40),
}
DEFENSE: dict[str, Checker] = {
    "name": text(max_len=80),
    "epsilon": number(0, nullable=True),
    "delta": number(0, 1, nullable=True),
    "neighbouring": text(nullable=True),
}
VERDICT: Checker = lambda v: None if v in VERDICTS else "expected leaks, protected, inconclusive or null"  # noqa: E731
ATTACK: dict[str, Checker] = {
    "n": integer(1),
    "exact_match": FRACTION,
    "token_accuracy": FRACTION,
    "similarity": FRACTION,
    "detector_auroc": FRACTION_OR_NULL,
    "detector_tpr_at_1pct_fpr": FRACTION_OR_NULL,
    "seconds_per_token": number(0, nullable=True),
    "search_failure_rate": FRACTION_OR_NULL,
    "verdict": VERDICT,
}
ENTRY_VERDICT: dict[str, Checker] = {
    "verdict": VERDICT,
    "attack": lambda v: None if v is None else NAME(v),
    "says": text(max_len=600, allow_empty=True),
    "blind_token_accuracy": FRACTION_OR_NULL,
}
UTILITY: dict[str, Checker] = {
    "top1_agreement": FRACTION_OR_NULL,
    "kl_clean_defended": number(0, nullable=True),
    "perplexity_ratio": number(0, nullable=True, lo_open=True),
    "cosine": number(-1, 1, nullable=True),
}
PROTOCOL: dict[str, Checker] = {
    "name": NAME,
    "model": text(),
    "dataset": text(),
    "n": integer(1),
    "tokens": integer(1),
    "seed": integer(),
}


def _message(func: Callable[[Any], Any], value: Any) -> str | None:
    try:
        func(value)
    except ValueError as exc:
        return str(exc)
    return None


def check_entry(data: Any, path: Path, *, protocol_dir_name: str | None = None,
                protocol_definition: dict[str, Any] | None = None) -> list[Problem]:
    """Every schema problem of one parsed entry (empty when it is valid).

    Beyond field types, the entry must be consistent with itself and where it lies: its id is its
    file name, its protocol is the folder's, it reports every attack of its protocol (the worst
    case is over all of them), its size matches the protocol, and its stored worst case and
    detector AUROCs match its attacks. `protocol_definition`, when given (the registered
    protocol of that name), must equal the entry's protocol: results from an older definition
    are not comparable."""
    v = _Validator(path)
    if v.obj(data, "(top level)") is None:
        return v.problems
    v.fields(data, "", TOP_LEVEL)
    if data.get("git_commit") is not None and (message := GIT_COMMIT(data["git_commit"])):  # optional field
        v.fail("git_commit", message)
    if data.get("entry_id") != path.stem:
        v.fail("entry_id", f"must equal the file name {path.stem!r}")

    protocol = _check_protocol(v, data.get("protocol"), protocol_dir_name, protocol_definition)
    _check_defense(v, data.get("defense"))
    attacks = _check_attacks(v, data.get("attacks"), protocol)
    _check_worst_case(v, data.get("worst_case"), attacks)
    _check_detector(v, data.get("detector_auroc"), attacks)
    _check_verdict(v, data.get("verdict"), attacks)
    if data.get("radius") is not None and (radius := v.obj(data["radius"], "radius")) is not None:
        v.fields(radius, "radius.", {"scope": text(), "min_sigma_certified": number(0), "median_radius": number(0),
                                     "note": text(max_len=600)})
    if (utility := v.obj(data.get("utility"), "utility")) is not None:
        v.fields(utility, "utility.", UTILITY)
    v.mapping(data.get("versions"), "versions", NAME, text(max_len=80, nullable=True))
    if (hardware := v.obj(data.get("hardware"), "hardware")) is not None:
        v.fields(hardware, "hardware.", {"device": text()})
    if protocol:
        for key in ("model", "dataset", "n", "tokens", "seed"):  # what makes entries of one protocol comparable
            if key in data and key in protocol and data[key] != protocol[key]:
                v.fail(key, f"{short(data[key])} differs from the protocol's {short(protocol[key])}")
    return v.problems


def _check_protocol(v: _Validator, data: Any, dir_name: str | None,
                    definition: dict[str, Any] | None) -> dict | None:
    protocol = v.obj(data, "protocol")
    if protocol is None:
        return None
    v.fields(protocol, "protocol.", PROTOCOL)
    attacks = protocol.get("attacks")
    if not (isinstance(attacks, list) and attacks and all(NAME(a) is None for a in attacks)):
        v.fail("protocol.attacks", "expected a non-empty list of attack names")
    if dir_name is not None and protocol.get("name") != dir_name:
        v.fail("protocol.name", f"{short(protocol.get('name'))} does not match the folder {dir_name!r}")
    elif definition is not None and protocol != definition:
        changed = sorted(k for k in set(protocol) | set(definition) if protocol.get(k) != definition.get(k))
        v.fail("protocol", f"differs from the current definition of {definition['name']!r} "
               f"({', '.join(map(str, changed))}); rerun the submission under the current protocol")
    return protocol


def _check_defense(v: _Validator, data: Any) -> None:
    defense = v.obj(data, "defense")
    if defense is None:
        return
    v.fields(defense, "defense.", DEFENSE)
    if "params" not in defense:
        v.fail("defense.params", "missing")
    else:
        v.mapping(defense["params"], "defense.params", NAME, scalar)
    if "spec" in defense and (message := text(max_len=200)(defense["spec"])):
        v.fail("defense.spec", message)


def _check_attacks(v: _Validator, data: Any, protocol: dict | None) -> dict[str, dict]:
    """The attacks whose metrics are valid (for the cross-checks that follow)."""
    attacks = v.obj(data, "attacks")
    if attacks is None:
        return {}
    valid = {}
    for name, metrics in attacks.items():
        if message := NAME(name):
            v.fail(f"attacks.{_key(name)}", f"bad name: {message}")
        elif (metrics := v.obj(metrics, f"attacks.{name}")) is not None:
            before = len(v.problems)
            v.fields(metrics, f"attacks.{name}.", ATTACK)
            if len(v.problems) == before:
                valid[name] = metrics
    expected = (protocol or {}).get("attacks")
    if isinstance(expected, list) and sorted(attacks) != sorted(expected):
        v.fail("attacks", f"expected exactly the protocol's attacks {short(sorted(expected))}, "
               f"got {short(sorted(attacks))}")
    elif not attacks:
        v.fail("attacks", "expected at least one attack")
    return valid


def _check_worst_case(v: _Validator, data: Any, attacks: dict[str, dict]) -> None:
    worst = v.obj(data, "worst_case")
    if worst is None:
        return
    for metric in PRIVACY_METRICS:
        field = f"worst_case.{metric}"
        item = worst.get(metric)
        if not isinstance(item, dict):
            v.fail(field, "missing" if item is None else "expected an object")
            continue
        v.fields(item, f"{field}.", {"value": FRACTION, "attack": NAME})
        if attacks and _is_number(item.get("value")):
            rule = worst_case(attacks)[metric]  # the one rule for the strongest attack, ties included
            if abs(item["value"] - rule["value"]) > 1e-12:
                v.fail(f"{field}.value", f"{short(item['value'])} is not the maximum over attacks ({rule['value']!r})")
            elif item.get("attack") != rule["attack"]:
                v.fail(f"{field}.attack", f"{short(item.get('attack'))} is not the strongest attack by the rule of "
                       f"invbench.metrics.worst_case ({rule['attack']!r})")


def _check_verdict(v: _Validator, data: Any, attacks: dict[str, dict]) -> None:
    verdict = v.obj(data, "verdict")
    if verdict is None:
        return
    v.fields(verdict, "verdict.", ENTRY_VERDICT)
    if attacks and all("verdict" in m for m in attacks.values()):
        expected, on = run_verdict({a: m["verdict"] for a, m in attacks.items()})
        if verdict.get("verdict") != expected:
            v.fail("verdict.verdict", f"{short(verdict.get('verdict'))} does not follow from the attacks' verdicts "
                   f"({expected!r})")


def _check_detector(v: _Validator, data: Any, attacks: dict[str, dict]) -> None:
    detector = v.mapping(data, "detector_auroc", NAME, FRACTION_OR_NULL)
    if detector is None:
        return
    for name, metrics in attacks.items():
        if detector.get(name, "missing") != metrics["detector_auroc"]:
            v.fail(f"detector_auroc.{name}", f"must equal attacks.{name}.detector_auroc")


# --- reading ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """A validated entry and the numbers the board ranks it by."""

    path: Path
    data: dict[str, Any]

    @property
    def entry_id(self) -> str:
        return self.data["entry_id"]

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def worst_exact_match(self) -> float:
        """Recomputed from the attacks (the validator also checks the stored worst case)."""
        return max(m["exact_match"] for m in self.data["attacks"].values())

    @property
    def worst_attack(self) -> str:
        """The strongest attack as the entry states it (checked against metrics.worst_case)."""
        return self.data["worst_case"]["exact_match"]["attack"]

    @property
    def verdict(self) -> str | None:
        return self.data["verdict"]["verdict"]

    @property
    def conclusive(self) -> bool:
        """Whether the entry's privacy (or leak) is established rather than resting on search failures."""
        return self.verdict in ("leaks", "protected")

    @property
    def worst_token_accuracy(self) -> float:
        return max(m["token_accuracy"] for m in self.data["attacks"].values())

    @property
    def top1_agreement(self) -> float | None:
        return self.data["utility"]["top1_agreement"]


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"duplicate key(s) {', '.join(map(repr, duplicates))}")
    return dict(pairs)


def parse_entry_file(path: Path) -> tuple[Any, Problem | None]:
    """JSON text to data, strictly: no NaN/Infinity, no duplicate keys, no oversized files."""
    try:
        if path.is_symlink() or not path.is_file():
            return None, Problem(path, "", "not a regular file")
        if path.stat().st_size > MAX_ENTRY_BYTES:
            return None, Problem(path, "", f"larger than {MAX_ENTRY_BYTES} bytes")
        raw = path.read_text(encoding="utf-8")
        return json.loads(raw, parse_constant=_reject_constant, object_pairs_hook=_unique_keys), None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, Problem(path, "", f"not valid JSON: {exc}")


def registered_definition(name: Any) -> dict[str, Any] | None:
    """The current definition of a registered protocol, as JSON would give it back (lists, not
    tuples), or None for a name that is not registered."""
    from .protocols import PROTOCOLS

    if not isinstance(name, str) or name not in PROTOCOLS:
        return None
    return PROTOCOLS[name].to_dict()


def read_entry(path: Path) -> Entry:
    """One entry file, validated against the registered protocol it names; raises EntryError with
    every problem when it is malformed."""
    path = Path(path)
    data, problem = parse_entry_file(path)
    if problem:
        problems = [problem]
    else:
        protocol = data.get("protocol") if isinstance(data, dict) else None
        name = protocol.get("name") if isinstance(protocol, dict) else None
        problems = check_entry(data, path, protocol_definition=registered_definition(name))
    if problems:
        raise EntryError(f"{path}: " + "; ".join(str(p).removeprefix(f"{path}: ") for p in problems))
    return Entry(path, data)


def load_entries(protocol_dir: Path, *, protocol_definition: dict[str, Any] | None = None,
                 ) -> tuple[list[Entry], list[Problem]]:
    """Every valid `*.json` entry directly under `protocol_dir` (sorted by id), and the problems
    of the ones skipped. `protocol_definition` defaults to the registered protocol named like the
    folder, when there is one."""
    protocol_dir = Path(protocol_dir)
    protocol_definition = protocol_definition or registered_definition(protocol_dir.name)
    entries, problems = [], []
    for path in sorted(protocol_dir.glob("*.json")):
        data, problem = parse_entry_file(path)
        found = [problem] if problem else check_entry(data, path, protocol_dir_name=protocol_dir.name,
                                                      protocol_definition=protocol_definition)
        if found:
            problems.extend(found)
        else:
            entries.append(Entry(path, data))
    return entries, problems
