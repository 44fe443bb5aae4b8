"""How results files are written and read so that nothing computed is lost (the folder object, `folder.py`, uses these).

What survives what:
- JSON files are written atomically (temp file, fsync, os.replace): a reader, or a run killed at
  any moment, sees the old file or the new one, never half of one.
- records.jsonl gets one line per prompt and attack, appended and fsynced as each batch finishes.
  An append that fails (full disk, Ctrl-C in the middle) is cut back to where it started, so the
  file holds whole batches only; a process killed mid-append (SIGKILL, power) can leave a torn
  last line, which readers skip and `repair_records` cuts off before a resume appends again.
- Writing errors become ResultsError: one line naming the file and the reason, and what was
  already saved is left as it was.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from .errors import InvbenchError

FILE_MODE = 0o644  # results are meant to be read by others (mkstemp alone would make them private)


class ResultsError(InvbenchError, OSError):
    """A results file cannot be written (disk full, read-only folder, no permission)."""


NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


def results_error(path: Path, exc: OSError, *, what: str = "write") -> ResultsError:
    """One line for a failed write, with the remedy that fits its cause (before: a read-only folder
    was told to free space)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in NO_SPACE:
        remedy = "free space on that disk, then rerun the same command to resume"
    elif exc.errno in NOT_WRITABLE:
        remedy = "the folder is not writable: make it writable and rerun the same command, or write to another folder"
    else:
        remedy = "fix the cause, then rerun the same command to resume"
    error = ResultsError(f"cannot {what} {path} ({reason}); results saved before are unchanged: {remedy}")
    error.errno = exc.errno
    return error


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_json_atomic(path: Path, data: Any) -> None:
    blob = (json.dumps(data, indent=2, allow_nan=False) + "\n").encode("utf-8")  # bad data fails before any I/O
    write_bytes_atomic(path, blob)


def write_bytes_atomic(path: Path, blob: bytes) -> None:
    """Temp file beside `path`, fsync, os.replace; readable by others (FILE_MODE)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, FILE_MODE)
            _write_all(fd, blob)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise results_error(path, exc) from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def read_records(path: Path) -> list[dict]:
    """All complete records; a torn last line (no newline) and lines that are not JSON objects
    are skipped."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            record = json.loads(line)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def repair_records(path: Path) -> int:
    """Cut a torn last line so that new records start on a line of their own; returns the number
    of bytes cut. os.truncate changes only the length: nothing before the torn line is rewritten,
    so being killed here loses nothing."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    try:
        os.truncate(path, keep)
    except OSError as exc:
        raise results_error(path, exc, what="repair the torn last line of") from exc
    return len(data) - keep


def append_records(path: Path, records: Iterable[dict]) -> None:
    """Append whole lines, fsynced; on any failure (including Ctrl-C) the file is cut back to its
    length before the call, so a batch is saved entirely or not at all."""
    path = Path(path)
    data = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records).encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    except OSError as exc:
        raise results_error(path, exc) from exc
    try:
        start = os.fstat(fd).st_size
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException as exc:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass  # the torn tail is skipped by read_records and cut by repair_records
            if isinstance(exc, OSError):
                raise results_error(path, exc) from exc
            raise
    finally:
        os.close(fd)
