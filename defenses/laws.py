"""Noise laws of the published mechanisms as their authors run them (issue 36), beside the three
textbook laws of defenses/noise.py. Same interface (`statistic`, `nll`, `threshold`, `std`,
`sample`, `describe`), plus `observe(simulated, generator=g)`: the observation itself, for laws
whose channel is not "add the noise" (a clip after the noise, a snap to the nearest token). For
the additive laws `observe` is simulated + sample.

| law | channel | statistic (lower = closer) | what the scoring assumes |
| --- | --- | --- | --- |
| dchi-shared-radius(eps) | s + r u_t, ONE r ~ Gamma(d, 1/eps) per call, u_t per vector | L2 norm (the exact per-vector marginal, as dchi) | per vector: nothing (the marginal is exact); `sequence_nll` scores the coupling |
| dchi-snapped(eps, E) | token argmax_k <s + r u, E_k> (dot; or cosine, L2), output E_token | -log P(snap(s + r u) = observed token), estimated with `samples` fixed draws | the estimate's error (common random numbers, add-1/2 smoothing); radius marginal per vector |
| snd(eta, clip) | s + l * v per coordinate, l ~ Gamma(d, rate eta), v ~ U(-1, 1); then an L2 clip to `clip` | -(1/d) log p(y \\| s), exact without clip; on the clip sphere the radial integral by Laplace's method | clipped: Laplace's method on a log-concave radial integrand |
| gaussian-scaled(sigma) | c s + N(0, sigma^2), 0 < c <= 1 unknown (one per sequence) | MSE after the best c in [0, 1] (profile likelihood) | c free per position (the sequence's one c is not used) |
| gaussian-diagonal(std) | s + N(0, diag(std^2)) | Mahalanobis^2 / d | nothing (exact) |

Each law's docstring says where its density comes from.
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from scipy.stats import chi2, gamma, norm

from .noise import DChiNoise, NoiseLaw, _check_dim, _check_miss, _positive, _work_dtype, squared_distances

SNAP_METRICS = ("dot", "cosine", "l2")
BOUND_TOKENS = 8  # a snap estimate rules out a state whose token loses to one of its 8 best in every draw


def additive_observe(law: NoiseLaw, simulated: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """simulated + a draw of `law` (drawn on the generator's device, moved to the states')."""
    draw = law.sample(simulated.shape, generator=generator, dtype=simulated.dtype)
    return simulated + draw.to(simulated.device)


def _directions(shape: torch.Size, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Unit vectors uniform on the sphere (a normalised standard normal), one per vector of `shape`."""
    direction = torch.randn(shape, generator=generator, dtype=dtype, device=generator.device)
    return direction / torch.linalg.vector_norm(direction, dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


def _gamma_radius(count: tuple[int, ...], d: int, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """Gamma(d, 1/epsilon) radii of shape `count` + (1,), each a float64 sum of d Exp(1) draws over
    epsilon (exact for integer d), as DChiNoise draws its radius."""
    draws = torch.empty((*count, d), dtype=torch.float64, device=generator.device).exponential_(generator=generator)
    return draws.sum(dim=-1, keepdim=True) / epsilon


# --- dchi with one radius per call (SplitLLM's DxPrivacy sampler) -------------------------------------
@dataclass(frozen=True)
class SharedRadiusDChiNoise(DChiNoise):
    """dchi noise as SplitLLM's `DxPrivacy` draws it: a direction per vector (a normalised standard
    normal) but ONE radius r ~ Gamma(d, 1/epsilon) per call, shared by every vector of the call (the
    runner calls a defence once per prompt: one radius per prompt).

    Per vector the noise is r u with r ~ Gamma(d, 1/epsilon), exactly DChiNoise's law, so the
    per-vector statistic, nll and threshold are DChiNoise's and exact. What the shared radius adds
    is coupling: every vector of a prompt is the same distance r from its state. `sequence_nll`
    scores that: on the set where the T residual norms are equal the joint density is
    Gamma(r; d, 1/eps) / (S_(d-1) r^(d-1))^T, i.e. -log p = eps r + (T - 1)(d - 1) log r + const, and
    off that set it is 0 (nll inf, with a relative tolerance for float error)."""

    name: ClassVar[str] = "dchi-shared-radius"

    def sample(self, shape: torch.Size, *, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        shape = torch.Size(shape)
        work = _work_dtype(dtype)
        direction = _directions(shape, generator, work)
        radius = _gamma_radius((), shape[-1], self.epsilon, generator)  # one for the whole call
        return (direction * radius.to(work)).to(dtype)

    def radius_spread(self, observed: torch.Tensor, simulated: torch.Tensor) -> torch.Tensor:
        """(max - min) / mean of the residual norms over positions (dim -2): 0 for the true sequence
        up to float error, a few percent or more for a wrong state at any position."""
        rho = torch.linalg.vector_norm(observed - simulated, dim=-1)
        return (rho.amax(dim=-1) - rho.amin(dim=-1)) / rho.mean(dim=-1).clamp_min(torch.finfo(rho.dtype).tiny)

    def sequence_nll(self, observed: torch.Tensor, simulated: torch.Tensor, *, tolerance: float = 1e-3) -> torch.Tensor:
        """-log p(y_1..T | s_1..T) up to a constant, over positions (dim -2): eps r + (T - 1)(d - 1) log r
        with r the mean residual norm; inf where the residual norms differ by more than `tolerance`
        (relative): under one shared radius such a sequence cannot have produced the observation."""
        rho = torch.linalg.vector_norm(observed - simulated, dim=-1)
        T, d = rho.shape[-1], observed.shape[-1]
        r = rho.mean(dim=-1)
        nll = self.epsilon * r + (T - 1) * (d - 1) * torch.log(r.clamp_min(torch.finfo(r.dtype).tiny))
        return torch.where(self.radius_spread(observed, simulated) <= tolerance, nll, torch.full_like(nll, math.inf))

    def describe(self) -> dict[str, Any]:
        return {"law": self.name, "epsilon": self.epsilon}


# --- dchi snapped to the nearest token (SplitLLM's DxPrivacy output) ----------------------------------
@dataclass(frozen=True, eq=False)
class SnappedDChiNoise(NoiseLaw):
    """dchi noise, then the noisy vector replaced by the embedding of the token it is nearest to, as
    SplitLLM's `DxPrivacy.forward` does on the input embeddings: the output is E[argmax_k <s + n, E_k>]
    with n a dchi draw (per-vector or one shared radius). SplitLLM's code says "cosine" but takes the
    raw inner product (no normalisation): `metric` "dot" is that code; "cosine" normalises the table's
    rows; "l2" is the Euclidean nearest neighbour (Feyisetan et al.'s own post-processing).

    The channel is discrete: y is a token's embedding, so the likelihood of a candidate state s is
    P(snap(s + n) = j), j the observed token. It has no closed form; `statistic` estimates it with
    `samples` noise draws fixed by `seed` (common random numbers: every candidate is scored with the
    same draws, so two candidates' scores differ by their states, not by sampling luck), the radius
    stratified over Gamma(d, 1/eps)'s quantiles and the directions uniform:
    statistic = -log((count + 1/2) / (samples + 1)), count = the draws that snap to j.
    What it assumes: the estimate's error (a candidate that snaps to j with probability well under
    1/samples scores as if it had about 1/(2 samples), so such candidates tie); the radius marginal per
    vector (with `shared_radius` the prompt's positions are coupled through r, but Gamma(d, 1/eps) has
    relative spread 1/sqrt(d), 4% at d = 576, so the coupling carries little about the tokens).
    `threshold` is the statistic's floor: the true token's statistic depends on the token, so an attack
    gets no certified stop and verifies every candidate (the exact search over its estimate).
    """

    epsilon: float
    embedding: torch.Tensor = field(repr=False)  # (V, d): the table snapped to
    metric: str = "dot"
    samples: int = 256
    seed: int = 0
    shared_radius: bool = False
    chunk_elements: int = 1 << 24  # candidates x samples x V scores held at once
    name: ClassVar[str] = "dchi-snapped"

    def __post_init__(self) -> None:
        _positive(self.epsilon, "dchi-snapped: epsilon")
        if self.metric not in SNAP_METRICS:
            raise ValueError(f"dchi-snapped: metric must be one of {', '.join(SNAP_METRICS)}, got {self.metric!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"dchi-snapped: samples must be an int >= 1, got {self.samples!r}")
        if not (isinstance(self.embedding, torch.Tensor) and self.embedding.dim() == 2 and self.embedding.shape[0] >= 1
                and torch.is_floating_point(self.embedding) and bool(torch.isfinite(self.embedding).all())):
            raise ValueError("dchi-snapped: embedding must be a finite float tensor (V, d)")
        object.__setattr__(self, "_tables", {})

    @property
    def dim(self) -> int:
        return self.embedding.shape[1]

    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(A, b) with snap(q) = argmax_k q . A_k + b_k, in float32 on `device`."""
        key = str(device)
        if key not in self._tables:
            table = self.embedding.detach().to(device=device, dtype=torch.float32)
            if self.metric == "dot":
                self._tables[key] = (table, None)
            elif self.metric == "cosine":
                self._tables[key] = (table / torch.linalg.vector_norm(table, dim=-1, keepdim=True).clamp_min(1e-30), None)
            else:  # argmin |q - E_k|^2 = argmax 2 q.E_k - |E_k|^2
                self._tables[key] = (2 * table, -table.pow(2).sum(dim=-1))
        return self._tables[key]

    def snap(self, vectors: torch.Tensor) -> torch.Tensor:
        """Token ids (...,) of the rows `vectors` (..., d) snap to."""
        table, bias = self._table(vectors.device)
        flat = vectors.reshape(-1, vectors.shape[-1]).to(torch.float32)
        out = []
        step = max(1, self.chunk_elements // table.shape[0])
        for i in range(0, len(flat), step):
            scores = flat[i:i + step] @ table.T
            out.append((scores if bias is None else scores + bias).argmax(dim=-1))
        return torch.cat(out).reshape(vectors.shape[:-1]) if out else torch.zeros(vectors.shape[:-1], dtype=torch.long)

    def token_of(self, observed: torch.Tensor) -> torch.Tensor:
        """The token ids (...,) whose embedding the observed rows are (the nearest row)."""
        table = self.embedding.detach().to(device=observed.device, dtype=torch.float32)
        flat = observed.reshape(-1, observed.shape[-1]).to(torch.float32)
        return torch.cdist(flat, table).argmin(dim=-1).reshape(observed.shape[:-1])

    def _draws(self, device: torch.device) -> torch.Tensor:
        """The fixed noise draws (samples, d) of the estimator, float32 on `device`."""
        key = ("draws", str(device))  # a (draws, d) tensor, cached per device
        if key not in self._tables:
            g = torch.Generator().manual_seed(self.seed)
            direction = _directions(torch.Size([self.samples, self.dim]), g, torch.float64)
            levels = (torch.arange(self.samples, dtype=torch.float64) + 0.5) / self.samples
            radius = torch.as_tensor(gamma.ppf(levels.numpy(), self.dim, scale=1 / self.epsilon), dtype=torch.float64)
            radius = radius[torch.randperm(self.samples, generator=g)]  # strata paired with random directions
            self._tables[key] = (direction * radius[:, None]).to(device=device, dtype=torch.float32)
        return self._tables[key]

    def _noise_scores(self, device: torch.device) -> torch.Tensor:
        """Each draw's part of every token's score (M, V), bias included."""
        key = ("noise_scores", str(device))
        if key not in self._tables:
            table, bias = self._table(device)
            scores = self._draws(device) @ table.T
            self._tables[key] = scores if bias is None else scores + bias
        return self._tables[key]

    def _chunks(self, states: torch.Tensor):
        """(start, base, rival) per chunk of states: base (n, V) the states' part of every score; rival (n, M)
        the best score among each state's BOUND_TOKENS top tokens in each draw, a lower bound on the winner's."""
        table, _ = self._table(states.device)
        noise_scores = self._noise_scores(states.device)
        step = max(1, self.chunk_elements // table.shape[0])
        for i in range(0, len(states), step):
            base = states[i:i + step].to(torch.float32) @ table.T
            top = base.topk(min(BOUND_TOKENS, table.shape[0]), dim=1).indices
            rival = (base.gather(1, top)[:, :, None] + noise_scores.T[top]).amax(dim=1)
            yield i, base, rival

    def _count_rows(self, base: torch.Tensor, rival: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """Draws in which each row's token `own` (n,) wins: 0 without looking further where it loses to the
        rival bound in every draw; the others against the whole table."""
        noise_scores = self._noise_scores(base.device)
        mine = base.gather(1, own[:, None]) + noise_scores.T[own]  # (n, M)
        out = torch.zeros(len(base), dtype=torch.long, device=base.device)
        possible = (mine >= rival).any(dim=1).nonzero().squeeze(1)
        inner = max(1, self.chunk_elements // (self.samples * base.shape[1]))
        for j in range(0, len(possible), inner):
            rows = possible[j:j + inner]
            winner = (base[rows][:, None, :] + noise_scores[None, :, :]).argmax(dim=-1)  # (r, M)
            out[rows] = (winner == own[rows, None]).sum(dim=-1)
        return out

    def counts(self, tokens: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """How many of the estimator's draws n make snap(state + n) the given token: tokens (N,), states (N, d).
        Exact; cheap where the token cannot win (it loses to one of the state's BOUND_TOKENS best tokens
        in every draw): only the others are scored against the whole table in every draw."""
        tokens = tokens.to(states.device)
        out = torch.zeros(len(states), dtype=torch.long, device=states.device)
        for i, base, rival in self._chunks(states):
            out[i:i + len(base)] = self._count_rows(base, rival, tokens[i:i + len(base)])
        return out

    def count_table(self, tokens: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """counts (R, S) of R tokens against S states, each state's scores against the table computed
        once for all R (a whole-vocabulary lookup costs one V x V x d product, whatever R)."""
        tokens = tokens.to(states.device)
        out = torch.zeros(len(tokens), len(states), dtype=torch.long, device=states.device)
        for i, base, rival in self._chunks(states):
            for r, token in enumerate(tokens.tolist()):
                own = torch.full((len(base),), token, dtype=torch.long, device=states.device)
                out[r, i:i + len(base)] = self._count_rows(base, rival, own)
        return out

    def _from_counts(self, count: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        estimate = (count.to(torch.float64) + 0.5) / (self.samples + 1)
        return (-torch.log(estimate)).to(torch.promote_types(dtype, torch.float32))

    def pairwise_statistic(self, observed: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return self._from_counts(self.count_table(self.token_of(observed), states), states.dtype)

    def statistic(self, observed: torch.Tensor, simulated: torch.Tensor) -> torch.Tensor:
        observed, simulated = torch.broadcast_tensors(observed, simulated)
        shape = observed.shape[:-1]
        tokens = self.token_of(observed.reshape(-1, observed.shape[-1]))
        count = self.counts(tokens.to(simulated.device), simulated.reshape(-1, simulated.shape[-1]))
        return self._from_counts(count, simulated.dtype).reshape(shape)

    def nll(self, statistic: torch.Tensor, *, dim: int) -> torch.Tensor:
        return statistic  # the statistic is -log P(observed token | state) itself

    def threshold(self, *, dim: int, miss_probability: float) -> float:
        _check_dim(dim), _check_miss(miss_probability)
        return -math.log((self.samples + 0.5) / (self.samples + 1))  # the floor: no certified stop

    def std(self, *, dim: int | None = None) -> float:
        return math.sqrt((self.dim if dim is None else _check_dim(dim)) + 1) / self.epsilon  # the noise before the snap

    def sample(self, shape: torch.Size, *, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        """The dchi noise before the snap (per vector, or one radius for the call)."""
        law = (SharedRadiusDChiNoise if self.shared_radius else DChiNoise)(epsilon=self.epsilon)
        return law.sample(shape, generator=generator, dtype=dtype)

    def observe(self, simulated: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        noisy = additive_observe(self, simulated, generator)
        return self.embedding.to(device=simulated.device, dtype=simulated.dtype)[self.snap(noisy)]

    def describe(self) -> dict[str, Any]:
        out = {"law": self.name, "epsilon": self.epsilon, "metric": self.metric, "samples": self.samples,
               "seed": self.seed, "vocab": int(self.embedding.shape[0])}
        if self.shared_radius:
            out["shared_radius"] = True
        return out


# --- Split-N-Denoise ----------------------------------------------------------------------------------
def _log_q(a: float, z: torch.Tensor) -> torch.Tensor:
    """log Q(a, z), the regularised upper incomplete gamma (Gamma(a, 1)'s survival function), float64;
    where Q underflows, the first term of its continued fraction: log(z^a e^-z / ((z + 1 - a) Gamma(a)))."""
    q = torch.special.gammaincc(torch.tensor(a, dtype=z.dtype, device=z.device), z)
    asymptotic = a * torch.log(z.clamp_min(1e-300)) - z - torch.log((z + 1 - a).clamp_min(1.0)) - math.lgamma(a)
    return torch.where(q > 1e-290, torch.log(q.clamp_min(1e-300)), asymptotic)


LOG_Q_STEP = 1e-3  # grid step of `_log_q_on_grid` in z


class LogQGrid(NamedTuple):
    values: torch.Tensor  # log Q(a, k * LOG_Q_STEP), k = 0 .. K
    slopes: torch.Tensor  # values[k + 1] - values[k]: each chord's rise, made once for all lookups


def _log_q_grid(a: float, top: float, device=None) -> LogQGrid:
    """log Q(a, k * LOG_Q_STEP) for k = 0 .. ceil(top) + 1, top (in steps) capped at `_grid_cap(a)`."""
    points = int(math.ceil(min(top, _grid_cap(a)))) + 2
    values = _log_q(a, torch.arange(points, dtype=torch.float64, device=device) * LOG_Q_STEP)
    return LogQGrid(values, values.diff())


def _grid_cap(a: float) -> float:
    return (a + 60.0 * math.sqrt(a) + 100.0) / LOG_Q_STEP


def _log_q_on_grid(a: float, at: torch.Tensor, grid: LogQGrid | None = None) -> torch.Tensor:
    """log Q(a, z) for z = at * LOG_Q_STEP >= 0 (`at` float64, overwritten), linearly interpolated on the
    grid z = k * LOG_Q_STEP (`grid`, from `_log_q_grid`, reaching at least at.max(); exact at its
    points; beyond a + 60 sqrt(a) + 100, far in Q's tail, computed exactly). An attack scores a whole
    vocabulary against every observation: 25 prompts x 49,152 tokens x 576 coordinates is 7e8
    incomplete-gamma calls per position (minutes on a CPU), the grid one per point. log Q is concave
    with |d2/dz2| < 0.05 for a >= 100 (its slope goes from 0 to -1 over a width of about sqrt(a)), so the
    chord lies under it by at most step^2 / 8 x 0.05 = 6e-9 nats a coordinate (measured: 1.6e-10 at
    a = 575, 9.4e-9 at a = 7), the same for the same z in every call."""
    cap = _grid_cap(a)
    outside = at > cap
    far = _log_q(a, at[outside] * LOG_Q_STEP) if bool(outside.any()) else None
    at.clamp_(max=cap)
    if grid is None:
        grid = _log_q_grid(a, float(at.max()) if at.numel() else 0.0, at.device)
    index = at.long().clamp_(max=len(grid.values) - 2)
    out = grid.values[index].addcmul_(grid.slopes[index], at.sub_(index))
    if far is not None:
        out[outside] = far
    return out


def _hazard(a: float, z: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Gamma(a, 1)'s hazard pdf(z) / Q(a, z)."""
    log_pdf = torch.xlogy(torch.tensor(a - 1, dtype=z.dtype, device=z.device), z) - z - math.lgamma(a)
    return torch.exp(log_pdf - log_q)


@dataclass(frozen=True)
class SnDNoise(NoiseLaw):
    """Split-N-Denoise's noise (Mai et al., "Split-and-Denoise", ICML 2024; NusIoraPrivacy/eaas-privacy
    `data/load_data.py` `sample_noise_Chi`): per coordinate n_i = l_i v_i, l_i ~ Gamma(shape d, rate eta)
    and v_i ~ U(-1, 1), all independent; then, with `clip`, the noisy vector is scaled to L2 norm <= clip
    (`util/utils.py` `get_embeddings`, --clip norm: the clip comes AFTER the noise).

    Density of one coordinate: p(x) = E_l[1{|x| < l} / (2 l)] = eta / (2 (d - 1)) Q(d - 1, eta |x|), since
    Gamma(l; d, eta) / l = eta / (d - 1) Gamma(l; d - 1, eta) (Q: Gamma's regularised upper incomplete
    function). So -log p(y | s) = -sum_i log Q(d - 1, eta |y_i - s_i|) + const, and statistic is that
    over d. log Q is concave (Gamma(d - 1) is log-concave for d >= 2) with slope at most eta: the
    mechanism is eta-metric-DP for the L1 distance. d >= 2.

    With `clip`, an observation of norm < clip was not clipped (the density above). One on the clip
    sphere, y = clip u, came from t u for some t >= clip, so p(y | s) ~ int_clip^inf t^(d-1) p(t u - s) dt.
    log of the integrand is concave in t, so Laplace's method is used: its mode t* (safeguarded Newton),
    log int ~ g(t*) + log(sqrt(2 pi / -g''(t*)) Phi((t* - clip) sqrt(-g''(t*)))). The assumption is
    that approximation (exact as d grows; relative width of the integrand ~ 1/sqrt(d)).
    """

    eta: float
    clip: float | None = None
    name: ClassVar[str] = "snd"

    def __post_init__(self) -> None:
        _positive(self.eta, "snd: eta")
        if self.clip is not None:
            _positive(self.clip, "snd: clip")

    @staticmethod
    def _shape_of(d: int) -> float:
        if d < 2:
            raise ValueError(f"snd: the noise needs d >= 2 (its coordinate density uses Gamma(d - 1)), got d = {d}")
        return float(d - 1)

    def _log_f(self, x: torch.Tensor, a: float, grid: LogQGrid | None = None) -> torch.Tensor:
        """log Q(a, eta |x|) per coordinate (float64 x, overwritten; `grid`: from `_log_q_grid`)."""
        return _log_q_on_grid(a, x.abs_().mul_(self.eta / LOG_Q_STEP), grid)

    def statistic(self, observed: torch.Tensor, simulated: torch.Tensor) -> torch.Tensor:
        out_dtype = torch.promote_types(torch.promote_types(observed.dtype, simulated.dtype), torch.float32)
        y, s = torch.broadcast_tensors(observed.to(torch.float64), simulated.to(torch.float64))
        d = y.shape[-1]
        a = self._shape_of(d)
        plain = -self._log_f(y - s, a).sum(dim=-1)
        if self.clip is None:
            return (plain / d).to(out_dtype)
        norm_y = torch.linalg.vector_norm(y, dim=-1)
        on_sphere = norm_y >= self.clip * (1 - 1e-5)
        if bool(on_sphere.any()):
            radial = -self._radial_log_integral(y[on_sphere] / norm_y[on_sphere, None], s[on_sphere], a)
            plain = plain.masked_scatter(on_sphere, radial)
        return (plain / d).to(out_dtype)

    def pairwise_statistic(self, observed: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """As `statistic` row by row, with the states made float64 once (a vocabulary's states are
        226 MB in float64 at d = 576: one copy, not one per observation)."""
        if self.clip is not None:
            return super().pairwise_statistic(observed, states)
        out_dtype = torch.promote_types(torch.promote_types(observed.dtype, states.dtype), torch.float32)
        wide, observed = states.to(torch.float64), observed.to(torch.float64)
        a = self._shape_of(wide.shape[-1])
        reach = (observed.abs().max() + wide.abs().max()).item() if observed.numel() and wide.numel() else 0.0
        grid = _log_q_grid(a, self.eta * reach / LOG_Q_STEP, wide.device)  # |y - s| <= max|y| + max|s|
        rows = [torch.cat([-self._log_f(part - row, a, grid).sum(dim=-1) for part in wide.split(1024)]) / wide.shape[-1]
                for row in observed]  # 1,024 states at a time: the temporaries stay in cache (2x faster measured)
        return torch.stack(rows).to(out_dtype) if rows else wide.new_zeros((0, len(wide))).to(out_dtype)

    def _radial_parts(self, t: torch.Tensor, u: torch.Tensor, s: torch.Tensor, a: float,
                      value: bool = False) -> tuple[torch.Tensor, ...]:
        """g'(t), g''(t) (and g(t) with value) of g(t) = (d - 1) log t + sum_i log f(t u_i - s_i)."""
        d = u.shape[-1]
        x = t[:, None] * u - s
        z = self.eta * x.abs()
        log_q = _log_q(a, z)
        hazard = _hazard(a, z, log_q)
        slope = -self.eta * torch.sign(x) * hazard  # d/dx log f
        safe_z = torch.where(z > 0, z, torch.ones_like(z))
        curvature = -(self.eta ** 2) * hazard * torch.where(z > 0, (a - 1) / safe_z - 1 + hazard, torch.zeros_like(z))
        g1 = (d - 1) / t + (u * slope).sum(dim=-1)
        g2 = -(d - 1) / t ** 2 + (u * u * curvature).sum(dim=-1)
        if value:
            return g1, g2, (d - 1) * torch.log(t) + log_q.sum(dim=-1)
        return g1, g2

    def _radial_log_integral(self, u: torch.Tensor, s: torch.Tensor, a: float) -> torch.Tensor:
        """log int_clip^inf t^(d-1) prod_i f(t u_i - s_i) dt (up to the constants dropped from f), by
        Laplace's method around the mode of the (concave) log integrand."""
        d = u.shape[-1]
        typical = math.sqrt(d * d * (d + 1) / 3) / self.eta  # E|n| ~ sqrt(d E l^2 / 3)
        t = torch.sqrt(s.pow(2).sum(dim=-1) + typical ** 2)
        lo = torch.zeros_like(t)  # g' > 0 below the mode (g' -> +inf as t -> 0), < 0 above it
        hi = torch.full_like(t, math.inf)
        done = torch.zeros_like(t, dtype=torch.bool)
        for _ in range(200):  # Newton, kept inside the bracket [lo, hi] (bisection, or doubling while hi is inf)
            g1, g2 = self._radial_parts(t, u, s, a)
            rising = g1 > 0
            lo = torch.where(rising, t, lo)
            hi = torch.where(rising, hi, t)
            new = t - g1 / torch.where(g2 < 0, g2, torch.full_like(g2, -math.inf))
            outside = ~((new >= lo) & (new <= hi)) | (g2 >= 0)
            new = torch.where(outside, torch.where(torch.isfinite(hi), (lo + hi) / 2, 2 * t), new)
            done = done | ((new - t).abs() <= 1e-9 * t) | (g1 == 0)
            t = torch.where(done, t, new)
            if bool(done.all()):
                break
        _, g2, g = self._radial_parts(t, u, s, a, value=True)
        width = 1 / torch.sqrt((-g2).clamp_min(1e-300))
        tail = torch.special.log_ndtr((t - self.clip) / width)
        return g + 0.5 * math.log(2 * math.pi) + torch.log(width) + tail

    def nll(self, statistic: torch.Tensor, *, dim: int) -> torch.Tensor:
        return dim * statistic

    def threshold(self, *, dim: int, miss_probability: float) -> float:
        """The 1 - miss quantile of the true state's statistic, by Monte Carlo (fixed seed; clipped: for
        states of norm <= clip); see `_snd_quantile`."""
        return _snd_quantile(self.eta, self.clip, _check_dim(dim), _check_miss(miss_probability))

    def std(self, *, dim: int | None = None) -> float:
        """The noise's per-coordinate std before the clip, sqrt(d (d + 1) / 3) / eta (E l^2 = d (d + 1) / eta^2,
        E v^2 = 1/3); with `clip`, at most clip sqrt(2 / d) (the clipped output is within about that of a
        state of norm ~ clip). Depends on d: pass dim."""
        if dim is None:
            raise ValueError("snd: the per-coordinate std sqrt(d (d + 1) / 3) / eta depends on d; pass dim")
        d = _check_dim(dim)
        before = math.sqrt(d * (d + 1) / 3) / self.eta
        return before if self.clip is None else min(before, self.clip * math.sqrt(2 / d))

    def sample(self, shape: torch.Size, *, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        """The noise before the clip: Gamma(d, rate eta) magnitude times U(-1, 1), per coordinate."""
        shape = torch.Size(shape)
        work = _work_dtype(dtype)
        alpha = torch.full(shape, float(shape[-1]), dtype=torch.float64, device=generator.device)
        magnitude = torch._standard_gamma(alpha, generator=generator) / self.eta
        factor = torch.rand(shape, generator=generator, dtype=torch.float64, device=generator.device) * 2 - 1
        return (magnitude * factor).to(work).to(dtype)

    def observe(self, simulated: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        from .dp import clip_rows  # noqa: PLC0415  (dp imports nothing of this module; kept local for clarity)

        noisy = additive_observe(self, simulated, generator)
        return noisy if self.clip is None else clip_rows(noisy, self.clip)

    def describe(self) -> dict[str, Any]:
        out = {"law": self.name, "eta": self.eta}
        if self.clip is not None:
            out["clip"] = self.clip
        return out


QUANTILE_DRAWS = 20000  # unclipped; a clipped statistic costs ~6 times more (Newton), so a fifth of that
QUANTILE_TAIL = 20  # draws beyond the empirical quantile used; past that, a normal tail


@functools.lru_cache(maxsize=64)
def _snd_quantile(eta: float, clip: float | None, dim: int, miss: float) -> float:
    """Monte Carlo quantile of SnDNoise's statistic for the true state: QUANTILE_DRAWS draws (a fifth with
    a clip; seed 0) of the statistic, with the state at 0 (without a clip the statistic's law does not
    depend on it) or, with a clip, at norm clip in a random direction (the tail grows with the state's
    norm: the threshold holds for states of norm <= clip, as the authors' clip, about the embeddings'
    largest norm, makes them); the empirical 1 - miss quantile where at least
    QUANTILE_TAIL draws lie beyond it, else the empirical 1 - q0 quantile (q0 = QUANTILE_TAIL / draws)
    moved out by a normal tail: + std (z(1 - miss) - z(1 - q0)). The statistic is a mean over d
    coordinates, near normal."""
    law = SnDNoise(eta=eta, clip=clip)
    g = torch.Generator().manual_seed(0)
    stats = []
    draws = QUANTILE_DRAWS if clip is None else QUANTILE_DRAWS // 5
    rows = max(1, (1 << 21) // dim)
    for i in range(0, draws, rows):
        n = min(rows, draws - i)
        if clip is None:  # the statistic's law does not depend on the state
            state = torch.zeros(n, dim, dtype=torch.float64)
        else:  # it does, and its tail grows with the state's norm: states of norm clip, random directions
            state = clip * _directions(torch.Size([n, dim]), g, torch.float64)
        stats.append(law.statistic(law.observe(state, generator=g), state))
    values = torch.cat(stats).to(torch.float64)
    q0 = QUANTILE_TAIL / draws
    if miss >= q0:
        return float(torch.quantile(values, 1 - miss))
    base = float(torch.quantile(values, 1 - q0))
    return base + float(values.std()) * float(norm.ppf(1 - miss) - norm.ppf(1 - q0))


# --- DP-Forward: Gaussian noise on a sequence scaled by an unknown factor ------------------------------
@dataclass(frozen=True)
class ScaledGaussianNoise(NoiseLaw):
    """y = c s + N(0, sigma^2) per coordinate with 0 < c <= 1 unknown: DP-Forward clips the WHOLE
    sequence's matrix to Frobenius norm C before the noise (xiangyue9607/DP-Forward `dp_noise.py`
    `_max_norm_clip`), so each position's state is scaled by one c = min(1, C / ||H||_F) that depends on
    every position, the secret ones included. Per position the attacker does not know c: the statistic is
    the profile likelihood's, min over c in [0, 1] of ||y - c s||^2 / d (c = clamp(<y, s> / |s|^2, 0, 1)),
    nll d stat / (2 sigma^2). The true state's statistic is at most |n|^2 / d (c is in [0, 1]), so the
    Gaussian chi2_d threshold bounds it. What it assumes: a c per position (the sequence's single c, known
    to be C / ||H||_F for a full hypothesis, is not used per position)."""

    sigma: float
    name: ClassVar[str] = "gaussian-scaled"

    def __post_init__(self) -> None:
        _positive(self.sigma, "gaussian-scaled: sigma")

    @staticmethod
    def _best_scale(dot: torch.Tensor, norm2: torch.Tensor) -> torch.Tensor:
        return torch.where(norm2 > 0, dot / norm2.clamp_min(torch.finfo(norm2.dtype).tiny), torch.zeros_like(dot)).clamp(0, 1)

    def statistic(self, observed: torch.Tensor, simulated: torch.Tensor) -> torch.Tensor:
        dot = (observed * simulated).sum(dim=-1, keepdim=True)
        c = self._best_scale(dot, simulated.pow(2).sum(dim=-1, keepdim=True))
        return (observed - c * simulated).pow(2).mean(dim=-1)

    def pairwise_statistic(self, observed: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        dot = observed @ states.T
        norm2 = states.pow(2).sum(dim=-1)[None, :]
        c = self._best_scale(dot, norm2)
        residual = observed.pow(2).sum(dim=-1, keepdim=True) - 2 * c * dot + c * c * norm2
        return residual.clamp_min(0) / observed.shape[-1]

    def nll(self, statistic: torch.Tensor, *, dim: int) -> torch.Tensor:
        return dim * statistic / (2 * self.sigma ** 2)

    def threshold(self, *, dim: int, miss_probability: float) -> float:
        dim, miss = _check_dim(dim), _check_miss(miss_probability)
        return self.sigma ** 2 * float(chi2.ppf(1 - miss, dim)) / dim

    def std(self, *, dim: int | None = None) -> float:
        return self.sigma

    def sample(self, shape: torch.Size, *, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype, device=generator.device) * self.sigma

    def describe(self) -> dict[str, Any]:
        return {"law": self.name, "sigma": self.sigma}


# --- anisotropic Gaussian -----------------------------------------------------------------------------
def vector_digest(vector: torch.Tensor) -> str:
    """sha256 (first 16 hex digits) of a vector's float64 values: what a record names it by."""
    data = vector.detach().to(dtype=torch.float64, device="cpu").contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class DiagonalGaussianNoise(NoiseLaw):
    """N(0, diag(std^2)): a std per coordinate (Bell 2026's Sigma_diag). -log p(y | s) =
    sum_i (y_i - s_i)^2 / (2 std_i^2) + const: the statistic is the squared Mahalanobis distance over d,
    nll d stat / 2, and the true state's d stat is chi2_d (exact; the Mahalanobis attacker)."""

    std_vector: torch.Tensor = field(repr=False)  # (d,)
    name: ClassVar[str] = "gaussian-diagonal"

    def __post_init__(self) -> None:
        v = self.std_vector
        if not (isinstance(v, torch.Tensor) and v.dim() == 1 and len(v) >= 1 and torch.is_floating_point(v)
                and bool(torch.isfinite(v).all()) and bool((v > 0).all())):
            raise ValueError("gaussian-diagonal: std must be a 1-D tensor of finite numbers > 0")
        object.__setattr__(self, "std_vector", v.detach().to(dtype=torch.float64, device="cpu").clone())

    def _std(self, like: torch.Tensor) -> torch.Tensor:
        if like.shape[-1] != len(self.std_vector):
            raise ValueError(f"gaussian-diagonal: the std vector has {len(self.std_vector)} coordinates, the states "
                             f"{like.shape[-1]}")
        return self.std_vector.to(device=like.device, dtype=torch.promote_types(like.dtype, torch.float32))

    def statistic(self, observed: torch.Tensor, simulated: torch.Tensor) -> torch.Tensor:
        return ((observed - simulated) / self._std(observed)).pow(2).mean(dim=-1)

    def pairwise_statistic(self, observed: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        std = self._std(observed)
        return squared_distances(observed / std, states / std) / observed.shape[-1]

    def nll(self, statistic: torch.Tensor, *, dim: int) -> torch.Tensor:
        return dim * statistic / 2

    def threshold(self, *, dim: int, miss_probability: float) -> float:
        dim, miss = _check_dim(dim), _check_miss(miss_probability)
        return float(chi2.ppf(1 - miss, dim)) / dim

    def std(self, *, dim: int | None = None) -> float:
        """The root-mean-square std over coordinates (for code that knows only one sigma)."""
        if dim is not None and _check_dim(dim) != len(self.std_vector):
            raise ValueError(f"gaussian-diagonal: the std vector has {len(self.std_vector)} coordinates, not {dim}")
        return float(self.std_vector.pow(2).mean().sqrt())

    def sample(self, shape: torch.Size, *, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        shape = torch.Size(shape)
        if shape[-1] != len(self.std_vector):
            raise ValueError(f"gaussian-diagonal: the std vector has {len(self.std_vector)} coordinates, the states "
                             f"{shape[-1]}")
        work = _work_dtype(dtype)
        draw = torch.randn(shape, generator=generator, dtype=work, device=generator.device)
        return (draw * self.std_vector.to(device=generator.device, dtype=work)).to(dtype)

    def describe(self) -> dict[str, Any]:
        v = self.std_vector
        return {"law": self.name, "dim": len(v), "rms_std": float(v.pow(2).mean().sqrt()), "min_std": float(v.min()),
                "max_std": float(v.max()), "sha256": vector_digest(v)}
