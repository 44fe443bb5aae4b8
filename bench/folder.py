"""The results folder of one run as one object: its lock, config.json, records.jsonl and summary.json.

The file primitives (atomic JSON, whole-batch appends, torn-line repair) are in `results.py`, the
writer's lock in `lock.py`; this is where a run meets them, and the one place config.json and
summary.json are read (`read_config`, `read_summary`; records through `results.read_records`, by a run
or, once it has finished, `read_run_records`).

What a run records must not depend on how it was opened: a resumed run, or a finished one reopened
by `submit`, keeps the provenance of the session that began it (`PROVENANCE`: versions, git commit,
device, sources); config.json lists every session under `sessions`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import InvbenchError, one_line
from .lock import RunLock
from .results import append_records, read_records, repair_records, write_bytes_atomic, write_json_atomic
from .schema_check import read_json_file
from .scoring import record_problem

STALE_TEMP_GLOBS = (".config.json.*.tmp", ".summary.json.*.tmp")  # left by a run killed mid-write
PROVENANCE = ("versions", "git_commit", "device", "model_source", "dataset_source")  # kept from the first session
SESSION = ("git_commit", "device")  # what each session lists of itself
# config.json holds the prompts' ids and summary.json a radius per prompt: megabytes for the largest runs
MAX_RESULTS_JSON_BYTES = 256_000_000


class FolderError(InvbenchError, ValueError):
    """A results folder that cannot be used for this run (foreign, damaged)."""


def _read_json(path: Path, *, remedy: str) -> Any:
    """The JSON in `path`, or None when there is no such file; unreadable or not JSON raises
    FolderError in one line ending in `remedy`."""
    if not path.exists():
        return None
    try:
        return read_json_file(path, max_bytes=MAX_RESULTS_JSON_BYTES)  # bounded in size and depth
    except (ValueError, OSError) as exc:
        raise FolderError(f"{path} is unreadable ({type(exc).__name__}: {one_line(exc, limit=200)}); {remedy}") from None


def _config_remedy(folder: Path) -> str:
    """What to do about a damaged config.json. With records beside it, removing it alone would only
    get the records refused ("config.json is missing"), so the way out is the whole folder."""
    records = Path(folder) / "records.jsonl"
    if records.exists() and records.stat().st_size > 0:
        return (f"its records cannot be matched to a run without it: remove the folder {folder} to start the run "
                "over, or choose another --out")
    return "remove it (no records depend on it) or choose another --out"


def read_config(folder: Path) -> dict[str, Any] | None:
    """The config.json of a results folder, or None when there is none. The one place it is
    parsed: unreadable, not JSON, or without a config hash raises FolderError in one line."""
    config_path = Path(folder) / "config.json"
    data = _read_json(config_path, remedy=_config_remedy(folder) if config_path.exists() else "")
    if data is not None and (not isinstance(data, dict) or not isinstance(data.get("config_hash"), str)):
        what = "an object without a config_hash" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise FolderError(f"{config_path} is not an invbench config ({what}); {_config_remedy(folder)}")
    return data


def read_summary(folder: Path):
    """The RunSummary of a results folder (validated by RunSummary.from_dict), or None before the
    run has finished. A summary.json that is not JSON or does not fit the schema raises in one line."""
    from .summary import RunSummary

    data = _read_json(Path(folder) / "summary.json", remedy="rerun the same command to write it again")
    return None if data is None else RunSummary.from_dict(data)


def read_run_records(folder: Path) -> list[dict]:
    """The whole records of a results folder (a torn or malformed line is left out, as a run reads them)."""
    return read_records(Path(folder) / "records.jsonl", check=record_problem)


def _record_key(record: dict) -> tuple[Any, Any]:
    return record.get("attack"), record.get("prompt_index")


def _target_problem(record: dict, targets: dict[int, list[int]]) -> str | None:
    """Why a whole record is not of this run: a prompt it does not have, or another prompt's ids."""
    expected = targets.get(record["prompt_index"])
    if expected is None:
        return f"prompt {record['prompt_index']} is not one of this run's prompts"
    if list(record["target_ids"]) != list(expected):
        return f"its target ids are not those of prompt {record['prompt_index']}"
    return None


class ResultsFolder:
    """One run's folder: config.json, records.jsonl and summary.json, behind a lock.

    Entering takes the lock (a second writer is refused) and checks an existing folder before
    anything is loaded: records without a config, or a damaged config, are refused. `start`
    refuses a folder of another configuration, writes config.json, rewrites the records file without
    its torn lines (any line that is not a whole record by the record schema) and duplicates, and
    returns what is already done; `append` saves a batch of records whole; `write_summary`
    writes summary.json."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.records_path = self.path / "records.jsonl"
        self._lock = RunLock(self.path)
        self.previous: dict[str, Any] | None = None  # config.json as this session found it
        self.config: dict[str, Any] | None = None  # config.json as `start` wrote it
        self.repaired = 0  # torn or duplicate lines `start` dropped from records.jsonl
        self._check: Callable[[Any], str | None] = record_problem  # what a whole record of this run is

    def __enter__(self) -> "ResultsFolder":
        self._lock.__enter__()
        try:
            self.previous = read_config(self.path)
            if self.previous is None and self.records_path.exists() and self.records_path.stat().st_size > 0:
                raise FolderError(f"{self.records_path} has results but {self.path / 'config.json'} is missing, so they "
                                  f"cannot be matched to this run; choose another --out, or remove the folder {self.path} "
                                  "to start over")
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None and self.previous is None and self.config is not None and not self.records():
            # A new run that failed before recording anything (a bad --ranker, a plug-in that raised) leaves no
            # config.json: it would refuse the corrected command as "a different run".
            (self.path / "config.json").unlink(missing_ok=True)
        self._lock.__exit__(*exc)

    def start(self, config: dict[str, Any], *, targets: dict[int, list[int]] | None = None) -> set[tuple[str, int]]:
        """Create or resume: returns the (attack, prompt index) pairs already recorded. A resumed
        folder keeps its first session's provenance; `self.config` is what config.json then holds.
        `targets` (prompt index -> its true ids): a record of another prompt, or whose target ids are
        not its prompt's, is not this run's and is dropped (its prompt is attacked again)."""
        if self.previous is not None and self.previous["config_hash"] != config["config_hash"]:
            raise FolderError(f"{self.path} holds a different run (config hash {self.previous['config_hash']} vs "
                              f"{config['config_hash']}); choose another --out")
        self.config = self._with_sessions(config)
        self.path.mkdir(parents=True, exist_ok=True)
        for pattern in STALE_TEMP_GLOBS:
            for stale in self.path.glob(pattern):
                stale.unlink(missing_ok=True)
        write_json_atomic(self.path / "config.json", self.config)
        if targets is not None:
            self._check = lambda record: record_problem(record) or _target_problem(record, targets)
        self.repaired = repair_records(self.records_path, check=self._check, key=_record_key)
        return {_record_key(r) for r in self.records()}

    def _with_sessions(self, config: dict[str, Any]) -> dict[str, Any]:
        """`config` with the provenance of the session that began the run and every session listed."""
        previous = self.previous or {}
        sessions = previous.get("sessions", [{k: previous.get(k) for k in SESSION}] if previous else [])
        kept = {k: previous[k] for k in PROVENANCE if k in previous}
        return {**config, **kept, "sessions": [*sessions, {k: config.get(k) for k in SESSION}]}

    def append(self, records: Iterable[dict]) -> None:
        append_records(self.records_path, records)

    def problem(self, record: Any) -> str | None:
        """Why `record` is not a whole record of this run (as `records` reads the file), or None."""
        return self._check(record)

    def reorder(self, key: Callable[[dict], Any]) -> bool:
        """Rewrite records.jsonl with its whole records sorted by `key` (a sharded run's shards finish in any
        order; an unsharded run writes attack by attack, prompt by prompt), atomically: killed meanwhile, the
        file is the old one or the new one. A file already in order is not touched; returns whether it was
        rewritten."""
        records = self.records()
        ordered = sorted(records, key=key)
        if ordered == records:
            return False
        blob = "".join(json.dumps(r, allow_nan=False) + "\n" for r in ordered).encode("utf-8")
        write_bytes_atomic(self.records_path, blob, what="rewrite (in prompt order)")
        return True

    def records(self) -> list[dict]:
        """The whole records: a line that fails the record schema, or is not of this run's prompts,
        counts as torn (its prompt is redone)."""
        return read_records(self.records_path, check=self._check)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.path / "summary.json", summary)

    def interrupted_message(self, total: int) -> str:
        return (f"interrupted: {len(self.records())} of {total} prompt results are saved in {self.records_path}; "
                "rerun the same command to resume")
