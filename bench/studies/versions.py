"""A board's entries under two protocol versions, side by side: did a new version change any answer?

    python -m invbench.studies.versions --old leaderboards/archive/c4-smollm2-10tok-v2 \\
        --new leaderboards/c4-smollm2-10tok --out bench/studies/VERSIONS-c4-smollm2-10tok.md

Entries are matched by id. Per entry: the verdict under each version, the worst-case token accuracy with
its 95% interval (`invbench.uncertainty`, from the entry's transcript), whether the new value lies in the
old interval, the search-failure rate of the attack that sets that worst case, the entry's minutes (`wall_seconds`: the
machine and its load differ between the runs, so compare them loosely) and whether the new entry is
verified. Entries of the old board not yet rerun are listed as such: the table never drops a row.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from ..entries import Entry, EntryError, entry_of, parse_entry_file, read_entry
from ..verification import entry_status


def read_archived(path: Path) -> Entry:
    """An entry of an archived board as it was made: parsed, not re-checked. Today's checks refuse it
    (its protocol definition is no longer the registered one, and figures derived from parameters, such
    as dp's epsilon, are computed differently now); its measured numbers are what the table compares."""
    data, problem = parse_entry_file(path)
    if problem:
        raise EntryError(str(problem))
    return entry_of(path, data)


def board(folder: Path, *, archived: bool) -> dict[str, Entry]:
    """The entries of a board folder by id (verification records left out); a current board's are read
    with every check (`read_entry`)."""
    paths = sorted(p for p in folder.glob("*.json") if not p.name.endswith(".verification.json"))
    return {e.entry_id: e for e in map(read_archived if archived else read_entry, paths)}


def search_failure(entry: Entry) -> float | None:
    """The search-failure rate of the attack that sets the worst-case token accuracy (the strongest)."""
    return entry.summary.attacks[entry.summary.worst_case["token_accuracy"].attack].search_failure_rate


def accuracy(entry: Entry) -> str:
    low_high = entry.intervals.worst_token_accuracy
    value = f"{entry.worst_token_accuracy:.3f}"
    return value if low_high is None else f"{value} [{low_high[0]:.3f}, {low_high[1]:.3f}]"


def within(old: Entry, new: Entry) -> str:
    interval = old.intervals.worst_token_accuracy
    if interval is None:
        return "-"
    return "yes" if interval[0] <= new.worst_token_accuracy <= interval[1] else "**no**"


def fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def verified(entry: Entry) -> str:
    found = entry_status(entry)
    return "yes" if found.verified else "not yet"


HEADER = ["| entry | verdict (old) | verdict (new) | worst token acc. (old) [95%] | worst token acc. (new) [95%] "
          "| new in old interval | search failures of the worst-case attack (old / new) | minutes (old / new) | new verified |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]


def row(entry_id: str, old: Entry, new: Entry | None) -> str:
    if new is None:
        return (f"| {entry_id} | {old.verdict} | not rerun yet | {accuracy(old)} | - | - | "
                f"{fraction(search_failure(old))} / - | {old.summary.wall_seconds / 60:.1f} / - | - |")
    changed = "" if new.verdict == old.verdict else " **(changed)**"
    return (f"| {entry_id} | {old.verdict} | {new.verdict}{changed} | {accuracy(old)} | {accuracy(new)} | "
            f"{within(old, new)} | {fraction(search_failure(old))} / {fraction(search_failure(new))} | "
            f"{old.summary.wall_seconds / 60:.1f} / {new.summary.wall_seconds / 60:.1f} | {verified(new)} |")


def table(old_dir: Path, new_dir: Path) -> str:
    old, new = board(old_dir, archived=True), board(new_dir, archived=False)
    lines = [f"Old: `{old_dir}`; new: `{new_dir}` ({dt.date.today().isoformat()}). "
             f"{sum(i in new for i in old)} of {len(old)} entries rerun.", "", *HEADER]
    lines += [row(entry_id, entry, new.get(entry_id)) for entry_id, entry in old.items()]
    extra = sorted(set(new) - set(old))
    if extra:
        lines += ["", "New entries without an old counterpart: " + ", ".join(f"`{e}`" for e in extra) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m invbench.studies.versions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, type=Path, help="the old version's board folder")
    parser.add_argument("--new", required=True, type=Path, help="the new version's board folder")
    parser.add_argument("--out", type=Path, help="Markdown file to write (default: print)")
    args = parser.parse_args(argv)
    for folder in (args.old, args.new):
        if not folder.is_dir():
            parser.exit(2, f"error: {folder} is not a board folder\n")
    text = table(args.old, args.new)
    if args.out:
        args.out.write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
