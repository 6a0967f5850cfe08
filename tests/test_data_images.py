"""`load_rgb`: every kind of image becomes an upright RGB picture, every bad file a clear error."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vitbirds.data.images import load_rgb
from vitbirds.errors import ImageDecodeError


def _encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries almost no data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _pixel(image: Image.Image, xy: tuple[int, int]) -> np.ndarray:
    return np.asarray(image)[xy[1], xy[0]].astype(int)


def test_grayscale_becomes_gray_rgb():
    image = load_rgb(_encode(Image.new("L", (8, 8), 77)))
    assert image.mode == "RGB" and image.size == (8, 8)
    assert _pixel(image, (3, 3)).tolist() == [77, 77, 77]


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent
    rgba.putpixel((1, 0), (255, 0, 0, 128))
    rgba.putpixel((2, 0), (0, 0, 255, 255))
    image = load_rgb(_encode(rgba))
    assert image.mode == "RGB"
    assert _pixel(image, (0, 0)).tolist() == [255, 255, 255]
    assert np.allclose(_pixel(image, (1, 0)), [255, 127, 127], atol=2)
    assert _pixel(image, (2, 0)).tolist() == [0, 0, 255]


def test_palette_with_transparency_is_composited_on_white():
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette_image.putpixel((0, 0), 0)
    palette_image.putpixel((1, 0), 1)
    image = load_rgb(_encode(palette_image, transparency=0))
    assert _pixel(image, (0, 0)).tolist() == [255, 255, 255]
    assert _pixel(image, (1, 0)).tolist() == [0, 200, 0]


def test_cmyk_jpeg_becomes_rgb():
    cyan = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    image = load_rgb(_encode(cyan, "JPEG", quality=95))
    assert image.mode == "RGB"
    assert np.allclose(_pixel(image, (8, 8)), [0, 255, 255], atol=8)


def test_16_bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    image = load_rgb(_encode(Image.fromarray(values)))
    assert [_pixel(image, (x, 0))[0] for x in range(3)] == [0, 127, 255]


def test_exif_orientation_is_applied():
    # 40x20, left half red, right half blue; orientation 6 = "rotate 90 degrees clockwise to view"
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(array), "JPEG", quality=95, exif=exif.tobytes())
    image = load_rgb(data)
    assert image.size == (20, 40)
    top, bottom = _pixel(image, (10, 5)), _pixel(image, (10, 35))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_path_and_bytes_decode_identically(tmp_path):
    data = _encode(Image.new("RGB", (10, 6), (10, 20, 30)), "JPEG")
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    assert np.array_equal(np.asarray(load_rgb(path)), np.asarray(load_rgb(data)))
    assert np.array_equal(np.asarray(load_rgb(str(path))), np.asarray(load_rgb(data)))


def test_short_side_decodes_a_reduced_image_keeping_aspect():
    data = _encode(Image.new("RGB", (400, 300), (90, 140, 200)), "JPEG")
    image = load_rgb(data, short_side=60)
    assert image.size == (80, 60)
    assert np.allclose(_pixel(image, (40, 30)), [90, 140, 200], atol=4)


def test_image_above_max_pixels_is_refused_naming_its_size():
    with pytest.raises(ImageDecodeError, match="20x20"):
        load_rgb(_encode(Image.new("RGB", (20, 20))), max_pixels=399)
    assert load_rgb(_encode(Image.new("RGB", (20, 20))), max_pixels=400).size == (20, 20)


def test_decompression_bombs_are_refused_before_decoding():
    with pytest.raises(ImageDecodeError, match="8500x8500"):
        load_rgb(_png_header_only(8500, 8500))  # 72 MP, over the 64 MP default
    with pytest.raises(ImageDecodeError, match="pixels"):
        load_rgb(_png_header_only(50_000, 50_000))  # Pillow's own hard limit


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"just some text, not a picture\n", "not an image"),
        ("truncated", "cannot decode"),
    ],
)
def test_bad_files_raise_image_decode_error_with_reason(tmp_path, content, reason):
    if content == "truncated":
        full = _encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
        content = full[: len(full) // 2]
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=reason) as error:
        load_rgb(path)
    assert str(path) in str(error.value)


def test_missing_file_raises_image_decode_error(tmp_path):
    with pytest.raises(ImageDecodeError, match="cannot read"):
        load_rgb(tmp_path / "missing.jpg")
