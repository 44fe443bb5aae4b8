"""The house rules: what each folder may import, one registry class, one summary schema, one
source for every flag, and the defects each of these rules closed (each test failed before)."""
import ast
import inspect
import json
import stat
import warnings
from pathlib import Path

import pytest
import torch

from helpers import invoke
from invbench.errors import InvbenchError
from invbench.registry import Registry, RegistryError

REPO = Path(__file__).resolve().parents[1]
# What a folder's modules may import from invbench besides themselves (the data flows one way:
# leak -> defend -> attack -> score -> record -> board). errors and registry import nothing.
ALLOWED = {
    "leaks": {"invbench.leaks", "invbench.errors", "invbench.registry"},
    "defenses": {"invbench.defenses", "invbench.errors", "invbench.registry"},
    "attacks": {"invbench.attacks", "invbench.leaks", "invbench.defenses", "invbench.errors", "invbench.registry"},
}
PACKAGE_OF = {"leaks": "invbench.leaks", "defenses": "invbench.defenses", "attacks": "invbench.attacks"}


def imported_modules(path: Path, package: str) -> set[str]:
    """Every invbench module a file imports, absolute (relative imports resolved)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level else ""
            found.add(f"{base}.{node.module}" if node.level and node.module else (node.module or base))
    return {m for m in found if m.startswith("invbench")}


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_each_folder_imports_only_what_its_place_allows(folder):
    for path in sorted((REPO / folder).rglob("*.py")):
        for module in imported_modules(path, PACKAGE_OF[folder]):
            assert any(module == a or module.startswith(a + ".") for a in ALLOWED[folder]), f"{path}: {module}"


def test_models_and_smollm2_do_not_import_each_other():
    """models.py loads smollm2 by alias; smollm2.py takes its cache and error from cache.py and
    errors.py, not from models.py (before: each imported the other)."""
    smollm2 = imported_modules(REPO / "leaks" / "smollm2.py", "invbench.leaks")
    assert "invbench.leaks.models" not in smollm2 and {"invbench.leaks.cache", "invbench.leaks.errors"} <= smollm2


def test_errors_and_registry_import_nothing_of_invbench_but_errors():
    assert imported_modules(REPO / "bench" / "errors.py", "invbench") == set()
    assert imported_modules(REPO / "bench" / "registry.py", "invbench") <= {"invbench.errors"}


def test_no_file_cites_a_design_document_outside_the_repository():
    folders = ("bench", "attacks", "defenses", "leaks", "docs")
    for path in [p for f in folders for p in (REPO / f).rglob("*") if p.suffix in (".py", ".md")] + [REPO / "README.md"]:
        assert "DESIGN" + ".md" not in path.read_text(encoding="utf-8"), path


# --- one registry class ------------------------------------------------------------------------
def test_registry_refuses_a_second_object_under_a_taken_name_and_lists_names_when_unknown():
    registry = Registry("widget")

    class A:
        name = "a"

    class B:
        name = "a"

    registry.register(A)
    registry.register(A)  # the same class again (a module imported twice) is fine
    with pytest.raises(RegistryError, match="widget name 'a' is taken by .*A; .*B cannot replace it"):
        registry.register(B)
    with pytest.raises(RegistryError, match=r"unknown widget 'x'; choose from a"):
        registry.get("x")
    with registry.override("a", B):
        assert registry["a"] is B
    assert registry["a"] is A
    assert issubclass(RegistryError, InvbenchError)


def test_a_plugin_cannot_replace_a_built_in_defense():
    """Before: register_defense overwrote silently, so an entry-point module that registered
    "gaussian" replaced the built-in, contrary to defenses/README.md."""
    from invbench.defenses import Defense, DefenseError, available_defenses, register_defense

    class Impostor(Defense):
        name = "gaussian"

    with pytest.raises(DefenseError, match="taken by invbench.defenses.builtin.Gaussian"):
        register_defense(Impostor)
    assert available_defenses()["gaussian"].__module__ == "invbench.defenses.builtin"


def test_every_registry_is_the_one_class():
    from invbench.attacks.registry import ATTACKS
    from invbench.defenses.registry import DEFENSES
    from invbench.leaks.models import MODELS
    from invbench.protocols import PROTOCOLS

    assert all(isinstance(r, Registry) for r in (ATTACKS, DEFENSES, MODELS, PROTOCOLS))
    assert {"guided", "continuous", "projection", "scan"} <= set(ATTACKS)
    assert {"gpt2", "smollm2-135m", "tiny-gpt2", "tiny-bytes", "gpt2-random"} <= set(MODELS)


# --- one source for flags ----------------------------------------------------------------------
def test_every_attack_option_is_one_flag_named_after_its_attacks(capsys):
    from invbench.attacks import available_attacks

    code, out, _ = invoke(["run", "--help"], capsys)
    assert code == 0
    for name, cls in available_attacks().items():
        for option in cls.option_names:
            flag = f"--{option.replace('_', '-')}"
            assert out.count(f"{flag} ") + out.count(f"{flag}\n") >= 1, flag
    assert out.count("--chunk-size") == 1 and "guided, scan, sequence: sequences per forward pass." in " ".join(out.split())


@pytest.mark.parametrize("flag", ["--device", "--model", "--layer", "--seed", "--runs-dir", "--board-dir", "--engine",
                                  "--address", "--ray-token-file", "--shard-size"])
def test_every_shared_flag_is_declared_in_one_place(flag):
    """Before: --board-dir was declared three times, --seed, --layer and --model three times in cli.py."""
    declared = {path.name: path.read_text(encoding="utf-8").count(f'"{flag}"')
                for path in sorted((REPO / "bench").glob("*.py"))}
    assert {name: count for name, count in declared.items() if count} == {"cli_options.py": 1}


@pytest.mark.parametrize("command", ["run", "utility", "fit-ranker", "submit", "verify", "sweep"])
def test_device_is_declared_once(command, capsys):
    _, out, _ = invoke([command, "--help"], capsys)
    assert "Where the model runs (auto: a CUDA GPU if there is one)." in " ".join(out.split())


@pytest.mark.parametrize("command, shards", [("run", True), ("submit", True), ("verify", True), ("sweep", False)])
def test_the_engine_flags_are_the_same_on_every_command(command, shards, capsys):
    """One --engine, --address and --ray-token-file for run, submit, verify and sweep (issue 40); --shard-size where
    a run's prompts are sharded."""
    _, out, _ = invoke([command, "--help"], capsys)
    text = " ".join(out.split())
    assert "ray: over a Ray cluster's workers" in text and "ray: the cluster's head, as `ray start --head`" in text
    assert "ray: a file holding the cluster's token" in text
    assert ("--shard-size" in text) == shards


def test_defenses_readme_example_is_the_plugin_as_shipped():
    source = (REPO / "defenses" / "topk.py").read_text(encoding="utf-8")
    readme = (REPO / "defenses" / "README.md").read_text(encoding="utf-8")
    body = source[source.index("\n@register_defense\n") + 1:].rstrip()
    assert body in readme and "differentiable = False" in body


def test_topk_takes_the_base_guarantee():
    from invbench.defenses import Defense
    from invbench.defenses.topk import TopK

    assert TopK.guarantee is Defense.guarantee


# --- the defects ---------------------------------------------------------------------------------
def test_plugin_with_a_blank_docstring_is_listed(capsys):
    """Before: `invbench defenses` crashed with IndexError on a docstring of only blanks."""
    from invbench.defenses import Defense
    from invbench.defenses.registry import DEFENSES

    class Blank(Defense):
        """   """

        name = "blank"

    with DEFENSES.override("blank", Blank):
        code, out, _ = invoke(["defenses"], capsys)
    assert code == 0 and "blank" in out


def test_leaderboard_pages_are_readable_by_others(tmp_path):
    """Before: LEADERBOARD.md and index.html were written with mkstemp's mode 0600."""
    from invbench.leaderboard import render

    (tmp_path / "quick").mkdir()
    rendered = render(tmp_path / "quick")
    for path in (rendered.markdown, rendered.html):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_no_future_warning_about_past_key_values(tiny):
    """Before: every run printed transformers' FutureWarning about `past_key_values`."""
    from invbench.leaks.oracle import WhiteBox

    oracle = WhiteBox(tiny.model)
    ids = torch.tensor([[15496, 995, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        prefix = oracle.prefix(ids[:, :2])
        oracle.hidden_of_tokens(prefix, ids[:, 2:])
        oracle.capture(ids)


# --- one typed summary ---------------------------------------------------------------------------
def test_summary_schema_names_every_field_of_the_dataclasses():
    from dataclasses import fields

    from invbench.summary import AttackSummary, RunSummary, schema

    committed = schema()
    assert {f.name for f in fields(RunSummary)} == set(committed["properties"])
    assert {f.name for f in fields(AttackSummary)} == set(committed["$defs"]["attack"]["properties"])


@pytest.mark.parametrize("path", sorted((REPO / "bench" / "schemas").glob("*.schema.json")), ids=lambda p: p.name)
def test_committed_schemas_are_valid_json_schema(path):
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(json.loads(path.read_text(encoding="utf-8")))


def test_schema_files_and_the_code_agree_on_versions_and_fields():
    from dataclasses import fields

    from invbench.curves import FORMAT, CurvePoint
    from invbench.entries import SCHEMA_VERSION
    from invbench.schema_check import load_schema

    assert load_schema("entry")["properties"]["schema_version"]["enum"][-1] == SCHEMA_VERSION  # the newest last
    assert load_schema("entry")["if"]["properties"]["schema_version"] == {"enum": [4, SCHEMA_VERSION]}  # need transcripts
    curve = load_schema("curve")
    assert curve["properties"]["format"]["const"] == FORMAT
    assert {f.name for f in fields(CurvePoint)} == set(curve["$defs"]["point"]["properties"])


def test_results_files_are_parsed_in_one_place():
    """Before: guided_bench parsed config.json and records.jsonl itself (no torn-line repair), though
    folder.py called itself the one place config.json is read."""
    for path in sorted((REPO / "bench").rglob("*.py")):
        if path.name != "folder.py":
            text = path.read_text(encoding="utf-8")
            assert '"config.json"' not in text and '"summary.json"' not in text, path


def test_a_version_0_summary_is_still_readable():
    from invbench.summary import RunSummary, SummaryError

    old = json.loads((REPO / "tests" / "data" / "summary-v0.json").read_text())
    summary = RunSummary.from_dict(old)
    assert summary.schema_version == 0 and summary.verdict is None and summary.attacks["scan"].verdict is None
    assert summary.strongest == "continuous"
    with pytest.raises(SummaryError, match="field attacks.scan.exact_match"):
        RunSummary.from_dict({**old, "attacks": {"scan": {**old["attacks"]["scan"], "exact_match": 2}}})


def test_runner_from_python_takes_the_cli_defaults(tmp_path):
    """Before: the CPU reduction lived in cli.py, so runner.run from Python ran 100 prompts."""
    from invbench.config import DEVICE_DEFAULTS, RunConfig
    from invbench.runner import run

    summary = run(RunConfig(model="tiny-gpt2", device="cpu", attacks=["continuous"], out=str(tmp_path)),
                  echo=lambda line: None)
    cpu = DEVICE_DEFAULTS["cpu"]
    assert (summary.n, summary.tokens) == (cpu.n, cpu.tokens)
    assert summary.attacks["continuous"].config["steps"] == cpu.capped["continuous"]["steps"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["command"]["attack_options"] == cpu.capped["continuous"]  # guided did not run: its cap is not set
