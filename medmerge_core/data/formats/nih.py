"""NIH ChestX-ray14: Data_Entry_2017.csv, the official image lists and PNGs in images*/ folders.

The header's unquoted `OriginalImage[Width,Height]` makes 11 columns and the 2017 file ends
every line with a comma; read_table drops trailing empty fields and only the three named
columns used here are looked up, so both quirks (and the v2020 file) read alike.
The official split is train_val_list.txt / test_list.txt (patient-disjoint); val is carved
from train_val by patient with a seeded split. An image in neither list is an error.
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
    read_table,
)
from medmerge_core.errors import InputError

FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
ENTRIES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
LISTS = (("train_val_list.txt", "trainval"), ("test_list.txt", "test"))
COLUMNS = ("Image Index", "Finding Labels", "Patient ID")

OPTIONS: Mapping[str, Option] = {
    "val_fraction": Option("float", 0.1, doc="share of train_val_list (by patient) used as val"),
}


def load(opts: Mapping[str, Any]) -> Catalog:
    root: Path = opts["root"]
    table = read_table(find_file(root, *ENTRIES), COLUMNS, root)
    split_of = _official_lists(root)
    # Images sit in images/ or images_00N/images/: search the whole root once.
    index = ImageIndex([root], root, recursive=True)
    records = []
    for n, row in table.rows:
        where, image = table.at(n), row["Image Index"]
        if image not in split_of:
            raise InputError(
                f"{where}: image {image} is in neither train_val_list.txt nor test_list.txt"
            )
        stem = image.rsplit(".", 1)[0]
        records.append(
            Record(
                index.path_or_expected(stem, ".png"),
                _targets(row["Finding Labels"], where),
                image,
                row["Patient ID"] or image,
                where,
                split_of[image],
                "images*/ under " + str(root),
            )
        )
    return Catalog(
        "nih",
        root,
        tuple(records),
        FINDINGS,
        multilabel=True,
        val_fraction=opts["val_fraction"],
        notes={"split": "official train_val_list / test_list; val carved by patient"},
    )


def _official_lists(root: Path) -> dict[str, str]:
    split_of: dict[str, str] = {}
    for name, split in LISTS:
        path = find_file(root, name)
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            image = line.strip()
            if not image:
                continue
            if image in split_of:
                raise InputError(f"{name} row {n}: duplicate id {image} (already listed)")
            split_of[image] = split
    return split_of


def _targets(value: str, where: str) -> tuple[float, ...]:
    found = set()
    for name in value.split("|"):
        name = name.strip()
        if name == NO_FINDING:
            continue
        if name not in FINDINGS:
            raise InputError(
                f"{where}: unknown label value {name!r} in column 'Finding Labels'; expected "
                f"'|'-separated names from {', '.join(FINDINGS)} or {NO_FINDING}"
            )
        found.add(name)
    return tuple(1.0 if f in found else 0.0 for f in FINDINGS)
