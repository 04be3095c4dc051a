"""RSNA Pneumonia: stage_2_train_labels.csv (one row per box) and one DICOM per patient.

A positive patient has one row per box, so rows are aggregated per patient: a patient with two
boxes is one positive image. Rows of one patient that disagree on Target, or a negative
patient listed twice, are errors rather than guesses.
"""

from __future__ import annotations

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
from medmerge_core.errors import InputError

CLASSES = ("negative", "pneumonia")
LABELS = "stage_2_train_labels.csv"
IMAGES = "stage_2_train_images"

OPTIONS: Mapping[str, Option] = {}


def load(opts: Mapping[str, Any]) -> Catalog:
    root: Path = opts["root"]
    table = read_table(find_file(root, LABELS), ("patientId", "Target"), root)
    index = ImageIndex([require_dir(root / IMAGES, "image")], root)
    first: dict[str, tuple[int, int]] = {}  # patientId -> (Target, row)
    boxes = 0
    for n, row in table.rows:
        patient = row["patientId"]
        target = parse_grade(row["Target"], 2, table.at(n), "Target")
        boxes += target
        if patient not in first:
            first[patient] = (target, n)
            continue
        seen, seen_row = first[patient]
        if seen != target:
            raise InputError(
                f"{table.at(n)}: patient {patient} has Target {target} but Target {seen} at "
                f"row {seen_row}"
            )
        if target == 0:
            raise InputError(
                f"{table.at(n)}: duplicate id {patient} (first at row {seen_row}); a negative "
                "patient has one row"
            )
    records = tuple(
        Record(
            index.path_or_expected(patient, ".dcm"),
            target,
            patient,
            patient,
            table.at(n),
            look_in=index.look_in,
        )
        for patient, (target, n) in first.items()
    )
    notes = {"split": "random", "label_rows": len(table.rows), "boxes": boxes}
    return Catalog("rsna", root, records, CLASSES, notes=notes)
