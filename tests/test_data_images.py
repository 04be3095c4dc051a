"""images.load_image: modes, bit depths, DICOM photometry and bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from medmerge_core.data.images import BadImageError, load_image
from tests.test_data_fixtures import write_dicom, write_image


def test_modes_map_to_gray_or_rgb(tmp_path: Path) -> None:
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.full((10, 12, 4), 200, np.uint8), "RGBA").save(rgba)
    palette = tmp_path / "p.png"
    Image.fromarray(np.full((10, 12, 3), 90, np.uint8)).convert("P").save(palette)
    gray = write_image(tmp_path / "g.jpg", mode="L", size=(40, 30))
    assert load_image(rgba, 8)[1] == "rgb" and load_image(rgba, 8)[0].shape == (8, 8, 3)
    assert load_image(palette, 8)[1] == "rgb"
    array, native = load_image(gray, 8)
    assert native == "gray" and array.shape == (8, 8) and array.dtype == np.uint8
    assert load_image(gray, 8, "rgb")[0].shape == (8, 8, 3)  # converted, native still gray
    assert load_image(rgba, 8, "gray")[0].shape == (8, 8)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    pixels = np.linspace(0, 4000, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(pixels).save(path)
    array, native = load_image(path, 16)
    assert native == "gray" and array.min() == 0 and array.max() == 255


def test_resize_is_square_and_jpeg_draft_is_close_to_full_decode(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    smooth = np.kron(np.random.default_rng(0).integers(0, 255, (15, 20, 3)), np.ones((30, 30, 1)))
    Image.fromarray(smooth.astype(np.uint8)).save(path, quality=95)  # 600x450
    fast = load_image(path, 64)[0].astype(np.float32)
    with Image.open(path) as image:
        full = np.asarray(image.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    assert fast.shape == (64, 64, 3)
    assert np.abs(fast - full).mean() < 4.0


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "a.dcm", "p1", bits=8, size=16)
    normal = load_image(path, 16)[0]
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(path)
    np.testing.assert_array_equal(load_image(path, 16)[0], 255 - normal)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(None, "file not found"), (b"", "UnidentifiedImageError"), (b"\xff\xd8\xff\xe0junk", "")],
)
def test_bad_files_raise_bad_image(tmp_path: Path, content: bytes | None, reason: str) -> None:
    path = tmp_path / "x.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BadImageError) as err:
        load_image(path, 8)
    assert reason in err.value.reason and "\n" not in err.value.reason
