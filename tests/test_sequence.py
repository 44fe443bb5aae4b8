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
    assert not sequence.extras.get("flat", torch.zeros(1)).any()  # few candidates pass: nothing is flat


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
    assert set(out.extras) == {"candidates", "hypotheses", "ended", "flat", "rank"}
    assert out.tokens.shape == out.discrete_loss.shape == out.extras["hypotheses"].shape == ids.shape
    records = [{"hypotheses": out.extras["hypotheses"][i].tolist(), "candidates": out.extras["candidates"][i].tolist(),
                "flat": out.extras["flat"][i].tolist(), "rank": out.extras["rank"][i].tolist(),
                "ended": ["certified" if e == CERTIFIED else "budget" for e in out.extras["ended"][i].tolist()]}
               for i in range(len(ids))]
    diagnostics = attack.diagnostics(records, defense=defense)
    assert diagnostics["budget"] == {"hypotheses": 256, "margin_nats": 20.0, "max_forwards_per_prompt": 50_000,
                                     "noisy_max_candidates": 8192}
    assert diagnostics["hypotheses_per_position"]["mean"] >= 1
    assert 0 <= diagnostics["flat_positions"] <= 1 and diagnostics["answer_rank_per_position"]["mean"] >= 0
    assert diagnostics["scoring"].startswith("map (Gaussian likelihood, sigma 2")


# --- flat positions (bench/studies/HEAVY-NOISE.md) ---------------------------------------------------------------
def test_a_candidate_its_prior_puts_out_of_reach_is_not_verified(small, cache):
    """The skip rule on made-up numbers: one prompt with two hypotheses (scores 0 and 30 nats, margin 20),
    one with a single hypothesis, lowest nll so far 100, slack 5, so every candidate's nll is taken >= 95."""
    attack = make_attack("sequence", overrides={"ranker": "prior"})
    score, owner = torch.tensor([0.0, 30.0, 0.0]), torch.tensor([0, 0, 1])
    skip = attack._flat_skip(score, owner, may_skip=torch.tensor([True, True, False]))
    keep = attack.config.keep
    objective = torch.full((3, keep), 101.0)  # each row's `keep` best so far: nll 100 + 1 nat of prior
    log_prior = torch.tensor([[-1.0, -5.0, -7.0], [-1.0, -1.0, -1.0], [-30.0, -30.0, -30.0]])
    flat = dict(objective=objective, lowest=torch.full((3,), 100.0), passes=torch.full((3,), 64), verified=64)
    skipped = skip(torch.arange(3), log_prior, **flat)
    # row 0: 95 + 1 could enter its row's best four, 95 + 5 too, 95 + 7 >= 101 could not
    assert skipped[0].tolist() == [False, False, True]
    assert skipped[1].all()  # 30 + 95 + 1 is more than 20 nats behind the prompt's best so far (0 + 101)
    assert not skipped[2].any()  # a row that may not skip (a prompt's only hypothesis) verifies all
    rare = dict(flat, passes=torch.full((3,), 8))  # 8 of 64 passed: the test still tells tokens apart
    assert not skip(torch.arange(3), log_prior, **rare).any()


def steep(oracle, monkeypatch, temperature=10.0):
    """A peaked prior on the random tiny model (whose own prior is nearly flat): the regime where the
    prior decides what a destroyed state cannot."""
    plain = oracle._log_probs
    monkeypatch.setattr(oracle, "_log_probs", lambda state: torch.log_softmax(plain(state) * temperature, dim=-1))


def test_on_destroyed_states_skipping_keeps_the_answer_for_fewer_forwards(small, cache, monkeypatch):
    """sigma 20 on states of RMS about 1: every candidate passes the test (every position flat, the
    prompts destroyed). Without the beam cap, the skip rule alone gives the same tokens and objective as
    the search before it, for fewer forwards."""
    oracle, ids = small
    steep(oracle, monkeypatch)
    defense, targets = defended(oracle, ids, 20.0, seed=0)
    before = run(make_attack("sequence", overrides={"ranker": "prior", "flat_pass": 2.0}), oracle, targets, defense)
    skipping = run(make_attack("sequence", overrides={"ranker": "prior", "flat_hypotheses": 256}), oracle, targets, defense)
    assert not before.extras["flat"].any() and skipping.extras["flat"][:, 1:].all()
    assert torch.equal(skipping.tokens, before.tokens)
    assert torch.equal(skipping.discrete_loss, before.discrete_loss)
    assert skipping.extras["candidates"].sum() < 0.7 * before.extras["candidates"].sum()


def test_destroyed_prompts_keep_few_hypotheses_and_the_answer_still_beats_the_truth(small, cache, monkeypatch):
    """The beam cap: 256 hypotheses at the codebook position (never flat), at most flat_hypotheses while
    every verified position has been flat; the answer's hypothesis ranked within them, and it explains
    the states better than the truth (no search failure: on destroyed states that is what a protected
    verdict rests on)."""
    oracle, ids = small
    steep(oracle, monkeypatch)
    defense, targets = defended(oracle, ids, 20.0, seed=0)
    attack = make_attack("sequence", overrides={"ranker": "prior"})
    before = run(make_attack("sequence", overrides={"ranker": "prior", "flat_pass": 2.0}), oracle, targets, defense)
    out = run(attack, oracle, targets, defense)
    cap = attack.config.flat_hypotheses
    assert (out.extras["hypotheses"][:, 0] == 256).all() and (out.extras["hypotheses"][:, 1:] <= cap).all()
    assert (out.extras["rank"][:, 1:] < cap).all()  # position 1's rank is among the codebook's 256
    assert out.extras["candidates"].sum() < 0.5 * before.extras["candidates"].sum()
    objective = attack.objective(oracle, targets, out.tokens, defense=defense).sum(1)
    assert (objective < attack.objective(oracle, targets, ids, defense=defense).sum(1)).all()


@pytest.mark.parametrize("attack, sigma", [("guided", 0.5), ("guided", 2.0), ("sequence", 0.5), ("sequence", 2.0)])
def test_a_prompts_answer_does_not_depend_on_the_prompts_beside_it(small, cache, attack, sigma):
    """verify reruns a random subset of an entry's prompts and compares them one by one: each prompt's answer
    (and its candidates verified) must be what it is alone, whatever else shares its batch (before: the
    verification rounds were cut at the smallest budget among the rows, so a row stopped at another boundary)."""
    oracle, ids = small
    defense, targets = defended(oracle, ids, sigma, seed=3)
    together = run(make_attack(attack, overrides={"ranker": "prior"}), oracle, targets, defense)
    for row in range(len(ids)):
        alone = make_attack(attack, overrides={"ranker": "prior"}).run(
            oracle, targets[row:row + 1], defense=defense, prompt_indices=[row], seed=0, notify=lambda line: None)
        assert torch.equal(alone.tokens[0], together.tokens[row]), (attack, sigma, row)
        assert torch.equal(alone.extras["candidates"][0], together.extras["candidates"][row]), (attack, sigma, row)


@pytest.mark.parametrize("layer", [0, 1])
def test_before_the_last_layer_too_a_prompts_work_is_its_own(tiny, cache, layer):
    """8 prompts of random ids on a 2,000-token vocabulary at a noise of twice the states' RMS: each prompt's
    answer and forward passes are what it spends alone (at layer 0 one prompt's count once differed)."""
    from invbench.leaks.oracle import WhiteBox

    full = tiny.model.get_input_embeddings().weight.detach()
    keep = torch.unique(torch.randperm(full.shape[0], generator=torch.Generator().manual_seed(0))[:2000])
    oracle = WhiteBox(tiny.model, layer=layer, tokenizer=tiny.tokenizer, name="tiny-gpt2-sub").restrict_vocabulary(keep)
    ids = torch.randint(0, 2000, (8, 5), generator=torch.Generator().manual_seed(5))
    states = oracle.capture(ids)
    defense = make_defense("gaussian", {"sigma": 2 * states.pow(2).mean().sqrt().item()})
    targets = defense.apply(states, generator=torch.Generator().manual_seed(1))
    options = {"ranker": "prior", "scoring": "map"}
    together = run(make_attack("sequence", overrides=options), oracle, targets, defense)
    for row in range(len(ids)):
        alone = make_attack("sequence", overrides=options).run(
            oracle, targets[row:row + 1], defense=defense, prompt_indices=[row], seed=0, notify=lambda line: None)
        assert torch.equal(alone.tokens[0], together.tokens[row]), row
        assert torch.equal(alone.extras["candidates"][0], together.extras["candidates"][row]), row


def test_skipped_candidates_cost_no_forward_and_the_others_measure_as_in_a_full_round(small, cache):
    """guided's measuring with a skip mask: the candidates left go through the model as (row, token)
    pairs and measure as they do in the rectangular round (float error apart); skipped ones are inf."""
    oracle, ids = small
    defense, targets = defended(oracle, ids, 2.0, seed=0)
    attack = make_attack("sequence", overrides={"ranker": "prior"})
    state = attack.prepare(oracle, targets, defense=defense, prompt_indices=[0, 1, 2], seed=0, notify=lambda line: None)
    prefix = oracle.prefix(ids[:, :2])
    candidates = torch.arange(18).reshape(3, 6)
    goal = targets[:, 2]
    full = attack._measure(oracle, prefix, goal, candidates, defense, state)
    skipped = torch.rand(3, 6, generator=torch.Generator().manual_seed(0)) < 0.5
    some = attack._measure(oracle, prefix, goal, candidates, defense, state, skipped=skipped)
    assert torch.isinf(some[skipped]).all()
    assert torch.allclose(some[~skipped], full[~skipped], rtol=1e-5, atol=1e-6)
    assert torch.isinf(attack._measure(oracle, prefix, goal, candidates, defense, state,
                                       skipped=torch.ones(3, 6, dtype=torch.bool))).all()
