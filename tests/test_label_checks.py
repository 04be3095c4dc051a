"""Labels are checked against the classes when data is loaded (medmerge_core/data/labels.py).

A label outside 0..C-1, a row with the wrong number of labels, or a val/test class that the
training split lacks (MedMNIST) is a one-line InputError naming the file, the split and how many
rows, raised before a run folder is made. Fixtures: tiny fake MedMNIST .npz files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from helpers import one_line_error

from medmerge_core.data.formats.common import Catalog, Record
from medmerge_core.data.labels import check_labels
from medmerge_core.data.medmnist import load_medmnist
from medmerge_core.data.registry import build_task, load_task, validate_spec
from medmerge_core.errors import InputError

COUNTS = {"train": 12, "val": 4, "test": 6}


def npz(path: Path, classes: int = 2, width: int = 1, **labels: np.ndarray) -> Path:
    """A MedMNIST-layout file: 8x8 gray images, labels cycling through the classes (or 0/1
    flags when width > 1), with some splits' labels replaced."""
    rng = np.random.default_rng(0)
    data = {}
    for split, n in COUNTS.items():
        data[f"{split}_images"] = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
        cycle = np.arange(n * width) % (classes if width == 1 else 2)
        data[f"{split}_labels"] = cycle.reshape(n, width).astype(np.uint8)
    for split, values in labels.items():
        data[f"{split}_labels"] = np.asarray(values, np.uint8).reshape(COUNTS[split], -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **data)
    return path


def nines(n: int = 12, rows: tuple[int, ...] = (1, 4, 6, 9, 11)) -> np.ndarray:
    """A two-class training column with five labels set to 9."""
    labels = np.arange(n) % 2
    labels[list(rows)] = 9
    return labels


# --- labels outside the classes ---------------------------------------------------------------


def test_a_label_beyond_a_known_flags_classes_is_an_error(tmp_path: Path) -> None:
    path = npz(tmp_path / "breastmnist.npz", train=nines())
    message = one_line_error(load_medmnist, path)
    assert message.startswith(f"{path}: train_labels: 5 of 12 rows have a label outside 0..1")
    assert "up to 9" in message and "breastmnist has 2 classes" in message


def test_without_a_class_list_val_and_test_define_the_classes(tmp_path: Path) -> None:
    """The reported case: a renamed copy of BreastMNIST with five training labels set to 9
    used to load as a 10-class task."""
    path = npz(tmp_path / "breast_copy.npz", train=nines())
    message = one_line_error(load_medmnist, path)
    assert message.startswith(f"{path}: train_labels: 5 of 12 rows have a label outside 0..1")
    assert "no class list" in message and "val and test labels" in message


def test_a_val_or_test_class_missing_from_train_is_an_error(tmp_path: Path) -> None:
    test = np.arange(6) % 2
    test[[0, 3]] = 2
    for name in ("breast_copy.npz", "octmnist.npz"):  # no class list; 4 classes
        path = npz(tmp_path / name, test=test)  # train and val: classes 0 and 1
        message = one_line_error(load_medmnist, path)
        assert message.startswith(f"{path}: test_labels: 2 of 6 rows have a class that no ")
        assert "training row has: 2" in message, name
    path = npz(tmp_path / "val.npz", val=[0, 1, 3, 3])
    assert one_line_error(load_medmnist, path).startswith(f"{path}: val_labels: 2 of 4 rows")


def test_classes_that_only_train_has_or_a_flag_never_uses_are_fine(tmp_path: Path) -> None:
    """A rare class may miss a small val or test split; a flag's class may be absent."""
    train = np.arange(12) % 3
    task = load_medmnist(npz(tmp_path / "octmnist.npz", train=train, val=[0, 1, 0, 1]))
    assert task.num_classes == 4 and task.train.labels.tolist() == train.tolist()
    unknown = load_medmnist(npz(tmp_path / "three.npz", train=train, val=[0, 2, 0, 2]))
    assert unknown.num_classes == 3  # 0..2: a train-only class below the largest val/test one


def test_a_label_budget_may_leave_classes_out_of_train(tmp_path: Path) -> None:
    """The check runs on the whole training split, before the budget: 2 training rows for 4
    classes is the budget's doing, not a labelling error."""
    path = npz(tmp_path / "octmnist.npz", classes=4)
    spec = {"format": "medmnist", "path": path, "label_budget": 2}
    task = load_task(spec, image_size=8, run_dir=tmp_path / "run")
    assert len(task.train) == 2 and len(set(task.test.labels.tolist())) == 4


# --- rows of the wrong width ------------------------------------------------------------------


def test_multilabel_rows_must_have_one_value_per_label(tmp_path: Path) -> None:
    path = npz(tmp_path / "chestmnist.npz", width=13)
    message = one_line_error(load_medmnist, path)
    assert message.startswith(f"{path}: train_labels: 12 of 12 rows have 13 labels, expected 14")
    assert "one per label of chestmnist" in message
    assert load_medmnist(npz(tmp_path / "ok" / "chestmnist.npz", width=14)).num_classes == 14


def test_a_single_label_flag_with_several_label_columns_is_an_error(tmp_path: Path) -> None:
    """breastmnist is multi-class: a (N, 2) label array is not read as two binary labels."""
    path = npz(tmp_path / "breastmnist.npz", width=2)
    message = one_line_error(load_medmnist, path)
    assert message.startswith(f"{path}: train_labels: 12 of 12 rows have 2 labels")
    assert "single-label" in message


# --- before anything is written ---------------------------------------------------------------


def test_medmerge_run_stops_before_making_the_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from medmerge_core.cli import main

    path = npz(tmp_path / "breast_copy.npz", train=nines())
    config = tmp_path / "run.yaml"
    config.write_text(
        f"name: bad\noutput_dir: {tmp_path / 'runs'}\n"
        f"data: {{format: medmnist, path: {path}}}\n"
        "sources: {a: 'random:1', b: 'random:2'}\nmodel: {arch: resnet18, image_size: 8}\n"
    )
    assert main(["run", str(config), "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}: train_labels: 5 of 12 rows" in err[0]
    assert not (tmp_path / "runs").exists()


# --- the catalog formats (folders, CSV, HAM10000, CheXpert, ...) ------------------------------


def catalog(labels: list, splits: list, classes: tuple[str, ...], multilabel=False) -> Catalog:
    records = tuple(
        Record(Path(f"/nowhere/{i}.png"), label, f"img{i}", f"img{i}", f"labels.csv row {i + 2}", s)
        for i, (label, s) in enumerate(zip(labels, splits, strict=True))
    )
    return Catalog("mydata", Path("/nowhere"), records, classes, multilabel)


def test_a_catalog_row_of_the_wrong_width_is_an_error_before_split_csv(tmp_path: Path) -> None:
    """Every catalog format goes through build_task: the check runs before a pixel is decoded
    or split.csv is written."""
    labels = [(1.0, 0.0), (0.0, 1.0), (1.0,), (1.0, 1.0), (0.0, 0.0)]
    splits = ["train", "train", "train", "val", "test"]
    _, opts = validate_spec({"format": "csv", "csv": tmp_path / "labels.csv"})
    with pytest.raises(InputError) as err:
        build_task(catalog(labels, splits, ("a", "b"), True), opts, 8, 0, tmp_path)
    assert str(err.value) == (
        "mydata: train split: 1 of 3 rows have 1 label, expected 2 (one per label of mydata) "
        "(first: labels.csv row 4)"
    )
    assert not (tmp_path / "split.csv").exists()


def test_a_catalog_class_without_training_rows_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Catalog labels were parsed against named classes, and official splits can be small (the
    official HAM10000 fixture of test_formats has 6 training images for 7 classes): a warning
    and a note, not an error. Decoding then fails here (no images), after the check."""
    labels, splits = [0, 0, 1, 0, 2, 2], ["train", "train", "train", "val", "test", "test"]
    _, opts = validate_spec({"format": "csv", "csv": tmp_path / "labels.csv"})
    with caplog.at_level(logging.WARNING), pytest.raises(InputError, match="not found"):
        build_task(catalog(labels, splits, ("cat", "dog", "bird")), opts, 8, 0, None)
    warned = [r.getMessage() for r in caplog.records if r.name == "medmerge_core.data.labels"]
    assert warned == [
        "mydata: test split: 2 of 2 rows have a class that no training row has: 2 ('bird'); "
        "a model cannot learn it (first: labels.csv row 6)"
    ]


def test_check_labels_names_the_first_bad_row() -> None:
    with pytest.raises(InputError) as err:
        check_labels(
            {"train": [0, 1, 5, 1], "val": [0, 1], "test": [1]},
            ("a", "b"),
            multilabel=False,
            where={"train": "f.csv: train split", "val": "v", "test": "t"},
            what="f",
            rows={"train": ["row 2", "row 3", "row 4", "row 5"], "val": [], "test": []},
        )
    assert str(err.value) == (
        "f.csv: train split: 1 of 4 rows have a label outside 0..1 (up to 5), but f has 2 "
        "classes ('a', 'b') (first: row 4)"
    )
