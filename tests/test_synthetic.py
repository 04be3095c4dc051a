"""The built-in synthetic tasks: deterministic, seed-sensitive, well-formed and balanced."""

from __future__ import annotations

import numpy as np
import pytest

from medmerge_core.data.synthetic import SYNTHETIC_TASKS, make_task, task_defaults
from medmerge_core.errors import InputError

SMALL = {"n_train": 40, "n_val": 12, "n_test": 16}


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)
def test_same_arguments_give_byte_identical_arrays(name: str) -> None:
    a = make_task(name, **SMALL, seed=3)
    b = make_task(name, **SMALL, seed=3)
    for split, other in zip(a.splits().values(), b.splits().values(), strict=True):
        assert split.images.tobytes() == other.images.tobytes()
        assert split.labels.tobytes() == other.labels.tobytes()
        assert list(split.ids) == list(other.ids)


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)
def test_a_different_seed_gives_different_images(name: str) -> None:
    a = make_task(name, **SMALL, seed=0).train.images
    b = make_task(name, **SMALL, seed=1).train.images
    same_rows = (a.reshape(len(a), -1) == b.reshape(len(b), -1)).all(axis=1)
    assert not same_rows.any()


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)
def test_shapes_dtypes_and_labels(name: str) -> None:
    task = make_task(name, **SMALL)
    assert task.name == name and not task.multilabel and task.in_channels == 1
    assert task.image_size == 64 and task.num_classes >= 2
    assert len(set(task.class_names)) == task.num_classes
    for split, n in zip(task.splits().values(), SMALL.values(), strict=True):
        assert split.images.shape == (n, 64, 64) and split.images.dtype == np.uint8
        assert split.labels.shape == (n,) and split.labels.dtype == np.int64
        assert split.labels.min() >= 0 and split.labels.max() < task.num_classes
    ids = np.concatenate([s.ids for s in task.splits().values()])
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)
def test_images_have_content_and_are_not_saturated(name: str) -> None:
    images = make_task(name, **SMALL).train.images.astype(np.float32)
    per_image_std = images.reshape(len(images), -1).std(axis=1)
    assert per_image_std.min() > 5.0
    assert ((images == 0) | (images == 255)).mean() < 0.05
    assert 40 < images.mean() < 200


def test_splits_come_from_disjoint_streams() -> None:
    task = make_task("target", n_train=64, n_val=64, n_test=64)
    rows = [s.images.reshape(len(s), -1) for s in task.splits().values()]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not (rows[i][:, None, :] == rows[j][None, :, :]).all(axis=2).any()
    assert not np.array_equal(task.train.labels, task.test.labels)


def test_a_smaller_split_is_a_prefix_of_a_larger_one() -> None:
    small = make_task("related_a", n_train=50, n_val=5, n_test=5)
    large = make_task("related_a", n_train=200, n_val=5, n_test=5)  # crosses a chunk boundary
    assert np.array_equal(small.train.images, large.train.images[:50])
    assert np.array_equal(small.train.labels, large.train.labels[:50])


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)
def test_classes_are_balanced(name: str) -> None:
    task = make_task(name, n_train=256, n_val=4, n_test=4)
    counts = np.bincount(task.train.labels, minlength=task.num_classes)
    expected = 256 / task.num_classes
    tolerance = 0.25 if task.notes["label_noise"] else 0.1  # noise moves a few labels
    assert np.all(np.abs(counts - expected) <= tolerance * expected + 1), counts


def test_target_defaults_are_small_and_sources_are_larger() -> None:
    target = make_task("target")
    assert [len(s) for s in target.splits().values()] == [300, 150, 300]
    assert 2 <= target.num_classes <= 3
    assert 0 < target.notes["label_noise"] < 0.2
    for name in ("generic", "related_a", "related_b"):
        assert task_defaults(name)["n_train"] >= 2000
    assert make_task("generic", **SMALL).num_classes > make_task("related_a", **SMALL).num_classes


@pytest.mark.parametrize("size", [16, 28, 96])
def test_image_size_parameter(size: int) -> None:
    task = make_task("related_b", **SMALL, image_size=size)
    assert task.train.images.shape == (SMALL["n_train"], size, size)
    assert task.train.images.reshape(SMALL["n_train"], -1).std(axis=1).min() > 3.0


def test_unknown_name_names_the_allowed_tasks() -> None:
    with pytest.raises(InputError) as err:
        make_task("imagenet")
    assert "imagenet" in str(err.value)
    assert all(name in str(err.value) for name in SYNTHETIC_TASKS)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_train", 0),
        ("n_val", -3),
        ("n_test", 2.5),
        ("n_train", True),
        ("image_size", 8),
        ("image_size", 1000),
        ("image_size", 64.0),
        ("seed", -1),
        ("seed", "0"),
    ],
)
def test_bad_arguments_raise_one_line_input_errors(field: str, value: object) -> None:
    with pytest.raises(InputError) as err:
        make_task("target", **{field: value})
    assert field in str(err.value) and "\n" not in str(err.value)
