"""CheXpert v1.0(-small): train.csv / valid.csv, multi-label with uncertainty labels.

Values are 1.0, 0.0, -1.0 (uncertain) or blank (not mentioned). The policy maps -1 to 1
(U-Ones), 0 (U-Zeros) or NaN = ignored in the loss (U-Ignore); blank reads as 0 ("usually
negative"), or NaN with `blank: ignore`. The paper's 13 pathologies are the 14 observations
without "No Finding".

Official split: train.csv, valid.csv and, if the layout has one, a labelled test CSV. The
public small release has no test labels, so then valid.csv is the test set and the validation
set is carved from train.csv by patient (seeded), which the notes record.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medmerge_core.data.formats.common import (
    Catalog,
    Option,
    Record,
    Table,
    optional_file,
    read_table,
)
from medmerge_core.errors import InputError

OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
PATHOLOGIES = OBSERVATIONS[1:]
POLICIES = ("U-Ones", "U-Zeros", "U-Ignore")
UNCERTAIN = {"U-Ones": 1.0, "U-Zeros": 0.0, "U-Ignore": float("nan")}
PREFIX = re.compile(r"(?i)^chexpert-v1\.0(-small)?$")
PATIENT = re.compile(r"patient\d+")
TEST_CSVS = ("test_labels.csv", "test.csv")  # (unsure) names of a labelled test file

OPTIONS: Mapping[str, Option] = {
    "policy": Option("choice", "U-Ones", choices=POLICIES, doc="what an uncertain -1 becomes"),
    "blank": Option("choice", "zero", choices=("zero", "ignore"), doc="what a blank becomes"),
    "labels": Option("str_list", PATHOLOGIES, doc="observation columns to predict, in order"),
    "frontal_only": Option("bool", False, doc="keep only Frontal/Lateral == Frontal rows"),
    "val_fraction": Option("float", 0.1, doc="share of train.csv (by patient) used as val"),
}


def load(opts: Mapping[str, Any]) -> Catalog:
    base = _dataset_dir(opts["root"])
    labels = tuple(opts["labels"])
    for name in labels:
        if name not in OBSERVATIONS:
            raise InputError(
                f"data.labels: unknown observation {name!r}; expected names from "
                f"{', '.join(OBSERVATIONS)}"
            )
    test_csv = optional_file(base, *TEST_CSVS)
    parts = [("train.csv", "train" if test_csv else "trainval"), ("valid.csv", "val")]
    if test_csv is None:
        parts[1] = ("valid.csv", "test")
        how = "official train.csv / valid.csv (as test); val carved from train.csv by patient"
    else:
        parts.append((test_csv.name, "test"))
        how = f"official train.csv / valid.csv / {test_csv.name}"
    required = ("Path", *labels) + (("Frontal/Lateral",) if opts["frontal_only"] else ())
    records: list[Record] = []
    rows = 0
    for name, split in parts:
        table = read_table(base / name, required, base.parent)
        records += _records(table, base, labels, split, opts)
        rows += len(table.rows)
    notes = {"split": how, "policy": opts["policy"], "blank": opts["blank"]}
    if opts["frontal_only"]:
        notes["lateral_rows_left_out"] = rows - len(records)
    return Catalog(
        "chexpert",
        base,
        tuple(records),
        labels,
        multilabel=True,
        val_fraction=opts["val_fraction"],
        notes=notes,
    )


def _dataset_dir(root: Path) -> Path:
    """root may be the CheXpert-v1.0-small folder itself or the folder that holds it."""
    if (root / "train.csv").is_file():
        return root
    for child in sorted(root.iterdir()) if root.is_dir() else ():
        if PREFIX.match(child.name) and (child / "train.csv").is_file():
            return child
    raise InputError(f"{root}: no train.csv here or in a CheXpert-v1.0-small/ folder")


def _records(
    table: Table, base: Path, labels: Sequence[str], split: str, opts: Mapping[str, Any]
) -> list[Record]:
    uncertain = UNCERTAIN[opts["policy"]]
    blank = 0.0 if opts["blank"] == "zero" else float("nan")
    out = []
    for n, row in table.rows:
        where = table.at(n)
        if opts["frontal_only"] and row["Frontal/Lateral"] != "Frontal":
            continue
        target = tuple(_value(row[c], c, where, uncertain, blank) for c in labels)
        rel = Path(row["Path"])
        # Path starts with CheXpert-v1.0-small/: strip it and resolve inside the dataset folder.
        if rel.parts and PREFIX.match(rel.parts[0]):
            rel = Path(*rel.parts[1:])
        patient = PATIENT.search(row["Path"])
        out.append(
            Record(
                base / rel,
                target,
                row["Path"],
                patient.group(0) if patient else str(rel.parent),
                where,
                split,
            )
        )
    return out


def _value(value: str, column: str, where: str, uncertain: float, blank: float) -> float:
    if value == "":
        return blank
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if number == 1.0 or number == 0.0:
        return number
    if number == -1.0:
        return uncertain
    raise InputError(
        f"{where}: unknown label value {value!r} in column '{column}'; expected 1, 0, -1 or blank"
    )
