"""APTOS 2019 and EyePACS (Kaggle DR): both a CSV of (image, grade 0..4) and one image folder.

Neither has an official labelled test set, so both use a seeded random 80/10/10 split. EyePACS
names images <patient>_left / <patient>_right, so its two eyes are grouped by patient; APTOS has
no patient ids and each image is its own group.
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
    find_file,
    parse_grade,
    read_table,
    require_dir,
)

CLASSES = ("No DR", "Mild", "Moderate", "Severe", "Proliferative DR")
EYE = re.compile(r"^(?P<patient>.+)_(left|right)$")

APTOS_OPTIONS: Mapping[str, Option] = {}
EYEPACS_OPTIONS: Mapping[str, Option] = {
    "include_test": Option(
        "bool",
        False,
        doc="also use retinopathy_solution.csv + test/ (35,126 + 53,576 = the paper's 88,702)",
    ),
}


def load_aptos(opts: Mapping[str, Any]) -> Catalog:
    root: Path = opts["root"]
    records = _graded(root, "train.csv", "id_code", "diagnosis", "train_images", ".png")
    return Catalog("aptos", root, tuple(records), CLASSES, notes={"split": "random"})


def load_eyepacs(opts: Mapping[str, Any]) -> Catalog:
    root: Path = opts["root"]
    records = _graded(root, "trainLabels.csv", "image", "level", "train", ".jpeg")
    if opts["include_test"]:
        records += _graded(root, "retinopathy_solution.csv", "image", "level", "test", ".jpeg")
    return Catalog(
        "eyepacs", root, tuple(records), CLASSES, notes={"split": "random, grouped by patient"}
    )


def _graded(
    root: Path, csv_name: str, id_col: str, grade_col: str, folder: str, suffix: str
) -> list[Record]:
    table = read_table(find_file(root, csv_name), (id_col, grade_col), root)
    index = ImageIndex([require_dir(root / folder, "image")], root)
    records = []
    for n, row in table.rows:
        image = row[id_col]
        eye = EYE.match(image)
        records.append(
            Record(
                index.path_or_expected(image, suffix),
                parse_grade(row[grade_col], len(CLASSES), table.at(n), grade_col),
                image,
                eye.group("patient") if eye else image,
                table.at(n),
                look_in=index.look_in,
            )
        )
    return records
