"""Honest verdicts: search failures, leaks / protected / inconclusive, and the certified radius."""
import json
import math

import pytest
import torch

from helpers import invoke
from invbench import radius, verdicts
from invbench.leaks.codebook import first_position_gaps

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["run", "--model", "tiny-gpt2", "--device", "cpu", "--n", "3", "--tokens", "3"]


def summary_of(out):
    return json.loads((out / "summary.json").read_text())


# --- the rule -----------------------------------------------------------------------------
def test_search_failure_means_the_truth_scores_better_than_the_wrong_answer():
    assert verdicts.is_search_failure(truth=0.0, answer=1e-3, tokens=3, exact=False)
    assert not verdicts.is_search_failure(truth=2.0, answer=1.0, tokens=3, exact=False)  # the defence's doing
    assert not verdicts.is_search_failure(truth=0.0, answer=1e-12, tokens=3, exact=True)  # recovered: no miss
    assert not verdicts.is_search_failure(truth=1.0, answer=1.0 + 1e-7, tokens=3, exact=False)  # float error


@pytest.mark.parametrize("em, tok, sf, expected", [
    (0.5, 0.9, 0.0, "leaks"), (0.0, 0.5, 0.0, "leaks"),  # exact prompts, or tokens well above a blind guess
    (0.0, 0.1, 0.9, "inconclusive"), (0.02, 0.1, 0.04, "inconclusive"),  # misses that could hide a leak
    (0.0, 0.1, 0.0, "protected"), (0.0, 0.12, 0.02, "protected"), (0.0, 0.0, None, None),
])
def test_attack_verdict_thresholds(em, tok, sf, expected):
    evidence = verdicts.Evidence(exact_match=em, token_accuracy=tok, search_failure_rate=sf)
    assert verdicts.attack_verdict(evidence, blind_token_accuracy=0.05) == expected


def test_run_verdict_leaks_beats_protected_beats_inconclusive():
    assert verdicts.run_verdict({"a": "inconclusive", "b": "leaks"}) == ("leaks", "b")
    assert verdicts.run_verdict({"a": "inconclusive", "b": "protected"}) == ("protected", "b")
    assert verdicts.run_verdict({"a": "inconclusive"}) == ("inconclusive", "a")
    assert verdicts.run_verdict({"a": None}) == (None, None)


# --- real runs ----------------------------------------------------------------------------
def test_a_leak_by_token_accuracy_alone_is_not_called_a_recovered_text():
    says = verdicts.explain("leaks", "guided", exact_match=0.0, token_accuracy=0.42, blind_token_accuracy=0.01,
                            search_failure_rate=1.0, attacks=["guided"])
    assert "recovers part of the text (token accuracy 0.42 against 0.01 for a blind guess" in says
    assert "recovers the text (exact match" not in says


def test_the_run_verdict_names_the_strongest_leaking_attack(tmp_path, capsys):
    # both leak, continuous (capped at 2 steps, listed first) less than scan: the leak is scan's
    code, out, err = invoke(TINY + ["--attack", "continuous,scan", "--steps", "2", "--out", tmp_path], capsys)
    assert code == 0, err
    summary = summary_of(tmp_path)
    continuous = summary["attacks"]["continuous"]
    assert continuous["verdict"] == "leaks" and continuous["exact_match"] < 1.0 == summary["attacks"]["scan"]["exact_match"]
    assert summary["verdict"]["attack"] == "scan" and "LEAKS: scan recovers the text" in out


def test_capped_continuous_gives_search_failures_and_inconclusive(tmp_path, capsys):
    code, out, err = invoke(TINY + ["--attack", "continuous", "--steps", "1", "--candidates", "1", "--out", tmp_path],
                            capsys)
    assert code == 0, err
    attack = summary_of(tmp_path)["attacks"]["continuous"]
    assert attack["exact_match"] == 0.0 and attack["search_failure_rate"] == 1.0
    assert attack["verdict"] == "inconclusive" and summary_of(tmp_path)["verdict"]["verdict"] == "inconclusive"
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert all(r["objective_truth"] < r["objective_answer"] for r in records)
    assert "verdict: INCONCLUSIVE" in out and "Do not read this as privacy" in out


def test_heavy_dp_noise_is_protected_with_no_search_failure_for_scan(tmp_path, capsys):
    code, out, err = invoke(TINY + ["--n", "2", "--tokens", "2", "--attack", "scan", "--defense", "dp", "--clip", "1",
                                    "--noise-multiplier", "100", "--out", tmp_path], capsys)
    assert code == 0, err
    summary = summary_of(tmp_path)
    scan = summary["attacks"]["scan"]
    assert scan["exact_match"] == 0.0 and scan["search_failure_rate"] == 0.0 and scan["verdict"] == "protected"
    assert summary["verdict"]["verdict"] == "protected" and "verdict: PROTECTED" in out


def test_no_defense_with_scan_leaks_and_measures_the_whole_radius(tmp_path, capsys):
    code, out, err = invoke(TINY + ["--n", "2", "--attack", "scan,guided", "--ranker", "prior", "--out", tmp_path],
                            capsys)
    assert code == 0, err
    summary = summary_of(tmp_path)
    assert summary["attacks"]["scan"]["verdict"] == "leaks" and summary["verdict"]["verdict"] == "leaks"
    assert "verdict: LEAKS" in out
    r = summary["radius"]
    assert r["scope"] == "all positions" and all(p["positions"] == "all" and len(p["gaps"]) == 3 for p in r["per_prompt"])
    first = [p["first_position_gap"] for p in r["per_prompt"]]
    assert all(p["radius"] == pytest.approx(min(p["gaps"]) / 2) for p in r["per_prompt"]) and min(first) > 0


# --- the radius ---------------------------------------------------------------------------
def test_radius_is_half_the_hand_computed_gap():
    # Three tokens' position-1 states: 0 and 1 are 3-4-5 apart, 2 is far from both.
    codebook = torch.tensor([[0.0, 0.0], [3.0, 4.0], [30.0, 40.0]])
    gaps = first_position_gaps(codebook, torch.tensor([0, 2]))
    assert gaps.tolist() == pytest.approx([5.0, math.dist((3, 4), (30, 40))])
    per_prompt = radius.prompt_radii([5.0], [[8.0, 2.0]], dim=2, tokens=3)
    assert per_prompt[0]["radius"] == 1.0  # min(5, 8, 2) / 2
    assert per_prompt[0]["sigma_expected"] == pytest.approx(1 / math.sqrt(2))
    assert per_prompt[0]["sigma_certified"] == pytest.approx(1 / (math.sqrt(2) + math.sqrt(2 * math.log(3 / 0.01))))
    only_first = radius.prompt_radii([5.0], [None], dim=2, tokens=3)[0]
    assert only_first["radius"] == 2.5 and only_first["positions"] == "first"
    summary = radius.summarise_radii([only_first], dim=2, tokens=3)
    assert summary["scope"] == "position 1" and "upper bound" in summary["note"]


def test_certified_sigma_really_recovers(tiny):
    """Noise at the certified sigma cannot move the nearest codebook entry (position 1)."""
    from invbench.leaks.oracle import WhiteBox

    oracle = WhiteBox(tiny.model)
    ids = torch.tensor([[15496], [464], [40]])
    states = oracle.capture(ids)[:, 0]
    everything = oracle.hidden_of_tokens(oracle.prefix(torch.zeros(1, 0, dtype=torch.long)),
                                         torch.arange(oracle.vocab_size)[None])[0]
    gaps = first_position_gaps(everything, ids[:, 0])
    sigma = min(radius.sigma_certified(g / 2, dim=states.shape[-1], tokens=1) for g in gaps.tolist())
    noisy = states + torch.randn(states.shape, generator=torch.Generator().manual_seed(0)) * sigma
    nearest = torch.cdist(noisy, everything).argmin(dim=1)
    assert torch.equal(nearest, ids[:, 0])
