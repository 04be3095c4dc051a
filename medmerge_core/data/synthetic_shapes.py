"""Vectorised drawing primitives of the synthetic tasks: pixel grids, filtered noise, polar
border profiles (ellipses, wobble, spikes) and soft masks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BINS = 512  # angular samples of a border profile (sub-pixel at 64x64)


@dataclass(frozen=True)
class PixelGrid:
    """Per-size lookup tables, so rendering a chunk needs gathers, not trigonometry per pixel.

    Object centres sit on pixel centres, so every pixel's offset from a centre is an integer
    vector and its radius and angle bin can be sliced out of one table of offsets.
    """

    size: int
    x: np.ndarray  # [1, 1, S] pixel-centre coordinates in [-1, 1]
    y: np.ndarray  # [1, S, 1]
    radius: np.ndarray  # [2S-1, 2S-1] distance of an offset, in [-1, 1] units
    angle_bin: np.ndarray  # [2S-1, 2S-1] int32 angle bin (of BINS) of an offset
    band: int  # highest spatial frequency (cycles per image) of the two noise fields
    filters: np.ndarray  # [2, 2F+1, F+1] amplitude spectra: tissue (1/f^1.5) and texture (band)
    vignette: np.ndarray  # [S, S]


def pixel_grid(size: int) -> PixelGrid:
    """Spectra are defined in cycles per image, so textures look the same at every size."""
    axis = ((np.arange(size) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    offsets = np.arange(-(size - 1), size)
    dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
    angle = np.arctan2(dy, dx)
    angle_bin = np.floor((angle + np.pi) / (2 * np.pi) * BINS).astype(np.int32) % BINS
    band = min(16, (size - 1) // 2)
    fy = np.r_[0 : band + 1, -band:0]
    f = np.hypot(fy[:, None], np.arange(band + 1)[None, :])
    filters = np.stack([1.0 / (f + 1.5) ** 1.5, np.exp(-((f - 9.0) ** 2) / (2 * 3.5**2))])
    filters[:, 0, 0] = 0.0  # no DC: the level is set explicitly
    # Unit variance of irfft2 output: column 0 counts once, the others twice (as +-f pairs).
    power = (filters[:, :, 0] ** 2).sum(axis=1) + 4 * (filters[:, :, 1:] ** 2).sum(axis=(1, 2))
    filters *= (size * size / np.sqrt(power))[:, None, None]
    return PixelGrid(
        size=size,
        x=axis[None, None, :],
        y=axis[None, :, None],
        radius=(np.hypot(dy, dx) * (2.0 / size)).astype(np.float32),
        angle_bin=angle_bin,
        band=band,
        filters=filters.astype(np.float32),
        vignette=(1.0 - 0.18 * (axis[None, :] ** 2 + axis[:, None] ** 2)).astype(np.float32),
    )


def filtered_noise(rng: np.random.Generator, n: int, grid: PixelGrid) -> tuple[np.ndarray, ...]:
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


def as_column(values: np.ndarray) -> np.ndarray:
    """Per-image scalars [B] as float32 [B,1,1], so image maths never silently goes float64."""
    return np.asarray(values, dtype=np.float32)[:, None, None]


def random_centres(rng: np.random.Generator, b: int, size: int) -> np.ndarray:
    """Integer pixel centres [2, B] (row, col) within the middle ~60% of the image."""
    return rng.integers(int(0.2 * size), size - int(0.2 * size), (2, b))


def shift_to_centres(table: np.ndarray, centres: np.ndarray, size: int) -> np.ndarray:
    """Slice each image's [S,S] window of an offset table: one gather for the whole chunk."""
    windows = np.lib.stride_tricks.sliding_window_view(table, (size, size))
    return windows[size - 1 - centres[0], size - 1 - centres[1]]


def centre_offsets(
    grid: PixelGrid, centres: np.ndarray, angle: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Pixel coordinates (u, v) in each object's rotated frame, for the few images needing them."""
    cx = as_column((centres[1] + 0.5) * 2.0 / grid.size - 1.0)
    cy = as_column((centres[0] + 0.5) * 2.0 / grid.size - 1.0)
    dx, dy = grid.x - cx, grid.y - cy
    ca, sa = as_column(np.cos(angle)), as_column(np.sin(angle))
    return dx * ca + dy * sa, dy * ca - dx * sa


def outline_mask(
    profile: np.ndarray, radius: np.ndarray, soft: np.ndarray, centres: np.ndarray, grid: PixelGrid
) -> tuple[np.ndarray, np.ndarray]:
    """Soft object mask [B,S,S] from each image's border profile, and the pixel radii."""
    bins = shift_to_centres(grid.angle_bin, centres, grid.size)
    r = shift_to_centres(grid.radius, centres, grid.size)
    flat = profile.astype(np.float32).ravel()
    border = flat[bins + (np.arange(len(profile), dtype=np.int32) * BINS)[:, None, None]]
    return soft_ramp(as_column(radius) * border - r, as_column(soft)), r


def soft_ramp(distance: np.ndarray, soft: np.ndarray) -> np.ndarray:
    """Soft inside-indicator: 1 inside (distance > 0), 0 outside, linear over about a pixel."""
    return np.clip(0.5 + distance / (2 * soft), 0.0, 1.0)


def bin_angles() -> np.ndarray:
    """Centre angle of every profile bin [BINS], matching PixelGrid.angle_bin."""
    return (np.arange(BINS) + 0.5) * (2 * np.pi / BINS) - np.pi


def ellipse_radius(aspect: np.ndarray, tilt: np.ndarray) -> np.ndarray:
    """Radius per bin [B,BINS] of an ellipse with semi-axes 1 and aspect, major axis at tilt."""
    theta = 2 * bin_angles()[None, :]
    c2 = np.cos(theta) * np.cos(2 * tilt)[:, None] + np.sin(theta) * np.sin(2 * tilt)[:, None]
    return 1.0 / np.sqrt((1 + c2) / 2 + (1 - c2) / (2 * aspect[:, None] ** 2))


def border_wobble(rng: np.random.Generator, b: int, orders: range, amplitude: float) -> np.ndarray:
    """Smooth random border wobble [B,BINS]: sum of cos(k*theta + phase), as one matmul."""
    k = np.asarray(orders)[:, None] * bin_angles()[None, :]
    a = rng.uniform(0, amplitude, (b, len(orders)))
    phase = rng.uniform(0, 2 * np.pi, a.shape)
    return (a * np.cos(phase)) @ np.cos(k) - (a * np.sin(phase)) @ np.sin(k)


def border_spikes(rng: np.random.Generator, b: int, n_max: int = 12) -> np.ndarray:
    """Thin radial spikes [B,BINS]: 6-12 per image, each touching only the bins it covers."""
    step = 2 * np.pi / BINS
    count = rng.integers(6, n_max + 1, b)
    where = rng.uniform(0, 2 * np.pi, (b, n_max, 1))  # uniform, so the bin origin is irrelevant
    width = rng.uniform(0.15, 0.3, (b, n_max, 1))
    length = rng.uniform(0.5, 1.0, (b, n_max, 1)) * (np.arange(n_max) < count[:, None])[..., None]
    reach = int(np.ceil(0.3 / step)) + 1
    near = np.floor(where / step).astype(np.int64) + np.arange(-reach, reach + 1)
    gap = np.abs((near + 0.5) * step - where)
    value = length * np.clip(1.0 - gap / width, 0.0, None) ** 2
    index = (np.arange(b)[:, None, None] * BINS + near % BINS).ravel()
    return np.bincount(index, weights=value.ravel(), minlength=b * BINS).reshape(b, BINS)
