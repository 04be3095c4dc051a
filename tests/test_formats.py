"""Every dataset format loads its fixture layout, with one edge case per format."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from medmerge_core.data.registry import FORMAT_OPTIONS, FORMATS, load_task
from tests.test_data_fixtures import (
    NIH_ROWS,
    RSNA_PATIENTS,
    aptos_tree,
    chexpert_tree,
    csv_tree,
    eyepacs_tree,
    folder_tree,
    ham_tree,
    isic2019_tree,
    nih_tree,
    rsna_tree,
    write_image,
)

SIZE = 12


def where_is(task, ident: str) -> str:
    for name, split in task.splits().items():
        if ident in set(split.ids):
            return name
    raise AssertionError(f"{ident} in no split")


def all_ids(task) -> list[str]:
    return [i for split in task.splits().values() for i in split.ids]


def labels_by_id(task) -> dict[str, np.ndarray]:
    labels = np.concatenate([s.labels for s in task.splits().values()])
    return dict(zip(all_ids(task), labels, strict=True))


@pytest.mark.parametrize("eight", [False, True])
def test_ham10000_random_split_keeps_a_lesion_together(tmp_path: Path, eight: bool) -> None:
    root = ham_tree(tmp_path, eight_columns=eight)
    for seed in range(8):
        task = load_task({"format": "ham10000", "root": root}, image_size=SIZE, seed=seed)
        assert where_is(task, "ISIC_0000001") == where_is(task, "ISIC_0000002")
    assert sorted(all_ids(task)) == [f"ISIC_000000{i}" for i in range(1, 7)]
    assert task.class_names == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    assert task.train.images.shape[1:] == (SIZE, SIZE, 3)
    assert task.notes["split"] == "random, grouped by lesion_id"
    labels = labels_by_id(task)
    assert labels["ISIC_0000003"] == 4 and labels["ISIC_0000006"] == 6  # mel, vasc


def test_ham10000_official_isic2018_split(tmp_path: Path) -> None:
    root = ham_tree(tmp_path, official=True)
    task = load_task({"format": "ham10000", "root": root}, image_size=SIZE)
    assert len(task.train) == 6
    assert list(task.val.ids) == ["ISIC_0034321"] and list(task.val.labels) == [5]  # nv
    assert list(task.test.ids) == ["ISIC_0034524", "ISIC_0034525"]
    assert list(task.test.labels) == [4, 0]  # mel, akiec
    assert "official" in task.notes["split"]
    forced = load_task({"format": "ham10000", "root": root, "split": "random"}, image_size=SIZE)
    assert sorted(all_ids(forced)) == [f"ISIC_000000{i}" for i in range(1, 7)]  # HAM only


def test_isic2019_one_hot_groups_and_downsampled_names(tmp_path: Path) -> None:
    root = isic2019_tree(tmp_path)
    task = load_task({"format": "isic2019", "root": root}, image_size=SIZE)
    assert task.class_names == ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
    ids = all_ids(task)
    assert "ISIC_0000002" in ids  # the _downsampled file is found, id without the suffix
    labels = labels_by_id(task)
    assert labels["ISIC_0000002"] == 7 and labels["ISIC_0000000"] == 1
    for seed in range(6):
        task = load_task({"format": "isic2019", "root": root}, image_size=SIZE, seed=seed)
        assert where_is(task, "ISIC_0000000") == where_is(task, "ISIC_0000001")  # one lesion


def test_isic2019_dedupes_against_ham10000(tmp_path: Path) -> None:
    root = isic2019_tree(tmp_path / "isic")
    ham = ham_tree(tmp_path / "ham")  # ISIC_0000001..6
    spec = {"format": "isic2019", "root": root, "dedupe_ham10000": ham}
    task = load_task(spec, image_size=SIZE)
    assert sorted(all_ids(task)) == ["ISIC_0000000"]
    assert task.notes["deduplicated_ham10000"] == 4


def test_aptos_grades_and_rgb(tmp_path: Path) -> None:
    task = load_task({"format": "aptos", "root": aptos_tree(tmp_path)}, image_size=SIZE)
    assert task.num_classes == 5 and not task.multilabel
    labels = labels_by_id(task)
    assert labels == {
        "000c1434d8d7": 0,
        "001639a390f0": 1,
        "0024cdab0c1e": 2,
        "002c21358ce6": 3,
        "005b95c28852": 4,
    }
    assert task.in_channels == 3 and task.train.labels.dtype == np.int64


def test_eyepacs_groups_both_eyes_and_optional_test_labels(tmp_path: Path) -> None:
    root = eyepacs_tree(tmp_path, with_test=True)
    for seed in range(6):
        task = load_task({"format": "eyepacs", "root": root}, image_size=SIZE, seed=seed)
        assert where_is(task, "10_left") == where_is(task, "10_right")
        assert where_is(task, "13_left") == where_is(task, "13_right")
    assert len(all_ids(task)) == 5
    both = load_task({"format": "eyepacs", "root": root, "include_test": True}, image_size=SIZE)
    assert len(all_ids(both)) == 7 and where_is(both, "1_left") == where_is(both, "1_right")


@pytest.mark.parametrize(
    ("policy", "uncertain"), [("U-Ones", 1.0), ("U-Zeros", 0.0), ("U-Ignore", math.nan)]
)
def test_chexpert_uncertain_and_blank_under_each_policy(
    tmp_path: Path, policy: str, uncertain: float
) -> None:
    root = chexpert_tree(tmp_path)
    spec = {"format": "chexpert", "root": root, "policy": policy}
    task = load_task(spec, image_size=SIZE)
    assert task.multilabel and task.num_classes == 13 and "No Finding" not in task.class_names
    assert task.train.labels.dtype == np.float32
    row = all_ids(task).index("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg")
    labels = np.concatenate([s.labels for s in task.splits().values()])[row]
    names = list(task.class_names)
    got = labels[names.index("Cardiomegaly")]
    assert (math.isnan(got) and math.isnan(uncertain)) or got == uncertain  # the -1
    assert labels[names.index("Edema")] == 0.0  # the blank reads as 0 under every policy
    assert labels[names.index("Lung Opacity")] == 1.0
    ignore = load_task({**spec, "blank": "ignore"}, image_size=SIZE)
    row_labels = np.concatenate([s.labels for s in ignore.splits().values()])[row]
    assert math.isnan(row_labels[names.index("Edema")])
    assert row_labels[names.index("Consolidation")] == 0.0


def test_chexpert_prefix_roots_split_and_frontal_only(tmp_path: Path) -> None:
    root = chexpert_tree(tmp_path)
    outer = load_task({"format": "chexpert", "root": root}, image_size=SIZE)
    inner = load_task({"format": "chexpert", "root": root / "CheXpert-v1.0-small"}, image_size=SIZE)
    assert sorted(all_ids(outer)) == sorted(all_ids(inner))
    assert list(outer.test.ids) == [
        "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg"
    ]
    assert outer.in_channels == 1
    p1 = [where_is(outer, i) for i in all_ids(outer) if "patient00001" in i]
    assert len(set(p1)) == 1  # val is carved from train.csv by patient
    frontal = load_task(
        {"format": "chexpert", "root": root, "frontal_only": True, "labels": ["Edema", "Fracture"]},
        image_size=SIZE,
    )
    assert len(all_ids(frontal)) == 4 and frontal.class_names == ("Edema", "Fracture")
    assert frontal.notes["lateral_rows_left_out"] == 1


def test_rsna_patient_with_two_boxes_is_one_positive_dicom(tmp_path: Path) -> None:
    task = load_task({"format": "rsna", "root": rsna_tree(tmp_path)}, image_size=SIZE)
    ids = all_ids(task)
    assert sorted(ids) == sorted(RSNA_PATIENTS)  # 5 label rows, 4 patients
    labels = labels_by_id(task)
    assert labels[RSNA_PATIENTS[3]] == 1 and sum(labels.values()) == 1
    assert task.in_channels == 1 and task.notes["boxes"] == 2
    images = np.concatenate([s.images for s in task.splits().values()])
    assert images.dtype == np.uint8 and images.shape[1:] == (SIZE, SIZE)
    assert all(img.max() > 200 for img in images)  # uint16 DICOMs are scaled, not clipped


def test_nih_header_quirk_official_lists_and_labels(tmp_path: Path) -> None:
    task = load_task({"format": "nih", "root": nih_tree(tmp_path)}, image_size=SIZE)
    assert task.multilabel and task.num_classes == 14
    assert sorted(task.test.ids) == ["00000003_000.png", "00000004_000.png"]
    assert len(task.train) + len(task.val) == 3
    assert where_is(task, "00000001_000.png") == where_is(task, "00000001_001.png")
    labels = labels_by_id(task)
    names = list(task.class_names)
    assert labels["00000002_000.png"].sum() == 0  # No Finding
    hernia = labels["00000003_000.png"]
    assert hernia[names.index("Hernia")] == 1 and hernia[names.index("Infiltration")] == 1
    assert hernia.sum() == 2
    assert task.notes["split"].startswith("official")
    assert len(NIH_ROWS) == 5


def test_image_folder_random_and_fixed_splits(tmp_path: Path) -> None:
    flat = load_task(
        {"format": "image_folder", "root": folder_tree(tmp_path / "a")}, image_size=SIZE
    )
    assert flat.class_names == ("benign", "malignant") and len(all_ids(flat)) == 6
    fixed_root = tmp_path / "b"
    for split, n in (("train", 3), ("test", 2)):
        folder_tree(fixed_root / split, per_class=n)
    fixed = load_task({"format": "image_folder", "root": fixed_root}, image_size=SIZE)
    assert len(fixed.test) == 4 and len(fixed.train) + len(fixed.val) == 6
    assert all(i.startswith("test/") for i in fixed.test.ids)


def test_generic_csv_configurable_columns_split_and_groups(tmp_path: Path) -> None:
    root = csv_tree(tmp_path)
    spec = {
        "format": "csv",
        "csv": root / "labels.csv",
        "image_root": root / "imgs",
        "path_column": "file",
        "label_column": "kind",
        "group_column": "patient",
    }
    task = load_task(spec, image_size=SIZE)
    assert task.class_names == ("bird", "cat", "dog")
    assert sorted(all_ids(task)) == ["a.png", "b.png", "d.png", "e.png", "sub/c.png"]
    for seed in range(6):
        task = load_task(spec, image_size=SIZE, seed=seed)
        assert where_is(task, "a.png") == where_is(task, "b.png")  # patient p1


def test_generic_csv_split_column_and_multilabel(tmp_path: Path) -> None:
    lines = ["path,split,fever,cough", "a.png,train,1,0", "b.png,valid,0,", "c.png,test,1,1"]
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    for name in "abc":
        write_image(tmp_path / f"{name}.png")
    spec = {
        "format": "csv",
        "csv": tmp_path / "data.csv",
        "split_column": "split",
        "label_columns": ["fever", "cough"],
    }
    task = load_task(spec, image_size=SIZE)
    assert task.multilabel and task.class_names == ("fever", "cough")
    assert list(task.val.ids) == ["b.png"] and math.isnan(task.val.labels[0, 1])
    assert task.test.labels.tolist() == [[1.0, 1.0]]


def test_synthetic_and_medmnist_dispatch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple] = []
    fake = load_task({"format": "aptos", "root": aptos_tree(tmp_path)}, image_size=16)

    def make_task(name, **kw):
        calls.append(("synthetic", name, kw))
        return fake

    def load_medmnist(source, **kw):
        calls.append(("medmnist", source, kw))
        return fake

    monkeypatch.setitem(
        sys.modules, "medmerge_core.data.synthetic", types.SimpleNamespace(make_task=make_task)
    )
    monkeypatch.setitem(
        sys.modules,
        "medmerge_core.data.medmnist",
        types.SimpleNamespace(load_medmnist=load_medmnist),
    )
    task = load_task(
        {"format": "synthetic", "task": "target", "n_train": 8},
        image_size=16,
        seed=3,
        run_dir=tmp_path / "run",
    )
    assert task is fake and (tmp_path / "run" / "split.csv").is_file()
    assert calls[0] == (
        "synthetic",
        "target",
        {"image_size": 16, "seed": 3, "n_train": 8, "n_val": None, "n_test": None},
    )
    out = load_task({"format": "medmnist", "flag": "pneumoniamnist", "size": 64}, image_size=8)
    assert calls[1] == ("medmnist", "pneumoniamnist", {"root": None, "size": 64})
    assert out.image_size == 8


def test_format_options_cover_every_format() -> None:
    assert set(FORMATS) == {
        "synthetic",
        "medmnist",
        "ham10000",
        "isic2019",
        "aptos",
        "eyepacs",
        "chexpert",
        "rsna",
        "nih",
        "image_folder",
        "csv",
    }
    assert "policy" in FORMAT_OPTIONS["chexpert"] and "root" in FORMAT_OPTIONS["rsna"]
    assert FORMAT_OPTIONS["chexpert"]["policy"].choices == ("U-Ones", "U-Zeros", "U-Ignore")
