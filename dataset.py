"""MNIST, Fashion-MNIST and an offline stand-in as uint8 tensors, batched on the training device.

A split is one (N, 28, 28) uint8 image tensor and one (N,) int64 label tensor.
MNIST is small enough to live on the device whole, so batches are made by
indexing with a random permutation and augmented per batch on the device: no
DataLoader workers, no per-sample PIL conversion (the airbench recipe).
Users' own picture files are read here too, and converted as MNIST was made.
"""

from __future__ import annotations

import math
import struct
import urllib.error
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

IMAGE_SIZE = 28
# Mean and standard deviation of MNIST's training pixels, scaled to [0, 1].
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# Colour photos are normalised per channel as torchvision's pretrained ResNets expect (ImageNet's statistics).
PHOTO_MEAN, PHOTO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
DATASETS = ("mnist", "fashion", "digits")
# Each data set's classes, in label order, and the folder torchvision keeps its files in.
CLASS_NAMES = {
    "mnist": tuple(str(digit) for digit in range(10)),
    "digits": tuple(str(digit) for digit in range(10)),
    "fashion": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
}
TORCHVISION_NAMES = {"mnist": "MNIST", "fashion": "FashionMNIST"}


class DataError(RuntimeError):
    """A data set cannot be loaded; the message says why and what to do."""


@dataclass
class Split:
    images: torch.Tensor  # (N, 28, 28) uint8, white digit on black as in MNIST
    labels: torch.Tensor  # (N,) int64 digit

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split


def load_splits(dataset: str, data_dir: str | Path, val_size: int, split_seed: int = 0) -> Splits:
    """Train/validation/test splits of `dataset`; validation is held out from train."""
    if dataset in TORCHVISION_NAMES:
        train, test = load_idx_dataset(dataset, data_dir)
    elif dataset == "digits":
        train, test = load_sklearn_digits()
    else:
        raise DataError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    if not 0 < val_size < len(train):
        raise DataError(f"--val-size must be between 1 and {len(train) - 1} for {dataset}, got {val_size}")
    # A fixed split seed keeps the validation images the same whatever the training seed.
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = order[:val_size], order[val_size:]
    return Splits(
        train=Split(train.images[train_idx], train.labels[train_idx]),
        val=Split(train.images[val_idx], train.labels[val_idx]),
        test=test,
    )


def load_idx_dataset(dataset: str, data_dir: str | Path) -> tuple[Split, Split]:
    """MNIST's or Fashion-MNIST's 60,000 training and 10,000 test images via torchvision, downloaded if missing."""
    import torchvision.datasets  # imported here: the offline data set does not need it

    name = TORCHVISION_NAMES[dataset]
    root = Path(data_dir)
    raw = root / name / "raw"
    if root.exists() and not root.is_dir():
        raise DataError(f"--data-dir {root} is a file, not a folder")
    if all((raw / file).is_file() for file in IDX_FILES):
        # Nothing will be downloaded: check the files first, as torchvision's reader fails obscurely on damaged ones.
        check_idx_files(raw)
    # What is there before a download, which creates folders and files even when it then fails.
    folders_before = {folder for folder in (root, root / name, raw) if folder.is_dir()}
    files_before = set(raw.iterdir()) if raw.is_dir() else set()
    try:
        splits = [getattr(torchvision.datasets, name)(str(root), train=train, download=True) for train in (True, False)]
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        missing = [file for file in IDX_FILES if not (raw / file).exists()]
        if not missing:
            raise DataError(
                f"could not read {name} in {raw}: {error}; delete the folder to download it afresh"
            ) from error
        remove_failed_download(raw, files_before, folders_before)
        absent = f"--data-dir {root} does not exist" if root not in folders_before else f"{name} is not in {raw}"
        raise DataError(
            f"{absent} and could not be downloaded ({type(error).__name__}); "
            f"put the files {', '.join(IDX_FILES)} in {raw}, or run offline with --dataset digits"
        ) from error
    return tuple(Split(s.data.clone(), s.targets.clone()) for s in splits)


def remove_failed_download(raw: Path, files_before: set[Path], folders_before: set[Path]) -> None:
    """Remove the partial files and the folders that a failed download created in `raw` and above
    it, so that the user's own copy of the files, or the next try, starts from what was there."""
    if raw.is_dir():
        for path in set(raw.iterdir()) - files_before:
            if path.is_file():
                path.unlink()
    for folder in (raw, raw.parent, raw.parent.parent):
        if folder not in folders_before and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def check_idx_files(raw: Path) -> None:
    """Check the four IDX files of MNIST or Fashion-MNIST in `raw` by headers and sizes; DataError names a bad one."""
    for prefix in ("train", "t10k"):
        images, labels = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
        n_images, n_labels = check_idx_file(images, (IMAGE_SIZE, IMAGE_SIZE)), check_idx_file(labels, ())
        if n_images != n_labels:
            raise DataError(
                f"{images} holds {n_images:,} images but {labels} {n_labels:,} labels; delete both to download them "
                "afresh"
            )


def check_idx_file(path: Path, item_shape: tuple[int, ...]) -> int:
    """The number of items in `path`, an uncompressed IDX file of uint8 items of `item_shape`
    as MNIST and Fashion-MNIST ship them: a magic number (0, 0, 0x08 for uint8, number of dimensions), one
    big-endian uint32 size per dimension, then the bytes. DataError naming the file otherwise."""
    ndim = 1 + len(item_shape)
    kind = "image" if item_shape else "label"
    fresh = "delete it to download it afresh"
    try:
        with path.open("rb") as file:
            header = file.read(4 + 4 * ndim)
        size = path.stat().st_size
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror}") from error
    if len(header) < 4 + 4 * ndim or header[:4] != bytes((0, 0, 0x08, ndim)):
        raise DataError(f"{path} is not an IDX {kind} file as MNIST ships them; {fresh}")
    count, *shape = struct.unpack(f">{ndim}I", header[4:])
    if tuple(shape) != item_shape:
        raise DataError(f"{path} holds items of shape {tuple(shape)}, not {item_shape}; {fresh}")
    expected = len(header) + count * math.prod(item_shape)
    if size != expected:
        problem = "is truncated" if size < expected else "is longer than its header says"
        raise DataError(f"{path} {problem} ({size:,} bytes, expected {expected:,}); {fresh}")
    return count


def load_sklearn_digits(test_size: int = 360) -> tuple[Split, Split]:
    """scikit-learn's bundled 1,797 handwritten 8x8 digits, scaled to look like MNIST."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    # MNIST digits fill a 20x20 box centred in 28x28.
    images = F.interpolate(images, size=(20, 20), mode="bilinear", align_corners=False)
    images = F.pad(images, (4, 4, 4, 4))[:, 0]
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test_idx, train_idx = order[:test_size], order[test_size:]
    return Split(images[train_idx], labels[train_idx]), Split(images[test_idx], labels[test_idx])


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 grey (N, H, W) -> float (N, 1, H, W) with MNIST's mean and std; uint8 colour
    (N, 3, H, W) -> float (N, 3, H, W) with ImageNet's, per channel."""
    if images.ndim == 3:
        return ((images.float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)
    mean, std = (torch.tensor(values, device=images.device)[:, None, None] for values in (PHOTO_MEAN, PHOTO_STD))
    return (images.float() / 255.0 - mean) / std


def model_input(images: torch.Tensor) -> torch.Tensor:
    """What the image encoder reads: uint8 images normalised (channels last, the faster layout for convolutions
    on CPUs and GPUs alike), or a locked tower's cached (N, F) features as they are (feature_cache.py)."""
    if images.dtype != torch.uint8:
        return images
    return normalize(images).contiguous(memory_format=torch.channels_last)


@dataclass
class Augmentation:
    """How training images are varied, each its own way, on the device: the small changes of
    handwriting or photography that the data set lacks."""

    max_shift: float = 2.0  # pixels
    max_rotation: float = 10.0  # degrees
    max_scale: float = 0.1  # scaled by up to a factor 1 +- max_scale
    flip: bool = False  # mirror half the images left to right: right for clothes, wrong for digits
    erase: float = (
        0.0  # the share of images in which a random rectangle is blanked (random erasing, Zhong et al., 2020)
    )
    stroke: float = 0.0  # the share of images whose strokes are drawn thicker or thinner (random_stroke_width)

    @property
    def varies(self) -> bool:
        """Whether it changes the images at all."""
        return any((self.max_shift, self.max_rotation, self.max_scale, self.flip, self.erase, self.stroke))

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.stroke > 0:
            images = random_stroke_width(images, self.stroke, generator)
        moved = random_affine(images, self.max_shift, self.max_rotation, self.max_scale, generator, self.flip)
        return random_erase(moved, self.erase, generator) if self.erase > 0 else moved


def random_stroke_width(images: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Draw the strokes of each (N, H, W) uint8 image thicker or thinner, with the given probability,
    by a random amount of up to a pixel on each side: the image blended with its grey-scale dilation
    or erosion over 3x3 neighbourhoods. MNIST's writers used pens of much the same width; a finger,
    a mouse or a marker draws wider or thinner (see pictures.py)."""
    u = torch.rand(2, images.shape[0], device=images.device, generator=generator)
    # -1: the thinnest, 0: as written, 1: the thickest. Every image is computed, the unchosen as written:
    # picking the chosen out would wait for the device once a step.
    amount = torch.where(u[1] < probability, u[0] * 2 - 1, 0.0)[:, None, None]
    widest = torch.where(amount > 0, extreme_3x3(images, torch.maximum), extreme_3x3(images, torch.minimum))
    written = images.float()
    return (written + amount.abs() * (widest.float() - written)).round().to(torch.uint8)


def extreme_3x3(images: torch.Tensor, pick: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Each pixel of (N, H, W) images replaced by the largest (pick=torch.maximum) or smallest of its 3x3
    neighbourhood, black beyond the border: grey-scale dilation or erosion. Maxima of shifted views take
    a fraction of max_pool2d's time on a CPU, where pooling a single channel is slow."""
    padded = F.pad(images, (1, 1, 1, 1))
    rows = pick(pick(padded[:, :-2], padded[:, 1:-1]), padded[:, 2:])
    return pick(pick(rows[:, :, :-2], rows[:, :, 1:-1]), rows[:, :, 2:])


def random_affine(
    images: torch.Tensor,
    max_shift: float,
    max_rotation: float,
    max_scale: float,
    generator: torch.Generator,
    flip: bool = False,
) -> torch.Tensor:
    """Move each (N, H, W) uint8 image by its own random shift (up to `max_shift` pixels),
    rotation (up to `max_rotation` degrees) and scaling (by up to a factor 1 +- `max_scale`),
    and mirror half of them if `flip`; zero-filled."""
    n, h, w = images.shape
    u = torch.rand(4, n, device=images.device, generator=generator) * 2 - 1  # (4, N) uniform in [-1, 1]
    angle = u[0] * math.radians(max_rotation)
    scale = 1 + u[1] * max_scale
    # affine_grid maps each output pixel to where it is read from: the inverse transform.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift_x, shift_y = u[2] * 2 * max_shift / w, u[3] * 2 * max_shift / h  # in [-1, 1] image coordinates
    theta = torch.stack(
        [torch.stack([cos, -sin, shift_x], dim=1), torch.stack([sin, cos, shift_y], dim=1)], dim=1
    )  # (N, 2, 3)
    if flip:  # reading column -x for column x mirrors the image
        theta[:, :, 0] *= torch.where(torch.rand(n, device=images.device, generator=generator) < 0.5, -1.0, 1.0)[
            :, None
        ]
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    moved = F.grid_sample(images[:, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return moved[:, 0].round().clamp(0, 255).to(torch.uint8)


def random_erase(images: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Blank a random rectangle, of 2% to 33% of the image and an aspect ratio of 0.3 to 3.3,
    in each (N, H, W) image with the given probability: the model must recognise a garment
    from any of its parts."""
    n, h, w = images.shape
    u = torch.rand(5, n, device=images.device, generator=generator)
    area = (0.02 + 0.31 * u[0]) * h * w
    aspect = torch.exp(math.log(0.3) + u[1] * (math.log(3.3) - math.log(0.3)))
    height, width = (area * aspect).sqrt().clamp(max=h), (area / aspect).sqrt().clamp(max=w)
    top, left = u[2] * (h - height), u[3] * (w - width)
    rows, cols = (
        torch.arange(h, device=images.device)[None, :, None],
        torch.arange(w, device=images.device)[None, None, :],
    )
    inside_rows = (rows >= top[:, None, None]) & (rows < (top + height)[:, None, None])
    inside_cols = (cols >= left[:, None, None]) & (cols < (left + width)[:, None, None])
    return images.masked_fill(inside_rows & inside_cols & (u[4] < probability)[:, None, None], 0)


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """The indices of each full batch of a random order of n items, on the generator's device."""
    order = torch.randperm(n, device=generator.device, generator=generator)
    return (order[start : start + batch_size] for start in range(0, n - batch_size + 1, batch_size))
