"""Seeded mutations of image files, as an attacker or a broken client would send them: what
jobs/bench_fuzz.py sends by the thousand and tests/test_data_images.py by the few hundred; and
the building blocks of hand-made ones (`encode`, `png_header_only`).

Each mutation is (kind, bytes). Kinds: truncations, bit flips in the header, dimension fields
rewritten (small, huge, zero, extreme aspect ratios), chunk lengths that lie (PNG), and
appended/duplicated garbage. The format is found from the magic bytes, so any seed file works.
"""

import io
import random
import struct
import zlib
from collections.abc import Iterator

from PIL import Image

# Pillow save options for one small seed image per allowed format.
SEED_FORMATS: dict[str, dict] = {
    "JPEG": {"quality": 85},
    "JPEG-progressive": {"quality": 85, "progressive": True},
    "PNG": {},
    "WEBP": {"quality": 80},
    "GIF": {},
    "BMP": {},
    "TIFF": {"compression": "tiff_lzw"},
}
# Values a dimension field is rewritten to: degenerate, large, and extreme aspect partners.
_DIMENSIONS = (0, 1, 7, 255, 4096, 65535, 1_000_000, 2**31 - 1, 2**32 - 1)


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG declaring width x height with almost no pixel data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def seed_images(image: Image.Image) -> dict[str, bytes]:
    """`image` encoded in each allowed format (progressive JPEG too)."""
    encoded = {}
    for name, options in SEED_FORMATS.items():
        buffer = io.BytesIO()
        source = image.convert("P") if name == "GIF" else image
        source.save(buffer, name.split("-")[0], **options)
        encoded[name] = buffer.getvalue()
    return encoded


def mutations(data: bytes, rng: random.Random, count: int) -> Iterator[tuple[str, bytes]]:
    """`count` mutants of `data`, each from one randomly chosen kind of damage."""
    kinds = [_truncate, _flip_header_bits, _rewrite_dimensions, _lie_about_lengths, _garbage]
    for _ in range(count):
        kind = rng.choice(kinds)
        yield kind.__name__.lstrip("_"), kind(data, rng)


def _truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(0, len(data))]


def _flip_header_bits(data: bytes, rng: random.Random) -> bytes:
    mutant = bytearray(data)
    span = min(len(mutant), 256)
    for _ in range(rng.randint(1, 8)):
        mutant[rng.randrange(span)] ^= 1 << rng.randrange(8)
    return bytes(mutant)


def _dimension_fields(data: bytes) -> list[tuple[int, str]]:
    """(offset, struct format) of the width/height fields the format's header declares."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return [(16, ">I"), (20, ">I")]
    if data[:6] in (b"GIF87a", b"GIF89a"):
        fields = [(6, "<H"), (8, "<H")]
        descriptor = data.find(b"\x2c", 13)  # the first image descriptor (roughly)
        if descriptor > 0:
            fields += [(descriptor + 5, "<H"), (descriptor + 7, "<H")]
        return fields
    if data[:2] == b"BM":
        return [(18, "<i"), (22, "<i")]
    if data[:4] == b"RIFF" and data[12:16] == b"VP8 ":
        return [(26, "<H"), (28, "<H")]
    if data[:4] == b"RIFF" and data[12:16] == b"VP8X":
        return [(24, "<I"), (27, "<I")]  # 24-bit fields; a 4-byte write spills on purpose
    if data[:3] == b"\xff\xd8\xff":
        fields = []
        for marker in (b"\xff\xc0", b"\xff\xc2"):
            at = data.find(marker)
            if at > 0:
                fields += [(at + 5, ">H"), (at + 7, ">H")]
        return fields
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        order = "<" if data[:2] == b"II" else ">"
        return [(_tiff_tag_value(data, order, tag), order + "I") for tag in (256, 257)]
    return []


def _tiff_tag_value(data: bytes, order: str, tag: int) -> int:
    """Offset of the value field of `tag` in the first IFD (0 when absent)."""
    ifd = struct.unpack_from(order + "I", data, 4)[0]
    count = struct.unpack_from(order + "H", data, ifd)[0]
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from(order + "H", data, entry)[0] == tag:
            return entry + 8
    return 0


def _rewrite_dimensions(data: bytes, rng: random.Random) -> bytes:
    fields = [f for f in _dimension_fields(data) if f[0] > 0]
    if not fields:
        return _flip_header_bits(data, rng)
    mutant = bytearray(data)
    for offset, fmt in rng.sample(fields, rng.randint(1, len(fields))):
        size = struct.calcsize(fmt)
        limit = 2 ** (8 * size - (1 if fmt[-1].islower() else 0)) - 1
        value = min(rng.choice(_DIMENSIONS), limit)
        if offset + size <= len(mutant):
            mutant[offset : offset + size] = struct.pack(fmt, value)
    return bytes(mutant)


def _lie_about_lengths(data: bytes, rng: random.Random) -> bytes:
    """PNG: a chunk's length field rewritten; RIFF/JPEG segments: their length fields."""
    mutant = bytearray(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        offsets, at = [], 8
        while at + 8 <= len(data):
            offsets.append(at)
            at += 12 + struct.unpack_from(">I", data, at)[0]
        offset = rng.choice(offsets)
        mutant[offset : offset + 4] = struct.pack(">I", rng.choice((0, 1, 2**31 - 1, 2**32 - 1)))
    elif data[:4] == b"RIFF":
        offset = rng.choice((4, 16))
        mutant[offset : offset + 4] = struct.pack("<I", rng.choice((0, 1, 2**32 - 1)))
    elif data[:3] == b"\xff\xd8\xff" and len(data) > 6:
        mutant[4:6] = struct.pack(">H", rng.choice((0, 1, 2, 0xFFFF)))
    else:
        return _flip_header_bits(data, rng)
    return bytes(mutant)


def _garbage(data: bytes, rng: random.Random) -> bytes:
    cut = rng.randrange(len(data))
    noise = rng.randbytes(rng.randint(1, 512))
    return data[:cut] + noise + data[cut:] if rng.random() < 0.5 else data + noise
