"""ISIC 2019: one-hot ground truth, optional metadata with lesion_id, and one image folder.

UNK is all zero in the training set, so it is not a class here; a row marked UNK is reported
rather than trained on. HAM10000 images are also in ISIC 2019: `dedupe_ham10000` drops them by
image id (the count goes into the notes) so a HAM-pretrained source never sees target images.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medmerge_core.data.formats import ham10000
from medmerge_core.data.formats.common import (
    Catalog,
    ImageIndex,
    Option,
    Record,
    find_file,
    optional_file,
    parse_one_hot,
    read_table,
    require_dir,
)
from medmerge_core.errors import InputError

CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
METADATA = "ISIC_2019_Training_Metadata.csv"
IMAGES = "ISIC_2019_Training_Input"
SUFFIX = "_downsampled"

OPTIONS: Mapping[str, Option] = {
    "dedupe_ham10000": Option(
        "path", doc="HAM10000 folder or HAM10000_metadata.csv: drop its images by id"
    ),
}


def load(opts: Mapping[str, Any]) -> Catalog:
    root: Path = opts["root"]
    table = read_table(find_file(root, GROUND_TRUTH), ("image", *CLASSES), root)
    # Recursive: some copies unpack to ISIC_2019_Training_Input/ISIC_2019_Training_Input/.
    index = ImageIndex([require_dir(root / IMAGES, "image")], root, recursive=True)
    meta = optional_file(root, METADATA)
    lesions = _lesions(meta, root) if meta else {}
    drop = ham10000.image_ids(opts["dedupe_ham10000"]) if opts["dedupe_ham10000"] else set()
    records, dropped = [], 0
    for n, row in table.rows:
        where = table.at(n)
        if "UNK" in row and row["UNK"] not in ("", "0", "0.0"):
            raise InputError(
                f"{where}: unknown label value {row['UNK']!r} in column 'UNK'; UNK is not a "
                "training class in ISIC 2019"
            )
        image = row["image"]
        bare = image.removesuffix(SUFFIX)
        if bare in drop:
            dropped += 1
            continue
        path = index.get(image) or index.get(bare) or index.get(bare + SUFFIX)
        records.append(
            Record(
                path or root / IMAGES / f"{image}.jpg",
                parse_one_hot(row, CLASSES, where),
                bare,
                lesions.get(bare) or bare,
                where,
                look_in=index.look_in,
            )
        )
    notes: dict[str, Any] = {"split": "random, grouped by lesion_id"}
    if meta is None:
        notes["split"] = f"random, by image ({METADATA} not found, so no lesion_id)"
    if drop:
        notes["deduplicated_ham10000"] = dropped
    return Catalog(
        "isic2019", root, tuple(records), CLASSES, fractions=(0.6, 0.2, 0.2), notes=notes
    )


def _lesions(path: Path, root: Path) -> dict[str, str]:
    """image id -> lesion_id (which may be blank: the image is then its own group)."""
    table = read_table(path, ("image", "lesion_id"), root)
    return {row["image"].removesuffix(SUFFIX): row["lesion_id"] for _, row in table.rows}
