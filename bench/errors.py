"""The one base class of invbench's user-facing errors.

Every error that means "bad input or an unavailable resource" derives from `InvbenchError`;
`invbench.cli.main` catches it and prints one line (exit 2). This module imports nothing, so
every folder (leaks/, defenses/, attacks/, bench/) may import it without breaking the one-way
data flow of the layout.
"""


class InvbenchError(Exception):
    """Bad input or an unavailable resource; the message is one line saying what to do."""


def one_line(message: object, *, limit: int | None = None) -> str:
    """A message (an exception's included) as one line: its non-blank lines stripped and joined by
    spaces, cut to `limit` characters when given, so that a quoted foreign error cannot flood ours."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."
