"""Reader for the official MedMNIST / MedMNIST+ .npz files (the real-data path of the demo).

The files are read with numpy directly rather than through the ``medmnist`` package, whose
dataset classes assert the official sample counts and would reject subsets and test fixtures.
Every problem with a file becomes a one-line InputError naming the file.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from medmerge_core.data.base import ArraySplit, TaskData
from medmerge_core.data.labels import check_labels
from medmerge_core.errors import InputError

MEDMNIST_SIZES: tuple[int, ...] = (28, 64, 128, 224)
MEDMNIST_HOMEPAGE = "https://github.com/MedMNIST/MedMNIST"
MEDMNIST_ZENODO = "https://zenodo.org/records/10519652"  # MedMNIST+ (v3): every size
_SPLITS = ("train", "val", "test")
_ORGAN = (
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
)
_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "pathmnist": (
        "adipose",
        "background",
        "debris",
        "lymphocytes",
        "mucus",
        "smooth muscle",
        "normal colon mucosa",
        "cancer-associated stroma",
        "colorectal adenocarcinoma epithelium",
    ),
    "chestmnist": (
        "atelectasis",
        "cardiomegaly",
        "effusion",
        "infiltration",
        "mass",
        "nodule",
        "pneumonia",
        "pneumothorax",
        "consolidation",
        "edema",
        "emphysema",
        "fibrosis",
        "pleural",
        "hernia",
    ),
    "dermamnist": (
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    ),
    "octmnist": ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
    "pneumoniamnist": ("normal", "pneumonia"),
    "retinamnist": ("grade 0", "grade 1", "grade 2", "grade 3", "grade 4"),
    "breastmnist": ("malignant", "normal, benign"),
    "bloodmnist": (
        "basophil",
        "eosinophil",
        "erythroblast",
        "immature granulocytes",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ),
    "tissuemnist": (
        "collecting duct, connecting tubule",
        "distal convoluted tubule",
        "glomerular endothelial cells",
        "interstitial endothelial cells",
        "leukocytes",
        "podocytes",
        "proximal tubule segments",
        "thick ascending limb",
    ),
    "organamnist": _ORGAN,
    "organcmnist": _ORGAN,
    "organsmnist": _ORGAN,
}
_MULTILABEL_FLAGS = frozenset({"chestmnist"})  # the others of the table: one class per image


def medmnist_class_names(flag: str, count: int) -> tuple[str, ...]:
    """Official class names of a flag, or "class_i" for flags this table does not know."""
    names = _CLASS_NAMES.get(flag.lower())
    return (
        names
        if names is not None and len(names) == count
        else tuple(f"class_{i}" for i in range(count))
    )


def medmnist_filename(flag: str, size: int = 28) -> str:
    """MedMNIST+ naming: ``flag.npz`` for 28x28 and ``flag_{size}.npz`` for larger sizes."""
    _check_size(size)
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def default_medmnist_roots() -> list[Path]:
    """Folders searched for a flag, in order: $MEDMNIST_ROOT (os.pathsep-separated), the
    workplace's ../shared/data/medmnist next to the repository, and ~/.medmnist (where the
    ``medmnist`` package downloads)."""
    roots = [Path(p).expanduser() for p in os.environ.get("MEDMNIST_ROOT", "").split(os.pathsep)]
    roots = [p for p in roots if str(p) not in ("", ".")]
    repo = Path(__file__).resolve().parents[2]
    roots.append(repo.parent / "shared" / "data" / "medmnist")
    roots.append(Path.home() / ".medmnist")
    return roots


def find_medmnist(flag: str, size: int = 28, root: str | Path | None = None) -> Path:
    """Path of ``flag`` at ``size`` in root (or the default roots); InputError if absent."""
    name = medmnist_filename(flag, size)
    roots = [Path(root).expanduser()] if root is not None else default_medmnist_roots()
    for folder in roots:
        if (folder / name).is_file():
            return folder / name
    searched = ", ".join(str(r) for r in roots)
    raise InputError(
        f"{name}: MedMNIST file not found in {searched}; get it with "
        f"download_medmnist({flag!r}, {size}, root) or from {MEDMNIST_ZENODO}"
    )


def load_medmnist(
    flag_or_path: str | Path, *, root: str | Path | None = None, size: int = 28
) -> TaskData:
    """Load a MedMNIST .npz as a TaskData.

    flag_or_path: a path to an .npz file (read as is; ``size`` is then ignored), or a flag such
    as "breastmnist", looked up as ``medmnist_filename(flag, size)`` in root or, when root is
    None, in ``default_medmnist_roots()``.
    Labels (N,1) give multi-class int64 [N]; (N,L) with L > 1 give multi-label float32 [N,L]
    (for a known flag, its own kind: chestmnist is multi-label, the others multi-class).
    The labels are checked against the classes (data.labels.check_labels): a label outside
    them, a row of the wrong width or a val/test class that the train split lacks is an error.
    """
    text = str(flag_or_path)
    if isinstance(flag_or_path, Path) or text.endswith(".npz") or os.sep in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise InputError(f"{path}: no such MedMNIST .npz file")
        flag = path.stem.lower()
        for s in MEDMNIST_SIZES[1:]:
            flag = flag.removesuffix(f"_{s}")
    else:
        flag = text.lower()
        path = find_medmnist(flag, size, root)
    arrays = _read_npz(path)
    images = {s: _check_images(path, s, arrays[f"{s}_images"]) for s in _SPLITS}
    shapes = {img.shape[1:] for img in images.values()}
    if len(shapes) != 1:
        raise InputError(f"{path}: splits have different image shapes {sorted(shapes)}")
    raw = {s: _check_labels(path, s, arrays[f"{s}_labels"], len(images[s])) for s in _SPLITS}
    labels, count = _task_labels(path, flag, raw)
    splits = {
        s: ArraySplit(
            images[s], labels[s], ids=np.array([f"{flag}/{s}/{i}" for i in range(len(images[s]))])
        )
        for s in _SPLITS
    }
    return TaskData(
        flag,
        splits["train"],
        splits["val"],
        splits["test"],
        class_names=medmnist_class_names(flag, count),
        multilabel=labels["train"].ndim == 2,
        notes={"source": "medmnist", "path": str(path), "flag": flag},
    )


def download_medmnist(flag: str, size: int = 28, root: str | Path | None = None) -> Path:
    """Download one MedMNIST file with the ``medmnist`` package (needs internet); return its path.

    root defaults to ~/.medmnist, the package's own default, which load_medmnist searches.
    """
    name = medmnist_filename(flag, size)
    folder = Path(root).expanduser() if root is not None else Path.home() / ".medmnist"
    manual = (
        f"download {name} from {MEDMNIST_ZENODO} (or {MEDMNIST_HOMEPAGE}) and put it in "
        f"{folder}, or set MEDMNIST_ROOT to its folder"
    )
    try:
        import medmnist
    except ImportError:
        raise InputError(
            f"{name}: the medmnist package is not installed (pip install medmnist); or {manual}"
        ) from None
    info = medmnist.INFO.get(flag)
    if info is None:
        raise InputError(f"flag: unknown MedMNIST flag {flag!r}; known: {', '.join(medmnist.INFO)}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        dataset_class = getattr(medmnist, info["python_class"])
        kwargs = {} if size == 28 else {"size": size}
        dataset_class(split="train", download=True, root=str(folder), **kwargs)
    except Exception as exc:  # the package raises bare RuntimeErrors (offline, no size support)
        raise InputError(f"{name}: download failed ({_one_line(exc)}); {manual}") from None
    path = folder / name
    if not path.is_file():
        raise InputError(f"{name}: the medmnist package did not write {path}; {manual}")
    return path


def _check_size(size: int) -> None:
    if size not in MEDMNIST_SIZES:
        raise InputError(f"size: expected one of {MEDMNIST_SIZES}, got {size!r}")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """All six arrays of the file, or an InputError naming the file and what is wrong."""
    keys = [f"{s}_{kind}" for s in _SPLITS for kind in ("images", "labels")]
    unreadable = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)
    try:
        npz = np.load(path, allow_pickle=False)
    except unreadable as exc:
        raise InputError(f"{path}: unreadable or corrupt .npz ({_one_line(exc)})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise InputError(f"{path}: expected an .npz archive, got a single .npy array")
    with npz:
        missing = [k for k in keys if k not in npz.files]
        if missing:
            have = ", ".join(npz.files) or "none"
            raise InputError(f"{path}: missing key {missing[0]!r} (has: {have})")
        try:
            return {k: npz[k] for k in keys}
        except unreadable as exc:
            raise InputError(f"{path}: unreadable or corrupt .npz ({_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_images(path: Path, split: str, images: np.ndarray) -> np.ndarray:
    key = f"{split}_images"
    if images.dtype != np.uint8:
        raise InputError(f"{path}: {key}: expected uint8 images, got {images.dtype}")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    rgb = images.ndim == 4 and images.shape[-1] == 3
    if not (images.ndim == 3 or rgb) or images.shape[1] != images.shape[2]:
        raise InputError(
            f"{path}: {key}: expected shape (N,S,S) or (N,S,S,3), got {tuple(images.shape)}"
        )
    if len(images) == 0:
        raise InputError(f"{path}: {key}: no images")
    return images


def _check_labels(path: Path, split: str, labels: np.ndarray, n: int) -> np.ndarray:
    """Labels as [N, L]; (N,) is accepted as (N, 1)."""
    key = f"{split}_labels"
    if labels.dtype.kind not in "uif" and labels.dtype != np.bool_:
        raise InputError(f"{path}: {key}: expected numeric labels, got {labels.dtype}")
    labels = labels[:, None] if labels.ndim == 1 else labels
    if labels.ndim != 2 or labels.shape[1] == 0:
        raise InputError(f"{path}: {key}: expected shape (N,) or (N,L), got {labels.shape}")
    if len(labels) != n:
        raise InputError(f"{path}: {key}: {len(labels)} labels for {n} images")
    return labels


def _task_labels(
    path: Path, flag: str, raw: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], int]:
    """Per-split labels (int64 [N], or float32 [N,L] for multi-label) and the number of classes
    (labels), checked against the flag's classes, or for an unknown flag against those of the
    val and test labels (`check_labels`)."""
    widths = {labels.shape[1] for labels in raw.values()}
    if len(widths) != 1:
        raise InputError(f"{path}: splits have different label widths {sorted(widths)}")
    known = _CLASS_NAMES.get(flag)
    multilabel = widths.pop() > 1 if known is None else flag in _MULTILABEL_FLAGS
    read = _multilabel if multilabel else _multiclass
    labels = {s: read(path, s, y) for s, y in raw.items()}
    checked = check_labels(
        labels,
        known,
        multilabel=multilabel,
        where={s: f"{path}: {s}_labels" for s in labels},
        what=flag if known is not None else path.name,
    )
    if not multilabel:
        labels = {s: y.reshape(len(y)) for s, y in labels.items()}  # width 1, checked
    return labels, checked.num_classes


def _multiclass(path: Path, split: str, labels: np.ndarray) -> np.ndarray:
    """int64 class ids, [N, 1] ([N, L] when a row has several values: check_labels says so)."""
    if labels.dtype.kind == "f" and not np.all(np.isfinite(labels) & (labels == np.round(labels))):
        raise InputError(f"{path}: {split}_labels: class labels must be whole numbers")
    if labels.min() < 0:
        raise InputError(f"{path}: {split}_labels: negative class label {labels.min()}")
    return labels.astype(np.int64)


def _multilabel(path: Path, split: str, labels: np.ndarray) -> np.ndarray:
    """float32 [N,L] of 0/1, NaN kept as "ignore"."""
    values = labels.astype(np.float32)
    known = values[~np.isnan(values)]
    if not np.all((known == 0) | (known == 1)):
        raise InputError(f"{path}: {split}_labels: multi-label values must be 0, 1 or NaN")
    return values
