"""The statistics behind eval.py and the report: intervals that stay in their range, tests, the
length regression.

- `t_ci`: mean +- t_(n-1) sd / sqrt(n), the CI of a mean over a few seeds, clipped to the range the
  quantity can take (a skip% lies in [0, 100], a differential in [-100, 100]) with `clipped` saying
  so; `log_t_ci` for positive ratios (PPL): the interval on log scale, mapped back, so it cannot go
  negative.
- `bootstrap_ci`: percentile bootstrap of a mean (too narrow for a handful of seeds; reported beside
  t).
- `fisher_z_ci`: a correlation's CI through atanh, so it stays inside (-1, 1); `wilson_ci` for a
  proportion.
- `differential_stats`: one run's tool-minus-planning skip differential with a stratified bootstrap
  CI over eval rows and a two-sided permutation p-value.
- `length_regression`: OLS of a per-row gate score on length (per 100 tokens) and step type, with
  the correlations and their Fisher-z intervals.
"""

from __future__ import annotations

import math

import numpy as np

BOUNDS = {
    "skip": (0.0, 100.0),
    "diff": (-100.0, 100.0),
}  # the ranges percentage quantities can take


def bootstrap_ci(
    values, n: int = 10_000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean."""
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return float("nan"), float("nan")
    means = np.random.default_rng(seed).choice(v, size=(n, v.size), replace=True).mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def t_quantile(q: float, df: int) -> float:
    """Quantile of Student's t with df degrees of freedom (0.5 < q < 1): the CDF integrated from the
    density with Simpson's rule, inverted by bisection (no scipy). Matches tables to 1e-6 for df >=
    1."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf_above_half(x: float) -> float:  # P(0 < T < x)
        n = 2000
        t = np.linspace(0.0, x, n + 1)
        f = np.exp(log_c - (df + 1) / 2 * np.log1p(t * t / df))
        return float((x / n / 3) * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))

    lo, hi = 0.0, 1.0
    while cdf_above_half(hi) < q - 0.5:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf_above_half(mid) < q - 0.5 else (lo, mid)
    return (lo + hi) / 2


def t_ci(
    values, level: float = 0.95, bounds: tuple[float, float] | None = None
) -> tuple[float, float]:
    """mean +- t_(n-1) sd / sqrt(n), clipped to `bounds` when given (t_ci_clipped: the flag)."""
    return t_ci_clipped(values, level, bounds)[:2]


def t_ci_clipped(
    values, level: float = 0.95, bounds: tuple[float, float] | None = None
) -> tuple[float, float, bool]:
    """(low, high, clipped): the Student-t interval of the mean, cut to the quantity's possible
    range."""
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return float("nan"), float("nan"), False
    half = t_quantile(1 - (1 - level) / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    lo, hi = float(v.mean() - half), float(v.mean() + half)
    if bounds is None:
        return lo, hi, False
    clo, chi = max(lo, bounds[0]), min(hi, bounds[1])
    return clo, chi, (clo, chi) != (lo, hi)


def log_t_ci(values, level: float = 0.95) -> tuple[float, float]:
    """The t interval of the mean of log(values), mapped back with exp: for PPL, whose interval
    cannot be < 0."""
    v = np.asarray(values, dtype=float)
    if v.size < 2 or (v <= 0).any():
        return float("nan"), float("nan")
    lo, hi = t_ci(np.log(v), level)
    return math.exp(lo), math.exp(hi)


def wilson_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n: inside [0, 1] and sensible at 0 and n (no n = 0:
    NaN)."""
    if n == 0:
        return float("nan"), float("nan")
    z = _normal_quantile(1 - (1 - level) / 2)
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    d = 1 + z * z / n
    return max(0.0, (centre - half) / d), min(1.0, (centre + half) / d)


def fisher_z_ci(r: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """CI of a Pearson correlation from n pairs: tanh(atanh(r) -+ z / sqrt(n - 3)), always inside
    (-1, 1)."""
    if not math.isfinite(r) or n < 4:
        return float("nan"), float("nan")
    r = min(max(r, -0.999999), 0.999999)
    z = _normal_quantile(1 - (1 - level) / 2)
    h = z / math.sqrt(n - 3)
    return math.tanh(math.atanh(r) - h), math.tanh(math.atanh(r) + h)


def _normal_quantile(q: float) -> float:
    """Standard normal quantile by bisection on erf (no scipy)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < q else (lo, mid)
    return (lo + hi) / 2


def differential_stats(skip, is_tool, n: int = 10_000, seed: int = 0, level: float = 0.95) -> dict:
    """Tool-minus-planning mean of per-row skip% `skip`: a stratified percentile-bootstrap CI (tool
    and planning rows resampled separately) and a two-sided permutation test of 'step type does not
    matter'."""
    skip, tool = np.asarray(skip, float), np.asarray(is_tool, bool)
    a, b = skip[tool], skip[~tool]
    if a.size < 2 or b.size < 2:
        return {
            "diff": float("nan"),
            "ci95": [float("nan"), float("nan")],
            "p_permutation": float("nan"),
            "n": n,
            "n_tool": int(a.size),
            "n_planning": int(b.size),
        }
    diff = float(a.mean() - b.mean())
    rng = np.random.default_rng(seed)
    boot = rng.choice(a, (n, a.size)).mean(1) - rng.choice(b, (n, b.size)).mean(1)
    q = (1 - level) / 2
    perm = np.argsort(rng.random((n, skip.size)), axis=1)  # n label shuffles
    shuffled = skip[perm]
    perm_diff = shuffled[:, : a.size].mean(1) - shuffled[:, a.size :].mean(1)
    p = (1 + int((np.abs(perm_diff) >= abs(diff) - 1e-12).sum())) / (n + 1)
    return {
        "diff": diff,
        "ci95": [float(np.quantile(boot, q)), float(np.quantile(boot, 1 - q))],
        "p_permutation": p,
        "n_tool": int(a.size),
        "n_planning": int(b.size),
        "n": n,
    }


def length_regression(n_tokens, is_tool, score) -> dict:
    """OLS of a per-sample gate score on length (per 100 tokens) and step type, with the
    correlations (and their Fisher-z 95% intervals)."""
    x_len = np.asarray(n_tokens, float) / 100.0
    x_tool = np.asarray(is_tool, float)
    y = np.asarray(score, float)
    nan = float("nan")
    if y.size < 3:
        return {
            "intercept": nan,
            "per_100_tokens": nan,
            "tool": nan,
            "r2": nan,
            "r_length_score": nan,
            "r_tool_score": nan,
            "r_length_tool": nan,
            "n": int(y.size),
        }
    X = np.column_stack([np.ones_like(x_len), x_len, x_tool])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else nan

    def corr(a, b):
        return float(np.corrcoef(a, b)[0, 1]) if np.std(a) > 0 and np.std(b) > 0 else nan

    out = {
        "intercept": float(coef[0]),
        "per_100_tokens": float(coef[1]),
        "tool": float(coef[2]),
        "r2": r2,
        "r_length_score": corr(x_len, y),
        "r_tool_score": corr(x_tool, y),
        "r_length_tool": corr(x_len, x_tool),
        "n": int(y.size),
    }
    for k in ("r_length_score", "r_tool_score", "r_length_tool"):
        out[f"{k}_ci95"] = list(fisher_z_ci(out[k], y.size))
    return out
