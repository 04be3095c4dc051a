"""Generic formats for users' own data: an image folder (one subfolder per class) and a CSV.

image_folder: root/<class>/**/<image>, or root/train|val|test/<class>/... for a fixed split
(a missing val/ is carved from train/). csv: one row per image with configurable path, label
(or several 0/1 label columns for multi-label), and optional split, group and id columns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medmerge_core.data.formats.common import (
    RECORD_SPLITS,
    Catalog,
    Option,
    Record,
    Table,
    class_index,
    display,
    list_images,
    read_table,
)
from medmerge_core.errors import InputError

FOLDER_SPLITS = ("train", "val", "test")
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

FOLDER_OPTIONS: Mapping[str, Option] = {}
CSV_OPTIONS: Mapping[str, Option] = {
    "csv": Option("path", required=True, doc="the label CSV"),
    "image_root": Option("path", doc="folder paths are relative to (default: the CSV's folder)"),
    "path_column": Option("str", "path"),
    "label_column": Option("str", "label", doc="one class label per row (multi-class)"),
    "label_columns": Option("str_list", doc="several 1/0/blank columns (multi-label)"),
    "classes": Option("str_list", doc="allowed labels, in class-index order"),
    "split_column": Option("str", doc="train / val / test per row (else a random split)"),
    "group_column": Option("str", doc="patient or lesion id: no group straddles splits"),
    "id_column": Option("str", doc="unique id per row (default: the path)"),
}


def load_folder(opts: Mapping[str, Any]) -> Catalog:
    root: Path = opts["root"]
    if not root.is_dir():
        raise InputError(f"{root}: image folder not found")
    fixed = (root / "train").is_dir() and (root / "test").is_dir()
    parts = (
        [(root / s, s) for s in FOLDER_SPLITS if (root / s).is_dir()] if fixed else [(root, None)]
    )
    if fixed and not (root / "val").is_dir():
        parts[0] = (root / "train", "trainval")
    classes = tuple(sorted({c.name for folder, _ in parts for c in _class_dirs(folder)}))
    if not classes:
        raise InputError(f"{root}: no class subfolders found")
    records = []
    for folder, split in parts:
        for class_dir in _class_dirs(folder):
            images = list(list_images(class_dir, recursive=True))
            if not images:
                raise InputError(f"{display(class_dir, root)}/: class folder has no images")
            label = classes.index(class_dir.name)
            for path in images:
                rel = display(path, root)
                records.append(Record(path, label, rel, rel, rel, split))
    how = "train/ val/ test/ folders" if fixed else "random"
    return Catalog(_name(root), root, tuple(records), classes, notes={"split": how})


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_csv(opts: Mapping[str, Any]) -> Catalog:
    csv_path: Path = opts["csv"]
    image_root: Path = opts["image_root"] or csv_path.parent
    multi: Sequence[str] | None = opts["label_columns"]
    label_cols = tuple(multi) if multi else (opts["label_column"],)
    optional = [opts[k] for k in ("split_column", "group_column", "id_column") if opts[k]]
    columns = (opts["path_column"], *label_cols, *optional)
    table = read_table(csv_path, columns, csv_path.parent)
    classes = tuple(multi) if multi else _classes(table, opts["label_column"], opts["classes"])
    records = []
    for n, row in table.rows:
        where = table.at(n)
        rel = row[opts["path_column"]]
        label: int | tuple[float, ...]
        if multi:
            label = tuple(_binary(row[c], c, where) for c in multi)
        else:
            label = class_index(row[opts["label_column"]], classes, where, opts["label_column"])
        ident = row[opts["id_column"]] if opts["id_column"] else rel
        group = row[opts["group_column"]] if opts["group_column"] else ""
        split = _split(row[opts["split_column"]], where) if opts["split_column"] else None
        records.append(Record(image_root / rel, label, ident, group or ident, where, split))
    notes = {"split": f"column '{opts['split_column']}'" if opts["split_column"] else "random"}
    return Catalog(
        _name(csv_path.parent), image_root, tuple(records), classes, bool(multi), notes=notes
    )


def _name(folder: Path) -> str:
    return f"{folder.resolve().name or 'data'}"


def _classes(table: Table, column: str, given: Sequence[str] | None) -> tuple[str, ...]:
    """The classes: as given, else the labels seen, numerically sorted when all are integers."""
    if given:
        return tuple(given)
    seen = {row[column] for _, row in table.rows} - {""}  # a blank label is reported per row
    if all(v.lstrip("-").isdigit() for v in seen):
        return tuple(sorted(seen, key=int))
    return tuple(sorted(seen))


def _binary(value: str, column: str, where: str) -> float:
    if value == "":
        return float("nan")
    if value in ("1", "1.0", "0", "0.0"):
        return float(value)
    raise InputError(
        f"{where}: unknown label value {value!r} in column '{column}'; expected 1, 0 or blank"
    )


def _split(value: str, where: str) -> str:
    split = SPLIT_NAMES.get(value.lower())
    if split is None or split not in RECORD_SPLITS:
        raise InputError(
            f"{where}: unknown split value {value!r}; expected one of train, val, test"
        )
    return split
