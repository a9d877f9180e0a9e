"""Paired statistics for `scripts/compare.py`: the difference of two arms paired by seed, its 95 % t-interval and
the paired t-test, and how a claim is worded from them.

scipy's Student t distribution is used when scipy is installed; otherwise the same numbers come from the
regularized incomplete beta function computed here (a continued fraction, as in Numerical Recipes §6.4).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

LEVEL = 0.95  # the confidence level of every interval
ALPHA = 0.05  # a difference is claimed only when the paired t-test's p is below this


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (Lentz's continued fraction)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast below this point: use the symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * result


def t_sf2(t: float, df: float) -> float:
    """Two-sided tail probability P(|T| ≥ |t|) of Student's t with `df` degrees of freedom."""
    try:
        from scipy import stats

        return float(2 * stats.t.sf(abs(t), df))
    except ImportError:
        return _betainc(df / 2, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """The `q` quantile (q > 0.5) of Student's t with `df` degrees of freedom."""
    try:
        from scipy import stats

        return float(stats.t.ppf(q, df))
    except ImportError:
        low, high = 0.0, 1e3
        for _ in range(200):  # bisection on the tail: P(|T| ≥ t) = 2(1 − q)
            mid = (low + high) / 2
            low, high = (mid, high) if _betainc(df / 2, 0.5, df / (df + mid * mid)) > 2 * (1 - q) else (low, mid)
        return (low + high) / 2


def paired(diffs: list[float]) -> dict[str, Any]:
    """Mean, standard deviation, standard error, 95 % t-interval and paired t-test p of per-seed differences.

    Args:
        diffs: one difference a − b per seed.

    Returns:
        {"n", "mean", "sd", "se", "low", "high", "p"}; with fewer than 2 values the spread, interval and p are NaN.
    """
    n = len(diffs)
    nan = math.nan
    if n == 0:
        return {"n": 0, "mean": nan, "sd": nan, "se": nan, "low": nan, "high": nan, "p": nan}
    mean = statistics.fmean(diffs)
    if n < 2:
        return {"n": 1, "mean": mean, "sd": nan, "se": nan, "low": nan, "high": nan, "p": nan}
    sd = statistics.stdev(diffs)
    se = sd / math.sqrt(n)
    half = t_quantile(1 - (1 - LEVEL) / 2, n - 1) * se
    if se > 0:
        p = t_sf2(mean / se, n - 1)
    else:
        p = 1.0 if mean == 0 else 0.0
    return {"n": n, "mean": mean, "sd": sd, "se": se, "low": mean - half, "high": mean + half, "p": p}


def fmt_p(p: float) -> str:
    """p to two significant digits ("p < 0.001" below that)."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def claim(stat: dict[str, Any], spec: str = ".2f") -> str:
    """How a paired difference a − b reads: "lower (p = …)" / "higher (p = …)" only when p < 0.05, otherwise
    "no evidence of a difference (95 % CI [low, high])"."""
    if stat["n"] < 2 or math.isnan(stat["p"]):
        return "not enough seeds (needs 2)"
    if stat["p"] < ALPHA:
        return f"{'lower' if stat['mean'] < 0 else 'higher'} ({fmt_p(stat['p'])})"
    return f"no evidence of a difference (95 % CI [{stat['low']:{spec}}, {stat['high']:{spec}}])"


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of `p_values` (family-wise error control), in their order: the k-th smallest
    of m is multiplied by m − k + 1, kept monotone, capped at 1."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [math.nan] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def sign_flip_p(diffs: list[float]) -> float:
    """The exact two-sided sign-flip (randomization) p of a paired mean difference: the share of the 2^n sign
    patterns whose |mean| reaches the observed one (the observed pattern included)."""
    n = len(diffs)
    if n == 0 or n > 24:
        raise ValueError(f"sign_flip_p enumerates 2^n patterns: needs 1 <= n <= 24 differences, got {n}.")
    observed = abs(sum(diffs)) * (1 - 1e-12)  # ties with the observed sum count, whatever the rounding
    hits = 0
    for pattern in range(1 << n):
        total = sum(-d if pattern >> i & 1 else d for i, d in enumerate(diffs))
        hits += abs(total) >= observed
    return hits / (1 << n)


def paired_t_power(n: int, effect: float, sd: float, alpha: float) -> float:
    """Power of a two-sided paired t-test at level `alpha` with n pairs, for a true mean difference `effect` and a
    paired standard deviation `sd` (the noncentral t distribution; needs scipy)."""
    from scipy import stats

    df = n - 1
    critical = stats.t.ppf(1 - alpha / 2, df)
    shift = effect / (sd / math.sqrt(n))
    return float(stats.nct.sf(critical, df, shift) + stats.nct.cdf(-critical, df, shift))


def seeds_for_power(effect: float, sd: float, alpha: float, power: float = 0.8) -> int:
    """The smallest n (≥ 2) at which the two-sided paired t-test at `alpha` reaches `power` (`paired_t_power`)."""
    n = 2
    while paired_t_power(n, effect, sd, alpha) < power:
        n += 1
        if n > 10_000:
            raise ValueError(f"no n up to 10,000 reaches power {power} for effect {effect} and sd {sd}.")
    return n
