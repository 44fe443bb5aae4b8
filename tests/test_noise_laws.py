"""Noise laws (defenses/noise.py) and the defences that declare them: dchi, laplace.

Pinned values: `apply` of gaussian, dp and topk on a seeded generator, computed before the
noise-law interface existed (commit of this file), so every earlier result stays identical.
"""
import dataclasses
import math

import pytest
import torch
from scipy import optimize
from scipy.stats import chi2, gamma, norm

from invbench.defenses import GUARANTEE_KINDS, Defense, DefenseError, make_defense
from invbench.defenses.checks import check_defense
from invbench.defenses.noise import DChiNoise, GaussianNoise, LaplaceNoise

# (2, 3, 4) states, seed 1234; values at flat indices 0, 5, 11, 17, 23 (float32, exact)
PINNED_STATES = (torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) - 11.5) / 3
PINNED_INDEX = [0, 5, 11, 17, 23]
PINNED = [
    ("gaussian", {"sigma": 0.3},
     [-3.866848945617676, -1.9661545753479004, -0.3330839276313782, 2.2766685485839844, 3.9591915607452393]),
    ("dp", {"clip": 1.5, "noise_multiplier": 0.5},
     [-0.9409483075141907, -0.2974708676338196, -0.5797065496444702, 1.7842046022415161, 1.1718049049377441]),
    ("dp", {"clip": 2.0, "epsilon": 3.0, "delta": 1e-5},
     [-1.7642996311187744, 2.652742862701416, -3.2522501945495605, 9.121143341064453, 3.476447343826294]),
    ("topk", {"k": 2, "sigma": 0.1},
     [-3.8445050716400146, -2.0998294353485107, -0.055472422391176224, 0.1477784365415573, 3.875286102294922]),
]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_gaussian_dp_topk_apply_is_pinned():
    for name, params, expected in PINNED:
        out = make_defense(name, params).apply(PINNED_STATES, generator=gen(1234))
        assert out.reshape(-1)[PINNED_INDEX].tolist() == expected, (name, params)


def test_gaussian_apply_float64_is_pinned():
    out = make_defense("gaussian", {"sigma": 0.3}).apply(PINNED_STATES.double(), generator=gen(7))
    assert out.reshape(-1)[[0, 23]].tolist() == [-3.8134529919611238, 3.938575135806496]


def test_dp_noise_std_is_pinned():
    # the epsilon-mode sigma (exact GDP inversion) is part of every dp result
    assert make_defense("dp", {"clip": 2.0, "epsilon": 3.0, "delta": 1e-5}).noise_std == float.fromhex("0x1.63fdeeca72de4p+2")


# --- the laws ------------------------------------------------------------------------------------
LAWS = [GaussianNoise(sigma=0.7), LaplaceNoise(scale=0.4), DChiNoise(epsilon=3.0)]
IDS = ["gaussian", "laplace", "dchi"]


def test_gaussian_law_is_todays_mse_scoring_and_noise():
    law = GaussianNoise(sigma=0.3)
    a, b = torch.randn(5, 16, generator=gen(0)), torch.randn(5, 16, generator=gen(1))
    assert torch.equal(law.statistic(a, b), (a - b).pow(2).mean(dim=-1))  # bit-identical to the MSE
    mse = law.statistic(a, b)
    assert torch.equal(law.nll(mse, dim=16), 16 * mse / (2 * 0.3 ** 2))  # guided's map scoring
    # guided's acceptance_threshold without its float tolerance
    assert law.threshold(dim=16, miss_probability=1e-4) == 0.3 ** 2 * float(chi2.ppf(1 - 1e-4, 16)) / 16
    assert torch.equal(law.sample((5, 16), generator=gen(3), dtype=torch.float32),
                       torch.randn(5, 16, generator=gen(3)) * 0.3)
    assert law.std() == law.std(dim=16) == 0.3


def test_threshold_values():
    assert LaplaceNoise(scale=0.5).threshold(dim=10, miss_probability=0.05) == 0.5 * gamma.ppf(0.95, 10) / 10
    assert DChiNoise(epsilon=2.0).threshold(dim=10, miss_probability=0.05) == gamma.ppf(0.95, 10, scale=0.5)
    # d = 1: |Laplace(b)| is Exp(1/b): its 95% quantile is b log 20
    assert LaplaceNoise(scale=0.5).threshold(dim=1, miss_probability=0.05) == pytest.approx(0.5 * math.log(20), rel=1e-12)


@pytest.mark.parametrize("law", LAWS, ids=IDS)
@pytest.mark.parametrize("d", [1, 7, 64])
def test_threshold_is_a_true_quantile(law, d):
    # the true state's statistic is above the threshold with probability miss (Monte Carlo, 40000 draws)
    n, miss = 40000, 0.05
    states = torch.randn(n, d, generator=gen(1), dtype=torch.float64) * 5
    observed = states + law.sample((n, d), generator=gen(2), dtype=torch.float64)
    above = (law.statistic(observed, states) > law.threshold(dim=d, miss_probability=miss)).double().mean().item()
    assert above == pytest.approx(miss, abs=4 * math.sqrt(miss * (1 - miss) / n))


def log_density(law, observed, simulated):
    """log p(observed | simulated), written independently of the law's nll."""
    if isinstance(law, GaussianNoise):
        return torch.distributions.Normal(simulated, law.sigma).log_prob(observed).sum(-1)
    if isinstance(law, LaplaceNoise):
        return torch.distributions.Laplace(simulated, law.scale).log_prob(observed).sum(-1)
    # dchi: y = s + r u; the density of y is that of r over the sphere's area r^(d-1) S_(d-1)
    d = observed.shape[-1]
    r = torch.linalg.vector_norm(observed - simulated, dim=-1)
    log_sphere = math.log(2) + d / 2 * math.log(math.pi) - math.lgamma(d / 2)
    shape, rate = torch.tensor(float(d), dtype=torch.float64), torch.tensor(law.epsilon, dtype=torch.float64)
    return torch.distributions.Gamma(shape, rate).log_prob(r) - (d - 1) * torch.log(r) - log_sphere


@pytest.mark.parametrize("law", LAWS, ids=IDS)
@pytest.mark.parametrize("d", [1, 5, 32])
def test_nll_is_the_density_up_to_a_constant(law, d):
    y = torch.randn(200, d, generator=gen(0), dtype=torch.float64)
    s1 = y + torch.randn(200, d, generator=gen(1), dtype=torch.float64)
    s2 = y + 2 * torch.randn(200, d, generator=gen(2), dtype=torch.float64)
    ours = law.nll(law.statistic(y, s1), dim=d) - law.nll(law.statistic(y, s2), dim=d)
    theirs = -(log_density(law, y, s1) - log_density(law, y, s2))
    assert torch.allclose(ours, theirs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("law", LAWS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sampling_is_seeded_and_keeps_dtype(law, dtype):
    draw = law.sample(torch.Size([3, 4, 9]), generator=gen(5), dtype=dtype)
    assert draw.shape == (3, 4, 9) and draw.dtype == dtype and torch.isfinite(draw).all()
    assert torch.equal(draw, law.sample((3, 4, 9), generator=gen(5), dtype=dtype))
    assert not torch.equal(draw, law.sample((3, 4, 9), generator=gen(6), dtype=dtype))


@pytest.mark.parametrize("law", LAWS, ids=IDS)
def test_std_per_coordinate(law):
    d = 16
    draw = law.sample((20000, d), generator=gen(0), dtype=torch.float64)
    assert draw.std().item() == pytest.approx(law.std(dim=d), rel=0.01)
    assert abs(draw.mean().item()) < 0.01 * law.std(dim=d)


def test_std_values():
    assert LaplaceNoise(scale=0.5).std() == 0.5 * math.sqrt(2)
    assert DChiNoise(epsilon=2.0).std(dim=575) == 12.0  # sqrt(d + 1) / eps
    with pytest.raises(ValueError, match="depends on d"):
        DChiNoise(epsilon=2.0).std()


def test_dchi_radius_is_gamma_and_direction_uniform():
    d, eps, n = 24, 4.0, 20000
    draw = DChiNoise(epsilon=eps).sample((n, d), generator=gen(0), dtype=torch.float64)
    radius = torch.linalg.vector_norm(draw, dim=-1)
    assert radius.mean().item() == pytest.approx(d / eps, rel=0.005)  # Gamma(d, 1/eps): mean d/eps
    assert radius.var().item() == pytest.approx(d / eps ** 2, rel=0.03)  # variance d/eps^2
    direction = draw / radius[:, None]
    assert direction.mean(0).abs().max().item() < 4 / math.sqrt(n)  # no preferred direction
    assert torch.allclose((direction ** 2).mean(0), torch.full((d,), 1 / d, dtype=torch.float64), atol=0.004)


def test_laplace_draws_have_mean_absolute_value_b():
    draw = LaplaceNoise(scale=0.25).sample((40000, 8), generator=gen(0), dtype=torch.float64)
    assert draw.abs().mean().item() == pytest.approx(0.25, rel=0.01)  # E|Laplace(0, b)| = b
    assert (draw > 0).double().mean().item() == pytest.approx(0.5, abs=0.005)


def test_describe_and_validation():
    assert GaussianNoise(sigma=0.5).describe() == {"law": "gaussian", "sigma": 0.5}
    assert LaplaceNoise(scale=2).describe() == {"law": "laplace", "scale": 2}
    assert DChiNoise(epsilon=0.1).describe() == {"law": "dchi", "epsilon": 0.1}
    for bad in (0.0, -1.0, math.inf, math.nan):
        for make in (lambda v: GaussianNoise(sigma=v), lambda v: LaplaceNoise(scale=v), lambda v: DChiNoise(epsilon=v)):
            with pytest.raises(ValueError, match="finite number > 0"):
                make(bad)
    with pytest.raises(ValueError, match="miss_probability"):
        GaussianNoise(sigma=1.0).threshold(dim=4, miss_probability=0.0)
    with pytest.raises(ValueError, match="dim"):
        DChiNoise(epsilon=1.0).threshold(dim=0, miss_probability=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        GaussianNoise(sigma=1.0).sigma = 2.0


# --- the law a defence declares ------------------------------------------------------------------
class OnlyStd(Defense):
    """A plug-in written before laws existed: it declares noise_std only."""

    name = "only-std"

    @property
    def noise_std(self) -> float:
        return 0.25


class DeclaresLaw(Defense):
    """A plug-in that declares a law and nothing else."""

    name = "declares-law"

    @property
    def noise_law(self):
        return LaplaceNoise(scale=0.5)


def test_plugin_declaring_only_noise_std_gets_a_gaussian_law():
    d = OnlyStd()
    assert d.noise_law == GaussianNoise(sigma=0.25)
    h = torch.randn(3, 8, generator=gen(0))
    assert torch.equal(d.apply(h, generator=gen(1)), h + torch.randn(3, 8, generator=gen(1)) * 0.25)


def test_plugin_declaring_nothing_is_noise_free():
    d = Defense()
    assert d.noise_law is None and d.noise_std == 0.0
    h = torch.randn(3, 8, generator=gen(0))
    assert torch.equal(d.apply(h, generator=gen(1)), h)


def test_plugin_declaring_a_law_gets_noise_std_and_noise_from_it():
    d = DeclaresLaw()
    assert d.noise_std == 0.5 * math.sqrt(2)
    h = torch.randn(3, 8, generator=gen(0))
    assert torch.equal(d.apply(h, generator=gen(1)), h + LaplaceNoise(scale=0.5).sample((3, 8), generator=gen(1),
                                                                                        dtype=torch.float32))


@pytest.mark.parametrize("name, params, law", [
    ("none", {}, None),
    ("gaussian", {"sigma": 0.3}, GaussianNoise(sigma=0.3)),
    ("gaussian", {"sigma": 0}, None),
    ("dp", {"clip": 2, "noise_multiplier": 0.75}, GaussianNoise(sigma=1.5)),
    ("quantize", {"bits": 4}, None),
    ("topk", {"k": 2, "sigma": 0.1}, GaussianNoise(sigma=0.1)),
    ("topk", {"k": 2}, None),
    ("laplace", {"clip": 3, "epsilon": 2}, LaplaceNoise(scale=3.0)),
    ("dchi", {"epsilon": 0.5}, DChiNoise(epsilon=0.5)),
])
def test_each_defence_declares_its_law(name, params, law):
    assert make_defense(name, params).noise_law == law


@pytest.mark.parametrize("name, params, kind", [
    ("none", {}, None), ("gaussian", {"sigma": 1}, None), ("quantize", {"bits": 4}, None), ("topk", {"k": 2}, None),
    ("dp", {"clip": 1, "noise_multiplier": 1}, "(epsilon, delta)-DP"),
    ("laplace", {"clip": 1, "epsilon": 1}, "epsilon-DP"),
    ("dchi", {"epsilon": 1}, "metric DP"), ("dchi", {"epsilon": 1, "clip": 1}, "epsilon-DP"),
])
def test_every_guarantee_says_its_kind(name, params, kind):
    for tokens in (None, 5):
        g = make_defense(name, params).guarantee(tokens=tokens)
        assert g["kind"] == kind and (kind is None or kind in GUARANTEE_KINDS)
        assert (g["epsilon"] is None) == (kind is None)


def test_check_defense_names_a_bad_law():
    class NotALaw(Defense):
        name = "not-a-law"
        noise_law = property(lambda self: "gaussian")
        noise_std = 0.1

    with pytest.raises(DefenseError, match="noise_law is 'gaussian'; expected None or a NoiseLaw"):
        check_defense(NotALaw(), torch.zeros(2, 4))
    check_defense(DeclaresLaw(), torch.zeros(2, 4))
    check_defense(make_defense("dchi", {"epsilon": 1, "dim": 4}), torch.zeros(2, 4))


def test_check_defense_refuses_dchi_without_dim_while_attacks_read_noise_std():
    with pytest.raises(DefenseError, match="noise_std raised DefenseError: dchi: .*give --param dim=D"):
        check_defense(make_defense("dchi", {"epsilon": 1}), torch.zeros(2, 4))


# --- DP-Forward: dp --epsilon is the analytic Gaussian mechanism ------------------------------------
def balle_wang_delta(*, sigma: float, sensitivity: float, epsilon: float) -> float:
    """The analytic Gaussian mechanism's exact delta (Balle and Wang 2018, Theorem 8):
    Phi(D/(2s) - eps s/D) - e^eps Phi(-D/(2s) - eps s/D), the second term in logs (e^eps overflows)."""
    a, b = sensitivity / (2 * sigma), epsilon * sigma / sensitivity
    return norm.cdf(a - b) - math.exp(epsilon + norm.logcdf(-a - b))


@pytest.mark.parametrize("epsilon, delta", [(0.1, 1e-5), (0.5, 1e-5), (1.0, 1e-6), (3.0, 1e-5), (8.0, 1e-5),
                                            (20.0, 1e-3), (50.0, 1e-8)])
def test_dp_epsilon_is_the_analytic_gaussian_mechanism(epsilon, delta):
    d = make_defense("dp", {"clip": 1.5, "epsilon": epsilon, "delta": delta})
    sensitivity = 2 * 1.5  # replace-one
    assert balle_wang_delta(sigma=d.noise_std, sensitivity=sensitivity, epsilon=epsilon) == pytest.approx(delta, rel=1e-6)
    # and it is the smallest such sigma: Balle-Wang's calibration, solved here on sigma directly
    sigma = optimize.brentq(lambda s: balle_wang_delta(sigma=s, sensitivity=sensitivity, epsilon=epsilon) - delta,
                            1e-3, 1e3, xtol=1e-14, rtol=1e-13)
    assert d.noise_std == pytest.approx(sigma, rel=1e-7)


# --- dchi ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("params, fragment", [
    ({}, "exactly one of --epsilon or --param relative_epsilon=R"),
    ({"epsilon": 1, "relative_epsilon": 0.1, "dim": 4}, "exactly one"),
    ({"relative_epsilon": 0.1}, "relative_epsilon needs --param dim=D"),
    ({"epsilon": 0}, "--epsilon"),
    ({"epsilon": "nan"}, "--epsilon"),
    ({"epsilon": -2}, "--epsilon"),
    ({"relative_epsilon": -0.1, "dim": 4}, "relative_epsilon must be a finite number > 0"),
    ({"epsilon": 1, "clip": 0}, "--clip"),
    ({"epsilon": 1, "dim": 0}, "dim must be an integer >= 1"),
    ({"epsilon": 1, "dim": "x"}, "not a valid int"),
])
def test_dchi_invalid_params(params, fragment):
    with pytest.raises(DefenseError) as info:
        make_defense("dchi", params)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_dchi_relative_epsilon_is_epsilon_over_d():
    d = make_defense("dchi", {"relative-epsilon": "0.05", "dim": "576"})  # SplitLLM's DxPrivacy scale
    assert d.epsilon == 0.05 * 576 and d.noise_law == DChiNoise(epsilon=0.05 * 576)
    assert d.describe() == {"name": "dchi", "params": {"relative_epsilon": 0.05, "dim": 576},
                            "derived": {"epsilon": 28.8, "noise": {"law": "dchi", "epsilon": 28.8},
                                        "noise_std": math.sqrt(577) / 28.8}}
    with pytest.raises(DefenseError, match="dim is 576 but the states have d = 8"):
        d.apply(torch.zeros(2, 8), generator=gen(0))


def test_dchi_apply_is_simulate_plus_a_draw_of_its_law():
    h = torch.randn(2, 3, 16, generator=gen(0)) * 4
    for params in ({"epsilon": 0.5}, {"epsilon": 0.5, "clip": 2.0}):
        d = make_defense("dchi", params)
        expected = d.simulate(h) + DChiNoise(epsilon=0.5).sample(h.shape, generator=gen(1), dtype=h.dtype)
        assert torch.equal(d.apply(h, generator=gen(1)), expected)
    assert torch.equal(make_defense("dchi", {"epsilon": 1}).simulate(h), h)  # unclipped: identity


def test_dchi_clip_bounds_the_l2_norm():
    h = torch.randn(50, 12, generator=gen(0)) * torch.linspace(0.01, 3, 50)[:, None]
    out = make_defense("dchi", {"epsilon": 1, "clip": 2.5}).simulate(h)
    norms = torch.linalg.vector_norm(out, dim=-1)
    assert (norms <= 2.5 * (1 + 1e-6)).all()
    inside = torch.linalg.vector_norm(h, dim=-1) < 2.5
    assert torch.equal(out[inside], h[inside]) and inside.any() and (~inside).any()


def test_dchi_guarantee_unclipped_is_metric_dp():
    g = make_defense("dchi", {"epsilon": 0.25}).guarantee(tokens=10)
    assert (g["epsilon"], g["metric_epsilon"], g["delta"], g["kind"]) == (0.25, 0.25, 0.0, "metric DP")
    assert g["epsilon_per_prompt"] == 0.25 and g["tokens"] == 10  # per prompt: for the sum of L2 distances
    assert "per unit of their L2 distance" in g["neighbouring"]
    assert "L2 norm about 45" in g["reason"] and "12.2-indistinguishable" in g["reason"]  # 49 * 0.25


def test_dchi_guarantee_clipped_is_pure_2c_epsilon_dp():
    g = make_defense("dchi", {"epsilon": 0.25, "clip": 3}).guarantee(tokens=10)
    assert (g["epsilon"], g["metric_epsilon"], g["delta"], g["kind"]) == (1.5, 0.25, 0.0, "epsilon-DP")  # 2 C eps
    assert g["epsilon_per_prompt"] == 15.0  # T * 2 C eps
    assert "replace-one" in g["neighbouring"] and "2C" in g["neighbouring"]
    assert "epsilon_per_prompt" not in make_defense("dchi", {"epsilon": 1, "clip": 3}).guarantee()


def test_dchi_noise_std_needs_d():
    assert make_defense("dchi", {"epsilon": 2, "dim": 575}).noise_std == 12.0
    with pytest.raises(DefenseError, match="depends on the hidden size d"):
        make_defense("dchi", {"epsilon": 2}).noise_std


# --- laplace -------------------------------------------------------------------------------------
@pytest.mark.parametrize("params, fragment", [
    ({"epsilon": 1}, "--clip is required"),
    ({"clip": 1}, "--epsilon is required"),
    ({"clip": 0, "epsilon": 1}, "--clip"),
    ({"clip": 1, "epsilon": -1}, "--epsilon"),
    ({"clip": "inf", "epsilon": 1}, "--clip"),
    ({"clip": 1, "epsilon": 1, "delta": 1e-5}, "no parameter 'delta'"),
])
def test_laplace_invalid_params(params, fragment):
    with pytest.raises(DefenseError) as info:
        make_defense("laplace", params)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_laplace_clips_in_l1_and_adds_laplace_2c_over_epsilon():
    d = make_defense("laplace", {"clip": "4", "epsilon": "2"})
    assert d.scale == 4.0 and d.noise_law == LaplaceNoise(scale=4.0)  # b = 2C / eps
    assert d.noise_std == 4.0 * math.sqrt(2)
    assert d.describe() == {"name": "laplace", "params": {"clip": 4.0, "epsilon": 2.0},
                            "derived": {"scale": 4.0, "noise_std": 4.0 * math.sqrt(2),
                                        "noise": {"law": "laplace", "scale": 4.0}}}
    h = torch.tensor([[3.0, -5.0], [1.0, 1.0], [0.0, 0.0]])
    assert torch.equal(d.simulate(h), torch.tensor([[1.5, -2.5], [1.0, 1.0], [0.0, 0.0]]))  # L1 8 -> 4
    big = torch.randn(4000, 16, generator=gen(0)) * 10
    noise = d.apply(big, generator=gen(1)) - d.simulate(big)
    assert noise.abs().mean().item() == pytest.approx(4.0, rel=0.02)  # E|Laplace(0, b)| = b
    assert torch.equal(d.apply(big, generator=gen(1)),
                       d.simulate(big) + LaplaceNoise(scale=4.0).sample(big.shape, generator=gen(1), dtype=big.dtype))


def test_laplace_guarantee_is_pure_epsilon_dp_composing_over_tokens():
    g = make_defense("laplace", {"clip": 10, "epsilon": 0.5}).guarantee(tokens=12)
    assert (g["epsilon"], g["delta"], g["kind"], g["epsilon_per_prompt"], g["tokens"]) == (0.5, 0.0, "epsilon-DP", 6.0, 12)
    assert "L1 norm <= C" in g["neighbouring"] and "2C" in g["neighbouring"]


@pytest.mark.parametrize("name, params", [("dchi", {"epsilon": 0.5}), ("dchi", {"epsilon": 0.5, "clip": 1}),
                                          ("laplace", {"clip": 5, "epsilon": 1})])
@pytest.mark.parametrize("shape", [(16,), (3, 16), (2, 3, 16)])
def test_new_defences_work_on_any_leading_shape(name, params, shape):
    d = make_defense(name, params)
    h = torch.randn(shape, generator=gen(0))
    out = d.apply(h, generator=gen(1))
    assert out.shape == h.shape and out.dtype == h.dtype and torch.isfinite(out).all()
    assert torch.equal(out, d.apply(h, generator=gen(1))) and not torch.equal(out, d.apply(h, generator=gen(2)))
    # simulate acts on each vector alone
    assert torch.equal(d.simulate(h), d.simulate(h.reshape(-1, 16)).reshape(shape))
