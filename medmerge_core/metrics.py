"""Accuracy, macro-F1 and AUROC for multi-class and multi-label tasks.

scikit-learn's implementations are used because they are the reference the field reports
against (edge cases such as absent classes and ties in AUROC are handled the standard way).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score


def _safe_auroc(y_true: np.ndarray, scores: np.ndarray, **kwargs: object) -> float:
    """AUROC, or NaN where it is undefined (a split with a single class)."""
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
