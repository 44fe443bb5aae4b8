"""Sweeps and privacy-utility curves: a 3-point sweep end to end (local and Ray), resume, curve
files read as validated data, plots, and one-line errors."""
from helpers import spy_on_attacks
import dataclasses
import json
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from invbench import runner
from invbench.cli import cli, main
from invbench.curves import Curve, CurveError, CurvePoint, load_curve, load_curves, save_curve
from invbench.defenses import DefenseError
from invbench.protocols import PROTOCOLS
from invbench.sweep import SweepError, grid_points, parse_param_lists, sweep

# `quick`, made cheaper still: 2 prompts x 2 tokens, one attack, 50 Adam steps.
CHEAP = dataclasses.replace(PROTOCOLS["quick"], n=2, tokens=2, attacks=("continuous",), preset="fast",
                            attack_options={"steps": 50}, prompts_sha256=None)  # not quick's prompts
# On tiny-gpt2 (unit-scale hidden states after ln_f) sigma 1 still leaks everything: these three
# span the curve, exact match 1.0 -> 0.5 -> 0.0.
SIGMAS = [0.0, 1.5, 3.0]



@pytest.fixture(scope="module")
def swept(tmp_path_factory, one_thread):
    """`invbench sweep` over gaussian sigma under the (patched) quick protocol."""
    root = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        with PROTOCOLS.override("quick", CHEAP):
            result = CliRunner().invoke(cli, ["sweep", "--defense", "gaussian", "--param", "sigma=0,1.5,3",
                                              "--protocol", "quick", "--device", "cpu", "--runs-dir",
                                              str(root / "runs"), "--board-dir", str(root / "boards")],
                                        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    curve_files = list((root / "boards" / "quick" / "curves").glob("*.json"))
    assert len(curve_files) == 1
    return {"root": root, "stdout": result.stdout, "curve_file": curve_files[0]}


def test_sweep_writes_a_curve_whose_leak_falls_as_noise_grows(swept):
    curve = load_curve(swept["curve_file"])
    assert swept["curve_file"].name.startswith(f"gaussian-{curve.date}-") and curve.protocol == "quick"
    assert [p.params for p in curve.points] == [{"sigma": s} for s in SIGMAS]
    em = [p.worst_case_exact_match for p in curve.points]
    assert em[0] == 1.0 and em[-1] == 0.0 and em == sorted(em, reverse=True)
    assert curve.points[0].top1_agreement == 1.0 and curve.points[0].kl_clean_defended == pytest.approx(0, abs=1e-6)
    kl = [p.kl_clean_defended for p in curve.points]
    assert kl == sorted(kl) and all(p.epsilon is None for p in curve.points)  # gaussian: no guarantee
    assert curve.versions["torch"] and curve.protocol_settings["n"] == 2
    for s, p in zip(["0", "1.5", "3"], curve.points):
        run_dir = swept["root"] / "runs" / "quick" / "gaussian" / f"sigma={s}"
        assert Path(p.run_dir) == run_dir and (run_dir / "summary.json").is_file()
    out = swept["stdout"]
    assert "sigma=1.5" in out and f"curve: {swept['curve_file']}" in out and "plot:" in out


def test_sweep_plot_is_a_real_png(swept):
    png = swept["curve_file"].with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 800 and height >= 300 and len(png) > 20_000


def test_rerun_resumes_without_attack_work(swept, monkeypatch):
    runs = swept["root"] / "runs"
    records = {p: p.read_bytes() for p in runs.rglob("records.jsonl")}
    assert len(records) == 3
    attacked = spy_on_attacks(monkeypatch)
    again = sweep(defense="gaussian", grid={"sigma": SIGMAS}, protocol=CHEAP, runs_dir=runs, device="cpu",
                  echo=lambda line: None)
    assert attacked == []
    assert {p: p.read_bytes() for p in runs.rglob("records.jsonl")} == records
    first = load_curve(swept["curve_file"])
    assert [p.worst_case_exact_match for p in again.points] == [p.worst_case_exact_match for p in first.points]
    assert again.digest == first.digest  # same runs, same curve id


def test_curve_command_plots_several_defenses_and_compares_history(swept, tmp_path):
    boards = tmp_path / "boards"
    curves_dir = boards / "quick" / "curves"
    curves_dir.mkdir(parents=True)
    data = json.loads(swept["curve_file"].read_text())
    older = {**data, "created": "2026-01-01T00:00:00+00:00"}
    older["points"] = [{**p, "worst_case_exact_match": 1.0} for p in data["points"]]
    other = {**data, "defense": "dp", "defense_spec": "dp"}
    other["points"] = [{**p, "top1_agreement": 1.0 - 0.1 * i} for i, p in enumerate(data["points"])]
    for name, content in {"gaussian-new.json": data, "gaussian-old.json": older, "dp.json": other}.items():
        (curves_dir / name).write_text(json.dumps(content))
    (curves_dir / "broken.json").write_text("{")
    (curves_dir / "deep.json").write_text("[" * 1000 + "]" * 1000)  # before: a RecursionError traceback

    result = CliRunner().invoke(cli, ["curve", "--protocol", "quick", "--board-dir", str(boards),
                                      "--out", str(tmp_path / "all.png")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "all.png").read_bytes()[:4] == b"\x89PNG"
    assert "dp " in result.stdout and "gaussian " in result.stdout and "broken.json" in result.output
    assert "skipped " in result.output and "deep.json: not valid JSON (nested deeper than 64 levels)" in result.output

    result = CliRunner().invoke(cli, ["curve", "--defense", "gaussian", "--compare", "--protocol", "quick",
                                      "--board-dir", str(boards), "--out", str(tmp_path / "history.png")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "history.png").stat().st_size > 20_000
    assert result.stdout.index("2026-01-01") < result.stdout.index(data["created"])  # oldest first


def test_curve_compare_across_protocols_and_the_noise_panel(swept, tmp_path):
    """One defence's latest curve under two protocols; noisy curves get the sigma panel with the
    certified radius, inconclusive points drawn hollow."""
    boards = tmp_path / "boards"
    data = json.loads(swept["curve_file"].read_text())
    assert [p["noise_std"] for p in data["points"]] == SIGMAS
    assert all(p["verdict"] in ("leaks", "protected", "inconclusive") for p in data["points"])
    other = {**data, "protocol": "other"}
    other["points"] = [{**p, "verdict": "inconclusive", "sigma_certified": 0.5, "radius_scope": "position 1"}
                       for p in data["points"]]
    for protocol, content in (("quick", data), ("other", other)):
        (boards / protocol / "curves").mkdir(parents=True)
        (boards / protocol / "curves" / "gaussian.json").write_text(json.dumps(content))
    result = CliRunner().invoke(cli, ["curve", "--defense", "gaussian", "--compare", "--protocol", "quick",
                                      "--protocol", "other", "--board-dir", str(boards),
                                      "--out", str(tmp_path / "both.png")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    png = (tmp_path / "both.png").read_bytes()
    width, _ = struct.unpack(">II", png[16:24])
    assert width >= 1800  # three columns: top-1, KL and sigma (a row per privacy metric)
    assert result.stdout.count("points") == 2 and "other/curves/gaussian.json" in result.stdout
    result = CliRunner().invoke(cli, ["curve", "--protocol", "quick", "--protocol", "other", "--board-dir",
                                      str(boards), "--out", str(tmp_path / "x.png")])
    assert result.exit_code != 0 and "only go with --compare" in str(result.exception)


def _mangled(data, path, value):
    """A copy of `data` with the field at `path` set to `value` (deleted when value is ...)."""
    data = json.loads(json.dumps(data))
    *parents, last = path
    target = data
    for key in parents:
        target = target[key]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return data


@pytest.mark.parametrize("path, value, field", [
    (("points", 0, "top1_agreement"), ..., "points[0].top1_agreement"),
    (("points", 1, "worst_case_exact_match"), "high", "points[1].worst_case_exact_match"),
    (("points", 2, "worst_case_token_accuracy"), 1.5, "points[2].worst_case_token_accuracy"),
    (("points", 0, "params"), {"sigma": [1]}, "points[0].params"),
    (("points",), [], "points"),
    (("format",), "something-else", "format"),
    (("created",), "yesterday", "created"),
    (("versions",), ..., "versions"),
])
def test_malformed_curve_file_is_one_line_error_naming_file_and_field(swept, tmp_path, path, value, field):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_mangled(json.loads(swept["curve_file"].read_text()), path, value)))
    with pytest.raises(CurveError) as info:
        load_curve(bad)
    message = str(info.value)
    assert "\n" not in message and str(bad) in message and repr(field) in message


def test_a_curve_validates_with_plain_jsonschema():
    """The committed file alone, no invbench code, checks a curve as save_curve writes it."""
    import jsonschema

    schema = json.loads((Path(__file__).resolve().parents[1] / "bench/schemas/curve.schema.json").read_text())
    point = CurvePoint(params={"sigma": 0.1}, worst_case_exact_match=0.5, worst_case_token_accuracy=0.6,
                       top1_agreement=0.9, kl_clean_defended=0.01, epsilon=None, verdict="leaks")
    data = json.loads(json.dumps(Curve(protocol="quick", defense="gaussian", points=[point]).to_dict()))
    jsonschema.validate(data, schema)
    data["points"][0]["params"]["sigma"] = [1]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema)


def test_curve_that_is_not_json_is_one_line_error_and_skipped_in_a_listing(tmp_path):
    bad = tmp_path / "curves" / "gaussian-x.json"
    bad.parent.mkdir()
    bad.write_text('{"format": "invbench-curve/1", "points": [')
    with pytest.raises(CurveError, match="not valid JSON") as info:
        load_curve(bad)
    assert "\n" not in str(info.value) and str(bad) in str(info.value)
    warnings = []
    assert load_curves(tmp_path, warn=warnings.append) == [] and len(warnings) == 1


def test_param_lists_parse_into_a_grid():
    assert parse_param_lists(["sigma=0.001, 0.003,0.01", "noise-multiplier=1"]) == {
        "sigma": ["0.001", "0.003", "0.01"], "noise_multiplier": ["1"]}


@pytest.mark.parametrize("pairs, message", [
    (["sigma"], "expects NAME=V1,V2"),
    (["=0.1"], "expects NAME=V1,V2"),
    (["sigma="], "empty value"),
    (["sigma=0.1,,0.2"], "empty value"),
    (["sigma=0.1,0.1"], "listed twice"),
    (["sigma=0.1", "sigma=0.2"], "given twice"),
    ([], "at least one --param"),
])
def test_bad_param_lists_are_one_line_errors(pairs, message):
    with pytest.raises(SweepError, match=message) as info:
        parse_param_lists(pairs)
    assert "\n" not in str(info.value)


def test_grid_points_check_values_before_any_run(tmp_path):
    points = grid_points("dp", {"noise_multiplier": ["0.5", "2"], "clip": ["1"]}, tmp_path)
    assert [p.out.name for p in points] == ["clip=1,noise_multiplier=0.5", "clip=1,noise_multiplier=2"]
    with pytest.raises(DefenseError, match="not a valid float"):
        grid_points("gaussian", {"sigma": ["0.1", "lots"]}, tmp_path)
    with pytest.raises(DefenseError, match="no parameter 'bits'"):
        grid_points("gaussian", {"bits": ["8"]}, tmp_path)
    with pytest.raises(SweepError, match="same point"):
        grid_points("gaussian", {"sigma": ["0.1", "1e-1"]}, tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--param", "sigma"], "error: --param expects NAME=V1,V2,..., got 'sigma'"),
    (["--param", "sigma=0.1", "--protocol", "nope"], "error: unknown protocol 'nope'"),
    (["--param", "sigma=0.1", "--address", "x:1"], "error: --address only applies to --engine ray"),
])
def test_sweep_command_errors_are_one_line(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["sweep", "--defense", "gaussian", "--runs-dir", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith(message) and err.count("\n") == 1


@pytest.mark.slow  # starts a local Ray instance
def test_ray_sweep_lands_in_the_same_run_directories(swept, tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'invbench[ray]'")
    curve = sweep(defense="gaussian", grid={"sigma": SIGMAS}, protocol=CHEAP, runs_dir=tmp_path, engine="ray",
                  device="cpu", echo=lambda line: None)
    local = load_curve(swept["curve_file"])
    assert [p.params for p in curve.points] == [p.params for p in local.points]
    assert [p.config_hash for p in curve.points] == [p.config_hash for p in local.points]
    assert [p.worst_case_exact_match for p in curve.points] == [p.worst_case_exact_match for p in local.points]
    for s in ("0", "1.5", "3"):
        assert (tmp_path / "quick" / "gaussian" / f"sigma={s}" / "summary.json").is_file()
    # What the Ray tasks wrote is an ordinary run: a local sweep over the same folders resumes it.
    attacked = []
    monkeypatch.setattr(runner, "attack_pending", lambda attack, leak, *a, done, **kw: attacked.extend(
        p.index for p in leak.prompts if p.index not in done))
    again = sweep(defense="gaussian", grid={"sigma": SIGMAS}, protocol=CHEAP, runs_dir=tmp_path, device="cpu",
                  echo=lambda line: None)
    assert attacked == [] and again.digest == curve.digest


def test_a_curve_with_an_infinite_cost_is_saved_with_null_there(tmp_path):
    """dp at a large multiplier destroys the states: the perplexity ratio overflows to inf, which JSON
    cannot hold (the sweep died after its last point with a traceback)."""
    point = CurvePoint(params={"noise_multiplier": 1.0}, worst_case_exact_match=0.0, worst_case_token_accuracy=0.0,
                       top1_agreement=0.0, kl_clean_defended=481.0, epsilon=10.0, perplexity_ratio=float("inf"))
    path = save_curve(Curve(protocol="quick", defense="dp", points=[point]), tmp_path)
    assert json.loads(path.read_text())["points"][0]["perplexity_ratio"] is None
    assert load_curve(path).points[0].kl_clean_defended == 481.0


def _curve_of(points: list[dict]) -> Curve:
    base = {"worst_case_exact_match": 0.0, "worst_case_token_accuracy": 0.0, "top1_agreement": 1.0,
            "kl_clean_defended": 0.1, "epsilon": None}
    return Curve(protocol="quick", defense="gaussian", points=[CurvePoint(**{**base, **p}) for p in points],
                 grid={}, defense_spec="gaussian", protocol_settings={}, versions={}, created="2026-12-02T00:00:00+00:00")


def test_the_plot_has_a_panel_of_token_accuracy_and_one_of_exact_match_against_top1():
    """Before: both metrics shared one panel per axis; now each has its own row, token accuracy (the
    board's ranking) first, and the inconclusive points and the certified radius are drawn on both."""
    import matplotlib.pyplot as plt

    from invbench.curves import curve_figure

    curve = _curve_of([
        {"params": {"sigma": 0.1}, "worst_case_exact_match": 1.0, "worst_case_token_accuracy": 1.0,
         "top1_agreement": 0.99, "noise_std": 0.1, "sigma_certified": 0.2, "radius_scope": "all positions",
         "verdict": "leaks"},
        {"params": {"sigma": 1.0}, "worst_case_exact_match": 0.0, "worst_case_token_accuracy": 0.8,
         "top1_agreement": 0.7, "noise_std": 1.0, "verdict": "inconclusive"}])
    fig = curve_figure([curve])
    try:
        grid = fig.axes
        assert len(grid) == 6  # 2 metrics x (top-1, KL, noise std)
        top1_token, top1_exact = grid[0], grid[3]
        assert "token accuracy" in top1_token.get_ylabel() and "exact match" in top1_exact.get_ylabel()
        assert "top-1 agreement" in top1_token.get_title() and "top-1 agreement" in top1_exact.get_title()
        lines = lambda ax: [line for line in ax.get_lines() if len(line.get_xdata()) > 0  # noqa: E731
                            and line.get_linestyle() != ":"]
        assert list(lines(top1_token)[0].get_ydata()) == [0.8, 1.0]  # sorted by top-1: 0.7, 0.99
        assert list(lines(top1_exact)[0].get_ydata()) == [0.0, 1.0]
        for ax in grid:
            hollow = [line for line in lines(ax) if line.get_markerfacecolor() == "white"]
            assert len(hollow) == 1 and len(hollow[0].get_xdata()) == 1  # the inconclusive point
        for noise in (grid[2], grid[5]):
            assert [line.get_xdata()[0] for line in noise.get_lines() if line.get_linestyle() == ":"] == [0.2]
            assert noise.get_xscale() == "log"
    finally:
        plt.close(fig)


def test_a_plot_without_noise_has_two_columns():
    import matplotlib.pyplot as plt

    from invbench.curves import curve_figure

    fig = curve_figure([_curve_of([{"params": {"bits": 4}}, {"params": {"bits": 2}, "top1_agreement": 0.5}])])
    try:
        assert len(fig.axes) == 4 and not any(ax.get_xscale() == "log" for ax in fig.axes)
    finally:
        plt.close(fig)


def test_a_redrawn_curve_that_did_not_change_is_not_stored_again(tmp_path):
    """Redrawing a board's curves on another day returns the stored file; a curve whose figures changed
    under the same configurations (an entry rerun with better code) is stored anew."""
    first = _curve_of([{"params": {"sigma": 0.1}, "config_hash": "aa"}])
    path = save_curve(first, tmp_path)
    later = dataclasses.replace(first, created="2026-12-04T09:00:00+00:00")
    assert later.file_name != first.file_name and later.digest == first.digest
    assert save_curve(later, tmp_path) == path
    assert len(list(path.parent.glob("*.json"))) == 1
    changed = dataclasses.replace(later, points=[dataclasses.replace(later.points[0], worst_case_exact_match=1.0)])
    assert changed.digest == first.digest  # the digest names configurations, not figures
    assert save_curve(changed, tmp_path) != path and len(list(path.parent.glob("*.json"))) == 2
