"""Leaderboard entries: one JSON file per defence configuration, `leaderboards/<protocol>/<entry-id>.json`.

An entry is the submission's metadata (who, when, which protocol, where the defence came from, the
run's git commit) and the run's summary as the run wrote it (`summary`: a `RunSummary`, embedded
whole: no field is copied by name, so a new summary field reaches every entry untouched).

An entry is read as JSON only (never executed or unpickled) and checked every time it is read:
first against the committed JSON Schema `bench/schemas/entry.schema.json` (which refers to the
summary's, `summary.schema.json`; any JSON Schema tool can check an entry with the two files),
then across fields (its id is its file name, its worst case follows from its attacks, ...). A
malformed entry is reported by file and field and skipped, so the board never shows half an entry.
Every message names the field path in words: "field summary.attacks.scan.exact_match: expected a
number in [0, 1], got 7". Entries of schema_version 2, which copied summary fields by name, are
read by `invbench.legacy_entries`.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Callable

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from . import derived, legacy_entries, summary as summary_module, transcript as transcript_module, verification
from .config import prompts_digest
from .errors import InvbenchError, one_line
from .formats import short
from .metrics import PRIVACY_METRICS, token_accuracy, worst_case
from .protocols import defining
from .schema_check import Failure, failures, format_checker, load_schema, read_json_file
from .summary import RunSummary
from .transcript import Transcript
from .uncertainty import Intervals, intervals_of
from .verdicts import run_verdict

# 5: its transcript records each prompt's similarity and search-failure flag, and its summary the utility of
# each prompt, so every mean can be checked against its prompts and verify compares prompt by prompt;
# 4: with its transcript (what each attack recovered of each prompt, invbench.transcript); 3: the run's summary
# embedded as it is, no transcript (still read: its page says so); 2: fields copied from it (legacy_entries)
SCHEMA_VERSION = 5
ENTRY_ID_PATTERN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
ENTRY_ID_MAX = 64
MAX_ENTRY_BYTES = 1_000_000  # an entry is a few KB; refuse anything that could stall the renderer
# What the summary must agree on with the protocol it was made under, for entries to be comparable.
SAME_AS_PROTOCOL = ("model", "dataset", "n", "tokens", "seed", "layer")


class EntryError(InvbenchError, ValueError):
    """A bad entry id, or an entry file that does not pass the schema; printed as one line."""


# --- entry ids ------------------------------------------------------------------------------

def validate_entry_id(entry_id: Any) -> str:
    """Return `entry_id` if it is a slug (`[a-z0-9]` words joined by single hyphens), else raise.
    Ids become file names, so anything path-like is refused outright."""
    if not isinstance(entry_id, str):
        raise EntryError(f"entry id must be a string, got {type(entry_id).__name__}")
    if not entry_id:
        raise EntryError("entry id '' is empty; use lowercase letters, digits and hyphens (or leave --entry-id out "
                         "to make one from --name)")
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


# --- display names ------------------------------------------------------------------------------
# Two rows must not look alike: a name is NFKC-normal with no space at either end, and two entries of a
# board whose names share a skeleton (case, width, whitespace and the Cyrillic and Greek letters that look
# Latin folded away) are one name: the board keeps the first (by date, then id) and skips the other.
CONFUSABLES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "з": "3", "і": "i", "ї": "i", "ј": "j", "к": "k", "м": "m", "н": "h",
    "о": "o", "п": "n", "р": "p", "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s", "ԁ": "d", "ԛ": "q", "ԝ": "w",
    "ь": "b", "ӏ": "l", "ɑ": "a", "ɡ": "g", "α": "a", "β": "b", "γ": "y", "ε": "e", "ι": "i", "κ": "k", "ν": "v",
    "ο": "o", "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ζ": "z", "η": "n"})


def display_name_problem(name: Any) -> str | None:
    """What makes `name` unfit to name a row, or None: it must be NFKC-normal (no full-width or
    ligature look-alikes) without space at either end (a trailing no-break space made a second row)."""
    if not isinstance(name, str):
        return "expected a string"
    if name != name.strip():
        return "has space at its start or end"
    if unicodedata.normalize("NFKC", name) != name:
        return "is not in Unicode NFKC form (full-width letters, ligatures or other look-alikes)"
    return None


def _checked_display_name(name: Any) -> bool:
    """The schema's display-name format: True, or EntryError saying what is wrong (its message is shown)."""
    problem = display_name_problem(name)
    if problem:
        raise EntryError(f"the name {short(name)} {problem}")
    return True


def name_skeleton(name: str) -> str:
    """What a name looks like: NFKC, case-folded, confusable letters mapped to Latin, whitespace as one space."""
    return " ".join(unicodedata.normalize("NFKC", name).casefold().translate(CONFUSABLES).split())


def look_alike_problems(entries: list["Entry"]) -> tuple[list["Entry"], list[Problem]]:
    """The entries with distinct-looking names (the first of each skeleton, by date then id), and a
    Problem for each entry skipped as a look-alike of another."""
    kept: dict[str, Entry] = {}
    problems = []
    for entry in sorted(entries, key=lambda e: (e.meta["date"], e.entry_id)):
        first = kept.setdefault(name_skeleton(entry.name), entry)
        if first is not entry:
            problems.append(Problem(entry.path, "name", f"{entry.name!r} looks the same as the name of entry "
                                    f"{first.entry_id!r} ({first.name!r}); choose a distinct name"))
    chosen = {id(e) for e in kept.values()}
    return [e for e in entries if id(e) in chosen], problems


# --- the schema -------------------------------------------------------------------------------
# `bench/schemas/entry.schema.json` holds every field's type and range; checks across fields follow.

NAME = "#/$defs/name"  # parts of the schema, for `check_value`
SCALAR = "#/$defs/scalar"


@dataclass(frozen=True)
class Problem:
    """Why an entry was skipped: its file, the field path and what was wrong."""

    path: Path
    field: str
    message: str

    def __str__(self) -> str:
        where = f"field {self.field}: " if self.field else ""
        return f"{self.path}: {where}{self.message}"


@lru_cache(maxsize=None)
def _validator(name: str = "entry") -> Draft202012Validator:
    """The validator of the entry schema (`entry-v2`: the version-2 schema, for legacy_entries)."""
    formats = format_checker()
    formats.checks("entry-id", raises=EntryError)(validate_entry_id)
    formats.checks("display-name", raises=EntryError)(_checked_display_name)
    summary = summary_module.schema()  # the entry schema refers to it by its $id
    registry = Registry().with_resource(summary["$id"], Resource.from_contents(summary))
    return Draft202012Validator(load_schema(name), format_checker=formats, registry=registry)


def _message(failure: Failure) -> str:
    """A schema failure in the board's words: "expected a number in [0, 1], got 7"."""
    if failure.kind == "missing":  # a missing section reads as what it should be, as the board has always said
        section = failure.node.get("type") == "object" and "." not in failure.field.removeprefix("summary.")
        return "expected an object" if section else "missing"
    if isinstance(failure.cause, EntryError):  # validate_entry_id says what is wrong with an id
        return str(failure.cause)
    expected = f"expected {failure.expected}"
    if failure.kind == "key":
        return f"bad name: {expected}"
    return f"{expected}, got {short(failure.value)}" if failure.kind == "range" else expected


def check_value(value: Any, part: str) -> str | None:
    """What is wrong with `value` as the part of the entry schema at `part` (a JSON pointer such
    as "#/properties/url", NAME or SCALAR), or None when it fits."""
    found = failures(_validator().evolve(schema={"$ref": part}), value)
    return _message(found[0]) if found else None


def check_entry(data: Any, path: Path, *, protocol_dir_name: str | None = None,
                protocol_definition: dict[str, Any] | None = None) -> list[Problem]:
    """Every problem of one parsed entry (empty when it is valid): the schema's, then the checks
    across fields.

    Beyond field types, the entry must be consistent with itself and where it lies: its id is its
    file name, its protocol is the folder's, its summary reports every attack of its protocol (the
    worst case is over all of them) and was made with the protocol's model, prompts and seed, its
    worst case and verdict follow from its attacks, and what it derives (the defence's guarantee,
    each attack's verdict and n, the radius) is recomputed and must agree (`invbench.derived`). `protocol_definition`, when given (the
    registered protocol of that name), must have the entry's protocol's defining fields: results
    from another definition are not comparable (a reworded description changes nothing)."""
    legacy = legacy_entries.is_legacy(data)
    schema = failures(_validator("entry-v2" if legacy else "entry"), data)
    found = [(f.field, _message(f)) for f in schema]
    if isinstance(data, dict):
        def fits(*keys: str) -> bool:
            """Whether nothing at, above or under the field at these keys failed the schema."""
            return not any(f.path[:len(keys)] == keys or keys[:len(f.path)] == f.path for f in schema)

        protocol = legacy_entries.protocol_of(data) if legacy else data.get("protocol")
        found += _place_problems(data, protocol, path, protocol_dir_name, protocol_definition)
        if legacy:  # a version-2 entry holds the summary's fields at its top level
            found += _summary_problems(data, protocol, fits, prefix="")
            found += legacy_entries.copy_problems(data, fits)
            spec = data["defense"].get("spec") if isinstance(data.get("defense"), dict) else None
            found += derived.problems(data, spec=spec, fits=fits, prefix="", legacy=True)
        elif isinstance(data.get("summary"), dict):
            in_summary = lambda *keys: fits("summary", *keys)  # noqa: E731
            found += _summary_problems(data["summary"], protocol, in_summary, prefix="summary.")
            spec = data.get("defense_spec") if fits("defense_spec") else None
            found += derived.problems(data["summary"], spec=spec, fits=in_summary, prefix="summary.",
                                      per_prompt_required=data.get("schema_version") == SCHEMA_VERSION)
            found += _transcript_problems(data, fits)
    return [Problem(path, field, message) for field, message in found]


def _place_problems(data: dict, protocol: Any, path: Path, dir_name: str | None,
                    definition: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(field, message) where the entry disagrees with where it lies: its file name, its folder,
    the registered protocol's defining fields."""
    problems = []
    if data.get("entry_id") != path.stem:
        problems.append(("entry_id", f"must equal the file name {path.stem!r}"))
    if not isinstance(protocol, dict):
        return problems
    if dir_name is not None and protocol.get("name") != dir_name:
        problems.append(("protocol.name", f"{short(protocol.get('name'))} does not match the folder {dir_name!r}"))
    elif definition is not None and defining(protocol) != defining(definition):
        ours, theirs = defining(protocol), defining(definition)
        changed = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        problems.append(("protocol", f"differs from the current definition of {definition['name']!r} "
                         f"({', '.join(map(str, changed))}); rerun the submission under the current protocol"))
    return problems


def _transcript_problems(data: dict, fits: Callable[..., bool]) -> list[tuple[str, str]]:
    """(field, message) where a transcript that fits the schema disagrees with its ids or its summary, or
    does not hold exactly its protocol's prompts (where the protocol pins them by their SHA-256)."""
    summary = data["summary"]
    if "transcript" not in data or not fits("transcript") or not isinstance(summary.get("attacks"), dict):
        return []
    found = transcript_module.problems(data["transcript"], attacks=summary["attacks"], n=summary.get("n"),
                                       prefix="transcript.", complete=data.get("schema_version") == SCHEMA_VERSION)
    if found:
        return found
    pinned = data["protocol"].get("prompts_sha256") if isinstance(data.get("protocol"), dict) else None
    if isinstance(pinned, str):
        held = prompts_digest([p["target_ids"] for p in data["transcript"]["prompts"]])
        if held != pinned:
            return [("transcript.prompts", f"its target ids are not the protocol's prompts (SHA-256 {held[:12]}..., the "
                     f"protocol's {pinned[:12]}...): an entry must report the protocol's own prompts")]
    return _blind_guess_problems(summary.get("verdict"), data["transcript"]["prompts"])


def _blind_guess_problems(verdict: Any, prompts: list[dict]) -> list[tuple[str, str]]:
    """(field, message) where the blind token accuracy is not the blind guess's accuracy on the transcript's
    prompts (where the summary records the guess itself)."""
    if not isinstance(verdict, dict) or not isinstance(verdict.get("blind_guess_ids"), list):
        return []
    guess, stated = verdict["blind_guess_ids"], verdict.get("blind_token_accuracy")
    mean = sum(token_accuracy(target=p["target_ids"], recovered=guess) for p in prompts) / len(prompts)
    if not isinstance(stated, (int, float)) or abs(mean - stated) > transcript_module.MEAN_TOLERANCE:
        return [("summary.verdict.blind_token_accuracy", f"{short(stated)} is not the blind guess's token accuracy "
                 f"on the transcript's prompts ({mean!r})")]
    return []


def _summary_problems(summary: dict, protocol: Any, fits: Callable[..., bool], *, prefix: str) -> list[tuple[str, str]]:
    """(field, message) where the summary disagrees with the protocol it was made under, or with
    itself: its worst case and verdict must follow from the attacks that fit the schema."""
    problems = []
    if isinstance(protocol, dict):
        for key in SAME_AS_PROTOCOL:  # what makes entries of one protocol comparable
            if key in summary and key in protocol and summary[key] != protocol[key]:
                problems.append((prefix + key, f"{short(summary[key])} differs from the protocol's "
                                 f"{short(protocol[key])}"))
    attacks = summary.get("attacks")
    if not isinstance(attacks, dict):
        return problems
    expected = protocol.get("attacks") if isinstance(protocol, dict) else None
    if isinstance(expected, list) and sorted(attacks) != sorted(map(str, expected)):
        problems.append((prefix + "attacks", f"expected exactly the protocol's attacks {short(sorted(expected))}, "
                         f"got {short(sorted(attacks))}"))
    valid = {name: metrics for name, metrics in attacks.items() if fits("attacks", name)}
    if not valid:
        return problems
    rule = worst_case(valid)  # the one rule for the strongest attack, ties included
    for metric in PRIVACY_METRICS:
        if not fits("worst_case", metric, "value"):
            continue
        stored = summary["worst_case"][metric]
        if abs(stored["value"] - rule[metric]["value"]) > 1e-12:
            problems.append((f"{prefix}worst_case.{metric}.value", f"{short(stored['value'])} is not the maximum "
                             f"over attacks ({rule[metric]['value']!r})"))
        elif stored.get("attack") != rule[metric]["attack"]:
            problems.append((f"{prefix}worst_case.{metric}.attack", f"{short(stored.get('attack'))} is not the "
                             f"strongest attack by the rule of invbench.metrics.worst_case ({rule[metric]['attack']!r})"))
    if isinstance(verdict := summary.get("verdict"), dict):
        expected_verdict, _ = run_verdict({a: m["verdict"] for a, m in valid.items()})
        if verdict.get("verdict") != expected_verdict:
            problems.append((prefix + "verdict.verdict", f"{short(verdict.get('verdict'))} does not follow from the "
                             f"attacks' verdicts ({expected_verdict!r})"))
    return problems


# --- reading ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """A validated entry: the submission's metadata, the run's summary, and the numbers the board
    ranks it by (from the summary)."""

    path: Path
    meta: dict[str, Any]  # everything but the summary and the transcript: entry_id, name, authors, url, date, ...
    summary: RunSummary
    transcript: Transcript | None = None  # what each attack recovered of each prompt; None before schema 4

    @property
    def entry_id(self) -> str:
        return self.meta["entry_id"]

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def defense_spec(self) -> str:
        """Where the defence came from: a registered name, or a plug-in file by its base name."""
        return self.meta.get("defense_spec") or self.summary.defense["name"]

    @property
    def worst_exact_match(self) -> float:
        """Recomputed from the attacks (the validator also checks the stored worst case)."""
        return max(a.exact_match for a in self.summary.attacks.values())

    @property
    def worst_attack(self) -> str:
        """The strongest attack as the entry states it (checked against metrics.worst_case)."""
        return self.summary.worst_case["exact_match"].attack

    @property
    def verdict(self) -> str | None:
        return self.summary.verdict.verdict if self.summary.verdict else None

    @property
    def conclusive(self) -> bool:
        """Whether the entry's privacy (or leak) is established rather than resting on search failures."""
        return self.verdict in ("leaks", "protected")

    @property
    def worst_token_accuracy(self) -> float:
        return max(a.token_accuracy for a in self.summary.attacks.values())

    @property
    def top1_agreement(self) -> float | None:
        return self.summary.utility["top1_agreement"]

    @cached_property
    def intervals(self) -> Intervals:
        """The 95% intervals of what the board ranks, from the entry's prompts (`invbench.uncertainty`);
        none for an entry without a transcript (schema 3)."""
        if self.transcript is None:
            return Intervals(None, None, None)
        prompts = self.transcript.prompts
        per_prompt = self.summary.utility.get("per_prompt")
        return intervals_of(
            token_accuracy={a: [p.attacks[a].token_accuracy for p in prompts] for a in self.summary.attacks},
            exact={a: [p.attacks[a].exact_match for p in prompts] for a in self.summary.attacks},
            worst_exact_attack=self.summary.worst_case["exact_match"].attack,
            top1=[p["top1_agreement"] for p in per_prompt] if per_prompt else None)


def entry_of(path: Path, data: dict[str, Any]) -> Entry:
    """An Entry from data that passed `check_entry`; the summary is read through RunSummary.from_dict."""
    if legacy_entries.is_legacy(data):
        return Entry(path, legacy_entries.metadata_of(data), legacy_entries.summary_of(data))
    transcript = Transcript.from_dict(data["transcript"]) if "transcript" in data else None
    return Entry(path, {k: v for k, v in data.items() if k not in ("summary", "transcript")},
                 RunSummary.from_dict(data["summary"]), transcript)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"duplicate key(s) {', '.join(map(repr, duplicates))}")
    return dict(pairs)


def parse_entry_file(path: Path) -> tuple[Any, Problem | None]:
    """JSON text to data, strictly: finite numbers only, no duplicate keys, no oversized or deeply
    nested files (schema_check.read_json_file)."""
    try:
        if path.is_symlink() or not path.is_file():
            return None, Problem(path, "", "not a regular file")
        if path.stat().st_size > MAX_ENTRY_BYTES:
            return None, Problem(path, "", f"larger than {MAX_ENTRY_BYTES} bytes")
        return read_json_file(path, max_bytes=MAX_ENTRY_BYTES, object_pairs_hook=_unique_keys), None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        return None, Problem(path, "", f"not valid JSON: {one_line(exc, limit=200)}")


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
    return entry_of(path, data)


def load_entries(protocol_dir: Path, *, protocol_definition: dict[str, Any] | None = None,
                 ) -> tuple[list[Entry], list[Problem]]:
    """Every valid `*.json` entry directly under `protocol_dir` (sorted by id), and the problems
    of the ones skipped. `protocol_definition` defaults to the registered protocol named like the
    folder, when there is one."""
    protocol_dir = Path(protocol_dir)
    protocol_definition = protocol_definition or registered_definition(protocol_dir.name)
    entries, problems = [], []
    for path in sorted(protocol_dir.glob("*.json")):
        if verification.is_record(path):  # <entry-id>.verification.json: what verify found, not an entry
            continue
        data, problem = parse_entry_file(path)
        found = [problem] if problem else check_entry(data, path, protocol_dir_name=protocol_dir.name,
                                                      protocol_definition=protocol_definition)
        if found:
            problems.extend(found)
        else:
            entries.append(entry_of(path, data))
    entries, look_alikes = look_alike_problems(entries)
    return entries, problems + look_alikes
