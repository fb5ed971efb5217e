"""Users' own pictures, converted to look like the images of the data set a model was trained on:
any size, dark ink on light paper or the reverse; and scikit-learn's digits converted the same way, to
measure how well a model reads handwriting from writers it never saw."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageOps, UnidentifiedImageError

from dataset import IMAGE_SIZE, Split
from embeddings import class_embeddings, embed_images
from figures import plot_misclassified
from metrics import zero_shot_classification


def load_user_image(path: Path, dataset: str = "mnist") -> torch.Tensor:
    """An image file -> (28, 28) uint8 in the style of the data set's images; ImageError says why it cannot be."""
    return in_style_of(dataset)(read_image_file(path))


def in_style_of(dataset: str) -> Callable[[Image.Image], torch.Tensor]:
    """The conversion that turns a user's picture into an image like the data set's."""
    return to_fashion_style if dataset == "fashion" else to_mnist_style


def read_image_file(path: Path) -> Image.Image:
    """Decode an image file whole (an animation's first frame); ImageError with the reason when impossible."""
    if path.is_dir():
        raise ImageError("it is a folder, not an image file")
    try:
        with warnings.catch_warnings():
            # Pillow refuses more than twice MAX_IMAGE_PIXELS but only warns above it: refuse both, before decoding.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return image
    except (FileNotFoundError, PermissionError) as error:
        raise ImageError(f"cannot open it: {error.strerror}") from error
    except UnidentifiedImageError as error:
        raise ImageError("not a picture: the file is empty or of a kind Pillow cannot read") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(
            f"refused: more than {Image.MAX_IMAGE_PIXELS:,} pixels, too large for a digit (a decompression bomb?)"
        ) from error
    except Exception as error:  # Pillow reports damaged data as OSError, SyntaxError, ValueError, struct.error and more
        raise ImageError(f"the picture is damaged or truncated ({type(error).__name__}: {error})") from error


def bright_on_black(image: Image.Image, thing: str) -> np.ndarray:
    """A PIL picture of one thing (a digit, a garment), dark on light or light on dark, any size and
    mode -> (H, W) float in [0, 1]: the thing bright on black, as MNIST and Fashion-MNIST hold them,
    cropped to it. ImageError says why when no `thing` is to be found."""
    if image.width == 0 or image.height == 0:
        raise ImageError(f"the picture has no pixels ({image.width}x{image.height})")
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # 16- and 32-bit grey, mapped onto 8 bits by the range its values use: [0, 1] for a float
        # picture within it, else the smallest 2^n - 1 (n >= 8) that holds its brightest pixel, so
        # that a dim 10- or 12-bit scan stored in 16 bits is not read as blank. NaN is paper.
        with np.errstate(invalid="ignore"):  # converting a signalling NaN warns; it is paper all the same
            values = np.asarray(image).astype(np.float64)
        peak = values[np.isfinite(values)].max(initial=0.0)
        full_scale = 1.0 if image.mode == "F" and peak <= 1 else max(255.0, 2.0 ** np.ceil(np.log2(peak + 1)) - 1)
        pixels = np.nan_to_num(values, nan=0.0, posinf=full_scale, neginf=0.0).clip(0, full_scale) * (
            255.0 / full_scale
        )
    else:
        try:
            rgba = image.convert("RGBA")  # every other mode, transparency included
        except ValueError as error:
            raise ImageError(
                f"pictures in colour mode {image.mode} are not supported: save it as PNG or JPEG"
            ) from error
        # Transparent pixels are paper: composite onto white.
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        pixels = np.asarray(Image.alpha_composite(paper, rgba).convert("L"), dtype=np.float64)
    background = np.median(
        np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    )  # the paper, at the border
    if background - pixels.min() > pixels.max() - background:  # darker than the paper: make it the bright part
        pixels, background = 255.0 - pixels, 255.0 - background
    contrast = pixels.max() - background
    if contrast < 32:
        raise ImageError(f"no {thing} found: the picture is blank or has too little contrast")
    bright = np.clip((pixels - background) / contrast, 0.0, 1.0)
    rows, cols = np.nonzero(bright > 0.2)
    return bright[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def resized(picture: np.ndarray, longest: int) -> np.ndarray:
    """(H, W) in [0, 1] -> scaled to `longest` pixels on its longer side, keeping its aspect ratio, in [0, 255]."""
    height, width = picture.shape
    scale = longest / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(
        Image.fromarray((picture * 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS), dtype=np.float64
    )


def placed(picture: np.ndarray, top: float, left: float) -> torch.Tensor:
    """`picture` put on a black 28x28 canvas at (top, left), rounded and kept inside, as uint8."""
    top = int(np.clip(round(top), 0, IMAGE_SIZE - picture.shape[0]))
    left = int(np.clip(round(left), 0, IMAGE_SIZE - picture.shape[1]))
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE))
    canvas[top : top + picture.shape[0], left : left + picture.shape[1]] = picture
    return torch.from_numpy(canvas.clip(0, 255).round().astype(np.uint8))


def to_mnist_style(image: Image.Image) -> torch.Tensor:
    """A PIL image of a digit -> (28, 28) uint8 as MNIST was made: white ink on black, the ink
    fitted into 20x20 keeping its aspect ratio and centred by its centre of mass.
    ImageError says why when there is no digit to be found."""
    digit = resized(bright_on_black(image, "digit"), 20)
    total = digit.sum()
    if total == 0:
        raise ImageError("no digit found: the ink vanished when scaled to 20x20")
    grid_rows, grid_cols = np.indices(digit.shape)
    com_row, com_col = (grid_rows * digit).sum() / total, (grid_cols * digit).sum() / total
    return placed(digit, IMAGE_SIZE / 2 - com_row, IMAGE_SIZE / 2 - com_col)


def to_fashion_style(image: Image.Image) -> torch.Tensor:
    """A PIL photo of one garment -> (28, 28) uint8 as Fashion-MNIST was made: grey, the garment
    bright on black, its longer side scaled to 28 pixels and centred. ImageError says why when
    there is nothing to be found."""
    garment = resized(bright_on_black(image, "garment"), IMAGE_SIZE)
    return placed(garment, (IMAGE_SIZE - garment.shape[0]) / 2, (IMAGE_SIZE - garment.shape[1]) / 2)


PICTURE_SIZE = 64  # pixels of the enlarged picture, about what a digit spans in a phone photo cropped to it


def load_user_style_digits(size: int = PICTURE_SIZE, resample: Image.Resampling = Image.Resampling.BICUBIC) -> Split:
    """The 1,797 digits as (N, 28, 28) uint8 images in MNIST's style, each made from a `size` x `size`
    dark-on-light picture of it, and their labels."""
    from sklearn.datasets import load_digits  # imported here, as dataset.py does: only this needs it

    digits = load_digits()
    images = []
    for pixels in digits.images:  # (8, 8), ink from 0 (none) to 16 (full)
        picture = Image.fromarray(np.round(255 - pixels * (255 / 16)).astype(np.uint8))
        images.append(to_mnist_style(picture.resize((size, size), resample)))
    return Split(torch.stack(images), torch.tensor(digits.target, dtype=torch.int64))


def score_user_style(model, split: Split, precision: str = "fp32") -> dict:
    """Zero-shot top-1 accuracy on `split`, overall and per digit, as metrics.py counts it; which
    images it reads wrong (`misread`, their indices) and as what (`read_as`)."""
    features, classes = embed_images(model, split.images, precision), class_embeddings(model)
    result = zero_shot_classification(features, classes, split.labels.to(features.device))
    read_as = (features @ classes.T).argmax(dim=1).cpu()
    misread = (read_as != split.labels).nonzero()[:, 0]
    return {
        "accuracy": result["top1_accuracy"],
        "per_digit_accuracy": result["per_digit_accuracy"],
        "misread": misread.tolist(),
        "read_as": read_as[misread].tolist(),
    }


def plot_misread(split: Split, result: dict) -> Figure:
    """The digits of `split` that `result` (from score) says were read wrong, each titled "true -> read as"."""
    misread = torch.tensor(result["misread"], dtype=torch.long)
    title = f"scikit-learn's digits read wrong, {len(misread)} of {len(split):,}: true -> predicted"
    return plot_misclassified(
        split.images[misread], split.labels[misread], torch.tensor(result["read_as"]), title=title
    )


def describe_user_style(result: dict) -> str:
    per_digit = "  ".join(f"{digit}:{accuracy:.1%}" for digit, accuracy in enumerate(result["per_digit_accuracy"]))
    return f"scikit-learn's 1,797 digits as users' pictures: {result['accuracy']:.1%}\n  per digit  {per_digit}"


class ImageError(ValueError):
    """A picture cannot be turned into a digit; the message says why."""
