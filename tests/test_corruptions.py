"""Corruptions for the robustness study: pure, seeded, ordered by severity, shape-preserving."""

from __future__ import annotations

import numpy as np
import pytest

from medmerge_core.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from medmerge_core.errors import InputError


def _images(n: int = 4, size: int = 28, rgb: bool = False) -> np.ndarray:
    """Structured images (gradient, a bright square, fine stripes) so every corruption bites."""
    x = np.mgrid[0:size, 0:size][1]
    base = 40 + 120 * x / size + 40 * (np.sin(x * 1.7) > 0)
    base[size // 4 : size // 2, size // 4 : size // 2] = 230
    images = np.stack([np.roll(base, i, axis=1) for i in range(n)]).astype(np.uint8)
    return np.repeat(images[..., None], 3, axis=-1) if rgb else images


def _deviation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("rgb", [False, True])
def test_shape_dtype_and_purity(name: str, rgb: bool) -> None:
    images = _images(rgb=rgb)
    before = images.copy()
    out = corrupt(images, name, 2, seed=0)
    assert out.shape == images.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(images, before)  # the input is never modified
    assert _deviation(out, images) > 0  # every corruption changes the image (JPEG included)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_deterministic(name: str) -> None:
    images = _images()
    np.testing.assert_array_equal(corrupt(images, name, 3, seed=7), corrupt(images, name, 3, 7))


def test_noise_depends_on_seed() -> None:
    images = _images()
    a, b = corrupt(images, "gaussian_noise", 1, seed=0), corrupt(images, "gaussian_noise", 1, 1)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_ordering(name: str) -> None:
    """More severe means further from the clean image, for every corruption."""
    images = _images(n=8)
    deviations = [_deviation(corrupt(images, name, s, seed=0), images) for s in SEVERITIES]
    assert deviations == sorted(deviations) and deviations[0] < deviations[-1]


def test_invalid_inputs_name_the_field() -> None:
    images = _images()
    for bad in (0, 4, 1.5, True, "2"):
        with pytest.raises(InputError, match="severity"):
            corrupt(images, "blur", bad)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="corruption"):
        corrupt(images, "fog", 1)
    with pytest.raises(InputError, match="images"):
        corrupt(images.astype(np.float32), "contrast", 1)
