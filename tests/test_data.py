import gzip
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from dataset import (
    CLASS_NAMES,
    IDX_FILES,
    Augmentation,
    DataError,
    load_idx_dataset,
    load_splits,
    random_affine,
    random_erase,
    random_stroke_width,
)
from pictures import to_fashion_style, to_mnist_style


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX file as MNIST ships it: magic (0, 0, uint8 code, ndim), sizes, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_tiny_mnist(root: Path, n_train: int = 40, n_test: int = 20, folder: str = "MNIST") -> None:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def test_fashion_mnist_is_read_from_its_own_folder_with_its_class_names(tmp_path):
    write_tiny_mnist(tmp_path, folder="FashionMNIST")
    splits = load_splits("fashion", tmp_path, val_size=10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 20)
    assert CLASS_NAMES["fashion"][7] == "Sneaker"


def test_torchvision_loader_reads_idx_files_in_torchvision_layout(tmp_path):
    write_tiny_mnist(tmp_path)
    train, test = load_idx_dataset("mnist", tmp_path)
    assert train.images.shape == (40, 28, 28) and train.images.dtype == torch.uint8
    assert test.labels.tolist() == [i % 10 for i in range(20)]
    splits = load_splits("mnist", tmp_path, val_size=10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 20)


def test_missing_mnist_without_network_names_folder_files_and_offline_option(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", no_network)
    with pytest.raises(DataError) as error:
        load_idx_dataset("mnist", tmp_path / "empty")
    message = str(error.value)
    assert str(tmp_path / "empty" / "MNIST" / "raw") in message
    assert all(name in message for name in IDX_FILES)
    assert "--dataset digits" in message and "\n" not in message


def test_a_failed_download_leaves_nothing_behind_but_what_was_there(tmp_path, monkeypatch):
    def partial_download(url, download_root, **kwargs):
        Path(download_root, Path(url).name).write_bytes(b"half a file")  # torchvision made the folders already
        raise urllib.error.URLError("connection reset")

    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", partial_download)
    with pytest.raises(DataError, match="could not be downloaded"):
        load_idx_dataset("mnist", tmp_path / "data")
    assert not (tmp_path / "data").exists()

    raw = tmp_path / "mine" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "notes.txt").write_text("the user's own")
    with pytest.raises(DataError, match="could not be downloaded"):
        load_idx_dataset("mnist", tmp_path / "mine")
    assert [path.name for path in raw.iterdir()] == ["notes.txt"]


def test_offline_digits_look_like_mnist_and_splits_are_disjoint():
    splits = load_splits("digits", "unused", val_size=300)
    assert splits.train.images.shape[1:] == (28, 28) and splits.train.images.dtype == torch.uint8
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    # The 4-pixel border of MNIST-style images is empty.
    assert splits.test.images[:, :4].max() == 0 and splits.test.images[:, :, -4:].max() == 0
    assert set(splits.test.labels.tolist()) == set(range(10))


def blob(n: int) -> torch.Tensor:
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[:, 12:17, 10:19] = 255
    return images


def centre_of_mass(images: torch.Tensor) -> torch.Tensor:
    """(N, 2) row and column centres of mass."""
    weights = images.float()
    grid = torch.arange(28.0)
    total = weights.sum(dim=(1, 2))
    return torch.stack([(weights.sum(2) * grid).sum(1) / total, (weights.sum(1) * grid).sum(1) / total], dim=1)


def test_random_affine_without_range_is_the_identity():
    images = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8)
    assert torch.equal(random_affine(images, 0, 0, 0, torch.Generator().manual_seed(0)), images)


def test_random_affine_shifts_each_image_within_max_shift():
    moved = random_affine(blob(64), 2, 0, 0, torch.Generator().manual_seed(0))
    offsets = centre_of_mass(moved) - centre_of_mass(blob(1))
    assert offsets.abs().max() <= 2.01 and offsets.std(dim=0).min() > 0.5  # bounded, and different per image
    assert torch.allclose(moved.float().sum(dim=(1, 2)), blob(1).float().sum(), rtol=0.02)  # nothing cut off


def test_flips_mirror_about_half_the_images_and_nothing_else():
    images = torch.zeros(200, 28, 28, dtype=torch.uint8)
    images[:, 10:18, 3:9] = 255  # a bar on the left
    moved = Augmentation(max_shift=0, max_rotation=0, max_scale=0, flip=True)(images, torch.Generator().manual_seed(0))
    mirrored = [torch.equal(m, i.flip(1)) for m, i in zip(moved, images, strict=True)]
    kept = [torch.equal(m, i) for m, i in zip(moved, images, strict=True)]
    assert all(a or b for a, b in zip(mirrored, kept, strict=True)) and 70 < sum(mirrored) < 130


def test_random_erasing_blanks_one_rectangle_in_the_asked_share_of_images():
    images = torch.full((400, 28, 28), 200, dtype=torch.uint8)
    erased = random_erase(images, 0.5, torch.Generator().manual_seed(0))
    blanked = (erased == 0).sum(dim=(1, 2))
    assert 160 < (blanked > 0).sum() < 240  # about half the images
    areas = blanked[blanked > 0].float() / (28 * 28)
    assert areas.min() > 0.005 and areas.max() < 0.4  # 2-33% of the image, give or take the rounding to whole pixels
    rows, cols = (erased[blanked.argmax()] == 0).nonzero().T
    assert (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) == blanked.max()  # a filled rectangle
    assert torch.equal(random_erase(images, 0.0, torch.Generator().manual_seed(0)), images)


def test_stroke_width_varies_in_the_asked_share_of_images_by_up_to_a_pixel_each_side():
    images = torch.zeros(400, 28, 28, dtype=torch.uint8)
    images[:, 6:22, 12:15] = 255  # a bar 3 pixels wide
    varied = random_stroke_width(images, 0.5, torch.Generator().manual_seed(0))
    ink = varied.float().sum(dim=(1, 2)) / (255 * 16)  # the bar's width in pixels, at its middle rows' length
    changed = ~torch.isclose(ink, torch.tensor(3.0))
    assert 160 < changed.sum() < 240  # about half the images
    assert (ink > 3.1).any() and (ink < 2.9).any()  # thicker and thinner
    # Never thinner than its core, nor wider by more than a pixel a side (and a pixel longer or shorter at each end).
    assert ink.min() >= 1 * 14 / 16 - 0.01 and ink.max() <= 5 * 18 / 16 + 0.01
    assert torch.allclose(centre_of_mass(varied), centre_of_mass(images[:1]), atol=1e-4)  # where it was
    assert torch.equal(random_stroke_width(images, 0.0, torch.Generator().manual_seed(0)), images)


def test_random_affine_rotates_and_scales_about_the_centre():
    moved = random_affine(blob(64), 0, 30, 0.2, torch.Generator().manual_seed(0))
    assert (centre_of_mass(moved) - centre_of_mass(blob(1))).abs().max() < 0.6
    ink_area = (moved > 127).sum(dim=(1, 2)).float()
    assert ink_area.std() > 2  # sizes and angles vary per image
    assert not torch.equal(moved, blob(64))


@pytest.mark.parametrize(
    "size, mode, ink, paper",
    [((300, 200), "RGB", (20, 20, 80), (250, 245, 230)), ((64, 90), "L", 0, 255), ((40, 40), "L", 255, 0)],
)
def test_user_pictures_become_mnist_style(size, mode, ink, paper):
    image = Image.new(mode, size, paper)
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.line([(w * 0.3, h * 0.2), (w * 0.45, h * 0.85)], fill=ink, width=max(2, w // 15))  # a slanted "1"
    digit = to_mnist_style(image).float()
    assert digit.shape == (28, 28)
    assert digit.max() == 255 and digit[0].max() == 0  # bright ink on a black background
    rows, cols = torch.nonzero(digit > 50, as_tuple=True)
    assert rows.max() - rows.min() <= 20 and cols.max() - cols.min() <= 20  # fits MNIST's 20x20 box
    grid = torch.arange(28.0)
    assert abs((digit.sum(1) * grid).sum() / digit.sum() - 14) <= 1  # centred by centre of mass
    assert abs((digit.sum(0) * grid).sum() / digit.sum() - 14) <= 1


def test_blank_picture_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="no digit"):
        to_mnist_style(Image.new("RGB", (50, 50), "white"))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def garble_header(path: Path) -> None:
    path.write_bytes(b"\xff\xd8\xff\xe0" + path.read_bytes()[4:])


def gzip_in_place(path: Path) -> None:
    path.write_bytes(gzip.compress(path.read_bytes()))


def labels_in_place_of_images(path: Path) -> None:
    path.write_bytes((path.parent / "train-labels-idx1-ubyte").read_bytes())


def fewer_labels(path: Path) -> None:
    write_idx(path, np.arange(39) % 10)


@pytest.mark.parametrize(
    "damage, name, problem",
    [
        (truncate, "train-images-idx3-ubyte", "is truncated"),
        (garble_header, "t10k-images-idx3-ubyte", "is not an IDX image file"),
        (gzip_in_place, "t10k-labels-idx1-ubyte", "is not an IDX label file"),
        (labels_in_place_of_images, "train-images-idx3-ubyte", "is not an IDX image file"),
        (fewer_labels, "train-labels-idx1-ubyte", "holds 40 images but .* 39 labels"),
    ],
)
def test_damaged_mnist_files_are_named_with_a_fresh_download_suggested(damage, name: str, problem: str, tmp_path: Path):
    write_tiny_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    damage(raw / name)
    with pytest.raises(DataError, match=problem) as error:
        load_idx_dataset("mnist", tmp_path)
    message = str(error.value)
    assert str(raw / name) in message and "afresh" in message and "\n" not in message


def test_a_data_dir_that_does_not_exist_is_reported_as_such(tmp_path: Path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", no_network)
    with pytest.raises(DataError, match=f"--data-dir {tmp_path / 'typo'} does not exist"):
        load_idx_dataset("mnist", tmp_path / "typo")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(DataError, match="is a file, not a folder"):
        load_idx_dataset("mnist", tmp_path / "a-file")


def test_a_garment_photo_becomes_fashion_mnist_style():
    photo = Image.new("RGB", (300, 400), (245, 245, 240))  # a product photo: light background
    ImageDraw.Draw(photo).rectangle((100, 50, 200, 350), fill=(40, 60, 90))  # a tall, dark garment
    garment = to_fashion_style(photo)
    rows, cols = (garment > 127).nonzero().T
    assert (rows.min(), rows.max()) == (0, 27)  # its longer side fills the 28 pixels, as in Fashion-MNIST...
    assert (
        cols.min() >= 8 and cols.max() <= 19 and abs((cols.min() + cols.max()) / 2 - 13.5) <= 1
    )  # ...keeping its shape, centred
    assert garment[:, :5].max() == 0 and garment[:, -5:].max() == 0  # the background is black
