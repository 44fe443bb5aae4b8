"""The published-attacks study (bench/studies/study_published.py) on the tiny seeded model: its loops
recover the true token where the attacks do, record first hits as int or None, stay faithful to
the attacks' own inner loops, and stacked rows behave as if alone."""
from __future__ import annotations

import json

import pytest
import torch

from invbench.studies import study_published as sp
from invbench.attacks import make_attack
from invbench.defenses import make_defense
from invbench.studies.study_published_report import load_runs, render_tables, summarise

POSITIONS = [(0, 0), (1, 0), (0, 3), (2, 3)]


@pytest.fixture(scope="module")
def problems(tiny, oracle, one_thread):
    return sp.build_problems(tiny, oracle, n_prompts=3, tokens=4, positions=POSITIONS, seed=42)


def test_positions_and_starts(problems):
    assert problems.groups() == {0: [0, 1], 3: [2, 3]}
    # the attacks' own random start: randint(V, (T,), generator=prompt_generator(seed, prompt))
    assert problems.random_init.shape == (3, 4)
    assert sp.balanced_positions(10, 10, 3).count((0, 0)) == 1 and len(sp.balanced_positions(10, 10, 3)) == 30
    assert {t for _, t in sp.balanced_positions(10, 10, 3)} == set(range(10))


def test_setting_specs_round_trip():
    assert sp.setting_name(sp.parse_setting("continuous", "paper")) == "paper"
    s = sp.parse_setting("projection", "grad=fixed,lr=0.1,reset_base=100")
    assert (s.grad, s.lr, s.reset_base) == ("fixed", 0.1, 100)
    assert sp.parse_setting("projection", sp.setting_name(s)) == s
    with pytest.raises(SystemExit):
        sp.parse_setting("continuous", "momentum=3")


def test_default_settings_find_the_true_token_on_tiny_gpt2(oracle, problems):
    settings = [sp.parse_setting("continuous", "steps=40")]
    out = sp.study_settings(oracle, problems, "continuous", settings)["steps=40"]
    assert [(r["prompt"], r["t"]) for r in out] == POSITIONS
    for rec in out:
        for metric in sp.METRICS:
            hit = rec["first_hit"][metric]
            assert isinstance(hit, int) and 0 < hit <= 40  # the random start is never the true token here
        assert rec["final_rank"]["l1"] == 0 and rec["traj_rank"][0] > 0  # started far, ended at the truth
        assert rec["traj_steps"][0] == 0 and rec["seconds"] > 0
    proj = sp.study_settings(oracle, problems, "projection", [sp.parse_setting("projection", "steps=40")])["steps=40"]
    assert all(isinstance(r["first_hit"], int) and r["accepted"] and r["final_rank"] == 0 for r in proj)
    assert all(r["steps_run"] == r["first_hit"] for r in proj)  # accepted the step the truth became the candidate


def test_a_budget_too_small_records_none(oracle, problems):
    out = sp.study_settings(oracle, problems, "continuous", [sp.parse_setting("continuous", "steps=1,lr=0.001")])
    for rec in out["lr=0.001,steps=1"]:
        assert rec["first_hit"]["l1"] is None and rec["final_rank"]["l1"] > 0 and rec["steps_run"] == 1


def test_continuous_loop_is_the_attacks_own(oracle, problems):
    """The study's loop (random start) ends at the same loss and step count as
    ContinuousAttack._optimise from the same start token."""
    setting = sp.parse_setting("continuous", "steps=25,lr=0.02")
    recs = sp.study_settings(oracle, problems, "continuous", [setting])[sp.setting_name(setting)]
    attack = make_attack("continuous", preset="fast", overrides={"steps": 25, "lr": 0.02})
    for t, members in problems.groups().items():
        prompts = torch.tensor([problems.positions[i][0] for i in members])
        prefix = oracle.prefix(problems.ids[prompts, :t])
        _, steps, loss = attack._optimise(oracle, prefix, problems.targets[prompts, t], problems.random_init[prompts, t],
                                          make_defense("none", {}))
        for j, i in enumerate(members):
            assert recs[i]["steps_run"] == int(steps[j])
            assert recs[i]["final_loss"] == pytest.approx(float(loss[j]), rel=1e-4, abs=1e-9)


def test_projection_loop_is_the_attacks_own(oracle, problems):
    recs = sp.study_settings(oracle, problems, "projection", [sp.parse_setting("projection", "steps=30")])["steps=30"]
    attack = make_attack("projection", overrides={"max_steps": 30})
    sq = oracle.embedding.pow(2).sum(dim=-1)
    for t, members in problems.groups().items():
        prompts = torch.tensor([problems.positions[i][0] for i in members])
        prefix = oracle.prefix(problems.ids[prompts, :t])
        period = sp.reset_period(oracle.vocab_size, t, base=50)
        token, _, steps, accepted = attack._search(oracle, prefix, problems.targets[prompts, t],
                                                   problems.random_init[prompts, t], make_defense("none", {}),
                                                   budget=30, period=period, sq_norms=sq)
        for j, i in enumerate(members):
            assert recs[i]["steps_run"] == int(steps[j]) and recs[i]["accepted"] == bool(accepted[j])
            assert int(token[j]) == recs[i]["true_id"]


def test_stacked_rows_behave_as_if_alone(oracle, problems):
    both = sp.study_settings(oracle, problems, "continuous",
                             [sp.parse_setting("continuous", "steps=20"), sp.parse_setting("continuous", "steps=20,lr=0.01")])
    alone = sp.study_settings(oracle, problems, "continuous", [sp.parse_setting("continuous", "steps=20,lr=0.01")])
    key = "lr=0.01,steps=20"
    assert [r["first_hit"] for r in both[key]] == [r["first_hit"] for r in alone[key]]
    assert [r["traj_rank"] for r in both[key]] == [r["traj_rank"] for r in alone[key]]


def test_ranker_warm_start_is_skipped_with_a_note_when_missing(oracle, problems):
    if problems.ranker_top1 is not None:
        pytest.skip("a ranker is installed")
    out = sp.study_settings(oracle, problems, "projection", [sp.parse_setting("projection", "init=ranker,steps=5")])
    assert all("no shipped or cached ranker" in r["skipped"] for r in out["steps=5,init=ranker"])


def test_cli_run_resumes_and_reports(tmp_path, monkeypatch, capsys, one_thread):
    args = ["run", "--model", "tiny-gpt2", "--attack", "projection", "--n", "2", "--tokens", "3", "--positions", "0,2",
            "--settings", "steps=10", "--out", str(tmp_path)]
    sp.main(args)
    path = tmp_path / "tiny-gpt2" / "projection" / "steps=10.json"
    data = json.loads(path.read_text())
    assert data["complete"] and sorted(data["groups"]) == ["0", "2"]
    before = path.stat().st_mtime_ns
    sp.main(args)  # finished: nothing to redo
    assert path.stat().st_mtime_ns == before
    runs = load_runs(tmp_path)
    s = summarise(runs["tiny-gpt2"]["projection"]["steps=10"], "projection")
    assert s["n"] == 4 and s["hits"] == 4
    assert "| `steps=10` | 4 |" in render_tables(runs)


def test_a_zero_proxy_is_no_cosine_hit(oracle):
    """Every cosine is 0 at a zero proxy (the zeros init): a tie, not a hit of the true token."""
    tracker = sp.RankTracker(oracle.embedding)
    r2, rc, _, _ = tracker.l2_cos(torch.zeros(2, oracle.embedding.shape[1]), torch.tensor([5, 7]))
    assert (rc >= 1).all()
