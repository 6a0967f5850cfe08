"""`load_rgb`: every kind of image becomes an upright RGB picture, every bad file a clear error."""

import os
import random
import signal
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.benchlib.mutate import encode, mutations, png_header_only, seed_images
from vitbirds.data.images import MAX_ASPECT_RATIO, MAX_JPEG_SCANS, load_rgb, resized_size
from vitbirds.data.sandbox import DecodePool, SandboxConfig
from vitbirds.errors import (
    DecodeBudgetExceeded,
    DecodersBusy,
    ExtremeAspectRatio,
    ImageDecodeError,
    ImageTooLarge,
    UnsupportedImageFormat,
)


def _pixel(image: Image.Image, xy: tuple[int, int]) -> np.ndarray:
    return np.asarray(image)[xy[1], xy[0]].astype(int)


def test_grayscale_becomes_gray_rgb():
    image = load_rgb(encode(Image.new("L", (8, 8), 77)))
    assert image.mode == "RGB" and image.size == (8, 8)
    assert _pixel(image, (3, 3)).tolist() == [77, 77, 77]


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent
    rgba.putpixel((1, 0), (255, 0, 0, 128))
    rgba.putpixel((2, 0), (0, 0, 255, 255))
    image = load_rgb(encode(rgba))
    assert image.mode == "RGB"
    assert _pixel(image, (0, 0)).tolist() == [255, 255, 255]
    assert np.allclose(_pixel(image, (1, 0)), [255, 127, 127], atol=2)
    assert _pixel(image, (2, 0)).tolist() == [0, 0, 255]


def test_palette_with_transparency_is_composited_on_white():
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette_image.putpixel((0, 0), 0)
    palette_image.putpixel((1, 0), 1)
    image = load_rgb(encode(palette_image, transparency=0))
    assert _pixel(image, (0, 0)).tolist() == [255, 255, 255]
    assert _pixel(image, (1, 0)).tolist() == [0, 200, 0]


def test_cmyk_jpeg_becomes_rgb():
    cyan = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    image = load_rgb(encode(cyan, "JPEG", quality=95))
    assert image.mode == "RGB"
    assert np.allclose(_pixel(image, (8, 8)), [0, 255, 255], atol=8)


def test_16_bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    image = load_rgb(encode(Image.fromarray(values)))
    assert [_pixel(image, (x, 0))[0] for x in range(3)] == [0, 127, 255]


def test_exif_orientation_is_applied():
    # 40x20, left half red, right half blue; orientation 6 = "rotate 90 degrees clockwise to view"
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(array), "JPEG", quality=95, exif=exif.tobytes())
    image = load_rgb(data)
    assert image.size == (20, 40)
    top, bottom = _pixel(image, (10, 5)), _pixel(image, (10, 35))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_path_and_bytes_decode_identically(tmp_path):
    data = encode(Image.new("RGB", (10, 6), (10, 20, 30)), "JPEG")
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    assert np.array_equal(np.asarray(load_rgb(path)), np.asarray(load_rgb(data)))
    assert np.array_equal(np.asarray(load_rgb(str(path))), np.asarray(load_rgb(data)))


def test_short_side_decodes_a_reduced_image_keeping_aspect():
    data = encode(Image.new("RGB", (400, 300), (90, 140, 200)), "JPEG")
    image = load_rgb(data, short_side=60)
    assert image.size == (80, 60)
    assert np.allclose(_pixel(image, (40, 30)), [90, 140, 200], atol=4)


def test_without_resize_short_side_only_reduces_the_jpeg_scale():
    """For random crops, which resample anyway: the DCT-reduced decode, never below short_side."""
    jpeg = encode(Image.new("RGB", (800, 600), (90, 140, 200)), "JPEG")
    assert load_rgb(jpeg, short_side=60, resize=False).size == (100, 75)  # 1/8 scale
    assert load_rgb(jpeg, short_side=200, resize=False).size == (400, 300)  # 1/2: 1/4 < 200
    small = encode(Image.new("RGB", (40, 30)), "PNG")
    assert load_rgb(small, short_side=60, resize=False).size == (40, 30)  # never upscaled


def test_image_above_max_pixels_is_refused_naming_its_size():
    with pytest.raises(ImageDecodeError, match="20x20"):
        load_rgb(encode(Image.new("RGB", (20, 20))), max_pixels=399)
    assert load_rgb(encode(Image.new("RGB", (20, 20))), max_pixels=400).size == (20, 20)


def test_decompression_bombs_are_refused_before_decoding():
    with pytest.raises(ImageDecodeError, match="8500x8500"):
        load_rgb(png_header_only(8500, 8500))  # 72 MP, over the 64 MP default
    with pytest.raises(ImageDecodeError, match="pixels"):
        load_rgb(png_header_only(50_000, 50_000))  # Pillow's own hard limit


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
        full = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
        content = full[: len(full) // 2]
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=reason) as error:
        load_rgb(path)
    assert str(path) in str(error.value)


def test_missing_file_raises_image_decode_error(tmp_path):
    with pytest.raises(ImageDecodeError, match="cannot read"):
        load_rgb(tmp_path / "missing.jpg")


# --- the decode budget -------------------------------------------------------------------------


def _rle8_bmp() -> bytes:
    """An 8-bit BMP whose header says RLE8 (compression 1): Pillow would decode it in Python."""
    data = bytearray(encode(Image.new("P", (8, 8)), "BMP"))
    data[30:34] = struct.pack("<I", 1)
    return bytes(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_allowed_format_decodes(fmt):
    image = Image.effect_noise((40, 30), 40).convert("RGB")
    assert load_rgb(encode(image.convert("P") if fmt == "GIF" else image, fmt)).size == (40, 30)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (_rle8_bmp(), "BMP with compression 1"),
        (b"SIMPLE  =                    T" + b" " * 2850, "FITS"),
        (b"8BPS\x00\x01" + b"\x00" * 64, "PSD"),
        (b"\x00\x00\x00\x1cftypheic" + b"\x00" * 64, "HEIC"),
    ],
)
def test_formats_outside_the_allow_list_are_refused_before_decoding(data, named):
    with pytest.raises(UnsupportedImageFormat, match=named):
        load_rgb(data)


def test_extreme_aspect_ratio_is_refused_from_the_header():
    """138 bytes declaring 1 x 5,000,000: under the pixel budget, but resizing its short side to
    the model's size would make the long side 1.3 billion pixels."""
    data = png_header_only(1, 5_000_000)
    assert len(data) < 200
    with pytest.raises(ExtremeAspectRatio, match="1x5000000"):
        load_rgb(data, short_side=258)


def test_aspect_ratio_up_to_the_bound_is_accepted_and_resized_within_budget():
    image = load_rgb(encode(Image.new("RGB", (100, 10))), short_side=20)
    assert image.size == (20 * MAX_ASPECT_RATIO, 20)
    with pytest.raises(ImageTooLarge, match="would give"):
        resized_size(1, 100, 258)


def test_declared_size_bomb_is_too_large_not_merely_undecodable():
    with pytest.raises(ImageTooLarge):
        load_rgb(png_header_only(8500, 8500))


def test_seeded_mutations_of_every_allowed_format_raise_only_image_decode_errors():
    """300+ truncations, header bit flips, rewritten dimensions and lying chunk lengths: each
    decodes to a budgeted RGB image or raises ImageDecodeError (Serve's 4xx), nothing else."""
    rng = random.Random(15)
    seeds = seed_images(Image.effect_noise((48, 36), 60).convert("RGB"))
    outcomes: dict[str, int] = {}
    for data in seeds.values():
        for _, mutant in mutations(data, rng, 45):
            try:
                image = load_rgb(mutant, max_pixels=1_000_000, short_side=24)
            except ImageDecodeError as error:
                outcome = type(error).__name__
            else:
                assert image.mode == "RGB" and min(image.size) == 24
                assert max(image.size) <= 24 * MAX_ASPECT_RATIO
                outcome = "decoded"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert sum(outcomes.values()) == 45 * len(seeds)
    assert {"decoded", "ImageDecodeError", "ImageTooLarge", "ExtremeAspectRatio"} <= set(outcomes)


# --- the sandboxed decoder ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool():
    pool = DecodePool(SandboxConfig(workers=1, timeout_s=10.0, memory_bytes=64 * 1024 * 1024))
    yield pool
    pool.close()


def test_sandboxed_decode_equals_in_process_decode(pool, shared_data):
    photo = next((shared_data / "cub100" / "valid").glob("*/*.jpg")).read_bytes()
    expected = load_rgb(photo, short_side=258)
    assert np.array_equal(np.asarray(pool.decode(photo, short_side=258)), np.asarray(expected))


def test_sandboxed_decode_raises_the_same_error_types(pool):
    with pytest.raises(UnsupportedImageFormat, match="FITS"):
        pool.decode(b"SIMPLE  =                    T")
    with pytest.raises(ExtremeAspectRatio):
        pool.decode(png_header_only(1, 5_000_000), short_side=258)
    with pytest.raises(ImageDecodeError, match="not an image"):
        pool.decode(b"hello")


def test_a_file_over_the_memory_limit_costs_only_its_worker(pool):
    """64 MiB of address space cannot hold a 6000x6000 RGBA PNG (144 MB of pixels): the worker
    fails alone, a fresh one takes its place, and the next photo decodes."""
    big = encode(Image.new("RGBA", (6000, 6000), (1, 2, 3, 4)))
    with pytest.raises(DecodeBudgetExceeded):
        pool.decode(big, short_side=32)
    small = encode(Image.new("RGB", (40, 30), (9, 9, 9)))
    assert pool.decode(small).size == (40, 30)


def test_a_decode_past_the_time_limit_is_stopped():
    """A zero time limit: no decode can answer in time, so the worker is killed and replaced."""
    pool = DecodePool(SandboxConfig(workers=1, timeout_s=0.0))
    try:
        image = encode(Image.effect_noise((2000, 2000), 50).convert("RGB"))
        with pytest.raises(DecodeBudgetExceeded, match="took over 0 s"):
            pool.decode(image)
        pool.config.timeout_s = 30.0
        assert pool.decode(encode(Image.new("RGB", (8, 8)))).size == (8, 8)
    finally:
        pool.close()


def test_a_file_finding_every_decoder_busy_is_refused_after_the_wait():
    """The one worker is held (SIGSTOP stands in for a hostile file running to its time limit):
    the next file is refused with DecodersBusy after `wait_s` rather than queueing behind it, and
    once the held decode is stopped at its limit the pool decodes again."""
    pool = DecodePool(SandboxConfig(workers=1, timeout_s=3.0, wait_s=0.2))
    small = encode(Image.new("RGB", (8, 8)))
    try:
        os.kill(pool._idle.queue[0].process.pid, signal.SIGSTOP)
        with ThreadPoolExecutor(1) as executor:
            held = executor.submit(pool.decode, small)
            while pool._idle.qsize():  # until the held decode has taken the worker
                time.sleep(0.01)
            started = time.monotonic()
            with pytest.raises(DecodersBusy, match=r"busy for 0\.2 s"):
                pool.decode(small)
            assert time.monotonic() - started < 2.0
            with pytest.raises(DecodeBudgetExceeded, match="took over 3 s"):
                held.result()
        pool.config.wait_s = 30.0  # the successor starts in the background
        assert pool.decode(small).size == (8, 8)
    finally:
        pool.close()


def _environment_of(pid: int) -> str:
    """A process's environment as text: /proc on Linux, `ps eww` elsewhere (macOS)."""
    proc = Path(f"/proc/{pid}/environ")
    if proc.exists():
        return proc.read_bytes().decode(errors="replace")
    command = ["ps", "eww", "-o", "command=", "-p", str(pid)]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def test_a_decode_worker_sees_none_of_its_parent_s_secrets(monkeypatch):
    secrets = {
        "VITBIRDS_WRITE_TOKEN": "planted-write-token",
        "RAY_AUTH_TOKEN": "planted-ray-token",
        "AWS_SECRET_ACCESS_KEY": "planted-cloud-key",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    pool = DecodePool(SandboxConfig(workers=1))
    try:
        assert pool.decode(encode(Image.new("RGB", (8, 8)))).size == (8, 8)  # it works
        environment = _environment_of(pool._idle.queue[0].process.pid)
    finally:
        pool.close()
    assert "OMP_NUM_THREADS=1" in environment
    for name, value in secrets.items():
        assert name not in environment and value not in environment


def _progressive_jpeg_with_extra_scans(extra: int) -> bytes:
    """A real progressive JPEG whose last scan is repeated `extra` more times before its end: what
    a scan bomb looks like to the marker count (libjpeg would repaint the image per scan)."""
    photo = encode(Image.effect_noise((256, 192), 40).convert("RGB"), "JPEG", progressive=True)
    last_scan = photo.rindex(b"\xff\xda")
    return photo[:-2] + photo[last_scan:-2] * extra + b"\xff\xd9"


def test_a_progressive_photo_decodes_and_a_scan_bomb_is_refused_before_decoding(pool):
    photo = _progressive_jpeg_with_extra_scans(0)
    assert 1 < photo.count(b"\xff\xda") <= MAX_JPEG_SCANS
    assert load_rgb(photo).size == (256, 192)
    bomb = _progressive_jpeg_with_extra_scans(MAX_JPEG_SCANS)
    with pytest.raises(DecodeBudgetExceeded, match=r"JPEG of \d+ scans exceeds the budget of 100"):
        load_rgb(bomb)
    with pytest.raises(DecodeBudgetExceeded, match="scans"):  # the same refusal in the sandbox
        pool.decode(bomb)
