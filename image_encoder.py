"""ResNet image encoder: (N, 1, 28, 28) images -> (N, embed_dim) features."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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

    def __init__(self, widths: tuple[int, ...], blocks_per_stage: int, embed_dim: int):
        super().__init__()
        layers: list[nn.Module] = [conv_bn(1, widths[0]), nn.ReLU()]  # 28x28
        for in_width, out_width in zip(widths, widths[1:], strict=False):  # 14x14, 7x7, 4x4, ...
            layers += [conv_bn(in_width, out_width, stride=2), nn.ReLU()]
            layers += [ResidualBlock(out_width) for _ in range(blocks_per_stage)]
        self.features = nn.Sequential(*layers)
        self.projection = nn.Linear(widths[-1], embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(images)  # (N, C, H, W)
        return self.projection(x.mean(dim=(2, 3)))
