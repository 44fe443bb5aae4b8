"""Verification records: what `invbench verify` found, kept beside the entry it checked.

`verify` writes `<protocol>/<entry-id>.verification.json` (entry ids are slugs, so the name can
never be an entry's): the command, the date, the versions and device of the rerun, the result and
the failing fields, and the SHA-256 of the entry file as it was verified. The board marks an entry
verified only when its record passed and the hash matches the file as it is now: an entry edited
after its verification is shown as changed, one never verified as not verified.

Why it matters: when an entry is read, everything that follows from its other fields is recomputed
(`invbench.derived`), but its measurements can only be checked by a rerun. A forged entry that is
consistent with itself (every metric, verdict and guarantee made up to agree) passes every check on
read and would rank by its numbers; the verified mark is what tells it apart from a result a
maintainer reproduced. A maintainer adds the mark by running `invbench verify ENTRY [--subset N]`
and committing the record it writes with the entry.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from .errors import InvbenchError, one_line
from .results import write_json_atomic
from .schema_check import first_problem, format_checker, load_schema, read_json_file

FORMAT = "invbench-verification/1"
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
    return {
        "format": FORMAT,
        "entry": Path(report.entry_path).name,
        "entry_sha256": entry_sha256,
        "result": "passed" if report.ok else "failed",
        "failed": [c.metric for c in report.failures],
        "checked": sum(c.ok is not None for c in report.checks),
        "prompts": report.subset or report.n_entry,
        "of": report.n_entry,
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

    state: str  # verified | failed | changed | not verified
    record: dict[str, Any] | None = None

    @property
    def verified(self) -> bool:
        return self.state == "verified"

    def text(self) -> str:
        if self.record is None:
            return "not verified"
        scope = f"{self.record['prompts']} of {self.record['of']} prompts"
        day = self.record["date"][:10]
        return {"verified": f"verified ({scope}, {day})",
                "failed": f"verification failed ({day}: {', '.join(self.record['failed'][:3]) or '-'})",
                "changed": f"changed since verified ({day})"}[self.state]


def status(entry_path: Path, record: dict[str, Any] | None) -> Status:
    """An entry's status from its record (read with `read_record`): verified only when the record
    passed and the entry file's SHA-256 is the one verified."""
    if record is None:
        return Status("not verified")
    if record["entry_sha256"] != file_sha256(entry_path):
        return Status("changed", record)
    return Status("verified" if record["result"] == "passed" else "failed", record)
