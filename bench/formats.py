"""How a value is written in invbench's tables and messages, in one place: the CLI's result table,
the boards, verify's report, the sweep table and the studies' reports (a missing value, None, reads
"-"), and a submitted value quoted in a message (`short`)."""
from __future__ import annotations

from typing import Any


def cell(value: Any, spec: str = ".3f") -> str:
    """A number formatted by `spec`, "-" for None, anything else as its text (a bool is text: True)."""
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def column(value: Any, spec: str = ".4f", *, wide: float = 1e6) -> str:
    """`cell` for a fixed-width column: a number of magnitude `wide` or more in 4 significant digits
    (a perplexity ratio of 1e200 stays one column wide)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) >= wide:
        return format(value, "+.3e" if spec.startswith("+") else ".3e")
    return cell(value, spec)


def short(value: Any, limit: int = 60) -> str:
    """repr of a submitted value for a message, cut so a huge value cannot flood the board."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
