"""The statistics of a cross-check: two samples of per-seed values, one per side.

Welch's t (its test and its confidence interval), the two one-sided tests of equivalence (TOST) and the
seeds a comparison would need all come from ``scipy.stats``; the Holm step-down correction, which
scipy does not provide, is the few lines below. Differences are always ours − reference.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import numpy as np
from scipy import stats

POWER = 0.8  # the power "seeds needed" and "detectable" are sized for


def _finite(x) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None


def describe(values: Sequence[float]) -> dict:
    """n, mean and sample standard deviation (ddof 1; None below 2 values)."""
    values = np.asarray(values, dtype=np.float64)
    n = int(values.size)
    return {"n": n, "mean": _finite(values.mean()) if n else None,
            "std": _finite(values.std(ddof=1)) if n > 1 else None}


def welch(ours: Sequence[float], ref: Sequence[float], confidence: float = 0.95) -> dict:
    """Welch's t test of mean(ours) − mean(ref) with its two-sided ``confidence`` interval.

    Below two values a side, or with no variance on either, there is no test: t, p and the interval
    are None (the difference of the means is still given).
    """
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    out = {"difference": _finite(a.mean() - b.mean()) if a.size and b.size else None,
           "t": None, "df": None, "p": None, "ci": None, "se": None}
    if a.size < 2 or b.size < 2 or (a.var() == 0 and b.var() == 0):
        return out
    with warnings.catch_warnings():  # near-identical samples: scipy's precision note, the numbers stand
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(a, b, equal_var=False)
    interval = result.confidence_interval(confidence_level=confidence)
    out.update(t=_finite(result.statistic), df=_finite(result.df), p=_finite(result.pvalue),
               ci=[_finite(interval.low), _finite(interval.high)],
               se=_finite(math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)))
    return out


def tost(ours: Sequence[float], ref: Sequence[float], margin: float, alpha: float = 0.05) -> dict:
    """Two one-sided Welch tests of |mean(ours) − mean(ref)| < margin.

    H0 of the lower test: difference ≤ −margin; of the upper: difference ≥ +margin. Equivalence at
    level alpha is both rejected, i.e. the 1 − 2·alpha interval lies inside ±margin; p is the larger
    of the two one-sided p values.
    """
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    out = {"margin": margin, "p": None, "ci": None}
    if a.size < 2 or b.size < 2 or (a.var() == 0 and b.var() == 0) or not margin > 0:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lower = stats.ttest_ind(a + margin, b, equal_var=False, alternative="greater")
        upper = stats.ttest_ind(a - margin, b, equal_var=False, alternative="less")
        interval = stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence_level=1 - 2 * alpha)
    out.update(p=_finite(max(lower.pvalue, upper.pvalue)), ci=[_finite(interval.low), _finite(interval.high)])
    return out


def holm(pvalues: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Holm's step-down adjusted p values (None stays None and is not counted in the family)."""
    present = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m, adjusted, running = len(present), [None] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def _pooled_sd(ours, ref) -> Optional[float]:
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        return None
    sd = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    return sd if sd > 0 else None


def seeds_for_equivalence(ours, ref, margin: float, alpha: float = 0.05, power: float = POWER,
                          limit: int = 100_000) -> Optional[int]:
    """Seeds per side with which TOST would likely (``power``) show equivalence within ±margin, if the
    true difference is the observed one and the spread the pooled observed one; None when it never
    would (the observed difference is not inside ±margin, or there is no spread to size it by)."""
    sd, diff = _pooled_sd(ours, ref), abs(float(np.mean(ours)) - float(np.mean(ref)))
    if sd is None or not margin > diff:
        return None
    gap = margin - diff
    for n in range(2, limit + 1):
        df = 2 * n - 2
        if stats.t.ppf(1 - alpha, df) + stats.t.ppf(power, df) <= gap / (sd * math.sqrt(2 / n)):
            return n
    return None


def detectable(se: Optional[float], df: Optional[float], alpha: float = 0.05, power: float = POWER) -> Optional[float]:
    """The smallest true |difference| a two-sided test at ``alpha`` would detect with ``power``, at the
    standard error and degrees of freedom of the samples in hand: what the comparison can still hide."""
    if se is None or df is None:
        return None
    return _finite((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * se)
