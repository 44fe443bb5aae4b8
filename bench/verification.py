"""Verification records: what `invbench verify` found, kept beside the entry it checked.

`verify` writes `<protocol>/<entry-id>.verification.json` (entry ids are slugs, so the name can
never be an entry's): the command, the date, the versions and device of the rerun, the result and
the failing fields, which prompts were rerun and the seed that drew them (anyone can redo the draw),
how many answers were compared prompt by prompt, and the SHA-256 of the entry file as it was verified.

The board marks an entry verified only when its record earns it (`status`): a record of the current
format that agrees with itself (passed exactly when nothing failed; as many prompt indices as
prompts, distinct and within the entry's; every prompt's answers compared and each equal or a float
tie; a date that is not in the future; the command verify writes) and with the entry (its n, and the
SHA-256 of the entry file as it is now), over at least `prompt_checks.required_subset(n)` prompts.
A record of the earlier format (the first N prompts, means only) no longer earns the mark: its
entry shows as not re-verified. Anything else shows what it is ("verification failed", "changed since
verified", "partly verified", "record not valid").

Why it matters: when an entry is read, everything that follows from its other fields is recomputed
(`invbench.derived`, `invbench.transcript`), but its measurements can only be checked by a rerun. A
forged entry that is consistent with itself passes every check on read and would rank by its numbers;
the verified mark is what tells it apart from a result a maintainer reproduced.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from .errors import InvbenchError, one_line
from .results import write_json_atomic
from .schema_check import first_problem, format_checker, load_schema, read_json_file

FORMAT = "invbench-verification/2"
OLD_FORMATS = ("invbench-verification/1",)  # read (and shown as not re-verified), never written
SUFFIX = ".verification.json"
MAX_RECORD_BYTES = 64_000  # a record is well under 2 KB


class VerificationError(InvbenchError, ValueError):
    """A verification record that cannot be read or does not fit its schema; one line."""


def record_path(entry_path: Path) -> Path:
    """Where the record of an entry lies: beside it, `<entry-id>.verification.json`."""
    entry_path = Path(entry_path)
    return entry_path.with_name(entry_path.stem + SUFFIX)


def is_record(path: Path) -> bool:
    return Path(path).name.endswith(SUFFIX)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_record(report: Any, *, command: str, entry_sha256: str, versions: dict[str, Any],
                 verified_at: str | None = None) -> dict[str, Any]:
    """The record of one `verify` (`report`: an invbench.submit.VerifyReport)."""
    compared = report.prompts
    return {
        "format": FORMAT,
        "entry": Path(report.entry_path).name,
        "entry_sha256": entry_sha256,
        "result": "passed" if report.ok else "failed",
        "failed": [one_line(name, limit=200) for name in report.failed_names][:200],
        "checked": sum(c.ok is not None for c in report.checks),
        "prompts": len(report.prompt_indices),
        "of": report.n_entry,
        "prompt_indices": list(report.prompt_indices),
        "seed": report.seed,
        "required": report.required,
        "answers": {"compared": compared.compared if compared else 0, "equal": compared.equal if compared else 0,
                    "float_ties": compared.float_ties if compared else 0},
        "command": command,
        "date": verified_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "git_commit": report.commits[1],
        "device": report.hardware[1],
    }


def write_record(entry_path: Path, record: dict[str, Any]) -> Path:
    path = record_path(entry_path)
    write_json_atomic(path, record)
    return path


@lru_cache(maxsize=None)
def _validator() -> Draft202012Validator:
    return Draft202012Validator(load_schema("verification"), format_checker=format_checker())


def read_record(entry_path: Path) -> dict[str, Any] | None:
    """The record beside an entry, or None when there is none; VerificationError for one that is
    unreadable, too large, too deep or does not fit `bench/schemas/verification.schema.json`."""
    path = record_path(entry_path)
    if not path.exists() and not path.is_symlink():
        return None
    try:
        if path.is_symlink() or not path.is_file():
            raise ValueError("not a regular file")
        data = read_json_file(path, max_bytes=MAX_RECORD_BYTES)
    except (OSError, ValueError) as exc:
        raise VerificationError(f"{path}: not a readable verification record ({one_line(exc, limit=200)})") from None
    problem = first_problem(_validator(), data)
    if problem:
        raise VerificationError(f"{path}: {problem}")
    return data


@dataclass(frozen=True)
class Status:
    """Whether an entry is verified, in the board's words."""

    state: str  # verified | partly | failed | changed | outdated | invalid | not verified
    record: dict[str, Any] | None = None
    why: str = ""  # for an invalid record: what is wrong with it

    @property
    def verified(self) -> bool:
        return self.state == "verified"

    def short(self) -> str:
        """The board cell: a word or two (the entry's page gives `text`)."""
        if self.record is None:
            return "no"
        return {"verified": f"yes ({self.record['prompts']}/{self.record['of']})",
                "partly": f"partly ({self.record['prompts']}/{self.record['of']})", "failed": "FAILED",
                "changed": "changed since", "outdated": "not re-verified", "invalid": "invalid record"}[self.state]

    def text(self) -> str:
        if self.record is None:
            return "not verified"
        day = str(self.record.get("date", ""))[:10]
        scope = f"{self.record.get('prompts')} of {self.record.get('of')} prompts"
        return {"verified": f"verified ({scope}, {day})",
                "partly": f"partly verified ({scope}; {self.record.get('required')} needed, {day})",
                "failed": f"verification failed ({day}: {', '.join(self.record.get('failed', [])[:2]) or '-'})",
                "changed": f"changed since verified ({day})",
                "outdated": f"not re-verified (the earlier check, {day}, reran the first {scope} and compared means only)",
                "invalid": f"record not valid ({self.why})"}[self.state]


def record_problem(record: dict[str, Any], *, n: int, now: datetime | None = None) -> str | None:
    """What makes a record of the current format disagree with itself or with an entry of n prompts, or None."""
    from .prompt_checks import required_subset

    indices = record["prompt_indices"]
    answers = record["answers"]
    passed = record["result"] == "passed"
    now = now or datetime.now(timezone.utc)
    try:
        when = datetime.fromisoformat(record["date"])
    except ValueError:
        return "its date is not a date"
    when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    checks = [
        (record["of"] == n, f"it verified {record['of']} prompts' entry, this entry has {n}"),
        (passed == (record["failed"] == []), "its result and its failures disagree"),
        (record["checked"] >= 1, "it checked nothing"),
        (len(indices) == record["prompts"] == len(set(indices)), "its prompt count is not its distinct prompts"),
        (all(0 <= i < n for i in indices), "it names prompts the entry does not have"),
        (record["required"] == required_subset(n), "its required subset is not the rule's"),
        ((record["seed"] is None) == (record["prompts"] == n), "a subset needs the seed that drew it"),
        (not passed or (answers["compared"] >= record["prompts"]
                        and answers["equal"] + answers["float_ties"] == answers["compared"]),
         "it passed without comparing every prompt's answers"),
        (when <= now + timedelta(days=1), "its date is in the future"),
        (record["command"].startswith("invbench verify "), "its command is not a verify command"),
    ]
    return next((why for ok, why in checks if not ok), None)


def entry_status(entry: Any) -> Status:
    """The status of an entry (`invbench.entries.Entry`) from the record beside it (`read_record`, which
    raises VerificationError for an unreadable one)."""
    return status(entry.path, read_record(entry.path), n=entry.summary.n)


def status(entry_path: Path, record: dict[str, Any] | None, *, n: int | None = None) -> Status:
    """An entry's status from its record (read with `read_record`): verified only when the record is of
    the current format, agrees with itself and with the entry of n prompts (`record_problem`), passed over
    at least the required subset, and the entry file's SHA-256 is the one verified."""
    if record is None:
        return Status("not verified")
    if record["format"] in OLD_FORMATS:
        return Status("outdated", record)
    if record["entry_sha256"] != file_sha256(entry_path):
        return Status("changed", record)
    problem = record_problem(record, n=n if n is not None else record["of"])
    if problem:
        return Status("invalid", record, problem)
    if record["result"] != "passed":
        return Status("failed", record)
    return Status("verified" if record["prompts"] >= record["required"] else "partly", record)
