"""One entry point from a config's `data:` mapping to a TaskData, for every format.

`load_task(spec, image_size=..., seed=..., run_dir=...)` validates the spec against
FORMAT_OPTIONS (unknown or ill-typed keys are one-line errors naming the key), reads the
format's label files into a Catalog, splits it (official, seeded grouped random, or a split
CSV from an earlier run), checks its labels against its classes (data.labels.check_labels, as
MedMNIST's reader does: before the label budget and before anything is written), decodes the
images once at image_size (through the cache when `cache_dir` is set) and writes split.csv /
skipped_images.csv into the run folder.

`label_budget` (every format) keeps a seeded, class-stratified fraction or count of the
TRAINING rows only (splits.label_budget_index, drawn with the data seed: the spec's `seed`, else
the run seed); val and test are never touched. split.csv still lists every row: training rows
left out are written with split `unused`, which `split_csv` reads back as "in no split", so a
repeated run trains on the same subset (a budget given together with `split_csv` is drawn
from that file's train rows). task.notes["label_budget"] records the budget, the seed and the
training count per class before and after (after skipping bad images, if any were).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from medmerge_core.data.base import ArraySplit, TaskData
from medmerge_core.data.cache import materialize
from medmerge_core.data.formats import aptos, chexpert, generic, ham10000, isic2019, nih, rsna
from medmerge_core.data.formats.common import Catalog, Option, Record
from medmerge_core.data.labels import check_labels
from medmerge_core.data.splits import (
    SPLIT_CSV,
    SPLITS,
    UNUSED,
    assign_splits,
    check_fractions,
    check_label_budget,
    label_budget_index,
    label_budget_notes,
    read_split_csv,
    write_split_csv,
)
from medmerge_core.errors import InputError

log = logging.getLogger(__name__)

SKIPPED_CSV = "skipped_images.csv"
LOADERS: Mapping[str, Callable[[Mapping[str, Any]], Catalog]] = {
    "ham10000": ham10000.load,
    "isic2019": isic2019.load,
    "aptos": aptos.load_aptos,
    "eyepacs": aptos.load_eyepacs,
    "chexpert": chexpert.load,
    "rsna": rsna.load,
    "nih": nih.load,
    "image_folder": generic.load_folder,
    "csv": generic.load_csv,
}
# Each modality fixes its colour (NIH ships a few RGBA PNGs among gray ones); the generic
# formats default to "auto": every file must already have the same mode, else an error.
DEFAULT_COLOR = {
    "ham10000": "rgb", "isic2019": "rgb", "aptos": "rgb", "eyepacs": "rgb",
    "chexpert": "gray", "rsna": "gray", "nih": "gray",
}  # fmt: skip
RANDOM_SPLIT = ("ham10000", "isic2019", "aptos", "eyepacs", "rsna", "image_folder", "csv")
LABEL_BUDGET = Option(
    "budget",
    doc="keep only this much of the train split, stratified by class, drawn with the data seed: "
    "a fraction in (0, 1] (e.g. 0.1) or an integer count (e.g. 50); val/test untouched",
)


def _common(fmt: str) -> dict[str, Option]:
    options = {} if fmt == "csv" else {"root": Option("path", required=True, doc="dataset folder")}
    options |= {
        "cache_dir": Option("path", doc="uint8 memmap cache folder (default: decode in memory)"),
        "color": Option(
            "choice", DEFAULT_COLOR.get(fmt, "auto"), choices=("gray", "rgb", "auto"),
            doc="convert every image to gray or rgb; auto = keep, and refuse a mix",
        ),
        "skip_bad_images": Option("bool", False, doc="skip (and list) undecodable images"),
        "split_csv": Option("path", doc="split.csv from an earlier run: repeat its split"),
        "seed": Option("int", minimum=0, doc="split seed (default: the run seed)"),
        "workers": Option("int", min(8, os.cpu_count() or 1), minimum=1, doc="decode threads"),
        "label_budget": LABEL_BUDGET,
    }  # fmt: skip
    if fmt in RANDOM_SPLIT:
        options["fractions"] = Option("fractions", doc="train/val/test, e.g. [0.8, 0.1, 0.1]")
    return options


_SPECIFIC: Mapping[str, Mapping[str, Option]] = {
    "ham10000": ham10000.OPTIONS,
    "isic2019": isic2019.OPTIONS,
    "aptos": aptos.APTOS_OPTIONS,
    "eyepacs": aptos.EYEPACS_OPTIONS,
    "chexpert": chexpert.OPTIONS,
    "rsna": rsna.OPTIONS,
    "nih": nih.OPTIONS,
    "image_folder": generic.FOLDER_OPTIONS,
    "csv": generic.CSV_OPTIONS,
}
FORMAT_OPTIONS: Mapping[str, Mapping[str, Option]] = {
    "synthetic": {
        "task": Option("str", required=True, doc="a name from synthetic.SYNTHETIC_TASKS"),
        "seed": Option("int", minimum=0, doc="data seed (default: the run seed)"),
        "n_train": Option("int", minimum=1),
        "n_val": Option("int", minimum=1),
        "n_test": Option("int", minimum=1),
        "label_budget": LABEL_BUDGET,
    },
    "medmnist": {
        "flag": Option("str", doc="e.g. pneumoniamnist (give flag or path)"),
        "path": Option("path", doc="a .npz file (give flag or path)"),
        "root": Option("path", doc="folder with <flag>[_<size>].npz (default ~/.medmnist)"),
        "size": Option("int", 28, doc="28, 64, 128 or 224: which file to read"),
        "label_budget": LABEL_BUDGET,
    },
    **{fmt: {**_common(fmt), **specific} for fmt, specific in _SPECIFIC.items()},
}
FORMATS = tuple(FORMAT_OPTIONS)


def load_task(
    spec: Mapping[str, Any], *, image_size: int, seed: int = 0, run_dir: Path | None = None
) -> TaskData:
    """The task a data spec names, resized to image_size (see the module docstring)."""
    fmt, opts = validate_spec(spec)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise InputError(f"image_size: expected a positive integer, got {image_size!r}")
    data_seed = _or(opts.get("seed"), seed)  # medmnist has no `seed` key: the run seed
    if fmt == "synthetic":
        from medmerge_core.data.synthetic import make_task

        task = make_task(
            opts["task"], image_size=image_size, seed=data_seed,
            n_train=opts["n_train"], n_val=opts["n_val"], n_test=opts["n_test"],
        )  # fmt: skip
    elif fmt == "medmnist":
        task = _medmnist(opts).resized(image_size)
    else:
        return build_task(LOADERS[fmt](opts), opts, image_size, data_seed, run_dir)
    unused = None
    if opts["label_budget"] is not None:
        task, unused = _budget_fixed(task, opts["label_budget"], data_seed)
    if run_dir is not None:
        _write_fixed_split(task, Path(run_dir) / SPLIT_CSV, unused)
    return task


def validate_spec(spec: Mapping[str, Any], where: str = "data") -> tuple[str, dict[str, Any]]:
    """(format, options with defaults filled), or a one-line InputError naming the key."""
    if not isinstance(spec, Mapping):
        raise InputError(f"{where}: expected a mapping with a 'format' key, got {spec!r}")
    fmt = spec.get("format")
    if fmt not in FORMAT_OPTIONS:
        raise InputError(
            f"{where}.format: unknown value {fmt!r}; expected one of {', '.join(FORMATS)}"
        )
    table = FORMAT_OPTIONS[fmt]
    for key in spec:
        if key != "format" and key not in table:
            raise InputError(
                f"{where}.{key}: unknown option for format '{fmt}'; expected one of "
                f"{', '.join(table)}"
            )
    opts = {key: _coerce(f"{where}.{key}", spec.get(key), opt, fmt) for key, opt in table.items()}
    return fmt, opts


def _coerce(key: str, value: Any, opt: Option, fmt: str) -> Any:
    if value is None:
        if opt.required:
            raise InputError(f"{key}: required for format '{fmt}'")
        if opt.default is None:
            return None
        value = opt.default
    kind = opt.kind
    ok = {
        "path": isinstance(value, str | os.PathLike) and str(value) != "",
        "str": isinstance(value, str) and value != "",
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "fractions": isinstance(value, list | tuple),
        "str_list": isinstance(value, list | tuple) and len(value) > 0
        and all(isinstance(v, str) for v in value),
        "choice": isinstance(value, str),
        "budget": True,  # check_label_budget gives the error
    }[kind]  # fmt: skip
    if not ok:
        raise InputError(f"{key}: expected {_KIND_TEXT[kind]}, got {value!r}")
    if opt.minimum is not None and kind in ("int", "float") and value < opt.minimum:
        raise InputError(f"{key}: expected a value >= {opt.minimum}, got {value!r}")
    if kind == "path":
        return Path(value).expanduser().absolute()  # cache keys must not depend on the cwd
    if kind == "fractions":
        return check_fractions(value, key)
    if kind == "budget":
        return check_label_budget(value, key)
    if kind == "choice":
        match = {c.lower(): c for c in opt.choices}.get(value.lower())
        if match is None:
            raise InputError(
                f"{key}: unknown value {value!r}; expected one of {', '.join(opt.choices)}"
            )
        return None if match == "auto" else match
    return tuple(value) if kind == "str_list" else value


_KIND_TEXT = {
    "path": "a path", "str": "a non-empty string", "bool": "true or false",
    "int": "an integer", "float": "a number", "fractions": "a list of three fractions",
    "str_list": "a non-empty list of strings", "choice": "a string",
    "budget": "a fraction in (0, 1] or an integer count >= 1",
}  # fmt: skip


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _medmnist(opts: Mapping[str, Any]) -> TaskData:
    if (opts["flag"] is None) == (opts["path"] is None):
        raise InputError("data.flag: give exactly one of data.flag or data.path for medmnist")
    if opts["size"] not in (28, 64, 128, 224):
        raise InputError(f"data.size: unknown value {opts['size']!r}; expected 28, 64, 128, 224")
    from medmerge_core.data.medmnist import load_medmnist

    source = opts["flag"] if opts["flag"] is not None else opts["path"]
    return load_medmnist(source, root=opts["root"], size=opts["size"])


def build_task(
    catalog: Catalog, opts: Mapping[str, Any], image_size: int, seed: int,
    run_dir: Path | None,
) -> TaskData:  # fmt: skip
    """Split a catalog, decode its images and assemble the TaskData (with notes)."""
    records = catalog.records
    _check_unique(records)
    if not 0.0 <= catalog.val_fraction < 1.0:
        raise InputError(f"data.val_fraction: expected 0 <= value < 1, got {catalog.val_fraction}")
    ids = [r.id for r in records]
    if opts["split_csv"] is not None:
        final = read_split_csv(opts["split_csv"], ids, [r.where for r in records])
        how = f"from {opts['split_csv']}"
    else:
        fractions = opts.get("fractions") or catalog.fractions
        final = assign_splits(
            [r.group for r in records], [r.split for r in records], fractions,
            catalog.val_fraction, seed,
        )  # fmt: skip
        how = catalog.notes.get("split", "random")
    without_training_rows = _check_catalog_labels(catalog, final)
    budget = opts.get("label_budget")
    if budget is not None:  # before decoding: a small budget decodes only the kept images
        train = [i for i, f in enumerate(final) if f == "train"]
        before = _labels([records[i].label for i in train], catalog)
        keep = label_budget_index(before, budget, seed)
        for j in np.setdiff1d(np.arange(len(train)), keep):
            final[train[j]] = UNUSED
    if run_dir is not None:
        texts = [_label_text(r.label, catalog.class_names, catalog.multilabel) for r in records]
        write_split_csv(Path(run_dir) / SPLIT_CSV, ids, [r.group for r in records], final, texts)
    rows = {s: np.asarray([i for i, f in enumerate(final) if f == s], np.int64) for s in SPLITS}
    made = materialize(
        {s: [records[i] for i in rows[s]] for s in SPLITS},
        size=image_size, color=opts["color"], root=catalog.root, dataset=catalog.name,
        cache_dir=opts["cache_dir"], skip_bad=opts["skip_bad_images"], workers=opts["workers"],
    )  # fmt: skip
    notes: dict[str, Any] = {
        **catalog.notes, "format": catalog.name, "root": str(catalog.root), "split": how,
        "seed": seed, "color": made.mode, "cache": made.status,
    }  # fmt: skip
    if without_training_rows:
        notes["classes_without_training_rows"] = without_training_rows
    if opts["skip_bad_images"] or made.skipped:
        _report_skipped(made.skipped, run_dir, notes)
    splits = {}
    for s in SPLITS:
        pick = rows[s][made.kept[s]]
        splits[s] = ArraySplit(
            made.images[s],
            _labels([records[i].label for i in pick], catalog),
            np.asarray([ids[i] for i in pick], dtype=str),
            np.asarray([records[i].group for i in pick], dtype=str),
        )
    if budget is not None:  # after skipping, so the counts are those trained on
        notes["label_budget"] = label_budget_notes(
            budget, seed, before, splits["train"].labels, catalog.class_names
        )
    if "deduplicated_ham10000" in notes:
        log.warning("%s: left out %d images also in HAM10000", catalog.name,
                    notes["deduplicated_ham10000"])  # fmt: skip
    return TaskData(catalog.name, splits["train"], splits["val"], splits["test"],
                    catalog.class_names, catalog.multilabel, notes)  # fmt: skip


def _check_catalog_labels(catalog: Catalog, final: list[str]) -> list[str]:
    """`check_labels` on the splits as assigned, before a label budget and before split.csv:
    training rows that an earlier budget left `unused` count as training rows. A val/test class
    without training rows is warned about (see data.labels); its names are returned."""
    chosen = {s: [i for i, f in enumerate(final) if f == s] for s in SPLITS}
    chosen["train"] += [i for i, f in enumerate(final) if f == UNUSED]
    records = catalog.records
    checked = check_labels(
        {s: [records[i].label for i in index] for s, index in chosen.items()},
        catalog.class_names,
        multilabel=catalog.multilabel,
        where={s: f"{catalog.name}: {s} split" for s in SPLITS},
        what=catalog.name,
        rows={s: [records[i].where for i in index] for s, index in chosen.items()},
        missing_from_train="warn",
    )
    return [catalog.class_names[c] for c in checked.without_training_rows]


def _check_unique(records: tuple[Record, ...]) -> None:
    first: dict[str, str] = {}
    for record in records:
        if record.id in first:
            raise InputError(
                f"{record.where}: duplicate id {record.id} (first at {first[record.id]})"
            )
        first[record.id] = record.where


def _labels(values: list[Any], catalog: Catalog) -> np.ndarray:
    if catalog.multilabel:
        return np.asarray(values, np.float32).reshape(len(values), len(catalog.class_names))
    return np.asarray(values, np.int64).reshape(len(values))


def _label_text(label: Any, class_names: tuple[str, ...], multilabel: bool) -> str:
    """The label column of split.csv: a class name, or 1/0/nan per label joined with ';'."""
    if multilabel:
        return ";".join("nan" if v != v else str(int(v)) for v in label)
    return class_names[int(label)]


def _report_skipped(skipped: Any, run_dir: Path | None, notes: dict[str, Any]) -> None:
    """Skipped images are counted, logged and listed: never dropped silently."""
    notes["skipped_images"] = len(skipped)
    notes["skipped_files"] = [(s.file, s.reason) for s in skipped]
    if skipped:
        log.warning("skipped %d bad images (first: %s)", len(skipped), skipped[0].message)
    if run_dir is not None:
        path = Path(run_dir) / SKIPPED_CSV
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(("file", "reason"))
            writer.writerows((s.file, s.reason) for s in skipped)
        notes["skipped_images_csv"] = str(path)


def _budget_fixed(task: TaskData, budget: float | int, seed: int) -> tuple[TaskData, ArraySplit]:
    """The task with its train split cut to the budget, and the train rows left out."""
    train = task.train
    if train.ids is None:  # name rows by their index in the full split, as split.csv does
        train = replace(train, ids=np.asarray([f"train-{i}" for i in range(len(train))], str))
    keep = label_budget_index(train.labels, budget, seed)
    left = np.setdiff1d(np.arange(len(train)), keep)
    kept = train.subset(keep)
    notes = dict(task.notes)
    notes["label_budget"] = label_budget_notes(
        budget, seed, train.labels, kept.labels, task.class_names
    )
    return replace(task, train=kept, notes=notes), train.subset(left)


def _write_fixed_split(task: TaskData, path: Path, unused: ArraySplit | None = None) -> None:
    """split.csv for tasks whose split is fixed by the source (synthetic, MedMNIST); training
    rows left out by a label budget are listed with split `unused`."""
    ids, groups, names, texts = [], [], [], []
    parts = dict(task.splits())
    if unused is not None:
        parts[UNUSED] = unused
    for name, split in parts.items():
        n = len(split)
        row_ids = (
            [str(i) for i in split.ids]
            if split.ids is not None
            else [f"{name}-{i}" for i in range(n)]
        )
        ids += row_ids
        groups += [str(g) for g in split.groups] if split.groups is not None else row_ids
        names += [name] * n
        texts += [_label_text(v, task.class_names, task.multilabel) for v in split.labels]
    write_split_csv(path, ids, groups, names, texts)
