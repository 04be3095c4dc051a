"""The clinical report: confusion matrix, per-class rates and bootstrap intervals."""

from __future__ import annotations

import numpy as np

from medmerge_core.metrics import _resampled_metrics, classification_metrics, clinical_report


def test_clinical_report_on_a_hand_made_example() -> None:
    # 3 classes; true 0,0,1,1,2,2; predicted 0,1,1,1,2,0
    probs = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.8 + 0.2 / 3
    report = clinical_report(probs, np.array([0, 0, 1, 1, 2, 2]), ["a", "b", "c"], n_boot=200)
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    a, b = report["per_class"]["a"], report["per_class"]["b"]
    assert (a["support"], a["sensitivity"], a["specificity"]) == (2, 0.5, 0.75)
    assert (b["sensitivity"], b["ppv"], b["npv"]) == (1.0, 2 / 3, 1.0)
    low, high = report["ci95"]["accuracy"]
    assert 0.0 <= low <= 4 / 6 <= high <= 1.0
    again = clinical_report(probs, np.array([0, 0, 1, 1, 2, 2]), ["a", "b", "c"], n_boot=200)
    assert again == report  # seeded


def test_resampled_metrics_match_the_reference_metrics() -> None:
    """The vectorised bootstrap computes the same numbers as `classification_metrics`."""
    rng = np.random.default_rng(0)
    for k in (2, 4):
        logits = rng.normal(size=(5, 40, k))
        labels = rng.integers(0, k, (5, 40))
        labels[0] = 0  # a resample with one class: AUROC undefined
        probs = np.exp(logits) / np.exp(logits).sum(2, keepdims=True)
        fast = _resampled_metrics(probs, labels)
        for i in range(5):
            slow = classification_metrics(logits[i], labels[i])
            assert np.isclose(fast["accuracy"][i], slow["accuracy"])
            assert np.isclose(fast["macro_f1"][i], slow["macro_f1"])
            assert np.isclose(fast["auroc"][i], slow["auroc"], equal_nan=True)
