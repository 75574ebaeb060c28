"""Image files in: every Pillow mode keeps its meaning; hostile files are one clear error."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imagetx.errors import ImageFileError
from imagetx.storage.images import pil_to_tensor, read_image


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path, channels):
    Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.uint16)).save(tmp_path / "wide.png")
    image, notices = read_image(tmp_path / "wide.png", channels)
    assert image.shape == (1, 4, channels)
    assert image[0, :, 0].tolist() == [0, 1, 128, 255]
    assert "16-bit values scaled to 8 bits" in notices[0]


def test_float_grayscale_in_unit_range_is_scaled():
    image, notice = pil_to_tensor(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)), 1)
    assert image[0, :, 0].tolist() == [0, 128, 255] and "floating-point" in notice


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_onto_white(mode):
    rgba = Image.new("RGBA", (2, 1), (200, 0, 0, 0))  # a hidden colour behind full transparency
    rgba.putpixel((1, 0), (0, 0, 255, 255))
    if mode == "LA":
        source = rgba.convert("LA")
    elif mode == "P":
        source = Image.new("P", (2, 1))
        source.putpalette([200, 0, 0, 0, 0, 255] + [0] * 762)
        source.putpixel((1, 0), 1)
        source.info["transparency"] = 0
    else:
        source = rgba
    image, notice = pil_to_tensor(source, 3)
    assert image[0, 0].tolist() == [255, 255, 255], "a transparent pixel is white, not its hidden colour"
    assert "transparency composited onto white" in notice


def test_cmyk_palette_and_plain_modes_convert():
    assert pil_to_tensor(Image.new("CMYK", (1, 1), (0, 255, 255, 0)), 3)[0].flatten().tolist() == [255, 0, 0]
    image, notice = pil_to_tensor(Image.new("RGB", (1, 1), (10, 20, 30)), 3)
    assert image.flatten().tolist() == [10, 20, 30] and notice is None
    assert pil_to_tensor(Image.new("L", (1, 1), 7), 3)[0].flatten().tolist() == [7, 7, 7]
    assert pil_to_tensor(Image.new("1", (1, 1), 1), 1)[0].flatten().tolist() == [255]


def test_a_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch):
    Image.new("L", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # past twice this Pillow refuses, past once it warns
    with pytest.raises(ImageFileError, match="big.png: too large to decode safely"):
        read_image(tmp_path / "big.png", 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)  # only the warning
    with pytest.raises(ImageFileError, match="too large"):
        read_image(tmp_path / "big.png", 1)


def test_unreadable_files_are_a_clear_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(ImageFileError, match="broken.png: not a readable image"):
        read_image(tmp_path / "broken.png", 3)
    with pytest.raises(ImageFileError, match="no such file"):
        read_image(tmp_path / "missing.png", 3)

