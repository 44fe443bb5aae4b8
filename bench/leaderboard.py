"""The leaderboard of one protocol: `LEADERBOARD.md` and a static, self-contained `index.html`.

Ranking, by the rule the protocol names (`RANKINGS`): "worst-case-token-accuracy", by what leaks:
worst-case token accuracy over the protocol's attacks (the fraction of the secret recovered, lower
is more private), then worst-case exact match, among the entries whose top-1 agreement is at least
the utility floor; ties go to the higher top-1 agreement; an inconclusive entry ranks below every
conclusive one. ("worst-case-exact-match", exact match first, is the rule of the boards made before.)
Entries under the floor are listed separately. The Pareto frontier of the rule's first metric (down)
against top-1 agreement (up) is marked. Every number comes from the entries' summaries
(`Entry.summary`, a RunSummary).

Each entry also gets its own page, `entries/<entry-id>.html` (`render_entry_html`): the submission
(who, where), the defence, its guarantee and citation, the verdicts and the verified mark, and what
leaked: every prompt's true tokens beside each attack's recovered tokens, the wrong ones marked, from
the entry's transcript.

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
from .transcript import Token, marked, visible
from .errors import InvbenchError
from .formats import cell
from .summary import epsilon_number
from .uncertainty import tied_ranks
from .plotting import PointLabel, label_points
from .protocols import RANKING, UTILITY_FLOOR
from .lock import board_lock
from .results import write_set_atomic
from .verification import Status, VerificationError, entry_status, is_record, record_path

DEFAULT_UTILITY_FLOOR = UTILITY_FLOOR


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
    tied: bool = False  # its rank is shared: the 95% intervals of the ranking metric overlap (invbench.uncertainty)

    @property
    def rank_text(self) -> str:
        return "-" if self.rank is None else f"={self.rank}" if self.tied else str(self.rank)


@dataclass
class Board:
    protocol: str
    description: str
    floor: float
    attacks: list[str]
    ranked: list[Row]
    below: list[Row]
    problems: list[Problem]
    ranking: "RankingRule"


# The board's privacy metrics, each an Entry property: (the summary's worst-case key, its words). The
# plot has one panel per metric; a ranking rule ranks by one of them first.
PANELS = {"worst_token_accuracy": ("token_accuracy", "worst-case token accuracy"),
          "worst_exact_match": ("exact_match", "worst-case exact match")}


@dataclass(frozen=True)
class RankingRule:
    """How a board orders its entries: `key` sorts them; `privacy` names the Entry property the rule
    ranks by first (one of PANELS; the Pareto frontier is of it against top-1 agreement), `words` says the rule."""

    key: Callable[[Entry], tuple]
    privacy: str  # an Entry property: worst_token_accuracy or worst_exact_match
    words: str

    @property
    def privacy_words(self) -> str:
        """What the first metric is, for the board's paragraph and the plot."""
        return PANELS[self.privacy][1]


def by_token_accuracy(entry: Entry) -> tuple:
    """Conclusive entries first (an inconclusive one never ranks above them), then worst-case token
    accuracy (lower is more private), worst-case exact match, top-1 agreement (higher)."""
    return (not entry.conclusive, entry.worst_token_accuracy, entry.worst_exact_match,
            -(entry.top1_agreement or 0.0), entry.entry_id)


def by_exact_match(entry: Entry) -> tuple:
    """The rule before: worst-case exact match first, then token accuracy."""
    return (not entry.conclusive, entry.worst_exact_match, entry.worst_token_accuracy,
            -(entry.top1_agreement or 0.0), entry.entry_id)


# A protocol's `ranking` names its rule here; a new rule is a new name, so entries ranked by another
# rule are another protocol's (invbench.protocols.defining).
RANKINGS: dict[str, RankingRule] = {
    RANKING: RankingRule(by_token_accuracy, "worst_token_accuracy",
                         "worst-case token accuracy (the fraction of each secret the strongest attack recovers), "
                         "then worst-case exact match"),
    "worst-case-exact-match": RankingRule(by_exact_match, "worst_exact_match",
                                          "worst-case exact match, then worst-case token accuracy"),
}


def pareto_frontier(entries: Iterable[Entry], privacy: str = RANKINGS[RANKING].privacy) -> set[str]:
    """Ids of the entries no other entry beats on both the privacy metric `privacy` (an Entry
    property; lower) and top-1 agreement (higher). Entries without a top-1 agreement take no part."""
    points = [(e.entry_id, getattr(e, privacy), e.top1_agreement) for e in entries if e.top1_agreement is not None]

    def dominated(leak: float, top1: float) -> bool:
        return any(o_leak <= leak and o_top1 >= top1 and (o_leak < leak or o_top1 > top1)
                   for _, o_leak, o_top1 in points)

    return {entry_id for entry_id, leak, top1 in points if not dominated(leak, top1)}


def rank_entries(entries: list[Entry], *, floor: float, ranking: str = RANKING,
                 verified: dict[str, Status] | None = None) -> tuple[list[Row], list[Row]]:
    """(ranked rows at or above the floor, rows below it), both in ranking order; `verified` gives
    each entry's verification status (none: not verified). Entries in ranking order whose 95% intervals
    of the rule's first metric overlap share a rank (a tie), conclusive and inconclusive ones apart."""
    rule = RANKINGS[ranking]
    frontier = pareto_frontier(entries, rule.privacy)
    status = (verified or {}).get
    above = sorted((e for e in entries if e.top1_agreement is not None and e.top1_agreement >= floor), key=rule.key)
    below = sorted((e for e in entries if e.top1_agreement is None or e.top1_agreement < floor), key=rule.key)
    ranks = tied_ranks([getattr(e.intervals, rule.privacy) for e in above], groups=[e.conclusive for e in above])
    return ([Row(e, rank, e.entry_id in frontier, status(e.entry_id, Status("not verified")), tied)
             for e, (rank, tied) in zip(above, ranks)],
            [Row(e, None, e.entry_id in frontier, status(e.entry_id, Status("not verified"))) for e in below])


def verification_statuses(entries: list[Entry]) -> tuple[dict[str, Status], list[Problem]]:
    """Each entry's verification status, and the records that could not be read (reported like a
    malformed entry; their entries count as not verified)."""
    statuses, problems = {}, []
    for entry in entries:
        try:
            statuses[entry.entry_id] = entry_status(entry)
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
    return Board(protocol_dir.name, description, floor, attacks, ranked, below, problems + unreadable, RANKINGS[ranking])


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
    """epsilon with the guarantee's kind, as the defence recorded it ("8 (ε-DP per vector)"); marked
    AS_SUBMITTED when it could not be recomputed on read (plug-in files)."""
    guarantee = entry.summary.guarantee
    if guarantee.epsilon is None:
        return "-"
    return guarantee.cell() + (AS_SUBMITTED if guarantee_note(entry.summary.defense, entry.defense_spec) else "")


@dataclass(frozen=True)
class Column:
    title: str
    kind: str  # "number" or "text": how the page sorts it
    detail: bool = False  # shown only when the reader asks for every column (the page's toggle; not in the Markdown)


def columns(board: Board) -> list[Column]:
    """What a reader came for first (rank, entry, verdict, what leaks and what the model keeps, each with its
    95% interval, the guarantee, the verified mark), then the details behind the page's toggle."""
    return ([Column("#", "number"), Column("Entry", "text"), Column("Verdict", "text"),
             Column("Worst-case token acc. [95% CI]", "number"), Column("Worst-case EM [95% CI]", "number"),
             Column("Top-1 agr. [95% CI]", "number"), Column("KL", "number"), Column("ε per vector", "number"),
             Column("ε per prompt", "number"), Column("Verified", "text"),
             Column("Defence", "text", True), Column("Strongest attack", "text", True)]
            + [Column(f"Tok acc {a}", "number", True) for a in board.attacks]
            + [Column(f"EM {a}", "number", True) for a in board.attacks]
            + [Column(f"AUROC {a}", "number", True) for a in board.attacks]
            + [Column("Pareto", "text", True), Column("Date", "text", True)])


def strongest_attack(entry: Entry, rule: RankingRule) -> str:
    """The attack the rule's first metric rests on (checked on read against metrics.worst_case)."""
    return entry.summary.worst_case[PANELS[rule.privacy][0]].attack


def with_interval(value: float | None, interval: tuple[float, float] | None) -> str:
    """"0.988 [0.960, 1.000]": a value and its 95% interval ("-" for none)."""
    text = cell(value)
    return f"{text} [{interval[0]:.3f}, {interval[1]:.3f}]" if value is not None and interval else text


def epsilon_per_prompt_text(entry: Entry) -> str:
    """epsilon for a whole prompt (T vectors composed): in a causal model one token changes every later state,
    so only this figure covers a token; metric DP's is per unit of the prompt's summed distance."""
    value = entry.summary.guarantee.epsilon_per_prompt
    if value is None:
        return "-"
    return epsilon_number(value) + (AS_SUBMITTED if guarantee_note(entry.summary.defense, entry.defense_spec) else "")


def cells(row: Row, attacks: list[str], rule: RankingRule = RANKINGS[RANKING]) -> list[tuple[str, Any]]:
    """(display text, sort value) per column, in the order of `columns`. Sort values are numbers,
    None (missing: sorts last) or text."""
    e, meta, summary = row.entry, row.entry.meta, row.entry.summary
    attack = summary.attacks.get
    defense, utility = summary.defense, summary.utility
    strongest = strongest_attack(e, rule)

    def num(value: Any, spec: str = ".3f") -> tuple[str, Any]:
        return cell(value, spec), value

    return ([(row.rank_text, row.rank), (meta["name"], meta["name"].lower()), (verdict_text(e), e.verdict or ""),
             (with_interval(e.worst_token_accuracy, e.intervals.worst_token_accuracy), e.worst_token_accuracy),
             (with_interval(e.worst_exact_match, e.intervals.worst_exact_match), e.worst_exact_match),
             (with_interval(e.top1_agreement, e.intervals.top1_agreement), e.top1_agreement),
             num(utility.get("kl_clean_defended"), ".4g"), (epsilon_text(e), defense.get("epsilon")),
             (epsilon_per_prompt_text(e), defense.get("epsilon_per_prompt")),
             (row.verified.short(), row.verified.state),
             (defense_text(defense), defense_text(defense).lower()), (strongest, strongest)]
            + [num(attack(a).token_accuracy if attack(a) else None) for a in attacks]
            + [num(attack(a).exact_match if attack(a) else None) for a in attacks]
            + [num(attack(a).detector_auroc if attack(a) else None) for a in attacks]
            + [(PARETO_MARK if row.pareto else "", "1" if row.pareto else "0"), (meta["date"], meta["date"])])


def entry_page(entry: Entry) -> str:
    """Where an entry's page is, relative to the board's folder (the id is a slug: safe in a link)."""
    return f"{ENTRY_PAGES}/{entry.entry_id}.html"


def floor_text(board: Board, escape: Callable[[Any], str]) -> str:
    """The ranking rule in words; `escape` is applied to the attack names (they may come from entries)."""
    attacks = ", ".join(map(escape, board.attacks))
    rule = board.ranking
    return (f"Ranked by what leaks: {rule.words}, over the protocol's attacks ({attacks}; lower is more private), "
            f"among entries whose top-1 agreement is at least {board.floor:.2f} (the utility floor). "
            f"Each ranked number has its 95% interval over the prompts (bootstrap; exact binomial for exact match); "
            f"entries whose intervals of the first metric overlap share a rank, shown =N (the board cannot tell them "
            f"apart), listed by higher top-1 agreement. An entry whose verdict is inconclusive "
            f"(its attacks' misses are search failures: the truth fits the defended states better than their answers) "
            f"ranks below every conclusive one, whatever its numbers. {PARETO_MARK} marks the Pareto "
            f"frontier of {rule.privacy_words} against top-1 agreement. Each entry's name links to its page: "
            "what each attack recovered of each prompt, wrong tokens marked.")


def trust_text(board: Board) -> str:
    """What the board can vouch for, in words: every entry is checked on read, only a rerun verifies it."""
    rows = board.ranked + board.below
    verified = sum(r.verified.verified for r in rows)
    plugged = any(AS_SUBMITTED in epsilon_text(r.entry) for r in rows)
    return (f"Verified: {verified} of {len(rows)} entries. An entry is verified when a maintainer's "
            "`invbench verify` reran a random subset of its prompts (large enough to catch a forgery on a quarter of "
            "them with probability 0.99), every rerun answer equalled the entry's record of that prompt, and the "
            "record of it (`.verification.json` beside the entry) agrees with itself and with this exact file; "
            "otherwise its numbers are the submitter's. Every entry is checked when the board is rendered: its "
            "schema, its protocol and prompts, its summary against its prompts (each mean must be the mean of its "
            "transcript's per-prompt values), and whatever follows from its other fields, recomputed (the "
            "defence's guarantee from its parameters, each verdict from its metrics, the radius from its gaps)."
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
    """The main columns (the details are on each entry's page and behind index.html's toggle)."""
    shown = [i for i, c in enumerate(columns(board)) if not c.detail]
    header = [escape_md(columns(board)[i].title) for i in shown]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for row in rows:
        texts = [escape_md(text) for text, _ in cells(row, board.attacks, board.ranking)]
        texts[1] = f"[{texts[1]}]({entry_page(row.entry)})"  # its page: who submitted it, and what leaked
        lines.append("| " + " | ".join(texts[i] for i in shown) + " |")
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
    """Two panels, worst-case token accuracy and worst-case exact match, each against top-1 agreement,
    with the floor; the Pareto frontier (of the ranking rule's metric) is drawn on its panel. PNG.
    Labels are entry ids (slugs), drawn with mathtext off."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(12, 5.4), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(PANELS), sharey=True)
    rows = [r for r in board.ranked + board.below if r.entry.top1_agreement is not None]
    for ax, (metric, (_, words)) in zip(axes, PANELS.items()):
        _board_panel(ax, board, rows, metric, words)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=len(names), fontsize=8)  # off the data
    fig.suptitle(f"{board.protocol}: privacy against utility (labels that would overlap are left off: the table "
                 "names every point)", parse_math=False, fontsize=10)
    fig.draw_without_rendering()  # the layout first: label placement measures the rendered labels
    for ax, metric in zip(axes, PANELS):
        label_points(ax, [PointLabel(r.entry.top1_agreement, getattr(r.entry, metric), r.entry.entry_id) for r in rows],
                     drop_unplaced=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _board_panel(ax, board: Board, rows: list[Row], metric: str, words: str) -> None:
    """One privacy metric (an Entry property) of every entry against top-1 agreement."""
    for group, style in ((board.ranked, dict(marker="o", color="tab:blue", label="ranked")),
                         (board.below, dict(marker="x", color="tab:gray", label="below the floor"))):
        points = [(r.entry.top1_agreement, getattr(r.entry, metric)) for r in group if r.entry.top1_agreement is not None]
        if points:
            ax.scatter(*zip(*points), zorder=3, **style)
    frontier = sorted((r.entry.top1_agreement, getattr(r.entry, metric)) for r in rows if r.pareto)
    if frontier and metric == board.ranking.privacy:
        ax.plot(*zip(*frontier), color="tab:red", linestyle="-", drawstyle="steps-pre", zorder=2,
                label="Pareto frontier")
    ax.axvline(board.floor, color="tab:green", linestyle="--", label=f"utility floor {board.floor:.2f}")
    if not rows:
        ax.text(0.5, 0.5, "no entries yet", ha="center", va="center", transform=ax.transAxes, parse_math=False)
    ax.set(xlim=(-0.03, 1.03), ylim=(-0.03, 1.03), xlabel="top-1 agreement (utility, higher is better)",
           ylabel=f"{words} (lower is more private)")
    ax.set_title(words + (" (ranks the board)" if metric == board.ranking.privacy else ""), parse_math=False)
    ax.grid(alpha=0.3)


# --- HTML ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HtmlCell:
    text: str
    sort: str  # the data-sort attribute the page's script sorts by ("" for a missing value)
    numeric: bool
    url: str = ""  # a link on the text (the entry's, validated http(s))
    detail: bool = False  # hidden until the reader asks for every column


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
    """One table row as the template writes it: plain text, which the template escapes; the entry's
    name links to its page."""
    page = entry_page(row.entry)
    row_cells = [HtmlCell(text, _sort_attr(sort_value), col.kind == "number", page if col.title == "Entry" else "",
                          col.detail)
                 for col, (text, sort_value) in zip(columns(board), cells(row, board.attacks, board.ranking))]
    return HtmlRow(row.entry.entry_id, row.pareto, row_cells)


def _sha256(text: str) -> str:
    """base64 of the SHA-256 of `text`: how a Content-Security-Policy names an inline script or style."""
    return base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def _environment() -> Environment:
    """The templates' environment: autoescaping, undefined names an error."""
    environment = Environment(loader=PackageLoader("invbench", "templates"), autoescape=True,
                              undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)
    environment.filters["sha256"] = _sha256
    return environment


def render_html(board: Board, png: bytes) -> str:
    """The page from `templates/board.html.j2`, autoescaped: entry data is only ever text there."""
    return _environment().get_template("board.html.j2").render(
        board=board, columns=columns(board), ranked=[html_row(board, row) for row in board.ranked],
        below=[html_row(board, row) for row in board.below], floor=floor_text(board, str),
        problems=[problem_text(p) for p in board.problems], plot=base64.b64encode(png).decode("ascii"),
        trust=trust_text(board).replace("`", ""),
        version=__version__)


# --- an entry's page ------------------------------------------------------------------------------

ENTRY_PAGES = "entries"  # the folder of the entry pages, beside index.html
NO_TRANSCRIPT = ("This entry does not carry its records (entry schema {version}, before entries held what each attack "
                 "recovered): only its numbers are known here. Running the same `invbench submit` command again adds "
                 "them (the run resumes; nothing is attacked again).")


@dataclass(frozen=True)
class PageField:
    label: str
    text: str
    url: str = ""  # validated http(s)


@dataclass(frozen=True)
class AttackRow:
    name: str
    token_accuracy: str
    exact_match: str
    search_failure_rate: str
    verdict: str


@dataclass(frozen=True)
class LeakLine:
    attack: str
    tokens: list[Token]
    score: str  # "exact" or the prompt's token accuracy


@dataclass(frozen=True)
class PromptView:
    index: int
    truth: list[str]
    attacks: list[LeakLine]


def citation(defense: str) -> str:
    """The registered defence's own citation (`Defense.citation`); a plug-in's class is not at hand here."""
    from invbench.defenses import available_defenses

    cls = available_defenses().get(defense)
    return (cls.citation if cls else None) or "none recorded"


def page_fields(row: Row, board: Board) -> list[PageField]:
    """The entry's metadata as the page lists it: the submitter, the defence, its guarantee and
    citation, verdicts, the verified mark and the run."""
    e, meta, summary = row.entry, row.entry.meta, row.entry.summary
    worst = summary.worst_case
    protocol = meta["protocol"]
    guarantee = [epsilon_text(e)] + ([summary.guarantee.sentence()] if summary.guarantee.epsilon is not None else [])
    guarantee += [f"{key}: {summary.defense[key]}" for key in ("neighbouring", "reason") if summary.defense.get(key)]
    return [
        PageField("Submitted by", meta["authors"] or "not given"),
        PageField("Link", meta["url"] or "none given", meta["url"]),
        PageField("Date", meta["date"]),
        PageField("Protocol", f"{protocol['name']} (version {protocol.get('version', 1)}, ranking {protocol['ranking']})"),
        PageField("Rank", (f"{row.rank_text} of {len(board.ranked)}" + (" (tied: the 95% intervals overlap)" if row.tied
                                                                           else "")) if row.rank else
                  f"below the utility floor (top-1 agreement under {board.floor:.2f})"),
        PageField("Defence", f"{defense_text(summary.defense)}; from {e.defense_spec}"),
        PageField("Citation", citation(summary.defense["name"])),
        PageField("Guarantee", "; ".join(guarantee) if summary.guarantee.epsilon is not None
                  else f"none ({summary.defense.get('reason') or 'no formal guarantee'})"),
        PageField("Verdict", summary.verdict.says if summary.verdict else verdict_text(e)),  # says starts with it
        PageField("Verified", row.verified.text()),
        PageField("Worst case", f"token accuracy {with_interval(worst['token_accuracy'].value, e.intervals.worst_token_accuracy)} "
                  f"({worst['token_accuracy'].attack}), exact match "
                  f"{with_interval(worst['exact_match'].value, e.intervals.worst_exact_match)} "
                  f"({worst['exact_match'].attack}); [95% intervals over the prompts]"),
        PageField("Utility", f"top-1 agreement {with_interval(summary.utility['top1_agreement'], e.intervals.top1_agreement)}, KL "
                  f"{cell(summary.utility.get('kl_clean_defended'), '.4g')}, perplexity ratio "
                  f"{cell(summary.utility.get('perplexity_ratio'), '.4g')}"
                  + "".join(f"; {note}" for note in (summary.utility.get("note"), summary.defense.get("utility_note"))
                            if note)),  # how it was measured, and what it leaves out (a client-side denoiser)
        PageField("Run", f"{summary.n} prompts x {summary.tokens} tokens of {summary.model} ({summary.dataset}); "
                  f"git commit {cell(meta.get('git_commit'))}; {summary.device}; configuration {summary.config_hash}"),
    ]


def prompt_views(entry: Entry) -> list[PromptView]:
    """Each prompt of the entry's transcript: the true tokens, then each attack's with the wrong ones marked."""
    if entry.transcript is None:
        return []
    return [PromptView(p.prompt_index, [visible(t) for t in p.target_tokens],
                       [LeakLine(name, marked(p.target_ids, answer),
                                 "exact" if answer.exact_match else f"{answer.token_accuracy:.2f} of tokens")
                        for name, answer in p.attacks.items()])
            for p in entry.transcript.prompts]


def render_entry_html(row: Row, board: Board) -> str:
    """An entry's page from `templates/entry.html.j2`, autoescaped."""
    e = row.entry
    attacks = [AttackRow(name, cell(a.token_accuracy), cell(a.exact_match), cell(a.search_failure_rate),
                         a.verdict or "-") for name, a in e.summary.attacks.items()]
    return _environment().get_template("entry.html.j2").render(
        name=e.name, protocol=board.protocol, fields=page_fields(row, board), attacks=attacks,
        prompts=prompt_views(e), no_transcript=NO_TRANSCRIPT.format(version=e.meta.get("schema_version")),
        version=__version__)


# --- writing ------------------------------------------------------------------------------------

@dataclass
class Rendered:
    markdown: Path
    html: Path
    board: Board
    pages: list[Path]  # each entry's page


def render(protocol_dir: Path, *, utility_floor: float = DEFAULT_UTILITY_FLOOR) -> Rendered:
    """Write `LEADERBOARD.md`, `index.html` and each entry's page (`entries/`) into `protocol_dir`, as one
    set: under the board's lock (a second render waits its turn instead of deleting what the first wrote),
    every file rendered and written beside its place first, and only then all of them moved in (a full
    disk fails before any file of the board changes)."""
    protocol_dir = Path(protocol_dir)
    with board_lock(protocol_dir):
        board = build_board(protocol_dir, floor=utility_floor)
        markdown, page = protocol_dir / "LEADERBOARD.md", protocol_dir / "index.html"
        files = {markdown: render_markdown(board).encode("utf-8"),
                 page: render_html(board, plot_png(board)).encode("utf-8")}
        pages = {protocol_dir / entry_page(row.entry): render_entry_html(row, board).encode("utf-8")
                 for row in board.ranked + board.below}
        write_set_atomic({**files, **pages})
        folder = protocol_dir / ENTRY_PAGES
        for stale in set(folder.glob("*.html")) - set(pages) if folder.is_dir() else ():
            stale.unlink()
    return Rendered(markdown, page, board, list(pages))


def protocol_dirs(board_dir: Path) -> list[Path]:
    """The folders of `board_dir` that hold a protocol's entries: registered names, or any folder
    with `*.json` files in it."""
    board_dir = Path(board_dir)
    if not board_dir.is_dir():
        return []
    return sorted(d for d in board_dir.iterdir()
                  if d.is_dir() and not d.is_symlink()
                  and (registered_definition(d.name) or any(not is_record(p) for p in d.glob("*.json"))))
