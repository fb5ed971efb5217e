"""A user's picture files: each is either classified or skipped with one line saying why."""

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from checkpoint import save_checkpoint
from clip import CLIP, CLIPConfig
from pictures import ImageError, load_user_image, to_mnist_style

REPO = Path(__file__).resolve().parents[1]


def draw_one(image: Image.Image, ink) -> Image.Image:
    """A slanted stroke, a "1", across the middle of `image`."""
    w, h = image.size
    ImageDraw.Draw(image).line([(w * 0.45, h * 0.15), (w * 0.55, h * 0.85)], fill=ink, width=max(2, w // 8))
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def huge_png(width: int, height: int) -> bytes:
    """A complete, valid 1-bit PNG of width x height black pixels: a few kilobytes that decode to
    width * height bytes, built row by row so the test never holds the picture itself."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte, then the packed bits
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def write_empty(path: Path) -> None:
    path.write_bytes(b"")


def write_text(path: Path) -> None:
    path.write_text("not a picture, just a text file with a .png name\n")


def write_truncated_png(path: Path) -> None:
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 80), dtype=np.uint8))
    data = png_bytes(draw_one(noisy, 0))
    path.write_bytes(data[: len(data) * 3 // 5])


def write_folder(path: Path) -> None:
    path.mkdir()


def write_bomb(path: Path) -> None:
    path.write_bytes(huge_png(20_000, 20_000))


def write_transparent(path: Path) -> None:
    # A black "1" in the colour channels, but every pixel fully transparent: nothing is visible.
    draw_one(Image.new("RGBA", (40, 60), (255, 255, 255, 0)), (0, 0, 0, 0)).save(path)


def write_blank(path: Path) -> None:
    Image.new("RGB", (40, 60), "white").save(path)


def write_16_bit(path: Path) -> None:
    pixels = np.full((60, 40), 60_000, dtype=np.uint16)
    pixels[10:50, 17:23] = 1_000
    Image.fromarray(pixels).save(path)  # a 16-bit greyscale PNG


def write_palette_gif(path: Path) -> None:
    draw_one(Image.new("RGB", (40, 60), "white"), "black").convert("P").save(path)


def write_animated_gif(path: Path) -> None:
    first = draw_one(Image.new("L", (40, 60), 255), 0)
    second = Image.new("L", (40, 60), 255)  # blank: only the first frame holds a digit
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0)


def write_cmyk_jpeg(path: Path) -> None:
    draw_one(Image.new("CMYK", (40, 60), (0, 0, 0, 0)), (0, 0, 0, 255)).save(path, "JPEG")


def write_one_pixel(path: Path) -> None:
    Image.new("L", (1, 1), 0).save(path)


# name -> (how to make it, None when it is a valid picture of a digit, else a phrase of the reason given)
CASES = {
    "empty.png": (write_empty, "not a picture"),
    "text.png": (write_text, "not a picture"),
    "truncated.png": (write_truncated_png, "damaged or truncated"),
    "folder.png": (write_folder, "a folder, not an image file"),
    "missing.png": (lambda path: None, "No such file"),
    "bomb.png": (write_bomb, "refused"),
    "transparent.png": (write_transparent, "no digit"),
    "blank.png": (write_blank, "no digit"),
    "16-bit.png": (write_16_bit, None),
    "palette.gif": (write_palette_gif, None),
    "animated.gif": (write_animated_gif, None),
    "cmyk.jpg": (write_cmyk_jpeg, None),
    "one-pixel.png": (write_one_pixel, "no digit"),
}


@pytest.fixture(scope="module")
def picture_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pictures")
    for name, (write, _) in CASES.items():
        write(folder / name)
    return folder


@pytest.mark.parametrize("name", CASES)
def test_each_file_gives_a_digit_or_a_reason(name: str, picture_dir: Path):
    reason = CASES[name][1]
    if reason is None:
        digit = load_user_image(picture_dir / name)
        assert digit.shape == (28, 28) and digit.max() == 255 and digit[0].max() == 0
    else:
        with pytest.raises(ImageError, match=reason) as error:
            load_user_image(picture_dir / name)
        assert "\n" not in str(error.value)


def test_animated_gif_is_read_from_its_first_frame(picture_dir: Path):
    with Image.open(picture_dir / "animated.gif") as animation:
        first_frame = to_mnist_style(animation.convert("L"))
    assert torch.equal(load_user_image(picture_dir / "animated.gif"), first_frame)


def test_pictures_above_pillows_warning_limit_are_refused_too(tmp_path: Path, monkeypatch):
    # Pillow raises above twice MAX_IMAGE_PIXELS but only warns above it, and then decodes.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    path = tmp_path / "large.png"
    draw_one(Image.new("L", (100, 150), 255), 0).save(path)  # 15,000 pixels
    with pytest.raises(ImageError, match="refused"):
        load_user_image(path)


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory) -> Path:
    """Inference needs a model, not a good one: an untrained small one saves a training run."""
    config = CLIPConfig(image_widths=(8, 16), text_hidden_dim=16, embed_dim=16)
    path = tmp_path_factory.mktemp("run") / "best.pt"
    state = {
        "model": CLIP(config).state_dict(),
        "config": config.to_dict(),
        "args": {"dataset": "digits", "data_dir": "data", "val_size": 300},
        "step": 0,
        "epoch": 0,
        "best_score": 0.0,
        "score_name": "accuracy",
        "history": [],
    }
    save_checkpoint(state, path)
    return path


def test_command_line_skips_bad_files_with_one_line_each_and_classifies_the_rest(
    picture_dir, untrained_checkpoint, tmp_path
):
    paths = [str(picture_dir / name) for name in CASES]
    command = [
        sys.executable,
        "inference.py",
        "--checkpoint",
        str(untrained_checkpoint),
        "--output-dir",
        str(tmp_path),
        "--image",
        *paths,
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    printed = result.stdout.splitlines()
    for name, (_, reason) in CASES.items():
        expected = f"{name}: predicted" if reason is None else f"{picture_dir / name}: skipped, "
        assert sum(line.startswith(expected) for line in printed) == 1, (name, result.stdout)


# Every mode Pillow can hold a picture in, common or not.
MODES = (
    "1",
    "L",
    "P",
    "PA",
    "LA",
    "La",
    "RGB",
    "RGBA",
    "RGBa",
    "RGBX",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
    "I",
    "I;16",
    "I;16B",
    "F",
)


@st.composite
def pictures(draw) -> Image.Image:
    mode = draw(st.sampled_from(MODES))
    size = (draw(st.integers(0, 40)), draw(st.integers(0, 40)))
    n_bytes = len(Image.new(mode, size).tobytes())
    if n_bytes == 0:
        return Image.new(mode, size)
    floats = st.lists(
        st.floats(width=32), min_size=size[0] * size[1], max_size=size[0] * size[1]
    )  # NaN and infinities too
    content = draw(
        st.one_of(
            st.binary(min_size=n_bytes, max_size=n_bytes),  # noise
            floats.map(lambda values: np.array(values, dtype=np.float32).tobytes()) if mode == "F" else st.nothing(),
            st.integers(0, 255).map(lambda value: bytes([value]) * n_bytes),  # a blank picture
            st.dictionaries(st.integers(0, n_bytes - 1), st.integers(0, 255), max_size=20).map(  # a few specks
                lambda specks: bytes(specks.get(i, 0) for i in range(n_bytes))
            ),
        )
    )
    image = Image.frombytes(mode, size, content)
    if mode in ("P", "PA"):
        image.putpalette(draw(st.binary(min_size=768, max_size=768)))
    if mode in ("P", "L") and draw(st.booleans()):
        image.info["transparency"] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        image.getexif()[0x0112] = draw(st.integers(0, 10))  # EXIF orientation: 1-8 are valid
    return image


@st.composite
def pictures_of_a_one(draw) -> Image.Image:
    """A "1" in any of the modes that hold grey or colour, with the paper and ink values anywhere
    in the mode's range as long as they differ by a quarter of the range the picture uses: a float
    picture in [0, 1], a 16-bit one as dim as a 10-bit scan, a light or a dark paper."""
    mode = draw(st.sampled_from(("1", "L", "P", "LA", "RGB", "RGBA", "CMYK", "I", "I;16", "F")))
    size = (draw(st.integers(12, 60)), draw(st.integers(12, 60)))
    stroke = np.asarray(draw_one(Image.new("L", size, 0), 255)) > 0
    full_scale = {
        "F": draw(st.sampled_from((1.0, 255.0))),
        "I": 65535,
        "I;16": draw(st.sampled_from((1023, 4095, 65535))),
    }.get(mode, 255)
    values = st.floats(0, full_scale) if mode == "F" else st.integers(0, full_scale)
    paper, ink = draw(values), draw(values)
    assume(abs(paper - ink) >= full_scale / 4 and (mode != "1" or abs(paper - ink) == 255))
    pixels = np.where(stroke, ink, paper)
    if mode in ("F", "I", "I;16"):
        return Image.fromarray(pixels.astype({"F": np.float32, "I": np.int32, "I;16": np.uint16}[mode]))
    return Image.fromarray(pixels.astype(np.uint8), "L").convert(mode)


@pytest.mark.parametrize(
    "paper, ink, dtype",
    [(0.0, 1.0, np.float32), (1.0, 0.2, np.float32), (0, 1000, np.uint16), (4000, 300, np.uint16)],
    ids=["float in [0, 1]", "float, light paper", "10-bit in 16", "12-bit in 16, light paper"],
)
def test_float_and_dim_16_bit_pictures_are_read_in_the_range_they_use(paper, ink, dtype):
    stroke = np.asarray(draw_one(Image.new("L", (40, 60), 0), 255)) > 0
    digit = to_mnist_style(Image.fromarray(np.where(stroke, ink, paper).astype(dtype)))
    assert digit.max() > 127


@settings(max_examples=200, deadline=None)  # no deadline: the shared CPU's speed varies
@given(pictures_of_a_one())
def test_a_picture_that_holds_a_digit_is_converted(image: Image.Image):
    digit = to_mnist_style(image)
    assert (
        digit.max() > 127 and digit[:, :4].max() == 0 and digit[:, -4:].max() == 0
    )  # ink in the middle, none at the sides


@settings(max_examples=300, deadline=None)  # no deadline: the shared CPU's speed varies
@given(pictures())
@example(Image.fromarray(np.where(np.eye(9, dtype=bool), np.inf, np.nan).astype(np.float32)))  # no finite pixel at all
def test_conversion_gives_an_mnist_style_digit_or_the_projects_error(image: Image.Image):
    try:
        digit = to_mnist_style(image)
    except ImageError as error:
        assert str(error) and "\n" not in str(error)
    else:
        assert digit.shape == (28, 28) and digit.dtype == torch.uint8
        assert digit.max() > 0
