"""The forgeries and holes a hostile submitter found (issue 34), each a test that fails without its fix.

1. verify's tolerance came from the claimed value and its subset was always the first prompts;
2. the transcript was never checked against the summary, the prompts or the tokenizer;
3. verify read whatever was in its run folder;
4. verification records were taken on trust;
5. an edited plug-in was resumed as if unchanged;
6. plug-ins could take a built-in's name, prose could be rewritten, names could look alike;
7. plug-ins that exit, names that break matplotlib, a constant `simulate`, planted record lines, racing
   renders, a full disk mid-render, and a refused run that left its config.json behind.
"""
from __future__ import annotations

import copy
import dataclasses
import errno
import json
import os
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from helpers import invoke, spy_on_attacks
from invbench.entries import load_entries, name_skeleton
from invbench.prompt_checks import detection_probability, required_subset
from invbench.protocols import PROTOCOLS
from invbench.verification import FORMAT, status
from test_leaderboard import QUICK, make_entry, write_entry

PLUGINS = Path(__file__).parent / "plugins"


# The quick protocol on tiny-bytes (vocabulary 257: its byte prompts 'We ', 'Thi', 'The', 'Hel'), `guided` alone with the
# prior: a random model's prior ranks the true token anywhere, so guided verifies half the vocabulary a position,
# which on tiny-gpt2's 50,257 tokens made these tests the suite's slowest. What they check is the entry around it.
GUIDED_QUICK = dataclasses.replace(PROTOCOLS["quick"], model="tiny-bytes", attacks=("guided",), attack_options={"ranker": "prior"},
                                   prompts_sha256="bfed1b793f98e67ef20ef38f67573001050097430ec286e83137cdefebb048db")


@pytest.fixture
def guided_quick():
    """The quick protocol (its real 4 prompts x 3 tokens) with `guided` alone: exact on clean states, seconds."""
    with PROTOCOLS.override("quick", GUIDED_QUICK):
        yield GUIDED_QUICK


@pytest.fixture(scope="module")
def honest_entry(tmp_path_factory) -> Path:
    """One honest no-defence entry of guided_quick, submitted once for the module (tests forge copies of it)."""
    import shutil

    from invbench.submit import submit as submit_entry

    root = tmp_path_factory.mktemp("honest")
    with PROTOCOLS.override("quick", GUIDED_QUICK):
        path = submit_entry(defense="none", defense_params={}, protocol="quick", name="Entry", runs_dir=root / "runs",
                            board_dir=root / "boards", device="cpu", echo=lambda line: None)
    shutil.rmtree(root / "runs")
    return path


def copy_of(entry: Path, tmp_path: Path) -> Path:
    """The honest entry in this test's own board folder."""
    path = tmp_path / "boards" / "quick" / entry.name
    path.parent.mkdir(parents=True)
    path.write_bytes(entry.read_bytes())
    return path


def submit(tmp_path, capsys, *defense, name="Entry"):
    code, out, err = invoke(["submit", *defense, "--protocol", "quick", "--name", name, "--device", "cpu",
                             "--runs-dir", str(tmp_path / "runs"), "--board-dir", str(tmp_path / "boards")], capsys)
    return code, out, err, tmp_path / "boards" / "quick"


def verify(tmp_path, capsys, path, *extra):
    return invoke(["verify", str(path), "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), *extra], capsys)


# --- 1. verification re-measures ------------------------------------------------------------------------

def test_the_default_subset_catches_a_forgery_on_a_quarter_of_the_prompts_with_probability_099():
    """Hypergeometric: 25 prompts, 7 forged (a quarter, rounded up), 11 drawn: P(no forged one drawn) =
    C(18, 11) / C(25, 11) = 31824 / 4457400."""
    assert required_subset(25) == 11
    assert 1 - detection_probability(n=25, subset=11, forged=7) == pytest.approx(31824 / 4457400)
    assert detection_probability(n=25, subset=10, forged=7) < 0.99 <= detection_probability(n=25, subset=11, forged=7)
    assert required_subset(5) == 4 and required_subset(4) == 4  # small boards: (nearly) every prompt
    assert required_subset(1000) == 16  # drawn without replacement: a little under the binomial's 17 (0.75^17 < 0.01)


def test_a_forged_mean_is_refused_before_any_rerun(tmp_path, capsys, guided_quick, honest_entry):
    """A no-defence entry (every token leaks) edited to claim worst-case token accuracy 0.25, verdicts made
    consistent: its summary is no longer the mean of its prompts."""
    path = copy_of(honest_entry, tmp_path)
    entry = json.loads(path.read_text())
    forged = entry["summary"]
    for figures in forged["attacks"].values():
        figures.update(token_accuracy=0.25, exact_match=0.0, verdict="leaks")
    forged["worst_case"]["token_accuracy"]["value"] = forged["worst_case"]["exact_match"]["value"] = 0.25
    forged["worst_case"]["exact_match"]["value"] = 0.0
    path.write_text(json.dumps(entry))
    code, _, err = verify(tmp_path, capsys, path)
    assert code == 2 and "is not the mean of the transcript's per-prompt" in err


def test_a_forged_transcript_is_caught_prompt_by_prompt(tmp_path, capsys, guided_quick, honest_entry):
    """The forger edits one prompt's answer and every figure that follows from it, consistently: only a
    rerun of that prompt can tell, and verify's subset (here every prompt of 4) reruns it."""
    path = copy_of(honest_entry, tmp_path)
    entry = json.loads(path.read_text())
    prompt = entry["transcript"]["prompts"][2]
    answer = prompt["attacks"]["guided"]
    wrong = [(t + 1) % 1000 for t in prompt["target_ids"]]
    answer.update(recovered_ids=wrong, recovered_tokens=[f"x{t}" for t in wrong], exact_match=False,
                  token_accuracy=0.0, similarity=0.0)
    figures = entry["summary"]["attacks"]["guided"]
    figures.update(exact_match=0.75, token_accuracy=0.75, similarity=(figures["similarity"] * 4 - 1) / 4)
    entry["summary"]["worst_case"]["exact_match"]["value"] = entry["summary"]["worst_case"]["token_accuracy"]["value"] = 0.75
    entry["summary"]["worst_case"]["similarity"]["value"] = figures["similarity"]
    path.write_text(json.dumps(entry))
    code, out, _ = verify(tmp_path, capsys, path)
    assert code == 1 and "verification FAILED" in out
    assert "prompt 2, guided: the entry's answer" in out and "not a float tie" in out
    assert "prompt 2: the guided text is not what its ids decode to" in out
    record = json.loads(path.with_name("entry.verification.json").read_text())
    assert record["result"] == "failed" and record["answers"]["compared"] == 4 and record["answers"]["equal"] == 3


def test_an_entry_whose_texts_were_replaced_fails_verify(tmp_path, capsys, guided_quick, honest_entry):
    path = copy_of(honest_entry, tmp_path)
    entry = json.loads(path.read_text())
    for prompt in entry["transcript"]["prompts"]:
        prompt["target_tokens"] = ["Nothing", " leaked", " here"][:len(prompt["target_ids"])]
    path.write_text(json.dumps(entry))
    code, out, _ = verify(tmp_path, capsys, path)
    assert code == 1 and "the true text is not what its ids decode to" in out


def test_a_transcript_of_other_prompts_is_refused_on_read(tmp_path):
    entry = make_entry("Other prompts", em=0.5)
    for prompt in entry["transcript"]["prompts"]:  # every id moved by one: consistent, but other prompts
        prompt["target_ids"] = [t + 1 for t in prompt["target_ids"]]
        for answer in prompt["attacks"].values():
            answer["recovered_ids"] = [t + 1 for t in answer["recovered_ids"]]
    _, problems = load_entries(write_entry(tmp_path, entry).parent)
    assert any(p.field == "transcript.prompts" and "not the protocol's prompts" in p.message for p in problems)


def test_the_subset_is_drawn_at_random_with_its_seed_recorded(tmp_path, capsys, monkeypatch):
    """Not the first N: a forger who keeps the first prompts honest is caught. The seed is recorded, so
    anyone can redraw the same prompts (numpy's default_rng)."""
    from invbench.submit import draw_prompts

    assert draw_prompts(list(range(25)), subset=11, seed=7) == draw_prompts(list(range(25)), subset=11, seed=7)
    draws = {tuple(draw_prompts(list(range(25)), subset=11, seed=seed)) for seed in range(50)}
    assert len(draws) > 40 and all(len(d) == 11 == len(set(d)) for d in draws)
    assert any(draw[:2] != (0, 1) for draw in draws)


# --- 3. a fresh folder ------------------------------------------------------------------------------------

def test_verify_never_reads_a_folder_it_did_not_create(tmp_path, capsys, guided_quick, honest_entry):
    """Before: records planted in runs/verify/quick/<id>-n2 were read as the rerun."""
    from invbench.submit import fresh_run_dir

    path = copy_of(honest_entry, tmp_path)
    planted = tmp_path / "runs" / "verify" / "quick" / "entry-n2"
    planted.mkdir(parents=True)
    (planted / "records.jsonl").write_text("{}\n")
    code, out, _ = verify(tmp_path, capsys, path)
    assert code == 0 and "verification PASSED" in out
    used = next(line for line in out.splitlines() if line.startswith("verify ")).split("rerun in ")[1].rstrip(")")
    assert Path(used) != planted and Path(used).name.startswith("entry-all-")
    first = fresh_run_dir(tmp_path / "runs", "quick", "entry", 5)
    first.mkdir(parents=True)
    assert fresh_run_dir(tmp_path / "runs", "quick", "entry", 5) != first


# --- 4. records earn the mark ---------------------------------------------------------------------------

def good_record(path: Path, **changes) -> dict:
    from invbench.verification import file_sha256

    record = {"format": FORMAT, "entry": path.name, "entry_sha256": file_sha256(path), "result": "passed",
              "failed": [], "checked": 40, "prompts": 4, "of": 4, "prompt_indices": [0, 1, 2, 3], "seed": None,
              "required": 4, "answers": {"compared": 16, "equal": 16, "float_ties": 0},
              "command": f"invbench verify {path}", "date": "2026-12-06T10:00:00+00:00", "versions": {},
              "git_commit": None, "device": "cpu"}
    return {**record, **changes}


@pytest.mark.parametrize("changes, why", [
    ({"checked": 0}, "it checked nothing"),
    ({"command": "trust me"}, "its command is not a verify command"),
    ({"date": "2099-01-01T00:00:00+00:00"}, "its date is in the future"),
    ({"prompts": 100, "failed": ["x"]}, "its result and its failures disagree"),
    ({"prompts": 100}, "its prompt count is not its distinct prompts"),
    ({"of": 5}, "it verified 5 prompts' entry"),
    ({"prompt_indices": [0, 1, 2, 9]}, "it names prompts the entry does not have"),
    ({"answers": {"compared": 16, "equal": 10, "float_ties": 0}}, "without comparing every prompt's answers"),
    ({"required": 1}, "its required subset is not the rule's"),
    ({"prompts": 2, "prompt_indices": [0, 1], "seed": None}, "a subset needs the seed"),
])
def test_a_hand_written_record_does_not_show_as_verified(tmp_path, changes, why):
    path = write_entry(tmp_path, make_entry("Claimed", em=0.5))
    found = status(path, good_record(path, **changes), n=4)
    assert found.state == "invalid" and why in found.why and not found.verified
    assert status(path, good_record(path), n=4).verified


def test_a_record_over_fewer_prompts_than_the_rule_needs_is_partial_and_an_old_record_outdated(tmp_path):
    path = write_entry(tmp_path, make_entry("Claimed", em=0.5))
    partial = status(path, good_record(path, prompts=2, prompt_indices=[1, 3], seed=9, required=4), n=4)
    assert partial.state == "partly" and not partial.verified and partial.short() == "partly (2/4)"
    old = {"format": "invbench-verification/1", "result": "passed", "prompts": 2, "of": 4,
           "date": "2026-12-02T00:00:00+00:00", "failed": []}
    assert status(path, old, n=4).state == "outdated" and "not re-verified" in status(path, old, n=4).text()


# --- 5. a plug-in's code is part of the run -------------------------------------------------------------

def test_an_edited_plug_in_is_not_resumed_as_the_same_run(tmp_path, capsys, guided_quick):
    plugin = tmp_path / "mine.py"
    plugin.write_text(PLUGIN.format(name="mine", body="return torch.zeros_like(hidden)"))
    code, _, err, board = submit(tmp_path, capsys, "--defense", f"{plugin}:Mine")
    assert code == 0, err
    entry = json.loads((board / "entry.json").read_text())
    assert entry["defense_code"]["file"] == "mine.py" and len(entry["defense_code"]["sha256"]) == 64
    plugin.write_text(PLUGIN.format(name="mine", body="return hidden"))  # now it protects nothing
    code, _, err, _ = submit(tmp_path, capsys, "--defense", f"{plugin}:Mine")
    assert code == 2 and "holds a different run" in err
    code, _, err = verify(tmp_path, capsys, board / "entry.json", "--defense", f"{plugin}:Mine")
    assert code == 2 and "is not the code the entry was made with" in err


PLUGIN = '''import os, sys, torch
from invbench.defenses import Defense


class Mine(Defense):
    name = "{name}"

    def simulate(self, hidden):
        {body}
'''


# --- 6. names -------------------------------------------------------------------------------------------

def test_a_plug_in_cannot_take_a_built_ins_name(tmp_path, capsys, guided_quick):
    plugin = tmp_path / "dp.py"
    plugin.write_text(PLUGIN.format(name="dp", body="return hidden"))
    code, _, err, _ = submit(tmp_path, capsys, "--defense", f"{plugin}:Mine")
    assert code == 2 and "names itself 'dp', a registered defence's name" in err and not (tmp_path / "runs").exists()


def test_a_built_ins_prose_cannot_be_rewritten(tmp_path):
    entry = make_entry("DP", defense="dp", params={"clip": 1.0, "noise_multiplier": 1.0})
    entry["summary"]["defense"]["neighbouring"] = "user-level DP"
    _, problems = load_entries(write_entry(tmp_path, entry).parent)
    assert any(p.field == "summary.defense.neighbouring" for p in problems)


@pytest.mark.parametrize("reason", ["no guarantee\x00", "no \u202eguarantee"])
def test_control_and_bidi_characters_are_refused_in_a_defences_text(tmp_path, capsys, reason):
    plugin = tmp_path / "odd.py"
    plugin.write_text(PLUGIN.format(name="odd", body="return hidden") + f'''
    def guarantee(self, tokens=None):
        return {{**super().guarantee(tokens), "reason": {reason!r}}}
''')
    code, _, err = invoke(["run", "--model", "tiny-gpt2", "--n", "1", "--tokens", "2", "--attack", "guided",
                           "--ranker", "prior", "--device", "cpu", "--defense", f"{plugin}:Mine",
                           "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "control or format characters" in err


def test_names_that_only_look_different_make_one_row(tmp_path, capsys):
    assert name_skeleton("Gaussian sigma 0.3") == name_skeleton("Gаussian sigma 0.3")  # a Cyrillic а
    first, twin = make_entry("Gaussian sigma 0.3"), make_entry("Gаussian sigma 0.3", entry_id="twin")
    twin["date"] = "2025-01-03"
    write_entry(tmp_path, first)
    write_entry(tmp_path, twin)
    entries, problems = load_entries(tmp_path / "quick")
    assert [e.entry_id for e in entries] == ["gaussian-sigma-0-3"]
    assert problems[0].field == "name" and "looks the same" in problems[0].message
    nbsp = make_entry("Gaussian sigma 0.3\u00a0", entry_id="nbsp")
    _, problems = load_entries(write_entry(tmp_path / "other", nbsp).parent)
    assert any(p.field == "name" and "space at its start or end" in p.message for p in problems)


def test_submit_refuses_a_name_that_looks_like_anothers(tmp_path, capsys, guided_quick):
    write_entry(tmp_path / "boards", make_entry("No defence", defense="none", params={}))
    code, _, err, _ = submit(tmp_path, capsys, "--defense", "gaussian", "--sigma", "1", name="Nо defence")  # Cyrillic о
    assert code == 2 and "looks the same as the name of" in err and not (tmp_path / "runs").exists()  # before any run


# --- 7. the other holes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("call", ["sys.exit(0)", "os._exit(0)"])
def test_a_plug_in_that_exits_gets_an_error_not_a_silent_success(tmp_path, capsys, guided_quick, call):
    plugin = tmp_path / "quitter.py"
    plugin.write_text(PLUGIN.format(name="quitter", body=f"{call}"))
    code, _, err, board = submit(tmp_path, capsys, "--defense", f"{plugin}:Mine")
    assert code == 2 and f"called {call}" in err and not (board / "entry.json").exists()
    assert os._exit.__module__ == "posix"  # the real one is back


def test_a_curve_named_like_mathtext_plots(tmp_path, capsys):
    from invbench.curves import Curve, CurvePoint, plot_curves

    point = CurvePoint(params={"s": 1}, worst_case_exact_match=0.5, worst_case_token_accuracy=0.5,
                       top1_agreement=0.5, kl_clean_defended=0.1, epsilon=None)
    curve = Curve(protocol="quick", defense="$\\undefinedmacro{x}$", points=[point])
    assert plot_curves([curve], tmp_path / "c.png", title="$\\undefinedmacro{x}$").exists()


def test_continuous_runs_on_a_plug_in_whose_simulate_is_constant(tmp_path, capsys):
    plugin = tmp_path / "zeros.py"
    plugin.write_text(PLUGIN.format(name="zeros", body="return torch.zeros_like(hidden)"))
    code, out, err = invoke(["run", "--model", "tiny-gpt2", "--n", "1", "--tokens", "2", "--attack", "continuous",
                             "--steps", "3", "--device", "cpu", "--defense", f"{plugin}:Mine",
                             "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err


def run_args(out: Path) -> list[str]:
    return ["run", "--model", "tiny-bytes", "--n", "2", "--tokens", "2", "--attack", "guided", "--ranker", "prior",
            "--device", "cpu", "--out", str(out)]


@pytest.mark.parametrize("plant", ["duplicate", "wrong exact match", "another prompt's ids"])
def test_planted_record_lines_are_dropped_and_their_prompts_attacked_again(tmp_path, capsys, monkeypatch, plant):
    out = tmp_path / "out"
    assert invoke(run_args(out), capsys)[0] == 0
    lines = (out / "records.jsonl").read_text().splitlines()
    first, second = json.loads(lines[0]), json.loads(lines[1])
    if plant == "duplicate":
        lines.append(json.dumps({**first, "recovered_text": "planted"}))
    elif plant == "wrong exact match":
        lines[0] = json.dumps({**first, "recovered_ids": [t + 1 for t in first["target_ids"]], "exact_match": True,
                               "token_accuracy": 1.0})
    else:
        lines[0] = json.dumps({**first, "target_ids": second["target_ids"], "recovered_ids": second["target_ids"]})
    (out / "records.jsonl").write_text("\n".join(lines) + "\n")
    attacked = spy_on_attacks(monkeypatch)
    code, _, err = invoke(run_args(out), capsys)
    assert code == 0 and attacked == [first["prompt_index"]] and "attacked again" in err
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted(r["prompt_index"] for r in records) == [0, 1]
    assert all(r["exact_match"] == (r["recovered_ids"] == r["target_ids"]) for r in records)


def test_two_renders_of_one_board_take_turns(tmp_path):
    from invbench.leaderboard import render
    from invbench.lock import board_lock

    write_entry(tmp_path, make_entry("First", em=0.5))
    board = tmp_path / "quick"
    done = []
    with board_lock(board):
        worker = threading.Thread(target=lambda: done.append(render(board)))
        worker.start()
        time.sleep(0.5)
        assert not done  # it waits for the lock
    worker.join(timeout=60)
    assert done and (board / "entries" / "first.html").exists() and (board / "LEADERBOARD.md").exists()


def test_a_full_disk_mid_render_leaves_the_boards_files_as_they_were(tmp_path, monkeypatch):
    from invbench import results
    from invbench.leaderboard import render
    from invbench.results import ResultsError

    write_entry(tmp_path, make_entry("First", em=0.5))
    board = tmp_path / "quick"
    render(board)
    before = {p: p.read_bytes() for p in board.rglob("*") if p.is_file()}
    write_entry(tmp_path, make_entry("Second", em=0.25))
    calls = []
    real_fsync = os.fsync

    def full(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(results.os, "fsync", full)
    with pytest.raises(ResultsError, match="No space left"):
        render(board)
    assert {p: p.read_bytes() for p in before} == before  # LEADERBOARD.md and index.html alike
    assert not list(board.rglob(".*.tmp"))


def test_a_run_refused_before_recording_leaves_no_config_behind(tmp_path, capsys):
    bad = tmp_path / "ranker.safetensors"
    bad.write_bytes(b"not a ranker")
    out = tmp_path / "out"
    args = ["run", "--model", "tiny-bytes", "--n", "1", "--tokens", "2", "--attack", "guided", "--device", "cpu",
            "--out", str(out)]
    code, _, err = invoke(args + ["--ranker", str(bad)], capsys)
    assert code != 0 and not (out / "config.json").exists()
    code, _, err = invoke(args + ["--ranker", "prior"], capsys)
    assert code == 0, err
