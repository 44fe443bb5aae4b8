"""Leaderboard commands: `submit`, `verify`, `leaderboard`, `protocols`.

Plain click commands; `bench/cli.py` registers them on the main group. Bad input (an unknown
protocol, a malformed entry, an entry id taken by another submission) is one line and exit 2,
like every user error of `invbench`; a verification outside its tolerances prints the report and
exits 1.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import click

from .cli_options import (BOARD_DIR, DEVICE, RUNS_DIR, FiniteFloatRange, defense_flags, defense_params, engine_of,
                          engine_options, existing_board_dir)
from .protocols import PROTOCOLS, UTILITY_FLOOR, Protocol, ProtocolError, get_protocol, leak_point

# Entries, boards and runs are imported when a command runs: listing the protocols or a command's help
# must not wait for torch (this module is imported for `invbench protocols` and each command's --help).


class BoardUsageError(click.ClickException):
    """One line on stderr, exit 2, in the words `invbench`'s other user errors use."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def one_line_errors(func: Callable) -> Callable:
    """Turn this module's own errors into BoardUsageError (others reach `invbench.cli.main`)."""
    import functools

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .entries import EntryError
        from .submit import SubmitError

        try:
            return func(*args, **kwargs)
        except (EntryError, SubmitError, ProtocolError) as exc:
            raise BoardUsageError(str(exc)) from exc
    return wrapper


def _protocol(ctx: click.Context, param: click.Parameter, value: str | None) -> Protocol | None:
    if value is None:
        return None
    try:
        return get_protocol(value)
    except ProtocolError as exc:
        raise click.BadParameter(str(exc)) from None


def _echo_err(line: str) -> None:
    click.echo(line, err=True)


@click.command()
@click.option("--defense", required=True, help="Defence name (see `invbench defenses`) or path/to/file.py:ClassName.")
@defense_flags
@click.option("--protocol", required=True, callback=_protocol, help="Protocol (see `invbench protocols`).")
@click.option("--name", required=True, help="Display name of the entry; its id is made from it.")
@click.option("--authors", default="", help="Who made the defence.")
@click.option("--url", default="", help="Paper or code (http or https).")
@click.option("--entry-id", default=None, help="Entry id instead of the one made from --name ([a-z0-9-]).")
@DEVICE
@engine_options(shards=True)
@RUNS_DIR
@BOARD_DIR
@one_line_errors
def submit(defense: str, protocol: Protocol, name: str, authors: str, url: str, entry_id: str | None, device: str,
           runs_dir: Path, board_dir: Path, **flags: Any) -> None:
    """Run a protocol for one defence and write its leaderboard entry (rerun to resume)."""
    from .submit import submit as run_submission

    engine = engine_of(flags)
    path = run_submission(defense=defense, defense_params=defense_params(flags), protocol=protocol, name=name,
                          authors=authors, url=url, entry_id=entry_id, runs_dir=runs_dir, board_dir=board_dir,
                          device=device, echo=_echo_err, engine=engine)
    click.echo(f"entry: {path}")
    click.echo(f"render the board: invbench leaderboard --protocol {protocol.name}")


@click.command()
@click.argument("entry", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--subset", type=click.IntRange(min=1), default=None,
              help="Rerun N prompts drawn at random [the fewest that catch a forgery on a quarter of the prompts with "
                   "probability 0.99: 11 of 25]; N = the entry's n reruns all.")
@click.option("--draw-seed", "seed", type=click.IntRange(0, 2**32 - 1), default=None,
              help="Draw the subset with this seed (a record's seed redraws its prompts) [a fresh one].")
@click.option("--defense", default=None, help="Load the defence from path/to/file.py:ClassName (plug-in files).")
@click.option("--record/--no-record", default=True, show_default=True,
              help="Write the result beside the entry (<entry-id>.verification.json), which the board shows.")
@DEVICE
@engine_options(shards=True)
@RUNS_DIR
@one_line_errors
def verify(entry: Path, subset: int | None, seed: int | None, defense: str | None, record: bool, device: str,
           runs_dir: Path, **flags: Any) -> None:
    """Rerun a random subset of an entry's prompts in a new folder and compare each with the entry's record of
    it, and every checked figure; exit 1 on a mismatch.

    The result is recorded beside the entry, with the entry file's SHA-256 (--no-record: not)."""
    from .submit import verify as run_verification

    report = run_verification(entry, subset=subset, seed=seed, device=device, defense=defense, runs_dir=runs_dir,
                              record=record, echo=_echo_err, engine=engine_of(flags))
    click.echo(report.format())
    if not report.ok:
        sys.exit(1)  # not a usage error: the entry did not reproduce


@click.command()
@click.option("--protocol", default=None, help="One protocol's board [default: every protocol with a folder].")
@click.option("--utility-floor", type=FiniteFloatRange(0, 1), default=UTILITY_FLOOR, show_default=True,
              help="Minimum top-1 agreement to be ranked.")
@click.option("--strict", is_flag=True, help="Exit 1 when an entry was skipped as malformed.")
@BOARD_DIR
@one_line_errors
def leaderboard(protocol: str | None, utility_floor: float, strict: bool, board_dir: Path) -> None:
    """Render LEADERBOARD.md and index.html for each protocol's entries."""
    from .entries import NAME, check_value
    from .leaderboard import protocol_dirs, render

    if protocol is not None:
        if message := check_value(protocol, NAME):  # a folder name, never a path
            raise BoardUsageError(f"--protocol {protocol!r}: {message}")
        folder = board_dir / protocol
        if protocol not in PROTOCOLS and not folder.is_dir():
            get_protocol(protocol)  # raises: unknown protocol, listing the known ones
        existing_board_dir(board_dir)
        if not folder.is_dir():
            raise BoardUsageError(f"{folder} does not exist: protocol {protocol} has no entries under --board-dir "
                                  f"{board_dir} yet; submit one (invbench submit --protocol {protocol} ...) or check the "
                                  "folder given as --board-dir")
        folders = [folder]
    else:
        folders = protocol_dirs(existing_board_dir(board_dir))
        if not folders:
            raise BoardUsageError(f"no protocol folders under {board_dir}; submit an entry first")
    skipped = 0
    for folder in folders:
        result = render(folder, utility_floor=utility_floor)
        board = result.board
        for problem in board.problems:
            click.echo(f"skipped: {problem}", err=True)
        skipped += len(board.problems)
        click.echo(f"{board.protocol}: {len(board.ranked)} ranked, {len(board.below)} below the floor "
                   f"{utility_floor:.2f}, {len(board.problems)} problem(s) -> {result.markdown}, {result.html}")
    if strict and skipped:
        sys.exit(1)


@click.command()
def protocols() -> None:
    """List the protocols an entry can be submitted to."""
    width = max(len(name) for name in PROTOCOLS) + 1
    for p in PROTOCOLS.values():
        click.echo(f"{p.name:<{width}} {p.model} | {p.dataset} | {p.n} prompts x {p.tokens} tokens | seed {p.seed} | "
                   f"attacks {', '.join(p.attacks)} ({p.preset})")
        click.echo(f"{'':<{width}} leak point: {leak_point(p)}")
        click.echo(f"{'':<{width}} {p.description}")
