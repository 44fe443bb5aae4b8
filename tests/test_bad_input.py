"""Bad input, table-driven: every case exits 2 with exactly one line on stderr (`error: ...`) that
names the bad value and what is allowed, and no traceback; `--debug` shows the traceback."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from invbench.attacks import AttackError
from helpers import invoke
from invbench.cli import main
from invbench.leaks import prompts as prompts_module
from invbench.leaks.models import load_model

PLUGINS = Path(__file__).resolve().parent / "plugins"
LONG = "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest."


def run_args(out: Path) -> list[str]:
    return ["run", "--model", "tiny-gpt2", "--attack", "continuous", "--preset", "fast", "--steps", "3",
            "--candidates", "3", "--n", "1", "--tokens", "2", "--device", "cpu", "--out", str(out)]


@pytest.fixture
def files(tmp_path) -> Path:
    """The bad files the table refers to as {tmp}/NAME."""
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 au lait, s'il vous pla\xeet.\n".encode("latin-1"))
    (tmp_path / "short.txt").write_text("Hi.\nOk.\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    (tmp_path / "notext.jsonl").write_text('{"body": "no text field"}\n')
    (tmp_path / "texts.csv").write_text("text\nhello\n")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    (tmp_path / "folder.txt").mkdir()
    (tmp_path / "syntax.py").write_text("class Broken(:\n")
    (tmp_path / "corrupt-out").mkdir()
    (tmp_path / "corrupt-out" / "config.json").write_text('{"config_hash": "abc", ')
    (tmp_path / "list-out").mkdir()
    (tmp_path / "list-out" / "config.json").write_text("[1, 2, 3]")
    (tmp_path / "entry.json").write_text('{"entry_id": "x", ')
    (tmp_path / "corrupt-with-records").mkdir()
    (tmp_path / "corrupt-with-records" / "config.json").write_text('{"config_hash": "abc", ')
    (tmp_path / "corrupt-with-records" / "records.jsonl").write_text('{"attack": "continuous", "prompt_index": 0}\n')
    (tmp_path / "boards" / "quick").mkdir(parents=True)
    deep = "[" * 1000 + "]" * 1000  # 2 KB: once a RecursionError in every reader
    (tmp_path / "deep.json").write_text(deep)
    (tmp_path / "deep-config").mkdir()
    (tmp_path / "deep-config" / "config.json").write_text(deep)
    (tmp_path / "dataset-deep.jsonl").write_text('{"text": "fine"}\n' + deep + "\n")
    return tmp_path


# (id, extra arguments appended to a small valid run, words the error line must contain).
# {tmp} is the folder of the `files` fixture, {plugins} tests/plugins.
RUN_CASES = [
    # unknown names
    ("unknown model", ["--model", "no-such-model"], ["no-such-model", "tiny-gpt2", "Hugging Face id"]),
    ("model dir without weights", ["--model", "{tmp}/folder.txt"], ["folder.txt", "local directory"]),
    ("unknown attack", ["--attack", "nope"], ["nope", "continuous", "projection", "scan"]),
    ("unknown attack in a list", ["--attack", "continuous,nope"], ["nope", "continuous"]),
    ("unknown defence", ["--defense", "nope"], ["'nope'", "gaussian", "dp", "quantize", "FILE.py:Class"]),
    ("defence file missing", ["--defense", "{tmp}/missing.py:X"], ["missing.py", "not found"]),
    ("defence class missing", ["--defense", "{plugins}/my_defense.py:Nope"], ["'Nope'"]),
    ("not a defence", ["--defense", "{plugins}/my_defense.py:NotADefense"], ["NotADefense", "Defense"]),
    ("defence file does not import", ["--defense", "{tmp}/syntax.py:Broken"], ["syntax.py", "SyntaxError"]),
    ("unknown dataset", ["--dataset", "nope"], ["'nope'", "c4, wikipedia", ".txt"]),
    ("protocol-like unknown preset", ["--preset", "nope"], ["nope", "fast", "baseline", "high-acc"]),
    ("unknown device", ["--device", "tpu"], ["tpu", "auto", "cuda", "cpu"]),
    # numbers
    ("negative sigma", ["--defense", "gaussian", "--sigma", "-1"], ["-1", ">= 0"]),
    ("non-numeric sigma", ["--defense", "gaussian", "--sigma", "abc"], ["abc", "float"]),
    ("nan sigma", ["--defense", "gaussian", "--sigma", "nan"], ["nan", "finite"]),
    ("non-numeric --param", ["--defense", "gaussian", "--param", "sigma=abc"], ["sigma='abc'", "float"]),
    ("bits 0", ["--defense", "quantize", "--bits", "0"], ["0", "between 1 and 16"]),
    ("bits 17", ["--defense", "quantize", "--bits", "17"], ["17", "between 1 and 16"]),
    ("bits not an integer", ["--defense", "quantize", "--bits", "2.5"], ["2.5", "integer"]),
    ("unknown scheme", ["--defense", "quantize", "--scheme", "per-row"], ["per-row", "per-vector", "per-tensor"]),
    ("clip 0", ["--defense", "dp", "--clip", "0", "--noise-multiplier", "1"], ["--clip", "0", "> 0"]),
    ("negative noise multiplier", ["--defense", "dp", "--clip", "1", "--noise-multiplier", "-1"],
     ["--noise-multiplier", "-1", "> 0"]),
    ("delta 2", ["--defense", "dp", "--clip", "1", "--noise-multiplier", "1", "--delta", "2"], ["--delta", "2", "(0, 1)"]),
    ("epsilon too large", ["--defense", "dp", "--clip", "1", "--epsilon", "1000"], ["--epsilon", "1000", "500"]),
    ("dp without clip", ["--defense", "dp", "--noise-multiplier", "1"], ["--clip", "required"]),
    ("dp with two noise levels", ["--defense", "dp", "--clip", "1", "--noise-multiplier", "1", "--epsilon", "1"],
     ["exactly one of --noise-multiplier or --epsilon"]),
    ("topk k 0", ["--defense", "topk", "--param", "k=0"], ["--k", "0", ">= 1"]),
    ("tokens 0", ["--tokens", "0"], ["--tokens", "0", "x>=1"]),
    ("tokens above the context", ["--tokens", "5000"], ["--tokens 5000", "1024 positions"]),
    ("layer too high", ["--layer", "9"], ["layer 9", "-3..2"]),
    ("layer too low", ["--layer", "-9"], ["layer -9", "-3..2"]),
    ("n 0", ["--n", "0"], ["--n", "0", "x>=1"]),
    ("n not a number", ["--n", "many"], ["many", "integer"]),
    ("steps 0", ["--steps", "0"], ["--steps", "0", "1<=x<=2147483647"]),
    ("negative learning rate", ["--lr", "-1"], ["--lr", "-1", "x>0"]),
    ("batch size 0", ["--batch-size", "0"], ["--batch-size", "0", "x>=1"]),
    ("option of another attack", ["--attack", "projection"], ["steps", "projection"]),
    # --param
    ("--param without =", ["--param", "sigma"], ["'sigma'", "name=value"]),
    ("--param with empty name", ["--param", "=1"], ["'=1'", "name=value"]),
    ("unknown --param name", ["--defense", "gaussian", "--param", "bits=3"], ["'bits'", "allowed: sigma"]),
    ("unknown option", ["--sigam", "1"], ["--sigam", "--sigma"]),
    # dataset files
    ("dataset file missing", ["--dataset", "{tmp}/missing.txt"], ["missing.txt", "not found", ".jsonl"]),
    ("dataset is a folder", ["--dataset", "{tmp}/folder.txt"], ["folder.txt", "not a file"]),
    ("dataset file type", ["--dataset", "{tmp}/texts.csv"], ["'.csv'", ".txt, .jsonl or .parquet"]),
    ("empty dataset file", ["--dataset", "{tmp}/empty.txt"], ["empty.txt", "empty"]),
    ("blank dataset file", ["--dataset", "{tmp}/blank.txt"], ["blank.txt", "no texts"]),
    ("binary dataset file", ["--dataset", "{tmp}/binary.txt"], ["binary.txt", "binary", "UTF-8"]),
    ("non-UTF-8 dataset file", ["--dataset", "{tmp}/latin1.txt"], ["latin1.txt", "not UTF-8", "offset 3"]),
    ("all texts too short", ["--dataset", "{tmp}/short.txt", "--tokens", "8"], ["none of the 2 texts", "at least 8 tokens", "short.txt", "smaller --tokens"]),
    ("malformed jsonl", ["--dataset", "{tmp}/bad.jsonl"], ["line 2", "bad.jsonl", "not valid JSON", "'text'"]),
    ("jsonl without text", ["--dataset", "{tmp}/notext.jsonl"], ["line 1", "notext.jsonl", "'text'"]),
    ("corrupt parquet", ["--dataset", "{tmp}/broken.parquet"], ["broken.parquet", "parquet", "'text'"]),
    # the results folder (a damaged config.json: removing it alone fixes a folder without records)
    ("corrupt config.json in --out", ["--out", "{tmp}/corrupt-out"],
     ["corrupt-out/config.json", "unreadable", "remove it (no records depend on it)", "--out"]),
    ("config.json not an object", ["--out", "{tmp}/list-out"], ["list-out/config.json", "not an invbench config", "--out"]),
    ("corrupt config.json beside records", ["--out", "{tmp}/corrupt-with-records"],
     ["corrupt-with-records/config.json", "unreadable", "remove the folder", "corrupt-with-records to start the run over"]),
    ("deeply nested config.json", ["--out", "{tmp}/deep-config"],
     ["deep-config/config.json", "unreadable", "nested deeper than 64 levels"]),
    ("deeply nested dataset line", ["--dataset", "{tmp}/dataset-deep.jsonl"], ["line 2", "nests too deeply"]),
    # issue 26, list 5: each once a traceback
    ("negative seed", ["--seed", "-5"], ["--seed", "-5", "0<=x<=4294967295"]),
    ("seed beyond 64 bits", ["--seed", "99999999999999999999999"], ["--seed", "99999999999999999999999", "0<=x<=4294967295"]),
    ("infinite learning rate", ["--lr", "inf"], ["--lr", "'inf' is not a finite number"]),
    ("infinite loss threshold", ["--loss-threshold", "inf"], ["--loss-threshold", "'inf' is not a finite number"]),
    ("max candidates beyond any count", ["--attack", "guided", "--max-candidates", "99999999999999999999"],
     ["--max-candidates", "99999999999999999999", "0<=x<=2147483647"]),
    ("plug-in whose __init__ raises", ["--defense", "{plugins}/bad.py:InitRaises"],
     ["'init-raises'", "invbench_plugin_bad.InitRaises", "__init__ raised RuntimeError: no licence for this defence second line"]),
    ("plug-in whose describe() is not JSON", ["--defense", "{plugins}/bad.py:DescribeNotJson"],
     ["invbench_plugin_bad.DescribeNotJson", "JSON cannot hold", "object is not JSON serializable"]),
    ("plug-in whose guarantee gives epsilon 'lots'", ["--defense", "{plugins}/bad.py:GuaranteeNotANumber"],
     ["invbench_plugin_bad.GuaranteeNotANumber", "epsilon 'lots'", "None or a number >= 0"]),
    # issue 26, list 6: empty or conflicting input, once accepted without a word
    ("empty --attack", ["--attack", ""], ["--attack ''", "names no attack", "continuous"]),
    ("empty --out", ["--out", ""], ["--out", "'' is an empty name"]),
    ("--sigma and --param sigma", ["--defense", "gaussian", "--sigma", "0.2", "--param", "sigma=0.1"],
     ["--sigma 0.2 and --param sigma=0.1 both give sigma", "give each parameter once"]),
    ("--param sigma twice", ["--defense", "gaussian", "--param", "sigma=0.1", "--param", "sigma=0.2"],
     ["sigma is given twice", "sigma=0.1 and sigma=0.2"]),
    ("--param and its flag, dashed", ["--defense", "dp", "--clip", "1", "--noise-multiplier", "1",
                                       "--param", "noise-multiplier=2"], ["--noise-multiplier 1.0", "noise_multiplier=2"]),
]
if not torch.cuda.is_available():
    RUN_CASES.append(("cuda without a GPU", ["--device", "cuda"], ["--device cuda", "cpu or auto"]))

OTHER_CASES = [  # other commands
    ("unknown command", ["runn"], ["runn", "run"]),
    ("unknown protocol", ["submit", "--defense", "none", "--protocol", "nope", "--name", "x"],
     ["'nope'", "quick", "c4-gpt2-10tok"]),
    ("entry id with a path separator", ["submit", "--defense", "none", "--protocol", "quick", "--name", "x",
                                        "--entry-id", "../evil"], ["'../evil'", "path", "lowercase letters"]),
    ("malformed entry JSON", ["verify", "{tmp}/entry.json"], ["entry.json"]),
    ("protocol folder with a path", ["leaderboard", "--protocol", "../etc", "--board-dir", "{tmp}"], ["../etc"]),
    ("utility with a bad defence", ["utility", "--model", "tiny-gpt2", "--defense", "gaussian", "--sigma", "-0.5"],
     ["-0.5", ">= 0"]),
    ("--debug after the command", ["run", "--debug"], ["--debug is an option of invbench itself",
                                                        "invbench --debug run"]),
    ("verify a deeply nested entry", ["verify", "{tmp}/deep.json"], ["deep.json", "not valid JSON",
                                                                     "nested deeper than 64 levels"]),
    ("utility with a negative seed", ["utility", "--model", "tiny-gpt2", "--seed", "-1"], ["--seed", "-1", "0<=x<="]),
    ("utility floor nan", ["leaderboard", "--utility-floor", "nan", "--board-dir", "{tmp}/boards"],
     ["--utility-floor", "'nan' is not a finite number"]),
    ("fit-ranker layer out of range", ["fit-ranker", "--model", "tiny-gpt2", "--layer", "99", "--device", "cpu"],
     ["--layer", "layer 99", "allowed -3..2"]),
    ("fit-ranker with fewer documents than it holds out", ["fit-ranker", "--model", "tiny-gpt2", "--documents", "2"],
     ["--documents", "x>=101"]),
    ("curve written as text", ["curve", "--board-dir", "{tmp}/boards", "--out", "{tmp}/curves/c1.txt"],
     ["c1.txt", "name a .png file"]),
    ("curve --out empty", ["curve", "--board-dir", "{tmp}/boards", "--out", ""], ["--out", "'' is an empty name"]),
    ("submit with an empty entry id", ["submit", "--defense", "none", "--protocol", "quick", "--name", "x",
                                       "--entry-id", ""], ["entry id ''", "empty", "--name"]),
    ("submit with --sigma and --param sigma", ["submit", "--defense", "gaussian", "--sigma", "0.2", "--param",
                                               "sigma=0.1", "--protocol", "quick", "--name", "x"],
     ["--sigma 0.2 and --param sigma=0.1 both give sigma"]),
    ("sweep with a parameter twice", ["sweep", "--defense", "gaussian", "--param", "sigma=0.1", "--param", "sigma=0.2"],
     ["--param sigma is given twice"]),
    ("leaderboard of a mistyped --board-dir", ["leaderboard", "--protocol", "quick", "--board-dir", "{tmp}/boardz"],
     ["--board-dir", "boardz", "not a folder"]),
    ("leaderboard of a protocol without entries", ["leaderboard", "--protocol", "c4-gpt2-10tok", "--board-dir",
                                                   "{tmp}/boards"], ["c4-gpt2-10tok does not exist", "submit one"]),
    ("curve of a mistyped --board-dir", ["curve", "--board-dir", "{tmp}/boardz", "--out", "{tmp}/c.png"],
     ["--board-dir", "boardz", "not a folder"]),
    ("utility with a layer out of range", ["utility", "--model", "tiny-gpt2", "--device", "cpu", "--layer", "9"],
     ["layer 9", "allowed -3..2"]),
]


@pytest.fixture(scope="module")
def tiny_model():
    return load_model("tiny-gpt2", seed=42)


@pytest.fixture
def quick_model(monkeypatch, tiny_model):
    """Every case stops before an attack touches the model, so one tiny-gpt2 serves them all."""
    from invbench import runner

    real = runner.load_model
    monkeypatch.setattr(runner, "load_model",
                        lambda name, **kw: tiny_model if name == "tiny-gpt2" and kw.get("seed") == 42 else real(name, **kw))


def fill(args: list[str], tmp: Path) -> list[str]:
    return [a.format(tmp=tmp, plugins=PLUGINS) for a in args]



def check_one_line(code: int, err: str, words: list[str]) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: "), line
    missing = [w for w in words if w not in line]
    assert not missing, f"{missing} not in {line!r}"
    return line


@pytest.mark.parametrize("extra, words", [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES])
def test_bad_run_input(files, capsys, quick_model, extra, words):
    out = files / "out"
    code, _, err = invoke(run_args(out) + fill(extra, files), capsys)
    check_one_line(code, err, [w.format(tmp=files) for w in words])
    if "--out" not in extra:
        assert not out.exists()  # a refused run leaves no results folder behind


@pytest.mark.parametrize("args, words", [c[1:] for c in OTHER_CASES], ids=[c[0] for c in OTHER_CASES])
def test_bad_input_of_other_commands(files, capsys, quick_model, args, words, monkeypatch):
    monkeypatch.chdir(files)  # submit's default runs/ and leaderboards/ folders, should anything get that far
    code, _, err = invoke(fill(args, files), capsys)
    check_one_line(code, err, words)


def test_refused_curve_creates_no_folder(files, capsys):
    """Before: `curve --out curves/c1.txt` created curves/ and then failed in matplotlib."""
    code, _, err = invoke(["curve", "--board-dir", str(files / "boards"), "--out", str(files / "new" / "c1.txt")], capsys)
    assert code == 2 and not (files / "new").exists()


def test_nothing_malformed_reaches_summary_json(files, capsys, quick_model):
    """Before: epsilon "lots" was written into summary.json, which then failed its own schema."""
    out = files / "lots"
    code, _, err = invoke(run_args(out) + ["--defense", f"{PLUGINS}/bad.py:GuaranteeNotANumber"], capsys)
    assert code == 2 and not (out / "summary.json").exists()


def test_a_deeply_nested_entry_is_skipped_and_the_board_carries_on(files, capsys):
    """Before: 1,000 nested `[` in one 2 KB entry file stopped `leaderboard` with a RecursionError."""
    import json

    from test_leaderboard import make_entry

    board = files / "boards" / "quick"
    (board / "fine.json").write_text(json.dumps(make_entry("Fine")))
    (board / "deep.json").write_text("[" * 1000 + "]" * 1000)
    code, out, err = invoke(["leaderboard", "--board-dir", str(files / "boards")], capsys)
    assert code == 0, err
    assert "skipped: " in err and "deep.json: not valid JSON: nested deeper than 64 levels" in err
    assert "quick: 1 ranked" in out and "Traceback" not in err


def test_a_deeply_nested_summary_is_one_line(files):
    from invbench.folder import FolderError, read_summary

    (files / "deep-summary").mkdir()
    (files / "deep-summary" / "summary.json").write_text("{" * 500 + "}" * 500)
    with pytest.raises(FolderError, match="nested deeper than 64 levels"):
        read_summary(files / "deep-summary")


def test_debug_shows_the_traceback(files, capsys):
    with pytest.raises(AttackError, match="unknown attack 'nope'"):
        main(["--debug"] + run_args(files / "out") + ["--attack", "nope"])


def test_debug_shows_the_traceback_of_a_usage_error(files):
    import click

    with pytest.raises(click.BadParameter):
        main(["--debug"] + run_args(files / "out") + ["--sigma", "abc"])


def test_short_texts_are_skipped_with_a_count(files, tiny_model):
    texts = files / "mixed.txt"
    texts.write_text(f"Hi.\n{LONG}\nOk.\n{LONG} Again.\n")
    notes: list[str] = []
    found, source = prompts_module.load_prompts(str(texts), tokenizer=tiny_model.tokenizer, n=3, tokens=8, seed=0,
                                                notify=notes.append)
    assert len(found) == 2 and "2 shorter texts skipped" in source
    assert notes == ["note: only 2 of 3 prompts: the source ran out (2 texts shorter than 8 tokens skipped)"]


def test_short_texts_skipped_through_the_cli(files, capsys):
    texts = files / "mixed.txt"
    texts.write_text(f"Hi.\n{LONG}\n")
    code, out, err = invoke(["utility", "--model", "tiny-gpt2", "--device", "cpu", "--n", "2", "--tokens", "8",
                             "--dataset", str(texts)], capsys)
    assert code == 0, err
    assert "only 1 of 2 prompts" in err and "1 texts shorter than 8 tokens skipped" in err
    assert "1 texts x 8 tokens" in out


@pytest.mark.parametrize("attack, option, value, words", [
    ("continuous", "lr", float("inf"), "continuous: --lr must be a finite number > 0, got inf"),
    ("continuous", "loss_threshold", float("nan"), "continuous: --loss-threshold must be a finite number >= 0"),
    ("guided", "max_candidates", 10**20, "guided: --max-candidates must be an integer >= 0 and <= 2147483647"),
    ("projection", "max_steps", 0, "projection: --max-steps must be an integer >= 1"),
])
def test_attack_options_are_bounded_from_python_too(attack, option, value, words):
    """The bounds an option declares (attacks.base.option) hold for Python callers as for the CLI."""
    from invbench.attacks import make_attack

    with pytest.raises(AttackError, match=re.escape(words)):
        make_attack(attack, overrides={option: value})


@pytest.mark.parametrize("field, value, words", [("seed", -1, "--seed must be an integer in 0..4294967295"),
                                                 ("out", " ", "--out is empty")])
def test_run_config_from_python_is_checked(field, value, words):
    from invbench.config import RunConfig
    from invbench.runner import RunError, run

    with pytest.raises(RunError, match=re.escape(words)):
        run(RunConfig(model="tiny-gpt2", device="cpu", **{field: value}), echo=lambda line: None)


def test_fit_ranker_records_the_documents_it_used(capsys, monkeypatch, tmp_path):
    """Before: --documents 99999999 was recorded in the recipe, though the source had far fewer."""
    from invbench.attacks import ranker

    used = {}
    monkeypatch.setattr(ranker, "fit_ranker", lambda oracle, *, texts, recipe, out, **kw: used.update(
        texts=len(texts), recipe=recipe) or out)
    code, _, err = invoke(["fit-ranker", "--model", "tiny-gpt2", "--device", "cpu", "--documents", "99999999",
                           "--out", str(tmp_path / "r.safetensors")], capsys)
    assert code == 0, err
    assert used["recipe"].documents == used["texts"] < 99999999
    assert f"only {used['texts']} training documents are available" in err
