"""HAM10000: HAM10000_metadata.csv (7 or 8 columns) and two image folders.

The official split is ISIC 2018 Task 3: train = all of HAM10000 (10,015 images), val and test =
the ISIC2018_Task3_Validation / _Test ground truth and input folders (193 + 1,512 images; with
HAM that is the paper's 11,720). Without those files, a seeded random split grouped by lesion_id
is used, so two images of one lesion never straddle splits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medmerge_core.data.formats.common import (
    Catalog,
    ImageIndex,
    Option,
    Record,
    class_index,
    find_file,
    optional_file,
    parse_one_hot,
    read_table,
)
from medmerge_core.errors import InputError

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
# ISIC 2018 Task 3 ground-truth columns, in the file's order, and the HAM dx each one means.
ISIC2018_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
METADATA = ("HAM10000_metadata.csv", "HAM10000_metadata")
# Kaggle unzips to HAM10000_images_part_1/, the Dataverse zips are named ..._part1.
IMAGE_DIRS = re.compile(r"(?i)^ham10000_images_part_?[12]$")
OFFICIAL = {
    "val": ("ISIC2018_Task3_Validation_GroundTruth", "ISIC2018_Task3_Validation_Input"),
    "test": ("ISIC2018_Task3_Test_GroundTruth", "ISIC2018_Task3_Test_Input"),
}

OPTIONS: Mapping[str, Option] = {
    "split": Option(
        "choice",
        "auto",
        choices=("auto", "official", "random"),
        doc="official = ISIC 2018 Task 3 val/test files; auto = official when present",
    ),
}


def load(opts: Mapping[str, Any]) -> Catalog:
    root: Path = opts["root"]
    table = read_table(find_file(root, *METADATA), ("lesion_id", "image_id", "dx"), root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and IMAGE_DIRS.match(p.name))
    if not folders:
        raise InputError(
            f"{root}: no HAM10000_images_part_1/ or HAM10000_images_part_2/ folder found"
        )
    index = ImageIndex(folders, root)
    official = _official_files(root)
    mode = opts["split"]
    if mode == "official" and official is None:
        missing = ", ".join(f"{gt}.csv and {img}/" for gt, img in OFFICIAL.values())
        raise InputError(f"data.split: 'official' needs {missing} under {root}")
    use_official = official is not None and mode != "random"
    records = [
        Record(
            index.path_or_expected(row["image_id"], ".jpg"),
            class_index(row["dx"], CLASSES, table.at(n), "dx"),
            row["image_id"],
            row["lesion_id"] or row["image_id"],
            table.at(n),
            "train" if use_official else None,
            index.look_in,
        )
        for n, row in table.rows
    ]
    for split, (gt_csv, folder) in (official or {}).items() if use_official else ():
        records.extend(isic2018_records(gt_csv, folder, root, split))
    how = "official ISIC 2018 Task 3" if use_official else "random, grouped by lesion_id"
    return Catalog("ham10000", root, tuple(records), CLASSES, notes={"split": how})


def _official_files(root: Path) -> dict[str, tuple[Path, Path]] | None:
    """{split: (ground-truth CSV, image folder)}, or None unless both val and test are there.

    The CSV may sit in the root or in a folder of its own name (how the ISIC zip unpacks).
    """
    found = {}
    for split, (gt, images) in OFFICIAL.items():
        csv_path = optional_file(root, f"{gt}.csv", f"{gt}/{gt}.csv")
        if csv_path is None or not (root / images).is_dir():
            return None
        found[split] = (csv_path, root / images)
    return found


def isic2018_records(csv_path: Path, folder: Path, root: Path, split: str) -> list[Record]:
    table = read_table(csv_path, ("image", *ISIC2018_COLUMNS), root)
    index = ImageIndex([folder], root)
    to_ham = [CLASSES.index(c.lower()) for c in ISIC2018_COLUMNS]
    return [
        Record(
            index.path_or_expected(row["image"], ".jpg"),
            to_ham[parse_one_hot(row, ISIC2018_COLUMNS, table.at(n))],
            row["image"],
            row["image"],
            table.at(n),
            split,
            index.look_in,
        )
        for n, row in table.rows
    ]


def image_ids(path: Path) -> set[str]:
    """HAM10000 image ids, from the dataset folder or its metadata CSV (ISIC-2019 dedupe)."""
    csv_path = find_file(path, *METADATA) if path.is_dir() else path
    return {row["image_id"] for _, row in read_table(csv_path, ("image_id",)).rows}
