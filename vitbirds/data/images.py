"""Turn any image file (or uploaded bytes) into an upright RGB picture, or say why it cannot.

Training and Serve both go through `load_rgb`, so a photo is seen the same way in both: EXIF
orientation applied, transparency composited on white, grayscale/CMYK/palette/16-bit converted.
Every failure is an `ImageDecodeError` naming the file and the reason, so callers handle one type.
"""

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vitbirds.errors import ImageDecodeError

# 64 megapixels: above any camera a user is likely to upload, and below Pillow's own warning
# threshold (~89 MP), so Pillow never warns before we refuse.
DEFAULT_MAX_PIXELS = 64_000_000

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def load_rgb(
    source: str | Path | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    short_side: int | None = None,
) -> Image.Image:
    """Decode `source` (a path or the file's bytes) to an upright RGB image.

    `short_side` resizes so the shorter edge has that many pixels; JPEGs are then decoded at a
    reduced DCT scale (`Image.draft`), which is what makes decoding a dataset once cheap.
    Images declaring more than `max_pixels` are refused before any pixel is decoded.
    """
    if isinstance(source, bytes | bytearray):
        name, data = "<bytes>", bytes(source)
    else:
        name = str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ImageDecodeError(f"{name}: cannot read file ({exc.strerror or exc})") from exc
    if not data:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"{name}: not an image ({len(data)} bytes)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"{name}: refused, too many pixels ({exc})") from exc
    except Exception as exc:  # Pillow's format plugins raise many types on malformed headers
        raise ImageDecodeError(f"{name}: unreadable header ({exc})") from exc

    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"{name}: refused, {width}x{height} = {width * height} pixels exceeds "
            f"max_pixels={max_pixels} (possible decompression bomb)"
        )
    try:
        if short_side is not None:
            image.draft(None, (short_side, short_side))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        image = _to_rgb(image)
    except Exception as exc:  # truncated data surfaces as OSError, others as ValueError/SyntaxError
        raise ImageDecodeError(f"{name}: cannot decode pixels ({exc})") from exc
    if short_side is not None:
        image = _resize_short_side(image, short_side)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white (a transparent PNG is not a black photo)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode.startswith("I"):
        # 16-bit grayscale: a plain convert would clip everything above 255 to white.
        scaled = np.asarray(image, dtype=np.float32) / 257.0
        image = Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def _resize_short_side(image: Image.Image, short_side: int) -> Image.Image:
    width, height = image.size
    scale = short_side / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BILINEAR)
