"""How well a model reads people's own handwriting: scikit-learn's 1,797 handwritten digits, from
writers the model never saw, converted as a user's picture is (`inference.py --image`, demo.py).

python -m tools.user_style_digits --checkpoint runs/<run>/best.pt   # accuracy overall and per digit
python -m tools.user_style_digits --checkpoint runs/<run>/best.pt --figure misread.png   # and the digits it reads wrong
(inference.py --evaluate reports it too, for a model trained on MNIST)

Each 8x8 digit is drawn dark on light, enlarged as a small scan or photo would be, and put through
pictures.to_mnist_style. A model trained on MNIST has never seen these writers nor this conversion of
them, unlike the offline `digits` data set, which scales the same digits straight into 20x20.

How the 8x8 pixels are enlarged matters: bicubic keeps the strokes' edges about as sharp as a pen's,
while bilinear blurs them into blobs that a model trained on MNIST often reads as 8 (the default
model, trained 16 epochs: 95.1% bicubic, 86.5% bilinear, 89.9% nearest).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from checkpoint import CheckpointError, load_model
from figures import save
from pictures import describe_user_style, load_user_style_digits, plot_misread, score_user_style


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="the model to score")
    p.add_argument("--figure", type=Path, help="also draw the digits it reads wrong, as a PNG at this path")
    args = p.parse_args(argv)
    split = load_user_style_digits()
    result = score_user_style(load_model(args.checkpoint)[0], split)
    print(describe_user_style(result))
    if args.figure is not None:
        print(f"the digits it reads wrong: {save(plot_misread(split, result), args.figure)}")
    return result


if __name__ == "__main__":
    try:
        main()
    except CheckpointError as error:
        raise SystemExit(f"error: {error}") from None
