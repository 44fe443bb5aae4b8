"""How a value is written in invbench's tables, in one place: the CLI's result table, the boards,
verify's report, the sweep table and the studies' reports. A missing value (None) reads "-"."""
from __future__ import annotations

from typing import Any


def cell(value: Any, spec: str = ".3f") -> str:
    """A number formatted by `spec`, "-" for None, anything else as its text (a bool is text: True)."""
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)
