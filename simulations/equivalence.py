"""Equivalence as well as difference: a hierarchical paired bootstrap of macro-F1 and a verdict.

`simulations.stats.paired_comparison` sees one macro-F1 per seed, so it counts training noise
(seeds) but not test-set sampling (which images happened to be in the test set). With few test
images the per-seed values are themselves noisy, and "within noise" cannot tell "the same" from
"too little data to say". `hierarchical_paired_bootstrap` counts both: each replicate resamples
the seeds with replacement and, inside each drawn seed, that seed's test images with
replacement, using the same image indices for A and B (paired), then averages the per-seed
differences macro-F1(A) - macro-F1(B).

Macro-F1 follows sklearn's `f1_score(average="macro")` with labels=None: the mean of the
per-class F1 = 2 TP / (support + predicted) over the classes present in the (resampled) labels
or predictions; a class with neither true nor predicted images is left out of the mean, not
counted as 0 or 1.

Verdicts (`equivalence_verdict`), the difference being A - B and m the margin
(`EQUIVALENCE_MARGIN` = 0.02 macro-F1 by default), p the (possibly Holm-adjusted) Wilcoxon
p-value of `paired_comparison` on the per-seed macro-F1 values:

    "better"        the 95% bootstrap interval excludes 0 on the positive side AND p < ALPHA
    "worse"         the 95% bootstrap interval excludes 0 on the negative side AND p < ALPHA
    "equivalent"    otherwise, when the 90% bootstrap interval lies entirely inside (-m, +m):
                    two one-sided tests (TOST) at alpha 0.05 each, i.e. the difference is
                    shown to be above -m and below +m; this also needs at least
                    MIN_SEEDS_FOR_INTERVAL seeds, since below that the seed resampling
                    cannot see training noise and the interval is too narrow to trust
    "inconclusive"  otherwise: neither a difference nor an equivalence is shown

`within_margin` is True when the verdict is "better" or "worse" and the 90% interval also lies
inside (-m, +m): the difference is real but smaller than the margin, and reads "better, but by
less than the margin". (For "equivalent" it is False: lying within the margin is the verdict.)

`minimum_detectable_effect` is the true difference this design would detect with 80% power
(normal approximation, bootstrap SE): an "inconclusive" says the design could not resolve
differences much below it, not that there is none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
from scipy.stats import norm

from simulations.stats import (
    ALPHA,
    MIN_SEEDS_FOR_INTERVAL,
    PairedComparison,
    holm_family,
    paired_comparison,
)

EQUIVALENCE_MARGIN = 0.02
EQUIVALENCE_VERDICTS = ("better", "worse", "equivalent", "inconclusive")
_CHUNK = 4_000_000  # resampled image indices held at once (bounds the memory of one seed)


@dataclass(frozen=True)
class BootstrapDifference:
    """Macro-F1(A) - macro-F1(B) with seed and image noise counted together."""

    point: float  # mean over seeds of the observed differences on the full test sets
    standard_error: float  # standard deviation of the bootstrap replicates
    ci_low: float  # two-sided `level` percentile interval
    ci_high: float
    ci90_low: float  # two-sided 90% percentile interval, for TOST at alpha 0.05
    ci90_high: float
    n_seeds: int
    n_boot: int
    level: float = 0.95
    per_seed: tuple[float, ...] = ()  # the observed per-seed differences

    @property
    def ci(self) -> tuple[float, float]:
        return self.ci_low, self.ci_high

    @property
    def ci90(self) -> tuple[float, float]:
        return self.ci90_low, self.ci90_high


Bootstrap = BootstrapDifference  # the shorter name tests/test_equivalence.py uses


class EquivalenceVerdict(NamedTuple):
    """One of EQUIVALENCE_VERDICTS and whether a significant difference is below the margin.

    A (frozen) named tuple, so it also compares equal to ("better", True)."""

    verdict: str
    within_margin: bool  # "better"/"worse" with the 90% interval inside (-margin, +margin)

    def text(self) -> str:
        if self.within_margin:
            return f"{self.verdict}, but by less than the margin"
        return self.verdict


@dataclass(frozen=True)
class MethodComparison:
    """Everything `compare_methods` knows about A against B."""

    wilcoxon: PairedComparison  # Wilcoxon and seed bootstrap on per-seed macro-F1
    bootstrap: BootstrapDifference
    equivalence: EquivalenceVerdict
    mde: float  # minimum detectable effect (alpha 0.05, power 0.8) from the bootstrap SE
    margin: float = EQUIVALENCE_MARGIN

    @property
    def verdict(self) -> str:
        return self.equivalence.verdict

    @property
    def p_value(self) -> float:
        """The p the verdict used: Holm-adjusted once `holm_verdicts` has run, else raw."""
        w = self.wilcoxon
        return w.p_value if w.holm_p is None else w.holm_p

    def text(self, digits: int = 3) -> str:
        """One markdown table cell: '+0.012 [-0.004, +0.029], p_holm 0.21, equivalent (MDE
        0.018)' (the interval is the bootstrap's `level` interval; 'p' when not adjusted)."""
        b = self.bootstrap
        name = "p" if self.wilcoxon.holm_p is None else "p_holm"
        return (
            f"{b.point:+.{digits}f} [{b.ci_low:+.{digits}f}, {b.ci_high:+.{digits}f}], "
            f"{name} {_p_text(self.p_value)}, {self.equivalence.text()} "
            f"(MDE {self.mde:.{digits}f})"
        )


def _p_text(p: float) -> str:
    if p >= 0.1:
        return f"{p:.2f}"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _as_seeds(name: str, arrays: Sequence[np.ndarray], num_classes: int) -> list[np.ndarray]:
    out = []
    for s, values in enumerate(arrays):
        a = np.asarray(values)
        if a.ndim != 1 or len(a) == 0:
            raise ValueError(f"{name}[{s}] must be a non-empty 1-D array, got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name}[{s}] must hold integer class indices, got {a.dtype}")
        if a.min() < 0 or a.max() >= num_classes:
            raise ValueError(f"{name}[{s}] has a class outside [0, {num_classes})")
        out.append(a.astype(np.int64))
    return out


def _macro_f1_batch(conf: np.ndarray) -> np.ndarray:
    """Macro-F1 of each (..., K, K) confusion matrix (rows true, columns predicted)."""
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    denom = conf.sum(axis=-1) + conf.sum(axis=-2)  # support + predicted, per class
    present = denom > 0  # sklearn's labels=None: classes in the labels or the predictions
    f1 = np.divide(2.0 * tp, denom, out=np.zeros(tp.shape), where=present)
    return f1.sum(axis=-1) / np.maximum(present.sum(axis=-1), 1)


def macro_f1_counts(confusion: np.ndarray) -> float:
    """Macro-F1 of one K x K confusion matrix (rows true, columns predicted), as sklearn's."""
    conf = np.asarray(confusion)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1] or conf.min() < 0:
        raise ValueError(f"need a square non-negative confusion matrix, got shape {conf.shape}")
    return float(_macro_f1_batch(conf))


def _macro_f1_from_codes(codes: np.ndarray, num_classes: int) -> np.ndarray:
    """Macro-F1 of each row of codes = label * num_classes + pred, by one bincount."""
    rows, _ = codes.shape
    k2 = num_classes * num_classes
    flat = codes + (np.arange(rows, dtype=np.int64) * k2)[:, None]
    conf = np.bincount(flat.ravel(), minlength=rows * k2)
    return _macro_f1_batch(conf.reshape(rows, num_classes, num_classes))


def macro_f1(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Macro-F1 of one prediction vector, by the same path the bootstrap uses."""
    (p,), (y,) = _as_seeds("pred", [pred], num_classes), _as_seeds("labels", [labels], num_classes)
    if len(p) != len(y):
        raise ValueError(f"pred and labels differ in length: {len(p)} != {len(y)}")
    return float(_macro_f1_from_codes((y * num_classes + p)[None, :], num_classes)[0])


def hierarchical_paired_bootstrap(
    pred_a: Sequence[np.ndarray],
    pred_b: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    num_classes: int,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    copies: int = 1,
) -> BootstrapDifference:
    """Bootstrap macro-F1(A) - macro-F1(B) over seeds and, within each seed, test images.

    One 1-D int array per seed in each argument (a seed's three arrays share a length; seeds
    may differ). With `copies` > 1 each array is that many equal-length blocks of the same
    images (corrupted copies of one test set): an image is resampled with all its copies, so
    the copies are not counted as independent images. Deterministic for a given seed.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies must be a positive integer, got {copies!r}")
    a = _as_seeds("pred_a", pred_a, num_classes)
    b = _as_seeds("pred_b", pred_b, num_classes)
    y = _as_seeds("labels", labels, num_classes)
    n_seeds = len(y)
    if n_seeds == 0 or len(a) != n_seeds or len(b) != n_seeds:
        raise ValueError(f"need one array per seed each: {len(a)}, {len(b)}, {n_seeds}")
    for s in range(n_seeds):
        if not len(a[s]) == len(b[s]) == len(y[s]):
            raise ValueError(f"seed {s}: pred_a, pred_b and labels differ in length")
        if len(y[s]) % copies:
            raise ValueError(f"seed {s}: {len(y[s])} predictions are not {copies} equal copies")
    # Codes label * K + pred turn a confusion matrix into one bincount per resample.
    codes_a = [ys * num_classes + ps for ys, ps in zip(y, a, strict=True)]
    codes_b = [ys * num_classes + ps for ys, ps in zip(y, b, strict=True)]
    per_seed = np.array(
        [
            _macro_f1_from_codes(ca[None, :], num_classes)[0]
            - _macro_f1_from_codes(cb[None, :], num_classes)[0]
            for ca, cb in zip(codes_a, codes_b, strict=True)
        ]
    )
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, n_seeds, size=n_boot * n_seeds)  # the seeds of every replicate
    diffs = np.empty(n_boot * n_seeds)
    for s in range(n_seeds):
        slots = np.flatnonzero(drawn == s)
        n_img = len(y[s]) // copies
        step = max(1, _CHUNK // len(y[s]))
        blocks = (np.arange(copies) * n_img)[None, :, None]
        for start in range(0, len(slots), step):
            part = slots[start : start + step]
            idx = rng.integers(0, n_img, size=(len(part), n_img))  # same images for A and B
            idx = (idx[:, None, :] + blocks).reshape(len(part), -1)  # with all their copies
            f1_a = _macro_f1_from_codes(codes_a[s][idx], num_classes)
            diffs[part] = f1_a - _macro_f1_from_codes(codes_b[s][idx], num_classes)
    replicates = diffs.reshape(n_boot, n_seeds).mean(axis=1)
    tail = (1.0 - level) / 2.0
    cuts = [100 * tail, 100 * (1 - tail), 5.0, 95.0]
    low, high, low90, high90 = np.percentile(replicates, cuts)
    return BootstrapDifference(
        point=float(per_seed.mean()),
        standard_error=float(replicates.std(ddof=1)) if n_boot > 1 else 0.0,
        ci_low=float(low),
        ci_high=float(high),
        ci90_low=float(low90),
        ci90_high=float(high90),
        n_seeds=n_seeds,
        n_boot=n_boot,
        level=level,
        per_seed=tuple(float(v) for v in per_seed),
    )


def equivalence_verdict(
    bootstrap: BootstrapDifference, p_value: float, margin: float = EQUIVALENCE_MARGIN
) -> EquivalenceVerdict:
    """Better / worse / equivalent / inconclusive by the rules in the module docstring."""
    if not margin > 0:
        raise ValueError(f"margin must be positive, got {margin!r}")
    inside = bool(-margin < bootstrap.ci90_low and bootstrap.ci90_high < margin)
    if bootstrap.ci_low > 0 and p_value < ALPHA:
        return EquivalenceVerdict(EQUIVALENCE_VERDICTS[0], inside)
    if bootstrap.ci_high < 0 and p_value < ALPHA:
        return EquivalenceVerdict(EQUIVALENCE_VERDICTS[1], inside)
    if inside and bootstrap.n_seeds >= MIN_SEEDS_FOR_INTERVAL:
        return EquivalenceVerdict(EQUIVALENCE_VERDICTS[2], False)
    return EquivalenceVerdict(EQUIVALENCE_VERDICTS[3], False)


def minimum_detectable_effect(
    standard_error: float, *, alpha: float = 0.05, power: float = 0.8
) -> float:
    """(z_{1-alpha/2} + z_power) * SE, about 2.80 SE: the smallest true difference a two-sided
    test at alpha detects with that power. A normal approximation using the bootstrap SE."""
    if not (0 < alpha < 1 and 0 < power < 1) or standard_error < 0:
        raise ValueError("need 0 < alpha < 1, 0 < power < 1 and standard_error >= 0")
    return float((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * standard_error)


def compare_methods(
    pred_a: Sequence[np.ndarray],
    pred_b: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    num_classes: int,
    per_seed_a: Sequence[float] | None = None,
    per_seed_b: Sequence[float] | None = None,
    *,
    margin: float = EQUIVALENCE_MARGIN,
    n_boot: int = 2000,
    seed: int = 0,
    copies: int = 1,
) -> MethodComparison:
    """Wilcoxon on per-seed macro-F1, the hierarchical bootstrap, the verdict and the MDE.

    per_seed_a / per_seed_b default to each seed's macro-F1 on its full test set (all copies).
    """
    boot = hierarchical_paired_bootstrap(
        pred_a, pred_b, labels, num_classes, n_boot=n_boot, seed=seed, copies=copies
    )
    if per_seed_a is None:
        per_seed_a = [macro_f1(p, y, num_classes) for p, y in zip(pred_a, labels, strict=True)]
    if per_seed_b is None:
        per_seed_b = [macro_f1(p, y, num_classes) for p, y in zip(pred_b, labels, strict=True)]
    if not len(per_seed_a) == len(per_seed_b) == boot.n_seeds:
        raise ValueError(
            f"need one per-seed value per seed: {len(per_seed_a)}, {len(per_seed_b)}, "
            f"{boot.n_seeds}"
        )
    paired = paired_comparison(per_seed_a, per_seed_b, seed=seed)
    return MethodComparison(
        wilcoxon=paired,
        bootstrap=boot,
        equivalence=equivalence_verdict(boot, paired.p_value, margin),
        mde=minimum_detectable_effect(boot.standard_error),
        margin=margin,
    )


def holm_verdicts(comparisons: Sequence[MethodComparison]) -> list[MethodComparison]:
    """The family's comparisons with Holm-adjusted Wilcoxon p and verdicts that use it."""
    adjusted = holm_family([c.wilcoxon for c in comparisons])
    out = []
    for c, paired in zip(comparisons, adjusted, strict=True):
        p = paired.p_value if paired.holm_p is None else paired.holm_p
        eq = equivalence_verdict(c.bootstrap, p, c.margin)
        out.append(replace(c, wilcoxon=paired, equivalence=eq))
    return out
