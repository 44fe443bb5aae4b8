"""sequence (beam search over hypotheses with guided's verification) on the seeded tiny GPT-2.

conftest.py's 2,000-token sub-vocabulary oracle `small` keeps every fallback to a second. The
tiny model's states have RMS about 1, so Gaussian sigma 2 hides many first tokens from the
codebook lookup, and later positions still tell them apart.
"""
import pytest
import torch

from invbench.attacks import make_attack
from invbench.attacks.guided import CERTIFIED
from invbench.attacks.sequence import group_rank
from invbench.defenses import make_defense

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INVBENCH_CACHE", str(tmp_path / "cache"))


def run(attack, oracle, targets, defense):
    return attack.run(oracle, targets, defense=defense, prompt_indices=list(range(len(targets))), seed=0,
                      notify=lambda line: None)


def defended(oracle, ids, sigma, seed):
    defense = make_defense("gaussian", {"sigma": sigma}) if sigma else make_defense("none", {})
    return defense, defense.apply(oracle.capture(ids), generator=torch.Generator().manual_seed(seed))


def test_group_rank_counts_within_each_prompt():
    assert group_rank(torch.tensor([0, 0, 0, 1, 2, 2])).tolist() == [0, 1, 2, 0, 0, 1]


@pytest.mark.parametrize("sigma", [0.0, 0.2, 1.0])
def test_where_no_decision_is_close_it_decodes_as_guided(small, cache, sigma):
    """Clean and lightly noised states: one hypothesis throughout, and guided's tokens, losses and cost."""
    oracle, ids = small
    defense, targets = defended(oracle, ids, sigma, seed=1)
    guided = run(make_attack("guided", overrides={"ranker": "prior", "scoring": "map"}), oracle, targets, defense)
    sequence = run(make_attack("sequence", overrides={"ranker": "prior"}), oracle, targets, defense)
    assert torch.equal(sequence.tokens, guided.tokens) and torch.equal(sequence.tokens, ids)
    assert torch.equal(sequence.discrete_loss, guided.discrete_loss)
    assert torch.equal(sequence.extras["candidates"], guided.extras["candidates"])
    assert torch.equal(sequence.extras["ended"], guided.extras["ended"])
    if sigma:
        assert (sequence.extras["hypotheses"] == 1).all()


def test_under_heavy_noise_the_whole_sequence_recovers_what_positions_alone_lose(small, cache):
    """sigma 2: guided, deciding each position alone, commits wrong tokens that keeping several
    hypotheses recovers (on this model the first token survives, the next ones do not); the answers
    score better under the objective both attacks minimise."""
    oracle, ids = small
    guided_hits = sequence_hits = guided_exact = sequence_exact = 0
    for seed in range(4):
        defense, targets = defended(oracle, ids, 2.0, seed)
        guided_attack = make_attack("guided", overrides={"ranker": "prior", "scoring": "map"})
        sequence_attack = make_attack("sequence", overrides={"ranker": "prior"})
        guided, sequence = run(guided_attack, oracle, targets, defense), run(sequence_attack, oracle, targets, defense)
        guided_hits += int((guided.tokens == ids).sum())
        sequence_hits += int((sequence.tokens == ids).sum())
        guided_exact += int((guided.tokens == ids).all(dim=1).sum())
        sequence_exact += int((sequence.tokens == ids).all(dim=1).sum())
        assert (sequence.extras["hypotheses"] > 1).any()  # some decision was in doubt
        objective = sequence_attack.objective(oracle, targets, sequence.tokens, defense=defense).sum()
        assert objective <= guided_attack.objective(oracle, targets, guided.tokens, defense=defense).sum() + 1e-3
    assert (guided_exact, sequence_exact) == (0, 4)  # of 12 prompts
    assert sequence_hits >= guided_hits + 8  # of 48 tokens


def test_the_per_prompt_budget_keeps_only_the_best_hypothesis(small, cache):
    oracle, ids = small
    defense, targets = defended(oracle, ids, 2.0, seed=1)
    free = run(make_attack("sequence", overrides={"ranker": "prior"}), oracle, targets, defense)
    capped = run(make_attack("sequence", overrides={"ranker": "prior", "max_forwards": 1}), oracle, targets, defense)
    assert (free.extras["hypotheses"][:, 1] > 1).any()
    assert (capped.extras["hypotheses"][:, 1:] == 1).all()  # past its first verified position: one hypothesis
    assert capped.extras["candidates"].sum() < free.extras["candidates"].sum()


def test_the_records_and_summary_say_what_the_search_did(small, cache):
    oracle, ids = small
    defense, targets = defended(oracle, ids, 2.0, seed=0)
    attack = make_attack("sequence", overrides={"ranker": "prior"})
    out = run(attack, oracle, targets, defense)
    assert set(out.extras) == {"candidates", "hypotheses", "ended"}
    assert out.tokens.shape == out.discrete_loss.shape == out.extras["hypotheses"].shape == ids.shape
    records = [{"hypotheses": out.extras["hypotheses"][i].tolist(), "candidates": out.extras["candidates"][i].tolist(),
                "ended": ["certified" if e == CERTIFIED else "budget" for e in out.extras["ended"][i].tolist()]}
               for i in range(len(ids))]
    diagnostics = attack.diagnostics(records, defense=defense)
    assert diagnostics["budget"] == {"hypotheses": 256, "margin_nats": 20.0, "max_forwards_per_prompt": 50_000,
                                     "noisy_max_candidates": 8192}
    assert diagnostics["hypotheses_per_position"]["mean"] >= 1
    assert diagnostics["scoring"].startswith("map (Gaussian likelihood, sigma 2")
