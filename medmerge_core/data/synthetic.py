"""Built-in synthetic tasks: the default data on a machine with no medical images and no internet.

The family mirrors the paper's setting (section 6 of the architecture notes, ../shared/DESIGN.md):
- ``generic``: shapes and fill patterns on varied backgrounds, the stand-in for ImageNet.
- ``related_a``: lesions in a tissue-like modality, labelled by margin (circumscribed vs
  spiculated) and size.
- ``related_b``: the same modality, labelled by internal texture (homogeneous vs heterogeneous)
  and intensity (hypo vs hyper).
- ``target``: a small task in the same modality whose label (benign / suspicious / malignant)
  counts the suspicious findings, spiculation and heterogeneity, so it needs what both related
  tasks teach. Its cues are fainter and 5% of its labels are flipped (reader disagreement), so
  no method saturates.

Every image is drawn from a seeded stream per (seed, task, split, chunk of 128 rows): splits
never share a stream, the same arguments give byte-identical arrays, and a smaller split is a
prefix of a larger one (nested subsets for learning curves). Rendering is vectorised per chunk:
FFT-filtered noise for textures and a per-image polar radius profile for lesion borders.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from medmerge_core.data.base import ArraySplit, TaskData
from medmerge_core.data.synthetic_shapes import (
    PixelGrid,
    as_column,
    bin_angles,
    border_spikes,
    border_wobble,
    centre_offsets,
    ellipse_radius,
    filtered_noise,
    outline_mask,
    pixel_grid,
    random_centres,
    soft_ramp,
)
from medmerge_core.errors import InputError

SYNTHETIC_TASKS: tuple[str, ...] = ("generic", "related_a", "related_b", "target")

_SPLITS = ("train", "val", "test")
_CHUNK = 128  # rows per seeded stream; labels are balanced within each chunk
_MIN_SIZE, _MAX_SIZE = 16, 512
_GENERIC_CLASSES = (
    "disk",
    "triangle",
    "square",
    "star",
    "cross",
    "ring",
    "crescent",
    "stripes",
    "checkerboard",
    "dots",
)


@dataclass(frozen=True)
class _Style:
    """Acquisition and attribute-strength ranges of one lesion task (min, max)."""

    contrast: tuple[float, float]  # lesion mean vs tissue, relative
    spicule: tuple[float, float]  # spicule length, relative to the lesion radius
    heterogeneity: tuple[float, float]  # internal texture gain of heterogeneous lesions
    speckle: tuple[float, float]  # multiplicative per-pixel noise
    hyper_rate: float  # share of hyper-intense lesions where intensity is not the label


@dataclass(frozen=True)
class _Spec:
    class_names: tuple[str, ...]
    sizes: tuple[int, int, int]
    description: str
    label_noise: float = 0.0
    style: _Style | None = None


_RELATED_STYLE = _Style(
    contrast=(0.18, 0.32),
    spicule=(0.9, 1.6),
    heterogeneity=(0.12, 0.20),
    speckle=(0.03, 0.07),
    hyper_rate=0.5,
)
_TARGET_STYLE = _Style(
    contrast=(0.14, 0.28),
    spicule=(0.6, 1.3),
    heterogeneity=(0.08, 0.17),
    speckle=(0.04, 0.09),
    hyper_rate=0.25,
)


def _spec(name: str) -> _Spec:
    """The fixed definition of each task (a function, so there is no mutable module state)."""
    if name == "generic":
        return _Spec(
            _GENERIC_CLASSES,
            (5000, 1000, 1000),
            "10 shape / fill-pattern classes on varied backgrounds (ImageNet stand-in)",
        )
    if name == "related_a":
        return _Spec(
            ("small_circumscribed", "small_spiculated", "large_circumscribed", "large_spiculated"),
            (3000, 600, 600),
            "tissue-like lesions labelled by margin x size; texture and intensity are nuisance",
            style=_RELATED_STYLE,
        )
    if name == "related_b":
        return _Spec(
            ("hypo_homogeneous", "hypo_heterogeneous", "hyper_homogeneous", "hyper_heterogeneous"),
            (3000, 600, 600),
            "tissue-like lesions labelled by intensity x internal texture; margin and size are "
            "nuisance",
            style=_RELATED_STYLE,
        )
    if name == "target":
        return _Spec(
            ("benign", "suspicious", "malignant"),
            (300, 150, 300),
            "small task: number of suspicious findings (spiculated margin, heterogeneous "
            "interior): 0 benign, 1 suspicious, 2 malignant; fainter cues, 5% label noise",
            label_noise=0.05,
            style=_TARGET_STYLE,
        )
    raise InputError(
        f"synthetic task: unknown name {name!r}; allowed: {', '.join(SYNTHETIC_TASKS)}"
    )


def _lesion_profile(
    rng: np.random.Generator, spiculated: np.ndarray, strength: tuple[float, float]
) -> np.ndarray:
    """Border radius per angle [B,BINS]: an ellipse with mild lobulation; thin spicules and
    micro-lobulation when spiculated."""
    b = len(spiculated)
    amp = rng.uniform(*strength, b) * spiculated
    shape = ellipse_radius(rng.uniform(0.65, 1.0, b), rng.uniform(0, np.pi, b))
    lobes = border_wobble(rng, b, range(2, 5), 0.06)
    micro = border_wobble(rng, b, range(5, 10), 0.04)
    return shape * (1.0 + lobes + amp[:, None] * (border_spikes(rng, b) + micro))


def _lesion_attributes(
    name: str, labels: np.ndarray, rng: np.random.Generator, style: _Style
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(spiculated, heterogeneous, hyper-intense, radius) per row, from each task's label rule."""
    b = len(labels)
    coin = rng.random((2, b))
    any_radius = rng.uniform(0.18, 0.42, b)
    if name == "related_a":
        spiculated, large = labels % 2 == 1, labels // 2 == 1
        heterogeneous, hyper = coin[0] < 0.5, coin[1] < style.hyper_rate
        radius = np.where(large, rng.uniform(0.32, 0.42, b), rng.uniform(0.18, 0.25, b))
    elif name == "related_b":
        heterogeneous, hyper = labels % 2 == 1, labels // 2 == 1
        spiculated, radius = coin[0] < 0.5, any_radius
    else:  # target: the label counts the suspicious findings
        which = coin[0] < 0.5
        spiculated = (labels == 2) | ((labels == 1) & which)
        heterogeneous = (labels == 2) | ((labels == 1) & ~which)
        hyper, radius = coin[1] < style.hyper_rate, any_radius
    return spiculated, heterogeneous, hyper, radius


def _render_lesions(
    name: str,
    labels: np.ndarray,
    rng: np.random.Generator,
    pixel_rng: np.random.Generator,
    n: int,
    grid: PixelGrid,
    style: _Style,
) -> np.ndarray:
    """Float images [n,S,S] in ~[0,1]: tissue texture, one lesion, vignette and speckle.

    Per-image parameters are drawn for the whole chunk (len(labels)) and then cut to n, so a
    shorter last chunk gives the same first images as a full one.
    """
    b = len(labels)
    spiculated, heterogeneous, hyper, radius = _lesion_attributes(name, labels, rng, style)
    profile = _lesion_profile(rng, spiculated, style.spicule)
    centres = random_centres(rng, b, grid.size)
    soft = rng.uniform(0.6, 1.2, b) * 2.0 / grid.size
    level, tissue_gain = rng.uniform(0.36, 0.52, b), rng.uniform(0.05, 0.10, b)
    contrast = rng.uniform(*style.contrast, b) * np.where(hyper, 1.0, -1.0)
    het_low = rng.uniform(0.0, 0.02, b)
    het_gain = np.where(heterogeneous, rng.uniform(*style.heterogeneity, b), het_low)
    speckle = rng.uniform(*style.speckle, b)

    tissue_f, texture_f, white = filtered_noise(pixel_rng, n, grid)
    mask, _ = outline_mask(profile[:n], radius[:n], soft[:n], centres[:, :n], grid)
    level_c, gain_c = as_column(level[:n]), as_column(tissue_gain[:n])
    tissue = level_c * (1.0 + gain_c * tissue_f)
    lesion = (level_c * as_column(1.0 + contrast[:n])) * (
        1.0 + as_column(het_gain[:n]) * texture_f + 0.3 * gain_c * tissue_f
    )
    image = tissue + mask * (lesion - tissue)
    return image * grid.vignette * (1.0 + as_column(speckle[:n]) * white)


def _generic_profiles(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Outline per angle [B,BINS] for the shape classes; pattern classes use a disk or square."""
    t = bin_angles()[None, :] - rng.uniform(0, 2 * np.pi, len(labels))[:, None]
    profile = ellipse_radius(
        rng.uniform(0.75, 1.0, len(labels)), rng.uniform(0, np.pi, len(labels))
    )
    for k, name in enumerate(_GENERIC_CLASSES):
        pick = labels == k
        tk = t[pick]
        if name in ("triangle", "square", "checkerboard"):
            sides = 3 if name == "triangle" else 4
            wedge = 2 * np.pi / sides
            profile[pick] = 0.9 / np.cos(np.mod(tk, wedge) - wedge / 2)
        elif name == "star":
            profile[pick] *= 0.45 + 0.75 * np.abs(np.cos(2.5 * tk)) ** 2
        elif name == "cross":
            c, s = np.abs(np.cos(tk)) + 1e-6, np.abs(np.sin(tk)) + 1e-6
            arms = np.maximum(np.minimum(1 / c, 0.32 / s), np.minimum(1 / s, 0.32 / c))
            profile[pick] = arms
    return profile


def _render_generic(
    labels: np.ndarray,
    rng: np.random.Generator,
    pixel_rng: np.random.Generator,
    n: int,
    grid: PixelGrid,
) -> np.ndarray:
    """Float images [n,S,S]: one shape or patterned object on a gradient / textured background."""
    b = len(labels)
    profile = _generic_profiles(labels, rng)
    centres = random_centres(rng, b, grid.size)
    radius, soft = rng.uniform(0.3, 0.6, b), rng.uniform(0.6, 1.2, b) * 2.0 / grid.size
    level, slope, tilt = rng.uniform(0.15, 0.85, b), rng.uniform(0, 0.35, b), rng.uniform(0, 7, b)
    bg_gain, noise_sd = rng.uniform(0, 0.1, (2, b)), rng.uniform(0, 0.03, b)
    delta = rng.uniform(0.25, 0.5, b) * np.where(rng.random(b) < 0.5, 1.0, -1.0)
    delta = np.where((level + delta > 0.95) | (level + delta < 0.05), -delta, delta)
    fill_mix, freq, angle = rng.uniform(0.5, 0.9, b), rng.uniform(3, 6, b), rng.uniform(0, 7, b)
    inner, shift, heading = (
        rng.uniform(0.5, 0.7, b),
        rng.uniform(0.35, 0.55, b),
        rng.uniform(0, 7, b),
    )

    tissue_f, texture_f, white = filtered_noise(pixel_rng, n, grid)
    labels = labels[:n]
    mask, r = outline_mask(profile[:n], radius[:n], soft[:n], centres[:, :n], grid)
    pattern = np.zeros_like(mask)
    for k, name in enumerate(_GENERIC_CLASSES):
        pick = np.flatnonzero(labels == k)
        if name in ("disk", "triangle", "square", "star", "cross") or len(pick) == 0:
            continue
        rad, sft = as_column(radius[pick]), as_column(soft[pick])
        u, v = centre_offsets(grid, centres[:, pick], angle[pick])
        wave = np.float32(np.pi) * as_column(freq[pick])
        if name == "ring":
            mask[pick] *= 1.0 - soft_ramp(rad * as_column(inner[pick]) - r[pick], sft)
        elif name == "crescent":
            d, h = rad * as_column(shift[pick]), heading[pick]
            r2 = np.hypot(u - d * as_column(np.cos(h)), v - d * as_column(np.sin(h)))
            mask[pick] *= 1.0 - soft_ramp(rad * 0.9 - r2, sft)
        elif name == "stripes":
            pattern[pick] = 0.5 + 0.5 * np.tanh(3.0 * np.sin(wave * u))
        elif name == "checkerboard":
            pattern[pick] = 0.5 + 0.5 * np.tanh(4.0 * np.sin(wave * u) * np.sin(wave * v))
        else:  # dots
            pattern[pick] = np.clip((np.cos(wave * u) * np.cos(wave * v) - 0.35) * 4.0, 0.0, 1.0)

    tilt, delta = tilt[:n], delta[:n]
    background = (
        as_column(level[:n])
        + as_column(slope[:n])
        * (grid.x * as_column(np.cos(tilt)) + grid.y * as_column(np.sin(tilt)))
        + as_column(bg_gain[0, :n]) * tissue_f
        + as_column(bg_gain[1, :n]) * texture_f
    )
    fill = as_column(level[:n] + delta) - pattern * as_column(delta * fill_mix[:n])
    image = background + mask * (fill - background)
    return image + as_column(noise_sd[:n]) * white


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(image * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)


def _chunk_rngs(
    seed: int, name: str, split: int, chunk: int
) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent streams for per-image parameters and for pixels, keyed by everything."""
    seq = np.random.SeedSequence([seed, zlib.crc32(name.encode()), split, chunk])
    params, pixels = seq.spawn(2)
    return np.random.default_rng(params), np.random.default_rng(pixels)


def _generate_split(
    name: str, spec: _Spec, split: int, n: int, grid: PixelGrid, seed: int
) -> ArraySplit:
    """One split, chunk by chunk; each chunk has its own streams (see the module docstring)."""
    size = grid.size
    k = len(spec.class_names)
    images = np.empty((n, size, size), np.uint8)
    labels = np.empty(n, np.int64)
    for chunk, start in enumerate(range(0, n, _CHUNK)):
        m = min(_CHUNK, n - start)
        rng, pixel_rng = _chunk_rngs(seed, name, split, chunk)
        clean = rng.permutation(np.arange(_CHUNK) % k)
        flip = rng.random(_CHUNK) < spec.label_noise
        noisy = np.where(flip, (clean + rng.integers(1, max(k, 2), _CHUNK)) % k, clean)
        if spec.style is None:
            image = _render_generic(clean, rng, pixel_rng, m, grid)
        else:
            image = _render_lesions(name, clean, rng, pixel_rng, m, grid, spec.style)
        images[start : start + m] = _to_uint8(image)
        labels[start : start + m] = noisy[:m]
    ids = np.array([f"{name}/{_SPLITS[split]}/{i:06d}" for i in range(n)])
    return ArraySplit(images, labels, ids=ids)


def _check_int(field: str, value: object, low: int, high: int | None = None) -> int:
    """A plain integer within bounds (bools and floats rejected), or a one-line InputError."""
    is_int = isinstance(value, int | np.integer) and not isinstance(value, bool)
    if not is_int or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InputError(f"{field}: expected an integer {bound}, got {value!r}")
    return int(value)


def make_task(
    name: str,
    *,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    image_size: int = 64,
    seed: int = 0,
) -> TaskData:
    """Generate one synthetic task (grayscale uint8), deterministic in all arguments.

    Sizes left as None use the task's defaults (see ``task_defaults``).
    """
    spec = _spec(name)  # an unknown name raises the InputError naming the allowed tasks
    grid = pixel_grid(_check_int("image_size", image_size, _MIN_SIZE, _MAX_SIZE))
    seed = _check_int("seed", seed, 0)
    requested = {"n_train": n_train, "n_val": n_val, "n_test": n_test}
    counts = [
        default if value is None else _check_int(field, value, 1)
        for (field, value), default in zip(requested.items(), spec.sizes, strict=True)
    ]
    splits = [_generate_split(name, spec, i, n, grid, seed) for i, n in enumerate(counts)]
    notes = {
        "source": "synthetic",
        "description": spec.description,
        "seed": seed,
        "label_noise": spec.label_noise,
        "modality": "generic" if spec.style is None else "synthetic-lesion",
    }
    return TaskData(name, *splits, class_names=spec.class_names, notes=notes)


def task_defaults(name: str) -> dict[str, int]:
    """Default split sizes of a task, e.g. for a CLI listing."""
    train, val, test = _spec(name).sizes
    return {"n_train": train, "n_val": val, "n_test": test}
