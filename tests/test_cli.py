"""End to end through the command line: files written, resume, one-line errors."""
import json

import pytest
from opacus.accountants.analysis.gdp import eps_from_mu

from helpers import invoke, spy_on_attacks
from invbench.scoring import record_problem

BASE = ["run", "--model", "tiny-gpt2", "--attack", "continuous", "--preset", "fast", "--n", "3", "--tokens", "3",
        "--device", "cpu"]



def test_run_writes_config_records_and_summary(tmp_path, capsys):
    code, out, _ = invoke(BASE + ["--defense", "none", "--out", str(tmp_path)], capsys)
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["attacks"]["continuous"]["exact_match"] == 1.0
    assert {"model", "dataset", "n", "tokens", "seed", "defense", "attacks", "config_hash", "utility"} <= set(summary)
    assert summary["utility"]["top1_agreement"] == 1.0 and summary["utility"]["kl_clean_defended"] == pytest.approx(0, abs=1e-6)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["config_hash"] == summary["config_hash"] and config["versions"]["torch"]
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [r["prompt_index"] for r in records] == [0, 1, 2]
    assert all(r["recovered_ids"] == r["target_ids"] for r in records)
    assert all(record_problem(r) is None for r in records)  # what a run writes fits the record schema
    assert "continuous" in out and "1.000" in out


def test_rerun_resumes_without_redoing_finished_prompts(tmp_path, capsys, monkeypatch):
    args = BASE + ["--out", str(tmp_path)]
    assert invoke(args, capsys)[0] == 0
    path = tmp_path / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][:25])  # the last prompt lost, its line torn mid-write
    attacked = spy_on_attacks(monkeypatch)
    assert invoke(args, capsys)[0] == 0
    assert attacked == [2]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["prompt_index"] for r in records) == [0, 1, 2]
    assert json.loads((tmp_path / "summary.json").read_text())["attacks"]["continuous"]["n"] == 3


def test_resumed_run_keeps_the_attack_time_of_earlier_sessions(tmp_path, capsys):
    """A finished run opened again (as `submit` does) must not report the seconds of the reopening as
    its wall time: the attack time its records hold counts."""
    args = BASE + ["--out", str(tmp_path)]
    assert invoke(args, capsys)[0] == 0
    path = tmp_path / "records.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        r["seconds_per_token"] = 100.0  # as if each prompt had taken 300 s (3 tokens) in the first session
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert invoke(args, capsys)[0] == 0
    assert json.loads((tmp_path / "summary.json").read_text())["wall_seconds"] >= 3 * 300.0


def test_foreign_output_folder_is_refused(tmp_path, capsys):
    assert invoke(BASE + ["--out", str(tmp_path)], capsys)[0] == 0
    code, _, err = invoke(BASE + ["--seed", "7", "--out", str(tmp_path)], capsys)
    assert code == 2 and "holds a different run" in err


def test_dp_run_reports_opacus_epsilon_and_utility(tmp_path, capsys):
    args = ["run", "--model", "tiny-gpt2", "--attack", "continuous", "--defense", "dp", "--clip", "1",
            "--noise-multiplier", "1", "--n", "2",
            "--tokens", "2", "--steps", "30", "--device", "cpu", "--out", str(tmp_path)]
    assert invoke(args, capsys)[0] == 0
    defense = json.loads((tmp_path / "summary.json").read_text())["defense"]
    assert defense["epsilon"] == pytest.approx(eps_from_mu(mu=2.0, delta=1e-5))  # replace-one: mu = 2C / (Z C)
    assert defense["neighbouring"].startswith("replace-one")


@pytest.mark.parametrize("extra, message", [
    (["--attack", "nope"], "unknown attack"),
    (["--defense", "nope"], "unknown defence"),
    (["--defense", "gaussian", "--sigma", "-1"], "sigma"),
    (["--model", "no/such-model-here"], "cannot load"),
    (["--dataset", "missing.txt"], "not found"),
    (["--layer", "9"], "out of range"),
    (["--tokens", "5000"], "exceeds the context"),
    (["--param", "sigma"], "name=value"),
    (["--defense", "gaussian", "--param", "bits=3"], "no parameter"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    code, _, err = invoke(BASE + ["--out", str(tmp_path)] + extra, capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_attacks_lists_every_attack_with_its_presets_and_options(capsys):
    code, out, _ = invoke(["attacks"], capsys)
    assert code == 0
    for name in ("guided", "continuous", "projection", "scan"):
        assert any(line.startswith(name) for line in out.splitlines()), name
    assert "guided: ranked verification with a certified stop" in out
    assert "--ranker" in out and "--scoring" in out and "--max-candidates" in out


def test_attacks_lists_presets_only_where_an_attack_has_them(capsys):
    """Before: every attack inherited empty fast/baseline/high-acc presets, so `invbench attacks`
    listed three presets for guided, projection and scan, which have one setting."""
    from invbench.attacks import make_attack

    code, out, _ = invoke(["attacks"], capsys)
    listed = dict(zip(out.splitlines()[::2], out.splitlines()[1::2]))
    presets = {line.split()[0]: detail for line, detail in listed.items()}
    assert "presets fast, baseline, high-acc" in presets["continuous"]
    for name in ("guided", "projection", "scan"):
        assert "presets none" in presets[name], name
        assert make_attack(name, preset="fast").config == make_attack(name).config  # a protocol's preset is taken



def test_plain_invbench_prints_its_help_as_help(capsys):
    """Before: plain `invbench` printed its whole help squashed into one `error:` line."""
    code, out, err = invoke([], capsys)
    assert code == 0 and err == ""
    assert out.startswith("Usage: invbench") and "\nCommands:\n" in out and "  run " in out


def test_an_unforeseen_error_is_one_line_and_debug_shows_its_traceback(capsys, monkeypatch):
    """Before: any error that was not an InvbenchError printed a traceback."""
    from invbench import board_cli, cli

    def broken(**_):
        raise RuntimeError("an invbench bug\nwith a second line")

    monkeypatch.setattr(board_cli.protocols, "callback", broken)
    code, out, err = invoke(["protocols"], capsys)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("error: unexpected RuntimeError: an invbench bug with a second line;")
    assert "invbench --debug" in err
    with pytest.raises(RuntimeError, match="an invbench bug"):
        cli.main(["--debug", "protocols"])


def test_defenses_lists_whole_descriptions(capsys):
    """Before: each description was its docstring's first line, cut mid-sentence."""
    code, out, _ = invoke(["defenses"], capsys)
    text = " ".join(out.split())
    assert code == 0
    assert "Give noise_multiplier, or epsilon (and delta) to solve for it." in text
    assert "Hidden states have unbounded sensitivity, so there is no formal guarantee." in text


def test_the_listing_is_the_registries_and_every_command_help_line_its_commands(capsys):
    """The command line reads the defences, attacks and their options from bench/listing.json (so that
    help and listings need no torch); it must be what the live registries say: after adding a defence,
    attack or option, run `python -m invbench.listing`."""
    import importlib

    from invbench.cli import COMMANDS
    from invbench.listing import build_listing, load_listing

    assert load_listing() == json.loads(json.dumps(build_listing())), "stale bench/listing.json: python -m invbench.listing"
    for name, (module, line) in COMMANDS.items():
        command = getattr(importlib.import_module(module), name.replace("-", "_"))
        assert command.name == name and " ".join(command.help.split("\n\n")[0].split()) == line, name


def test_help_and_listings_do_not_import_torch():
    """`invbench --help`, `defenses`, `attacks`, `protocols` and a command's --help answer without loading
    torch (5 s and more on a busy 2-core machine, issue 37); timings are in docs/PERFORMANCE.md."""
    import subprocess
    import sys

    for args in (["--help"], ["defenses"], ["attacks"], ["protocols"], ["run", "--help"], ["verify", "--help"]):
        code = ("import sys; from invbench.cli import main\n"
                f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
                "assert 'torch' not in sys.modules, 'torch was imported'")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, (args, done.stderr[-500:])


def test_dchi_takes_the_hidden_size_from_the_model(tmp_path, capsys):
    """Before: `--defense dchi --epsilon 500` refused to run without `--param dim=D`, which the model knows."""
    code, out, err = invoke(["run", "--model", "tiny-gpt2", "--n", "1", "--tokens", "2", "--attack", "guided",
                             "--ranker", "prior", "--device", "cpu", "--defense", "dchi", "--epsilon", "500",
                             "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert "note: dim=128: the hidden size of tiny-gpt2" in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["defense"]["params"] == {"epsilon": 500.0, "dim": 128}  # recorded with the run
