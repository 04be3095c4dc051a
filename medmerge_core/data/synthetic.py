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
from medmerge_core.errors import InputError

SYNTHETIC_TASKS: tuple[str, ...] = ("generic", "related_a", "related_b", "target")

_SPLITS = ("train", "val", "test")
_CHUNK = 128  # rows per seeded stream; labels are balanced within each chunk
_BINS = 512  # angular samples of a border profile (sub-pixel at 64x64)
_MIN_SIZE, _MAX_SIZE = 16, 512
_GENERIC_CLASSES = (
    "disk", "triangle", "square", "star", "cross",
    "ring", "crescent", "stripes", "checkerboard", "dots",
)  # fmt: skip


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


@dataclass(frozen=True)
class _Grid:
    """Per-size lookup tables, so rendering a chunk needs gathers, not trigonometry per pixel.

    Object centres sit on pixel centres, so every pixel's offset from a centre is an integer
    vector and its radius and angle bin can be sliced out of one table of offsets.
    """

    size: int
    x: np.ndarray  # [1, 1, S] pixel-centre coordinates in [-1, 1]
    y: np.ndarray  # [1, S, 1]
    radius: np.ndarray  # [2S-1, 2S-1] distance of an offset, in [-1, 1] units
    angle_bin: np.ndarray  # [2S-1, 2S-1] int32 angle bin (of _BINS) of an offset
    band: int  # highest spatial frequency (cycles per image) of the two noise fields
    filters: np.ndarray  # [2, 2F+1, F+1] amplitude spectra: tissue (1/f^1.5) and texture (band)
    vignette: np.ndarray  # [S, S]


def _grid(size: int) -> _Grid:
    """Spectra are defined in cycles per image, so textures look the same at every size."""
    axis = ((np.arange(size) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    offsets = np.arange(-(size - 1), size)
    dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
    angle = np.arctan2(dy, dx)
    angle_bin = np.floor((angle + np.pi) / (2 * np.pi) * _BINS).astype(np.int32) % _BINS
    band = min(16, (size - 1) // 2)
    fy = np.r_[0 : band + 1, -band:0]
    f = np.hypot(fy[:, None], np.arange(band + 1)[None, :])
    filters = np.stack([1.0 / (f + 1.5) ** 1.5, np.exp(-((f - 9.0) ** 2) / (2 * 3.5**2))])
    filters[:, 0, 0] = 0.0  # no DC: the level is set explicitly
    # Unit variance of irfft2 output: column 0 counts once, the others twice (as +-f pairs).
    power = (filters[:, :, 0] ** 2).sum(axis=1) + 4 * (filters[:, :, 1:] ** 2).sum(axis=(1, 2))
    filters *= (size * size / np.sqrt(power))[:, None, None]
    return _Grid(
        size=size,
        x=axis[None, None, :],
        y=axis[None, :, None],
        radius=(np.hypot(dy, dx) * (2.0 / size)).astype(np.float32),
        angle_bin=angle_bin,
        band=band,
        filters=filters.astype(np.float32),
        vignette=(1.0 - 0.18 * (axis[None, :] ** 2 + axis[:, None] ** 2)).astype(np.float32),
    )


def _noise(rng: np.random.Generator, n: int, grid: _Grid) -> tuple[np.ndarray, ...]:
    """Tissue field, texture field and speckle, each [n,S,S] with zero mean and unit variance.

    Uniform draws are much cheaper than normal ones; the fields are Gaussian anyway (a sum of
    many random Fourier terms). One draw per call keeps image i independent of n (prefix).
    """
    s, band = grid.size, grid.band
    rows, cols = grid.filters.shape[1:]
    n_spec = 4 * rows * cols
    draw = (rng.random((n, n_spec + s * s), dtype=np.float32) - 0.5) * np.float32(np.sqrt(12))
    coef = draw[:, :n_spec].reshape(n, 2, 2, rows, cols)
    # Only the lowest band+1 columns are non-zero: transform those along y, then along x.
    spectrum = np.zeros((n, 2, s, band + 1), np.complex64)
    block = (coef[:, :, 0] + 1j * coef[:, :, 1]) * grid.filters
    spectrum[:, :, : band + 1] = block[:, :, : band + 1]
    spectrum[:, :, s - band :] = block[:, :, band + 1 :]
    fields = np.fft.irfft(np.fft.ifft(spectrum, axis=-2), n=s, axis=-1)
    return fields[:, 0], fields[:, 1], draw[:, n_spec:].reshape(n, s, s)


def _col(values: np.ndarray) -> np.ndarray:
    """Per-image scalars [B] as float32 [B,1,1], so image maths never silently goes float64."""
    return np.asarray(values, dtype=np.float32)[:, None, None]


def _centres(rng: np.random.Generator, b: int, size: int) -> np.ndarray:
    """Integer pixel centres [2, B] (row, col) within the middle ~60% of the image."""
    return rng.integers(int(0.2 * size), size - int(0.2 * size), (2, b))


def _from_centre(table: np.ndarray, centres: np.ndarray, size: int) -> np.ndarray:
    """Slice each image's [S,S] window of an offset table: one gather for the whole chunk."""
    windows = np.lib.stride_tricks.sliding_window_view(table, (size, size))
    return windows[size - 1 - centres[0], size - 1 - centres[1]]


def _offsets(grid: _Grid, centres: np.ndarray, angle: np.ndarray) -> tuple[np.ndarray, ...]:
    """Pixel coordinates (u, v) in each object's rotated frame, for the few images needing them."""
    cx = _col((centres[1] + 0.5) * 2.0 / grid.size - 1.0)
    cy = _col((centres[0] + 0.5) * 2.0 / grid.size - 1.0)
    dx, dy = grid.x - cx, grid.y - cy
    ca, sa = _col(np.cos(angle)), _col(np.sin(angle))
    return dx * ca + dy * sa, dy * ca - dx * sa


def _outline_mask(
    profile: np.ndarray, radius: np.ndarray, soft: np.ndarray, centres: np.ndarray, grid: _Grid
) -> tuple[np.ndarray, np.ndarray]:
    """Soft object mask [B,S,S] from each image's border profile, and the pixel radii."""
    bins = _from_centre(grid.angle_bin, centres, grid.size)
    r = _from_centre(grid.radius, centres, grid.size)
    flat = profile.astype(np.float32).ravel()
    border = flat[bins + (np.arange(len(profile), dtype=np.int32) * _BINS)[:, None, None]]
    return _ramp(_col(radius) * border - r, _col(soft)), r


def _ramp(distance: np.ndarray, soft: np.ndarray) -> np.ndarray:
    """Soft inside-indicator: 1 inside (distance > 0), 0 outside, linear over about a pixel."""
    return np.clip(0.5 + distance / (2 * soft), 0.0, 1.0)


def _bin_angles() -> np.ndarray:
    """Centre angle of every profile bin [_BINS], matching _Grid.angle_bin."""
    return (np.arange(_BINS) + 0.5) * (2 * np.pi / _BINS) - np.pi


def _ellipse(aspect: np.ndarray, tilt: np.ndarray) -> np.ndarray:
    """Radius per bin [B,_BINS] of an ellipse with semi-axes 1 and aspect, major axis at tilt."""
    theta = 2 * _bin_angles()[None, :]
    c2 = np.cos(theta) * np.cos(2 * tilt)[:, None] + np.sin(theta) * np.sin(2 * tilt)[:, None]
    return 1.0 / np.sqrt((1 + c2) / 2 + (1 - c2) / (2 * aspect[:, None] ** 2))


def _wobble(rng: np.random.Generator, b: int, orders: range, amplitude: float) -> np.ndarray:
    """Smooth random border wobble [B,_BINS]: sum of cos(k*theta + phase), as one matmul."""
    k = np.asarray(orders)[:, None] * _bin_angles()[None, :]
    a = rng.uniform(0, amplitude, (b, len(orders)))
    phase = rng.uniform(0, 2 * np.pi, a.shape)
    return (a * np.cos(phase)) @ np.cos(k) - (a * np.sin(phase)) @ np.sin(k)


def _spikes(rng: np.random.Generator, b: int, n_max: int = 12) -> np.ndarray:
    """Thin radial spikes [B,_BINS]: 6-12 per image, each touching only the bins it covers."""
    step = 2 * np.pi / _BINS
    count = rng.integers(6, n_max + 1, b)
    where = rng.uniform(0, 2 * np.pi, (b, n_max, 1))  # uniform, so the bin origin is irrelevant
    width = rng.uniform(0.15, 0.3, (b, n_max, 1))
    length = rng.uniform(0.5, 1.0, (b, n_max, 1)) * (np.arange(n_max) < count[:, None])[..., None]
    reach = int(np.ceil(0.3 / step)) + 1
    near = np.floor(where / step).astype(np.int64) + np.arange(-reach, reach + 1)
    gap = np.abs((near + 0.5) * step - where)
    value = length * np.clip(1.0 - gap / width, 0.0, None) ** 2
    index = (np.arange(b)[:, None, None] * _BINS + near % _BINS).ravel()
    return np.bincount(index, weights=value.ravel(), minlength=b * _BINS).reshape(b, _BINS)


def _lesion_profile(
    rng: np.random.Generator, spiculated: np.ndarray, strength: tuple[float, float]
) -> np.ndarray:
    """Border radius per angle [B,_BINS]: an ellipse with mild lobulation; thin spicules and
    micro-lobulation when spiculated."""
    b = len(spiculated)
    amp = rng.uniform(*strength, b) * spiculated
    shape = _ellipse(rng.uniform(0.65, 1.0, b), rng.uniform(0, np.pi, b))
    lobes = _wobble(rng, b, range(2, 5), 0.06)
    micro = _wobble(rng, b, range(5, 10), 0.04)
    return shape * (1.0 + lobes + amp[:, None] * (_spikes(rng, b) + micro))


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
    grid: _Grid,
    style: _Style,
) -> np.ndarray:
    """Float images [n,S,S] in ~[0,1]: tissue texture, one lesion, vignette and speckle.

    Per-image parameters are drawn for the whole chunk (len(labels)) and then cut to n, so a
    shorter last chunk gives the same first images as a full one.
    """
    b = len(labels)
    spiculated, heterogeneous, hyper, radius = _lesion_attributes(name, labels, rng, style)
    profile = _lesion_profile(rng, spiculated, style.spicule)
    centres = _centres(rng, b, grid.size)
    soft = rng.uniform(0.6, 1.2, b) * 2.0 / grid.size
    level, tissue_gain = rng.uniform(0.36, 0.52, b), rng.uniform(0.05, 0.10, b)
    contrast = rng.uniform(*style.contrast, b) * np.where(hyper, 1.0, -1.0)
    het_low = rng.uniform(0.0, 0.02, b)
    het_gain = np.where(heterogeneous, rng.uniform(*style.heterogeneity, b), het_low)
    speckle = rng.uniform(*style.speckle, b)

    tissue_f, texture_f, white = _noise(pixel_rng, n, grid)
    mask, _ = _outline_mask(profile[:n], radius[:n], soft[:n], centres[:, :n], grid)
    level_c, gain_c = _col(level[:n]), _col(tissue_gain[:n])
    tissue = level_c * (1.0 + gain_c * tissue_f)
    lesion = (level_c * _col(1.0 + contrast[:n])) * (
        1.0 + _col(het_gain[:n]) * texture_f + 0.3 * gain_c * tissue_f
    )
    image = tissue + mask * (lesion - tissue)
    return image * grid.vignette * (1.0 + _col(speckle[:n]) * white)


def _generic_profiles(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Outline per angle [B,_BINS] for the shape classes; pattern classes use a disk or square."""
    t = _bin_angles()[None, :] - rng.uniform(0, 2 * np.pi, len(labels))[:, None]
    profile = _ellipse(rng.uniform(0.75, 1.0, len(labels)), rng.uniform(0, np.pi, len(labels)))
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
    grid: _Grid,
) -> np.ndarray:
    """Float images [n,S,S]: one shape or patterned object on a gradient / textured background."""
    b = len(labels)
    profile = _generic_profiles(labels, rng)
    centres = _centres(rng, b, grid.size)
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

    tissue_f, texture_f, white = _noise(pixel_rng, n, grid)
    labels = labels[:n]
    mask, r = _outline_mask(profile[:n], radius[:n], soft[:n], centres[:, :n], grid)
    pattern = np.zeros_like(mask)
    for k, name in enumerate(_GENERIC_CLASSES):
        pick = np.flatnonzero(labels == k)
        if name in ("disk", "triangle", "square", "star", "cross") or len(pick) == 0:
            continue
        rad, sft = _col(radius[pick]), _col(soft[pick])
        u, v = _offsets(grid, centres[:, pick], angle[pick])
        wave = np.float32(np.pi) * _col(freq[pick])
        if name == "ring":
            mask[pick] *= 1.0 - _ramp(rad * _col(inner[pick]) - r[pick], sft)
        elif name == "crescent":
            d, h = rad * _col(shift[pick]), heading[pick]
            r2 = np.hypot(u - d * _col(np.cos(h)), v - d * _col(np.sin(h)))
            mask[pick] *= 1.0 - _ramp(rad * 0.9 - r2, sft)
        elif name == "stripes":
            pattern[pick] = 0.5 + 0.5 * np.tanh(3.0 * np.sin(wave * u))
        elif name == "checkerboard":
            pattern[pick] = 0.5 + 0.5 * np.tanh(4.0 * np.sin(wave * u) * np.sin(wave * v))
        else:  # dots
            pattern[pick] = np.clip((np.cos(wave * u) * np.cos(wave * v) - 0.35) * 4.0, 0.0, 1.0)

    tilt, delta = tilt[:n], delta[:n]
    background = (
        _col(level[:n])
        + _col(slope[:n]) * (grid.x * _col(np.cos(tilt)) + grid.y * _col(np.sin(tilt)))
        + _col(bg_gain[0, :n]) * tissue_f
        + _col(bg_gain[1, :n]) * texture_f
    )
    fill = _col(level[:n] + delta) - pattern * _col(delta * fill_mix[:n])
    image = background + mask * (fill - background)
    return image + _col(noise_sd[:n]) * white


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
    name: str, spec: _Spec, split: int, n: int, grid: _Grid, seed: int
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
    grid = _grid(_check_int("image_size", image_size, _MIN_SIZE, _MAX_SIZE))
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
