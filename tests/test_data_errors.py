"""Every bad-input path is one InputError line that names the file (and row, for CSVs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medmerge_core.data.registry import load_task
from medmerge_core.errors import InputError
from tests.test_data_fixtures import (
    aptos_tree,
    chexpert_tree,
    csv_tree,
    eyepacs_tree,
    folder_tree,
    ham_tree,
    isic2019_tree,
    nih_tree,
    rsna_tree,
    write_csv,
    write_image,
)


def fails(spec: dict, match: str) -> str:
    with pytest.raises(InputError, match=match) as err:
        load_task(spec, image_size=8)
    message = str(err.value)
    assert "\n" not in message
    return message


def edit_line(path: Path, line: int, old: str, new: str) -> None:
    lines = path.read_text().splitlines()
    assert old in lines[line - 1]
    lines[line - 1] = lines[line - 1].replace(old, new)
    path.write_text("\n".join(lines) + "\n")


def test_missing_image_named_in_csv(tmp_path: Path) -> None:
    root = ham_tree(tmp_path)
    (root / "HAM10000_images_part_1" / "ISIC_0000002.jpg").unlink()
    fails(
        {"format": "ham10000", "root": root},
        r"^HAM10000_metadata.csv row 3: image ISIC_0000002.jpg not found in "
        r"HAM10000_images_part_1/ or HAM10000_images_part_2/$",
    )


def test_missing_dicom(tmp_path: Path) -> None:
    root = rsna_tree(tmp_path)
    next((root / "stage_2_train_images").glob("0031*.dcm")).unlink()
    fails({"format": "rsna", "root": root}, r"stage_2_train_labels.csv row 3: image 0031.*\.dcm")


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_corrupt_or_truncated_image(tmp_path: Path, damage: str) -> None:
    root = eyepacs_tree(tmp_path)
    path = root / "train" / "13_left.jpeg"
    data = path.read_bytes()
    path.write_bytes(b"garbage" * 20 if damage == "garbage" else data[: len(data) // 2])
    fails(
        {"format": "eyepacs", "root": root},
        r"^trainLabels.csv row 4: image 13_left.jpeg is corrupt or truncated \(",
    )


def test_corrupt_dicom(tmp_path: Path) -> None:
    root = rsna_tree(tmp_path)
    path = next((root / "stage_2_train_images").glob("0004*.dcm"))
    path.write_bytes(path.read_bytes()[:200])
    fails({"format": "rsna", "root": root}, r"row 2: image 0004.*\.dcm is corrupt or truncated")


@pytest.mark.parametrize(
    ("tree", "fmt", "file", "line", "old", "new", "match"),
    [
        (
            ham_tree,
            "ham10000",
            "HAM10000_metadata.csv",
            4,
            ",mel,",
            ",melanoma,",
            r"HAM10000_metadata.csv row 4: unknown label value 'melanoma' in column 'dx'",
        ),
        (aptos_tree, "aptos", "train.csv", 3, ",1", ",7", r"train.csv row 3: .*'7'.*diagnosis"),
        (eyepacs_tree, "eyepacs", "trainLabels.csv", 2, ",0", ",x", r"row 2: .*'x'.*level"),
        (
            isic2019_tree,
            "isic2019",
            "ISIC_2019_Training_GroundTruth.csv",
            2,
            "0.0,1.0,0.0",
            "1.0,1.0,0.0",
            r"GroundTruth.csv row 2: expected exactly one of MEL",
        ),
        (
            isic2019_tree,
            "isic2019",
            "ISIC_2019_Training_GroundTruth.csv",
            3,
            "0.0\n",
            "0.5",
            r"row 3: unknown label value '0.5'",
        ),
        (
            rsna_tree,
            "rsna",
            "stage_2_train_labels.csv",
            2,
            ",0",
            ",2",
            r"stage_2_train_labels.csv row 2: unknown label value '2' in column 'Target'",
        ),
        (
            nih_tree,
            "nih",
            "Data_Entry_2017.csv",
            3,
            "Emphysema",
            "Flu",
            r"Data_Entry_2017.csv row 3: unknown label value 'Flu' in column 'Finding Labels'",
        ),
        (
            chexpert_tree,
            "chexpert",
            "CheXpert-v1.0-small/train.csv",
            2,
            "-1.0",
            "2.0",
            r"CheXpert-v1.0-small/train.csv row 2: unknown label value '2.0' in column "
            r"'Cardiomegaly'",
        ),
    ],
)
def test_unknown_label_value(tmp_path, tree, fmt, file, line, old, new, match) -> None:
    root = tree(tmp_path)
    if old.endswith("\n"):  # the last cell of the line
        lines = (root / file).read_text().splitlines()
        lines[line - 1] = lines[line - 1].rsplit(",", 1)[0] + "," + new
        (root / file).write_text("\n".join(lines) + "\n")
    else:
        edit_line(root / file, line, old, new)
    fails({"format": fmt, "root": root}, match)


def test_unknown_label_in_generic_csv(tmp_path: Path) -> None:
    root = csv_tree(tmp_path)
    spec = {
        "format": "csv",
        "csv": root / "labels.csv",
        "image_root": root / "imgs",
        "path_column": "file",
        "label_column": "kind",
        "classes": ["cat", "dog"],
    }
    fails(spec, r"^labels.csv row 6: unknown label value 'bird' in column 'kind'")


def test_duplicated_ids(tmp_path: Path) -> None:
    root = aptos_tree(tmp_path / "aptos")
    with open(root / "train.csv", "a") as handle:
        handle.write("0024cdab0c1e,1\n")
    fails(
        {"format": "aptos", "root": root},
        r"^train.csv row 7: duplicate id 0024cdab0c1e \(first at train.csv row 4\)$",
    )
    root = rsna_tree(tmp_path / "rsna")
    with open(root / "stage_2_train_labels.csv", "a") as handle:
        handle.write("0004cfab-14fd-4e49-80ba-63a80b6bddd6,,,,,0\n")
    fails({"format": "rsna", "root": root}, r"row 7: duplicate id 0004cfab.*first at row 2")
    root = nih_tree(tmp_path / "nih")
    with open(root / "test_list.txt", "a") as handle:
        handle.write("00000001_000.png\n")
    fails({"format": "nih", "root": root}, r"^test_list.txt row 3: duplicate id 00000001_000.png")


def test_rsna_rows_of_one_patient_disagree(tmp_path: Path) -> None:
    root = rsna_tree(tmp_path)
    with open(root / "stage_2_train_labels.csv", "a") as handle:
        handle.write("00436515-870c-4b36-a041-de91049b9ab4,,,,,0\n")
    fails({"format": "rsna", "root": root}, r"row 7: patient 00436515.* Target 0 but Target 1")


@pytest.mark.parametrize(
    ("tree", "fmt", "file", "column"),
    [
        (ham_tree, "ham10000", "HAM10000_metadata.csv", "dx"),
        (aptos_tree, "aptos", "train.csv", "diagnosis"),
        (rsna_tree, "rsna", "stage_2_train_labels.csv", "Target"),
        (nih_tree, "nih", "Data_Entry_2017.csv", "Patient ID"),
        (chexpert_tree, "chexpert", "CheXpert-v1.0-small/train.csv", "Edema"),
        (isic2019_tree, "isic2019", "ISIC_2019_Training_Metadata.csv", "lesion_id"),
    ],
)
def test_csv_missing_expected_column(tmp_path, tree, fmt, file, column) -> None:
    root = tree(tmp_path)
    edit_line(root / file, 1, column, column.upper() + "_renamed")
    message = fails({"format": fmt, "root": root}, rf"^{file}: missing column '{column}'")
    assert "found:" in message


def test_folder_mixing_gray_and_rgb_needs_an_explicit_color(tmp_path: Path) -> None:
    root = folder_tree(tmp_path)
    write_image(root / "malignant" / "malignant_9.png", mode="L")
    fails(
        {"format": "image_folder", "root": root, "fractions": [1, 0, 0]},
        r"^malignant/malignant_9.png: grayscale image, but benign/benign_0.png is RGB; .*"
        r"set data.color to gray or rgb",
    )
    for color, channels in (("gray", 1), ("rgb", 3)):
        task = load_task({"format": "image_folder", "root": root, "color": color}, image_size=8)
        assert task.in_channels == channels and task.notes["color"] == color


def test_nih_image_in_neither_list_and_missing_list(tmp_path: Path) -> None:
    root = nih_tree(tmp_path)
    lines = (root / "test_list.txt").read_text().splitlines()
    (root / "test_list.txt").write_text(lines[0] + "\n")
    fails(
        {"format": "nih", "root": root},
        r"^Data_Entry_2017.csv row 6: image 00000004_000.png is in neither",
    )
    (root / "test_list.txt").unlink()
    fails({"format": "nih", "root": root}, r"none of test_list.txt found")


def test_nih_row_with_extra_fields(tmp_path: Path) -> None:
    root = nih_tree(tmp_path)
    edit_line(root / "Data_Entry_2017.csv", 4, "2749,", "2749,9,")
    fails(
        {"format": "nih", "root": root},
        r"^Data_Entry_2017.csv row 4: 12 fields but the header has 11$",
    )


def test_missing_label_file_and_folders(tmp_path: Path) -> None:
    fails({"format": "aptos", "root": tmp_path}, r"none of train.csv found")
    write_csv(tmp_path / "HAM10000_metadata.csv", ["lesion_id,image_id,dx"])
    fails({"format": "ham10000", "root": tmp_path}, r"no HAM10000_images_part_1/")
    fails({"format": "chexpert", "root": tmp_path}, r"no train.csv here")
    fails({"format": "image_folder", "root": tmp_path / "nope"}, r"image folder not found")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    fails({"format": "image_folder", "root": tmp_path / "empty"}, r"cls/: class folder has no")


def test_ham_official_split_requested_but_missing(tmp_path: Path) -> None:
    fails(
        {"format": "ham10000", "root": ham_tree(tmp_path), "split": "official"},
        r"^data.split: 'official' needs ISIC2018_Task3_Validation_GroundTruth.csv",
    )


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"format": "tiff"}, r"^data.format: unknown value 'tiff'; expected one of synthetic"),
        ({"root": "x"}, r"^data.format: unknown value None"),
        (
            {"format": "chexpert", "root": "x", "policy": "U-Twos"},
            r"^data.policy: unknown value 'U-Twos'; expected one of U-Ones, U-Zeros, U-Ignore$",
        ),
        (
            {"format": "aptos", "root": "x", "polciy": "U-Ones"},
            r"^data.polciy: unknown option for format 'aptos'; expected one of root",
        ),
        ({"format": "aptos"}, r"^data.root: required for format 'aptos'$"),
        (
            {"format": "aptos", "root": "x", "skip_bad_images": "yes"},
            r"^data.skip_bad_images: expected true or false, got 'yes'$",
        ),
        ({"format": "aptos", "root": 3}, r"^data.root: expected a path, got 3$"),
        (
            {"format": "aptos", "root": "x", "fractions": [0.5, 0.5, 0.5]},
            r"^data.fractions: expected three non-negative",
        ),
        (
            {"format": "aptos", "root": "x", "fractions": ["a", 0, 1]},
            r"^data.fractions: expected three non-negative",
        ),
        ({"format": "aptos", "root": "x", "workers": 0}, r"^data.workers: expected a value >= 1"),
        ({"format": "aptos", "root": "x", "color": "sepia"}, r"^data.color: unknown value"),
        (
            {"format": "nih", "root": "x", "fractions": [0.8, 0.1, 0.1]},
            r"^data.fractions: unknown option for format 'nih'",
        ),
        ({"format": "medmnist"}, r"^data.flag: give exactly one of data.flag or data.path"),
        ({"format": "medmnist", "flag": "x", "size": 32}, r"^data.size: unknown value 32"),
        ({"format": "synthetic"}, r"^data.task: required for format 'synthetic'$"),
        (
            {"format": "csv", "csv": "x", "label_columns": "a"},
            r"^data.label_columns: expected a non-empty list of strings",
        ),
        ("aptos", r"^data: expected a mapping"),
    ],
)
def test_spec_validation(spec, match: str) -> None:
    fails(spec, match)


def test_chexpert_unknown_observation_and_bad_val_fraction(tmp_path: Path) -> None:
    root = chexpert_tree(tmp_path)
    fails(
        {"format": "chexpert", "root": root, "labels": ["Edema", "Flu"]},
        r"^data.labels: unknown observation 'Flu'",
    )
    fails(
        {"format": "chexpert", "root": root, "val_fraction": 1.5},
        r"^data.val_fraction: expected 0 <= value < 1",
    )


def test_all_images_bad_with_skip_is_still_an_error(tmp_path: Path) -> None:
    root = aptos_tree(tmp_path)
    for path in (root / "train_images").iterdir():
        path.write_bytes(b"junk")
    fails(
        {"format": "aptos", "root": root, "skip_bad_images": True},
        r"split: all \d images are bad \(first: train.csv row",
    )


def test_image_size_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="image_size"):
        load_task({"format": "aptos", "root": aptos_tree(tmp_path)}, image_size=0)
