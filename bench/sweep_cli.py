"""`invbench sweep` and `invbench curve`: privacy-utility curves from the command line.

Registered on the main group at the end of cli.py. Heavy imports (torch, matplotlib, ray) stay
inside the commands so `invbench --help` stays fast. Errors are SweepError, CurveError,
ProtocolError or DefenseError (ValueErrors printed as one line by cli.main).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .formats import cell
from .cli_options import BOARD_DIR, DEVICE, RUNS_DIR, NamedPath, engine_options, existing_board_dir


def _echo_err(line: str) -> None:
    click.echo(line, err=True)


def format_curve(curve) -> str:
    """The sweep's table: one row per grid point."""
    attacks = curve.protocol_settings.get("attacks") or sorted(
        {p.worst_case_exact_match_attack for p in curve.points if p.worst_case_exact_match_attack})
    width = max([len("params")] + [len(p.label()) for p in curve.points])
    lines = [f"{curve.protocol} | {curve.defense} | {len(curve.points)} points | worst case over "
             f"{', '.join(attacks) or '-'}",
             f"{'params':<{width}} {'exact':>6} {'tok acc':>8} {'top-1':>6} {'KL':>9} {'epsilon':>8}  worst attack"]
    for p in curve.points:
        lines.append(f"{p.label():<{width}} {cell(p.worst_case_exact_match, '.3f'):>6} "
                     f"{cell(p.worst_case_token_accuracy, '.3f'):>8} {cell(p.top1_agreement, '.3f'):>6} "
                     f"{cell(p.kl_clean_defended, '.4f'):>9} {cell(p.epsilon, '.3g'):>8}  "
                     f"{cell(p.worst_case_exact_match_attack)}")
    return "\n".join(lines)


@click.command()
@click.option("--defense", required=True, help="Defence name (see `invbench defenses`) or path/to/file.py:ClassName.")
@click.option("--param", "params", multiple=True, metavar="NAME=V1,V2,...",
              help="A swept defence parameter and its values (repeatable: several give the cartesian product).")
@click.option("--protocol", default="quick", show_default=True, help="Protocol (see `invbench protocols`).")
@engine_options(shards=False)
@DEVICE
@RUNS_DIR
@BOARD_DIR
def sweep(**opts: Any) -> None:
    """Run a protocol once per grid point of a defence's parameters; write the curve and its plot.

    Each point runs into RUNS_DIR/<protocol>/<defense>/<param=value,...>/ (rerunning resumes); the curve
    goes to BOARD_DIR/<protocol>/curves/<defense>-<date>-<hash>.json, with its plot beside it."""
    from .curves import plot_curves, save_curve
    from .sweep import parse_param_lists, sweep as run_sweep

    grid = parse_param_lists(opts["params"])
    curve = run_sweep(defense=opts["defense"], grid=grid, protocol=opts["protocol"], runs_dir=opts["runs_dir"],
                      engine=opts["engine"], address=opts["address"], token_file=opts["ray_token_file"],
                      device=opts["device"], echo=_echo_err)
    path = save_curve(curve, opts["board_dir"])
    png = plot_curves([curve], path.with_suffix(".png"))
    click.echo(format_curve(curve))
    click.echo(f"curve: {path}")
    click.echo(f"plot:  {png}")


@click.command()
@click.option("--defense", "defenses", multiple=True,
              help="Defence to plot (repeatable; default: every defence with a curve under the protocol).")
@click.option("--protocol", "protocols", multiple=True, default=("quick",), show_default=True,
              help="Protocol (repeatable with --compare: one defence's latest curve under each).")
@click.option("--compare", is_flag=True, help="Plot one defence's latest curve against its earlier ones.")
@click.option("--from-entries", is_flag=True,
              help="First draw each --defense's curve from the board's entries (one point per entry; saved under "
                   "curves/ as a sweep's would be), then plot.")
@BOARD_DIR
@click.option("--out", type=NamedPath(dir_okay=False), required=True, help="PNG file to write.")
def curve(**opts: Any) -> None:
    """Plot stored curves: the latest of each defence on one figure, or --compare one defence's history
    (or, with several --protocol, its latest curve under each)."""
    from .curves import CurveError, check_plot_path, compare, compare_protocols, latest_curves, load_curves, plot_curves

    check_plot_path(Path(opts["out"]))  # before any curve is read
    existing_board_dir(opts["board_dir"])
    protocol_dirs = [opts["board_dir"] / p for p in opts["protocols"]]
    protocol_dir = protocol_dirs[0]
    if opts["from_entries"]:
        _curves_from_entries(protocol_dirs, opts["defenses"], opts["board_dir"])
    if opts["compare"]:
        if len(opts["defenses"]) != 1:
            raise CurveError("--compare needs exactly one --defense")
        if len(protocol_dirs) > 1:
            shown = compare_protocols(opts["defenses"][0], protocol_dirs, Path(opts["out"]), warn=_echo_err)
        else:
            shown = compare(opts["defenses"][0], protocol_dir, Path(opts["out"]), warn=_echo_err)
    else:
        if len(protocol_dirs) > 1:
            raise CurveError("several --protocol only go with --compare")
        latest = latest_curves(load_curves(protocol_dir, warn=_echo_err))
        wanted = list(opts["defenses"]) or sorted(latest)
        missing = [d for d in wanted if d not in latest]
        if missing or not wanted:
            raise CurveError(f"no curve of {', '.join(missing) or 'any defence'} under {protocol_dir / 'curves'}; "
                             "run `invbench sweep` first")
        shown = [latest[d] for d in wanted]
        plot_curves(shown, Path(opts["out"]))
    for c in shown:
        click.echo(f"{c.defense:<12} {c.created}  {len(c.points)} points  {c.source}")
    click.echo(f"plot: {opts['out']}")


def _curves_from_entries(protocol_dirs: list[Path], defenses: tuple[str, ...], board_dir: Path) -> None:
    """Save each defence's curve drawn from each board's entries (`curves.curve_from_entries`), with its plot."""
    from .curves import CurveError, curve_from_entries, plot_curves, save_curve
    from .entries import load_entries

    if not defenses:
        raise CurveError("--from-entries needs the defences to draw: --defense NAME (repeatable)")
    for protocol_dir in protocol_dirs:
        entries, problems = load_entries(protocol_dir)
        for problem in problems:
            _echo_err(f"skipped {problem}")
        for defense in defenses:
            curve = curve_from_entries(entries, defense)
            path = save_curve(curve, board_dir)
            plot_curves([curve], path.with_suffix(".png"))  # beside it, as a sweep's
            click.echo(f"curve: {path}")
