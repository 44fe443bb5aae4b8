"""How results files are written and read so that nothing computed is lost (the folder object, `folder.py`, uses these).

What survives what:
- JSON files are written atomically (temp file, fsync, os.replace): a reader, or a run killed at
  any moment, sees the old file or the new one, never half of one.
- records.jsonl gets one line per prompt and attack, appended and fsynced as each batch finishes.
  An append that fails (full disk, Ctrl-C in the middle) is cut back to where it started, so the
  file holds whole batches only; a process killed mid-append (SIGKILL, power) can leave a torn
  last line. A line that is not a whole record (torn, garbage, or failing the record schema) is
  skipped by readers, so its prompt is attacked again, and `repair_records` rewrites the file
  (atomically) without it, one record per prompt, before a resume appends again.
- Writing errors become ResultsError: one line naming the file and the reason, and what was
  already saved is left as it was.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import InvbenchError
from .schema_check import finite_json

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


def write_bytes_atomic(path: Path, blob: bytes, *, what: str = "write") -> None:
    """Temp file beside `path`, fsync, os.replace; readable by others (FILE_MODE). `what` names the
    operation in the error."""
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
        raise results_error(path, exc, what=what) from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def write_set_atomic(files: dict[Path, bytes]) -> None:
    """Several files replaced as one set, as far as a file system allows: every file is written and
    fsynced beside its place first, and only when all are written are they moved in (os.replace, in
    order). A failure while writing (a full disk) leaves every old file as it was."""
    written: list[tuple[str, Path]] = []
    try:
        for path, blob in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            written.append((tmp, path))
            try:
                if hasattr(os, "fchmod"):
                    os.fchmod(fd, FILE_MODE)
                _write_all(fd, blob)
                os.fsync(fd)
            finally:
                os.close(fd)
        for tmp, path in written:
            os.replace(tmp, path)
        written = []
    except OSError as exc:
        failed = written[-1][1] if written else next(iter(files), Path("."))
        raise results_error(failed, exc) from exc
    finally:
        for tmp, _ in written:
            Path(tmp).unlink(missing_ok=True)


MAX_RECORD_LINE_BYTES = 4_000_000  # one prompt's record is a few KB; a line beyond this is damage


def _parse_records(data: bytes, check: Callable[[Any], str | None] | None) -> tuple[list[dict], int]:
    """(the whole records in `data`, the number of lines that are not): a line without its newline
    (torn), not JSON, nested too deep, over the size bound, not an object, or one `check` refuses."""
    records, bad = [], 0
    for line in data.splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            if not line.endswith(b"\n") or len(line) > MAX_RECORD_LINE_BYTES:
                raise ValueError("torn or oversized")
            record = finite_json(line.decode("utf-8"))
        except ValueError:  # JSONDecodeError, UnicodeDecodeError, NaN, too deep
            bad += 1
            continue
        if not isinstance(record, dict) or (check is not None and check(record) is not None):
            bad += 1
            continue
        records.append(record)
    return records, bad


def read_records(path: Path, *, check: Callable[[Any], str | None] | None = None) -> list[dict]:
    """All whole records; lines that are not (see `_parse_records`) are skipped, as torn."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return _parse_records(data, check)[0]


def repair_records(path: Path, *, check: Callable[[Any], str | None] | None = None,
                   key: Callable[[dict], Any] | None = None) -> int:
    """Rewrite the file without its torn lines (a torn last line, garbage in the middle, a record
    `check` refuses), and without every record of a `key` that appears more than once: a run writes
    each prompt once, so two lines for one prompt mean the file was altered, and neither can be
    trusted (before: the last was kept, so a planted line replaced the genuine one). The prompts of the
    dropped lines are attacked again. Returns the number of lines dropped. The rewrite is atomic
    (temp file, fsync, os.replace): killed here, the file is the old one or the new one, and nothing
    whole is lost. A file with nothing to drop is not touched."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    records, bad = _parse_records(data, check)
    whole = len(records)
    if key is not None:
        counts = Counter(key(r) for r in records)
        records = [r for r in records if counts[key(r)] == 1]  # in the order they were written
    dropped = bad + whole - len(records)
    if not dropped:
        return 0
    blob = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records).encode("utf-8")
    write_bytes_atomic(path, blob, what="rewrite (without its torn lines)")
    return dropped


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
