"""Turn an image file (or uploaded bytes) into an upright RGB picture, or say why it cannot.

Training, evaluation and Serve all go through `load_rgb`, so a photo is seen the same way in each:
EXIF orientation applied, transparency composited on white, grayscale/CMYK/palette/16-bit
converted. Every failure is an `ImageDecodeError` (or one of its subclasses) naming the file and the
reason, so callers handle one type.

The decode budget, checked before memory is spent:
- formats: the header's magic bytes must name a photo format decoded in C (`ALLOWED_FORMATS`);
  anything else (RLE BMP and FITS decode in pure Python: seconds of CPU per kilobyte) is refused
  with `UnsupportedImageFormat` before Pillow parses it, and Pillow only tries that one plugin;
- pixels: the declared size, the decoded size and the resized size each stay within budget
  (`ImageTooLarge`), and the aspect ratio within `MAX_ASPECT_RATIO` (`ExtremeAspectRatio`), since
  resizing the short side up to the model's size would otherwise leave the long side unbounded;
- scans: a JPEG of more than `MAX_JPEG_SCANS` scans is refused (`DecodeBudgetExceeded`). A
  progressive JPEG repaints the whole image once per scan, so a small file of thousands of
  near-empty scans holds libjpeg-turbo for seconds; real photos have about ten.
Time and memory limits need a process that can be stopped: see `vitbirds/data/sandbox.py`.
"""

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vitbirds.errors import (
    DecodeBudgetExceeded,
    ExtremeAspectRatio,
    ImageDecodeError,
    ImageTooLarge,
    UnsupportedImageFormat,
)

# 64 megapixels: above any camera a user is likely to upload, and below Pillow's own warning
# threshold (~89 MP), so Pillow never warns before we refuse.
DEFAULT_MAX_PIXELS = 64_000_000
# Wider than a phone's panorama (about 4:1 to 8:1); the resized image is then at most
# short_side x (10 * short_side) pixels.
MAX_ASPECT_RATIO = 10.0
# Photo formats whose pixels Pillow decodes in C (libjpeg, zlib, libwebp, its LZW and raw
# decoders, libtiff). Multi-frame files (GIF, APNG, WebP, TIFF) give their first frame.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# BMP compression field values that are plain pixels (BI_RGB, BI_BITFIELDS, BI_ALPHABITFIELDS);
# RLE4/RLE8 decode in Python.
_BMP_UNCOMPRESSED = frozenset({0, 3, 6})
# TIFF codecs libtiff decodes; the others (e.g. old-style JPEG, SGI log) are refused.
_TIFF_COMPRESSIONS = frozenset(
    {"raw", "tiff_lzw", "tiff_adobe_deflate", "tiff_deflate", "packbits", "jpeg", "group4"}
)
# Encoders write up to ~10 scans for a progressive JPEG (libjpeg's default script has 10,
# mozjpeg's a few more); anything far beyond is built to cost CPU, not to show a photo.
MAX_JPEG_SCANS = 100
_JPEG_START_OF_SCAN = b"\xff\xda"
# Formats worth naming in a refusal: magic bytes -> name.
_REFUSED_MAGIC = {
    b"SIMPLE  =": "FITS",
    b"8BPS": "Photoshop PSD",
    b"\x00\x00\x01\x00": "ICO",
    b"\x00\x00\x00\x0cjP  ": "JPEG 2000",
    b"\xffO\xffQ": "JPEG 2000 codestream",
    b"%PDF": "PDF",
    b"%!PS": "PostScript",
    b"qoif": "QOI",
    b"DDS ": "DDS",
    b"icns": "ICNS",
    b"gimp xcf": "GIMP XCF",
    b"\x59\xa6\x6a\x95": "Sun raster",
    b"<?xml": "XML/SVG",
    b"<svg": "SVG",
}
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def sniff_format(data: bytes) -> str:
    """The allowed format the header's magic bytes name; raises `UnsupportedImageFormat` for a
    known format outside the allow-list and `ImageDecodeError` ("not an image") otherwise."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[:2] == b"BM" and len(data) >= 18:
        header_size = int.from_bytes(data[14:18], "little")
        if header_size == 12:  # OS/2 core header: no compression field, plain pixels
            return "BMP"
        compression = int.from_bytes(data[30:34], "little") if len(data) >= 34 else -1
        if compression in _BMP_UNCOMPRESSED:
            return "BMP"
        raise UnsupportedImageFormat(f"BMP with compression {compression} (only uncompressed BMP)")
    if data[:4] == b"\x00\x00\x02\x00":
        raise UnsupportedImageFormat("CUR (allowed: JPEG, PNG, WebP, GIF, BMP, TIFF)")
    if data[4:8] == b"ftyp":
        raise UnsupportedImageFormat(
            f"ISO media {data[8:12]!r} (HEIC/AVIF; allowed: JPEG, PNG, WebP, GIF, BMP, TIFF)"
        )
    for magic, name in _REFUSED_MAGIC.items():
        if data.startswith(magic):
            raise UnsupportedImageFormat(f"{name} (allowed: JPEG, PNG, WebP, GIF, BMP, TIFF)")
    raise ImageDecodeError(f"not an image of an allowed format ({len(data)} bytes)")


def check_size(width: int, height: int, max_pixels: int, what: str) -> None:
    """The pixel budget and the aspect-ratio bound for one stage (declared, decoded)."""
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"{what} size {width}x{height} is empty")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"refused, {what} size {width}x{height} = {width * height} pixels exceeds "
            f"max_pixels={max_pixels} (possible decompression bomb)"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ExtremeAspectRatio(
            f"refused, {what} size {width}x{height} has aspect ratio {ratio:.1f}:1, "
            f"above {MAX_ASPECT_RATIO:g}:1"
        )


def _check_jpeg_scans(data: bytes) -> None:
    """Counts start-of-scan markers: inside entropy-coded data a 0xFF byte is always followed by
    0x00 or a restart marker, so each FF DA starts a scan (an EXIF thumbnail adds its own one)."""
    scans = data.count(_JPEG_START_OF_SCAN)
    if scans > MAX_JPEG_SCANS:
        raise DecodeBudgetExceeded(
            f"refused, JPEG of {scans} scans exceeds the budget of {MAX_JPEG_SCANS} "
            "(real photos have about ten)"
        )


def load_rgb(
    source: str | Path | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    short_side: int | None = None,
    resize: bool = True,
) -> Image.Image:
    """Decode `source` (a path or the file's bytes) to an upright RGB image.

    `short_side` resizes so the shorter edge has that many pixels; JPEGs are then decoded at a
    reduced DCT scale (`Image.draft`), which is what makes decoding a dataset once cheap. With
    `resize=False` only the reduced scale applies (the short side stays at least `short_side`,
    a JPEG's within a factor of 2 of it): for a random crop that resamples anyway, where
    resampling the whole image first costs more than decoding it (Pillow's bilinear 224 -> 258
    px, 0.7-1.1 ms, against 0.6 ms to decode a 224-px JPEG on the 2-core machine).
    Refusals (format, declared size, aspect ratio) happen before any pixel is decoded.
    """
    if isinstance(source, bytes | bytearray):
        name, data = "<bytes>", bytes(source)
    else:
        name = str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ImageDecodeError(f"{name}: cannot read file ({exc.strerror or exc})") from exc
    try:
        return _decode(data, max_pixels, short_side, resize)
    except ImageDecodeError as exc:
        raise type(exc)(f"{name}: {exc}") from exc


def _decode(data: bytes, max_pixels: int, short_side: int | None, resize: bool) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    image_format = sniff_format(data)
    if image_format == "JPEG":
        _check_jpeg_scans(data)
    try:
        image = Image.open(io.BytesIO(data), formats=[image_format])
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"not an image ({len(data)} bytes, {image_format} header)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"refused, too many pixels ({exc})") from exc
    except MemoryError:  # the sandbox's memory limit: its worker reports it
        raise
    except Exception as exc:  # Pillow's format plugins raise many types on malformed headers
        raise ImageDecodeError(f"unreadable {image_format} header ({exc})") from exc
    if image_format == "TIFF" and image.info.get("compression") not in _TIFF_COMPRESSIONS:
        raise UnsupportedImageFormat(f"TIFF with compression {image.info.get('compression')!r}")
    check_size(*image.size, max_pixels, "declared")
    try:
        if short_side is not None:
            image.draft(None, (short_side, short_side))
        image.load()
        check_size(*image.size, max_pixels, "decoded")
        ImageOps.exif_transpose(image, in_place=True)
        image = _to_rgb(image)
    except (ImageDecodeError, MemoryError):
        raise
    except Exception as exc:  # truncated data surfaces as OSError, others as ValueError/SyntaxError
        raise ImageDecodeError(f"cannot decode pixels ({exc})") from exc
    if short_side is not None and resize:
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


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """The size `short_side` resizing gives; its pixels are bounded by the aspect-ratio bound."""
    scale = short_side / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    budget = round(short_side * short_side * MAX_ASPECT_RATIO) + 2 * short_side
    if size[0] * size[1] > budget:
        raise ImageTooLarge(f"refused, resizing {width}x{height} would give {size[0]}x{size[1]}")
    return size


def _resize_short_side(image: Image.Image, short_side: int) -> Image.Image:
    size = resized_size(*image.size, short_side)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BILINEAR)
