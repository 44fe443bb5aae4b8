"""The one base class of invbench's user-facing errors.

Every error that means "bad input or an unavailable resource" derives from `InvbenchError`;
`invbench.cli.main` catches it and prints one line (exit 2). This module imports nothing, so
every folder (leaks/, defenses/, attacks/, bench/) may import it without breaking the one-way
data flow of the layout.
"""
import os
from contextlib import contextmanager
from typing import Iterator


class InvbenchError(Exception):
    """Bad input or an unavailable resource; the message is one line saying what to do."""


def one_line(message: object, *, limit: int | None = None) -> str:
    """A message (an exception's included) as one line: its non-blank lines stripped and joined by
    spaces, cut to `limit` characters when given, so that a quoted foreign error cannot flood ours."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


class OutsideExitError(InvbenchError, RuntimeError):
    """Outside code (a defence plug-in) tried to end the process; one line."""


@contextmanager
def refuse_exits(what: str) -> Iterator[None]:
    """While outside code runs (a defence plug-in's import, constructor or methods during a run),
    `sys.exit` and `os._exit` cannot end the process with a status that says nothing went wrong: both
    become OutsideExitError naming `what`, so the command prints one `error:` line and exits non-zero
    (before: a plug-in's `sys.exit(0)` made `submit` exit 0 with no entry written). `os._exit` is
    replaced for the duration (it cannot be caught otherwise); a child forked meanwhile keeps the real one."""
    parent, real_exit = os.getpid(), os._exit
    message = (f"{what} called {{call}}; invbench does not let outside code end the process (nothing was written "
               "for the step in progress)")

    def refused(status: int = 0) -> None:
        if os.getpid() != parent:
            real_exit(status)
        raise OutsideExitError(message.format(call=f"os._exit({status!r})"))

    os._exit = refused
    try:
        yield
    except SystemExit as exc:
        raise OutsideExitError(message.format(call=f"sys.exit({exc.code!r})")) from None
    finally:
        os._exit = real_exit
