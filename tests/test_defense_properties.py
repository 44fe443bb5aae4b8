"""Property-based tests of the built-in defences (hypothesis): any small shape (1 to 3 dims), float32,
float64 and bfloat16, ordinary and extreme finite values (near the dtype's largest, subnormal,
zeros).

Contract, as tested here:
- apply and simulate keep shape and dtype; simulate is deterministic, and apply is too for a
  generator in the same state;
- finite input gives finite output from simulate (apply adds finite noise to it);
- dp and dchi (clipped) never return a vector longer than their L2 clip norm, laplace none longer
  than its L1 clip norm (up to the dtype's rounding);
- quantize uses at most 2^bits levels per vector (per-vector) or per tensor (per-tensor);
- topk keeps at most k coordinates per vector, unchanged;
- non-finite input is outside the contract: a defence need not handle it (the runner refuses
  NaN or infinite captured states before any defence sees them); the built-ins do not raise on
  it and keep shape and dtype, but their values are then meaningless.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from invbench.defenses import make_defense
from invbench.defenses.dchi import DChi
from invbench.defenses.dp import DP
from invbench.defenses.laplace import Laplace
from invbench.defenses.quantize import Quantize
from invbench.defenses.topk import TopK

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUNDING = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 8e-3}  # relative, a few ulps


@st.composite
def hidden_states(draw, *, finite: bool = True) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    info = torch.finfo(dtype)
    extremes = [0.0, -0.0, info.max / 2, -info.max / 2, info.tiny, -info.tiny, info.tiny / 4, 1e-30]
    if not finite:
        extremes += [math.inf, -math.inf, math.nan]
    element = st.one_of(st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False), st.sampled_from(extremes),
                        st.just(0.0))
    values = draw(st.lists(element, min_size=math.prod(shape), max_size=math.prod(shape)))
    return torch.tensor(values, dtype=torch.float64).to(dtype).reshape(shape)


DEFENCES = st.one_of(
    st.builds(lambda sigma: make_defense("gaussian", {"sigma": sigma}), st.floats(0, 10)),
    st.builds(lambda clip, z: make_defense("dp", {"clip": clip, "noise_multiplier": z}),
              st.floats(1e-3, 1e3), st.floats(1e-2, 10)),
    st.builds(lambda bits, scheme: make_defense("quantize", {"bits": bits, "scheme": scheme}),
              st.integers(1, 16), st.sampled_from(["per-vector", "per-tensor"])),
    st.builds(lambda k, sigma: TopK(k=k, sigma=sigma), st.integers(1, 8), st.floats(0, 1)),
    st.builds(lambda eps, clip: make_defense("dchi", {"epsilon": eps, **({} if clip is None else {"clip": clip})}),
              st.floats(1e-2, 1e3), st.one_of(st.none(), st.floats(1e-3, 1e3))),
    st.builds(lambda clip, eps: make_defense("laplace", {"clip": clip, "epsilon": eps}),
              st.floats(1e-3, 1e3), st.floats(1e-2, 1e3)),
)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


@SETTINGS
@given(defense=DEFENCES, hidden=hidden_states(), seed=st.integers(0, 2**32))
def test_shape_dtype_determinism_finiteness(defense, hidden, seed):
    original = hidden.clone()
    simulated = defense.simulate(hidden)
    assert simulated.shape == hidden.shape and simulated.dtype == hidden.dtype
    assert same(defense.simulate(hidden), simulated)
    assert torch.isfinite(simulated).all(), (defense.describe(), hidden, simulated)
    first = defense.apply(hidden, generator=torch.Generator().manual_seed(seed))
    second = defense.apply(hidden, generator=torch.Generator().manual_seed(seed))
    assert first.shape == hidden.shape and first.dtype == hidden.dtype and same(first, second)
    assert same(hidden, original)  # the input is not modified
    if defense.noise_law is None:
        assert same(first, simulated)


@SETTINGS
@given(hidden=hidden_states(), clip=st.floats(1e-3, 1e3))
def test_dp_never_exceeds_the_clip_norm(hidden, clip):
    out = DP(clip=clip, noise_multiplier=1.0).simulate(hidden)
    norms = torch.linalg.vector_norm(out.double(), dim=-1)
    assert (norms <= clip * (1 + ROUNDING[hidden.dtype] * hidden.shape[-1] ** 0.5)).all(), (norms, clip)
    # within the ball a vector is left as it is
    inside = torch.linalg.vector_norm(hidden.double(), dim=-1) <= clip * 0.999
    assert torch.equal(out[inside], hidden[inside])


@SETTINGS
@given(hidden=hidden_states(), clip=st.floats(1e-3, 1e3), l1=st.booleans())
def test_dchi_and_laplace_never_exceed_their_clip_norm(hidden, clip, l1):
    defense = Laplace(clip=clip, epsilon=1.0) if l1 else DChi(epsilon=1.0, clip=clip)
    out = defense.simulate(hidden)
    norms = torch.linalg.vector_norm(out.double(), ord=1 if l1 else 2, dim=-1)
    assert (norms <= clip * (1 + ROUNDING[hidden.dtype] * hidden.shape[-1])).all(), (norms, clip)
    inside = torch.linalg.vector_norm(hidden.double(), ord=1 if l1 else 2, dim=-1) <= clip * 0.999
    assert torch.equal(out[inside], hidden[inside])


@SETTINGS
@given(hidden=hidden_states(), bits=st.integers(1, 16), per_vector=st.booleans())
def test_quantize_uses_at_most_2_to_the_bits_levels(hidden, bits, per_vector):
    out = Quantize(bits=bits, scheme="per-vector" if per_vector else "per-tensor").simulate(hidden)
    groups = out.reshape(-1, out.shape[-1]) if per_vector else out.reshape(1, -1)
    for group in groups:
        assert len(torch.unique(group)) <= 2 ** bits


@SETTINGS
@given(hidden=hidden_states(), k=st.integers(1, 8))
def test_topk_keeps_at_most_k_coordinates_unchanged(hidden, k):
    out = TopK(k=k).simulate(hidden)
    kept = out != 0
    assert (kept.sum(dim=-1) <= k).all()
    assert torch.equal(out[kept], hidden[kept])


@SETTINGS
@given(defense=DEFENCES, hidden=hidden_states(finite=False))
def test_non_finite_input_does_not_raise(defense, hidden):
    out = defense.apply(hidden, generator=torch.Generator().manual_seed(0))
    assert out.shape == hidden.shape and out.dtype == hidden.dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [4, 64])  # at 64, even absmax * (norm of vector / absmax) overflows
def test_dp_clips_huge_vectors_to_the_clip_norm_not_to_zero(dtype, width):
    huge = torch.full((2, width), torch.finfo(dtype).max / 2, dtype=dtype)  # its norm overflows the dtype
    out = DP(clip=1.0, noise_multiplier=1.0).simulate(huge)
    assert torch.allclose(torch.linalg.vector_norm(out.double(), dim=-1), torch.ones(2, dtype=torch.float64),
                          rtol=ROUNDING[dtype] * 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [4, 64])
def test_laplace_clips_huge_vectors_to_the_l1_clip_norm_not_to_zero(dtype, width):
    huge = torch.full((2, width), torch.finfo(dtype).max / 2, dtype=dtype)  # its L1 norm overflows the dtype
    out = Laplace(clip=1.0, epsilon=1.0).simulate(huge)
    assert torch.allclose(torch.linalg.vector_norm(out.double(), ord=1, dim=-1), torch.ones(2, dtype=torch.float64),
                          rtol=ROUNDING[dtype] * 4)
