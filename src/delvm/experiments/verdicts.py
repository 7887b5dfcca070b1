"""Intervals over seeds and the verdict on a claim.

Every claim is phrased as a number per seed that is positive when the claim holds: for "A has a
lower loss than B" it is loss(B) - loss(A); for "A is not worse than B by more than a margin m" it
is m - (loss(A) - loss(B)). The seeds pair the arms (same seed: same data order and initial
weights where the arms' shapes allow), so the interval is over the paired differences.

The rule: a two-sided 95 % Student-t interval of the mean difference over seeds;
    reproduced     the interval lies above 0 (the claimed direction);
    contradicted   the interval lies below 0;
    inconclusive   the interval contains 0 (or there is a single seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RULE = (
    "Each claim is a per-seed difference that is positive when the claim holds; its 95 % "
    "Student-t interval over seeds (mean ± t(0.975, n-1) · sd / √n) decides: entirely above 0 "
    "→ **reproduced**, entirely below 0 → **contradicted**, containing 0 → **inconclusive**."
)

# t(0.975, df) for df = 1..30 (standard tables); larger df use the Cornish-Fisher expansion.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)  # fmt: skip
_Z975 = 1.959964


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom {df}: need at least 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float  # the 95 % interval; equal to the mean for a single value
    high: float
    n: int

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:.4f}"
        return f"{self.mean:.4f} [{self.low:.4f}, {self.high:.4f}]"


def interval(values: list[float]) -> Interval:
    """Mean and two-sided 95 % t-interval of `values` (independent seeds)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, mean, mean, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def verdict(differences: list[float]) -> tuple[Interval, str]:
    """The interval of per-seed differences (positive = the claim holds) and the rule's verdict."""
    ci = interval(differences)
    if ci.n >= 2 and ci.low > 0:
        return ci, "reproduced"
    if ci.n >= 2 and ci.high < 0:
        return ci, "contradicted"
    return ci, "inconclusive"
