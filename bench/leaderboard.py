"""The leaderboard of one protocol: `LEADERBOARD.md` and a static, self-contained `index.html`.

Ranking, by the rule the protocol names (`RANKINGS`; today one, "worst-case-exact-match"): worst-case
exact match over the protocol's attacks (lower is more private), among the entries whose top-1
agreement is at least the utility floor; ties go to the lower worst-case token accuracy, then the
higher top-1 agreement. Entries under the floor are listed separately. The Pareto frontier of
worst-case exact match (down) against top-1 agreement (up) is marked. Every number comes from the
entries' summaries (`Entry.summary`, a RunSummary).

Everything that came from a submission is escaped before it is written: by `escape_md` in the
Markdown, by the autoescaping Jinja2 template `templates/board.html.j2` in the page. The page's
only script is fixed code that sorts rows by their `data-sort` attributes; it never reads entry
data as code, and a Content-Security-Policy allows that one script (by hash) and nothing else, so
even a missed escape could not run a script.
"""
from __future__ import annotations

import base64
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from jinja2 import Environment, PackageLoader, StrictUndefined

from . import __version__
from .derived import guarantee_note
from .entries import Entry, Problem, load_entries, registered_definition
from .errors import InvbenchError
from .formats import cell
from .plotting import PointLabel, label_points
from .protocols import RANKING
from .results import write_bytes_atomic
from .verification import (Status, VerificationError, is_record, read_record, record_path,
                           status as verification_status)

DEFAULT_UTILITY_FLOOR = 0.5


class LeaderboardError(InvbenchError, ValueError):
    """A board that cannot be rendered as asked (a utility floor outside [0, 1]); one line."""
PARETO_MARK = "\u25c6"  # a filled diamond


# --- ranking ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    entry: Entry
    rank: int | None  # None below the floor
    pareto: bool
    verified: Status = Status("not verified")  # from the verification record beside the entry


@dataclass
class Board:
    protocol: str
    description: str
    floor: float
    attacks: list[str]
    ranked: list[Row]
    below: list[Row]
    problems: list[Problem]


def pareto_frontier(entries: Iterable[Entry]) -> set[str]:
    """Ids of the entries no other entry beats on both worst-case exact match (lower) and top-1
    agreement (higher). Entries without a top-1 agreement take no part."""
    points = [(e.entry_id, e.worst_exact_match, e.top1_agreement) for e in entries if e.top1_agreement is not None]

    def dominated(em: float, top1: float) -> bool:
        return any(o_em <= em and o_top1 >= top1 and (o_em < em or o_top1 > top1) for _, o_em, o_top1 in points)

    return {entry_id for entry_id, em, top1 in points if not dominated(em, top1)}


def rank_key(entry: Entry) -> tuple:
    """Conclusive entries first (an inconclusive one never ranks above them), then worst-case exact
    match (lower is more private), worst-case token accuracy, top-1 agreement (higher)."""
    return (not entry.conclusive, entry.worst_exact_match, entry.worst_token_accuracy, -(entry.top1_agreement or 0.0),
            entry.entry_id)


# A protocol's `ranking` names its rule here; a new rule is a new name, so entries ranked by another
# rule are another protocol's (invbench.protocols.defining).
RANKINGS: dict[str, Callable[[Entry], tuple]] = {RANKING: rank_key}


def rank_entries(entries: list[Entry], *, floor: float, ranking: str = RANKING,
                 verified: dict[str, Status] | None = None) -> tuple[list[Row], list[Row]]:
    """(ranked rows at or above the floor, rows below it), both in ranking order; `verified` gives
    each entry's verification status (none: not verified)."""
    frontier = pareto_frontier(entries)
    key = RANKINGS[ranking]
    status = (verified or {}).get
    above = sorted((e for e in entries if e.top1_agreement is not None and e.top1_agreement >= floor), key=key)
    below = sorted((e for e in entries if e.top1_agreement is None or e.top1_agreement < floor), key=key)
    return ([Row(e, i + 1, e.entry_id in frontier, status(e.entry_id, Status("not verified"))) for i, e in enumerate(above)],
            [Row(e, None, e.entry_id in frontier, status(e.entry_id, Status("not verified"))) for e in below])


def verification_statuses(entries: list[Entry]) -> tuple[dict[str, Status], list[Problem]]:
    """Each entry's verification status, and the records that could not be read (reported like a
    malformed entry; their entries count as not verified)."""
    statuses, problems = {}, []
    for entry in entries:
        try:
            statuses[entry.entry_id] = verification_status(entry.path, read_record(entry.path))
        except VerificationError as exc:
            problems.append(Problem(record_path(entry.path), "", str(exc).removeprefix(f"{record_path(entry.path)}: ")))
    return statuses, problems


def build_board(protocol_dir: Path, *, floor: float = DEFAULT_UTILITY_FLOOR) -> Board:
    if not 0.0 <= floor <= 1.0:  # nan fails this too
        raise LeaderboardError(f"the utility floor is a top-1 agreement in [0, 1], got {floor}")
    protocol_dir = Path(protocol_dir)
    entries, problems = load_entries(protocol_dir)
    definition = registered_definition(protocol_dir.name)
    if definition:  # registered: the description is ours, the attack set and the ranking rule are the protocol's
        description, attacks, ranking = definition["description"], list(definition["attacks"]), definition["ranking"]
    else:
        description, ranking = "(not a registered protocol)", RANKING
        attacks = sorted({a for e in entries for a in e.summary.attacks})
    statuses, unreadable = verification_statuses(entries)
    ranked, below = rank_entries(entries, floor=floor, ranking=ranking, verified=statuses)
    return Board(protocol_dir.name, description, floor, attacks, ranked, below, problems + unreadable)


# --- cells: every value as text, from one place -----------------------------------------------

def defense_text(defense: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v}" for k, v in defense["params"].items())
    return f"{defense['name']} ({params})" if params else defense["name"]


def verdict_text(entry: Entry) -> str:
    """The verdict as the board shows it; inconclusive entries are marked so in words."""
    return {"leaks": "leaks", "protected": "protected", "inconclusive": "inconclusive (search failures)"}.get(
        entry.verdict, "-")


AS_SUBMITTED = "*"  # marks a guarantee that could not be recomputed when the board was rendered


def epsilon_text(entry: Entry) -> str:
    """epsilon (and delta); marked AS_SUBMITTED when it could not be recomputed on read (plug-in files)."""
    defense = entry.summary.defense
    if defense.get("epsilon") is None:
        return "-"
    delta = defense.get("delta")
    mark = AS_SUBMITTED if guarantee_note(defense, entry.defense_spec) else ""
    return f"{defense['epsilon']:.3g}" + (f" (delta {delta:g})" if delta is not None else "") + mark


@dataclass(frozen=True)
class Column:
    title: str
    kind: str  # "number" or "text": how the page sorts it


def columns(board: Board) -> list[Column]:
    return ([Column("#", "number"), Column("Entry", "text"), Column("Authors", "text"), Column("Defence", "text"),
             Column("epsilon", "number"), Column("Verdict", "text"), Column("Verified", "text"),
             Column("Worst-case EM", "number"),
             Column("Strongest attack", "text")]
            + [Column(f"EM {a}", "number") for a in board.attacks]
            + [Column("Worst tok acc", "number")]
            + [Column(f"AUROC {a}", "number") for a in board.attacks]
            + [Column("Top-1 agr.", "number"), Column("KL", "number"), Column("Pareto", "text"),
               Column("Date", "text")])


def cells(row: Row, attacks: list[str]) -> list[tuple[str, Any]]:
    """(display text, sort value) per column, in the order of `columns`. Sort values are numbers,
    None (missing: sorts last) or text."""
    e, meta, summary = row.entry, row.entry.meta, row.entry.summary
    attack = summary.attacks.get
    defense, utility = summary.defense, summary.utility

    def num(value: Any, spec: str = ".3f") -> tuple[str, Any]:
        return cell(value, spec), value

    return ([num(row.rank, "d"), (meta["name"], meta["name"].lower()), (meta["authors"], meta["authors"].lower()),
             (defense_text(defense), defense_text(defense).lower()), (epsilon_text(e), defense.get("epsilon")),
             (verdict_text(e), e.verdict or ""), (row.verified.text(), row.verified.state),
             num(e.worst_exact_match), (e.worst_attack, e.worst_attack)]
            + [num(attack(a).exact_match if attack(a) else None) for a in attacks]
            + [num(e.worst_token_accuracy)]
            + [num(attack(a).detector_auroc if attack(a) else None) for a in attacks]
            + [num(utility["top1_agreement"]), num(utility.get("kl_clean_defended"), ".4g"),
               (PARETO_MARK if row.pareto else "", "1" if row.pareto else "0"), (meta["date"], meta["date"])])


def floor_text(board: Board, escape: Callable[[Any], str]) -> str:
    """The ranking rule in words; `escape` is applied to the attack names (they may come from entries)."""
    attacks = ", ".join(map(escape, board.attacks))
    return (f"Ranked by worst-case exact match over the protocol's attacks ({attacks}; lower is more private) "
            f"among entries whose top-1 agreement is at least {board.floor:.2f} (the utility floor). "
            f"Ties: lower worst-case token accuracy, then higher top-1 agreement. An entry whose verdict is inconclusive "
            f"(its attacks' misses are search failures: the truth fits the defended states better than their answers) "
            f"ranks below every conclusive one, whatever its numbers. {PARETO_MARK} marks the Pareto "
            "frontier of worst-case exact match against top-1 agreement.")


def trust_text(board: Board) -> str:
    """What the board can vouch for, in words: every entry is checked on read, only a rerun verifies it."""
    rows = board.ranked + board.below
    verified = sum(r.verified.verified for r in rows)
    plugged = any(AS_SUBMITTED in epsilon_text(r.entry) for r in rows)
    return (f"Verified: {verified} of {len(rows)} entries. An entry is verified when a maintainer's "
            "`invbench verify` rerun passed on this exact file (the SHA-256 in the `.verification.json` record "
            "beside it matches); otherwise its numbers are the submitter's. Every entry is checked when the "
            "board is rendered: its schema, its protocol, and whatever follows from its other fields, recomputed "
            "(the defence's guarantee from its parameters, each verdict from its metrics, the radius from its "
            "gaps). A forged entry that is consistent with itself passes those checks and ranks by its numbers: "
            "only the verified mark says a rerun reproduced them."
            + (f" {AS_SUBMITTED} epsilon as submitted: the defence is a plug-in file (or not installed here), "
               "whose guarantee cannot be recomputed when the board is rendered; verify checks it." if plugged else ""))


def problem_text(problem: Problem) -> str:
    field = f"field {problem.field}: " if problem.field else ""
    return f"{problem.path.name}: {field}{problem.message}"


# --- Markdown -----------------------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~])")


def escape_md(value: Any) -> str:
    """Text for one Markdown table cell: one line, HTML's <, > and & as entities, and every
    Markdown metacharacter (| ` * _ [ ] ...) backslash-escaped."""
    text = " ".join(str(value).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", text)


def _md_table(board: Board, rows: list[Row]) -> list[str]:
    header = [escape_md(c.title) for c in columns(board)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for row in rows:
        texts = [escape_md(text) for text, _ in cells(row, board.attacks)]
        url = row.entry.meta["url"]
        if url:  # validated: http(s), no spaces, brackets or parentheses
            texts[1] = f"[{texts[1]}]({url})"
        lines.append("| " + " | ".join(texts) + " |")
    return lines


def render_markdown(board: Board) -> str:
    # The description and the rule are our own prose (only the names in them are escaped): readable as plain text.
    lines = [f"# Leaderboard: {escape_md(board.protocol)}", "", board.description, "",
             floor_text(board, escape_md), "", trust_text(board).replace(AS_SUBMITTED + " ", "\\* "), ""]
    if board.ranked:
        lines += _md_table(board, board.ranked)
    else:
        lines.append("No entry at or above the utility floor yet.")
    if board.below:
        lines += ["", f"## Below the utility floor (top-1 agreement under {board.floor:.2f})", ""]
        lines += _md_table(board, board.below)
    if board.problems:
        lines += ["", "## Skipped entries (malformed)", ""]
        lines += [f"- {escape_md(problem_text(p))}" for p in board.problems]
    lines += ["", f"The sortable table and the privacy-utility plot: [index.html](index.html). "
              f"Rendered by invbench {escape_md(__version__)} from {len(board.ranked) + len(board.below)} "
              "entries; see docs/SUBMITTING.md to add yours.", ""]
    return "\n".join(lines)


# --- the plot -----------------------------------------------------------------------------------

def plot_png(board: Board) -> bytes:
    """Worst-case exact match against top-1 agreement, the floor and the Pareto frontier, as PNG.
    Labels are entry ids (slugs), drawn with mathtext off."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(7.5, 4.8), dpi=110)
    ax = fig.add_subplot()
    rows = [r for r in board.ranked + board.below if r.entry.top1_agreement is not None]
    for group, style in ((board.ranked, dict(marker="o", color="tab:blue", label="ranked")),
                         (board.below, dict(marker="x", color="tab:gray", label="below the floor"))):
        points = [(r.entry.top1_agreement, r.entry.worst_exact_match) for r in group
                  if r.entry.top1_agreement is not None]
        if points:
            ax.scatter(*zip(*points), zorder=3, **style)
    frontier = sorted((r.entry.top1_agreement, r.entry.worst_exact_match) for r in rows if r.pareto)
    if frontier:
        ax.plot(*zip(*frontier), color="tab:red", linestyle="-", drawstyle="steps-pre", zorder=2,
                label="Pareto frontier")
    ax.axvline(board.floor, color="tab:green", linestyle="--", label=f"utility floor {board.floor:.2f}")
    if not rows:
        ax.text(0.5, 0.5, "no entries yet", ha="center", va="center", transform=ax.transAxes, parse_math=False)
    ax.set(xlim=(-0.03, 1.03), ylim=(-0.03, 1.03), xlabel="top-1 agreement (utility, higher is better)",
           ylabel="worst-case exact match (lower is more private)")
    ax.set_title(f"{board.protocol}: privacy against utility", parse_math=False)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    label_points(ax, [PointLabel(r.entry.top1_agreement, r.entry.worst_exact_match,
                                 r.entry.entry_id if len(r.entry.entry_id) <= 28 else r.entry.entry_id[:27] + "...")
                      for r in rows])  # after the layout: placement measures the rendered labels
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


# --- HTML ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HtmlCell:
    text: str
    sort: str  # the data-sort attribute the page's script sorts by ("" for a missing value)
    numeric: bool
    url: str = ""  # a link on the text (the entry's, validated http(s))


@dataclass(frozen=True)
class HtmlRow:
    entry_id: str
    pareto: bool
    cells: list[HtmlCell]


def _sort_attr(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(float(value))
    return str(value)


def html_row(board: Board, row: Row) -> HtmlRow:
    """One table row as the template writes it: plain text, which the template escapes."""
    url = row.entry.meta["url"]  # validated: http(s), or empty for none
    row_cells = [HtmlCell(text, _sort_attr(sort_value), col.kind == "number", url if col.title == "Entry" else "")
                 for col, (text, sort_value) in zip(columns(board), cells(row, board.attacks))]
    return HtmlRow(row.entry.entry_id, row.pareto, row_cells)


def _sha256(text: str) -> str:
    """base64 of the SHA-256 of `text`: how a Content-Security-Policy names an inline script or style."""
    return base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def render_html(board: Board, png: bytes) -> str:
    """The page from `templates/board.html.j2`, autoescaped: entry data is only ever text there."""
    environment = Environment(loader=PackageLoader("invbench", "templates"), autoescape=True,
                              undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)
    environment.filters["sha256"] = _sha256
    return environment.get_template("board.html.j2").render(
        board=board, columns=columns(board), ranked=[html_row(board, row) for row in board.ranked],
        below=[html_row(board, row) for row in board.below], floor=floor_text(board, str),
        problems=[problem_text(p) for p in board.problems], plot=base64.b64encode(png).decode("ascii"),
        trust=trust_text(board).replace("`", ""),
        version=__version__)


# --- writing ------------------------------------------------------------------------------------

@dataclass
class Rendered:
    markdown: Path
    html: Path
    board: Board


def render(protocol_dir: Path, *, utility_floor: float = DEFAULT_UTILITY_FLOOR) -> Rendered:
    """Write `LEADERBOARD.md` and `index.html` into `protocol_dir` from its entries."""
    protocol_dir = Path(protocol_dir)
    board = build_board(protocol_dir, floor=utility_floor)
    protocol_dir.mkdir(parents=True, exist_ok=True)
    markdown, page = protocol_dir / "LEADERBOARD.md", protocol_dir / "index.html"
    write_bytes_atomic(markdown, render_markdown(board).encode("utf-8"))
    write_bytes_atomic(page, render_html(board, plot_png(board)).encode("utf-8"))
    return Rendered(markdown, page, board)


def protocol_dirs(board_dir: Path) -> list[Path]:
    """The folders of `board_dir` that hold a protocol's entries: registered names, or any folder
    with `*.json` files in it."""
    board_dir = Path(board_dir)
    if not board_dir.is_dir():
        return []
    return sorted(d for d in board_dir.iterdir()
                  if d.is_dir() and not d.is_symlink()
                  and (registered_definition(d.name) or any(not is_record(p) for p in d.glob("*.json"))))
