"""The one check of a task's labels against its classes, shared by every file-backed format.

MedMNIST's reader (medmnist.py) and the catalog formats (HAM10000, ISIC, APTOS, EyePACS,
CheXpert, RSNA, NIH, image folders and CSVs, through registry.build_task) call `check_labels`
on the splits as the data gives them, before a label budget cuts the training split and before
split.csv or anything else is written. Every problem is a one-line InputError that names the
file (or the row of a label file), the split and how many rows are affected:

- a multi-class label outside 0..C-1. C is the format's class list (a named MedMNIST flag, a
  dataset format's classes, data.classes); a MedMNIST file of unknown name has none, so C comes
  from the other splits: val and test define the classes (0 up to their largest label), and a
  training label beyond them is an error rather than a new class (five BreastMNIST labels set
  to 9 would otherwise train a 10-class model);
- a row with the wrong number of labels: multi-label rows need one value per label, and a
  single-label dataset one class per row;
- a class in val or test that no training row has (multi-class). The check runs on the whole
  training split, before any label budget: a budget smaller than the number of classes leaves
  classes out legitimately, so it never trips this. For MedMNIST files, whose labels are bare
  integers in one file with fixed splits, such a class is an error: the labels are inconsistent
  (or the split is), and the model could never learn it. For the catalog formats every label
  was already parsed against a named class, and splits are either the tool's random draw or a
  dataset's official one assembled from several files, where a rare class can miss the
  training split by chance or on small data (test_formats' official HAM10000 fixture has 6
  training images for 7 classes): a warning naming the classes, recorded in the task's notes.

A class that only the training split has is fine: rare classes often miss a small val or test
split. Multi-label tasks are checked for their width only (values are checked where parsed).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from medmerge_core.errors import InputError

log = logging.getLogger(__name__)

EVALUATION_SPLITS = ("val", "test")


@dataclass(frozen=True)
class CheckedLabels:
    """What `check_labels` found: the number of classes (labels, for multi-label) and the
    val/test classes that no training row has (only where that is a warning)."""

    num_classes: int
    without_training_rows: tuple[int, ...] = ()


def check_labels(
    labels: Mapping[str, Sequence[Any] | np.ndarray],
    class_names: Sequence[str] | None,
    *,
    multilabel: bool,
    where: Mapping[str, str],
    what: str,
    rows: Mapping[str, Sequence[str]] | None = None,
    missing_from_train: Literal["error", "warn"] = "error",
) -> CheckedLabels:
    """Check per-split labels (train, val, test) against the classes; see the module docstring.

    labels: per split, multi-class ids ([N] or [N, 1]) or multi-label rows ([N, L], or one
    tuple per row). class_names: the format's classes, or None (taken from the labels). where:
    per split, how a message names it ("x.npz: train_labels"); rows: per split, where each row
    is (its label file and row), named for the first offending row; what: the dataset's name.
    """
    splits = {s: v for s, v in labels.items() if len(v) > 0}
    if multilabel:
        return CheckedLabels(_check_widths(splits, class_names, where, what, rows))
    ids = {s: _class_ids(s, v, where, what, rows) for s, v in splits.items()}
    count = _check_range(ids, class_names, where, what, rows)
    return CheckedLabels(count, _check_training_classes(ids, class_names, where, rows,
                                                         missing_from_train))  # fmt: skip


def _first(rows: Mapping[str, Sequence[str]] | None, split: str, bad: np.ndarray) -> str:
    if rows is None or not bad.any():
        return ""
    return f" (first: {rows[split][int(np.flatnonzero(bad)[0])]})"


def _widths(values: Sequence[Any] | np.ndarray) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return np.full(len(values), 1 if values.ndim == 1 else int(np.prod(values.shape[1:])))
    return np.array([np.size(v) for v in values])


def _check_widths(
    splits: Mapping[str, Sequence[Any] | np.ndarray],
    class_names: Sequence[str] | None,
    where: Mapping[str, str],
    what: str,
    rows: Mapping[str, Sequence[str]] | None,
) -> int:
    widths = {s: _widths(v) for s, v in splits.items()}
    if class_names is not None:
        expected, why = len(class_names), f"one per label of {what}"
    else:  # the first split's most common width
        first = next(iter(widths.values()), np.array([1]))
        values, counts = np.unique(first, return_counts=True)
        expected, why = int(values[counts.argmax()]), "as most rows have"
    for split, width in widths.items():
        bad = width != expected
        if bad.any():
            got = ", ".join(str(w) for w in np.unique(width[bad]))
            noun = "label" if got == "1" else "labels"
            raise InputError(
                f"{where[split]}: {int(bad.sum())} of {len(width)} rows have {got} {noun}, "
                f"expected {expected} ({why}){_first(rows, split, bad)}"
            )
    return expected


def _class_ids(
    split: str,
    values: Sequence[Any] | np.ndarray,
    where: Mapping[str, str],
    what: str,
    rows: Mapping[str, Sequence[str]] | None,
) -> np.ndarray:
    """Multi-class labels as a float array [N] (so a bad value survives to be reported)."""
    width = _widths(values)
    bad = width != 1
    if bad.any():
        got = ", ".join(str(w) for w in np.unique(width[bad]))
        raise InputError(
            f"{where[split]}: {int(bad.sum())} of {len(width)} rows have {got} labels, but "
            f"{what} is single-label (one class per row){_first(rows, split, bad)}"
        )
    return np.asarray(values, dtype=np.float64).reshape(len(width))


def _describe(value: float) -> str:
    return str(int(value)) if np.isfinite(value) and value == int(value) else repr(float(value))


def _check_range(
    ids: Mapping[str, np.ndarray],
    class_names: Sequence[str] | None,
    where: Mapping[str, str],
    what: str,
    rows: Mapping[str, Sequence[str]] | None,
) -> int:
    """The number of classes C; every label must be an integer in 0..C-1."""
    if class_names is not None:
        count = len(class_names)
        why = f"but {what} has {count} classes ({', '.join(map(repr, class_names))})"
    else:
        defining = [ids[s] for s in EVALUATION_SPLITS if s in ids] or list(ids.values())
        finite = [v[np.isfinite(v)] for v in defining]
        count = max((int(v.max()) + 1 for v in finite if len(v)), default=1)
        named = " and ".join(s for s in EVALUATION_SPLITS if s in ids) or "its"
        why = (
            f"{what} has no class list, so its classes are those of its {named} labels "
            f"(0..{count - 1})"
        )
    for split, values in ids.items():
        bad = ~np.isfinite(values) | (values != np.round(values)) | (values < 0)
        bad |= values >= count
        if bad.any():
            shown = values[bad]
            top = _describe(shown[np.isfinite(shown)].max()) if np.isfinite(shown).any() else "nan"
            raise InputError(
                f"{where[split]}: {int(bad.sum())} of {len(values)} rows have a label outside "
                f"0..{count - 1} (up to {top}), {why}{_first(rows, split, bad)}"
            )
    return count


def _check_training_classes(
    ids: Mapping[str, np.ndarray],
    class_names: Sequence[str] | None,
    where: Mapping[str, str],
    rows: Mapping[str, Sequence[str]] | None,
    policy: Literal["error", "warn"],
) -> tuple[int, ...]:
    """The val/test classes that no training row has: an error, or warned about and returned."""
    trained = set(np.unique(ids["train"]).astype(int)) if "train" in ids else set()
    missing: set[int] = set()
    for split in EVALUATION_SPLITS:
        if split not in ids:
            continue
        values = ids[split].astype(int)
        absent = sorted(set(np.unique(values)) - trained)
        if not absent:
            continue
        bad = np.isin(values, absent)
        names = ", ".join(
            str(c) if class_names is None else f"{c} ({class_names[c]!r})" for c in absent
        )
        message = (
            f"{where[split]}: {int(bad.sum())} of {len(values)} rows have a class that no "
            f"training row has: {names}; a model cannot learn it{_first(rows, split, bad)}"
        )
        if policy == "error":
            raise InputError(message)
        log.warning("%s", message)
        missing.update(absent)
    return tuple(sorted(missing))
