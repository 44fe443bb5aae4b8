"""The accounting math of the dp defence, apart from the defence (as Opacus keeps its
`accountants/analysis/` apart from its accountants): one release of a Gaussian mechanism whose
sensitivity / noise std is mu, turned into (epsilon, delta) with Opacus's analysis functions.

- `epsilon_from_mu`: the exact GDP dual (`gdp.eps_from_mu`), falling back to RDP at q = 1
  (`rdp.compute_rdp` + `get_privacy_spent`) when that root search fails; past MAX_EPSILON the
  guarantee means nothing and is reported as inf. Never the subsampled-Gaussian
  approximations (GaussianAccountant): they are far off at q = 1.
- `mu_from_epsilon`: the inverse of the exact dual (brentq on Opacus's `gdp.delta_eps_mu`).
"""
from __future__ import annotations

import math
import warnings

from opacus.accountants.analysis import gdp, rdp
from opacus.accountants.rdp import RDPAccountant
from scipy import optimize

# Opacus's eps_from_mu searches epsilon in [0, 500]; past that e^eps bounds nothing anyway.
MAX_EPSILON = 500.0


def epsilon_from_mu(*, mu: float, delta: float) -> tuple[float, str]:
    """Epsilon at `delta` of a mu-GDP Gaussian mechanism, and the method used:
    "gdp" (exact dual), "rdp" (RDP at q = 1, looser) or "none" (no meaningful guarantee,
    epsilon = inf)."""
    with warnings.catch_warnings():  # tiny noise makes both analyses warn; we report inf instead
        warnings.simplefilter("ignore")
        try:
            return float(gdp.eps_from_mu(mu=mu, delta=delta)), "gdp"
        except (ValueError, FloatingPointError, OverflowError):
            pass
        # One Gaussian release with sensitivity/std = mu is the q = 1, steps = 1 SGM with
        # noise multiplier 1/mu.
        orders = RDPAccountant.DEFAULT_ALPHAS
        rdp_values = rdp.compute_rdp(q=1.0, noise_multiplier=1.0 / mu, steps=1, orders=orders)
        eps, _ = rdp.get_privacy_spent(orders=orders, rdp=rdp_values, delta=delta)
    eps = float(eps)
    if not math.isfinite(eps) or eps > MAX_EPSILON:
        return math.inf, "none"
    return max(eps, 0.0), "rdp"


def mu_from_epsilon(*, epsilon: float, delta: float) -> float:
    """The mu whose exact GDP dual gives (epsilon, delta): brentq on Opacus's delta_eps_mu,
    which grows with mu from 0 towards 1."""
    def gap(mu: float) -> float:
        return gdp.delta_eps_mu(eps=epsilon, mu=mu) - delta

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(optimize.brentq(gap, 1e-6, 100.0, xtol=1e-14, rtol=1e-14))
