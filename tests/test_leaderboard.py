"""Leaderboard entries (schema, slugs) and the board (ranking, floor, Pareto, escaping), on
constructed entries: no model runs here."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from invbench.entries import (NAME, SCALAR, EntryError, Problem, check_value, load_entries, read_entry, slugify,
                              validate_entry_id)
from invbench.leaderboard import build_board, escape_md, pareto_frontier, render, render_markdown
from invbench.protocols import get_protocol
from invbench.metrics import worst_case
from invbench.submit import build_entry
from invbench.summary import RunSummary
from invbench.verdicts import Evidence, attack_verdict, run_verdict

QUICK = get_protocol("quick")
XSS_NAME = "<img src=x onerror=alert(1)>"
XSS_DEFENCE = "<script>window.pwned=1</script>"


def fake_summary(*, em: dict[str, float], top1: float | None, auroc: float | None = 0.8,
                 defense: str = "gaussian", params: dict | None = None, search_failure: float = 0.0) -> RunSummary:
    """What `invbench.runner.run` returns, with the given per-attack exact match, top-1 agreement
    and search-failure rate (verdicts by the real rule)."""
    attacks = {a: {"n": QUICK.n, "exact_match": v, "token_accuracy": min(1.0, v + 0.1), "similarity": min(1.0, v + 0.2),
                   "detector_auroc": auroc, "detector_note": None, "detector_tpr_at_1pct_fpr": None,
                   "detector_threshold": 1e-6, "detector_flag_rate": 0.0, "seconds_per_token": 0.5,
                   "tokens_per_second": 2.0, "config": {"preset": "fast"}, "search_failure_rate": search_failure,
                   "verdict": attack_verdict(Evidence(v, min(1.0, v + 0.1), search_failure), blind_token_accuracy=0.1),
                   "diagnostics": {}} for a, v in em.items()}
    verdict, attack = run_verdict({a: m["verdict"] for a, m in attacks.items()})
    return RunSummary.from_dict({
        "schema_version": 1, "model": QUICK.model, "model_source": "test", "dataset": QUICK.dataset,
        "dataset_source": "test", "n": QUICK.n, "tokens": QUICK.tokens, "layer": -1, "seed": QUICK.seed,
        "defense": {"name": defense, "params": params if params is not None else {"sigma": 0.01}, "epsilon": None,
                    "delta": None, "neighbouring": None, "reason": "no formal guarantee"},
        "utility": {"top1_agreement": top1, "kl_clean_defended": 0.1, "perplexity_ratio": 1.1, "cosine": 0.9},
        "attacks": attacks, "worst_case": worst_case(attacks), "config_hash": "0123456789abcdef",
        "device": "cpu (test)", "versions": {"invbench": "0.1.0", "torch": "2.13.0"}, "wall_seconds": 1.0,
        "verdict": {"verdict": verdict, "attack": attack, "says": "test", "blind_token_accuracy": 0.1,
                    "thresholds": {}}, "radius": None})


def make_entry(name: str, *, em: float | dict[str, float] = 0.5, top1: float | None = 0.9, entry_id: str | None = None,
               defense: str = "gaussian", url: str = "", **kw) -> dict:
    em = em if isinstance(em, dict) else {a: em for a in QUICK.attacks}
    return build_entry(fake_summary(em=em, top1=top1, defense=defense, **kw), protocol=QUICK,
                       entry_id=entry_id or slugify(name), name=name, authors="A. Author", url=url, spec=defense,
                       day="2025-01-02")


def write_entry(board: Path, entry: dict, *, file_id: str | None = None) -> Path:
    path = board / "quick" / f"{file_id or entry['entry_id']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entry))
    return path


# --- slugs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, slug", [("Top-k 32", "top-k-32"), ("  Gaussian  sigma=0.01 ", "gaussian-sigma-0-01"),
                                        ("Défense à l'été", "defense-a-l-ete"), ("../../etc/passwd", "etc-passwd"),
                                        ("a" * 100, "a" * 64)])
def test_slugify_makes_valid_ids(name, slug):
    assert slugify(name) == slug
    assert validate_entry_id(slug) == slug


@pytest.mark.parametrize("bad", ["../x", "a/b", "a\\b", "..", ".hidden", "UPPER", "a--b", "-a", "a-", "", "a b",
                                 "a.json", "a" * 65, "é"])
def test_validate_entry_id_rejects_paths_and_non_slugs(bad):
    with pytest.raises(EntryError):
        validate_entry_id(bad)


def test_path_separators_are_named_in_the_message():
    with pytest.raises(EntryError, match="looks like a path"):
        validate_entry_id("quick/../../x")


def test_slugify_refuses_names_with_nothing_usable():
    with pytest.raises(EntryError, match="cannot make an entry id"):
        slugify("<<>>")


# --- the schema ---------------------------------------------------------------------------------

def test_good_entry_passes(tmp_path):
    path = write_entry(tmp_path, make_entry("Gaussian 0.01"))
    entries, problems = load_entries(tmp_path / "quick")
    assert problems == [] and [e.entry_id for e in entries] == ["gaussian-0-01"]
    assert read_entry(path).worst_exact_match == 0.5


def _set(data: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        data = data[key]
    if value is DELETE:
        del data[last]
    else:
        data[last] = value


DELETE = object()


@pytest.mark.parametrize("field, value, reported, message", [
    ("summary.attacks.scan.exact_match", 1.5, "summary.attacks.scan.exact_match", "expected a number in [0, 1]"),
    ("summary.attacks.scan.exact_match", "0.5", "summary.attacks.scan.exact_match", "expected a number in [0, 1]"),
    ("summary.attacks.scan.exact_match", True, "summary.attacks.scan.exact_match", "expected a number"),
    ("summary.attacks.continuous.token_accuracy", DELETE, "summary.attacks.continuous.token_accuracy", "missing"),
    ("summary.attacks.projection.detector_auroc", -0.1, "summary.attacks.projection.detector_auroc", "or null"),
    ("summary.attacks.scan.verdict", DELETE, "summary.attacks.scan.verdict", "missing"),
    ("summary.attacks.scan", DELETE, "summary.attacks", "expected exactly the protocol's attacks"),
    ("summary.utility.top1_agreement", 2, "summary.utility.top1_agreement", "expected a number in [0, 1]"),
    ("summary.utility.perplexity_ratio", 0, "summary.utility.perplexity_ratio", "(0, inf)"),
    ("summary.utility", DELETE, "summary.utility", "expected an object"),
    ("summary.worst_case.exact_match.value", 0.1, "summary.worst_case.exact_match.value", "not the maximum over attacks"),
    ("summary.verdict.verdict", "protected", "summary.verdict.verdict", "does not follow from the attacks' verdicts"),
    ("summary.defense.params", {"k": [1, 2]}, "summary.defense.params.k", "expected a number, a boolean, null or a string"),
    ("summary.defense.epsilon", -1, "summary.defense.epsilon", "expected a number in [0, inf) or null"),
    ("summary.defense.name", "two\nlines", "summary.defense.name", "without control characters"),
    ("entry_id", "../evil", "entry_id", "looks like a path"),
    ("name", "", "name", "non-empty"),
    ("url", "javascript:alert(1)", "url", "an http(s) URL"),
    ("url", "https://x.org/a b", "url", "an http(s) URL"),
    ("date", "yesterday", "date", "YYYY-MM-DD"),
    ("summary.n", 3, "summary.n", "differs from the protocol's 4"),
    ("summary.model", "gpt2", "summary.model", "differs from the protocol's"),
    ("summary.layer", 1, "summary.layer", "differs from the protocol's -1"),
    ("summary.config_hash", "xyz", "summary.config_hash", "16 hex digits"),
    ("summary.device", 5, "summary.device", "expected a string"),
    ("summary.seed", None, "summary.seed", "expected an integer"),
    ("protocol.name", "c4-gpt2-10tok", "protocol.name", "does not match the folder"),
    ("protocol.n", 400, "protocol", "differs from the current definition"),
    ("protocol.ranking", "best-first", "protocol", "differs from the current definition"),
    ("defense_spec", "", "defense_spec", "non-empty"),
    ("schema_version", 1, "schema_version", "expected 3"),
    ("git_commit", "not-a-commit", "git_commit", "a git commit"),
])
def test_each_malformed_field_is_reported_by_file_and_field_and_skipped(tmp_path, field, value, reported, message):
    good = make_entry("Good one", em=0.2)
    bad = copy.deepcopy(make_entry("Bad one"))
    _set(bad, field, value)
    write_entry(tmp_path, good)
    bad_path = write_entry(tmp_path, bad, file_id="bad-one")
    entries, problems = load_entries(tmp_path / "quick")
    assert [e.entry_id for e in entries] == ["good-one"]  # the bad one is skipped, the good one kept
    assert any(p.path == bad_path and p.field == reported and message in p.message for p in problems), problems
    assert all(p.path == bad_path for p in problems)
    text = str(next(p for p in problems if p.field == reported))
    assert text.startswith(f"{bad_path}: field {reported}: ")


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"), ('{"a": NaN}', "NaN is not valid JSON"),
    ('{"a": 1, "a": 2}', "duplicate key"), ("[]", "expected an object"),
])
def test_unparseable_entries_are_reported_and_skipped(tmp_path, content, message):
    folder = tmp_path / "quick"
    folder.mkdir()
    (folder / "broken.json").write_text(content)
    entries, problems = load_entries(folder)
    assert entries == [] and len(problems) >= 1
    assert problems[0].path == folder / "broken.json" and message in str(problems[0])


def test_entry_id_must_be_the_file_name(tmp_path):
    write_entry(tmp_path, make_entry("Named"), file_id="other-name")
    _, problems = load_entries(tmp_path / "quick")
    assert [p.field for p in problems] == ["entry_id"]


def test_read_entry_raises_with_every_problem(tmp_path):
    bad = make_entry("Bad")
    bad["summary"]["attacks"]["scan"]["exact_match"] = 7
    bad["date"] = "soon"
    path = write_entry(tmp_path, bad)
    with pytest.raises(EntryError) as info:
        read_entry(path)
    assert str(info.value).startswith(f"{path}: field date: expected a date YYYY-MM-DD; ")
    assert "; field summary.attacks.scan.exact_match: expected a number in [0, 1], got 7" in str(info.value)


# --- the committed schema file, on its own ------------------------------------------------------

SCHEMAS = Path(__file__).resolve().parents[1] / "bench" / "schemas"


def test_a_real_entry_validates_with_plain_jsonschema():
    """What a submitter can rely on: the committed files alone (the entry schema and the summary
    schema it refers to), no invbench code, check an entry."""
    import jsonschema
    from referencing import Registry, Resource

    schema, summary = (json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))
                       for name in ("entry", "summary"))
    validator = jsonschema.Draft202012Validator(
        schema, registry=Registry().with_resource(summary["$id"], Resource.from_contents(summary)))
    entry = json.loads(json.dumps(make_entry("Plain check", em=0.3)))  # as the file holds it
    validator.validate(entry)
    entry["summary"]["attacks"]["scan"]["exact_match"] = 7
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(entry)


@pytest.mark.parametrize("field, value, message", [
    ("summary.config_hash", "0123456789abcdef\n", "16 hex digits"),  # Python's re lets $ match before a final newline
    ("git_commit", "abc1234\n", "a git commit"),
    ("url", "https://example.org/\n", "an http(s) URL"),
    ("summary.defense.params", {"p\n": 1}, "bad name"),
    ("name", "right\u202eleft", "without control characters"),  # a bidi override: category Cf, not a control
])
def test_no_field_takes_a_hidden_line_break_or_format_character(tmp_path, field, value, message):
    bad = make_entry("Sneaky")
    _set(bad, field, value)
    _, problems = load_entries(write_entry(tmp_path, bad).parent)
    assert any(message in p.message for p in problems), problems


def test_numbers_must_be_finite(tmp_path):
    path = write_entry(tmp_path, make_entry("Huge"))
    path.write_text(path.read_text().replace('"seconds_per_token": 0.5', '"seconds_per_token": 1e999', 1))
    _, problems = load_entries(path.parent)
    assert [str(p) for p in problems] == [f"{path}: not valid JSON: 1e999 is not a finite number"]


def test_one_value_is_checked_against_a_named_part_of_the_schema():
    assert check_value("https://example.org", "#/properties/url") is None
    assert check_value("ftp://x", "#/properties/url") == "expected an http(s) URL or an empty string"
    assert check_value("../x", NAME) == "expected a name of letters, digits, '_', '.' or '-'"
    assert check_value("x" * 301, SCALAR) == "expected at most 300 characters, got 301"


# --- ranking, floor, Pareto ----------------------------------------------------------------------

def board_of(tmp_path: Path, *entries: dict, floor: float = 0.5):
    for entry in entries:
        write_entry(tmp_path, entry)
    return build_board(tmp_path / "quick", floor=floor)


def test_ranked_by_worst_case_exact_match_over_attacks(tmp_path):
    board = board_of(tmp_path,
                     make_entry("Strong on average", em={"guided": 0.0, "continuous": 0.0, "projection": 0.0, "scan": 0.9}),
                     make_entry("Even", em={"guided": 0.3, "continuous": 0.3, "projection": 0.3, "scan": 0.3}),
                     make_entry("Weak", em=0.6))
    assert [(r.rank, r.entry.entry_id) for r in board.ranked] == [(1, "even"), (2, "weak"), (3, "strong-on-average")]
    assert board.ranked[2].entry.worst_attack == "scan"


def test_an_inconclusive_entry_never_outranks_a_conclusive_one(tmp_path):
    """No attack recovers anything from "Masked", but its misses are search failures: its zero is no
    evidence, so it ranks below a defence that leaks a little, conclusively."""
    masked = make_entry("Masked", em=0.0, search_failure=0.8)
    assert masked["summary"]["verdict"]["verdict"] == "inconclusive"
    board = board_of(tmp_path, masked, make_entry("Leaky", em=0.2), make_entry("Private", em=0.0))
    assert [r.entry.entry_id for r in board.ranked] == ["private", "leaky", "masked"]
    assert [r.entry.verdict for r in board.ranked] == ["protected", "leaks", "inconclusive"]
    markdown = render_markdown(board)
    assert "inconclusive \\(search failures\\)" in markdown and "ranks below every conclusive one" in markdown


def test_ties_name_the_same_strongest_attack_in_the_run_the_entry_and_the_board(tmp_path):
    entry = make_entry("Tie", em={"guided": 1.0, "continuous": 0.2, "projection": 0.2, "scan": 1.0})
    assert entry["summary"]["worst_case"]["exact_match"]["attack"] == "guided"  # a tie on every metric: the first name
    board = board_of(tmp_path, entry)
    assert board.ranked[0].entry.worst_attack == "guided"
    entry["summary"]["worst_case"]["exact_match"]["attack"] = "scan"  # the same value, another name: refused
    write_entry(tmp_path, entry, file_id="tie")
    _, problems = load_entries(tmp_path / "quick")
    assert [p.field for p in problems] == ["summary.worst_case.exact_match.attack"]


def test_entries_under_the_floor_are_listed_separately(tmp_path):
    board = board_of(tmp_path, make_entry("Useful", em=0.4, top1=0.8), make_entry("Useless", em=0.0, top1=0.3),
                     make_entry("No utility", em=0.0, top1=None), floor=0.5)
    assert [r.entry.entry_id for r in board.ranked] == ["useful"]
    assert [r.entry.entry_id for r in board.below] == ["useless", "no-utility"]
    assert all(r.rank is None for r in board.below)
    markdown = render_markdown(board)
    assert "at least 0.50 (the utility floor)" in markdown and "Below the utility floor" in markdown


def test_floor_is_inclusive_and_configurable(tmp_path):
    board = board_of(tmp_path, make_entry("Edge", top1=0.7), floor=0.7)
    assert [r.entry.entry_id for r in board.ranked] == ["edge"]
    assert build_board(tmp_path / "quick", floor=0.71).ranked == []


def test_pareto_frontier_is_marked(tmp_path):
    board = board_of(tmp_path,
                     make_entry("Private", em=0.0, top1=0.6),    # frontier: most private
                     make_entry("Useful", em=0.8, top1=1.0),     # frontier: most useful
                     make_entry("Middle", em=0.3, top1=0.9),     # frontier
                     make_entry("Dominated", em=0.5, top1=0.8),  # worse than Middle on both
                     make_entry("Tied", em=0.3, top1=0.9, entry_id="tied"),  # equal to Middle: not dominated
                     make_entry("Low", em=0.0, top1=0.2))        # below the floor, dominated by Private
    marks = {r.entry.entry_id: r.pareto for r in board.ranked + board.below}
    assert marks == {"private": True, "useful": True, "middle": True, "dominated": False, "tied": True, "low": False}
    assert pareto_frontier([]) == set()


# --- escaping -----------------------------------------------------------------------------------

def hostile_entries() -> list[dict]:
    return [make_entry(XSS_NAME, entry_id="xss-name", defense=XSS_DEFENCE, params={"p": "a|b`c`<i>"},
                       url="https://example.org/x?a=1&b=2"),
            make_entry("pipe | name [link](javascript:alert(1)) *bold*", entry_id="md-name", em=0.1)]


@pytest.mark.parametrize("raw, escaped", [
    ("a|b", "a\\|b"), ("`code`", "\\`code\\`"), ("<img src=x>", "&lt;img src=x&gt;"),
    ("[x](javascript:y)", "\\[x\\]\\(javascript:y\\)"), ("line\nbreak", "line break"), ("a & b", "a &amp; b"),
    ("*_~", "\\*\\_\\~"), ("back\\slash", "back\\\\slash"),
])
def test_escape_md(raw, escaped):
    assert escape_md(raw) == escaped


def test_markdown_escapes_every_submitted_value(tmp_path):
    for entry in hostile_entries():
        write_entry(tmp_path, entry)
    markdown = render(tmp_path / "quick").markdown.read_text()
    assert "<" not in markdown and ">" not in markdown.replace("&gt;", "")
    assert "&lt;img src=x onerror=alert\\(1\\)&gt;" in markdown
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in markdown
    assert "p=a\\|b\\`c\\`&lt;i&gt;" in markdown
    assert "pipe \\| name \\[link\\]\\(javascript:alert\\(1\\)\\) \\*bold\\*" in markdown
    header = next(line for line in markdown.splitlines() if line.startswith("| \\#"))
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and line != header]
    unescaped_pipes = lambda line: len(re.findall(r"(?<!\\)\|", line))  # noqa: E731
    assert all(unescaped_pipes(row) == unescaped_pipes(header) for row in rows)  # no cell was split


def test_html_escapes_every_submitted_value_and_allows_only_its_own_script(tmp_path):
    for entry in hostile_entries():
        write_entry(tmp_path, entry)
    page = render(tmp_path / "quick").html.read_text()
    assert XSS_NAME not in page and XSS_DEFENCE not in page and "<i>" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in page
    assert 'href="https://example.org/x?a=1&amp;b=2"' in page
    assert page.count("<script>") == 1 and "pwned" not in page.split("<script>")[1]  # the page's own script only
    assert "Content-Security-Policy" in page and "script-src 'sha256-" in page
    assert re.search(r'src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', page)


def test_the_page_escapes_by_autoescape_alone():
    """Entry text reaches the page only through the template's autoescaping: nothing is marked safe."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    for template in (bench / "templates").glob("*.j2"):
        assert not re.search(r"\|\s*safe|autoescape\s+false", template.read_text()), template
    assert "Markup" not in (bench / "leaderboard.py").read_text()


def test_problem_messages_are_escaped_too(tmp_path):
    bad = make_entry("Bad")
    bad["summary"]["attacks"]["scan"]["exact_match"] = "<b>x</b>"
    write_entry(tmp_path, bad)
    result = render(tmp_path / "quick")
    assert "<b>" not in result.html.read_text() and "<b>" not in result.markdown.read_text()
    assert "Skipped entries" in result.markdown.read_text()
    assert result.board.problems and isinstance(result.board.problems[0], Problem)


def test_render_writes_both_files_for_an_empty_board(tmp_path):
    result = render(tmp_path / "quick")
    assert "No entry at or above the utility floor yet." in result.markdown.read_text()
    assert "<table" not in result.html.read_text() and 'id="plot"' in result.html.read_text()


# --- protocol identity ----------------------------------------------------------------------------

def test_an_edited_protocol_description_keeps_its_entries_valid(tmp_path):
    """Before: entries had to match the whole protocol, so rewording its description voided them all."""
    import dataclasses

    from invbench.protocols import PROTOCOLS

    write_entry(tmp_path, make_entry("Made before", em=0.2))
    reworded = dataclasses.replace(QUICK, description="Reworded: a smoke test, nothing more.")
    with PROTOCOLS.override("quick", reworded):
        entries, problems = load_entries(tmp_path / "quick")
        board = build_board(tmp_path / "quick")
    assert problems == [] and [e.entry_id for e in entries] == ["made-before"]
    assert board.description == "Reworded: a smoke test, nothing more."
    with PROTOCOLS.override("quick", dataclasses.replace(QUICK, seed=7)):  # a defining field: refused
        _, problems = load_entries(tmp_path / "quick")
    assert [p.field for p in problems] == ["protocol"] and "(seed)" in problems[0].message


# --- entries of schema_version 2 (legacy_entries) ---------------------------------------------------

BOARDS = Path(__file__).resolve().parents[1] / "leaderboards"
LEGACY = sorted(p for p in BOARDS.glob("*/*.json") if json.loads(p.read_text()).get("schema_version") == 2)


@pytest.mark.skipif(not LEGACY, reason="no version-2 entry is committed any more")
def test_committed_version_2_entries_are_read_with_what_they_recorded():
    from invbench.legacy_entries import NOT_RECORDED

    for folder in sorted({p.parent for p in LEGACY}):
        entries, problems = load_entries(folder)
        assert problems == [], problems
        for entry in entries:
            if entry.meta["schema_version"] == 2:
                assert entry.summary.model_source is None and "model_source" in NOT_RECORDED
                assert set(entry.summary.attacks) == set(entry.meta["protocol"]["attacks"])
                assert entry.meta["protocol"]["ranking"] == "worst-case-exact-match"


@pytest.mark.skipif(not LEGACY, reason="no version-2 entry is committed any more")
def test_a_tampered_version_2_entry_is_refused_like_a_version_3_one(tmp_path):
    source = LEGACY[0]
    data = json.loads(source.read_text())
    data["verdict"]["verdict"] = "protected" if data["verdict"]["verdict"] != "protected" else "leaks"
    data["detector_auroc"] = {name: 0.123 for name in data["detector_auroc"]}
    folder = tmp_path / source.parent.name
    folder.mkdir()
    (folder / source.name).write_text(json.dumps(data))
    _, problems = load_entries(folder)
    assert {p.field for p in problems} >= {"verdict.verdict", f"detector_auroc.{next(iter(data['attacks']))}"}
