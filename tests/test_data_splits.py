"""Seeded grouped splits: deterministic, grouped, proportional; and the split CSV round trip."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from medmerge_core.data.registry import load_task
from medmerge_core.data.splits import assign_splits, grouped_split
from medmerge_core.errors import InputError
from tests.test_data_fixtures import aptos_tree, ham_tree, write_csv, write_image


def random_groups(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"p{g}" for g in rng.integers(0, n // 3, n)]  # groups of ~3 rows, uneven


def test_same_seed_same_split_other_seed_differs() -> None:
    groups = random_groups(300)
    a = grouped_split(groups, (0.8, 0.1, 0.1), seed=1)
    assert a == grouped_split(groups, (0.8, 0.1, 0.1), seed=1)
    assert a != grouped_split(groups, (0.8, 0.1, 0.1), seed=2)


def test_no_group_straddles_splits() -> None:
    groups = random_groups(500, seed=3)
    splits = grouped_split(groups, (0.6, 0.2, 0.2), seed=0)
    seen: dict[str, str] = {}
    for group, split in zip(groups, splits, strict=True):
        assert seen.setdefault(group, split) == split


@pytest.mark.parametrize("fractions", [(0.6, 0.2, 0.2), (0.8, 0.1, 0.1)])
def test_proportions_exact_without_groups_and_close_with(fractions) -> None:
    n = 1000
    counts = Counter(grouped_split([str(i) for i in range(n)], fractions, seed=5))
    assert [counts[s] for s in ("train", "val", "test")] == [round(f * n) for f in fractions]
    groups = random_groups(n, seed=1)
    largest = max(Counter(groups).values())
    counts = Counter(grouped_split(groups, fractions, seed=5))
    for split, f in zip(("train", "val", "test"), fractions, strict=True):
        assert abs(counts[split] - f * n) <= largest


def test_split_ignores_row_order_and_zero_fraction_gets_nothing() -> None:
    groups = random_groups(120)
    order = np.random.default_rng(0).permutation(len(groups))
    base = grouped_split(groups, (0.7, 0.3, 0.0), seed=4)
    shuffled = grouped_split([groups[i] for i in order], (0.7, 0.3, 0.0), seed=4)
    assert [base[i] for i in order] == shuffled
    assert "test" not in base


def test_assign_keeps_official_and_carves_val_from_trainval_by_group() -> None:
    groups = [f"p{i // 2}" for i in range(40)]
    given = ["test"] * 10 + ["trainval"] * 30
    out = assign_splits(groups, given, (0.8, 0.1, 0.1), val_fraction=0.2, seed=0)
    assert out[:10] == ["test"] * 10
    assert Counter(out[10:]) == {"train": 24, "val": 6}
    for i in range(10, 40, 2):
        assert out[i] == out[i + 1]


def test_split_csv_written_and_repeated_exactly(tmp_path: Path) -> None:
    root = ham_tree(tmp_path / "ham")
    spec = {"format": "ham10000", "root": root, "fractions": [0.5, 0.25, 0.25]}
    first = load_task(spec, image_size=8, seed=1, run_dir=tmp_path / "run1")
    path = tmp_path / "run1" / "split.csv"
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["id", "group", "split", "label"]
    assert {r["id"]: r["group"] for r in rows}["ISIC_0000002"] == "HAM_0000001"
    assert {r["id"]: r["label"] for r in rows}["ISIC_0000003"] == "mel"
    again = load_task({**spec, "split_csv": path}, image_size=8, seed=99)
    for name in ("train", "val", "test"):
        assert list(first.splits()[name].ids) == list(again.splits()[name].ids)
    assert again.notes["split"] == f"from {path}"


def test_split_csv_multilabel_label_text(tmp_path: Path) -> None:
    write_csv(tmp_path / "d.csv", ["path,a,b", "x.png,1,", "y.png,0,1", "z.png,1,0"])
    for name in "xyz":
        write_image(tmp_path / f"{name}.png")
    spec = {"format": "csv", "csv": tmp_path / "d.csv", "label_columns": ["a", "b"]}
    load_task(spec, image_size=8, run_dir=tmp_path / "run")
    text = (tmp_path / "run" / "split.csv").read_text()
    assert "x.png,x.png," in text and ",1;nan" in text


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda rows: rows[:-1], "no row for id"),
        (lambda rows: [*rows, ["ghost", "g", "train", "x"]], "row 7: id ghost is not in"),
        (lambda rows: [*rows, rows[0]], "row 7: duplicate id"),
        (lambda rows: [[rows[0][0], rows[0][1], "holdout", rows[0][3]], *rows[1:]], "'holdout'"),
    ],
)
def test_bad_split_csv(tmp_path: Path, edit, message: str) -> None:
    root = aptos_tree(tmp_path / "aptos")
    load_task({"format": "aptos", "root": root}, image_size=8, run_dir=tmp_path / "run")
    path = tmp_path / "run" / "split.csv"
    rows = list(csv.reader(path.open()))
    write_csv(path, [",".join(r) for r in [rows[0], *edit(rows[1:])]])
    with pytest.raises(InputError, match=message) as err:
        load_task({"format": "aptos", "root": root, "split_csv": path}, image_size=8)
    assert "split.csv" in str(err.value) and "\n" not in str(err.value)
