"""Leaderboard entries (schema, slugs) and the board (ranking, floor, Pareto, escaping), on
constructed entries: no model runs here."""
from __future__ import annotations

import copy
import json
import math
import re
from functools import lru_cache
from pathlib import Path

import pytest

from invbench.entries import (NAME, SCALAR, EntryError, Problem, check_value, load_entries, read_entry, slugify,
                              validate_entry_id)
from invbench.leaks.models import load_model
from invbench.leaks.prompts import load_prompts
from invbench.leaderboard import build_board, escape_md, pareto_frontier, rank_entries, render, render_markdown
from invbench.protocols import get_protocol
from invbench.metrics import worst_case
from invbench.submit import build_entry
from invbench.summary import RunSummary
from invbench.transcript import PromptText, Recovered, Transcript
from invbench.verdicts import Evidence, attack_verdict, run_verdict

QUICK = get_protocol("quick")
XSS_NAME = "<img src=x onerror=alert(1)>"
XSS_DEFENCE = "<script>window.pwned=1</script>"


@lru_cache(maxsize=None)
def quick_targets() -> tuple[tuple[int, ...], ...]:
    """The quick protocol's real prompts (its entries must carry exactly them: protocols pin their prompts)."""
    tokenizer = load_model("tiny-gpt2", seed=0).tokenizer
    prompts, _ = load_prompts("c4", tokenizer=tokenizer, n=QUICK.n, tokens=QUICK.tokens, seed=QUICK.seed,
                              notify=lambda line: None)
    return tuple(p.ids for p in prompts)


def fake_answers(em: float, tok: float | None, search_failure: float = 0.0) -> list[dict]:
    """One attack's answers to the quick prompts with exact match `em` and token accuracy `tok` (rounded to
    what 4 prompts of 3 tokens can give; default: `em`, every miss wholly wrong), similarity
    1 for an exact prompt and 0.5 otherwise, and `search_failure` of the prompts flagged (misses only)."""
    targets = quick_targets()
    n, length = len(targets), len(targets[0])
    exact = round(em * n)
    misses = n - exact
    correct = round((tok if tok is not None else exact / n) * n * length)
    spare = min(max(correct - exact * length, 0), misses * (length - 1))
    flagged = min(round(search_failure * n), misses)
    answers = []
    for i, target in enumerate(targets):
        right = length if i < exact else min(length - 1, spare)
        if i >= exact:
            spare -= right
        ids = list(target[:right]) + [(t + 1) % 1000 for t in target[right:]]
        answers.append({"ids": ids, "exact": right == length, "token_accuracy": right / length,
                        "similarity": 1.0 if right == length else 0.5,
                        "search_failure": i >= exact and i - exact < flagged})
    return answers


def fake_defense(name: str, params: dict) -> dict:
    """What a run records of the defence: the real record where the defence is registered and takes the
    parameters (as an entry must say), else a record without a guarantee."""
    from invbench.defenses import DefenseError, make_defense
    from invbench.defenses.checks import described
    from invbench.metrics import json_safe

    try:
        return json_safe(described(make_defense(name, dict(params)), tokens=QUICK.tokens))
    except DefenseError:
        return {"name": name, "params": params, "epsilon": None, "delta": None, "neighbouring": None,
                "reason": "no formal guarantee"}


def fake_summary(*, em: dict[str, float], top1: float | None, auroc: float | None = 0.8,
                 defense: str = "gaussian", params: dict | None = None, search_failure: float = 0.0,
                 tok: dict[str, float] | None = None) -> RunSummary:
    """What `invbench.runner.run` returns for the answers `fake_answers` gives each attack (exact match,
    token accuracy, similarity and search-failure rate their means), with top-1 agreement `top1` on every
    prompt (verdicts by the real rule)."""
    answers = {a: fake_answers(v, (tok or {}).get(a), search_failure) for a, v in em.items()}
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    attacks = {}
    for a, rows in answers.items():
        figures = {"exact_match": mean([r["exact"] for r in rows]), "token_accuracy": mean([r["token_accuracy"] for r in rows]),
                   "similarity": mean([r["similarity"] for r in rows]),
                   "search_failure_rate": mean([r["search_failure"] for r in rows])}
        attacks[a] = {"n": QUICK.n, **figures, "detector_auroc": auroc, "detector_note": None,
                      "detector_tpr_at_1pct_fpr": None, "detector_threshold": 1e-6, "detector_flag_rate": 0.0,
                      "seconds_per_token": 0.5, "tokens_per_second": 2.0, "config": {"preset": "fast"},
                      "verdict": attack_verdict(Evidence(figures["exact_match"], figures["token_accuracy"],
                                                         figures["search_failure_rate"]), blind_token_accuracy=0.1),
                      "diagnostics": {}}
    verdict, attack = run_verdict({a: m["verdict"] for a, m in attacks.items()})
    per_prompt = [{"prompt_index": i, "top1_agreement": top1, "kl_clean_defended": 0.1, "nll_clean": 1.0,
                   "nll_defended": 1.0 + math.log(1.1), "cosine": 0.9} for i in range(QUICK.n)]
    return RunSummary.from_dict({
        "schema_version": 1, "model": QUICK.model, "model_source": "test", "dataset": QUICK.dataset,
        "dataset_source": "test", "n": QUICK.n, "tokens": QUICK.tokens, "layer": -1, "seed": QUICK.seed,
        "defense": fake_defense(defense, params if params is not None else {"sigma": 0.01}),
        "utility": {"top1_agreement": top1, "kl_clean_defended": 0.1, "nll_clean": 1.0, "nll_defended": 1.0 + math.log(1.1),
                    "perplexity_ratio": 1.1, "cosine": 0.9, **({"per_prompt": per_prompt} if top1 is not None else {})},
        "attacks": attacks, "worst_case": worst_case(attacks), "config_hash": "0123456789abcdef",
        "device": "cpu (test)", "versions": {"invbench": "0.1.0", "torch": "2.13.0"}, "wall_seconds": 1.0,
        "verdict": {"verdict": verdict, "attack": attack, "says": "test", "blind_token_accuracy": 0.1,
                    "thresholds": {}}, "radius": None})


def fake_transcript(em, *, tok: dict[str, float] | None = None, search_failure: float = 0.0,
                    text: str = " tok") -> Transcript:
    """What each attack recovered of the quick prompts, as `fake_answers` gives it (`em`: per attack, or the
    attack names for exact match 0.5); the text of token t is `text` followed by t."""
    em = em if isinstance(em, dict) else {a: 0.5 for a in em}

    def tokens(ids: list[int]) -> list[str]:
        return [f"{text}{t}" for t in ids]

    answers = {a: fake_answers(v, (tok or {}).get(a), search_failure) for a, v in em.items()}
    return Transcript([PromptText(i, list(target), tokens(list(target)),
                                  {a: Recovered(rows[i]["ids"], tokens(rows[i]["ids"]), rows[i]["exact"],
                                                rows[i]["token_accuracy"], rows[i]["similarity"], rows[i]["search_failure"])
                                   for a, rows in answers.items()})
                       for i, target in enumerate(quick_targets())])


def make_entry(name: str, *, em: float | dict[str, float] = 0.5, top1: float | None = 0.9, entry_id: str | None = None,
               defense: str = "gaussian", url: str = "", authors: str = "A. Author",
               transcript: Transcript | None = None, **kw) -> dict:
    em = em if isinstance(em, dict) else {a: em for a in QUICK.attacks}
    transcript = transcript or fake_transcript(em, tok=kw.get("tok"), search_failure=kw.get("search_failure", 0.0))
    return build_entry(fake_summary(em=em, top1=top1, defense=defense, **kw), protocol=QUICK,
                       entry_id=entry_id or slugify(name), name=name, authors=authors, url=url, spec=defense,
                       transcript=transcript, day="2025-01-02")


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
    ("summary.defense.name", "two\nlines", "summary.defense.name", "a name of letters, digits"),
    ("summary.defense.name", "<script>x</script>", "summary.defense.name", "a name of letters, digits"),
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


def test_ranked_by_worst_case_token_accuracy_then_exact_match(tmp_path):
    """Before: ranked by exact match alone, so a defence whose strongest attack recovers 80% of the
    tokens (but never a whole prompt) ranked first. (4 prompts of 3 tokens: every interval overlaps, so
    the three share rank 1; the order is the rule's.)"""
    everywhere = lambda v: {a: v for a in QUICK.attacks}  # noqa: E731
    board = board_of(tmp_path,
                     make_entry("Most tokens", em=everywhere(0.0), tok={"scan": 8 / 12}),
                     make_entry("Whole prompts", em=everywhere(0.5), tok=everywhere(0.5)),
                     make_entry("Fewer prompts", em={**everywhere(0.0), "guided": 0.25}, tok={"guided": 0.5, "scan": 0.5}))
    assert [r.entry.entry_id for r in board.ranked] == ["fewer-prompts", "whole-prompts", "most-tokens"]
    assert [r.entry.verdict for r in board.ranked] == ["leaks"] * 3  # all conclusive: the metrics decide
    markdown = render_markdown(board)
    row = next(line for line in markdown.splitlines() if "Most tokens" in line)
    assert "0.667 \\[" in row  # the worst case (scan's), with its interval
    assert board.ranked[2].entry.worst_attack == "scan" or board.ranked[2].entry.summary.worst_case["token_accuracy"].attack == "scan"
    ranked, _ = rank_entries([r.entry for r in board.ranked], floor=0.5, ranking="worst-case-exact-match")
    assert [r.entry.entry_id for r in ranked] == ["most-tokens", "fewer-prompts", "whole-prompts"]  # the rule before


def test_entries_whose_intervals_overlap_share_a_rank_and_the_board_says_so(tmp_path):
    """0.988 against 0.992 on 25 prompts is one token in 250: the board cannot tell them apart. Here,
    on 4 prompts: nothing recovered and everything recovered are told apart; two entries a prompt apart
    are not."""
    board = board_of(tmp_path, make_entry("Nothing", em=0.0), make_entry("Everything", em=1.0),
                     make_entry("Three quarters", em=0.75))
    assert [(r.rank_text, r.entry.entry_id) for r in board.ranked] == [("1", "nothing"), ("=2", "three-quarters"),
                                                                        ("=2", "everything")]
    nothing, three, every = (r.entry.intervals for r in board.ranked)
    assert nothing.worst_token_accuracy == (0.0, 0.0) and every.worst_token_accuracy == (1.0, 1.0)
    assert three.worst_token_accuracy == (0.25, 1.0)  # percentile bootstrap of 4 prompts: 1, 1, 1, 0
    assert three.worst_exact_match == pytest.approx((0.1941204497, 0.9936905368), abs=1e-9)  # Clopper-Pearson, 3 of 4
    markdown = render_markdown(board)
    assert "| =2 | [Three quarters]" in markdown and "share a rank" in markdown
    assert "0.750 \\[0.250, 1.000\\]" in markdown


def test_every_protocol_ranks_by_what_leaks_and_quick_is_version_2():
    from invbench.leaderboard import RANKINGS
    from invbench.protocols import PROTOCOLS

    assert {PROTOCOLS[name].ranking for name in PROTOCOLS} == {"worst-case-token-accuracy"} <= set(RANKINGS)
    assert QUICK.version == 3 and QUICK.to_dict()["version"] == 3
    assert "worst-case-exact-match" in RANKINGS  # the archived boards' rule


def test_the_board_says_its_rule_and_marks_the_pareto_frontier_of_token_accuracy(tmp_path):
    """Whole prompts (exact match 0.5, token accuracy 0.6) and partial leaks (exact match 0, token
    accuracy 0.9) at the same utility: by token accuracy only the first is on the frontier."""
    board = board_of(tmp_path, make_entry("Partial", em=0.0, tok={a: 0.9 for a in QUICK.attacks}),
                     make_entry("Whole", em=0.5, tok={a: 0.6 for a in QUICK.attacks}))
    assert {r.entry.entry_id: r.pareto for r in board.ranked} == {"whole": True, "partial": False}
    entries = [r.entry for r in board.ranked]
    assert pareto_frontier(entries, "worst_exact_match") == {"partial"}
    markdown = render_markdown(board)
    assert "Ranked by what leaks: worst-case token accuracy" in markdown
    assert "then worst-case exact match" in markdown
    assert "Pareto frontier of worst-case token accuracy against top-1 agreement" in markdown


def test_ranked_by_worst_case_over_attacks(tmp_path):
    board = board_of(tmp_path,
                     make_entry("Strong on average", em={"guided": 0.0, "continuous": 0.0, "projection": 0.0, "scan": 1.0}),
                     make_entry("Even", em={"guided": 0.25, "continuous": 0.25, "projection": 0.25, "scan": 0.25}),
                     make_entry("Weak", em=0.5))
    assert [r.entry.entry_id for r in board.ranked] == ["even", "weak", "strong-on-average"]
    assert board.ranked[2].entry.worst_attack == "scan"


def test_an_inconclusive_entry_never_outranks_a_conclusive_one(tmp_path):
    """No attack recovers anything from "Masked", but its misses are search failures: its zero is no
    evidence, so it ranks below a defence that leaks a little, conclusively."""
    masked = make_entry("Masked", em=0.0, search_failure=0.75)
    assert masked["summary"]["verdict"]["verdict"] == "inconclusive"
    board = board_of(tmp_path, masked, make_entry("Leaky", em=0.25), make_entry("Private", em=0.0))
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
    return [make_entry(XSS_NAME, entry_id="xss-name", defense="my-plugin", params={"p": "a|b`c`<i>", "q": XSS_DEFENCE},
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
    assert "&lt;img src=x onerror=alert\\(1\\)&gt;" in markdown  # the defence's parameters are on the page
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
    assert 'href="entries/xss-name.html"' in page  # the submitter's link is on the entry's page
    assert 'href="https://example.org/x?a=1&amp;b=2"' in (tmp_path / "quick" / "entries" / "xss-name.html").read_text()
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


# --- the guarantee's kind ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, params, cell, sentence", [
    ("laplace", {"clip": 1.0, "epsilon": 8.0}, "8 (ε-DP per vector)", "epsilon 8 per vector (epsilon-DP, delta 0), 24 per prompt"),
    ("dp", {"clip": 20.0, "noise_multiplier": 0.5}, "24.4 ((ε, δ)-DP per vector, δ 1e-05)",
     "epsilon 24.4 per vector at delta 1e-05 ((epsilon, delta)-DP), 52.8 per prompt"),
    ("dchi", {"epsilon": 2880.0}, "2880 per unit L2 (metric DP)",
     "epsilon 2880 per unit of L2 distance between states (metric DP), 2880 per unit of a prompt's summed L2 distance"),
    ("gaussian", {"sigma": 1.0}, "-", ""),
])
def test_the_guarantee_says_its_kind_on_the_board_and_in_the_cli(name, params, cell, sentence):
    """Before: the CLI printed every epsilon as 'per vector at delta D', which is wrong for dchi's metric DP."""
    from invbench.run_cli import format_defense
    from invbench.defenses import make_defense
    from invbench.defenses.checks import described
    from invbench.metrics import json_safe
    from invbench.summary import Guarantee

    defense = json_safe(described(make_defense(name, params), tokens=QUICK.tokens))  # as a summary holds it
    guarantee = Guarantee.of(defense)
    assert (guarantee.cell(), guarantee.sentence()) == (cell, sentence)
    assert (sentence in format_defense(defense)) and ("per vector at delta" in format_defense(defense)) == (name == "dp")


def test_the_epsilon_column_shows_the_kind(tmp_path):
    from invbench.defenses import make_defense
    from invbench.defenses.checks import described
    from invbench.metrics import json_safe

    entry = make_entry("Laplace 8", defense="laplace", params={"clip": 1.0, "epsilon": 8.0})
    entry["summary"]["defense"] = json_safe(described(make_defense("laplace", {"clip": 1.0, "epsilon": 8.0}),
                                                      tokens=QUICK.tokens))
    board = board_of(tmp_path, entry)
    assert "| 8 \\(ε-DP per vector\\) |" in render_markdown(board)


# --- each entry's page ---------------------------------------------------------------------------------

HOSTILE_TOKEN = "<script>window.pwned=1</script>"


def hostile_transcript() -> Transcript:
    """Prompt 0's tokens hold markup, quotes, an ampersand and control characters; the attacks get
    the second token wrong ('<b>bold</b>' instead of the quote)."""
    texts = [HOSTILE_TOKEN, ' "q" & \'a\'', "\x00\n\u202e"]
    prompts = []
    for i, target in enumerate(quick_targets()):
        recovered = [target[0], target[1] + 1, target[2]]
        shown = [texts[0], "<b>bold</b>", texts[2]]
        prompts.append(PromptText(i, list(target), texts, {a: Recovered(recovered, shown, False, 2 / 3, 0.5, False)
                                                            for a in QUICK.attacks}))
    return Transcript(prompts)


HOSTILE_FIGURES = dict(em=0.0, tok={a: 2 / 3 for a in QUICK.attacks})  # what hostile_transcript's prompts show


def test_each_entry_gets_a_page_linked_from_the_board(tmp_path):
    write_entry(tmp_path, make_entry("Page one", url="https://example.org/paper", authors="B. Builder & Co"))
    result = render(tmp_path / "quick")
    page = tmp_path / "quick" / "entries" / "page-one.html"
    assert result.pages == [page]
    assert "[Page one](entries/page-one.html)" in result.markdown.read_text()
    assert '<a href="entries/page-one.html"' in result.html.read_text()
    assert "Authors" not in result.markdown.read_text()  # the column was empty on every row; the page says who
    html = page.read_text()
    assert "B. Builder &amp; Co" in html and 'href="https://example.org/paper"' in html
    for shown in ("Submitted by", "Guarantee", "Verdict", "Verified", "not verified", "gaussian (sigma=0.01)",
                  'href="../index.html"'):
        assert shown in html, shown
    wrong = sum(len(p["target_ids"]) - round(a["token_accuracy"] * len(p["target_ids"]))
                for p in make_entry("Page one")["transcript"]["prompts"] for a in p["attacks"].values())
    assert html.split("What leaked")[1].count('<mark class="tok">') == wrong + 1 > 1  # each wrong one, and the legend
    first = make_entry("Page one")["transcript"]["prompts"][0]["target_ids"][0]
    assert f'<span class="tok"> tok{first}</span>' in html
    assert "script-src" not in html and "<script" not in html  # the page has no script at all


def test_the_page_cites_the_defences_own_paper_and_says_when_there_is_none(tmp_path):
    from invbench.derived import recomputed_defense

    cited = make_entry("Metric DP", defense="dchi", params={"epsilon": 500.0, "dim": 576})
    cited["summary"]["defense"].update(recomputed_defense(cited["summary"]["defense"], tokens=QUICK.tokens))
    write_entry(tmp_path, cited)
    write_entry(tmp_path, make_entry("Plain noise"))
    render(tmp_path / "quick")
    pages = tmp_path / "quick" / "entries"
    assert "Feyisetan, Balle, Drake and Diethe" in (pages / "metric-dp.html").read_text()  # DChi.citation
    assert "none recorded" in (pages / "plain-noise.html").read_text()  # gaussian: invbench's own, no paper


def test_a_page_of_an_entry_that_left_the_board_is_removed(tmp_path):
    path = write_entry(tmp_path, make_entry("Gone soon"))
    render(tmp_path / "quick")
    path.unlink()
    render(tmp_path / "quick")
    assert list((tmp_path / "quick" / "entries").glob("*.html")) == []


def test_the_entry_page_escapes_token_text(tmp_path):
    write_entry(tmp_path, make_entry(XSS_NAME, entry_id="xss", transcript=hostile_transcript(), **HOSTILE_FIGURES))
    html = render(tmp_path / "quick").pages[0].read_text()
    assert HOSTILE_TOKEN not in html and "<b>bold" not in html and XSS_NAME not in html
    assert '<span class="tok">&lt;script&gt;window.pwned=1&lt;/script&gt;</span>' in html
    assert '<mark class="tok">&lt;b&gt;bold&lt;/b&gt;</mark>' in html  # wrong, and text
    assert "&#34;q&#34; &amp; &#39;a&#39;" in html
    assert "\\x00\\n\\u202e" in html and "\x00" not in html and "\u202e" not in html  # control characters as escapes


def test_an_entry_without_its_records_still_gets_a_page_that_says_so(tmp_path):
    entry = make_entry("Schema three")
    entry["schema_version"] = 3
    del entry["transcript"]
    write_entry(tmp_path, entry)
    result = render(tmp_path / "quick")
    assert result.board.problems == []
    html = result.pages[0].read_text()
    assert 'id="no-transcript"' in html and "entry schema 3" in html and "<mark" not in html.split("What leaked")[1]


@pytest.mark.parametrize("tamper, field, message", [
    (lambda t: t["prompts"][3]["attacks"]["scan"].update(exact_match=True), "transcript.prompts[3].attacks.scan.exact_match",
     "does not follow from the ids"),
    (lambda t: t["prompts"][3]["attacks"]["guided"].update(token_accuracy=1.0),
     "transcript.prompts[3].attacks.guided.token_accuracy", "does not follow from the ids"),
    (lambda t: t["prompts"][0]["target_tokens"].pop(), "transcript.prompts[0].target_tokens", "one text per target id"),
    (lambda t: t["prompts"][0]["attacks"].pop("scan"), "transcript.prompts[0].attacks", "the summary's attacks"),
    (lambda t: t["prompts"].pop(), "transcript.prompts", "the summary's n is 4"),
    (lambda t: t["prompts"][0]["attacks"]["scan"].update(recovered_ids=[]), "transcript.prompts[0].attacks.scan.recovered_ids",
     "non-empty list of token ids"),
    (lambda t: t["prompts"][0].update(extra=1), "transcript.prompts[0]", ""),
])
def test_a_transcript_that_disagrees_with_its_ids_or_summary_is_refused(tmp_path, tamper, field, message):
    entry = make_entry("Tampered text")
    tamper(entry["transcript"])
    _, problems = load_entries(write_entry(tmp_path, entry).parent)
    assert any(p.field == field and message in p.message for p in problems), problems


def test_a_schema_4_entry_must_carry_its_transcript(tmp_path):
    entry = make_entry("No text")
    del entry["transcript"]
    _, problems = load_entries(write_entry(tmp_path, entry).parent)
    assert [(p.field, p.message) for p in problems] == [("transcript", "missing")]


# --- curves drawn from a board's entries ---------------------------------------------------------------

def test_a_curve_is_drawn_from_a_boards_entries_one_point_per_entry_of_the_defence(tmp_path):
    from click.testing import CliRunner

    from invbench.cli import cli
    from invbench.curves import CurveError, curve_from_entries, load_curve

    for sigma, em in ((10, 0.0), (0.3, 0.5), (3, 0.25), (0.01, 1.0)):
        write_entry(tmp_path, make_entry(f"Gaussian {sigma}", em=em, top1=max(0.0, 1 - sigma), params={"sigma": sigma}))
    write_entry(tmp_path, make_entry("Quantize", em=1.0, defense="quantize", params={"bits": 8}))
    entries, problems = load_entries(tmp_path / "quick")
    assert not problems

    curve = curve_from_entries(entries, "gaussian")
    # by value, not by text ("10" sorts before "3"); the quantize entry is not on it
    assert [p.params for p in curve.points] == [{"sigma": 0.01}, {"sigma": 0.3}, {"sigma": 3}, {"sigma": 10}]
    assert [p.worst_case_exact_match for p in curve.points] == [1.0, 0.5, 0.25, 0.0]
    assert curve.points[1].worst_case_exact_match_interval == pytest.approx([0.0675859865, 0.9324140135], abs=1e-9)
    assert [p.worst_case_token_accuracy for p in curve.points][:2] == [1.0, 0.5]  # misses wholly wrong (fake_answers)
    assert [p.top1_agreement for p in curve.points] == [0.99, 0.7, 0.0, 0.0]
    assert curve.grid == {"sigma": [0.01, 0.3, 3, 10]} and curve.protocol == "quick"
    with pytest.raises(CurveError, match="no entry of defence 'dp'"):
        curve_from_entries(entries, "dp")

    result = CliRunner().invoke(cli, ["curve", "--board-dir", str(tmp_path), "--protocol", "quick", "--from-entries",
                                       "--defense", "gaussian", "--out", str(tmp_path / "plot.png")])
    assert result.exit_code == 0, result.output
    saved = sorted((tmp_path / "quick" / "curves").glob("gaussian-*.json"))
    assert len(saved) == 1 and saved[0].with_suffix(".png").is_file() and (tmp_path / "plot.png").is_file()
    assert [p.params for p in load_curve(saved[0]).points] == [{"sigma": 0.01}, {"sigma": 0.3}, {"sigma": 3}, {"sigma": 10}]


def test_the_page_says_what_the_utility_figure_leaves_out(tmp_path):
    """Split-N-Denoise's client-side denoiser is not run: its page says the top-1 agreement is a lower bound."""
    from invbench.derived import recomputed_defense

    entry = make_entry("SnD", defense="snd", params={"eta": 100.0, "dim": 576})
    entry["summary"]["defense"].update(recomputed_defense(entry["summary"]["defense"], tokens=QUICK.tokens))
    write_entry(tmp_path, entry)
    render(tmp_path / "quick")
    page = (tmp_path / "quick" / "entries" / "snd.html").read_text()
    assert "denoiser is not run" in page and "lower bound" in page
