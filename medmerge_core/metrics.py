"""Accuracy, macro-F1 and AUROC for multi-class and multi-label tasks, and the clinical report
(confusion matrix, per-class sensitivity / specificity / PPV / NPV, bootstrap CIs).

scikit-learn's implementations are used because they are the reference the field reports
against (edge cases such as absent classes and ties in AUROC are handled the standard way).
They are imported where they are used: every Flower message starts a ClientApp process that
imports this module, and most messages compute no metric (scipy and scikit-learn add about
1 s to each start).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _safe_auroc(y_true: np.ndarray, scores: np.ndarray, **kwargs: object) -> float:
    """AUROC, or NaN where it is undefined (a split with a single class)."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y_true)) < 2:
        return float("nan")
    try:
        return float(roc_auc_score(y_true, scores, **kwargs))
    except ValueError:  # e.g. a multi-class split missing a class
        return float("nan")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def classification_metrics(
    logits: np.ndarray, labels: np.ndarray, multilabel: bool = False
) -> dict[str, float]:
    """{'accuracy', 'macro_f1', 'auroc'} (+ 'auroc_<i>' per label for multi-label tasks).

    Multi-label: labels [N, L] with NaN meaning "ignore"; predictions at probability 0.5;
    accuracy is element-wise over the observed entries; AUROC is macro over defined labels.
    """
    from sklearn.metrics import accuracy_score, f1_score

    logits = np.asarray(logits, dtype=np.float64)
    if not multilabel:
        labels = np.asarray(labels).astype(np.int64)
        num_classes = logits.shape[1]
        probs = softmax(logits)
        preds = probs.argmax(1)
        if num_classes == 2:
            auroc = _safe_auroc(labels, probs[:, 1])
        else:
            auroc = _safe_auroc(
                labels, probs, multi_class="ovr", average="macro", labels=np.arange(num_classes)
            )
        return {
            "accuracy": float(accuracy_score(labels, preds)),
            "macro_f1": float(
                f1_score(
                    labels, preds, average="macro", labels=np.arange(num_classes), zero_division=0
                )
            ),
            "auroc": auroc,
        }
    labels = np.asarray(labels, dtype=np.float64)
    probs = sigmoid(logits)
    preds = (probs >= 0.5).astype(np.int64)
    observed = ~np.isnan(labels)
    per_label_f1, per_label_auc = [], []
    out: dict[str, float] = {}
    for j in range(labels.shape[1]):
        mask = observed[:, j]
        y = labels[mask, j].astype(np.int64)
        per_label_f1.append(f1_score(y, preds[mask, j], zero_division=0) if mask.any() else 0.0)
        auc = _safe_auroc(y, probs[mask, j]) if mask.any() else float("nan")
        per_label_auc.append(auc)
        out[f"auroc_{j}"] = auc
    defined = [a for a in per_label_auc if not np.isnan(a)]
    out["accuracy"] = float((preds[observed] == labels[observed]).mean()) if observed.any() else 0.0
    out["macro_f1"] = float(np.mean(per_label_f1))
    out["auroc"] = float(np.mean(defined)) if defined else float("nan")
    return out


def confusion_matrix(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[k, k] counts, rows the true class, columns the argmax prediction."""
    k = probs.shape[1]
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels).astype(np.int64), np.asarray(probs).argmax(1)), 1)
    return matrix


def clinical_report(
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """What a clinical reader asks of a single-label classifier's test set.

    The confusion matrix (rows: true class, columns: predicted, prediction = argmax), per class
    the sensitivity (recall), specificity, PPV and NPV with its support (one-vs-rest), and 95%
    percentile bootstrap confidence intervals (test images resampled with replacement, `n_boot`
    times, seeded) of accuracy, macro-F1 and AUROC. A rate whose denominator is 0 is None.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    matrix = confusion_matrix(probs, labels)
    total = matrix.sum()
    per_class = {}
    for c, name in enumerate(class_names):
        tp = matrix[c, c]
        fn = matrix[c].sum() - tp
        fp = matrix[:, c].sum() - tp
        tn = total - tp - fn - fp
        per_class[str(name)] = {
            "support": int(tp + fn),
            "sensitivity": _rate(tp, tp + fn),
            "specificity": _rate(tn, tn + fp),
            "ppv": _rate(tp, tp + fp),
            "npv": _rate(tn, tn + fn),
        }
    rng = np.random.default_rng(seed)
    draws: dict[str, list[np.ndarray]] = {"accuracy": [], "macro_f1": [], "auroc": []}
    for start in range(0, n_boot, 250):  # vectorised over resamples, in bounded chunks
        picks = rng.integers(0, len(labels), (min(250, n_boot - start), len(labels)))
        for key, values in _resampled_metrics(probs[picks], labels[picks]).items():
            draws[key].append(values)
    ci95 = {}
    for key, chunks in draws.items():
        values = np.concatenate(chunks)
        finite = values[~np.isnan(values)]
        ci95[key] = [float(v) for v in np.percentile(finite, [2.5, 97.5])] if len(finite) else None
    return {
        "classes": [str(c) for c in class_names],
        "confusion_matrix": matrix.tolist(),
        "per_class": per_class,
        "ci95": ci95,
        "bootstrap": {"resamples": n_boot, "seed": seed},
    }


def _resampled_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, macro-F1 and one-vs-rest macro AUROC of each resample: probs [B, n, k],
    labels [B, n]. Same definitions as `classification_metrics` (absent classes give F1 0;
    AUROC is NaN for a resample with one class, and averages the classes present)."""
    from scipy.stats import rankdata

    b, n, k = probs.shape
    preds = probs.argmax(2)
    accuracy = (preds == labels).mean(1)
    cells = (np.arange(b)[:, None] * k * k + labels * k + preds).ravel()
    confusion = np.bincount(cells, minlength=b * k * k).reshape(b, k, k)
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    denominator = confusion.sum(2) + confusion.sum(1)  # (tp + fn) + (tp + fp)
    f1 = np.divide(2 * tp, denominator, out=np.zeros((b, k)), where=denominator > 0)
    classes = [1] if k == 2 else range(k)
    aurocs = []
    for c in classes:
        positive = labels == c
        ranks = rankdata(probs[:, :, c], axis=1)  # average ranks for ties, as sklearn
        n_pos = positive.sum(1)
        n_neg = n - n_pos
        u = (ranks * positive).sum(1) - n_pos * (n_pos + 1) / 2
        with np.errstate(invalid="ignore", divide="ignore"):
            aurocs.append(np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan))
    stacked = np.stack(aurocs, 1)
    defined = ~np.isnan(stacked)
    with np.errstate(invalid="ignore"):
        auroc = np.where(
            defined.sum(1) >= (1 if k == 2 else 2),
            np.nansum(stacked, 1) / np.maximum(defined.sum(1), 1),
            np.nan,
        )
    return {"accuracy": accuracy, "macro_f1": f1.mean(1), "auroc": auroc}


def _rate(numerator: int, denominator: int) -> float | None:
    return float(numerator / denominator) if denominator else None


# ----------------------------------------------------------------------------- pooled over sites

SCORE_BINS = 100  # resolution of the score histograms a site shares for a pooled AUROC


def pooling_counts(probs: np.ndarray, labels: np.ndarray, bins: int = SCORE_BINS) -> dict:
    """What a site shares so that metrics can be pooled over sites: counts, never examples.

    `confusion` [k, k] (rows true, columns argmax); `positive` and `negative` [k, bins]: per
    class c, histograms over [0, 1] of the score of class c for the images of class c and for the
    others. Sums of these over sites give the pooled metrics (`pooled_metrics`).
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    k = probs.shape[1]
    confusion = confusion_matrix(probs, labels)
    cells = np.clip((probs * bins).astype(np.int64), 0, bins - 1)  # [n, k] bin of each score
    positive = np.zeros((k, bins), dtype=np.int64)
    negative = np.zeros((k, bins), dtype=np.int64)
    for c in range(k):
        is_c = labels == c
        positive[c] = np.bincount(cells[is_c, c], minlength=bins)
        negative[c] = np.bincount(cells[~is_c, c], minlength=bins)
    return {"confusion": confusion, "positive": positive, "negative": negative}


def pooled_metrics(confusion: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> dict:
    """Accuracy, macro-F1 and AUROC of the pooled test sets, from summed `pooling_counts`.

    Accuracy and macro-F1 are exactly those of the pooled predictions. AUROC (class 1 for two
    classes, else the one-vs-rest macro mean over the classes present) counts a positive and a
    negative in the same score bin as a tie, so it is within (pairs sharing a bin) / 2 of the
    exact value.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    k = confusion.shape[0]
    tp = np.diag(confusion)
    denominator = confusion.sum(0) + confusion.sum(1)
    f1 = np.divide(2 * tp, denominator, out=np.zeros(k), where=denominator > 0)
    total = confusion.sum()
    aurocs = []
    for c in [1] if k == 2 else range(k):
        pos, neg = np.asarray(positive[c], float), np.asarray(negative[c], float)
        if pos.sum() and neg.sum():
            below = np.cumsum(neg) - neg  # negatives in lower bins
            aurocs.append(float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum())))
    enough = len(aurocs) >= (1 if k == 2 else 2)
    return {
        "accuracy": float(tp.sum() / total) if total else float("nan"),
        "macro_f1": float(f1.mean()),
        "auroc": float(np.mean(aurocs)) if enough else float("nan"),
    }
