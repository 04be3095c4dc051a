"""Seeded, grouped train/val/test splits, and the split CSV that lets a run be repeated exactly.

Groups (patient or lesion ids) are sorted, shuffled with the seed, then dealt one at a time to
the split furthest below its target image count. So no group straddles splits, the image
proportions land within one group of the target, and the result depends only on the seed and
the set of (id, group) pairs, not on row order in the label file.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medmerge_core.data.formats.common import read_table
from medmerge_core.errors import InputError

SPLITS = ("train", "val", "test")
SPLIT_CSV = "split.csv"
SPLIT_COLUMNS = ("id", "group", "split", "label")


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
    names, inverse, counts = np.unique(np.asarray(groups, dtype=str), return_inverse=True,
                                       return_counts=True)  # fmt: skip
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
        for i, split in zip(rows, grouped_split([groups[i] for i in rows], fracs, seed),
                            strict=True):  # fmt: skip
            out[i] = split
    return out


def write_split_csv(
    path: Path, ids: Sequence[str], groups: Sequence[str], splits: Sequence[str],
    labels: Sequence[str],
) -> None:  # fmt: skip
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
    trains and tests on exactly the same images (labels come from the source files).
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
        if split not in SPLITS:
            raise InputError(
                f"{table.at(n)}: unknown split value {split!r}; expected one of {', '.join(SPLITS)}"
            )
        out[known[ident]] = split
    for i, split in enumerate(out):
        if split is None:
            raise InputError(f"{table.name}: no row for id {ids[i]} ({wheres[i]})")
    return [s or "" for s in out]
