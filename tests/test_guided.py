"""guided (ranked verification with a certified stop) on the seeded tiny GPT-2, and its pieces.

Most tests use conftest.py's 2,000-token sub-vocabulary oracle `small` (as test_scan.py does), so
that full-vocabulary fallbacks take a second; the codebook test uses the full GPT-2 vocabulary.
"""
import math

import pytest
import torch
from safetensors.torch import save_file
from scipy.stats import chi2, gamma

from helpers import invoke
from invbench.attacks import make_attack
from invbench.attacks.likelihood import Likelihood
from invbench.defenses.noise import GaussianNoise
from invbench.attacks.guided import (BUDGET, CERTIFIED, CODEBOOK, EXHAUSTED, FLIPPED, GuidedAttack,
                                     interleaved_order, ranks)
from invbench.attacks.ranker import Recipe, fit_ranker, load_ranker, read_ranker
from invbench.defenses import make_defense
from invbench.leaks.codebook import Codebook
from invbench.leaks.oracle import WhiteBox, document_start_token
from invbench.leaks.prompts import ranker_training_texts

NONE = make_defense("none", {})
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INVBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def run(attack, oracle, targets, defense=NONE):
    return attack.run(oracle, targets, defense=defense, prompt_indices=list(range(len(targets))), seed=0,
                      notify=lambda line: None)


def rank_truth_last(oracle, truth, monkeypatch):
    """Make the model's prior give the true next token the lowest score of all, at every position."""
    real_prior = oracle.log_prior

    def worst_prior(prefix):
        scores = real_prior(prefix).clone()
        scores[:, truth[prefix.length]] = -1e9
        return scores

    monkeypatch.setattr(oracle, "log_prior", worst_prior)


# --- pieces -------------------------------------------------------------------------------
def test_interleaved_order_alternates_and_keeps_each_token_once():
    first = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])  # order 0 1 2 3 4
    second = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])  # order 4 3 2 1 0
    assert interleaved_order([first, second]).tolist() == [[0, 4, 1, 3, 2]]
    assert interleaved_order([first]).tolist() == [[0, 1, 2, 3, 4]]


def sorted_twice(scores: list[torch.Tensor]) -> torch.Tensor:
    """interleaved_order as it was written first: five sorts per row (ranks by two argsorts, keys by a third)."""
    key = None
    for j, score in enumerate(scores):
        slot = score.argsort(dim=1, descending=True).argsort(dim=1) * len(scores) + j
        key = slot if key is None else torch.minimum(key, slot)
    return key.argsort(dim=1)


def test_interleaved_order_is_the_order_five_sorts_gave_token_for_token():
    """One sort per row and a scatter give the same ranking, ties included (scores with many equal
    values, rows repeated within a group as sequence's hypotheses share a prompt's learned row)."""
    generator = torch.Generator().manual_seed(0)
    learned = torch.randint(0, 40, (3, 500), generator=generator).float()  # many ties
    owner = torch.tensor([0, 0, 0, 1, 2, 2])
    prior = torch.randn(6, 500, generator=generator).log_softmax(dim=1)
    prior[:, :50] = prior[:, :1]  # ties in the sum as well
    scores = [learned[owner] + prior, learned[owner]]
    assert torch.equal(interleaved_order(scores, groups=[None, owner]), sorted_twice(scores))
    assert torch.equal(interleaved_order(scores), sorted_twice(scores))
    assert torch.equal(ranks(learned[owner], groups=owner), learned[owner].argsort(dim=1, descending=True).argsort(dim=1))
    different = learned[owner].clone()
    different[1, 0] += 1.0  # a group whose rows differ is ranked row by row
    assert torch.equal(ranks(different, groups=owner), different.argsort(dim=1, descending=True).argsort(dim=1))


def test_acceptance_threshold_is_the_chi2_quantile_and_passes_true_noise():
    d, sigma = 576, 0.3
    threshold = Likelihood(GaussianNoise(sigma), d).threshold(miss_probability=1e-4, tolerance=0.0)
    assert chi2.sf(threshold * d / sigma ** 2, d) == pytest.approx(1e-4, rel=1e-6)
    assert Likelihood(None, d).threshold(miss_probability=1e-4, tolerance=1e-7) == 1e-7
    # The true token's MSE under the defence's noise is the noise's mean square: it passes at the stated rate.
    generator, misses, draws = torch.Generator().manual_seed(0), 0, 0
    for _ in range(20):
        noise = torch.randn(10_000, d, generator=generator) * sigma
        misses += int((noise.pow(2).mean(dim=1) >= threshold).sum())
        draws += 10_000
    assert misses / draws <= 2.5e-4  # expected 1e-4 (20 of 200,000); 2.5e-4 is 7 standard errors above


def test_codebook_lookup_equals_scan_at_position_1(oracle, prompt_ids, cache):
    """Full vocabulary: the codebook's nearest entry is the scan's first token, at the same loss."""
    targets = oracle.capture(prompt_ids[:2])
    noisy = make_defense("gaussian", {"sigma": 0.05})
    noisy_targets = noisy.apply(targets, generator=torch.Generator().manual_seed(3))
    for defense, goal in ((NONE, targets), (noisy, noisy_targets)):
        scan = make_attack("scan").run(oracle, goal[:, :1], defense=defense, prompt_indices=[0, 1], seed=0)
        guided = run(make_attack("guided", overrides={"ranker": "prior"}), oracle, goal[:, :1], defense)
        assert torch.equal(guided.tokens, scan.tokens)
        assert torch.allclose(guided.discrete_loss, scan.discrete_loss, rtol=1e-4, atol=1e-9)
        assert (guided.extras["ended"] == CODEBOOK).all() and (guided.extras["candidates"] == 0).all()
    assert Codebook(oracle).path.is_file()


# --- the attack ---------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.0, 0.02])
def test_guided_equals_scan_on_clean_and_noisy_states(small, cache, sigma):
    oracle, ids = small
    defense = make_defense("gaussian", {"sigma": sigma}) if sigma else NONE
    targets = defense.apply(oracle.capture(ids), generator=torch.Generator().manual_seed(1))
    scan = make_attack("scan").run(oracle, targets, defense=defense, prompt_indices=[0, 1, 2], seed=0)
    guided = run(make_attack("guided", overrides={"ranker": "prior"}), oracle, targets, defense)
    assert torch.equal(guided.tokens, scan.tokens) and torch.equal(guided.tokens, ids)
    assert torch.allclose(guided.discrete_loss, scan.discrete_loss, rtol=1e-4, atol=1e-9)
    later = guided.extras["ended"][:, 1:]
    assert (later == CERTIFIED).all()  # every later position stopped at a passing candidate
    assert (guided.extras["candidates"][:, 1:] < oracle.vocab_size).any()


def test_fallback_reaches_the_truth_when_the_ranker_ranks_it_last(small, cache, monkeypatch):
    oracle, ids = small
    targets = oracle.capture(ids[:1])
    truth = ids[0]
    rank_truth_last(oracle, truth, monkeypatch)
    out = run(make_attack("guided", overrides={"ranker": "prior"}), oracle, targets)
    assert torch.equal(out.tokens[0], truth)
    assert (out.extras["candidates"][0, 1:] == oracle.vocab_size).all()  # it had to verify all of them
    assert (out.extras["ended"][0, 1:] == CERTIFIED).all()  # the last candidate passed


def test_map_scoring_is_the_gaussian_posterior(small, cache):
    oracle, ids = small
    noisy = make_defense("gaussian", {"sigma": 0.5})
    targets = noisy.apply(oracle.capture(ids), generator=torch.Generator().manual_seed(2))
    attack = make_attack("guided", overrides={"ranker": "prior", "scoring": "map"})
    objective = attack.objective(oracle, targets, ids, defense=noisy)
    mse = (noisy.simulate(oracle.capture(ids)) - targets).pow(2).mean(-1)
    expected = targets.shape[-1] * mse / (2 * 0.5 ** 2) - oracle.log_prior_of(ids)
    assert torch.allclose(objective, expected, rtol=1e-5)
    assert attack.scoring_used(noisy).startswith("map") and attack.scoring_used(NONE).startswith("ml")
    out = run(attack, oracle, targets, noisy)
    assert out.tokens.shape == ids.shape


# --- caches -------------------------------------------------------------------------------
def test_corrupt_or_foreign_codebook_is_reported_and_rebuilt(small, cache):
    oracle, _ = small
    book = Codebook(oracle, notify=lambda line: None)
    good = book.states().clone()
    book.path.write_bytes(b"not a safetensors file")
    notes = []
    assert torch.equal(Codebook(oracle, notify=notes.append).states(), good)
    assert len(notes) == 2 and "unreadable" in notes[0] and "rebuilding" in notes[0]
    save_file({"states": good.cpu()}, str(book.path), metadata={**book.metadata(), "weights_sha256": "0" * 64})
    notes.clear()
    assert torch.equal(Codebook(oracle, notify=notes.append).states(), good)
    assert "another model" in notes[0] and "weights_sha256" in notes[0]


def test_ranker_fits_loads_and_a_corrupt_or_foreign_one_is_refit(tiny, cache):
    oracle = WhiteBox(tiny.model, tokenizer=tiny.tokenizer, name="tiny-gpt2",
                      start_token=document_start_token(tiny.tokenizer))
    recipe = Recipe(documents=40, held_out=8, tokens_per_document=32, epochs=2, batch_size=64, random_sequences=16)
    notes = []
    ranker = load_ranker(oracle, spec="auto", notify=notes.append, recipe=recipe)
    assert any("fitting one once" in n for n in notes)
    metrics = ranker.metadata["held_out_accuracy"]
    assert metrics["clean"]["top64"] > 0.5  # far above chance (64 / 50257) after 32 steps on 32 documents
    assert ranker.metadata["data"].startswith("bundled C4 validation documents 300-")
    path = next(cache.glob("rankers/*.safetensors"))
    assert read_ranker(path, oracle, fingerprint=oracle.fingerprint, notify=notes.append) is not None
    path.write_bytes(b"garbage")
    notes.clear()
    again = load_ranker(oracle, spec="auto", notify=notes.append, recipe=recipe)
    assert any("unreadable" in n for n in notes) and any("fitting one once" in n for n in notes)
    assert again.metadata["held_out_accuracy"] == metrics  # the same recipe and seed fit the same ranker
    notes.clear()
    other = WhiteBox(tiny.model, layer=1, tokenizer=tiny.tokenizer, name="tiny-gpt2")
    assert read_ranker(path, other, fingerprint=other.fingerprint, notify=notes.append) is None
    assert "another model or layer" in notes[0] and "layer" in notes[0]


def test_ranker_training_documents_are_disjoint_from_every_protocol_prompt(tiny):
    """By construction: every C4 protocol takes its prompts from the first documents of the bundled
    sample (0-299), and the ranker learns from documents 300 on, none of which is one of them."""
    import re

    from invbench.leaks.models import load_model
    from invbench.leaks.prompts import RANKER_FIRST_DOC, _bundled_rows, load_prompts
    from invbench.protocols import PROTOCOLS

    sample = [row["text"] for row in _bundled_rows("c4_validation_sample.jsonl")]
    texts, _ = ranker_training_texts(notify=lambda line: None)
    assert len(sample) == RANKER_FIRST_DOC and not {t[:200] for t in texts} & {t[:200] for t in sample}
    for protocol in PROTOCOLS.values():
        if protocol.dataset != "c4":
            continue
        tokenizer = tiny.tokenizer if "gpt2" in protocol.model else load_model(protocol.model).tokenizer
        prompts, source = load_prompts("c4", tokenizer=tokenizer, n=protocol.n, tokens=protocol.tokens, seed=0,
                                       notify=lambda line: None)
        skipped = int(re.search(r"(\d+) shorter texts skipped", source).group(1))
        assert len(prompts) == protocol.n and len(prompts) + skipped <= RANKER_FIRST_DOC, protocol.name


# --- the command line ---------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--scoring", "bogus"], "bogus"),
    (["--ranker", "/no/such/ranker.safetensors"], "is not a file"),
])
def test_bad_guided_option_is_one_line_and_exit_2(tmp_path, capsys, cache, extra, message):
    code, _, err = invoke(["run", "--model", "tiny-gpt2", "--attack", "guided", "--n", "1", "--tokens", "2",
                           "--device", "cpu", "--out", str(tmp_path / "out")] + extra, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow  # loads SmolLM2 and scans its vocabulary
def test_certified_stop_passes_the_true_token_and_rejects_the_nearest_wrong_on_smollm2():
    from invbench.attacks.base import mse
    from invbench.attacks.scan import vocabulary_distances
    from invbench.leaks.models import load_model
    from invbench.leaks.prompts import load_prompts

    loaded = load_model("smollm2-135m", notify=lambda line: None)
    oracle = WhiteBox(loaded.model)
    prompts, _ = load_prompts("c4", tokenizer=loaded.tokenizer, n=1, tokens=4, seed=0, notify=lambda line: None)
    ids = torch.tensor([prompts[0].ids])
    targets = oracle.capture(ids)
    tolerance = GuidedAttack.config_class().tolerance
    t = 3
    distances = vocabulary_distances(oracle, oracle.prefix(ids[:, :t]), targets[:, t], NONE, chunk_size=2048,
                                     autocast=None)[0]
    true = distances[ids[0, t]].item()
    distances[ids[0, t]] = math.inf
    assert true < tolerance < distances.min().item()
    assert mse(oracle.hidden_of_tokens(oracle.prefix(ids[:, :t]), ids[:, t:t + 1])[0, 0], targets[0, t]) < tolerance


def test_a_failed_prefix_costs_at_most_after_failure_per_position(small, cache):
    """A wrong first token (forced by a target of another prompt at position 1) leaves no later
    token that passes: the first such position verifies everything, the next ones `after_failure`."""
    oracle, ids = small
    targets = oracle.capture(ids[:1]).clone()
    targets[0, 0] = oracle.capture(ids[1:2])[0, 0]  # position 1 decodes to prompt 1's first token
    out = run(make_attack("guided", overrides={"ranker": "prior", "after_failure": 16}), oracle, targets)
    assert out.tokens[0, 0] == ids[1, 0]
    assert out.extras["candidates"][0, 1] == oracle.vocab_size and out.extras["ended"][0, 1] == EXHAUSTED
    assert (out.extras["candidates"][0, 2:] == 16).all()
    assert (out.extras["ended"][0, 2:] == BUDGET).all()


def test_a_flipped_coordinate_keeps_the_full_budget_for_the_right_prefix(small, cache, monkeypatch):
    """A discontinuous defence can flip a boundary coordinate between the capture and the attack's
    path (seen with top-k 256 on SmolLM2): here position 2's target has one coordinate moved, so its
    true token misses the strict test. It is still the best of the whole vocabulary and agrees
    elsewhere, so the position ends `flipped` and later positions keep their full budget: with the
    truth ranked last and `after_failure` 1, only that budget reaches it."""
    oracle, ids = small
    truth = ids[0]
    targets = oracle.capture(ids[:1]).clone()
    targets[0, 1, 7] += 1.0  # one flipped coordinate at position 2
    rank_truth_last(oracle, truth, monkeypatch)
    attack = make_attack("guided", overrides={"ranker": "prior", "after_failure": 1})
    out = run(attack, oracle, targets)
    assert torch.equal(out.tokens[0], truth)
    assert out.extras["ended"][0, 1] == FLIPPED and (out.extras["ended"][0, 2:] == CERTIFIED).all()
    assert (out.extras["candidates"][0, 2:] == oracle.vocab_size).all()
    assert out.discrete_loss[0, 1] < 1e-9  # the trimmed fit (the full MSE is 1 / d)
    # The same target with the check switched off: the prompt counts as failed and loses the rest.
    monkeypatch.setattr("invbench.attacks.guided.FLIP_COORDINATES", 0)
    strict = run(make_attack("guided", overrides={"ranker": "prior", "after_failure": 1}), oracle, targets)
    assert strict.extras["ended"][0, 1] == EXHAUSTED and (strict.extras["ended"][0, 2:] == BUDGET).all()
    assert not torch.equal(strict.tokens[0], truth)


def test_max_candidates_budget_is_stated_in_the_endings(small, cache, monkeypatch):
    oracle, ids = small
    truth = ids[0]
    rank_truth_last(oracle, truth, monkeypatch)
    out = run(make_attack("guided", overrides={"ranker": "prior", "max_candidates": 100}), oracle,
              oracle.capture(ids[:1]))
    assert out.extras["candidates"][0, 1] == 100 and out.extras["ended"][0, 1] == BUDGET
    assert out.tokens[0, 1] != truth[1]


# Computed at commit ae519c0, before attacks scored with the defence's noise law (attacks/likelihood.py):
# the sub-vocabulary oracle, gaussian sigma 1.5 drawn from seed 5. (tokens, summed discrete loss per
# prompt, candidate forwards in all)
BEFORE_NOISE_LAWS = {
    ("guided", "ml"): ([[623, 220, 683, 1029], [1777, 823, 1781, 1806], [26, 1710, 1211, 889]],
                       [12.124218, 11.296766, 10.795896], 4060),
    ("guided", "map"): ([[623, 623, 210, 811], [1777, 823, 261, 1488], [26, 1710, 1710, 889]],
                        [12.460901, 11.09789, 11.282133], 3392),
    ("scan", "beam 2"): ([[623, 48, 0, 22], [1777, 113, 1307, 215], [26, 90, 325, 889]],
                         [8.833517, 7.936535, 8.227948], 0),
}


@pytest.mark.parametrize("key", list(BEFORE_NOISE_LAWS))
def test_gaussian_results_are_those_from_before_noise_laws(small, cache, key):
    oracle, ids = small
    noisy = make_defense("gaussian", {"sigma": 1.5})
    targets = noisy.apply(oracle.capture(ids), generator=torch.Generator().manual_seed(5))
    name, setting = key
    overrides = {"beam": 2} if name == "scan" else {"ranker": "prior", "scoring": setting}
    out = make_attack(name, overrides=overrides).run(oracle, targets, defense=noisy, prompt_indices=[0, 1, 2], seed=0,
                                                     notify=lambda line: None)
    tokens, losses, candidates = BEFORE_NOISE_LAWS[key]
    assert out.tokens.tolist() == tokens
    assert out.discrete_loss.sum(1).tolist() == pytest.approx(losses, abs=1e-5)
    assert int(out.extras.get("candidates", torch.zeros(1)).sum()) == candidates


def test_attacks_score_a_laplace_defence_with_its_own_law(small, cache):
    """Laplace noise: the statistic is the mean absolute error (ml), -log p is d MAE / b (map), and
    the certified stop is the Gamma quantile, not Gaussian's chi-square."""
    oracle, ids = small
    laplace = make_defense("laplace", {"clip": 50.0, "epsilon": 400.0})  # b = 2 C / eps = 0.25 per coordinate
    targets = laplace.apply(oracle.capture(ids), generator=torch.Generator().manual_seed(3))
    simulated = laplace.simulate(oracle.capture(ids))
    mae = (simulated - targets).abs().mean(-1)
    for name in ("guided", "scan"):
        attack = make_attack(name, overrides={"ranker": "prior"} if name == "guided" else {})
        assert torch.allclose(attack.objective(oracle, targets, ids, defense=laplace), mae, rtol=1e-5)
    as_map = make_attack("guided", overrides={"ranker": "prior", "scoring": "map"})
    expected = targets.shape[-1] * mae / 0.25 - oracle.log_prior_of(ids)
    assert torch.allclose(as_map.objective(oracle, targets, ids, defense=laplace), expected, rtol=1e-5)
    assert as_map.scoring_used(laplace) == "map (Laplace likelihood, scale 0.25, plus the model's prior)"
    state = as_map.prepare(oracle, targets, defense=laplace, prompt_indices=[0, 1, 2], seed=0, notify=lambda line: None)
    assert state.threshold == pytest.approx(0.25 * gamma.ppf(1 - 1e-4, targets.shape[-1]) / targets.shape[-1] + 1e-7)
    out = make_attack("sequence", overrides={"ranker": "prior"}).run(oracle, targets, defense=laplace,
                                                                     prompt_indices=[0, 1, 2], seed=0, notify=lambda line: None)
    assert torch.equal(out.tokens, ids)  # b 0.25 on states of RMS 1: every token recovered
