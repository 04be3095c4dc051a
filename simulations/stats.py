"""Paired statistics for comparing two methods run on the same seeds.

`paired_comparison(a, b)` takes one metric value per seed for method A and method B (same seeds,
same order) and reports the per-seed differences a - b, their mean, a 95% percentile bootstrap
confidence interval of that mean (seeds resampled with replacement), the two-sided Wilcoxon
signed-rank p-value, the number of seeds where A is higher, and a verdict:

    "A better" / "B better"  the CI excludes 0 on that side AND Wilcoxon p < 0.05
    "within noise"           otherwise

`holm_family` adjusts the p-values of a family of comparisons (one method against each
baseline) by Holm's step-down method, and its verdicts use the adjusted p.

Zero differences (seeds where a == b): scipy's default zero_method="wilcox" drops them before
ranking, so the test runs on the non-zero differences only; scipy's method="auto" then gives the
exact null distribution for <= 50 differences without ties, an exhaustive permutation test for
<= 13 differences with ties, else the normal approximation. When every difference is 0 the test
is undefined (scipy returns NaN); p = 1.0 is reported instead. The bootstrap keeps the zeros.

With n seeds and no ties the smallest two-sided exact p is 2 / 2**n, so 5 seeds or fewer can
never reach p < 0.05: a study needs 6 seeds at the very least, and 10 or more to be useful.
Below `MIN_SEEDS_FOR_INTERVAL` seeds a percentile bootstrap only spans the few differences
there are, so the report texts (`format`, `interval_text`, `p_text`) give those differences
instead of an interval and a p-value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy.stats import wilcoxon

ALPHA = 0.05
MIN_SEEDS_FOR_INTERVAL = 5
VERDICTS = ("A better", "B better", "within noise")


@dataclass(frozen=True)
class PairedComparison:
    """The result of `paired_comparison` (differences are a - b, one per seed)."""

    n: int
    differences: tuple[float, ...]
    mean_difference: float
    ci_low: float
    ci_high: float
    p_value: float
    wins: int  # seeds with a > b
    verdict: str
    holm_p: float | None = None  # adjusted over a family of comparisons; the verdict uses it
    family: int = 1

    @property
    def ci(self) -> tuple[float, float]:
        return self.ci_low, self.ci_high

    @property
    def enough_seeds(self) -> bool:
        """Whether an interval and a p-value say more than the differences themselves."""
        return self.n >= MIN_SEEDS_FOR_INTERVAL

    def interval_text(self, digits: int = 3) -> str:
        if not self.enough_seeds:
            return f"n/a ({self.n} seeds)"
        return f"[{self.ci_low:+.{digits}f}, {self.ci_high:+.{digits}f}]"

    def p_text(self) -> str:
        if not self.enough_seeds:
            return "n/a"
        return f"{self.p_value:.3f}" if self.p_value >= 0.001 else f"{self.p_value:.1e}"

    def verdict_text(self, names: tuple[str, str] = ("A", "B")) -> str:
        return {VERDICTS[0]: f"{names[0]} better", VERDICTS[1]: f"{names[1]} better"}.get(
            self.verdict, self.verdict
        )

    def format(self, digits: int = 3, names: tuple[str, str] = ("A", "B")) -> str:
        """E.g. '+0.021 [95% CI +0.004, +0.037], Wilcoxon p=0.027, 8/10 seeds higher: A better'."""
        if not self.enough_seeds:
            per_seed = ", ".join(f"{v:+.{digits}f}" for v in self.differences)
            return (
                f"{self.mean_difference:+.{digits}f} (per seed {per_seed}), "
                f"{self.wins}/{self.n} seeds higher: too few seeds for an interval or a test"
            )
        return (
            f"{self.mean_difference:+.{digits}f} "
            f"[95% CI {self.ci_low:+.{digits}f}, {self.ci_high:+.{digits}f}], "
            f"Wilcoxon p={self.p_text()}"
            + ("" if self.holm_p is None else f" (Holm over {self.family}: {self.holm_p:.3f})")
            + f", {self.wins}/{self.n} seeds higher: {self.verdict_text(names)}"
        )


def paired_comparison(
    a: Sequence[float], b: Sequence[float], *, n_boot: int = 10000, seed: int = 0
) -> PairedComparison:
    """Compare per-seed metric values a (method A) and b (method B) on the same seeds.

    Raises ValueError unless len(a) == len(b) >= 2, the values are finite and n_boot >= 1.
    Deterministic for a given seed (the bootstrap's numpy Generator).
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1:
        raise ValueError(f"a and b must be 1-D sequences, got shapes {x.shape} and {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"a and b must have one value per seed each: {len(x)} != {len(y)}")
    if len(x) < 2:
        raise ValueError(f"need at least 2 paired values (seeds), got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("a and b must be finite (no NaN or inf)")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    d = x - y
    n = len(d)
    mean = float(d.mean())
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    # A mean of resampled values lies in [min d, max d]; clipping only removes rounding error,
    # so a constant difference gives exactly that constant as both ends.
    low, high = (float(np.clip(v, d.min(), d.max())) for v in (low, high))
    p = 1.0 if not d.any() else float(wilcoxon(d, alternative="two-sided").pvalue)
    return PairedComparison(
        n=n,
        differences=tuple(float(v) for v in d),
        mean_difference=mean,
        ci_low=low,
        ci_high=high,
        p_value=p,
        wins=int((d > 0).sum()),
        verdict=verdict(low, high, p),
    )


def verdict(ci_low: float, ci_high: float, p: float) -> str:
    if ci_low > 0 and p < ALPHA:
        return VERDICTS[0]
    if ci_high < 0 and p < ALPHA:
        return VERDICTS[1]
    return VERDICTS[2]


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni step-down p-values, in the input order: with one method compared against
    several baselines, some raw p < 0.05 is likely by chance alone."""
    m = len(p_values)
    adjusted = [1.0] * m
    running = 0.0
    for rank, index in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def holm_family(results: Sequence[PairedComparison]) -> list[PairedComparison]:
    """The comparisons of one family, each with its Holm p and a verdict that uses it."""
    if len(results) < 2:
        return list(results)
    adjusted = holm_adjusted([r.p_value for r in results])
    return [
        replace(r, holm_p=p, family=len(results), verdict=verdict(r.ci_low, r.ci_high, p))
        for r, p in zip(results, adjusted, strict=True)
    ]
