"""Train/eval transforms and batch mixing: shapes, determinism, and the maths of the jitter."""

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from vitbirds.config import DataConfig
from vitbirds.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ToNormalizedFloat,
    batch_mixer,
    eval_transform,
    mix_batch,
    train_transform,
)
from vitbirds.errors import ConfigError


@pytest.fixture
def image() -> torch.Tensor:
    """A uint8 [3, 90, 120] image with structure (so crops and flips change it)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8, generator=generator)


def test_train_transform_gives_normalised_float_images_of_image_size(image):
    transform = train_transform(DataConfig(image_size=48))
    out = transform(image)
    assert out.shape == (3, 48, 48) and out.dtype == torch.float32
    assert type(out) is torch.Tensor  # no tv_tensors subclass leaks into batches
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    assert transform(pil).shape == (3, 48, 48)


def test_train_transform_is_random(image):
    transform = train_transform(DataConfig(image_size=48))
    torch.manual_seed(0)
    first, second = transform(image), transform(image)
    assert not torch.equal(first, second)
    torch.manual_seed(0)
    assert torch.equal(transform(image), first)  # but seeded by torch's generator


@pytest.mark.parametrize(
    "options",
    [{"randaugment": True}, {"trivialaugment": True}, {"color_jitter": 0.0}],
)
def test_train_transform_options_keep_the_output_shape(image, options):
    out = train_transform(DataConfig(image_size=32, **options))(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_random_erasing_blanks_a_region(image):
    torch.manual_seed(0)
    erased = train_transform(DataConfig(image_size=32, random_erasing=1.0))(image)
    plain = train_transform(DataConfig(image_size=32))(image)
    assert (erased == 0).sum() >= 3 * 4  # the erased box is exactly 0 in every channel
    assert (plain == 0).sum() == 0


def test_eval_transform_is_deterministic_and_same_for_pil_and_tensor(image):
    transform = eval_transform(64)
    first = transform(image)
    assert first.shape == (3, 64, 64)
    assert torch.equal(transform(image), first)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    assert torch.equal(transform(pil), first)


def test_eval_transform_normalises_with_the_given_mean_and_std():
    gray = torch.full((3, 80, 80), 128, dtype=torch.uint8)
    out = eval_transform(64, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))(gray)
    expected = [(128 / 255 - 0.5) / 0.5, (128 / 255 - 0.25) / 0.25, 128 / 255]
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)
    default = eval_transform(64)(gray).mean(dim=(1, 2))
    imagenet = [(128 / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    assert torch.allclose(default, torch.tensor(imagenet), atol=1e-5)


def test_jitter_equals_torchvision_brightness_contrast_saturation_when_nothing_clips():
    image = (torch.rand(3, 20, 30, generator=torch.Generator().manual_seed(1)) * 100 + 80).round()
    image = image.to(torch.uint8)
    batch = torch.stack([image, image.flip(-1)])
    torch.manual_seed(3)
    ours = ToNormalizedFloat((0, 0, 0), (1, 1, 1), jitter=0.2)(batch)
    torch.manual_seed(3)
    factors = torch.empty(2, 3).uniform_(0.8, 1.2).tolist()  # one draw per image of the batch
    assert factors[0] != factors[1]
    for one, out, (brightness, contrast, saturation) in zip(batch, ours, factors, strict=True):
        reference = F.to_dtype(one, torch.float32, scale=True)
        reference = F.adjust_brightness(reference, brightness)
        reference = F.adjust_contrast(reference, contrast)
        reference = F.adjust_saturation(reference, saturation)
        assert not torch.allclose(reference, one / 255.0, atol=1e-2)  # it did change the image
        assert torch.allclose(out, reference, atol=1e-5)


def test_a_reusing_normaliser_overwrites_one_buffer_with_the_same_values():
    generator = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=generator)]
    batches += [batches[0].flip(0), batches[0][:3]]  # the last, smaller batch of an epoch
    fresh = ToNormalizedFloat(IMAGENET_MEAN, IMAGENET_STD)
    reusing = ToNormalizedFloat(IMAGENET_MEAN, IMAGENET_STD, reuse_batch_output=True)
    outputs = []
    for batch in batches:
        out = reusing(batch)
        assert torch.equal(out, fresh(batch))
        outputs.append(out)
    assert outputs[0] is outputs[1] and outputs[2] is not outputs[0]
    assert reusing(batches[0]) is outputs[0]  # a full batch again: the full batch's buffer
    assert fresh(batches[0]) is not fresh(batches[0])


def test_normalisation_refuses_float_input_and_other_shapes():
    with pytest.raises(TypeError, match="uint8"):
        ToNormalizedFloat(IMAGENET_MEAN, IMAGENET_STD)(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        ToNormalizedFloat(IMAGENET_MEAN, IMAGENET_STD)(torch.zeros(8, 8, dtype=torch.uint8))


def test_the_uint8_half_then_the_batch_half_equal_the_whole_transform(image):
    """The streaming loader crops in its decoding processes and normalises whole batches on the
    device: that must be the transform that Serve and the cache run on single images."""
    transform = train_transform(DataConfig(image_size=32, random_erasing=0.5))
    torch.manual_seed(7)
    whole = [transform(image) for _ in range(4)]
    torch.manual_seed(7)
    crops = []
    for _ in range(4):  # the RNG order of single images: crop, then jitter and erasing
        crop = transform.per_image(image).as_subclass(torch.Tensor)
        crops.append(transform.per_batch(crop.unsqueeze(0))[0])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(whole, crops, strict=True))
    crop = transform.per_image(image)
    assert crop.dtype == torch.uint8 and crop.shape == (3, 32, 32)


def test_random_erasing_draws_a_box_per_image_of_a_batch(image):
    finish = train_transform(DataConfig(image_size=32, random_erasing=1.0, color_jitter=0.0))
    crop = finish.per_image(image).as_subclass(torch.Tensor)
    batch = finish.per_batch(crop.unsqueeze(0).repeat(8, 1, 1, 1))
    erased = [(image == 0).all(dim=0) for image in batch]
    assert all(mask.any() for mask in erased)
    assert len({tuple(mask.nonzero()[0].tolist()) for mask in erased}) > 1  # not one box for all


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mix_batch_returns_soft_targets(mixup, cutmix):
    torch.manual_seed(0)
    images = torch.randn(8, 3, 16, 16)
    labels = torch.arange(8) % 4
    mixed, targets = mix_batch(images, labels, num_classes=4, mixup=mixup, cutmix=cutmix)
    assert mixed.shape == images.shape
    assert targets.shape == (8, 4)
    assert torch.allclose(targets.sum(dim=1), torch.ones(8))
    assert (targets.max(dim=1).values < 1).any()  # some probability moved to another class


def test_mix_batch_needs_an_alpha_and_batch_mixer_is_none_without_one():
    with pytest.raises(ConfigError):
        mix_batch(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), num_classes=2)
    assert batch_mixer(DataConfig(), num_classes=3) is None
    mixer = batch_mixer(DataConfig(mixup=0.5), num_classes=3)
    assert mixer is not None
    _, targets = mixer(torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
    assert targets.shape == (4, 3)
