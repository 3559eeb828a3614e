"""Structured residual covariance matrices (MMRM): an unconstrained parameter vector θ → a subject's Σ.

The structures and their names are mmrm's (openpharma/mmrm, vignette "Covariance Structures"), so are the
layouts of θ: log standard deviations first, then the correlation parameters. Every θ ∈ ℝᵏ gives a
symmetric positive definite Σ, so an unconstrained quasi-Newton optimizer never leaves the model:

- a standard deviation is exp(θ) (mmrm's log σ, not log σ²);
- a correlation in (−1, 1) is f⁻¹(θ) = θ / √(1 + θ²) (mmrm's map), for ar1, ad and the partial
  autocorrelations of toep;
- the compound-symmetry correlation lies in (−1/(m − 1), 1): ρ = logit⁻¹(θ)(1 + a) − a, a = 1/(m − 1);
- us is the Cholesky factor L of Σ with L_ii = σ_i = exp(θ_i) and L_ij = σ_i θ_ij (j < i), rows in turn;
- sp_exp's correlation at distance d is exp(−d / φ) with the range φ = exp(θ₂) (nlme's ``corExp``;
  mmrm's ρ^d with ρ = exp(−1/φ)).

One departure from mmrm: toep and toeph parametrize the Toeplitz correlations by their partial
autocorrelations (the Durbin–Levinson recursion), which maps (−1, 1)^(m−1) onto exactly the positive definite
Toeplitz correlation matrices; mmrm maps θ to the lag correlations directly, and some of those θ give a
matrix that is not positive definite.

The builders use only arithmetic and analytic functions (no abs, no conjugation), so they accept complex
θ: ``jacobian`` differentiates Σ by the complex step, exact to rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from longitudinal.errors import ConfigError

#: The structures over m visits (θ → m × m Σ), then those over continuous times.
VISIT_STRUCTURES = ("us", "cs", "csh", "ar1", "ar1h", "toep", "toeph", "ad", "adh")
SPATIAL_STRUCTURES = ("sp_exp",)
STRUCTURES = VISIT_STRUCTURES + SPATIAL_STRUCTURES
#: Homogeneous structures: θ₀ = log σ and Σ = σ² R(θ₁, ...), so σ² is profiled out of the likelihood.
HOMOGENEOUS = ("cs", "ar1", "toep", "ad", "sp_exp")

_COMPLEX_STEP = 1e-30


def parameter_count(name: str, n_visits: int) -> int:
    """mmrm's number of covariance parameters of structure ``name`` over ``n_visits`` visits."""
    m = n_visits
    counts = {
        "us": m * (m + 1) // 2, "cs": 2, "csh": m + 1, "ar1": 2, "ar1h": m + 1,
        "toep": m, "toeph": 2 * m - 1, "ad": m, "adh": 2 * m - 1, "sp_exp": 2,
    }
    if name not in counts:
        raise ConfigError(f"unknown covariance structure {name!r}; use one of {', '.join(STRUCTURES)}")
    return counts[name]


@dataclass(frozen=True)
class CovarianceStructure:
    """One structure over ``n_visits`` visits (ignored by the spatial ones, which take times).

    ``covariance(theta, coords)`` is Σ over the coordinates ``coords``: visit indices 0..m−1 (a subset, in
    order, for a subject with missing visits) or, for ``sp_exp``, the times of the visits.
    """

    name: str
    n_visits: int

    def __post_init__(self) -> None:
        parameter_count(self.name, self.n_visits)
        if self.name in VISIT_STRUCTURES and self.n_visits < 2:
            raise ConfigError(f"covariance structure {self.name!r} needs at least 2 visits, got {self.n_visits}")

    @property
    def n_params(self) -> int:
        return parameter_count(self.name, self.n_visits)

    @property
    def homogeneous(self) -> bool:
        """Whether θ₀ is log σ with Σ = σ² R(θ₁, ...): then σ² is profiled out by the likelihood."""
        return self.name in HOMOGENEOUS

    @property
    def spatial(self) -> bool:
        return self.name in SPATIAL_STRUCTURES

    @property
    def log_sd_count(self) -> int:
        """How many leading entries of θ are log scales (1 for the homogeneous structures, m for the
        heterogeneous ones, the log standard deviations, and for us, the logs of L's diagonal): adding log c
        to each multiplies Σ by c²."""
        return 1 if self.homogeneous else self.n_visits

    def covariance(self, theta: np.ndarray, coords: np.ndarray | None = None) -> np.ndarray:
        """Σ(θ) over ``coords`` (default: all m visits; required for ``sp_exp``).

        ``coords`` of shape (s,) gives one s × s matrix; of shape (g, s), g subjects' coordinates stacked,
        it gives their g matrices at once, shape (g, s, s).
        """
        theta = np.asarray(theta)
        if theta.shape != (self.n_params,):
            raise ValueError(f"structure {self.name!r} over {self.n_visits} visits takes {self.n_params} "
                             f"parameters, got shape {theta.shape}")
        if self.spatial:
            if coords is None:
                raise ValueError("sp_exp needs the times of the visits")
            return spatial_exponential(theta, np.asarray(coords, dtype=float))
        full = _BUILDERS[self.name](theta, self.n_visits)
        if coords is None:
            return full
        index = np.asarray(coords, dtype=int)
        return full[index[..., :, None], index[..., None, :]]

    def jacobian(self, theta: np.ndarray, coords: np.ndarray | None = None, *, start: int = 0) -> np.ndarray:
        """dΣ/dθ_k for k = ``start``, ..., shape (k, s, s) (or (k, g, s, s) for stacked ``coords``), by the
        complex step (exact to rounding, no truncation)."""
        theta = np.asarray(theta, dtype=float)
        if not self.spatial and coords is not None:  # differentiate the m × m matrix once, then pick
            index = np.asarray(coords, dtype=int)
            return self.jacobian(theta, start=start)[:, index[..., :, None], index[..., None, :]]
        rows = []
        for k in range(start, theta.size):
            shifted = theta.astype(complex)
            shifted[k] += 1j * _COMPLEX_STEP
            rows.append(self.covariance(shifted, coords).imag / _COMPLEX_STEP)
        return np.stack(rows)

    def rescale(self, theta: np.ndarray, factor: float) -> np.ndarray:
        """θ of the covariance factor² Σ(θ): the log standard deviations shifted by log ``factor``."""
        out = np.array(theta, dtype=float)
        out[:self.log_sd_count] += np.log(factor)
        return out

    def start(self, empirical: np.ndarray) -> np.ndarray:
        """θ whose Σ is close to ``empirical`` (an m × m covariance, e.g. of OLS residuals; for ``sp_exp``
        a 2 × 2 covariance of visits one time unit apart): the optimizer's starting point."""
        return _start(self.name, self.n_visits, np.asarray(empirical, dtype=float))


def correlation_from(theta: np.ndarray) -> np.ndarray:
    """f⁻¹(θ) = θ / √(1 + θ²) ∈ (−1, 1), elementwise (mmrm's map)."""
    return theta / np.sqrt(1.0 + theta * theta)


def unbounded_from(rho: np.ndarray) -> np.ndarray:
    """f(ρ) = ρ / √(1 − ρ²), the inverse of ``correlation_from``."""
    return rho / np.sqrt(1.0 - rho * rho)


def autocorrelations(partial: np.ndarray) -> list[np.ndarray]:
    """ρ_1..ρ_k of a stationary series from its partial autocorrelations φ_1..φ_k (Durbin–Levinson).

    Any φ ∈ (−1, 1)^k gives the correlations of a positive definite Toeplitz matrix and conversely.
    """
    rho: list[np.ndarray] = []
    coef: list[np.ndarray] = []  # AR coefficients a_{k,1..k} of the order-k predictor
    for k, phi in enumerate(partial):
        if k == 0:
            rho.append(phi)
            coef = [phi]
            continue
        variance = 1.0 - sum(a * r for a, r in zip(coef, rho))
        rho.append(sum(a * rho[k - 1 - j] for j, a in enumerate(coef)) + phi * variance)
        coef = [a - phi * coef[k - 1 - j] for j, a in enumerate(coef)] + [phi]
    return rho


def partial_autocorrelations(rho: np.ndarray) -> np.ndarray:
    """φ_1..φ_k from lag correlations ρ_1..ρ_k (the inverse recursion), each clipped into (−0.95, 0.95)."""
    phis: list[float] = []
    coef: list[float] = []
    for k in range(len(rho)):
        num = rho[k] - sum(a * rho[k - 1 - j] for j, a in enumerate(coef))
        den = 1.0 - sum(a * r for a, r in zip(coef, rho[:k]))
        phi = float(np.clip(num / den if den > 1e-8 else 0.0, -0.95, 0.95))
        coef = [a - phi * coef[k - 1 - j] for j, a in enumerate(coef)] + [phi]
        phis.append(phi)
    return np.array(phis)


# ------------------------------------------------------------------------------- correlation matrices


def _heterogeneous(log_sd: np.ndarray, correlation: np.ndarray) -> np.ndarray:
    sd = np.exp(log_sd)
    return correlation * np.outer(sd, sd)  # sd_i sd_j == sd_j sd_i in floating point: exactly symmetric


def _filled(m: int, value: Callable[[int, int], object], dtype: type) -> np.ndarray:
    """The symmetric m × m matrix with unit diagonal and value(i, j) below it."""
    out: np.ndarray = np.eye(m, dtype=dtype)
    for i in range(m):
        for j in range(i):
            out[i, j] = out[j, i] = value(i, j)
    return out


def _dtype(theta: np.ndarray) -> type:
    return complex if np.iscomplexobj(theta) else float


def compound_symmetry_correlation(theta: np.ndarray, m: int) -> np.ndarray:
    """ρ_ij = ρ (i ≠ j), ρ = logit⁻¹(θ)(1 + a) − a with a = 1/(m − 1): positive definite for every θ."""
    a = 1.0 / (m - 1)
    rho = (1.0 + a) / (1.0 + np.exp(-theta[0])) - a
    return _filled(m, lambda i, j: rho, _dtype(theta))


def autoregressive_correlation(theta: np.ndarray, m: int) -> np.ndarray:
    """ρ_ij = ρ^|i−j|, ρ = f⁻¹(θ)."""
    rho = correlation_from(theta[0])
    return _filled(m, lambda i, j: rho ** (i - j), _dtype(theta))


def toeplitz_correlation(theta: np.ndarray, m: int) -> np.ndarray:
    """ρ_ij = ρ_|i−j|, the ρ_k from the partial autocorrelations φ_k = f⁻¹(θ_k) by Durbin–Levinson."""
    rho = autocorrelations(correlation_from(theta))
    return _filled(m, lambda i, j: rho[i - j - 1], _dtype(theta))


def antedependence_correlation(theta: np.ndarray, m: int) -> np.ndarray:
    """Order-one ante-dependence: ρ_ij = ∏_{k=j}^{i−1} ρ_k for j < i, ρ_k = f⁻¹(θ_k) (adjacent visits)."""
    rho = correlation_from(theta)
    return _filled(m, lambda i, j: np.prod(rho[j:i]), _dtype(theta))


# ------------------------------------------------------------------------------------------ structures


def unstructured(theta: np.ndarray, m: int) -> np.ndarray:
    """us, m(m + 1)/2 parameters: Σ = L Lᵀ with L_ii = σ_i = exp(θ_i) (i = 1..m) and L_ij = σ_i θ_ij for
    j < i (the next m(m − 1)/2 entries of θ, row by row): any covariance matrix."""
    sd = np.exp(theta[:m])
    lower: np.ndarray = np.zeros((m, m), dtype=_dtype(theta))
    k = m
    for i in range(m):
        lower[i, i] = sd[i]
        for j in range(i):
            lower[i, j] = sd[i] * theta[k]
            k += 1
    product = lower @ lower.T
    return 0.5 * (product + product.T)  # exactly symmetric (the matmul's rounding need not be)


def compound_symmetry(theta: np.ndarray, m: int) -> np.ndarray:
    """cs, 2 parameters: Σ_ij = σ² (i = j), σ²ρ (i ≠ j); θ = (log σ, logit((ρ + a)/(1 + a))), a = 1/(m − 1)."""
    return np.exp(2.0 * theta[0]) * compound_symmetry_correlation(theta[1:], m)


def compound_symmetry_heterogeneous(theta: np.ndarray, m: int) -> np.ndarray:
    """csh, m + 1 parameters: Σ_ij = σ_iσ_j ρ (i ≠ j), σ_i² on the diagonal; θ = (log σ_1..log σ_m, as cs's ρ)."""
    return _heterogeneous(theta[:m], compound_symmetry_correlation(theta[m:], m))


def autoregressive(theta: np.ndarray, m: int) -> np.ndarray:
    """ar1, 2 parameters: Σ_ij = σ² ρ^|i−j|; θ = (log σ, f(ρ))."""
    return np.exp(2.0 * theta[0]) * autoregressive_correlation(theta[1:], m)


def autoregressive_heterogeneous(theta: np.ndarray, m: int) -> np.ndarray:
    """ar1h, m + 1 parameters: Σ_ij = σ_iσ_j ρ^|i−j|; θ = (log σ_1..log σ_m, f(ρ))."""
    return _heterogeneous(theta[:m], autoregressive_correlation(theta[m:], m))


def toeplitz(theta: np.ndarray, m: int) -> np.ndarray:
    """toep, m parameters: Σ_ij = σ² ρ_|i−j|; θ = (log σ, f(φ_1)..f(φ_{m−1})), φ_k the partial
    autocorrelations of the lag correlations ρ_k."""
    return np.exp(2.0 * theta[0]) * toeplitz_correlation(theta[1:], m)


def toeplitz_heterogeneous(theta: np.ndarray, m: int) -> np.ndarray:
    """toeph, 2m − 1 parameters: Σ_ij = σ_iσ_j ρ_|i−j|; θ = (log σ_1..log σ_m, f(φ_1)..f(φ_{m−1}))."""
    return _heterogeneous(theta[:m], toeplitz_correlation(theta[m:], m))


def antedependence(theta: np.ndarray, m: int) -> np.ndarray:
    """ad, m parameters: Σ_ij = σ² ∏_{k=i}^{j−1} ρ_k (i < j); θ = (log σ, f(ρ_1)..f(ρ_{m−1}))."""
    return np.exp(2.0 * theta[0]) * antedependence_correlation(theta[1:], m)


def antedependence_heterogeneous(theta: np.ndarray, m: int) -> np.ndarray:
    """adh, 2m − 1 parameters (SAS's ANTE(1)): Σ_ij = σ_iσ_j ∏_{k=i}^{j−1} ρ_k; θ = (log σ_1..log σ_m,
    f(ρ_1)..f(ρ_{m−1}))."""
    return _heterogeneous(theta[:m], antedependence_correlation(theta[m:], m))


def spatial_exponential(theta: np.ndarray, times: np.ndarray) -> np.ndarray:
    """sp_exp, 2 parameters: Σ_ij = σ² exp(−|t_i − t_j| / φ) over the visit times t; θ = (log σ, log φ).
    ``times`` (s,) or stacked (g, s).

    mmrm writes the correlation as ρ^d with ρ = exp(−1/φ) ∈ (0, 1); nlme's ``corExp`` uses the range φ.
    """
    distance = np.abs(times[..., :, None] - times[..., None, :])
    return np.exp(2.0 * theta[0]) * np.exp(-distance * np.exp(-theta[1]))


_BUILDERS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "us": unstructured, "cs": compound_symmetry, "csh": compound_symmetry_heterogeneous,
    "ar1": autoregressive, "ar1h": autoregressive_heterogeneous, "toep": toeplitz,
    "toeph": toeplitz_heterogeneous, "ad": antedependence, "adh": antedependence_heterogeneous,
}


# ---------------------------------------------------------------------------------- reading θ aloud

_DESCRIPTIONS = {
    "us": "unstructured", "cs": "compound symmetry", "csh": "compound symmetry, heterogeneous variances",
    "ar1": "AR(1)", "ar1h": "AR(1), heterogeneous variances", "toep": "Toeplitz",
    "toeph": "Toeplitz, heterogeneous variances", "ad": "ante-dependence",
    "adh": "ante-dependence, heterogeneous variances", "sp_exp": "spatial exponential (continuous time)",
}


def describe(name: str) -> str:
    """The structure in words, as a comparison table reads it ("AR(1), heterogeneous variances")."""
    parameter_count(name, 2)  # the unknown-name error
    return _DESCRIPTIONS[name]


def named_parameters(structure: CovarianceStructure, theta: np.ndarray) -> tuple[tuple[str, float], ...]:
    """The structure's parameters on their natural scale, named as a statistician reads them, visits by
    position 1..m: ("sigma", σ) for the homogeneous structures, ("sd[j]", σ_j) for the heterogeneous ones
    and us; then the correlations: ("rho", ρ) for cs/csh/ar1/ar1h, ("rho[lag k]", ρ_k) for toep/toeph,
    ("rho[j,j+1]", ρ) between adjacent visits for ad/adh, ("corr[i,j]", ρ_ij) below the diagonal for us
    (row by row), ("range", φ) for sp_exp (corr = exp(−d/φ)). Their count is ``structure.n_params``.
    """
    theta = np.asarray(theta, dtype=float)
    if theta.shape != (structure.n_params,):
        raise ValueError(f"structure {structure.name!r} over {structure.n_visits} visits takes "
                         f"{structure.n_params} parameters, got shape {theta.shape}")
    name, m, k = structure.name, structure.n_visits, structure.log_sd_count
    sds = np.sqrt(np.diag(structure.covariance(theta))) if name == "us" else np.exp(theta[:k])  # us: Σ = LLᵀ
    scale = [("sigma", float(sds[0]))] if k == 1 else [(f"sd[{j + 1}]", float(sd)) for j, sd in enumerate(sds)]
    rest = theta[k:]
    correlations: list[tuple[str, float]]
    if name == "sp_exp":
        correlations = [("range", float(np.exp(rest[0])))]
    elif name == "us":
        corr = _correlation_of(structure.covariance(theta))
        correlations = [(f"corr[{i + 1},{j + 1}]", float(corr[i, j])) for i in range(m) for j in range(i)]
    elif name in ("cs", "csh"):
        correlations = [("rho", float(compound_symmetry_correlation(rest, m)[1, 0]))]
    elif name in ("ar1", "ar1h"):
        correlations = [("rho", float(correlation_from(rest[0])))]
    elif name in ("toep", "toeph"):
        lags = autocorrelations(correlation_from(rest))
        correlations = [(f"rho[lag {j + 1}]", float(r)) for j, r in enumerate(lags)]
    else:  # ad, adh
        correlations = [(f"rho[{j + 1},{j + 2}]", float(r)) for j, r in enumerate(correlation_from(rest))]
    return tuple(scale + correlations)


def _correlation_of(covariance: np.ndarray) -> np.ndarray:
    sd = np.sqrt(np.diag(covariance))
    return covariance / np.outer(sd, sd)


# ------------------------------------------------------------------------------------------- starts


def _start(name: str, m: int, empirical: np.ndarray) -> np.ndarray:
    """θ matching ``empirical`` in its variances and average correlations, clipped inside the open ranges."""
    variances = np.maximum(np.diag(empirical), 1e-8 * max(float(np.max(np.diag(empirical))), 1e-300))
    log_sd = 0.5 * np.log(variances)
    corr = empirical / np.sqrt(np.outer(variances, variances))
    lag = np.array([np.mean(np.diag(corr, -k)) for k in range(1, corr.shape[0])])
    homogeneous = np.array([log_sd.mean()])
    if name == "sp_exp":  # the range from the correlation at one time unit, whatever the unit (days, seconds)
        rho = float(np.clip(lag[0], 1e-8, 1.0 - 1e-15))
        return np.array([log_sd.mean(), np.log(-1.0 / np.log(rho))])
    if name == "us":
        eigenvalues, vectors = np.linalg.eigh(empirical)
        floor = 1e-3 * max(float(eigenvalues.max()), 1e-300)
        lower = np.linalg.cholesky((vectors * np.maximum(eigenvalues, floor)) @ vectors.T)
        d = np.diag(lower)
        return np.concatenate([np.log(d), [lower[i, j] / d[i] for i in range(m) for j in range(i)]])
    if name in ("cs", "csh"):
        a = 1.0 / (m - 1)
        offdiag = corr[np.tril_indices(m, -1)].mean()
        p = np.clip((offdiag + a) / (1.0 + a), 0.02, 0.98)
        correlation = np.array([np.log(p / (1.0 - p))])
    elif name in ("ar1", "ar1h"):
        correlation = unbounded_from(np.clip(lag[:1], -0.95, 0.95))
    elif name in ("toep", "toeph"):
        correlation = unbounded_from(partial_autocorrelations(lag))
    else:  # ad, adh: the correlations of adjacent visits
        correlation = unbounded_from(np.clip(np.diag(corr, -1), -0.95, 0.95))
    scale = homogeneous if name in HOMOGENEOUS else log_sd
    return np.concatenate([scale, correlation])
