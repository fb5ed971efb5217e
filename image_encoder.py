"""Image encoders: (N, C, H, W) images -> (N, embed_dim) features.

`ImageEncoder` is the project's own small ResNet, sized for 28x28 digits. `resnet18`
is torchvision's ResNet18 for colour photos, adapted to the small images a CPU can
train on; `load_torchvision_weights` starts it from weights the user already has.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGE_ENCODERS = ("resnet", "resnet18")
# ResNet18's stem (a 7x7 convolution of stride 2, then max-pooling) shrinks an image 4 times before
# the first block: right for 224 px, but a 64 px photo would reach its last stage as 2x2. Below this
# size the stem is one 3x3 convolution of stride 1 instead, as CIFAR ResNets have it.
SMALL_IMAGE = 96


class WeightsError(RuntimeError):
    """Pretrained weights cannot be loaded; the message names the file and the problem."""


def conv_bn(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    # No conv bias: the batch norm that follows has its own.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity shortcut (He et al., 2016)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = conv_bn(channels, channels)
        self.conv2 = conv_bn(channels, channels)
        # Starting each block as the identity makes deeper stacks train as fast as shallow ones.
        nn.init.zeros_(self.conv2[1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class ImageEncoder(nn.Module):
    """A stem at full resolution, then per stage a strided convolution that halves the
    resolution and widens the channels, followed by residual blocks; global average
    pooling and a linear projection to the shared embedding size."""

    def __init__(self, widths: tuple[int, ...], blocks_per_stage: int, embed_dim: int, in_channels: int = 1):
        super().__init__()
        layers: list[nn.Module] = [conv_bn(in_channels, widths[0]), nn.ReLU()]  # 28x28
        for in_width, out_width in zip(widths, widths[1:], strict=False):  # 14x14, 7x7, 4x4, ...
            layers += [conv_bn(in_width, out_width, stride=2), nn.ReLU()]
            layers += [ResidualBlock(out_width) for _ in range(blocks_per_stage)]
        self.features = nn.Sequential(*layers)
        self.projection = nn.Linear(widths[-1], embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(images)  # (N, C, H, W)
        return self.projection(x.mean(dim=(2, 3)))


def resnet18(embed_dim: int, in_channels: int, image_size: int) -> nn.Module:
    """torchvision's ResNet18, untrained, its classifier replaced by the projection to the shared
    embedding (`fc`), with a small-image stem below SMALL_IMAGE pixels."""
    from torchvision.models import resnet18 as torchvision_resnet18  # imported here: the digit models do not need it

    model = torchvision_resnet18(weights=None, num_classes=embed_dim, zero_init_residual=True)
    if image_size < SMALL_IMAGE:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


def load_torchvision_weights(encoder: nn.Module, path: Path) -> list[str]:
    """Load a torchvision ResNet18 state dict from `path` (such as resnet18-f37072fd.pth) into a
    `resnet18` encoder; nothing is downloaded. The classifier (`fc`), and a stem of another shape
    (the small-image stem), keep their fresh weights: returns their names. WeightsError in one line
    when the file is not such a state dict."""
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(
            f"--pretrained-weights {path} does not exist: give the path of a torchvision resnet18 .pth file"
        ) from None
    except Exception as error:  # a damaged or foreign file fails in torch.load in many ways
        raise WeightsError(
            f"--pretrained-weights {path} cannot be read as a state dict ({type(error).__name__})"
        ) from error
    if not isinstance(weights, dict) or not all(isinstance(value, torch.Tensor) for value in weights.values()):
        raise WeightsError(
            f"--pretrained-weights {path} is not a state dict of tensors: give torchvision's resnet18 weights"
        )
    own = encoder.state_dict()
    fitting = {name: value for name, value in weights.items() if name in own and own[name].shape == value.shape}
    missing = sorted(set(own) - set(fitting))
    if any(not name.startswith(("fc.", "conv1.")) for name in missing):
        raise WeightsError(
            f"--pretrained-weights {path} is not torchvision's resnet18: it lacks "
            f"{', '.join(n for n in missing if not n.startswith(('fc.', 'conv1.')))[:200]}"
        )
    encoder.load_state_dict(fitting, strict=False)
    return missing
