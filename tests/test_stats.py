"""Paired method comparison: hand-checked Wilcoxon p-values, bootstrap CIs and verdicts."""

from __future__ import annotations

import warnings

import pytest

from simulations.stats import PairedComparison, holm_adjusted, holm_family, paired_comparison

ONE_TO_SIX = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_all_positive_differences_exact_p_and_mean() -> None:
    # All 6 differences positive: W+ = 21 is the largest of 2**6 equally likely sign patterns
    # under H0, so the one-sided p is 1/64 and the two-sided p 2/64 = 0.03125.
    result = paired_comparison(ONE_TO_SIX, [0.0] * 6)
    assert result.p_value == pytest.approx(2 / 2**6, abs=1e-12)
    assert result.mean_difference == 3.5
    assert result.differences == tuple(ONE_TO_SIX) and result.n == 6 and result.wins == 6
    assert 1.0 <= result.ci_low < 3.5 < result.ci_high <= 6.0
    assert result.verdict == "A better"
    flipped = paired_comparison([0.0] * 6, ONE_TO_SIX)
    assert flipped.mean_difference == -3.5 and flipped.wins == 0
    assert flipped.p_value == pytest.approx(0.03125) and flipped.verdict == "B better"


def test_constant_difference_has_a_point_ci_but_too_few_seeds() -> None:
    result = paired_comparison([0.1] * 5, [0.0] * 5)
    assert (result.ci_low, result.ci_high) == (0.1, 0.1) and result.ci == (0.1, 0.1)
    # 5 seeds: the smallest two-sided p is 2/2**5 = 0.0625, so never significant
    assert result.p_value == pytest.approx(0.0625)
    assert result.verdict == "within noise"


def test_two_point_bootstrap_ci_by_hand() -> None:
    # d = [0, 1]: resampled means are 0, 0.5, 1 with probability 1/4, 1/2, 1/4, so the 2.5th and
    # 97.5th percentiles are 0 and 1.
    result = paired_comparison([0.0, 1.0], [0.0, 0.0], n_boot=4000, seed=3)
    assert result.ci == (0.0, 1.0) and result.mean_difference == 0.5


def test_format_lists_the_differences_below_five_seeds() -> None:
    two = paired_comparison([0.84, 0.83], [0.83, 0.82])
    assert two.format() == (
        "+0.010 (per seed +0.010, +0.010), 2/2 seeds higher: "
        "too few seeds for an interval or a test"
    )
    assert (two.interval_text(), two.p_text()) == ("n/a (2 seeds)", "n/a")
    five = paired_comparison([0.1] * 5, [0.0] * 5)
    assert five.format().startswith(
        "+0.100 [95% CI +0.100, +0.100], Wilcoxon p=0.062, 5/5 seeds higher"
    )
    assert (five.interval_text(), five.p_text()) == ("[+0.100, +0.100]", "0.062")


def test_ci_straddling_zero_is_within_noise() -> None:
    a = [0.80, 0.70, 0.82, 0.69, 0.75, 0.74]
    b = [0.70, 0.80, 0.72, 0.79, 0.75, 0.76]  # d = +.1, -.1, +.1, -.1, 0, -.02
    result = paired_comparison(a, b)
    assert result.ci_low < 0 < result.ci_high
    assert result.verdict == "within noise" and result.wins == 2
    assert result.p_value > 0.05


def test_zero_differences_dropped_and_all_zero_gives_p_one() -> None:
    with_zero = paired_comparison([0.0, *ONE_TO_SIX], [0.0] * 7)
    assert with_zero.p_value == pytest.approx(0.03125)  # the zero is dropped before ranking
    assert with_zero.wins == 6 and with_zero.n == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = paired_comparison([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert same.p_value == 1.0 and same.ci == (0.0, 0.0) and same.verdict == "within noise"


def test_deterministic_for_a_seed() -> None:
    a = [0.71, 0.74, 0.69, 0.77, 0.73, 0.70, 0.75, 0.72]
    b = [0.70, 0.71, 0.70, 0.72, 0.71, 0.69, 0.71, 0.73]
    first = paired_comparison(a, b, n_boot=2000, seed=7)
    assert first == paired_comparison(a, b, n_boot=2000, seed=7)
    assert first.ci != paired_comparison(a, b, n_boot=2000, seed=8).ci
    assert first.p_value == paired_comparison(a, b, n_boot=2000, seed=8).p_value


def test_format() -> None:
    result = PairedComparison(10, (0.0,) * 10, 0.021, 0.004, 0.037, 0.027, 8, "A better")
    expected = "+0.021 [95% CI +0.004, +0.037], Wilcoxon p=0.027, 8/10 seeds higher: A better"
    assert result.format() == expected
    text = paired_comparison([0.0] * 6, ONE_TO_SIX).format(digits=1)
    assert text.startswith("-3.5 [95% CI -")
    assert text.endswith("Wilcoxon p=0.031, 0/6 seeds higher: B better")


def test_holm_adjusted_by_hand() -> None:
    # Sorted p: 0.01, 0.02, 0.04, 0.30 -> x4, x3, x2, x1 = 0.04, 0.06, 0.08, 0.30; each at least
    # the one before (step-down), then back in the input order.
    assert holm_adjusted([0.04, 0.30, 0.01, 0.02]) == pytest.approx([0.08, 0.30, 0.04, 0.06])
    assert holm_adjusted([0.5, 0.4]) == pytest.approx([0.8, 0.8])  # monotone, capped at 1
    assert holm_adjusted([0.9, 0.8]) == [1.0, 1.0]


def test_holm_family_can_undo_a_verdict_and_names_the_winner() -> None:
    better = PairedComparison(10, (0.0,) * 10, 0.039, 0.010, 0.069, 0.049, 8, "A better")
    noise = PairedComparison(10, (0.0,) * 10, 0.02, -0.01, 0.05, 0.16, 8, "within noise")
    adjusted = holm_family([better, noise])
    assert [r.holm_p for r in adjusted] == pytest.approx([0.098, 0.16])
    assert [r.verdict for r in adjusted] == ["within noise", "within noise"]
    assert adjusted[0].p_value == 0.049 and adjusted[0].family == 2
    assert (
        adjusted[0]
        .format()
        .endswith("Wilcoxon p=0.049 (Holm over 2: 0.098), 8/10 seeds higher: within noise")
    )
    assert holm_family([better]) == [better]  # a family of one changes nothing
    assert better.format(names=("MedMerge", "FT A")).endswith(": MedMerge better")
    assert paired_comparison([0.0] * 6, ONE_TO_SIX).verdict_text(("x", "y")) == "y better"


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        ([0.1, 0.2, 0.3], [0.1, 0.2], "3 != 2"),
        ([0.1], [0.2], "at least 2"),
        ([], [], "at least 2"),
        ([0.1, float("nan")], [0.1, 0.2], "finite"),
    ],
)
def test_bad_input_raises(a: list[float], b: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        paired_comparison(a, b)
