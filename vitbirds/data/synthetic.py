"""A generated bird dataset: the default when no dataset is given, and tiny data for tests.

Each class is a made-up species drawn as a bird (tail, body, wing, head, eye, beak, legs) at a
random position, scale, tilt and facing, over a cluttered background (gradient, random shapes,
noise). Species come in pairs that share a body colour and differ in beak shape, wing pattern or
size, so global colour alone cannot separate them. The bird's pixel mask is saved beside each
image, so attention maps can be checked against where the bird really is.

Everything is a pure function of (seed, species, image index): the same seed gives the same
bytes, and a species' images do not depend on how many other classes were asked for.
"""

import colorsys
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vitbirds.data.sources import SPLITS, SYNTHETIC_MARKER
from vitbirds.errors import DataError

GENERATOR_VERSION = 1
MASKS_DIR = "masks"
_SUPERSAMPLE = 4  # draw at 4x and downsample: smooth edges even at 32 px
_HELD_OUT_FRACTION = 0.15  # of each class, for valid and again for test


@dataclass(frozen=True)
class Species:
    name: str
    body: tuple[int, int, int]
    beak: str  # "short" (finch), "long" (curlew), "hooked" (raptor)
    wing: str  # "plain", "striped", "spotted"
    size: float  # relative body size


_RED, _BLUE, _YELLOW = (200, 45, 40), (45, 85, 200), (225, 195, 40)
_GREEN, _BROWN, _GREY = (55, 145, 60), (125, 80, 45), (120, 120, 125)

# Pairs share a body colour; the first six (the default) are three such pairs.
SPECIES = (
    Species("red_shortbill_plain", _RED, "short", "plain", 1.0),
    Species("red_longbill_striped", _RED, "long", "striped", 1.0),
    Species("blue_shortbill_striped", _BLUE, "short", "striped", 1.2),
    Species("blue_longbill_plain", _BLUE, "long", "plain", 1.2),
    Species("yellow_shortbill_plain", _YELLOW, "short", "plain", 0.85),
    Species("yellow_shortbill_striped", _YELLOW, "short", "striped", 0.85),
    Species("green_longbill_plain", _GREEN, "long", "plain", 1.2),
    Species("green_shortbill_plain", _GREEN, "short", "plain", 1.2),
    Species("brown_shortbill_spotted", _BROWN, "short", "spotted", 1.0),
    Species("brown_shortbill_plain", _BROWN, "short", "plain", 0.8),
    Species("grey_longbill_striped", _GREY, "long", "striped", 1.0),
    Species("grey_hookbill_plain", _GREY, "hooked", "plain", 1.0),
)
_BEAK_COLOUR = (70, 60, 50)

# many_species(): 7 hues x 5 shades x 3 beaks x 5 wing/size variants = Kaggle's 525 species.
_BEAKS = ("short", "long", "hooked")
_HUE_NAMES = ("RED", "OCHRE", "LIME", "GREEN", "TEAL", "BLUE", "VIOLET")
MAX_SPECIES = 35 * len(_BEAKS) * 5


def make_synthetic_dataset(
    root: str | Path,
    *,
    num_classes: int = 6,
    images_per_class: int = 60,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Writes `train/`, `valid/`, `test/` (70/15/15 of each class), `masks/` and SYNTHETIC.json.

    A root already holding a dataset generated with the same parameters is reused as is; one
    generated with other parameters is regenerated; a non-empty folder without the marker is
    refused rather than overwritten.
    """
    if not 1 <= num_classes <= len(SPECIES):
        raise DataError(f"num_classes must be between 1 and {len(SPECIES)}, got {num_classes}")
    if images_per_class < 3:
        raise DataError(
            f"images_per_class must be at least 3 (train/valid/test), got {images_per_class}"
        )
    if image_size < 16:
        raise DataError(f"image_size must be at least 16 px, got {image_size}")
    root = Path(root)
    held_out = max(1, round(images_per_class * _HELD_OUT_FRACTION))
    counts = {"train": images_per_class - 2 * held_out, "valid": held_out, "test": held_out}
    species = SPECIES[:num_classes]
    params = {
        "generator": "vitbirds.data.synthetic",
        "version": GENERATOR_VERSION,
        "num_classes": num_classes,
        "images_per_class": images_per_class,
        "image_size": image_size,
        "seed": seed,
        "splits": counts,
        "classes": [asdict(s) for s in species],
    }
    marker = root / SYNTHETIC_MARKER
    if marker.is_file():
        if json.loads(marker.read_text()) == json.loads(json.dumps(params)):
            return root
        marker.unlink()
        for name in (*SPLITS, MASKS_DIR):
            shutil.rmtree(root / name, ignore_errors=True)
    elif root.is_dir() and any(root.iterdir()):
        raise DataError(f"{root} is not empty and holds no {SYNTHETIC_MARKER}: refusing to write")

    for class_index, spec in enumerate(species):
        index = 0
        for split in SPLITS:
            image_dir = root / split / spec.name
            mask_dir = root / MASKS_DIR / split / spec.name
            image_dir.mkdir(parents=True, exist_ok=True)
            mask_dir.mkdir(parents=True, exist_ok=True)
            for _ in range(counts[split]):
                rng = np.random.default_rng([seed, class_index, index])
                image, mask = render_bird(spec, rng, image_size)
                image.save(image_dir / f"{index:04d}.png")
                Image.fromarray(mask.astype(np.uint8) * 255).save(mask_dir / f"{index:04d}.png")
                index += 1
    marker.write_text(json.dumps(params, indent=2) + "\n")  # last: marks a complete dataset
    return root


def load_mask(image_path: str | Path) -> np.ndarray:
    """The bird mask (bool [H, W], True on the bird) of a synthetic image."""
    image_path = Path(image_path)
    root = image_path.parents[2]
    if not (root / SYNTHETIC_MARKER).is_file():
        raise DataError(
            f"{image_path} is not in a synthetic dataset (no {SYNTHETIC_MARKER} in {root})"
        )
    relative = image_path.relative_to(root).with_suffix(".png")
    mask_path = root / MASKS_DIR / relative
    if not mask_path.is_file():
        raise DataError(f"no mask for {image_path}: expected {mask_path}")
    return np.array(Image.open(mask_path)) > 127


def render_bird(
    spec: Species, rng: np.random.Generator, image_size: int, *, supersample: int = _SUPERSAMPLE
) -> tuple[Image.Image, np.ndarray]:
    """One RGB image of `spec` and its bool mask, both `image_size` square.

    `supersample` is the factor shapes are drawn at before downsampling; 2 is smooth enough
    from ~128 px up and draws a 224-px image ~3x faster than 4.
    """
    big = image_size * supersample
    canvas = _background(rng, big)
    bird = _draw_bird(spec, rng, round(big * rng.uniform(0.5, 0.7) * spec.size))
    bird = bird.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BICUBIC, expand=True)
    if rng.random() < 0.5:
        bird = bird.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if max(bird.size) > big:
        bird.thumbnail((big, big), Image.Resampling.LANCZOS)
    x = int(rng.integers(0, big - bird.width + 1))
    y = int(rng.integers(0, big - bird.height + 1))
    alpha = bird.getchannel("A")
    canvas.paste(bird, (x, y), alpha)
    mask = Image.new("L", (big, big), 0)
    mask.paste(alpha, (x, y))

    canvas = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    mask = mask.resize((image_size, image_size), Image.Resampling.BOX)
    # Sensor-like noise at the final resolution (drawn at 4x, it would average away).
    pixels = np.asarray(canvas, dtype=np.float32)
    pixels += rng.normal(0.0, rng.uniform(3.0, 12.0), pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image, np.asarray(mask) > 127


def many_species(count: int) -> list[Species]:
    """`count` distinct species (up to 525, Kaggle's count): 35 body colours x 3 beaks x 5
    wing/size variants, in that order of precedence, so even 525 classes differ in shape and
    colour and the hardest pairs differ only in beak or wing, as real congeners do."""
    if not 1 <= count <= MAX_SPECIES:
        raise DataError(f"number of species must be between 1 and {MAX_SPECIES}, got {count}")
    variants = [("plain", 1.0), ("striped", 1.0), ("spotted", 1.0), ("plain", 0.75),
                ("striped", 0.75)]  # fmt: skip
    species = []
    for index in range(count):
        colour_index, rest = divmod(index, len(_BEAKS) * len(variants))
        beak, (wing, size) = _BEAKS[rest // len(variants)], variants[rest % len(variants)]
        # 7 hues x 5 (saturation, value) levels: neighbours differ more than the per-image jitter.
        hue, level = divmod(colour_index, 5)
        saturation, value = ((0.9, 0.85), (0.55, 0.95), (0.9, 0.5), (0.35, 0.65), (0.7, 0.7))[level]
        red, green, blue = colorsys.hsv_to_rgb(hue / 7, saturation, value)
        body = (round(red * 255), round(green * 255), round(blue * 255))
        name = f"SPECIES {index + 1:03d} {_HUE_NAMES[hue]} {beak.upper()}BILL {wing.upper()}"
        species.append(Species(name, body, beak, wing, size))
    return species


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A two-colour gradient in a random direction, cluttered with random shapes."""
    start, end = rng.integers(0, 256, (2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-1.0, 1.0, size)
    t = np.clip(0.5 + 0.5 * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]), 0, 1)
    pixels = start + (end - start) * t[..., None]
    canvas = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 9))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = rng.uniform(-0.1, 1.0, 2) * size
        w, h = rng.uniform(0.05, 0.35, 2) * size
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
        else:
            draw.line((x0, y0, x0 + w, y0 + h), fill=colour, width=max(1, size // 40))
    return canvas


def _draw_bird(spec: Species, rng: np.random.Generator, size: int) -> Image.Image:
    """The bird facing right on a transparent `size` square; unit coordinates scaled by size."""
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    body = _shade(np.array(spec.body) + rng.integers(-20, 21, 3), rng.uniform(0.85, 1.15))
    dark = _shade(np.array(body), 0.6)

    def xy(*points: float) -> list[float]:
        return [p * size for p in points]

    draw.line(xy(0.42, 0.68, 0.40, 0.88), fill=_BEAK_COLOUR, width=max(1, size // 40))  # legs
    draw.line(xy(0.52, 0.68, 0.54, 0.88), fill=_BEAK_COLOUR, width=max(1, size // 40))
    draw.polygon(xy(0.25, 0.55, 0.02, 0.45, 0.04, 0.70), fill=dark)  # tail
    draw.ellipse(xy(0.20, 0.40, 0.70, 0.75), fill=body)  # body
    _draw_wing(draw, spec.wing, dark, xy(0.28, 0.47, 0.60, 0.64), size)
    draw.ellipse(xy(0.58, 0.22, 0.82, 0.46), fill=body)  # head
    draw.ellipse(xy(0.70, 0.29, 0.75, 0.34), fill=(250, 250, 250))  # eye
    draw.ellipse(xy(0.715, 0.305, 0.74, 0.33), fill=(10, 10, 10))
    beak = {
        "short": (0.79, 0.29, 0.90, 0.345, 0.79, 0.39),
        "long": (0.80, 0.31, 1.00, 0.36, 0.80, 0.37),
        "hooked": (0.79, 0.28, 0.92, 0.31, 0.90, 0.42, 0.80, 0.38),
    }[spec.beak]
    draw.polygon(xy(*beak), fill=_BEAK_COLOUR)
    return layer


def _draw_wing(
    draw: ImageDraw.ImageDraw,
    pattern: str,
    colour: tuple[int, int, int],
    box: list[float],
    size: int,
) -> None:
    draw.ellipse(box, fill=colour)
    x0, y0, x1, y1 = box
    light = (235, 235, 225)
    if pattern == "striped":
        for step in (0.25, 0.5, 0.75):
            x = x0 + (x1 - x0) * step
            draw.line(
                (x, y0 + 0.15 * (y1 - y0), x - 0.08 * size, y1 - 0.1 * (y1 - y0)),
                fill=light,
                width=max(1, size // 30),
            )
    elif pattern == "spotted":
        radius = 0.025 * size
        for fx, fy in ((0.3, 0.4), (0.55, 0.35), (0.45, 0.65), (0.7, 0.6)):
            cx, cy = x0 + (x1 - x0) * fx, y0 + (y1 - y0) * fy
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=light)


def _shade(colour: np.ndarray, factor: float) -> tuple[int, int, int]:
    r, g, b = np.clip(colour * factor, 0, 255).astype(int)
    return int(r), int(g), int(b)
