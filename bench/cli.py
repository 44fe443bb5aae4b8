"""The `invbench` command line."""
from __future__ import annotations

import importlib
import signal
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import click

from . import __version__
from .errors import InvbenchError, one_line

# Every command, where it lives and its one-line help: `invbench --help` lists them without importing any of
# them (the modules behind `run` import torch and transformers: seconds), and a command's module is imported
# when that command runs or shows its own help. tests/test_structure.py checks each line against the command.
COMMANDS = {
    "run": ("invbench.run_cli", "Leak, defend, attack, score: write results to --out and print a table with a verdict."),
    "defenses": ("invbench.run_cli", "List every registered defence (built-in and plug-in) with its parameters."),
    "attacks": ("invbench.run_cli", "List every registered attack with its presets and options."),
    "utility": ("invbench.run_cli", "The defence's cost alone (no attack): LM-head agreement, KL, perplexity ratio, cosine."),
    "fit-ranker": ("invbench.run_cli", "Fit the `guided` attack's learned ranker on the model's states of public text "
                   "(resumable)."),
    "fisher": ("invbench.run_cli", "Write the Fisher diagonal at a leak point, for aniso-gaussian's --param "
               "fisher_file (Bell 2026)."),
    "submit": ("invbench.board_cli", "Run a protocol for one defence and write its leaderboard entry (rerun to resume)."),
    "verify": ("invbench.board_cli", "Rerun a random subset of an entry's prompts in a new folder and compare each "
               "with the entry's record of it, and every checked figure; exit 1 on a mismatch."),
    "leaderboard": ("invbench.board_cli", "Render LEADERBOARD.md and index.html for each protocol's entries."),
    "protocols": ("invbench.board_cli", "List the protocols an entry can be submitted to."),
    "sweep": ("invbench.sweep_cli", "Run a protocol once per grid point of a defence's parameters; write the curve and "
              "its plot."),
    "curve": ("invbench.sweep_cli", "Plot stored curves: the latest of each defence on one figure, or --compare one "
              "defence's history (or, with several --protocol, its latest curve under each)."),
}


class LazyGroup(click.Group):
    """A group whose commands are imported when used (`COMMANDS`), so listing them costs nothing."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module = importlib.import_module(COMMANDS[name][0])
        return getattr(module, name.replace("-", "_"))

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_line) for name, (_, help_line) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="invbench")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """invbench: how much text leaks from a language model's hidden states, under which defence.

    `invbench run` captures hidden states of real text, applies a defence, runs inversion attacks
    and scores what they recover."""
    ctx.obj = {"debug": debug}


DEBUG_HINT = "rerun with `invbench --debug ...` (before the command) for the traceback"
SIGTERM_EXIT = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into what Ctrl-C raises, so a run saves and says what it kept in the same way."""


def debug_requested(args: list[str]) -> bool:
    """Whether --debug was given to invbench itself: among the options before the command."""
    for arg in args:
        if arg == "--debug":
            return True
        if not arg.startswith("-"):
            return False
    return False


@contextmanager
def sigterm_as_interrupt() -> Iterator[list[int]]:
    """While the CLI runs, SIGTERM raises `Terminated` (a KeyboardInterrupt), so `kill PID` saves
    what Ctrl-C saves and prints the same message; the list holds the signal once it came."""
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (an embedding program): leave signals to it
        yield received
        return
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors (InvbenchError, and the system's OSError such as a full disk)
    print one line (`error: ...`) and exit 2; anything else (a bug, an input nobody foresaw) one
    line naming the exception and exit 1; `invbench --debug ...` shows the traceback instead.
    Ctrl-C and SIGTERM print what was saved and how to resume, and exit 130 and 143."""
    args = sys.argv[1:] if argv is None else argv
    debug = debug_requested(args)
    with sigterm_as_interrupt() as terminated:
        try:
            cli.main(args=args, prog_name="invbench", standalone_mode=False)
        except click.exceptions.NoArgsIsHelpError as exc:  # plain `invbench`: its help, as help
            click.echo(exc.ctx.get_help() if exc.ctx else cli.get_help(click.Context(cli, info_name="invbench")))
            sys.exit(0)
        except click.UsageError as exc:  # bad option or value: click's message, without the usage block
            if debug:
                raise
            click.echo(f"error: {usage_message(exc, args)}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            if debug:
                raise
            exc.show()
            sys.exit(exc.exit_code)
        except (KeyboardInterrupt, click.Abort) as exc:
            if isinstance(exc, click.Abort) and isinstance(exc.__context__, KeyboardInterrupt):
                exc = exc.__context__  # click turns Ctrl-C into a bare Abort; the runner's message is on the original
            click.echo(one_line(str(exc)) or "interrupted: what was saved so far is kept; rerun the same command to "
                       "resume", err=True)
            sys.exit(SIGTERM_EXIT if terminated else 130)
        except (InvbenchError, OSError) as exc:
            if debug:
                raise
            click.echo(f"error: {one_line(str(exc)) or type(exc).__name__}", err=True)
            sys.exit(2)
        except Exception as exc:  # noqa: BLE001 - the promise is one line, even for what nobody foresaw
            if debug:
                raise
            click.echo(f"error: unexpected {type(exc).__name__}: {one_line(exc, limit=300) or '(no message)'}; "
                       f"this is an invbench bug or an input it does not check: {DEBUG_HINT}", err=True)
            sys.exit(1)


def usage_message(exc: click.UsageError, args: list[str]) -> str:
    """click's message in one line, with where to look; --debug after the command says where it goes."""
    if isinstance(exc, click.NoSuchOption) and exc.option_name == "--debug":
        return ("--debug is an option of invbench itself, not of the command: put it first "
                f"(invbench --debug {' '.join(a for a in args if a != '--debug')})")
    path = exc.ctx.command_path if exc.ctx else ""
    hint = f" (see: invbench {path.split(' ', 1)[1]} --help)" if " " in path else ""
    return f"{one_line(exc.format_message())}{hint}"

