"""The leaderboard of one protocol: `LEADERBOARD.md` and a static, self-contained `index.html`.

Ranking: worst-case exact match over the protocol's attacks (lower is more private), among the
entries whose top-1 agreement is at least the utility floor; ties go to the lower worst-case token
accuracy, then the higher top-1 agreement. Entries under the floor are listed separately. The
Pareto frontier of worst-case exact match (down) against top-1 agreement (up) is marked.

Everything that came from a submission is escaped (HTML or Markdown) before it is written. The
page's only script is fixed code that sorts rows by their `data-sort` attributes; it never reads
entry data as code, and a Content-Security-Policy allows that one script (by hash) and nothing
else, so even a missed escape could not run a script.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from . import __version__
from .entries import Entry, Problem, load_entries, registered_definition
from .results import write_bytes_atomic

DEFAULT_UTILITY_FLOOR = 0.5
PARETO_MARK = "\u25c6"  # a filled diamond


# --- ranking ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    entry: Entry
    rank: int | None  # None below the floor
    pareto: bool


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


def rank_entries(entries: list[Entry], *, floor: float) -> tuple[list[Row], list[Row]]:
    """(ranked rows at or above the floor, rows below it), both in ranking order."""
    frontier = pareto_frontier(entries)
    above = sorted((e for e in entries if e.top1_agreement is not None and e.top1_agreement >= floor), key=rank_key)
    below = sorted((e for e in entries if e.top1_agreement is None or e.top1_agreement < floor), key=rank_key)
    return ([Row(e, i + 1, e.entry_id in frontier) for i, e in enumerate(above)],
            [Row(e, None, e.entry_id in frontier) for e in below])


def build_board(protocol_dir: Path, *, floor: float = DEFAULT_UTILITY_FLOOR) -> Board:
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"the utility floor is a top-1 agreement in [0, 1], got {floor}")
    protocol_dir = Path(protocol_dir)
    entries, problems = load_entries(protocol_dir)
    definition = registered_definition(protocol_dir.name)
    if definition:  # registered: the description is ours, the attack set is the protocol's
        description, attacks = definition["description"], list(definition["attacks"])
    else:
        description = "(not a registered protocol)"
        attacks = sorted({a for e in entries for a in e.data["attacks"]})
    ranked, below = rank_entries(entries, floor=floor)
    return Board(protocol_dir.name, description, floor, attacks, ranked, below, problems)


# --- cells: every value as text, from one place -----------------------------------------------

def fmt_number(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def defence_text(defense: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v}" for k, v in defense["params"].items())
    return f"{defense['name']} ({params})" if params else defense["name"]


def verdict_text(entry: Entry) -> str:
    """The verdict as the board shows it; inconclusive entries are marked so in words."""
    return {"leaks": "leaks", "protected": "protected", "inconclusive": "inconclusive (search failures)"}.get(
        entry.verdict, "-")


def epsilon_text(defense: dict[str, Any]) -> str:
    if defense.get("epsilon") is None:
        return "-"
    delta = defense.get("delta")
    return f"{defense['epsilon']:.3g}" + (f" (delta {delta:g})" if delta is not None else "")


@dataclass(frozen=True)
class Column:
    title: str
    kind: str  # "number" or "text": how the page sorts it


def columns(board: Board) -> list[Column]:
    return ([Column("#", "number"), Column("Entry", "text"), Column("Authors", "text"), Column("Defence", "text"),
             Column("epsilon", "number"), Column("Verdict", "text"), Column("Worst-case EM", "number"),
             Column("Strongest attack", "text")]
            + [Column(f"EM {a}", "number") for a in board.attacks]
            + [Column("Worst tok acc", "number")]
            + [Column(f"AUROC {a}", "number") for a in board.attacks]
            + [Column("Top-1 agr.", "number"), Column("KL", "number"), Column("Pareto", "text"),
               Column("Date", "text")])


def cells(row: Row, attacks: list[str]) -> list[tuple[str, Any]]:
    """(display text, sort value) per column, in the order of `columns`. Sort values are numbers,
    None (missing: sorts last) or text."""
    e, data = row.entry, row.entry.data
    metrics = data["attacks"]
    utility = data["utility"]

    def num(value: Any, spec: str = ".3f") -> tuple[str, Any]:
        return fmt_number(value, spec), value

    return ([num(row.rank, "d"), (data["name"], data["name"].lower()), (data["authors"], data["authors"].lower()),
             (defence_text(data["defense"]), defence_text(data["defense"]).lower()),
             (epsilon_text(data["defense"]), data["defense"].get("epsilon")),
             (verdict_text(e), e.verdict or ""), num(e.worst_exact_match), (e.worst_attack, e.worst_attack)]
            + [num(metrics.get(a, {}).get("exact_match")) for a in attacks]
            + [num(e.worst_token_accuracy)]
            + [num(metrics.get(a, {}).get("detector_auroc")) for a in attacks]
            + [num(utility["top1_agreement"]), num(utility.get("kl_clean_defended"), ".4g"),
               (PARETO_MARK if row.pareto else "", "1" if row.pareto else "0"), (data["date"], data["date"])])


def floor_text(board: Board, escape: Callable[[Any], str]) -> str:
    """The ranking rule in words; `escape` is applied to the attack names (they may come from entries)."""
    attacks = ", ".join(map(escape, board.attacks))
    return (f"Ranked by worst-case exact match over the protocol's attacks ({attacks}; lower is more private) "
            f"among entries whose top-1 agreement is at least {board.floor:.2f} (the utility floor). "
            f"Ties: lower worst-case token accuracy, then higher top-1 agreement. An entry whose verdict is inconclusive "
            f"(its attacks' misses are search failures: the truth fits the defended states better than their answers) "
            f"ranks below every conclusive one, whatever its numbers. {PARETO_MARK} marks the Pareto "
            "frontier of worst-case exact match against top-1 agreement.")


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
        url = row.entry.data["url"]
        if url:  # validated: http(s), no spaces, brackets or parentheses
            texts[1] = f"[{texts[1]}]({url})"
        lines.append("| " + " | ".join(texts) + " |")
    return lines


def render_markdown(board: Board) -> str:
    # The description and the rule are our own prose (only the names in them are escaped): readable as plain text.
    lines = [f"# Leaderboard: {escape_md(board.protocol)}", "", board.description, "",
             floor_text(board, escape_md), ""]
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
    for r in rows:
        label = r.entry.entry_id if len(r.entry.entry_id) <= 28 else r.entry.entry_id[:27] + "..."
        ax.annotate(label, (r.entry.top1_agreement, r.entry.worst_exact_match), textcoords="offset points",
                    xytext=(5, 4), fontsize=7, parse_math=False)
    ax.axvline(board.floor, color="tab:green", linestyle="--", label=f"utility floor {board.floor:.2f}")
    if not rows:
        ax.text(0.5, 0.5, "no entries yet", ha="center", va="center", transform=ax.transAxes, parse_math=False)
    ax.set(xlim=(-0.03, 1.03), ylim=(-0.03, 1.03), xlabel="top-1 agreement (utility, higher is better)",
           ylabel="worst-case exact match (lower is more private)")
    ax.set_title(f"{board.protocol}: privacy against utility", parse_math=False)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


# --- HTML ---------------------------------------------------------------------------------------

def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


SORT_SCRIPT = """
(function () {
  "use strict";
  function key(cell, numeric) {
    var raw = cell.getAttribute("data-sort");
    if (!numeric) { return raw; }
    return raw === "" ? null : parseFloat(raw);
  }
  function sortTable(table, header, column) {
    var numeric = header.getAttribute("data-type") === "number";
    var ascending = header.getAttribute("aria-sort") !== "ascending";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[column], numeric), y = key(b.cells[column], numeric);
      if (x === null || y === null) { return (x === null) - (y === null); }  /* missing values last */
      var order = numeric ? x - y : x.localeCompare(y);
      return ascending ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    Array.prototype.forEach.call(header.parentNode.cells, function (th) { th.removeAttribute("aria-sort"); });
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.board"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (header, column) {
      header.addEventListener("click", function () { sortTable(table, header, column); });
      header.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); sortTable(table, header, column); }
      });
    });
  });
})();
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
table.board { border-collapse: collapse; font-size: 0.85rem; margin-bottom: 1.5rem; }
table.board th, table.board td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; }
table.board th { background: #f2f2f2; cursor: pointer; user-select: none; }
table.board th[aria-sort="ascending"]::after { content: " \\25B2"; }
table.board th[aria-sort="descending"]::after { content: " \\25BC"; }
table.board td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.pareto td { background: #fff6e0; }
img.plot { max-width: 100%; border: 1px solid #ddd; }
div.scroll { overflow-x: auto; }
.note { color: #555; max-width: 60rem; }
"""


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


def _sort_attr(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(float(value))
    return esc(value)


def _html_table(board: Board, rows: list[Row], table_id: str) -> str:
    cols = columns(board)
    head = "".join(f'<th scope="col" tabindex="0" data-type="{c.kind}">{esc(c.title)}</th>' for c in cols)
    body = []
    for row in rows:
        tds = []
        for col, (text, sort_value) in zip(cols, cells(row, board.attacks)):
            content = esc(text)
            if col.title == "Entry" and row.entry.data["url"]:
                content = f'<a href="{esc(row.entry.data["url"])}" rel="nofollow noopener noreferrer">{content}</a>'
            css = ' class="num"' if col.kind == "number" else ""
            tds.append(f'<td{css} data-sort="{_sort_attr(sort_value)}">{content}</td>')
        css = ' class="pareto"' if row.pareto else ""
        body.append(f'<tr{css} data-entry-id="{esc(row.entry.entry_id)}">{"".join(tds)}</tr>')
    return (f'<div class="scroll"><table class="board" id="{table_id}"><thead><tr>{head}</tr></thead>\n'
            f'<tbody>\n{chr(10).join(body)}\n</tbody></table></div>')


def render_html(board: Board, png: bytes) -> str:
    csp = (f"default-src 'none'; img-src data:; style-src {_csp_hash(STYLE)}; script-src {_csp_hash(SORT_SCRIPT)}; "
           "base-uri 'none'; form-action 'none'")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>invbench leaderboard: {esc(board.protocol)}</title>", f"<style>{STYLE}</style></head><body>",
        f"<h1>Leaderboard: {esc(board.protocol)}</h1>",
        f'<p class="note">{esc(board.description)}</p>',
        f'<p class="note" id="floor">{floor_text(board, esc)} Click a column header to sort.</p>',
    ]
    if board.ranked:
        parts.append(_html_table(board, board.ranked, "ranked"))
    else:
        parts.append("<p>No entry at or above the utility floor yet.</p>")
    if board.below:
        parts.append(f"<h2>Below the utility floor (top-1 agreement under {board.floor:.2f})</h2>")
        parts.append(_html_table(board, board.below, "below-floor"))
    parts.append("<h2>Privacy against utility</h2>")
    parts.append(f'<img class="plot" id="plot" alt="worst-case exact match against top-1 agreement" '
                 f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')
    if board.problems:
        parts.append("<h2>Skipped entries (malformed)</h2><ul>")
        parts += [f"<li>{esc(problem_text(p))}</li>" for p in board.problems]
        parts.append("</ul>")
    parts.append(f'<p class="note">Rendered by invbench {esc(__version__)}; no server and no network needed.</p>')
    parts.append(f"<script>{SORT_SCRIPT}</script></body></html>")
    return "\n".join(parts) + "\n"


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
                  if d.is_dir() and not d.is_symlink() and (registered_definition(d.name) or any(d.glob("*.json"))))
