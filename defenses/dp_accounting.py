"""The accounting math of the dp defence, apart from the defence (as Opacus keeps its
`accountants/analysis/` apart from its accountants): one release of a Gaussian mechanism whose
sensitivity / noise std is mu, turned into (epsilon, delta) with Opacus's analysis functions.

- `epsilon_from_mu`: the exact GDP dual (`gdp.eps_from_mu`). Opacus searches epsilon in [0, 500]
  only; past that the same dual is solved here (`gdp_epsilon_beyond_opacus`: brentq on the dual's
  delta(epsilon) in log space, where e^epsilon overflows), so the figure stays finite and exact
  rather than shown as "none". RDP at q = 1 (`rdp.compute_rdp` + `get_privacy_spent`) is the last
  resort. Never the subsampled-Gaussian approximations (GaussianAccountant): they are far off at q = 1.
- `mu_from_epsilon`: the inverse of the exact dual (brentq on Opacus's `gdp.delta_eps_mu`).
"""
from __future__ import annotations

import math
import warnings

from opacus.accountants.analysis import gdp, rdp
from opacus.accountants.rdp import RDPAccountant
from scipy import optimize, special

# Opacus's eps_from_mu searches epsilon in [0, 500] (and `dp --epsilon` solves within it); past that
# e^eps bounds nothing a reader would accept, but the value is still finite and is reported.
MAX_EPSILON = 500.0


def gdp_log_delta(*, epsilon: float, mu: float) -> float:
    """log delta(epsilon) of mu-GDP: log(Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)), the dual
    Opacus's `gdp.delta_eps_mu` computes, in log space so that e^eps cannot overflow."""
    first = special.log_ndtr(-epsilon / mu + mu / 2)
    second = epsilon + special.log_ndtr(-epsilon / mu - mu / 2)
    return first + math.log1p(-math.exp(second - first)) if second < first else -math.inf


def gdp_epsilon_beyond_opacus(*, mu: float, delta: float) -> float:
    """The epsilon where the exact GDP dual reaches `delta`, for any mu (brentq on gdp_log_delta,
    which falls as epsilon grows): the figure Opacus's search gives up on past epsilon 500."""
    target = math.log(delta)
    high = max(1.0, mu * mu / 2 + 10 * mu)
    while gdp_log_delta(epsilon=high, mu=mu) > target:
        high *= 2
    return float(optimize.brentq(lambda eps: gdp_log_delta(epsilon=eps, mu=mu) - target, 0.0, high,
                                 xtol=1e-12, rtol=1e-14))


def epsilon_from_mu(*, mu: float, delta: float) -> tuple[float, str]:
    """Epsilon at `delta` of a mu-GDP Gaussian mechanism, and the method used: "gdp" (Opacus's exact
    dual), "gdp-root" (the same dual solved here, past Opacus's search range), "rdp" (RDP at q = 1,
    looser: only if both fail) or "none" (epsilon = inf)."""
    with warnings.catch_warnings():  # tiny noise makes the analyses warn
        warnings.simplefilter("ignore")
        try:
            return float(gdp.eps_from_mu(mu=mu, delta=delta)), "gdp"
        except (ValueError, FloatingPointError, OverflowError):
            pass
        try:
            eps = gdp_epsilon_beyond_opacus(mu=mu, delta=delta)
            if math.isfinite(eps):
                return eps, "gdp-root"
        except (ValueError, FloatingPointError, OverflowError):
            pass
        # One Gaussian release with sensitivity/std = mu is the q = 1, steps = 1 SGM with
        # noise multiplier 1/mu.
        orders = RDPAccountant.DEFAULT_ALPHAS
        rdp_values = rdp.compute_rdp(q=1.0, noise_multiplier=1.0 / mu, steps=1, orders=orders)
        eps, _ = rdp.get_privacy_spent(orders=orders, rdp=rdp_values, delta=delta)
    eps = float(eps)
    if not math.isfinite(eps):
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
