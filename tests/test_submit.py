"""Submitting and verifying entries: the comparison and its tolerances on constructed summaries,
then one end to end run through the command line (`invbench submit`, `leaderboard`, `verify`)."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from helpers import invoke, spy_on_attacks
from invbench.entries import check_entry, load_entries
from invbench.protocols import PROTOCOLS
from invbench.submit import (FULL_PRIVACY_TOL, UTILITY_ABS_TOL, MetricCheck, build_entry, compare, recorded_spec,
                             sampling_margin)
from invbench.metrics import worst_case
from invbench.summary import RunSummary, WorstCase
from test_leaderboard import fake_summary, fake_transcript, make_entry


def by_metric(checks: list[MetricCheck]) -> dict[str, MetricCheck]:
    return {c.metric: c for c in checks}


def rerun_of(em: dict[str, float], *, top1: float = 0.9, **kw) -> RunSummary:
    """A rerun's summary with exactly these exact-match rates (not rounded to what 4 prompts can give: a
    rerun is compared by its figures), its worst case following from them."""
    summary = fake_summary(em={a: 0.5 for a in em}, top1=top1, **kw)
    for attack, value in em.items():
        summary.attacks[attack].exact_match = value
    summary.worst_case = {m: WorstCase(**w) for m, w in worst_case({n: vars(a) for n, a in summary.attacks.items()}).items()}
    return summary


def checks_of(entry: dict, rerun: RunSummary, *, subset: int | None = None) -> dict[str, MetricCheck]:
    """verify's comparison of an entry (as its file holds it) with a rerun's summary."""
    return by_metric(compare(RunSummary.from_dict(entry["summary"]), rerun, subset=subset))


# --- the comparison -----------------------------------------------------------------------------

def test_identical_rerun_passes_every_check():
    entry = make_entry("Same", em=0.5)
    checks = checks_of(entry, fake_summary(em={a: 0.5 for a in entry["summary"]["attacks"]}, top1=0.9))
    assert all(c.ok is not False for c in checks.values())
    assert checks["config_hash"].ok is True and checks["verdict.verdict"].ok is True
    assert checks["attacks.scan.verdict"].ok is True and checks["attacks.scan.search_failure_rate"].ok is True
    assert checks["attacks.scan.seconds_per_token"].ok is None  # shown, never checked


def test_a_difference_beyond_the_tolerance_fails_and_names_the_metric():
    entry = make_entry("Tampered", em=0.5)
    rerun = rerun_of({"guided": 0.5, "continuous": 0.5, "projection": 0.5, "scan": 0.5 + FULL_PRIVACY_TOL + 0.01})
    checks = checks_of(entry, rerun)
    assert checks["attacks.scan.exact_match"].ok is False
    assert checks["worst_case.exact_match.value"].ok is False
    assert checks["attacks.continuous.exact_match"].ok is True


def test_within_tolerance_passes():
    entry = make_entry("Close", em=0.5)
    rerun = rerun_of({a: 0.5 + FULL_PRIVACY_TOL - 0.001 for a in entry["summary"]["attacks"]},
                     top1=0.9 + UTILITY_ABS_TOL / 2)
    assert all(c.ok is not False for c in checks_of(entry, rerun).values())


def test_utility_kl_is_relative_and_full_runs_only():
    entry = make_entry("KL", em=0.5)
    rerun = fake_summary(em={a: 0.5 for a in entry["summary"]["attacks"]}, top1=0.9)
    rerun.utility["kl_clean_defended"] = 0.1 * 1.01  # 1% off: beyond 1e-3 relative
    assert checks_of(entry, rerun)["utility.kl_clean_defended"].ok is False
    subset_check = checks_of(entry, dataclasses.replace(rerun, n=2), subset=2)["utility.kl_clean_defended"]
    assert subset_check.ok is None and "subset" in subset_check.note


def test_subset_tolerance_comes_from_the_rerun_never_from_the_claim():
    """Before: the sampling margin was computed from the entry's claimed value, so an entry of a defence
    where every token leaks, edited to claim worst-case token accuracy 0.25, passed on a subset."""
    forged = make_entry("Forged", em=0.25)
    honest_rerun = rerun_of({a: 1.0 for a in forged["summary"]["attacks"]})
    honest_rerun.n, honest_rerun.config_hash = 2, "fedcba9876543210"
    for attack in honest_rerun.attacks.values():
        attack.n = 2
    checks = checks_of(forged, honest_rerun, subset=2)
    # p = 1 on 2 of 4 prompts: the other 2 can bring the mean down to 0.5 at most, so a claim of 0.25 fails
    assert checks["attacks.scan.exact_match"].tolerance == pytest.approx(FULL_PRIVACY_TOL + 0.5)
    assert checks["attacks.scan.exact_match"].ok is False and checks["worst_case.exact_match.value"].ok is False
    entry = make_entry("Subset", em=0.5)
    rerun = rerun_of({a: 0.5 for a in entry["summary"]["attacks"]})
    rerun.n, rerun.config_hash = 2, "fedcba9876543210"
    for attack in rerun.attacks.values():
        attack.n = 2
    checks = checks_of(entry, rerun, subset=2)
    assert checks["attacks.scan.exact_match"].tolerance == pytest.approx(FULL_PRIVACY_TOL + sampling_margin(0.5, subset=2, n=4))
    assert checks["config_hash"].ok is None and checks["attacks.scan.detector_auroc"].ok is None
    assert checks["attacks.scan.verdict"].ok is None  # a verdict of fewer prompts may differ: shown
    assert checks["n"].ok is True and checks["attacks.scan.n"].ok is True


@pytest.mark.parametrize("field, value", [
    ("attacks.scan.verdict", "protected"), ("verdict.verdict", "inconclusive"),
    ("attacks.scan.search_failure_rate", 1.0), ("attacks.guided.n", 40), ("defense.epsilon", 1.0),
])
def test_a_tampered_verdict_or_rate_fails_verify(field, value):
    """Before: verify compared neither verdicts nor search-failure rates (nor n or epsilon), so an entry
    that claimed protection its run does not show passed."""
    entry = make_entry("Tampered verdict", em=0.5)
    target = entry["summary"]
    *parents, last = field.split(".")
    for key in parents:
        target = target[key]
    target[last] = value
    checks = checks_of(entry, fake_summary(em={a: 0.5 for a in entry["summary"]["attacks"]}, top1=0.9))
    assert checks[field].ok is False
    assert [c.metric for c in checks.values() if c.ok is False] == [field]


def test_a_new_summary_field_is_embedded_and_verified_without_an_edit_here(monkeypatch):
    """What adding one per-attack number takes: its field in AttackSummary (with the line of
    summarise_attack that computes it) and its node in summary.schema.json. submit.py, entries.py and
    the entry schema are untouched: the entry embeds the summary and verify walks the schema."""
    from dataclasses import dataclass

    from invbench import entries, summary

    @dataclass
    class WithLeakRate(summary.AttackSummary):
        leak_rate: float | None = None

    schema = copy.deepcopy(summary.schema())
    schema["$defs"]["attack"]["properties"]["leak_rate"] = {"$ref": "#/$defs/fraction", "x-verify": "fraction"}
    monkeypatch.setattr(summary, "AttackSummary", WithLeakRate)
    monkeypatch.setattr(summary, "schema", lambda: schema)
    entries._validator.cache_clear()  # the entry validator holds the summary schema it refers to
    try:
        def measured(rate: float) -> RunSummary:
            base = fake_summary(em={a: 0.5 for a in PROTOCOLS["quick"].attacks}, top1=0.9).to_dict()
            for attack in base["attacks"].values():
                attack["leak_rate"] = rate
            return RunSummary.from_dict(base)

        entry = build_entry(measured(0.25), protocol=PROTOCOLS["quick"], entry_id="new-field", name="New field",
                            authors="", url="", spec="gaussian", transcript=fake_transcript(PROTOCOLS["quick"].attacks),
                            day="2025-01-02")
        assert entry["summary"]["attacks"]["scan"]["leak_rate"] == 0.25
        assert check_entry(json.loads(json.dumps(entry)), Path("quick/new-field.json"), protocol_dir_name="quick") == []
        assert checks_of(entry, measured(0.25))["attacks.scan.leak_rate"].ok is True
        assert checks_of(entry, measured(0.9))["attacks.scan.leak_rate"].ok is False
    finally:
        entries._validator.cache_clear()


def test_sampling_margin():
    # at p = 0 or 1 the plug-in margin is 0; Wilson's farther side is z^2 / (N' + z^2), N' = N (n - 1) / (n - N):
    # 2 flagged of 25 must pass a subset of 11 with none (it misses both with probability 0.30)
    assert sampling_margin(0.0, subset=11, n=25) == pytest.approx(9 / (11 * 24 / 14 + 9))  # 0.323
    assert sampling_margin(1.0, subset=11, n=25) == pytest.approx(9 / (11 * 24 / 14 + 9))
    assert sampling_margin(0.0, subset=1, n=100) == pytest.approx(9 / 10)
    assert sampling_margin(-1.0, subset=11, n=25, lo=-1.0, hi=1.0) == pytest.approx(2 * 9 / (11 * 24 / 14 + 9))
    assert sampling_margin(1.0, subset=2, n=4) == pytest.approx(0.5)  # the 2 unseen of 4 move the mean by 0.5 at most
    assert sampling_margin(0.5, subset=4, n=4) == 0  # the whole population
    assert sampling_margin(0.5, subset=1, n=4) == pytest.approx(0.375)  # 3 sigma is 1.5; 3 unseen of 4 move it 0.375
    assert sampling_margin(0.5, subset=25, n=100) == pytest.approx(3 * 0.5 / 5 * (75 / 99) ** 0.5)


def test_auroc_defined_in_one_run_only_is_shown_not_failed():
    entry = make_entry("Auroc", em=0.5)
    rerun = fake_summary(em={a: 0.5 for a in entry["summary"]["attacks"]}, top1=0.9, auroc=None)
    check = checks_of(entry, rerun)["attacks.scan.detector_auroc"]
    assert check.ok is None and "undefined" in check.note


def test_a_different_config_hash_fails_a_full_verification():
    entry = make_entry("Hash", em=0.5)
    rerun = fake_summary(em={a: 0.5 for a in entry["summary"]["attacks"]}, top1=0.9)
    rerun.config_hash = "fedcba9876543210"
    assert checks_of(entry, rerun)["config_hash"].ok is False


def test_plug_in_files_are_recorded_by_base_name():
    assert recorded_spec("/home/me/secret/defs/my_def.py:MyDefense") == "my_def.py:MyDefense"
    assert recorded_spec("topk") == "topk"


# --- end to end ---------------------------------------------------------------------------------

@pytest.fixture
def small_quick(monkeypatch):
    """The quick protocol cut to one attack of 30 steps on 2 prompts x 2 tokens of tiny-bytes (tiny-gpt2 over a
    257-token vocabulary), so the test takes seconds rather than minutes: the machinery is the same for the full
    protocol."""
    small = dataclasses.replace(PROTOCOLS["quick"], model="tiny-bytes", attacks=("continuous",), n=2, tokens=2,
                                attack_options={"steps": 30}, prompts_sha256=None)
    with PROTOCOLS.override("quick", small):
        yield small


def submit_args(tmp_path, *extra):
    return ["submit", "--defense", "topk", "--param", "k=32", "--protocol", "quick", "--name", "Top-k 32",
            "--authors", "Test Author", "--url", "https://example.org/topk", "--device", "cpu",
            "--runs-dir", str(tmp_path / "runs"), "--board-dir", str(tmp_path / "leaderboards"), *extra]


def test_submit_leaderboard_verify_end_to_end(tmp_path, capsys, monkeypatch, small_quick):
    code, out, err = invoke(submit_args(tmp_path), capsys)
    assert code == 0, err
    path = tmp_path / "leaderboards" / "quick" / "top-k-32.json"
    assert f"entry: {path}" in out
    entries, problems = load_entries(path.parent)
    assert problems == [] and [e.entry_id for e in entries] == ["top-k-32"]
    entry = json.loads(path.read_text())
    summary = entry["summary"]  # the run's summary.json, embedded as it is
    assert summary == json.loads((tmp_path / "runs" / "quick" / "top-k-32" / "summary.json").read_text())
    assert summary["defense"]["name"] == "topk" and summary["defense"]["params"] == {"k": 32, "sigma": 0.0}
    assert entry["protocol"]["name"] == "quick" and summary["n"] == 2 and set(summary["attacks"]) == {"continuous"}
    assert summary["device"].startswith("cpu") and summary["versions"]["torch"] and entry["defense_spec"] == "topk"
    assert (tmp_path / "runs" / "quick" / "top-k-32" / "records.jsonl").exists()
    records = [json.loads(line) for line in (tmp_path / "runs" / "quick" / "top-k-32" / "records.jsonl").open()]
    transcript = entry["transcript"]  # what the attack recovered of each prompt, with the tokens' text
    assert entry["schema_version"] == 5 and [p["prompt_index"] for p in transcript["prompts"]] == [0, 1]
    for prompt, rec in zip(transcript["prompts"], sorted(records, key=lambda r: r["prompt_index"])):
        answer = prompt["attacks"]["continuous"]
        assert prompt["target_ids"] == rec["target_ids"] and answer["recovered_ids"] == rec["recovered_ids"]
        assert "".join(prompt["target_tokens"]) == rec["text"]  # GPT-2's tokens, decoded one by one
        assert "".join(answer["recovered_tokens"]) == rec["recovered_text"]
        assert (answer["exact_match"], answer["token_accuracy"]) == (rec["exact_match"], rec["token_accuracy"])

    # a rerun of the same submission resumes: nothing is attacked again, and the entry file is left as it was
    # (rewritten, its date and timing would change and void a verification record made of it)
    before = path.read_bytes()
    attacked = spy_on_attacks(monkeypatch)
    code, _, err = invoke(submit_args(tmp_path), capsys)
    assert code == 0 and attacked == []
    assert path.read_bytes() == before and "already holds these results: left as it is" in err

    code, out, err = invoke(["leaderboard", "--board-dir", str(tmp_path / "leaderboards")], capsys)
    assert code == 0, err
    assert "quick: 1 ranked" in out
    board = (path.parent / "LEADERBOARD.md").read_text()
    assert "| 1 | [Top-k 32](entries/top-k-32.html) | " in board
    assert 'data-entry-id="top-k-32"' in (path.parent / "index.html").read_text()
    page = (path.parent / "entries" / "top-k-32.html").read_text()
    assert "Test Author" in page and 'href="https://example.org/topk"' in page and 'id="prompt-1"' in page

    code, out, err = invoke(["verify", str(path), "--device", "cpu", "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 0, out + err
    assert "verification PASSED" in out and "config_hash" in out and "hardware: entry cpu" in out
    assert f"git commit: entry {entry['git_commit'] or '-'}; rerun {entry['git_commit'] or '-'}" in out
    record = json.loads((path.parent / "top-k-32.verification.json").read_text())  # beside the entry
    assert record["result"] == "passed" and record["failed"] == [] and record["prompts"] == record["of"] == 2
    assert record["entry_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["command"] == f"invbench verify {path} --device=cpu" and record["versions"]["torch"]
    assert f"verification record: {path.parent / 'top-k-32.verification.json'}" in out
    code, out, err = invoke(["leaderboard", "--board-dir", str(tmp_path / "leaderboards")], capsys)
    assert code == 0 and "quick: 1 ranked" in out and "problem" in out and "0 problem(s)" in out  # not an entry
    board = (path.parent / "LEADERBOARD.md").read_text()
    assert "| yes \\(2/2\\) |" in board and "Verified: 1 of 1 entries." in board
    assert "yes (2/2)" in (path.parent / "index.html").read_text()
    assert "verified (2 of 2 prompts, " in (path.parent / "entries" / "top-k-32.html").read_text()
    path.write_text(json.dumps(entry, indent=1))  # the same data, another file: no longer the file verified
    assert invoke(["leaderboard", "--board-dir", str(tmp_path / "leaderboards")], capsys)[0] == 0
    assert "| changed since |" in (path.parent / "LEADERBOARD.md").read_text()

    tampered = copy.deepcopy(entry)  # claims an exact match its own prompts do not show: refused on read
    claimed = summary["attacks"]["continuous"]["exact_match"]
    tampered["summary"]["attacks"]["continuous"]["exact_match"] = 0.0 if claimed >= 0.5 else 1.0
    tampered["summary"]["worst_case"]["exact_match"]["value"] = 0.0 if claimed >= 0.5 else 1.0
    path.write_text(json.dumps(tampered))
    code, out, err = invoke(["verify", str(path), "--device", "cpu", "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 2 and "is not the mean of the transcript's per-prompt exact_match" in err

    tampered = copy.deepcopy(entry)  # a verdict the run does not give, consistent with the run's verdict
    other = {"leaks": "protected", "protected": "leaks", "inconclusive": "protected"}[summary["verdict"]["verdict"]]
    tampered["summary"]["attacks"]["continuous"]["verdict"] = tampered["summary"]["verdict"]["verdict"] = other
    path.write_text(json.dumps(tampered))
    code, out, err = invoke(["verify", str(path), "--device", "cpu", "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 2 and "field summary.attacks.continuous.verdict" in err and "does not follow" in err  # on read

    path.write_text(json.dumps(entry))
    code, out, _ = invoke(["verify", str(path), "--subset", "1", "--device", "cpu",
                           "--runs-dir", str(tmp_path / "runs")], capsys)
    assert "random 1 of 2 prompts, seed " in out and code == 0
    record = json.loads((path.parent / "top-k-32.verification.json").read_text())
    assert record["prompts"] == 1 and record["required"] == 2 and isinstance(record["seed"], int)
    code, _, _ = invoke(["leaderboard", "--board-dir", str(tmp_path / "leaderboards")], capsys)
    assert "| partly \\(1/2\\) |" in (path.parent / "LEADERBOARD.md").read_text()  # fewer than the rule needs


@pytest.mark.parametrize("extra, message", [
    (["--entry-id", "../escape"], "looks like a path"),
    (["--entry-id", "Not A Slug"], "not a slug"),
    (["--param", "nope=1"], "has no parameter 'nope'"),
])
def test_submit_errors_are_one_line_exit_2(tmp_path, capsys, small_quick, extra, message):
    code, _, err = invoke(submit_args(tmp_path, *extra), capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # refused before any run


def test_unknown_protocol_is_a_usage_error(tmp_path, capsys):
    args = submit_args(tmp_path)
    args[args.index("quick")] = "no-such-protocol"
    code, _, err = invoke(args, capsys)
    assert code == 2 and "unknown protocol" in err


def test_an_entry_id_taken_by_another_defense_is_refused(tmp_path, capsys, small_quick):
    other = make_entry("Top-k 32", em=0.5, defense="gaussian")
    other["protocol"] = json.loads(json.dumps(small_quick.to_dict()))
    target = tmp_path / "leaderboards" / "quick" / "top-k-32.json"
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps(other))
    code, _, err = invoke(submit_args(tmp_path), capsys)
    assert code == 2 and "already holds a different submission" in err
    assert json.loads(target.read_text()) == other


def test_verify_refuses_a_malformed_entry_and_a_bad_subset(tmp_path, capsys):
    entry = make_entry("Verify me", em=0.5)
    path = tmp_path / "quick" / "verify-me.json"
    path.parent.mkdir()
    path.write_text(json.dumps(entry))
    code, _, err = invoke(["verify", str(path), "--subset", "9", "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 2 and "--subset must be between 1 and the entry's 4 prompts" in err
    entry["summary"]["attacks"]["scan"]["exact_match"] = 3
    path.write_text(json.dumps(entry))
    code, _, err = invoke(["verify", str(path), "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 2 and "field summary.attacks.scan.exact_match" in err and len(err.strip().splitlines()) == 1


def test_plug_in_file_entries_need_the_file_to_verify(tmp_path, capsys):
    entry = make_entry("From a file", em=0.5, defense="my-defence", params={"strength": 0.5})
    entry["defense_spec"] = "my_def.py:MyDefense"
    path = tmp_path / "quick" / "from-a-file.json"
    path.parent.mkdir()
    path.write_text(json.dumps(entry))
    code, _, err = invoke(["verify", str(path), "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 2 and "pass --defense path/to/my_def.py:MyDefense" in err


def test_protocols_lists_every_protocol(capsys):
    code, out, _ = invoke(["protocols"], capsys)
    assert code == 0 and all(name in out for name in PROTOCOLS)


def test_leaderboard_refuses_path_like_protocols(tmp_path, capsys):
    code, _, err = invoke(["leaderboard", "--protocol", "../x", "--board-dir", str(tmp_path)], capsys)
    assert code == 2 and "error:" in err


@pytest.mark.parametrize("option, value, message", [
    ("--url", "javascript:alert(1)", "--url: expected an http(s) URL"),
    ("--name", "two\nlines", "--name: expected one line of text"),
])
def test_bad_submission_fields_are_refused_before_the_run(tmp_path, capsys, small_quick, option, value, message):
    args = submit_args(tmp_path)
    args[args.index(option) + 1] = value
    code, _, err = invoke(args, capsys)
    assert code == 2 and message in err
    assert not (tmp_path / "runs").exists()


def test_verify_refuses_an_entry_made_under_another_protocol_definition(tmp_path, capsys):
    entry = make_entry("Old protocol", em=0.5)
    entry["protocol"]["n"] = 400  # the protocol's definition changed since this entry was made
    path = tmp_path / "quick" / "old-protocol.json"
    path.parent.mkdir()
    path.write_text(json.dumps(entry))
    code, _, err = invoke(["verify", str(path), "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 2 and "differs from the current definition of 'quick'" in err
    assert not (tmp_path / "runs").exists()  # refused before any rerun


# --- issue 26: every defence verifiable, derived values recomputed on read, tampering caught -------

BUILT_IN = [("none", {}), ("gaussian", {"sigma": 0.5}), ("dp", {"clip": 20.0, "noise_multiplier": 0.5}),
            ("dp", {"clip": 1.0, "epsilon": 8.0, "delta": 1e-5}), ("quantize", {"bits": 3}), ("topk", {"k": 32}),
            ("dchi", {"epsilon": 2.0}), ("dchi", {"relative_epsilon": 0.01, "dim": 128, "clip": 5.0}),
            ("laplace", {"clip": 10.0, "epsilon": 4.0})]


def entry_of_defense(name: str, params: dict, *, spec: str | None = None) -> dict:
    """An entry whose defence record is what a run of this defence writes (describe and guarantee)."""
    from invbench.defenses import make_defense
    from invbench.defenses.checks import described
    from invbench.metrics import json_safe

    summary = fake_summary(em={a: 0.5 for a in PROTOCOLS["quick"].attacks}, top1=0.9).to_dict()
    summary["defense"] = json_safe(described(make_defense(name, params), tokens=PROTOCOLS["quick"].tokens))
    return build_entry(RunSummary.from_dict(summary), protocol=PROTOCOLS["quick"], entry_id="e", name="E",
                       authors="", url="", spec=spec or name, transcript=fake_transcript(PROTOCOLS["quick"].attacks),
                       day="2025-01-02")


@pytest.mark.parametrize("name, params", BUILT_IN, ids=[f"{n}-{'-'.join(p)}" for n, p in BUILT_IN])
def test_every_built_in_defence_passes_the_checks_on_read_and_verify_identity(name, params):
    """Before: verify compared the whole describe() with the entry's name and parameters, so no dp
    entry (whose description derives the noise std) could pass."""
    from invbench.submit import check_defense_identity

    entry = json.loads(json.dumps(entry_of_defense(name, params)))
    assert check_entry(entry, Path("quick/e.json"), protocol_dir_name="quick") == []
    check_defense_identity(entry["summary"]["defense"], name)  # raises on a mismatch


def test_verify_refuses_a_defence_that_is_not_the_entrys():
    from invbench.submit import SubmitError, check_defense_identity

    recorded = entry_of_defense("gaussian", {"sigma": 0.5})["summary"]["defense"]
    with pytest.raises(SubmitError, match="the entry's is"):
        check_defense_identity(recorded, "topk")  # takes sigma too, but is another defence


def problems_of(entry: dict) -> dict[str, str]:
    path = Path(f"quick/{entry['entry_id']}.json")
    return {p.field: p.message for p in check_entry(json.loads(json.dumps(entry)), path, protocol_dir_name="quick")}


def test_a_guarantee_that_the_defence_does_not_give_is_refused_on_read():
    """Before: `none` given epsilon 1.0 and delta 1e-5 passed verify, and the board printed a DP
    guarantee that does not exist."""
    entry = entry_of_defense("none", {})
    entry["summary"]["defense"].update(epsilon=1.0, delta=1e-5)
    found = problems_of(entry)
    assert set(found) == {"summary.defense.epsilon", "summary.defense.delta"}
    assert "1.0 is not what defence 'none' with {} gives (None; recomputed from its parameters)" in found[
        "summary.defense.epsilon"]


@pytest.mark.parametrize("key, value", [("epsilon", 1.0), ("epsilon_per_prompt", 2.0), ("kind", "epsilon-DP")])
def test_a_dp_guarantee_is_recomputed_from_its_parameters(key, value):
    entry = entry_of_defense("dp", {"clip": 20.0, "noise_multiplier": 0.5})
    entry["summary"]["defense"][key] = value
    assert list(problems_of(entry)) == [f"summary.defense.{key}"]


def test_parameters_the_defence_refuses_are_refused_on_read():
    entry = entry_of_defense("gaussian", {"sigma": 0.5})
    entry["summary"]["defense"]["params"]["sigma"] = -1.0
    assert "refuses these parameters" in problems_of(entry)["summary.defense.params"]


def test_a_plug_in_files_guarantee_is_shown_as_submitted_and_said_so():
    """Plug-in files are not run when an entry is read: the guarantee cannot be recomputed, and the
    board says so rather than pretend. A plug-in file may not borrow a built-in's name (and with it the
    built-in's citation and recomputed guarantee)."""
    from invbench.derived import guarantee_note

    entry = entry_of_defense("gaussian", {"sigma": 0.5}, spec="my_defense.py:MyDefense")
    assert "a plug-in cannot take a built-in's name" in problems_of(entry)["summary.defense.name"]
    entry["summary"]["defense"].update(name="my-scale", epsilon=1.0, delta=1e-5)
    assert problems_of(entry) == {}
    assert "plug-in file (my_defense.py:MyDefense)" in guarantee_note(entry["summary"]["defense"], entry["defense_spec"])


def leaking_entry() -> dict:
    return make_entry("Leaks", em=1.0)


@pytest.mark.parametrize("tamper, field", [
    # a per-attack verdict changed from leaks to protected at exact match 1.0 (the run's verdict too)
    (lambda s: (s["attacks"]["scan"].update(verdict="protected"), None), "summary.attacks.scan.verdict"),
    (lambda s: s["attacks"]["guided"].update(n=40), "summary.attacks.guided.n"),
    (lambda s: s["attacks"]["continuous"].update(search_failure_rate=1.0, exact_match=0.0, token_accuracy=0.0,
                                                 verdict="leaks"), "summary.attacks.continuous.verdict"),
])
def test_a_verdict_or_n_that_does_not_follow_is_refused_on_read(tamper, field):
    entry = leaking_entry()
    tamper(entry["summary"])
    assert field in problems_of(entry)


def test_a_protected_claim_at_exact_match_one_is_refused_even_when_consistent_with_the_runs_verdict():
    entry = make_entry("All protected", em=1.0)
    for attack in entry["summary"]["attacks"].values():
        attack["verdict"] = "protected"
    entry["summary"]["verdict"]["verdict"] = "protected"
    found = problems_of(entry)
    assert all(f"summary.attacks.{a}.verdict" in found for a in entry["summary"]["attacks"])
    assert "the rule gives 'leaks'" in found["summary.attacks.scan.verdict"]


def with_radius(entry: dict) -> dict:
    from invbench import radius

    per_prompt = radius.prompt_radii([2.0, 3.0, 4.0, 5.0], [None] * 4, dim=128, tokens=3)
    for i, p in enumerate(per_prompt):
        p["prompt_index"] = i
    entry["summary"]["radius"] = radius.summarise_radii(per_prompt, dim=128, tokens=3)
    return entry


def test_a_radius_that_does_not_follow_from_its_gaps_is_refused_on_read():
    """Before: a changed certified radius passed `verify --subset` (the radius is checked on full reruns only)."""
    entry = with_radius(make_entry("Radius", em=0.5))
    assert problems_of(entry) == {}
    entry["summary"]["radius"]["min_sigma_certified"] *= 2
    assert list(problems_of(entry)) == ["summary.radius.min_sigma_certified"]
    entry = with_radius(make_entry("Radius", em=0.5))
    entry["summary"]["radius"]["per_prompt"][0]["radius"] = 0.5
    assert "summary.radius.per_prompt[0].radius" in problems_of(entry)


def test_each_prompts_radius_is_compared_on_a_subset_too():
    """The gaps of a subset's prompts are the entry's for those prompts: a tampered gap fails even
    `verify --subset`."""
    entry = with_radius(make_entry("Radius", em=0.5))
    rerun = RunSummary.from_dict(with_radius(make_entry("Radius", em=0.5))["summary"])
    rerun.radius["per_prompt"] = rerun.radius["per_prompt"][:2]
    for attack in rerun.attacks.values():
        attack.n = 2
    rerun.n = 2
    checks = checks_of(entry, rerun, subset=2)
    assert checks["radius.per_prompt"].ok is True and "2 prompts' radii" in checks["radius.per_prompt"].note
    entry["summary"]["radius"]["per_prompt"][1]["first_position_gap"] = 3.5  # the gap itself made up...
    entry["summary"]["radius"]["per_prompt"][1]["radius"] = 1.75  # ...and the numbers made to follow from it
    checks = checks_of(entry, rerun, subset=2)
    assert checks["radius.per_prompt"].ok is False and "prompt 1" in checks["radius.per_prompt"].note


def test_a_tampered_blind_guess_fails_verify():
    entry = make_entry("Blind", em=0.5)
    entry["summary"]["verdict"]["blind_token_accuracy"] = 0.9
    checks = checks_of(entry, fake_summary(em={a: 0.5 for a in entry["summary"]["attacks"]}, top1=0.9))
    assert checks["verdict.blind_token_accuracy"].ok is False


def test_a_dp_entry_and_a_plug_in_file_entry_pass_verify(tmp_path, capsys, small_quick):
    """Before: no dp entry could pass verify (the shipped ones included)."""
    plugin = Path(__file__).parent / "plugins" / "my_defense.py"
    for defense, params, name in (("dp", ["--clip", "20", "--noise-multiplier", "0.5"], "DP"),
                                  (f"{plugin}:Scale", ["--param", "factor=0.5"], "Scale")):
        args = submit_args(tmp_path)
        args[args.index("topk"):args.index("k=32") + 1] = [defense, *params]
        args[args.index("Top-k 32")] = name
        code, out, err = invoke(args, capsys)
        assert code == 0, err
        entry = tmp_path / "leaderboards" / "quick" / f"{name.lower()}.json"
        extra = ["--defense", f"{plugin}:Scale"] if name == "Scale" else []
        code, out, err = invoke(["verify", str(entry), "--device", "cpu", "--runs-dir", str(tmp_path / "runs"),
                                 *extra], capsys)
        assert code == 0 and "verification PASSED" in out, out + err
    record = json.loads((tmp_path / "leaderboards" / "quick" / "scale.verification.json").read_text())
    assert record["command"].endswith("--defense my_defense.py:Scale --device=cpu")  # no local path recorded


def test_a_failed_verification_is_recorded_and_shown(tmp_path, capsys, small_quick):
    assert invoke(submit_args(tmp_path), capsys)[0] == 0
    path = tmp_path / "leaderboards" / "quick" / "top-k-32.json"
    entry = json.loads(path.read_text())
    claim = 0.5 if entry["summary"]["utility"]["top1_agreement"] > 0.7 else 1.0  # consistent: every prompt says it
    entry["summary"]["utility"]["top1_agreement"] = claim
    for prompt in entry["summary"]["utility"]["per_prompt"]:
        prompt["top1_agreement"] = claim
    path.write_text(json.dumps(entry))
    code, out, _ = invoke(["verify", str(path), "--device", "cpu", "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 1 and "verification FAILED: utility.top1_agreement" in out
    record = json.loads((path.parent / "top-k-32.verification.json").read_text())
    assert record["result"] == "failed" and record["failed"][0] == "utility.top1_agreement"
    assert any("top-1 agreement" in failure for failure in record["failed"]), record["failed"]
    assert invoke(["leaderboard", "--board-dir", str(tmp_path / "leaderboards")], capsys)[0] == 0
    assert "| FAILED |" in (path.parent / "LEADERBOARD.md").read_text()
    assert "verification failed" in (path.parent / "entries" / "top-k-32.html").read_text()
    code, out, _ = invoke(["verify", str(path), "--no-record", "--device", "cpu", "--runs-dir", str(tmp_path / "runs")],
                          capsys)
    assert code == 1 and "verification record" not in out


def test_a_malformed_verification_record_is_reported_and_its_entry_not_verified(tmp_path, capsys):
    from test_leaderboard import write_entry

    path = write_entry(tmp_path, make_entry("Claimed", em=0.5))
    record = path.with_name("claimed.verification.json")
    record.write_text("[" * 1000 + "]" * 1000)
    code, out, err = invoke(["leaderboard", "--board-dir", str(tmp_path)], capsys)
    assert code == 0 and "1 ranked" in out and "1 problem(s)" in out
    assert "claimed.verification.json: not a readable verification record (nested deeper than 64 levels)" in err
    record.write_text(json.dumps({"format": "invbench-verification/1", "result": "passed"}))
    code, out, err = invoke(["leaderboard", "--board-dir", str(tmp_path)], capsys)
    assert "claimed.verification.json: field entry: expected" in err
    assert "| no |" in (path.parent / "LEADERBOARD.md").read_text()


def test_a_derived_figure_is_compared_where_both_versions_give_it():
    """A description that gains a figure in a later version keeps older entries valid; a figure
    both give must agree."""
    entry = entry_of_defense("dp", {"clip": 20.0, "noise_multiplier": 0.5})
    del entry["summary"]["defense"]["derived"]["noise_std"]  # as if recorded before noise_std existed
    assert problems_of(entry) == {}
    entry["summary"]["defense"]["derived"]["noise_multiplier"] = 0.05
    assert list(problems_of(entry)) == ["summary.defense.derived"]
