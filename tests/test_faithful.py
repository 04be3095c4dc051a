"""The faithful study's designs: disjoint hospitals, budgets that shrink validation too, CT organs
split by class, and pilot seeds that never become study seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medmerge_core.data.base import ArraySplit, TaskData
from medmerge_core.data.medmnist import load_medmnist
from simulations import faithful

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "medmnist"
needs_shared = pytest.mark.skipif(
    not (SHARED / "pneumoniamnist.npz").is_file(), reason="../shared/data/medmnist is absent"
)


def test_the_two_halves_are_disjoint_complete_and_stratified() -> None:
    labels = np.array([0] * 30 + [1] * 71)
    first, second = faithful.halves(labels)
    assert not set(first) & set(second) and len(first) + len(second) == len(labels)
    for c, n in ((0, 30), (1, 71)):
        assert abs(int((labels[first] == c).sum()) - n / 2) <= 1
    assert np.array_equal(faithful.halves(labels)[0], first)  # fixed for the whole study


def test_a_small_validation_share_keeps_its_floor_per_class() -> None:
    labels = np.array([0] * 40 + [1] * 400)
    rows = faithful._stratified(labels, 0.05, seed=3, floor=faithful.VAL_FLOOR)
    assert (labels[rows] == 0).sum() == faithful.VAL_FLOOR and (labels[rows] == 1).sum() == 20
    assert len(set(rows)) == len(rows)


def test_organs_keeps_and_relabels_only_the_named_classes() -> None:
    def split(labels):
        return ArraySplit(np.zeros((len(labels), 4, 4), np.uint8), np.array(labels))

    task = TaskData("o", split([0, 1, 2, 3, 4, 2]), split([2, 4]), split([3, 4, 0]),
                    tuple("abcde"))  # fmt: skip
    kept = faithful.organs(task, (4, 2))
    assert kept.train.labels.tolist() == [1, 0, 1] and kept.test.labels.tolist() == [0]
    assert kept.class_names == ("e", "c")
    assert set(faithful.S2_SOURCE_ORGANS).isdisjoint(faithful.S2_TARGET_ORGANS)
    assert sorted(faithful.S2_SOURCE_ORGANS + faithful.S2_TARGET_ORGANS) == list(range(11))


def test_pilot_seeds_are_refused_before_anything_runs(tmp_path, capsys) -> None:
    args = ["--design", "s1", "--data-root", str(tmp_path), "--out", str(tmp_path / "o"),
            "--seeds", "0", str(faithful.PILOT_SEEDS[0])]  # fmt: skip
    assert faithful.main(args) == 2
    assert "pilot" in capsys.readouterr().out and not (tmp_path / "o").exists()


@needs_shared
def test_s1_target_is_half_two_at_the_budget_with_the_official_test_set(tmp_path) -> None:
    study = faithful.Study("s1", SHARED, tmp_path, faithful.Protocol(budget=0.05))
    official = load_medmnist(SHARED / "pneumoniamnist.npz")
    target = load_medmnist(study.target_file(0))
    half_one, half_two = faithful.halves(official.train.labels)
    assert len(target.test) == len(official.test) == 624
    # every labelled image is one of half 2's (matched by bytes), none of half 1's
    seen = {img.tobytes() for img in official.train.images[half_one]}
    pool = {img.tobytes() for img in official.train.images[half_two]}
    train = [img.tobytes() for img in target.train.images]
    assert all(t in pool for t in train) and not any(t in seen - pool for t in train)
    expected = [round(0.05 * (official.train.labels[half_two] == c).sum()) for c in (0, 1)]
    assert np.bincount(target.train.labels).tolist() == expected
    assert np.bincount(target.val.labels).min() >= faithful.VAL_FLOOR
    assert len(target.val) < len(official.val) / 5  # validation shrinks with the budget
    other = load_medmnist(study.target_file(1))
    assert not np.array_equal(other.train.images, target.train.images)  # per seed


@needs_shared
def test_s2_target_has_only_the_organs_source_b_never_saw(tmp_path) -> None:
    if not (SHARED / "organamnist.npz").is_file():
        pytest.skip("organamnist.npz is absent")
    study = faithful.Study("s2", SHARED, tmp_path, faithful.Protocol(budget=0.005))
    target = load_medmnist(study.target_file(0))
    assert target.num_classes == len(faithful.S2_TARGET_ORGANS)
    assert len(target.test) == faithful.S2_TEST_IMAGES
    assert 90 <= len(target.train) <= 120
