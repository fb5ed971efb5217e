"""How well a model reads people's own handwriting: scikit-learn's 1,797 handwritten digits, from
writers the model never saw, converted as a user's picture is (`inference.py --image`, demo.py).

python user_style_digits.py --checkpoint runs/<run>/best.pt   # accuracy overall and per digit
python user_style_digits.py --checkpoint runs/<run>/best.pt --figure misread.png   # and the digits it reads wrong
(inference.py --evaluate reports it too, for a model trained on MNIST)

Each 8x8 digit is drawn dark on light, enlarged as a small scan or photo would be, and put through
dataset.to_mnist_style. A model trained on MNIST has never seen these writers nor this conversion of
them, unlike the offline `digits` data set, which scales the same digits straight into 20x20.

How the 8x8 pixels are enlarged matters: bicubic keeps the strokes' edges about as sharp as a pen's,
while bilinear blurs them into blobs that a model trained on MNIST often reads as 8 (the default
model, trained 16 epochs: 95.1% bicubic, 86.5% bilinear, 89.9% nearest).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from checkpoint import CheckpointError, load_model
from dataset import Split, to_mnist_style
from figures import plot_misclassified, save
from metrics import zero_shot_classification
from utils import class_embeddings, embed_images

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


def score(model, split: Split, precision: str = "fp32") -> dict:
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="the model to score")
    p.add_argument("--figure", type=Path, help="also draw the digits it reads wrong, as a PNG at this path")
    args = p.parse_args(argv)
    split = load_user_style_digits()
    result = score(load_model(args.checkpoint)[0], split)
    print(describe(result))
    if args.figure is not None:
        print(f"the digits it reads wrong: {save(plot_misread(split, result), args.figure)}")
    return result


def describe(result: dict) -> str:
    per_digit = "  ".join(f"{digit}:{accuracy:.1%}" for digit, accuracy in enumerate(result["per_digit_accuracy"]))
    return f"scikit-learn's 1,797 digits as users' pictures: {result['accuracy']:.1%}\n  per digit  {per_digit}"


if __name__ == "__main__":
    try:
        main()
    except CheckpointError as error:
        raise SystemExit(f"error: {error}") from None
