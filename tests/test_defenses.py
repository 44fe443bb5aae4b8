"""Defences: dp guarantee figures, clipping, quantisation levels, noise, registry and plug-ins."""
import math
import warnings
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import optimize
from scipy.stats import norm

from invbench.defenses import Defense, DefenseError, available_defenses, load_defense_class, make_defense

PLUGIN = Path(__file__).parent / "plugins" / "my_defense.py"


def gdp_epsilon(mu: float, delta: float) -> float:
    """Independent solve of the mu-GDP dual: Phi(-e/mu + mu/2) - e^e Phi(-e/mu - mu/2) = delta."""
    def gap(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta
    return optimize.brentq(gap, 0.0, 400.0, xtol=1e-12)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- dp: the guarantee -------------------------------------------------------------------
@pytest.mark.parametrize("z, expected", [(0.5, 10.00), (1, 4.38), (2, 1.99), (5, 0.73)])
def test_gdp_reference_table(z, expected):
    # the project's reference table is at mu = 1/Z; check our independent solver reproduces it
    assert gdp_epsilon(1 / z, 1e-5) == pytest.approx(expected, abs=0.005)


@pytest.mark.parametrize("z", [0.5, 1, 2, 5])
def test_dp_epsilon_per_vector_and_per_prompt(z):
    g = make_defense("dp", {"clip": "1.5", "noise_multiplier": str(z)}).guarantee(tokens=10)
    assert g["delta"] == 1e-5
    assert g["epsilon"] == pytest.approx(gdp_epsilon(2 / z, 1e-5), rel=1e-6)  # replace-one: mu = 2/Z
    assert g["epsilon_per_prompt"] == pytest.approx(gdp_epsilon(2 / z * math.sqrt(10), 1e-5), rel=1e-6)
    assert g["tokens"] == 10
    assert "replace-one" in g["neighbouring"] and "2C" in g["neighbouring"]
    assert "eps_from_mu" in g["reason"]


def test_dp_epsilon_shifts_table_by_factor_two():
    # mu = 2/Z at Z is mu = 1/Z at Z/2: the per-vector epsilon at Z=2 is the table's Z=1 entry
    assert make_defense("dp", {"clip": 1, "noise_multiplier": 2}).guarantee()["epsilon"] == pytest.approx(4.38, abs=0.005)


def test_dp_guarantee_without_tokens_has_base_keys_only():
    g = make_defense("dp", {"clip": 1, "noise_multiplier": 1}).guarantee()
    assert {"epsilon", "delta", "neighbouring", "reason"} <= set(g)
    assert "epsilon_per_prompt" not in g and "tokens" not in g


def test_dp_tiny_noise_gives_the_finite_epsilon_past_opacus_search_without_warnings():
    """Opacus's eps_from_mu searches epsilon <= 500; past it the same exact GDP dual is solved in log
    space. Pinned: Z 0.1 per vector (mu 20) is inside Opacus's range, 284.39; per 10-token prompt
    (mu 20 sqrt 10) 2268.77; Z 0.03 (mu 66.7) 2505.58; Z 0.01 (mu 200) 20851.99."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z01 = make_defense("dp", {"clip": 45, "noise_multiplier": 0.1}).guarantee(tokens=10)
        z003 = make_defense("dp", {"clip": 45, "noise_multiplier": 0.03}).guarantee(tokens=10)
        z001 = make_defense("dp", {"clip": 1, "noise_multiplier": 0.01}).guarantee(tokens=10)
    assert caught == []
    assert z01["epsilon"] == pytest.approx(284.391849, rel=1e-6) and "opacus gdp.eps_from_mu" in z01["reason"]
    assert z01["epsilon_per_prompt"] == pytest.approx(2268.767722, rel=1e-6)
    assert "past Opacus's search range" in z01["reason_per_prompt"]
    assert z003["epsilon"] == pytest.approx(2505.579024, rel=1e-6)
    assert z001["epsilon"] == pytest.approx(20851.98868, rel=1e-6) and math.isfinite(z001["epsilon_per_prompt"])


@pytest.mark.parametrize("eps, delta", [(0.5, 1e-5), (3.0, 1e-5), (8.0, 1e-6), (50.0, 1e-3)])
def test_dp_epsilon_round_trip(eps, delta):
    d = make_defense("dp", {"clip": "2", "epsilon": str(eps), "delta": str(delta)})
    g = d.guarantee()
    assert g["epsilon"] == pytest.approx(eps, rel=1e-6) and g["delta"] == delta
    assert d.noise_std == pytest.approx(d.noise_multiplier * 2)
    assert d.describe()["derived"]["noise_multiplier"] == d.noise_multiplier


def test_dp_epsilon_mode_matches_noise_multiplier_mode():
    z = make_defense("dp", {"clip": 1, "epsilon": 4.377178095681223}).noise_multiplier
    assert z == pytest.approx(2.0, rel=1e-6)


# --- dp: clipping and noise --------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    hidden=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=12),
                      elements=st.floats(-1e6, 1e6, width=32)),
    clip=st.floats(1e-3, 1e3),
)
def test_clipping_never_leaves_a_vector_above_c(hidden, clip):
    h = torch.from_numpy(hidden)
    out = make_defense("dp", {"clip": clip, "noise_multiplier": 1}).simulate(h)
    assert out.shape == h.shape
    norms = torch.linalg.vector_norm(out.double(), dim=-1)
    assert (norms <= clip * (1 + 1e-5)).all()
    inside = torch.linalg.vector_norm(h.double(), dim=-1) <= clip * (1 - 1e-5)
    assert torch.equal(out[inside], h[inside])  # short vectors pass unchanged


def test_clipping_is_differentiable_and_zero_safe():
    h = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.3, 0.4]], requires_grad=True)
    out = make_defense("dp", {"clip": 1, "noise_multiplier": 1}).simulate(h)
    out.sum().backward()
    assert torch.allclose(out.detach(), torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.3, 0.4]]))
    assert torch.isfinite(h.grad).all()


def test_dp_noise_has_std_z_times_c():
    d = make_defense("dp", {"clip": 2, "noise_multiplier": 0.75})
    h = torch.randn(400, 256, generator=gen(0)) * 5
    noise = d.apply(h, generator=gen(1)) - d.simulate(h)
    assert noise.std().item() == pytest.approx(1.5, rel=0.02)
    assert abs(noise.mean().item()) < 0.02


@pytest.mark.parametrize("params, fragment", [
    ({"clip": 0, "noise_multiplier": 1}, "--clip"),
    ({"clip": -1, "noise_multiplier": 1}, "--clip"),
    ({"clip": 1, "noise_multiplier": -0.5}, "--noise-multiplier"),
    ({"clip": 1, "noise_multiplier": 1, "epsilon": 2}, "exactly one"),
    ({"clip": 1}, "exactly one"),
    ({"noise_multiplier": 1}, "--clip is required"),
    ({"clip": 1, "epsilon": 1, "delta": 0}, "--delta"),
    ({"clip": 1, "epsilon": 1, "delta": 1}, "--delta"),
    ({"clip": 1, "epsilon": 1, "delta": 1.5}, "--delta"),
    ({"clip": 1, "epsilon": -1}, "--epsilon"),
    ({"clip": "nan", "noise_multiplier": 1}, "--clip"),
])
def test_dp_invalid_params(params, fragment):
    with pytest.raises(DefenseError) as info:
        make_defense("dp", params)
    assert fragment in str(info.value) and "\n" not in str(info.value)


# --- quantize ----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 12, 16])
def test_quantize_level_counts(bits):
    d = make_defense("quantize", {"bits": str(bits)})
    ramp = torch.linspace(-3.0, 3.0, 2 ** (bits + 2), dtype=torch.float64)
    assert d.simulate(ramp).unique().numel() == 2 ** bits  # dense ramp hits every level
    noisy = torch.randn(20, 64, generator=gen(0), dtype=torch.float64)
    out = d.simulate(noisy)
    for row, qrow in zip(noisy, out):
        assert qrow.unique().numel() <= 2 ** bits
        assert (qrow - row).abs().max() <= row.abs().max() / 2 ** bits * (1 + 1e-9)  # error <= step/2


def test_quantize_one_bit_is_scaled_sign():
    out = make_defense("quantize", {"bits": 1}).simulate(torch.tensor([[-4.0, -0.1, 0.2, 2.0]]))
    assert torch.equal(out, torch.tensor([[-2.0, -2.0, 2.0, 2.0]]))


def test_quantize_two_bits_by_hand():
    # absmax 4, step 2, levels -3 -1 1 3
    out = make_defense("quantize", {"bits": 2}).simulate(torch.tensor([4.0, 2.1, 1.9, -0.5, -4.0]))
    assert torch.equal(out, torch.tensor([3.0, 3.0, 1.0, -1.0, -3.0]))


def test_quantize_per_tensor_uses_one_scale():
    h = torch.tensor([[1.0, -1.0], [8.0, 0.0]])
    per_tensor = make_defense("quantize", {"bits": 2, "scheme": "per-tensor"}).simulate(h)
    per_vector = make_defense("quantize", {"bits": 2, "scheme": "per-vector"}).simulate(h)
    assert torch.equal(per_tensor, torch.tensor([[2.0, -2.0], [6.0, 2.0]]))  # step 4
    assert torch.equal(per_vector, torch.tensor([[0.75, -0.75], [6.0, 2.0]]))  # steps 0.5 and 4


@pytest.mark.parametrize("scheme", ["per-vector", "per-tensor"])
def test_quantize_zero_vectors_stay_zero(scheme):
    h = torch.zeros(3, 8)
    h[0] = torch.arange(8.0) if scheme == "per-vector" else 0
    out = make_defense("quantize", {"bits": 4, "scheme": scheme}).simulate(h)
    assert torch.isfinite(out).all() and torch.equal(out[1:], torch.zeros(2, 8))


@pytest.mark.parametrize("scheme", ["per-vector", "per-tensor"])
def test_quantize_is_deterministic(scheme):
    d = make_defense("quantize", {"bits": 4, "scheme": scheme})
    h = torch.randn(5, 32, generator=gen(3))
    assert d.noise_std == 0
    assert torch.equal(d.apply(h, generator=gen(1)), d.simulate(h))
    assert torch.equal(d.apply(h, generator=gen(1)), d.apply(h, generator=gen(2)))


@pytest.mark.parametrize("params", [{"bits": 0}, {"bits": 17}, {"bits": "2.5"}, {"bits": 4, "scheme": "per-row"}])
def test_quantize_invalid_params(params):
    with pytest.raises(DefenseError) as info:
        make_defense("quantize", params)
    assert "\n" not in str(info.value)


# --- noise and generators -------------------------------------------------------------------
@pytest.mark.parametrize("name, params", [("gaussian", {"sigma": 0.3}), ("dp", {"clip": 1, "noise_multiplier": 1}),
                                          ("topk", {"k": 3, "sigma": 0.1})])
def test_same_seed_same_noise_other_seed_other_noise(name, params):
    d = make_defense(name, params)
    h = torch.randn(4, 16, generator=gen(0))
    assert torch.equal(d.apply(h, generator=gen(7)), d.apply(h, generator=gen(7)))
    assert not torch.equal(d.apply(h, generator=gen(7)), d.apply(h, generator=gen(8)))


def test_gaussian_changes_states_with_right_std():
    d = make_defense("gaussian", {"sigma": "0.5"})
    h = torch.randn(500, 128, generator=gen(0))
    diff = d.apply(h, generator=gen(1)) - h
    assert diff.std().item() == pytest.approx(0.5, rel=0.02)
    assert abs(diff.mean().item()) < 0.01
    assert d.guarantee(tokens=10)["epsilon"] is None


def test_gaussian_negative_sigma():
    with pytest.raises(DefenseError, match="sigma"):
        make_defense("gaussian", {"sigma": "-0.1"})


# --- top-k plug-in -----------------------------------------------------------------------
def test_topk_is_an_entry_point():
    (ep,) = [ep for ep in entry_points(group="invbench.defenses") if ep.name == "topk"]
    assert ep.value == "invbench.defenses.topk:TopK"
    assert ep.load().name == "topk" and "topk" in available_defenses()


def test_topk_keeps_largest_magnitudes():
    d = make_defense("topk", {"k": "2"})
    h = torch.tensor([[1.0, -5.0, 3.0, 0.5], [0.0, 0.1, -0.2, 0.3]])
    assert torch.equal(d.simulate(h), torch.tensor([[0.0, -5.0, 3.0, 0.0], [0.0, 0.0, -0.2, 0.3]]))
    assert torch.equal(make_defense("topk", {"k": 10}).simulate(h), h)  # k >= d keeps all
    assert torch.equal(d.apply(h, generator=gen(0)), d.simulate(h))  # sigma defaults to 0


@pytest.mark.parametrize("params", [{"k": 0}, {"k": "two"}, {"k": 2, "sigma": -1.0}])
def test_topk_invalid_params(params):
    with pytest.raises(DefenseError):
        make_defense("topk", params)


# --- registry and file plug-ins ------------------------------------------------------------
def test_load_from_file_path(monkeypatch):
    cls = load_defense_class(f"{PLUGIN}:Scale")
    assert issubclass(cls, Defense) and cls.name == "scale"
    monkeypatch.chdir(PLUGIN.parents[2])  # the spec as a user would type it from the repo root
    d = make_defense("tests/plugins/my_defense.py:Scale", {"factor": "3"})
    assert torch.equal(d.apply(torch.ones(2, 3), generator=gen(0)), torch.full((2, 3), 3.0))


@pytest.mark.parametrize("text, expected", [("false", False), ("0", False), ("No", False), ("true", True), ("yes", True)])
def test_bool_params_convert_by_word(text, expected):
    d = make_defense(f"{PLUGIN}:Scale", {"enabled": text, "factor": 2})
    assert d.enabled is expected


def test_str_params_and_dashed_names():
    assert make_defense("quantize", {"scheme": "per-tensor"}).scheme == "per-tensor"
    assert make_defense("dp", {"clip": "1", "noise-multiplier": "2"}).noise_multiplier == 2.0


@pytest.mark.parametrize("spec, params, fragment", [
    ("no-such-defence", {}, "unknown defence"),
    ("gaussian", {"sigmaa": "1"}, "no parameter 'sigmaa'"),
    ("gaussian", {"sigma": "abc"}, "not a valid float"),
    ("tests/plugins/missing.py:Scale", {}, "not found"),
    (f"{PLUGIN}:Missing", {}, "no class 'Missing'"),
    (f"{PLUGIN}:NotADefense", {}, "not a subclass"),
    (f"{PLUGIN}:Scale", {"enabled": "maybe"}, "not a valid bool"),
])
def test_registry_errors_are_one_line(spec, params, fragment):
    with pytest.raises(DefenseError) as info:
        make_defense(spec, params)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_plugin_that_fails_to_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(DefenseError, match="could not import"):
        load_defense_class(f"{bad}:X")
