"""Label budget: a seeded, class-stratified share of the TRAIN split; val/test untouched."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import one_line_error

from medmerge_core.data.registry import FORMAT_OPTIONS, load_task, validate_spec
from medmerge_core.data.splits import label_budget_index
from tests.test_data_fixtures import folder_tree
from tests.test_medmnist import arrays

LABELS_70_30 = np.asarray([0] * 70 + [1] * 30)
SYNTHETIC = {"format": "synthetic", "task": "target"}
SIZE = 16


def per_class(labels: np.ndarray, index: np.ndarray) -> list[int]:
    return np.bincount(labels[index], minlength=labels.max() + 1).tolist()


@pytest.mark.parametrize("budget", [0.1, 10])
def test_fraction_and_count_keep_the_class_shares(budget: float | int) -> None:
    rng = np.random.default_rng(0)
    labels = LABELS_70_30[rng.permutation(100)]  # classes interleaved, not in blocks
    index = label_budget_index(labels, budget, seed=3)
    assert per_class(labels, index) == [7, 3]
    assert list(index) == sorted(set(index.tolist()))  # sorted, no repeats


def test_count_uses_largest_remainder_and_keeps_every_class() -> None:
    labels = np.asarray([0] * 50 + [1] * 30 + [2] * 20)
    # quotas 3.5 / 2.1 / 1.4 -> floors 3/2/1, the one spare row to the largest remainder
    assert per_class(labels, label_budget_index(labels, 7, seed=0)) == [4, 2, 1]
    rare = np.asarray([0] * 98 + [1] * 2)  # quota 0.04 for class 1: still gets one row
    assert per_class(rare, label_budget_index(rare, 2, seed=0)) == [1, 1]
    assert per_class(rare, label_budget_index(rare, 5, seed=0)) == [4, 1]


def test_fraction_keeps_at_least_one_per_class_and_whole_split_at_one() -> None:
    labels = np.asarray([0] * 95 + [1] * 3 + [2] * 2)
    assert per_class(labels, label_budget_index(labels, 0.1, seed=0)) == [10, 1, 1]
    assert list(label_budget_index(labels, 1.0, seed=0)) == list(range(100))
    assert len(label_budget_index(labels, 100, seed=0)) == 100


def test_same_seed_same_rows_other_seed_differs() -> None:
    a = label_budget_index(LABELS_70_30, 0.2, seed=1)
    assert np.array_equal(a, label_budget_index(LABELS_70_30, 0.2, seed=1))
    assert not np.array_equal(a, label_budget_index(LABELS_70_30, 0.2, seed=2))


def test_multilabel_is_uniform_and_sized() -> None:
    labels = np.full((40, 3), np.nan, np.float32)
    labels[::2, 0] = 1.0
    index = label_budget_index(labels, 0.25, seed=0)
    assert len(index) == 10 and len(set(index.tolist())) == 10
    assert len(label_budget_index(labels, 7, seed=0)) == 7
    assert not np.array_equal(index, label_budget_index(labels, 0.25, seed=1))


def test_every_format_has_the_option() -> None:
    for fmt, table in FORMAT_OPTIONS.items():
        assert table["label_budget"].kind == "budget", fmt


@pytest.mark.parametrize(
    ("value", "expected"), [(0.5, 0.5), (1, 1), (1.0, 1.0), (25, 25), ("0.2", 0.2), ("50", 50)]
)
def test_spec_values_accepted(value: object, expected: float | int) -> None:
    _, opts = validate_spec({**SYNTHETIC, "label_budget": value})
    assert opts["label_budget"] == expected and type(opts["label_budget"]) is type(expected)


@pytest.mark.parametrize("value", [0, 0.0, 1.5, -3, -0.1, "abc", True, [0.1], float("nan"), 50.0])
def test_bad_values_are_one_line_errors(value: object) -> None:
    message = one_line_error(validate_spec, {**SYNTHETIC, "label_budget": value})
    assert message.startswith("data.label_budget:") and repr(value) in message


def test_count_above_the_train_size() -> None:
    message = one_line_error(label_budget_index, LABELS_70_30, 101, seed=0)
    assert "label_budget" in message and "101" in message and "100" in message
    spec = {**SYNTHETIC, "n_train": 20, "n_val": 5, "n_test": 5, "label_budget": 21}
    message = one_line_error(load_task, spec, image_size=SIZE)
    assert message.startswith("data.label_budget:") and "20 training images" in message


def test_synthetic_train_shrunk_val_test_untouched(tmp_path: Path) -> None:
    full = load_task(SYNTHETIC, image_size=SIZE, seed=4)
    task = load_task({**SYNTHETIC, "label_budget": 0.2}, image_size=SIZE, seed=4, run_dir=tmp_path)
    for name in ("val", "test"):
        assert np.array_equal(task.splits()[name].images, full.splits()[name].images)
        assert np.array_equal(task.splits()[name].labels, full.splits()[name].labels)
    before = np.bincount(full.train.labels).tolist()
    expected = [int(np.floor(n * 0.2 + 0.5)) for n in before]
    assert np.bincount(task.train.labels).tolist() == expected
    assert len(task.train) < len(full.train)
    kept = {i: k for k, i in enumerate(full.train.ids)}
    for row, ident in enumerate(task.train.ids):  # kept rows are the full split's rows
        assert np.array_equal(task.train.images[row], full.train.images[kept[ident]])
    notes = task.notes["label_budget"]
    assert notes["budget"] == 0.2 and notes["seed"] == 4 and notes["n_train"] == len(task.train)
    assert list(notes["per_class"].values()) == expected
    assert list(notes["per_class_before"].values()) == before
    with open(tmp_path / "split.csv", newline="") as handle:
        rows = Counter(r["split"] for r in csv.DictReader(handle))
    assert rows == {
        "train": len(task.train),
        "unused": len(full.train) - len(task.train),
        "val": len(full.val),
        "test": len(full.test),
    }
    other = load_task({**SYNTHETIC, "label_budget": 0.2, "seed": 4}, image_size=SIZE, seed=9)
    assert list(other.train.ids) == list(task.train.ids)  # the spec's seed wins
    other = load_task({**SYNTHETIC, "label_budget": 0.2, "seed": 5}, image_size=SIZE)
    assert list(other.train.ids) != list(task.train.ids)


def test_medmnist_budget_names_rows_by_their_full_index(tmp_path: Path) -> None:
    np.savez(tmp_path / "breastmnist.npz", **arrays())  # train labels 0,1,0,1,0,1
    spec = {"format": "medmnist", "flag": "breastmnist", "root": tmp_path, "label_budget": 2}
    task = load_task(spec, image_size=28, seed=0, run_dir=tmp_path / "run")
    assert np.bincount(task.train.labels).tolist() == [1, 1] and len(task.val) == 3
    rows = [int(ident.rsplit("/", 1)[1]) for ident in task.train.ids]  # breastmnist/train/3
    assert [row % 2 for row in rows] == task.train.labels.tolist()  # the label of that row
    text = (tmp_path / "run" / "split.csv").read_text()
    assert text.count(",unused,") == 4 and text.count(",train,") == 2


def test_image_folder_unused_rows_in_split_csv_and_repeated(tmp_path: Path) -> None:
    root = folder_tree(tmp_path / "imgs", per_class=10)
    spec = {"format": "image_folder", "root": root, "fractions": [0.8, 0.1, 0.1]}
    full = load_task(spec, image_size=8, seed=1)
    task = load_task({**spec, "label_budget": 4}, image_size=8, seed=1, run_dir=tmp_path / "run")
    assert len(full.train) == 16 and len(task.train) == 4
    assert np.bincount(task.train.labels).tolist() == [2, 2]
    assert set(task.train.ids) < set(full.train.ids)
    for name in ("val", "test"):
        assert list(task.splits()[name].ids) == list(full.splits()[name].ids)
    path = tmp_path / "run" / "split.csv"
    with open(path, newline="") as handle:
        rows = {r["id"]: r["split"] for r in csv.DictReader(handle)}
    assert len(rows) == 20
    assert {i for i, s in rows.items() if s == "unused"} == set(full.train.ids) - set(
        task.train.ids
    )
    again = load_task({**spec, "split_csv": path}, image_size=8, seed=99)
    for name in ("train", "val", "test"):
        assert list(again.splits()[name].ids) == list(task.splits()[name].ids)
    assert task.notes["label_budget"]["per_class"] == {"benign": 2, "malignant": 2}
