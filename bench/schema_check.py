"""Checking data against the committed JSON Schemas in `bench/schemas/` (Draft 2020-12).

The schema files are the definition, so a submitter can check an entry or a curve file with any
JSON Schema tool. They also give the words of every message: in these schemas a node's
`description` says what the node expects ("a number in [0, 1]"), and a failure there reads as
that description at the field's path. A node without one is named by its type and bounds ("an
integer >= 1", "at most 80 characters"). Only the first failure of each field is kept, in the
order the schema lists its checks.

Two checks that a `pattern` cannot make in Python's `re` are formats, registered here (a plain
JSON Schema tool skips them): "one-line", no Unicode control or format character (category C),
and "iso-date-time", what `datetime.fromisoformat` reads.
"""
from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker, ValidationError

RANGE_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "maxLength")
TYPE_WORDS = {"object": "an object", "array": "a list", "string": "a string", "integer": "an integer",
              "number": "a number", "boolean": "a boolean", "null": "null"}


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict[str, Any]:
    """The committed schema `bench/schemas/<name>.schema.json`."""
    path = resources.files("invbench") / "schemas" / f"{name}.schema.json"
    return json.loads(path.read_text(encoding="utf-8"))


def format_checker() -> FormatChecker:
    """jsonschema's formats (date, ...) and ours, on a new checker (nothing global is changed)."""
    checker = FormatChecker()
    checker.checks("one-line")(is_one_line)
    checker.checks("iso-date-time", raises=ValueError)(is_iso_date_time)
    return checker


def is_one_line(value: Any) -> bool:
    """No control or format characters: newlines would break a Markdown row, bidi overrides
    would disguise a name."""
    return not isinstance(value, str) or not any(unicodedata.category(c).startswith("C") for c in value)


def is_iso_date_time(value: Any) -> bool:
    return not isinstance(value, str) or bool(datetime.fromisoformat(value))


# --- the one bounded JSON reader -------------------------------------------------------------
# Every JSON file invbench reads (entries, verification records, curves, summary.json, config.json,
# each records.jsonl line) goes through `finite_json`, and files through `read_json_file`: bounded in
# size and depth, so that a crafted file is malformed like any other (named and skipped) rather than a
# RecursionError (1,000 nested `[` in a 2 KB entry once stopped `leaderboard`, `verify` and `curve`).
MAX_DEPTH = 64  # invbench's own files nest at most ~8 deep
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def nesting_depth(text: str, *, limit: int | None = None) -> int:
    """How deep the arrays and objects of JSON `text` nest (brackets inside strings aside); stops
    counting once past `limit`."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub('""', text)):
        if match.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if limit is not None and deepest > limit:
                break
        else:
            depth -= 1
    return deepest


def finite_json(text: str, *, max_depth: int = MAX_DEPTH, **hooks: Any) -> Any:
    """JSON text to data with every number finite and at most `max_depth` levels of nesting: a
    schema cannot refuse NaN, Infinity or 1e999 (NaN even passes `minimum` and `maximum`), and deep
    nesting would exhaust the parser's and the validator's recursion, so both are refused here as
    invalid JSON (ValueError)."""
    if nesting_depth(text, limit=max_depth) > max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels")
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float, **hooks)
    except RecursionError:  # a bracket count the scan above missed: still only a malformed file
        raise ValueError(f"nested deeper than {max_depth} levels") from None


def read_json_file(path: Path, *, max_bytes: int, max_depth: int = MAX_DEPTH, **hooks: Any) -> Any:
    """The data of a JSON file, refused (ValueError) when larger than `max_bytes`, nested deeper than
    `max_depth`, not UTF-8, or not strict JSON; OSError when it cannot be read."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"larger than {max_bytes} bytes ({size})")
    with open(path, "rb") as handle:
        raw = handle.read(max_bytes + 1)  # the file may have grown since: never read more than the bound
    if len(raw) > max_bytes:
        raise ValueError(f"larger than {max_bytes} bytes")
    return finite_json(raw.decode("utf-8"), max_depth=max_depth, **hooks)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


# --- failures, one per field ------------------------------------------------------------------

@dataclass(frozen=True)
class Failure:
    """One field that does not fit the schema."""

    path: tuple[str | int, ...]  # keys and list indices from the top: ("attacks", "scan", "exact_match")
    kind: str  # "missing", "key" (a bad key), "range" (a value out of bounds) or "value" (any other)
    expected: str  # what the schema expects there, in words; "" when missing
    value: Any  # what is there: the value, the bad key, or (for "range" on text) the text's length
    node: dict[str, Any]  # the schema node that failed; for a missing field, the node it should fit
    cause: Exception | None = None  # what a format check raised, if it said why

    @property
    def field(self) -> str:
        """The path in words: attacks.scan.exact_match, points[0].params; "(top level)" for the whole."""
        return field_path(self.path)


def failures(validator: Draft202012Validator, data: Any) -> list[Failure]:
    """Every field of `data` that fails `validator`, the first failure of each, in schema order."""
    first: dict[tuple, Failure] = {}
    for error in validator.iter_errors(data):
        for failure in _failures_of(error):
            first.setdefault(failure.path, failure)
    return list(first.values())


def first_problem(validator: Draft202012Validator, data: Any) -> str | None:
    """The first field of `data` that fails, in words ("field attacks.scan.n: expected an integer
    >= 1"), or None when it fits."""
    found = failures(validator, data)
    return f"field {found[0].field}: expected {found[0].expected or 'it to be present'}" if found else None


def _failures_of(error: ValidationError) -> list[Failure]:
    path = tuple(error.absolute_path)
    if error.validator == "required":  # one error names every missing key: report each at its own path
        properties = error.schema.get("properties", {})
        return [Failure(path + (key,), "missing", "", None, properties.get(key, {}))
                for key in error.validator_value if key not in error.instance]
    if "propertyNames" in error.relative_schema_path:  # a bad key: the error sits on the object, name the key
        return [Failure(path + (error.instance,), "key", _expected(error), error.instance, error.schema)]
    if error.validator in RANGE_KEYWORDS:
        value = len(error.instance) if error.validator == "maxLength" else error.instance
        return [Failure(path, "range", _expected(error), value, error.schema)]
    return [Failure(path, "value", _expected(error), error.instance, error.schema, error.cause)]


def _expected(error: ValidationError) -> str:
    """The failed node's description, else its type and bounds in words."""
    if "description" in error.schema:
        return error.schema["description"]
    keyword, value = error.validator, error.validator_value
    if keyword == "type":
        return type_words(value)
    if keyword == "minimum":
        return f"{type_words(error.schema.get('type', 'number'))} >= {value}"
    if keyword == "maxLength":
        return f"at most {value} characters"
    if keyword == "const":
        return json.dumps(value)
    return error.message  # a check this module has no words for: jsonschema's own


def type_words(types: str | list[str]) -> str:
    """["string", "null"] -> "a string or null"."""
    words = [TYPE_WORDS[t] for t in ([types] if isinstance(types, str) else types)]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def field_path(parts: tuple[str | int, ...]) -> str:
    """["points", 0, "x"] -> "points[0].x"; keys cut to 64 characters (they come from the file)."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            key = part if len(part) <= 64 else part[:61] + "..."
            text += f".{key}" if text else key
    return text or "(top level)"
