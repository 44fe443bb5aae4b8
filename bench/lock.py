"""One writer per results folder.

The lock is an advisory `flock` on `<folder>/.invbench.lock`, a file that also holds the writer's
process id for the message. The kernel drops an flock when its process ends, however it ends
(exit, Ctrl-C, SIGKILL, crash), so a lock left behind never blocks: the next run locks the same
file again. Unlike a bare process-id check this also survives process-id reuse (in a container
the next run, or an unrelated process, can get a dead run's pid) and two runs taking over the
same stale lock at once. Where flock is unavailable (not POSIX, or a file system without locks)
the lock falls back to the process id in the file, taken over when that process is gone.

A folder the lock created is removed again on exit when nothing was written into it, so a run
refused for bad input leaves no empty results folder behind.
"""
from __future__ import annotations

import errno
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import InvbenchError
from .results import ResultsError, results_error

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

LOCK_NAME = ".invbench.lock"


class LockedError(InvbenchError, ValueError):
    """Another live process is writing to the same results folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._by_pid = False
        self._created_folder = False

    def __enter__(self) -> "RunLock":
        if self.folder.exists() and not self.folder.is_dir():
            raise ResultsError(f"results folder {self.folder} is a file, not a folder; choose another --out")
        self._created_folder = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise results_error(self.folder, exc, what="create the results folder") from exc
        try:
            self._acquire()
        except BaseException:
            self._remove_folder_if_unused()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            # Unlink while still holding the lock: a run that opened this file meanwhile sees that it
            # is gone once it gets the lock, and starts over on a fresh file (see _acquire_flock).
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass  # a leftover lock file is harmless: nobody holds its flock
            os.close(self._fd)
            self._fd = None
        elif self._by_pid and self._holder() == os.getpid():
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass
        self._remove_folder_if_unused()

    # --- acquiring ------------------------------------------------------------------------
    def _acquire(self) -> None:
        if fcntl is None or not self._acquire_flock():
            self._by_pid = True
            self._acquire_by_pid()

    def _acquire_flock(self) -> bool:
        """True once locked; False when this file system cannot flock (use the pid fallback)."""
        while True:
            fd = self._open(os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._refuse(self._holder())
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return False
                raise results_error(self.path, exc, what="lock") from exc
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fd).st_ino:  # the previous holder removed it as we waited: start over
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
            except OSError as exc:
                self.path.unlink(missing_ok=True)
                os.close(fd)
                raise results_error(self.path, exc, what="write the lock file") from exc
            self._fd = fd
            return True

    def _acquire_by_pid(self) -> None:
        while True:
            try:
                fd = self._open(os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and holder != os.getpid() and _alive(holder):
                    self._refuse(holder)
                self.path.unlink(missing_ok=True)  # stale: its writer is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return

    def _open(self, flags: int) -> int:
        try:
            return os.open(self.path, flags, 0o644)
        except FileExistsError:
            raise
        except OSError as exc:
            raise results_error(self.path, exc, what="create the lock file") from exc

    def _refuse(self, holder: int | None) -> None:
        who = f"pid {holder}" if holder is not None else "pid unknown"
        raise LockedError(f"{self.folder} is in use by another invbench run ({who}); "
                          "wait for it to finish or choose another --out") from None

    def _holder(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _remove_folder_if_unused(self) -> None:
        if self._created_folder:
            try:
                self.folder.rmdir()  # only succeeds when empty
            except OSError:
                pass


@contextmanager
def board_lock(folder: Path, *, wait: float = 300.0) -> Iterator[None]:
    """The lock of a leaderboard folder (the same flock as a run's): two renders of one board take
    turns, waiting up to `wait` seconds, instead of the later one deleting pages the earlier wrote."""
    deadline = time.monotonic() + wait
    lock = RunLock(folder)
    while True:
        try:
            lock.__enter__()
            break
        except LockedError:
            if time.monotonic() > deadline:
                raise LockedError(f"{folder} is being rendered by another invbench process for over {wait:.0f} s; "
                                  "wait for it to finish") from None
            time.sleep(0.2)
    try:
        yield
    finally:
        lock.__exit__(None, None, None)
