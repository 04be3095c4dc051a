"""Decode one image file (PIL, or pydicom for DICOM) to a square uint8 array.

Images are resized straight to size x size (no crop or padding), as the papers do
("all input images are resized to 224x224"), with Pillow's antialiased bilinear filter. JPEGs
are decoded at the smallest DCT scale that is still >= size (Image.draft), which is exact
enough for downsampling and several times faster for 600x450+ images.

Colour is decided deliberately: `color="gray"` or `"rgb"` converts every image, `None` keeps
each file's own mode and returns it, so the caller can refuse a folder that mixes the two.
16-bit and float images (DICOM, 16-bit PNG) are min-max scaled per image to 0..255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

DICOM_SUFFIXES = (".dcm", ".dicom")
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
COLORS = ("gray", "rgb")


class BadImageError(Exception):
    """A file that cannot be decoded (missing, corrupt, truncated); .reason is one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def load_image(path: Path, size: int, color: str | None = None) -> tuple[np.ndarray, str]:
    """(uint8 [size,size] or [size,size,3], the file's own mode "gray" | "rgb").

    The array is in `color` when given, else in the file's own mode.
    """
    try:
        if path.suffix.lower() in DICOM_SUFFIXES:
            image, native = _read_dicom(path)
            return _finish(image, color or native, size), native
        with Image.open(path) as image:
            native = "gray" if image.mode in GRAY_MODES else "rgb"
            if image.format == "JPEG":
                image.draft("L" if (color or native) == "gray" else "RGB", (size, size))
            image.load()  # decode now: truncated or corrupt data raises here
            return _finish(image, color or native, size), native
    except FileNotFoundError as err:
        raise BadImageError("file not found") from err
    except BadImageError:
        raise
    except Exception as err:  # any decoder failure (OSError, SyntaxError, pydicom errors...)
        message = " ".join(str(err).split()) or "unreadable"
        raise BadImageError(f"{type(err).__name__}: {message}"[:200]) from err


def _finish(image: Image.Image, mode: str, size: int) -> np.ndarray:
    image = _convert(image, mode)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _read_dicom(path: Path) -> tuple[Image.Image, str]:
    import pydicom  # lazy: only DICOM datasets pay for the import

    dataset = pydicom.dcmread(path)
    pixels = np.asarray(dataset.pixel_array)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    gray = photometric.startswith("MONOCHROME")
    if pixels.ndim == (3 if gray else 4):  # multi-frame: the first frame
        pixels = pixels[0]
    if pixels.ndim != (2 if gray else 3):
        raise BadImageError(f"unsupported DICOM pixel shape {pixels.shape} ({photometric})")
    pixels = _to_uint8(pixels)
    if photometric == "MONOCHROME1":  # 0 is white: invert so every X-ray reads alike
        pixels = 255 - pixels
    return Image.fromarray(pixels), "gray" if gray else "rgb"


def _convert(image: Image.Image, mode: str) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = Image.fromarray(_to_uint8(np.asarray(image)))
    target = "L" if mode == "gray" else "RGB"
    return image if image.mode == target else image.convert(target)


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Min-max scale per image: X-ray bit depths vary (10-16 bits) and windows are unreliable."""
    if pixels.dtype == np.uint8:
        return pixels
    values = pixels.astype(np.float32)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(pixels.shape, np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)
