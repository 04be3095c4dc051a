"""The faithful study's statistics: a paired bootstrap over seeds and test images together, an
equivalence verdict (TOST), the minimum detectable effect, and Holm over a family."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from simulations.equivalence import (
    EQUIVALENCE_MARGIN,
    Bootstrap,
    EquivalenceVerdict,
    MethodComparison,
    compare_methods,
    equivalence_verdict,
    hierarchical_paired_bootstrap,
    holm_verdicts,
    macro_f1,
    macro_f1_counts,
    minimum_detectable_effect,
)
from simulations.stats import PairedComparison


def reference_macro_f1(labels, predicted) -> float:
    """sklearn's average='macro' with labels=None, written out with loops."""
    classes = sorted(set(labels) | set(predicted))
    scores = []
    for c in classes:
        tp = sum(1 for y, p in zip(labels, predicted, strict=True) if y == c and p == c)
        fp = sum(1 for y, p in zip(labels, predicted, strict=True) if y != c and p == c)
        fn = sum(1 for y, p in zip(labels, predicted, strict=True) if y == c and p != c)
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def confusion(labels, predicted, c):
    m = np.zeros((c, c), np.int64)
    np.add.at(m, (labels, predicted), 1)
    return m


def predictions(rng, labels, accuracy):
    """Each image right with probability `accuracy`, else the other class."""
    right = rng.random(len(labels)) < accuracy
    return np.where(right, labels, 1 - labels)


def test_the_vectorised_macro_f1_is_sklearns() -> None:
    rng = np.random.default_rng(0)
    for c in (2, 3, 5):
        for _ in range(20):
            y, p = rng.integers(0, c, 30), rng.integers(0, c - 1, 30)  # a class never predicted
            assert macro_f1_counts(confusion(y, p, c)) == pytest.approx(reference_macro_f1(y, p))


def test_identical_methods_are_equivalent_with_a_zero_interval() -> None:
    rng = np.random.default_rng(1)
    labels = [rng.integers(0, 2, 200) for _ in range(10)]
    same = [predictions(rng, y, 0.8) for y in labels]
    scores = [macro_f1_counts(confusion(y, p, 2)) for y, p in zip(labels, same, strict=True)]
    found = compare_methods(same, same, labels, 2, scores, scores)
    assert (found.bootstrap.ci_low, found.bootstrap.ci_high) == (0.0, 0.0)
    assert found.verdict == "equivalent" and found.mde == 0.0


def study(rng, acc_a, acc_b, images=300, seeds=10, spread=0.0):
    labels = [rng.integers(0, 2, images) for _ in range(seeds)]
    a = [predictions(rng, y, acc_a + spread * rng.standard_normal()) for y in labels]
    b = [predictions(rng, y, acc_b) for y in labels]
    sa = [macro_f1_counts(confusion(y, p, 2)) for y, p in zip(labels, a, strict=True)]
    sb = [macro_f1_counts(confusion(y, p, 2)) for y, p in zip(labels, b, strict=True)]
    return a, b, labels, sa, sb


def test_a_large_difference_is_better_and_its_mirror_worse() -> None:
    a, b, labels, sa, sb = study(np.random.default_rng(2), 0.9, 0.6)
    assert compare_methods(a, b, labels, 2, sa, sb).verdict == "better"
    assert compare_methods(b, a, labels, 2, sb, sa).verdict == "worse"


def test_a_small_noisy_difference_on_few_images_is_inconclusive() -> None:
    a, b, labels, sa, sb = study(np.random.default_rng(3), 0.72, 0.70, images=40, seeds=6)
    assert compare_methods(a, b, labels, 2, sa, sb).verdict == "inconclusive"


def test_the_bootstrap_is_deterministic_and_counts_both_sources_of_noise() -> None:
    a, b, labels, *_ = study(np.random.default_rng(4), 0.8, 0.78)
    first = hierarchical_paired_bootstrap(a, b, labels, 2, seed=7)
    assert first == hierarchical_paired_bootstrap(a, b, labels, 2, seed=7)
    few = hierarchical_paired_bootstrap([x[:60] for x in a], [x[:60] for x in b],
                                        [y[:60] for y in labels], 2, seed=7)  # fmt: skip
    assert few.standard_error > first.standard_error  # fewer test images: wider
    a2, b2, labels2, *_ = study(np.random.default_rng(4), 0.8, 0.78, spread=0.08)
    spread = hierarchical_paired_bootstrap(a2, b2, labels2, 2, seed=7)
    assert spread.standard_error > first.standard_error  # seeds that disagree: wider


def test_the_minimum_detectable_effect_is_2_8_standard_errors() -> None:
    assert minimum_detectable_effect(0.01) == pytest.approx(0.0280, abs=5e-4)


def test_a_significant_difference_inside_the_margin_says_so() -> None:
    boot = Bootstrap(0.01, 0.002, 0.006, 0.014, 0.007, 0.013, 10, 2000)
    assert equivalence_verdict(boot, 0.002, 0.02) == ("better", True)
    assert equivalence_verdict(boot, 0.2, 0.02) == ("equivalent", False)
    wide = Bootstrap(0.01, 0.02, -0.03, 0.05, -0.02, 0.04, 10, 2000)
    assert equivalence_verdict(wide, 0.2, 0.02) == ("inconclusive", False)


def test_holm_can_turn_a_difference_into_no_verdict() -> None:
    rng = np.random.default_rng(5)
    family = []
    for gap in (0.06, 0.0, 0.0, 0.0, 0.0):
        a, b, labels, sa, sb = study(rng, 0.75 + gap, 0.75, images=300, seeds=7)
        family.append(compare_methods(a, b, labels, 2, sa, sb))
    first = family[0]
    assert first.verdict == "better" and first.wilcoxon.p_value < 0.05
    adjusted = holm_verdicts(family)[0]
    assert adjusted.wilcoxon.holm_p >= 0.05 and adjusted.verdict != "better"
    assert "p_holm" in adjusted.text()


def test_the_bincount_path_is_sklearns_macro_f1() -> None:
    # num_classes above the classes present: absent classes are left out of the mean (sklearn,
    # labels=None), so 6 declared classes score exactly like the 3 that occur.
    rng = np.random.default_rng(10)
    for n in (1, 7, 50):
        y, p = rng.integers(0, 3, n), rng.integers(0, 3, n)
        expected = f1_score(y, p, average="macro")
        assert macro_f1(p, y, 6) == pytest.approx(expected, abs=1e-12)
        assert macro_f1(p, y, 6) == pytest.approx(reference_macro_f1(y.tolist(), p.tolist()))
    assert macro_f1(np.array([1, 1]), np.array([0, 0]), 4) == 0.0  # two classes, both F1 0


def test_seeds_may_have_different_test_sets() -> None:
    rng = np.random.default_rng(11)
    labels = [rng.integers(0, 3, n) for n in (40, 90, 200)]
    a = [np.where(rng.random(len(y)) < 0.8, y, (y + 1) % 3) for y in labels]
    b = [np.where(rng.random(len(y)) < 0.6, y, (y + 2) % 3) for y in labels]
    found = hierarchical_paired_bootstrap(a, b, labels, 3, n_boot=500)
    per_seed = [
        f1_score(y, pa, average="macro") - f1_score(y, pb, average="macro")
        for y, pa, pb in zip(labels, a, b, strict=True)
    ]
    assert found.per_seed == pytest.approx(per_seed, abs=1e-12)
    assert found.point == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert found.n_seeds == 3 and found.n_boot == 500
    assert found.ci_low < found.ci90_low < found.point < found.ci90_high < found.ci_high
    at_90 = hierarchical_paired_bootstrap(a, b, labels, 3, n_boot=500, level=0.9)
    assert at_90.ci == at_90.ci90 == found.ci90  # the 90% interval is the 5th-95th percentile


def test_intervals_widen_with_fewer_images_and_more_seed_spread() -> None:
    a, b, labels, *_ = study(np.random.default_rng(12), 0.8, 0.78, images=600)
    full = hierarchical_paired_bootstrap(a, b, labels, 2, seed=1)
    cut = [x[:100] for x in a], [x[:100] for x in b], [y[:100] for y in labels]
    few = hierarchical_paired_bootstrap(*cut, 2, seed=1)
    a2, b2, labels2, *_ = study(np.random.default_rng(12), 0.8, 0.78, images=600, spread=0.1)
    spread = hierarchical_paired_bootstrap(a2, b2, labels2, 2, seed=1)
    width = {k: v.ci_high - v.ci_low for k, v in {"full": full, "few": few, "sp": spread}.items()}
    assert width["few"] > 1.5 * width["full"]  # ~sqrt(6) in theory: image noise is counted
    assert width["sp"] > 1.5 * width["full"]  # seed noise is counted
    assert hierarchical_paired_bootstrap(a, b, labels, 2, seed=2).ci != full.ci


def test_image_noise_is_counted_when_every_seed_is_the_same() -> None:
    # Ten copies of one seed: resampling seeds alone would give a zero-width interval.
    a, b, labels, *_ = study(np.random.default_rng(15), 0.8, 0.75, images=400, seeds=1)
    many = hierarchical_paired_bootstrap(a * 10, b * 10, labels * 10, 2)
    cut = [a[0][:100]] * 10, [b[0][:100]] * 10, [labels[0][:100]] * 10
    few = hierarchical_paired_bootstrap(*cut, 2)
    assert 0.005 < many.standard_error < few.standard_error
    assert few.ci_high - few.ci_low > 1.5 * (many.ci_high - many.ci_low)


def test_the_mde_of_a_real_bootstrap_is_2_80_standard_errors() -> None:
    found = compare_methods(*study(np.random.default_rng(13), 0.8, 0.78)[:3], 2)
    se = found.bootstrap.standard_error
    assert se > 0 and round(found.mde / se, 2) == 2.80
    assert minimum_detectable_effect(se, power=0.5) == pytest.approx(1.959964 * se)


def test_within_margin_text_and_the_table_cell() -> None:
    small = Bootstrap(0.01, 0.002, 0.006, 0.014, 0.007, 0.013, 10, 2000)
    verdict = equivalence_verdict(small, 0.002)
    assert verdict == EquivalenceVerdict("better", True)
    assert verdict.text() == "better, but by less than the margin"
    mirror = Bootstrap(-0.01, 0.002, -0.014, -0.006, -0.013, -0.007, 10, 2000)
    assert equivalence_verdict(mirror, 0.002).text() == "worse, but by less than the margin"
    assert equivalence_verdict(small, 0.002, margin=0.01) == ("better", False)  # 0.013 > 0.01
    few_seeds = Bootstrap(0.0, 0.001, -0.002, 0.002, -0.001, 0.001, 3, 2000)
    assert equivalence_verdict(few_seeds, 1.0).verdict == "inconclusive"  # seed noise unseen
    paired = PairedComparison(10, (0.0,) * 10, 0.012, 0, 0, 0.07, 7, "within noise", 0.21, 8)
    boot = Bootstrap(0.012, 0.0064, -0.004, 0.029, -0.001, 0.019, 10, 2000)
    cell = MethodComparison(paired, boot, equivalence_verdict(boot, 0.21), 0.018)
    assert cell.text() == "+0.012 [-0.004, +0.029], p_holm 0.21, equivalent (MDE 0.018)"
    raw = MethodComparison(
        PairedComparison(10, (0.0,) * 10, 0.012, 0, 0, 0.0123, 9, "A better"),
        boot,
        EquivalenceVerdict("equivalent", False),
        0.018,
    )
    assert raw.text(digits=2) == "+0.01 [-0.00, +0.03], p 0.012, equivalent (MDE 0.02)"
    assert EQUIVALENCE_MARGIN == 0.02


def test_a_family_of_one_keeps_the_raw_p() -> None:
    a, b, labels, sa, sb = study(np.random.default_rng(14), 0.9, 0.6, seeds=6)
    found = compare_methods(a, b, labels, 2, sa, sb, n_boot=300)
    assert holm_verdicts([found]) == [found] and found.verdict == "better"
    assert found.p_value == pytest.approx(2 / 2**6) and "p 0.031," in found.text()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": [np.array([0, 1, 2])]}, "outside"),
        ({"pred_a": [np.array([0.0, 1.0])]}, "integer"),
        ({"pred_b": [np.array([0, 1, 1])]}, "differ in length"),
        ({"pred_a": []}, "one array per seed"),
        ({"n_boot": 0}, "n_boot"),
        ({"level": 1.0}, "level"),
    ],
)
def test_bad_input_raises(change: dict, message: str) -> None:
    args = {"pred_a": [np.array([0, 1])], "pred_b": [np.array([1, 1])]}
    args |= {"labels": [np.array([0, 1])], "num_classes": 2} | change
    with pytest.raises(ValueError, match=message):
        hierarchical_paired_bootstrap(**args)


def test_copies_of_one_test_set_are_resampled_together() -> None:
    # Twelve identical copies of each seed's test set hold no more information than one: with
    # copies=12 the interval is the single copy's; counted as independent images it shrinks.
    # (Ten copies of one seed, so that only image noise is left to count.)
    a, b, labels = (x * 10 for x in study(np.random.default_rng(16), 0.8, 0.74, seeds=1)[:3])
    one = hierarchical_paired_bootstrap(a, b, labels, 2, seed=3)
    tiled = tuple([np.tile(x, 12) for x in arrays] for arrays in (a, b, labels))
    together = hierarchical_paired_bootstrap(*tiled, 2, seed=3, copies=12)
    apart = hierarchical_paired_bootstrap(*tiled, 2, seed=3)
    assert together.point == pytest.approx(one.point)
    assert together.standard_error == pytest.approx(one.standard_error, rel=0.15)
    assert apart.standard_error < 0.5 * together.standard_error  # about 1/sqrt(12)
    with pytest.raises(ValueError, match="equal copies"):
        hierarchical_paired_bootstrap(a, b, labels, 2, copies=7)
