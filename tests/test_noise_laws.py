"""Noise laws (defenses/noise.py) and the defences that declare them: dchi, laplace.

Pinned values: `apply` of gaussian, dp and topk on a seeded generator, computed before the
noise-law interface existed (commit of this file), so every earlier result stays identical.
"""
import torch

from invbench.defenses import make_defense

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
