"""Seeded, grouped train/val/test splits, and the split CSV that lets a run be repeated exactly.

Groups (patient or lesion ids) are sorted, shuffled with the seed, then dealt one at a time to
the split furthest below its target image count. So no group straddles splits, the image
proportions land within one group of the target, and the result depends only on the seed and
the set of (id, group) pairs, not on row order in the label file.

A label budget (`label_budget_index`) then keeps a seeded, class-stratified share of the
training rows; split.csv marks the training rows it left out as `unused`, so the file still
lists every row and a run repeated from it trains on exactly the same images.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medmerge_core.data.formats.common import read_table
from medmerge_core.errors import InputError

SPLITS = ("train", "val", "test")
SPLIT_CSV = "split.csv"
SPLIT_COLUMNS = ("id", "group", "split", "label")
UNUSED = "unused"  # split.csv value of a training row left out by the label budget
_BUDGET_STREAM = 0x1ABE1  # mixed into the seed: the budget draw is independent of the split


def check_fractions(fractions: Sequence[float], key: str = "data.fractions") -> tuple[float, ...]:
    numbers = all(isinstance(f, int | float) and not isinstance(f, bool) for f in fractions)
    values = tuple(float(f) for f in fractions) if numbers else ()
    if len(values) != 3 or min(values) < 0 or not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise InputError(
            f"{key}: expected three non-negative train/val/test fractions summing to 1, "
            f"got {list(fractions)}"
        )
    return values


def grouped_split(groups: Sequence[str], fractions: Sequence[float], seed: int) -> list[str]:
    """One split name per row; rows sharing a group always share a split."""
    fractions = check_fractions(fractions)
    if not groups:
        return []
    names, inverse, counts = np.unique(
        np.asarray(groups, dtype=str), return_inverse=True, return_counts=True
    )
    order = np.random.default_rng(seed).permutation(len(names))
    target = np.asarray(fractions) * len(groups)
    filled = np.zeros(3)
    closed = np.asarray(fractions) == 0  # a 0 fraction never receives a group
    chosen = np.empty(len(names), dtype=np.int64)
    for g in order:
        deficit = np.where(closed, -np.inf, target - filled)
        pick = int(np.argmax(deficit))
        chosen[g] = pick
        filled[pick] += counts[g]
    return [SPLITS[i] for i in chosen[inverse]]


def assign_splits(
    groups: Sequence[str],
    given: Sequence[str | None],
    fractions: Sequence[float],
    val_fraction: float,
    seed: int,
) -> list[str]:
    """Final split per row: official splits kept, "trainval" rows carved into train/val by
    group, rows with no split (None) split by `fractions`."""
    out: list[str] = [s or "" for s in given]
    free = [i for i, s in enumerate(given) if s is None]
    pooled = [i for i, s in enumerate(given) if s == "trainval"]
    for rows, fracs in (
        (free, fractions),
        (pooled, (1.0 - val_fraction, val_fraction, 0.0)),
    ):
        for i, split in zip(
            rows, grouped_split([groups[i] for i in rows], fracs, seed), strict=True
        ):
            out[i] = split
    return out


def write_split_csv(
    path: Path,
    ids: Sequence[str],
    groups: Sequence[str],
    splits: Sequence[str],
    labels: Sequence[str],
) -> None:
    """Write id,group,split,label atomically (temp file, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(SPLIT_COLUMNS)
        writer.writerows(zip(ids, groups, splits, labels, strict=True))
    os.replace(tmp, path)


def read_split_csv(path: Path, ids: Sequence[str], wheres: Sequence[str]) -> list[str]:
    """The split of each id, from a split CSV written by an earlier run.

    Every id must be listed exactly once and every listed id must exist, so a repeated run
    trains and tests on exactly the same images (labels come from the source files). Rows
    marked `unused` (left out by a label budget) are returned as such and used in no split.
    """
    table = read_table(path, ("id", "split"))
    known = {ident: i for i, ident in enumerate(ids)}
    out: list[str | None] = [None] * len(ids)
    seen: dict[str, int] = {}
    for n, row in table.rows:
        ident, split = row["id"], row["split"]
        if ident in seen:
            raise InputError(f"{table.at(n)}: duplicate id {ident} (first at row {seen[ident]})")
        seen[ident] = n
        if ident not in known:
            raise InputError(f"{table.at(n)}: id {ident} is not in the dataset")
        if split not in (*SPLITS, UNUSED):
            raise InputError(
                f"{table.at(n)}: unknown split value {split!r}; expected one of "
                f"{', '.join((*SPLITS, UNUSED))}"
            )
        out[known[ident]] = split
    for i, split in enumerate(out):
        if split is None:
            raise InputError(f"{table.name}: no row for id {ids[i]} ({wheres[i]})")
    return [s or "" for s in out]


def check_label_budget(value: object, key: str = "data.label_budget") -> float | int:
    """A fraction in (0, 1] (float) or a count >= 1 (int), or a one-line InputError.

    Strings (a quoted YAML value, `--data label_budget=...`) are read as numbers: "0.2" is a
    fraction, "50" a count. Note 1 is a count of one image, 1.0 the whole training split.
    """
    expected = "a fraction in (0, 1] or an integer count >= 1"
    number: object = value
    if isinstance(value, str):
        text = value.strip()
        try:
            number = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise InputError(f"{key}: expected {expected}, got {value!r}") from None
    if isinstance(number, bool) or not isinstance(number, int | float | np.integer | np.floating):
        raise InputError(f"{key}: expected {expected}, got {value!r}")
    if isinstance(number, int | np.integer):
        if number < 1:
            raise InputError(f"{key}: expected {expected}, got {value!r}")
        return int(number)
    if not (math.isfinite(number) and 0.0 < number <= 1.0):
        hint = " (give a count as an integer)" if float(number).is_integer() and number > 1 else ""
        raise InputError(f"{key}: expected {expected}, got {value!r}{hint}")
    return float(number)


def label_budget_index(
    labels: np.ndarray, budget: float | int, seed: int, key: str = "data.label_budget"
) -> np.ndarray:
    """Sorted row indices of the training rows kept by a label budget; same seed, same rows.

    budget: a float in (0, 1] keeps that fraction, an int >= 1 keeps that many rows (more than
    len(labels) is an InputError naming `key`).

    Multi-class labels (1-D) are stratified by class. A fraction keeps round(n_c * fraction)
    rows of each class c (half up), at least 1 of every class present, so the total may exceed
    round(n * fraction) by up to one row per class. A count is shared in proportion to the
    class sizes by largest-remainder rounding, so it is met exactly; when count >= the number
    of classes present, a class left with 0 takes one row from the class with the most.

    Multi-label labels (2-D, NaN = unknown) are not stratified (a row carries several labels):
    max(1, round(n * fraction)) rows, or `count` rows, are drawn uniformly at random.
    """
    budget = check_label_budget(budget, key)
    labels = np.asarray(labels)
    n = len(labels)
    if isinstance(budget, int) and budget > n:
        raise InputError(f"{key}: a count of {budget} is more than the {n} training images")
    rng = np.random.default_rng([_BUDGET_STREAM, int(seed)])
    if n == 0:
        return np.zeros(0, np.int64)
    if labels.ndim != 1:
        k = budget if isinstance(budget, int) else max(1, math.floor(n * budget + 0.5))
        return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
    classes, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    if isinstance(budget, float):
        keep = np.minimum(sizes, np.maximum(1, np.floor(sizes * budget + 0.5).astype(np.int64)))
    else:
        keep = _largest_remainder(sizes, budget)
    picked = [
        rng.choice(np.flatnonzero(inverse == c), size=int(keep[c]), replace=False)
        for c in range(len(classes))
    ]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _largest_remainder(sizes: np.ndarray, count: int) -> np.ndarray:
    """`count` shared in proportion to `sizes` (sum exactly count; ties to the larger class,
    then the earlier class); every class >= 1 when count >= len(sizes)."""
    quota = sizes * count / sizes.sum()
    keep = np.floor(quota).astype(np.int64)
    order = np.lexsort((np.arange(len(sizes)), -sizes, -(quota - keep)))
    keep[order[: count - int(keep.sum())]] += 1
    if count >= len(sizes):
        for c in np.flatnonzero(keep == 0):
            keep[int(np.argmax(keep))] -= 1
            keep[c] = 1
    return keep


def label_budget_notes(
    budget: float | int,
    seed: int,
    before: np.ndarray,
    after: np.ndarray,
    class_names: tuple[str, ...],
) -> dict[str, Any]:
    """Budget, seed and training images per class (multi-label: positives per label)."""

    def per_class(labels: np.ndarray) -> dict[str, int]:
        if labels.ndim == 1:
            counts = np.bincount(labels.astype(np.int64), minlength=len(class_names))
        else:
            counts = (labels == 1).sum(axis=0)
        return {name: int(c) for name, c in zip(class_names, counts, strict=True)}

    return {
        "budget": budget,
        "seed": int(seed),
        "stratified": bool(after.ndim == 1),
        "n_train_before": len(before),
        "n_train": len(after),
        "per_class_before": per_class(before),
        "per_class": per_class(after),
    }
