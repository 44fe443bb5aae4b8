import pytest

from invbench import metrics


def test_token_metrics_by_hand():
    target, recovered = [5, 6, 7, 8], [5, 6, 9, 8]
    assert not metrics.exact_match(target=target, recovered=recovered)
    assert metrics.exact_match(target=target, recovered=list(target))
    assert metrics.token_accuracy(target=target, recovered=recovered) == 0.75
    assert metrics.first_error(target=target, recovered=recovered) == 2
    assert metrics.first_error(target=target, recovered=target) is None


def test_similarity_is_difflib_ratio_by_hand():
    # "abcd" vs "abed": 3 matching characters out of 8 in total -> 2 * 3 / 8
    assert metrics.similarity(target_text="abcd", recovered_text="abed") == 0.75
    assert metrics.similarity(target_text="same", recovered_text="same") == 1.0


def test_detector_auroc_by_hand():
    # failed prompts score 0.35 and 0.8, exact ones 0.1 and 0.4: of the 4 (failed, exact)
    # pairs, the failed prompt scores higher in 3.
    auroc = metrics.detector_auroc(scores=[0.1, 0.4, 0.35, 0.8], failed=[False, False, True, True])
    assert auroc == 0.75
    assert metrics.detector_auroc(scores=[1, 2, 3], failed=[False, True, True]) == 1.0
    assert metrics.detector_auroc(scores=[1, 1], failed=[False, True]) == 0.5  # a tie counts half


def test_detector_auroc_undefined_when_one_class():
    assert metrics.detector_auroc(scores=[1.0, 2.0], failed=[False, False]) is None
    assert metrics.detector_auroc(scores=[1.0, 2.0], failed=[True, True]) is None


def test_non_finite_values_become_null():
    assert metrics.finite_or_none(float("inf")) is None
    assert metrics.finite_or_none(2.5) == pytest.approx(2.5)


def test_worst_case_tie_goes_to_the_attack_stronger_by_the_other_metrics_then_to_the_name():
    attacks = {"continuous": {"exact_match": 0.0, "token_accuracy": 0.0, "similarity": 0.3},
               "guided": {"exact_match": 0.0, "token_accuracy": 0.2, "similarity": 0.4},
               "projection": {"exact_match": 0.0, "token_accuracy": 0.2, "similarity": 0.4}}
    worst = metrics.worst_case(attacks)
    # exact match ties at 0: guided and projection recover more tokens than continuous; then the name
    assert worst["exact_match"] == {"value": 0.0, "attack": "guided"}
    assert worst["similarity"] == {"value": 0.4, "attack": "guided"}
    attacks["projection"]["similarity"] = 0.5
    assert metrics.worst_case(attacks)["exact_match"]["attack"] == "projection"
    assert metrics.worst_case(dict(reversed(attacks.items()))) == metrics.worst_case(attacks)
