"""Image corruptions for robustness tests: Gaussian noise, blur, contrast and JPEG, 3 severities.

The severities follow ImageNet-C (Hendrycks & Dietterich 2019) levels 1, 3 and 5 where the
parameter is scale free (noise sigma, contrast factor, JPEG quality). The blur sigma is given
as a fraction of the image side, so a 28x28 MedMNIST image and a 224x224 one are blurred alike.

Every function is pure (the input array is never modified) and deterministic: the noise comes
from a generator seeded by `seed`. Inputs and outputs are uint8 [N,H,W] or [N,H,W,C].
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from medmerge_core.errors import InputError

CORRUPTIONS: tuple[str, ...] = ("gaussian_noise", "blur", "contrast", "jpeg")
SEVERITIES: tuple[int, ...] = (1, 2, 3)

# Parameter per severity 1, 2, 3 (ImageNet-C levels 1, 3, 5 where applicable).
NOISE_SIGMA = (0.08, 0.18, 0.38)  # std of additive noise on [0, 1] intensities
BLUR_SIGMA = (0.02, 0.04, 0.06)  # Gaussian sigma as a fraction of the image side
CONTRAST_FACTOR = (0.4, 0.2, 0.05)  # x -> mean + c * (x - mean), per image
JPEG_QUALITY = (25, 15, 7)


def _check(images: np.ndarray, severity: int) -> int:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim not in (3, 4):
        shape = getattr(images, "shape", None)
        raise InputError(
            f"images: expected a uint8 array [N,H,W] or [N,H,W,C], got "
            f"{getattr(images, 'dtype', type(images).__name__)} {shape}"
        )
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer):
        raise InputError(f"severity: expected an integer in {SEVERITIES}, got {severity!r}")
    if int(severity) not in SEVERITIES:
        raise InputError(f"severity: expected one of {SEVERITIES}, got {severity}")
    return int(severity) - 1


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def gaussian_noise(images: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
    """Additive Gaussian noise; the same seed gives the same noise."""
    level = _check(images, severity)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(images.shape, dtype=np.float32) * (NOISE_SIGMA[level] * 255.0)
    return _to_uint8(images.astype(np.float32) + noise)


def blur(images: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
    """Gaussian blur over the two spatial axes only (never across images or channels)."""
    level = _check(images, severity)
    sigma = BLUR_SIGMA[level] * max(images.shape[1], images.shape[2])
    sigmas = (0.0, sigma, sigma) + ((0.0,) if images.ndim == 4 else ())
    return _to_uint8(gaussian_filter(images.astype(np.float32), sigmas, mode="reflect"))


def contrast(images: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
    """Pull every pixel towards its image's mean intensity."""
    level = _check(images, severity)
    x = images.astype(np.float32)
    mean = x.mean(axis=tuple(range(1, x.ndim)), keepdims=True)
    return _to_uint8(mean + CONTRAST_FACTOR[level] * (x - mean))


def jpeg(images: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
    """Encode and decode each image as JPEG with PIL at a low quality."""
    level = _check(images, severity)
    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY[level])
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            out[i] = np.asarray(decoded.convert(Image.fromarray(image).mode))
    return out


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply the corruption `name` (one of CORRUPTIONS) at severity 1, 2 or 3."""
    functions = {"gaussian_noise": gaussian_noise, "blur": blur, "contrast": contrast, "jpeg": jpeg}
    if name not in functions:
        raise InputError(f"corruption: unknown {name!r}; expected one of {', '.join(CORRUPTIONS)}")
    return functions[name](images, severity, seed)
