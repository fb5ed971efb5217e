"""The photo side: torchvision's ResNet18 as the image encoder, loading the user's weights, colour
normalisation and the random resized crop."""

from pathlib import Path

import pytest
import torch

from clip import CLIP, CLIPConfig
from dataset import PHOTO_MEAN, PHOTO_STD, normalize
from image_encoder import WeightsError, image_tower, load_pretrained_weights
from photos import random_resized_crop


@pytest.mark.parametrize("size, stem_stride, pooled", [(32, 1, False), (128, 2, True)])
def test_resnet18_has_a_small_image_stem_below_96_pixels(size: int, stem_stride: int, pooled: bool):
    encoder = image_tower("resnet18", embed_dim=16, in_channels=3, image_size=size)
    assert encoder.conv1.stride == (stem_stride, stem_stride)
    assert isinstance(encoder.maxpool, torch.nn.MaxPool2d) == pooled
    assert encoder(torch.randn(2, 3, size, size)).shape == (2, 16)


def test_a_clip_of_resnet18_embeds_colour_photos():
    config = CLIPConfig(
        image_encoder="resnet18", image_channels=3, image_size=32, text_encoder="transformer", text_characters="abc"
    )
    model = CLIP(config).eval()
    features = model.encode_image(torch.randn(3, 3, 32, 32))
    assert features.shape == (3, config.embed_dim)
    assert torch.allclose(features.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match="unknown image encoder"):
        CLIPConfig.from_dict(config.to_dict() | {"image_encoder": "vit"})


def torchvision_weights(path: Path) -> dict:
    """A state dict as torchvision ships resnet18's: its 224-pixel stem and a 1000-class classifier."""
    from torchvision.models import resnet18 as torchvision_resnet18

    weights = torchvision_resnet18(weights=None).state_dict()
    torch.save(weights, path)
    return weights


def test_torchvision_weights_load_except_the_classifier_and_a_small_stem(tmp_path: Path):
    weights = torchvision_weights(tmp_path / "resnet18.pth")
    encoder = image_tower("resnet18", embed_dim=16, in_channels=3, image_size=32)
    fresh = load_pretrained_weights(encoder, "resnet18", tmp_path / "resnet18.pth")
    assert fresh == ["conv1.weight", "fc.bias", "fc.weight"]
    assert torch.equal(encoder.layer3[1].conv2.weight, weights["layer3.1.conv2.weight"])
    assert torch.equal(encoder.bn1.running_var, weights["bn1.running_var"])
    large = image_tower("resnet18", embed_dim=16, in_channels=3, image_size=224)
    assert load_pretrained_weights(large, "resnet18", tmp_path / "resnet18.pth") == ["fc.bias", "fc.weight"]
    assert torch.equal(large.conv1.weight, weights["conv1.weight"])


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"not a checkpoint", "cannot be read"),
        ({"layer1.0.conv1.weight": torch.zeros(1)}, "is not torchvision's resnet18"),
        ([1, 2, 3], "not a state dict"),
    ],
)
def test_weights_that_are_not_resnet18s_give_one_line(tmp_path: Path, content, message: str):
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(WeightsError, match=message) as error:
        load_pretrained_weights(image_tower("resnet18", 16, 3, 32), "resnet18", path)
    assert "\n" not in str(error.value)


def test_colour_photos_are_normalised_per_channel():
    photos = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    photos[:, 1] = 255
    normalised = normalize(photos)
    expected = torch.tensor(
        [-PHOTO_MEAN[0] / PHOTO_STD[0], (1 - PHOTO_MEAN[1]) / PHOTO_STD[1], -PHOTO_MEAN[2] / PHOTO_STD[2]]
    )
    assert torch.allclose(normalised[0, :, 2, 2], expected)
    assert normalize(photos[:, 0]).shape == (2, 1, 4, 4)  # grey digits keep MNIST's single channel


def test_random_resized_crop_keeps_the_size_and_crops_flips_or_leaves_alone():
    left_red = torch.zeros(64, 3, 16, 16, dtype=torch.uint8)
    left_red[:, 0, :, :8] = 255
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(random_resized_crop(left_red, 1.0, False, generator), left_red)
    flipped = random_resized_crop(left_red, 1.0, True, generator)
    mirrored = (flipped[:, 0, :, :8] == 0).all(dim=(1, 2)) & (flipped[:, 0, :, 8:] == 255).all(dim=(1, 2))
    kept = (flipped == left_red).flatten(1).all(dim=1)
    assert (mirrored | kept).all() and 16 < mirrored.sum() < 48
    cropped = random_resized_crop(left_red, 0.3, False, generator)
    assert cropped.shape == left_red.shape and cropped.dtype == torch.uint8
    # A crop of part of the photo zooms in: the red half covers more or less than half of the output.
    red_share = (cropped[:, 0] > 127).float().mean(dim=(1, 2))
    assert (red_share - 0.5).abs().max() > 0.1
    assert torch.equal(
        random_resized_crop(left_red, 0.3, False, torch.Generator().manual_seed(1)),
        random_resized_crop(left_red, 0.3, False, torch.Generator().manual_seed(1)),
    )
