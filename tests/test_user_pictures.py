"""Users' own pictures: converted as MNIST was made, then classified by a small model
trained on real MNIST (the `mnist_checkpoint` fixture). The offline `digits` data set
cannot stand in: its 8x8 digits, blurred and stretched to fill 20x20, are not
MNIST-style, and a model trained on them classifies only about half of these font
digits, whatever the conversion.
"""

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import inference
from checkpoint import load_model
from embeddings import class_embeddings, embed_images
from pictures import load_user_image, to_mnist_style

FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"  # matplotlib ships these, so they are always there
FONTS = [ImageFont.load_default] + [
    lambda size, name=name: ImageFont.truetype(str(FONT_DIR / name), size)
    for name in ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
]
CANVASES = [  # (size, paper, ink): dark on light as written, and chalk on a blackboard
    ((64, 64), "white", "black"),
    ((300, 200), (250, 245, 230), (20, 20, 80)),
    ((120, 240), (200, 200, 200), (60, 60, 60)),
    ((90, 90), "black", "white"),
    ((500, 400), (255, 255, 240), (200, 0, 0)),
]


@pytest.fixture(scope="module")
def model(mnist_checkpoint: Path):
    return load_model(mnist_checkpoint, torch.device("cpu"))[0]


def draw_digit(digit: int, font, size: tuple[int, int], paper, ink, mode: str = "RGB") -> Image.Image:
    picture = Image.new(mode, size, paper)
    ImageDraw.Draw(picture).text(
        (size[0] / 2, size[1] / 2), str(digit), fill=ink, font=font(int(min(size) * 0.6)), anchor="mm"
    )
    return picture


def accuracy(model, images: list[torch.Tensor], digits: list[int]) -> float:
    predictions = (embed_images(model, torch.stack(images)) @ class_embeddings(model).T).argmax(dim=1)
    return (predictions == torch.tensor(digits)).float().mean().item()


def test_font_digits_on_varied_canvases_are_classified_correctly(model):
    pictures, digits = [], []
    for font in FONTS:
        for size, paper, ink in CANVASES:
            for digit in range(10):
                pictures.append(draw_digit(digit, font, size, paper, ink))
                digits.append(digit)
    assert accuracy(model, [to_mnist_style(p) for p in pictures], digits) >= 0.85
    # The same pictures merely shrunk to 28x28, not inverted, cropped or centred, score under half:
    # the conversion is what the accuracy above measures.
    shrunk = [torch.from_numpy(np.array(p.convert("L").resize((28, 28)))) for p in pictures]
    assert accuracy(model, shrunk, digits) < 0.5


def exif_rotated(picture: Image.Image) -> Image.Image:
    """Stored on its side, as phones do, with the EXIF tag that says to turn it upright."""
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated = picture.rotate(90, expand=True)
    rotated.info["exif"] = exif.tobytes()
    return rotated


def with_transparent_paper(picture: Image.Image) -> Image.Image:
    ink = Image.eval(picture, lambda value: 255 - value)
    return Image.merge("RGBA", (Image.new("L", picture.size, 0),) * 3 + (ink,))  # black where opaque, clear paper


FILE_KINDS = {  # name: (how the file is made from a dark-on-light "L" picture, save options)
    "rgb.jpg": (lambda p: p.convert("RGB"), {"quality": 95}),
    "transparent.png": (with_transparent_paper, {}),
    "palette.gif": (lambda p: p.convert("P"), {}),
    "transparent_palette.gif": (lambda p: p.convert("P"), {"transparency": 255}),
    "gray16.png": (lambda p: Image.fromarray(np.asarray(p).astype(np.uint16) * 257), {}),
    "exif_rotated.jpg": (lambda p: exif_rotated(p.convert("RGB")), {"quality": 95}),
}


@pytest.mark.parametrize("name", FILE_KINDS)
def test_every_kind_of_file_converts_like_the_plain_picture(name: str, tmp_path: Path):
    picture = draw_digit(4, ImageFont.load_default, (120, 160), 255, 0, mode="L")
    make, options = FILE_KINDS[name]
    made = make(picture)
    made.save(tmp_path / name, exif=made.info.get("exif", b""), **options)
    converted = load_user_image(tmp_path / name).float()
    expected = to_mnist_style(picture).float()
    assert (converted - expected).abs().mean() < 2  # identical up to JPEG's artefacts


def test_cli_prints_a_line_per_file_and_shows_what_the_model_saw(mnist_checkpoint: Path, tmp_path: Path, capsys):
    for digit in (3, 7):
        draw_digit(digit, ImageFont.load_default, (200, 300), (240, 240, 230), (0, 0, 90)).save(
            tmp_path / f"my_{digit}.png"
        )
    out = inference.main(
        ["--checkpoint", str(mnist_checkpoint), "--dataset", "digits", "--output-dir", str(tmp_path / "out"), "--image"]
        + [str(tmp_path / f"my_{digit}.png") for digit in (3, 7)]
    )
    assert [query["predicted"] for query in out["queries"]] == [3, 7]
    printed = capsys.readouterr().out
    assert "my_3.png: predicted 3 (p=" in printed and "runner-up" in printed and "my_7.png: predicted 7" in printed
    assert (tmp_path / "out" / "predictions.png").is_file()
