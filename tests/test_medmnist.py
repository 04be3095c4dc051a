"""MedMNIST .npz reader: tiny fixtures in the official layout, and every error path."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
from helpers import one_line_error

from medmerge_core.data.medmnist import (
    default_medmnist_roots,
    download_medmnist,
    load_medmnist,
    medmnist_filename,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "medmnist"
COUNTS = {"train": 6, "val": 3, "test": 4}


def arrays(size: int = 28, rgb: bool = False, width: int = 1, classes: int = 2) -> dict:
    """The six official keys; labels (N, width): class ids if width == 1, else 0/1 flags."""
    rng = np.random.default_rng(0)
    out = {}
    for split, n in COUNTS.items():
        shape = (n, size, size, 3) if rgb else (n, size, size)
        out[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        high = classes if width == 1 else 2
        out[f"{split}_labels"] = (np.arange(n * width) % high).reshape(n, width).astype(np.uint8)
    return out


def write(path: Path, **overrides: np.ndarray | None) -> Path:
    data = {**arrays(), **overrides}
    np.savez(path, **{k: v for k, v in data.items() if v is not None})
    return path


def test_grayscale_multiclass_by_flag_and_root(tmp_path: Path) -> None:
    write(tmp_path / "breastmnist.npz")
    task = load_medmnist("breastmnist", root=tmp_path)
    assert task.name == "breastmnist" and not task.multilabel
    assert task.class_names == ("malignant", "normal, benign")
    assert task.train.images.shape == (6, 28, 28) and task.in_channels == 1
    assert task.train.labels.dtype == np.int64 and task.train.labels.shape == (6,)
    assert task.train.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert [len(s) for s in task.splits().values()] == list(COUNTS.values())
    assert task.notes["path"] == str(tmp_path / "breastmnist.npz")


def test_rgb_images(tmp_path: Path) -> None:
    write(tmp_path / "dermamnist.npz", **arrays(rgb=True, classes=7))
    task = load_medmnist("dermamnist", root=tmp_path)
    assert task.train.images.shape == (6, 28, 28, 3) and task.in_channels == 3
    assert task.num_classes == 7 and task.class_names[4] == "melanoma"


def test_multilabel_labels(tmp_path: Path) -> None:
    write(tmp_path / "chestmnist.npz", **arrays(width=14))
    task = load_medmnist("chestmnist", root=tmp_path)
    assert task.multilabel and task.num_classes == 14
    assert task.train.labels.dtype == np.float32 and task.train.labels.shape == (6, 14)
    assert task.class_names[0] == "atelectasis" and task.class_names[-1] == "hernia"


def test_multilabel_keeps_nan_as_ignore(tmp_path: Path) -> None:
    data = arrays(width=3)
    labels = data["train_labels"].astype(np.float32)
    labels[0, 1] = np.nan
    path = write(tmp_path / "custom.npz", **{**data, "train_labels": labels})
    task = load_medmnist(path)
    assert np.isnan(task.train.labels[0, 1])
    assert task.class_names == ("class_0", "class_1", "class_2")


def test_size_64_naming_and_direct_path(tmp_path: Path) -> None:
    write(tmp_path / "pneumoniamnist_64.npz", **arrays(size=64))
    task = load_medmnist("pneumoniamnist", root=tmp_path, size=64)
    assert task.image_size == 64 and task.name == "pneumoniamnist"
    assert task.class_names == ("normal", "pneumonia")
    by_path = load_medmnist(str(tmp_path / "pneumoniamnist_64.npz"))
    assert by_path.name == "pneumoniamnist"
    assert np.array_equal(by_path.test.images, task.test.images)
    assert medmnist_filename("x", 28) == "x.npz" and medmnist_filename("x", 224) == "x_224.npz"
    message = one_line_error(load_medmnist, "pneumoniamnist", root=tmp_path, size=28)
    assert "pneumoniamnist.npz" in message and str(tmp_path) in message


def test_unknown_flag_and_flat_labels(tmp_path: Path) -> None:
    data = arrays(classes=3)
    flat = {k: (v[:, 0] if k.endswith("labels") else v) for k, v in data.items()}
    task = load_medmnist(write(tmp_path / "mystery.npz", **flat))
    assert task.class_names == ("class_0", "class_1", "class_2")
    assert task.train.labels.shape == (6,)


def test_default_roots_and_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    roots = default_medmnist_roots()
    assert roots[0] == tmp_path
    assert roots[-1] == tmp_path / "home" / ".medmnist"
    assert any(r.parts[-3:] == ("shared", "data", "medmnist") for r in roots)
    write(tmp_path / "octmnist.npz", **arrays(classes=4))
    assert load_medmnist("octmnist").num_classes == 4


def test_missing_files(tmp_path: Path) -> None:
    assert str(tmp_path / "nope.npz") in one_line_error(load_medmnist, tmp_path / "nope.npz")
    message = one_line_error(load_medmnist, "bloodmnist", root=tmp_path, size=128)
    assert "bloodmnist_128.npz" in message and "download" in message
    assert "size" in one_line_error(load_medmnist, "bloodmnist", root=tmp_path, size=32)


def test_missing_key(tmp_path: Path) -> None:
    path = write(tmp_path / "breastmnist.npz", val_labels=None)
    message = one_line_error(load_medmnist, path)
    assert "'val_labels'" in message and str(path) in message


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"train_images": np.zeros((6, 28, 28), np.float32)}, ["train_images", "uint8"]),
        ({"val_images": np.zeros((3, 28, 28, 2), np.uint8)}, ["val_images", "shape"]),
        ({"val_images": np.zeros((3, 28, 20), np.uint8)}, ["val_images", "shape"]),
        ({"test_images": np.zeros((0, 28, 28), np.uint8)}, ["test_images", "no images"]),
        ({"test_images": np.zeros((4, 32, 32), np.uint8)}, ["different image shapes"]),
        ({"train_labels": np.zeros((5, 1), np.uint8)}, ["train_labels", "5 labels for 6"]),
        ({"train_labels": np.zeros((6, 1, 1), np.uint8)}, ["train_labels", "shape"]),
        ({"train_labels": np.array([["a"]] * 6)}, ["train_labels", "numeric"]),
        ({"val_labels": np.zeros((3, 2), np.uint8)}, ["different label widths"]),
        ({"train_labels": np.full((6, 1), 0.5, np.float32)}, ["train_labels", "whole"]),
        ({"train_labels": np.full((6, 1), -1, np.int64)}, ["train_labels", "negative"]),
        ({"test_labels": np.full((4, 1), 2, np.uint8)}, ["up to 2", "2 classes"]),
    ],
)
def test_bad_arrays(tmp_path: Path, override: dict, words: list[str]) -> None:
    path = write(tmp_path / "breastmnist.npz", **override)
    message = one_line_error(load_medmnist, path)
    assert str(path) in message
    for word in words:
        assert word in message


def test_bad_multilabel_values(tmp_path: Path) -> None:
    data = arrays(width=3)
    data["val_labels"] = data["val_labels"] * 3
    message = one_line_error(load_medmnist, write(tmp_path / "multi.npz", **data))
    assert "val_labels" in message and "0, 1 or NaN" in message


def test_corrupt_and_unreadable_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive at all" * 10)
    assert "corrupt" in one_line_error(load_medmnist, garbage)

    truncated = write(tmp_path / "truncated.npz")
    truncated.write_bytes(truncated.read_bytes()[:2000])
    assert str(truncated) in one_line_error(load_medmnist, truncated)

    npy = tmp_path / "single.npz"
    with npy.open("wb") as handle:
        np.save(handle, np.zeros(3))
    assert "single .npy" in one_line_error(load_medmnist, npy)

    pickled = write(tmp_path / "pickled.npz", train_labels=np.array([None] * 6, dtype=object))
    assert str(pickled) in one_line_error(load_medmnist, pickled)


def test_download_without_the_package_explains_the_manual_route(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "medmnist", None)  # import medmnist -> ImportError
    message = one_line_error(download_medmnist, "breastmnist", 64, tmp_path)
    assert "breastmnist_64.npz" in message and "pip install medmnist" in message
    assert "zenodo" in message and str(tmp_path) in message


def fake_medmnist(fail: bool) -> types.ModuleType:
    """A stand-in for the medmnist package: writes the file, or fails like it does offline."""

    class BreastMNIST:
        def __init__(self, split: str, download: bool, root: str, size: int = 28) -> None:
            if fail:
                raise RuntimeError("Something went wrong when downloading!\nGo to the homepage")
            name = "breastmnist.npz" if size == 28 else f"breastmnist_{size}.npz"
            write(Path(root) / name, **arrays(size=size))

    module = types.ModuleType("medmnist")
    module.INFO = {"breastmnist": {"python_class": "BreastMNIST"}}
    module.BreastMNIST = BreastMNIST
    return module


def test_download_uses_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "medmnist", fake_medmnist(fail=False))
    path = download_medmnist("breastmnist", 64, tmp_path / "new")
    assert path == tmp_path / "new" / "breastmnist_64.npz"
    assert load_medmnist("breastmnist", root=tmp_path / "new", size=64).image_size == 64
    assert "unknown MedMNIST flag" in one_line_error(download_medmnist, "nosuchmnist", 28, tmp_path)


def test_download_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "medmnist", fake_medmnist(fail=True))
    message = one_line_error(download_medmnist, "breastmnist", 28, tmp_path)
    assert "download failed" in message and "breastmnist.npz" in message


def test_real_breastmnist_from_shared() -> None:
    path = SHARED / "breastmnist.npz"
    if not path.is_file():
        pytest.skip(f"real MedMNIST data not present at {path}")
    task = load_medmnist(path)
    assert [len(s) for s in task.splits().values()] == [546, 78, 156]
    assert np.bincount(task.train.labels).tolist() == [147, 399]
    assert task.image_size == 28 and task.in_channels == 1
