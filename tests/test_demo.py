"""demo.py as people use it: served on a free local port and driven in headless Chromium with
Playwright, which draws with mouse strokes, uploads files and types a caption, as Gradio's own
end-to-end tests do; then, without a browser, what the page cannot show with the test models.
Without Gradio, Chromium or Playwright these tests are skipped, saying so; in CI (CI=true),
which installs them, they must run."""

import io
import os
import runpy
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from test_text import TEXT_MODEL
from test_user_images import huge_png

import train
from pictures import load_user_image, to_mnist_style

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI") == "true"
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; Playwright's own browser downloads cannot be reached
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ANSWER_MS = 20_000  # how long Playwright waits for the page to answer: CI's machine is busy


def require(present: bool, why: str) -> None:
    """Skip, saying why, where a user's machine lacks what a test needs; in CI, which installs it, fail."""
    if not present:
        if IN_CI:
            pytest.fail(f"CI must run the demo's tests: {why}")
        pytest.skip(why, allow_module_level=True)


require(find_spec("gradio") is not None, "demo.py needs gradio: pip install -r requirements-demo.txt")
import demo  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serve(checkpoint: Path, log_path: Path) -> Iterator[str]:
    """`python demo.py --checkpoint ...` on a free port, from the repository as a user starts it; its URL
    once it answers. Its output goes to `log_path`, quoted when it fails to start."""
    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(log_path.parent / "gradio")}
    command = [sys.executable, "demo.py", "--checkpoint", str(checkpoint), "--port", str(port), "--device", "cpu"]
    with log_path.open("w") as log:
        server = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120  # importing Gradio and torch and embedding the test split, on a busy machine
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"demo.py did not start serving on {url}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def browser():
    require(CHROMIUM.is_file(), f"needs Chromium at {CHROMIUM}: apt-get install chromium")
    require(find_spec("playwright") is not None, "needs the playwright package: pip install playwright")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def digits_demo(browser, digits_checkpoint: Path, tmp_path_factory) -> Iterator[str]:
    with serve(digits_checkpoint, tmp_path_factory.mktemp("digits_demo") / "demo.log") as url:
        yield url


@pytest.fixture(scope="module")
def mnist_demo(browser, mnist_checkpoint: Path, tmp_path_factory) -> Iterator[str]:
    with serve(mnist_checkpoint, tmp_path_factory.mktemp("mnist_demo") / "demo.log") as url:
        yield url


class Page:
    """A browser tab on the demo, keeping every error its console reports."""

    def __init__(self, browser, url: str):
        self.tab = browser.new_page(viewport={"width": 1200, "height": 1100})
        self.console_errors: list[str] = []
        self.tab.on(
            "console", lambda message: self.console_errors.append(message.text) if message.type == "error" else None
        )
        self.tab.on("pageerror", lambda error: self.console_errors.append(str(error)))
        self.tab.goto(url)
        self.tab.locator("#sketchpad canvas").first.wait_for()

    def draw_seven(self) -> None:
        """A 7 in two mouse strokes across the middle of the canvas: the bar, then the leg."""
        self.tab.get_by_role("button", name="Brush", exact=True).click()
        box = self.tab.locator("#sketchpad canvas").first.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        for start, end in (((x - 60, y - 80), (x + 60, y - 80)), ((x + 60, y - 80), (x - 10, y + 90))):
            self.tab.mouse.move(*start)
            self.tab.mouse.down()
            self.tab.mouse.move(*end, steps=5)  # each step is a frame to render: a few draw a straight line
            self.tab.mouse.up()

    def upload(self, path: Path) -> None:
        clear = self.tab.locator("#upload").get_by_role("button", name="Clear", exact=True)
        if clear.count():  # the previous file
            clear.click()
        self.tab.locator("#upload input[type=file]").set_input_files(path)

    def expect_verdict(self, text: str) -> None:
        from playwright.sync_api import expect

        expect(self.tab.locator("#verdict")).to_contain_text(text, timeout=ANSWER_MS)

    def expect_a_reading(self) -> None:
        """The page shows a prediction: the verdict, a probability for each of the ten classes, the
        28x28 picture the model saw and the five nearest test images with their labels and cosines."""
        from playwright.sync_api import expect

        self.expect_verdict("Read as")
        expect(self.tab.locator("#probabilities")).to_contain_text("%")
        expect(self.tab.locator("#seen img")).to_have_count(1)
        expect(self.tab.locator("#nearest img")).to_have_count(5)
        expect(self.tab.locator("#nearest")).to_contain_text("cosine")


@pytest.fixture
def page(browser, digits_demo: str) -> Iterator[Page]:
    page = Page(browser, digits_demo)
    yield page
    page.tab.close()


def test_a_drawn_digit_is_read_and_shown_as_the_model_saw_it(page: Page):
    page.draw_seven()
    page.expect_a_reading()
    assert page.console_errors == []


def test_a_drawn_seven_is_read_as_a_seven_by_a_model_trained_on_mnist(browser, mnist_demo: str):
    # Skipped without real MNIST (see conftest.mnist_checkpoint): the offline digits model cannot read a mouse stroke.
    page = Page(browser, mnist_demo)
    page.draw_seven()
    page.expect_verdict("Read as 7,")
    assert page.console_errors == []


def test_an_empty_canvas_says_to_draw(page: Page):
    page.tab.get_by_role("button", name="Read the drawing").click()
    page.expect_verdict("The canvas is empty: draw a digit")
    assert page.console_errors == []


def test_an_uploaded_picture_is_read(page: Page, tmp_path: Path):
    picture = Image.new("RGB", (120, 160), "white")
    ImageDraw.Draw(picture).line([(20, 25), (100, 25), (45, 140)], fill="black", width=12)
    picture.save(tmp_path / "seven.png")
    page.upload(tmp_path / "seven.png")
    page.expect_a_reading()
    # The page shows, enlarged, exactly the 28x28 image that `inference.py --image seven.png` gives the model.
    shown = page.tab.request.get(urljoin(page.tab.url, page.tab.locator("#seen img").get_attribute("src"))).body()
    pixels = np.asarray(Image.open(io.BytesIO(shown)).convert("L").resize((28, 28), Image.Resampling.NEAREST))
    assert np.array_equal(pixels, load_user_image(tmp_path / "seven.png").numpy())
    assert page.console_errors == []


def test_bad_uploads_get_a_clear_message_and_the_server_keeps_serving(page: Page, tmp_path: Path):
    (tmp_path / "letter.png").write_text("a text file with a picture's name\n")
    (tmp_path / "bomb.png").write_bytes(huge_png(20_000, 20_000))  # a few KB that would decode to 400 million pixels
    (tmp_path / "huge.png").write_bytes(bytes(50 * 2**20))
    for name, message in (
        ("letter.png", "Not a picture"),
        ("bomb.png", "a decompression bomb"),
        ("huge.png", "The file is 50 MB, more than the 20 MB"),
    ):
        page.upload(tmp_path / name)
        page.expect_verdict(message)
    page.draw_seven()
    page.expect_a_reading()
    assert page.console_errors == []


def test_a_caption_finds_five_test_images_and_an_unreadable_one_says_why(page: Page):
    from playwright.sync_api import expect

    caption = page.tab.locator("#caption textarea")
    caption.fill("7")
    caption.press("Enter")
    expect(page.tab.locator("#found img")).to_have_count(5, timeout=ANSWER_MS)
    caption.fill("a thick seven")  # the digits model's text encoder reads only "0".."9"
    caption.press("Enter")
    expect(page.tab.locator("#caption-verdict")).to_contain_text("knows only the captions 0-9", timeout=ANSWER_MS)
    expect(page.tab.locator("#found img")).to_have_count(0)
    assert page.console_errors == []


def test_strokes_are_read_from_the_layers_alpha_whatever_their_colour_or_the_canvas_behind():
    """Under the dark theme the empty canvas is dark grey: only the alpha says where the brush went."""
    stroke = [(60, 50), (220, 50), (120, 230)]

    def drawing(ink, canvas) -> dict:
        layer = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
        ImageDraw.Draw(layer).line(stroke, fill=ink, width=22)
        return {"background": Image.new("RGBA", (280, 280), canvas), "layers": [layer], "composite": None}

    paper = Image.new("L", (280, 280), 255)
    ImageDraw.Draw(paper).line(stroke, fill=0, width=22)
    as_inference_reads_it = to_mnist_style(paper)  # the same stroke, as `inference.py --image` converts a picture of it
    for ink, canvas in (((0, 0, 0, 255), "white"), ((255, 255, 255, 255), (38, 38, 38, 255))):
        assert torch.equal(to_mnist_style(demo.drawing_to_picture(drawing(ink, canvas))), as_inference_reads_it)


def test_a_model_that_reads_sentences_finds_images_for_any_caption_and_says_where_it_cuts_one(runs_dir: Path):
    checkpoint = train.main([*TEXT_MODEL, "--dry-run", "--runs-dir", str(runs_dir)])["run_dir"] / "best.pt"
    reader = demo.load_reader(demo.parse_args(["--checkpoint", str(checkpoint), "--device", "cpu"]))
    line, images = demo.search_caption(reader, "a thick seven")
    assert len(images) == 5 and line.startswith("The 5 test images nearest")
    line, images = demo.search_caption(reader, "7" * 1000)
    assert len(images) == 5 and "the caption has 1,000 characters; the model reads its first 64" in line.lower()
    line, images = demo.search_caption(reader, "   ")
    assert images == [] and line.startswith("The caption is empty")


def test_a_model_of_mnist_trained_without_stroke_augmentation_is_loaded_with_a_hint_to_train_one_with_it(
    mnist_checkpoint: Path, tmp_path: Path, capsys
):
    demo.load_reader(demo.parse_args(["--checkpoint", str(mnist_checkpoint), "--device", "cpu"]))
    assert "python train.py --stroke 0.5" in capsys.readouterr().out
    state = torch.load(mnist_checkpoint, weights_only=False)
    state["args"]["stroke"] = 0.5  # as a model trained with it
    torch.save(state, tmp_path / "stroke.pt")
    demo.load_reader(demo.parse_args(["--checkpoint", str(tmp_path / "stroke.pt"), "--device", "cpu"]))
    assert "--stroke" not in capsys.readouterr().out


def test_a_missing_checkpoint_is_one_line_without_a_traceback(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["demo.py", "--checkpoint", str(tmp_path / "missing.pt")])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(REPO / "demo.py"), run_name="__main__")
    assert (
        str(stopped.value)
        == f"error: no checkpoint at {tmp_path / 'missing.pt'}: check the path, or train one with `python train.py`"
    )


def test_a_port_in_use_is_refused_before_the_model_loads(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit):
            demo.parse_args(["--port", str(port)])
    assert f"--port {port}: another program serves on 127.0.0.1:{port}" in capsys.readouterr().err
