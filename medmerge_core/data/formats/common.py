"""What every dataset format shares: the record/catalog types, option specs, CSV reading with
column checks, image look-up by name and label parsing.

A format module only turns its on-disk layout into a Catalog (one Record per image, with label,
group and, where the dataset defines one, its official split); decoding, caching and splitting
are done once for all formats, so an error reads the same whichever dataset it comes from.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medmerge_core.errors import InputError

# Suffixes an image file may have; .dcm / .dicom are read with pydicom.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")
# Split names a record may carry: "trainval" means "official train+val pool, carve val from it".
RECORD_SPLITS = ("train", "val", "test", "trainval")


@dataclass(frozen=True)
class Record:
    """One labelled image. `where` locates it in the label file for one-line error messages."""

    path: Path
    label: int | tuple[float, ...]
    id: str
    group: str
    where: str
    split: str | None = None
    look_in: str = ""


@dataclass(frozen=True)
class Catalog:
    """Everything a format knows about a dataset before any pixel is decoded."""

    name: str
    root: Path
    records: tuple[Record, ...]
    class_names: tuple[str, ...]
    multilabel: bool = False
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    val_fraction: float = 0.1
    notes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Option:
    """One data-spec key: its kind (see registry._coerce), default and allowed values."""

    kind: str
    default: Any = None
    required: bool = False
    choices: tuple[str, ...] = ()
    doc: str = ""
    minimum: float | None = None


def display(path: Path, root: Path | None) -> str:
    """Path relative to the dataset root when possible: short, and what the user sees on disk."""
    if root is not None:
        try:
            return Path(os.path.relpath(path, root)).as_posix()
        except ValueError:
            pass
    return str(path)


@dataclass(frozen=True)
class Table:
    """A CSV read with its header checked; rows are (row number in the file, {column: value})."""

    path: Path
    name: str
    columns: tuple[str, ...]
    rows: tuple[tuple[int, dict[str, str]], ...]

    def at(self, row: int) -> str:
        return f"{self.name} row {row}"


def read_table(path: Path, required: Sequence[str], root: Path | None = None) -> Table:
    """Read a CSV, checking the header has every required column.

    Trailing empty fields are dropped from the header and from each row (NIH's
    Data_Entry_2017.csv ends every line with a comma); a row may be shorter than the header
    (missing trailing values read as blank) but may not carry extra non-empty fields.
    """
    name = display(path, root)
    if not path.is_file():
        raise InputError(f"{name}: file not found")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = _trim(next(reader, []))
        if not header:
            raise InputError(f"{name}: empty file, expected a header row")
        columns = tuple(c.strip() for c in header)
        for col in required:
            if col not in columns:
                raise InputError(f"{name}: missing column '{col}' (found: {', '.join(columns)})")
        rows = []
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue
            fields = _trim(fields)
            if len(fields) > len(columns):
                raise InputError(
                    f"{name} row {reader.line_num}: {len(fields)} fields but the header has "
                    f"{len(columns)}"
                )
            values = dict(zip(columns, (f.strip() for f in fields), strict=False))
            rows.append((reader.line_num, {c: values.get(c, "") for c in columns}))
    return Table(path, name, columns, tuple(rows))


def _trim(fields: list[str]) -> list[str]:
    end = len(fields)
    while end and not fields[end - 1].strip():
        end -= 1
    return fields[:end]


def find_file(root: Path, *candidates: str) -> Path:
    """The first candidate (relative to root) that exists, else an error listing them all."""
    for name in candidates:
        if (root / name).is_file():
            return root / name
    raise InputError(f"{root}: none of {', '.join(candidates)} found")


def optional_file(root: Path, *candidates: str) -> Path | None:
    """Like find_file, for files a layout may or may not include."""
    return next((root / n for n in candidates if (root / n).is_file()), None)


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise InputError(f"{path}: {what} folder not found")
    return path


class ImageIndex:
    """Image files under some folders, found by stem (name without suffix).

    Scanning each folder once (instead of one stat per CSV row) keeps 100k-image datasets
    fast, and lets a layout accept either of several folder names or suffixes.
    """

    def __init__(self, folders: Iterable[Path], root: Path, recursive: bool = False) -> None:
        self.folders = tuple(folders)
        self.root = root
        self._by_stem: dict[str, Path] = {}
        for folder in self.folders:
            for path in list_images(folder, recursive):
                self._by_stem.setdefault(path.stem, path)

    def __len__(self) -> int:
        return len(self._by_stem)

    @property
    def look_in(self) -> str:
        return " or ".join(display(f, self.root) + "/" for f in self.folders)

    def get(self, stem: str) -> Path | None:
        return self._by_stem.get(stem)

    def path_or_expected(self, stem: str, suffix: str) -> Path:
        """The indexed file, else where it would be (so the error names the expected file)."""
        found = self._by_stem.get(stem)
        if found is not None:
            return found
        folder = self.folders[0] if self.folders else self.root
        return folder / f"{stem}{suffix}"


def list_images(folder: Path, recursive: bool) -> Iterable[Path]:
    """Image files in a folder (sorted, so the order never depends on the file system)."""
    if not folder.is_dir():
        return
    if recursive:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(IMAGE_SUFFIXES):
                    yield Path(dirpath) / name
        return
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES):
            yield Path(entry.path)


def parse_grade(value: str, n_classes: int, where: str, column: str) -> int:
    """An integer class index 0..n-1 written as '3' or '3.0'; anything else is an error."""
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number.is_integer() or not 0 <= number < n_classes:
        raise InputError(
            f"{where}: unknown label value {value!r} in column '{column}'; expected an integer "
            f"0..{n_classes - 1}"
        )
    return int(number)


def parse_one_hot(row: Mapping[str, str], columns: Sequence[str], where: str) -> int:
    """Index of the single 1 among one-hot float columns (ISIC ground-truth files)."""
    hot = []
    for i, col in enumerate(columns):
        value = row[col]
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if number not in (0.0, 1.0):
            raise InputError(
                f"{where}: unknown label value {value!r} in column '{col}'; expected 0 or 1"
            )
        if number == 1.0:
            hot.append(i)
    if len(hot) != 1:
        got = ", ".join(columns[i] for i in hot) or "none"
        raise InputError(
            f"{where}: expected exactly one of {', '.join(columns)} to be 1, got {got}"
        )
    return hot[0]


def class_index(value: str, classes: Sequence[str], where: str, column: str) -> int:
    if value not in classes:
        raise InputError(
            f"{where}: unknown label value {value!r} in column '{column}'; expected one of "
            f"{', '.join(classes)}"
        )
    return list(classes).index(value)
