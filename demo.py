"""Draw a digit in the browser: a page where CLIP reads your drawing or photo, and finds test images for a caption.

python demo.py                                  # the newest run's best.pt, on http://127.0.0.1:7860
python demo.py --checkpoint runs/<run>/best.pt --port 8000
python demo.py --share                          # also a public link through Gradio's servers, for a phone

The page shows what `inference.py --image` computes: each class's probability, the 28x28 picture
the model saw after the same MNIST-style conversion, and the five nearest test images. The test
split is embedded once, at start-up, so that a prediction embeds only the user's picture.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from checkpoint import CheckpointError, latest_run, load_model
from clip import CLIP
from dataset import CLASS_NAMES, DataError, load_splits
from embeddings import Classes, caption_cut_note, class_embeddings, class_probabilities, embed_images
from evaluation import Gallery, nearest_images
from labelled import nearest_to_caption
from pictures import ImageError, in_style_of, read_image_file
from text_encoder import TextError
from utils import PRECISIONS, resolve_precision, settle_device

MAX_PICTURE_BYTES = (
    20 * 2**20
)  # a phone's photo is a few MB; a larger file is refused, with a message on the page, before decoding
MAX_UPLOAD_BYTES = 200 * 2**20  # Gradio refuses larger uploads outright, so that no upload fills the disk
CANVAS_SIZE = 280  # pixels of the square sketchpad: plenty for a digit, and cheap to send with each stroke
BRUSH_RADIUS = (
    11  # a digit drawn across most of the canvas then has strokes about as thick, for its size, as MNIST's pen
)
SHOWN_SIZE = 112  # pixels the 28x28 images are shown at, enlarged without smoothing so each pixel stays visible
SHOWN_FORMAT = (
    "png"  # lossless, so that the page shows exactly the pixels the model saw (Gradio's default, webp, is lossy)
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint to load (default: the newest runs/*/best.pt)"
    )
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where to look for the newest run")
    p.add_argument(
        "--data-dir", default=None, help="folder that holds the data set (default: the one the model was trained on)"
    )
    p.add_argument("--port", type=int, default=7860, help="port to serve on, at 127.0.0.1")
    p.add_argument(
        "--share",
        action="store_true",
        help="also make a public link through Gradio's servers (off: only this machine sees it)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="where to run")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16 where the hardware runs it natively, fp32 elsewhere",
    )
    args = p.parse_args(argv)
    settle_device(p, args)
    if not port_is_free(args.port):  # said at once, not after the model and the test split have loaded
        p.error(f"--port {args.port}: another program serves on 127.0.0.1:{args.port}; pick another port")
    return args


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as the server binds: a port that recently served is free
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Reader:
    """A trained model and the test split it retrieves from, embedded once: what every request uses."""

    model: CLIP
    precision: str
    gallery: Gallery
    classes: Classes
    dataset: str  # whose style a picture is converted to


def load_reader(args: argparse.Namespace) -> Reader:
    """The checkpoint that args name (or the newest run's best.pt), and its data set's test split, embedded."""
    checkpoint = args.checkpoint or latest_run(args.runs_dir, "best.pt")
    model, state = load_model(checkpoint, args.device)
    precision, why = resolve_precision(args.precision, args.device)
    dataset, data_dir = state["args"]["dataset"], args.data_dir or state["args"]["data_dir"]
    test = load_splits(dataset, data_dir, val_size=state["args"]["val_size"]).test
    gallery = Gallery(
        "test", test, embed_images(model, test.images, precision), class_embeddings(model), CLASS_NAMES[dataset]
    )
    print(f"loaded {checkpoint} (epoch {state['epoch']}); {why}; {len(test):,} test images embedded")
    if dataset == "mnist" and not state["args"].get("stroke"):
        print(
            "this model knows MNIST's pen strokes only: one trained with `python train.py --stroke 0.5` reads "
            "drawings better"
        )
    return Reader(model, precision, gallery, Classes(list(CLASS_NAMES[dataset]), gallery.text_features), dataset)


def drawing_to_picture(drawing: dict | None) -> Image.Image:
    """The sketchpad's value -> a picture of the strokes, dark on white. The strokes are read from the
    layers' alpha channel, not their colours: the canvas behind them is white, or dark grey under the
    dark theme, and only the alpha says where the brush went, and how fully."""
    layers = (drawing or {}).get("layers") or []
    coverage = np.zeros((1, 1), dtype=np.uint8)
    for layer in layers:
        coverage = np.maximum(coverage, np.asarray(layer.convert("RGBA").getchannel("A")))
    if not coverage.any():
        raise ImageError("the canvas is empty: draw a digit with the mouse or a finger")
    return Image.fromarray(255 - coverage)


def upload_to_picture(path: str | None) -> Image.Image:
    """An uploaded file -> its picture, refusing a file too large to be a photo of a digit before decoding it."""
    if path is None:
        raise ImageError("no file: choose a picture of a digit")
    size = Path(path).stat().st_size
    if size > MAX_PICTURE_BYTES:
        raise ImageError(
            f"the file is {size / 2**20:.0f} MB, more than the {MAX_PICTURE_BYTES // 2**20} MB a photo of a digit needs"
        )
    return read_image_file(Path(path))


def enlarged(image: torch.Tensor) -> np.ndarray:
    """A (28, 28) uint8 image, enlarged to SHOWN_SIZE without smoothing."""
    return np.asarray(Image.fromarray(image.cpu().numpy()).resize((SHOWN_SIZE, SHOWN_SIZE), Image.Resampling.NEAREST))


@torch.inference_mode()
def read_picture(reader: Reader, picture: Image.Image) -> tuple[dict[str, float], np.ndarray, list]:
    """A picture -> each class's probability, the 28x28 image the model saw, and the nearest test images
    with their labels and cosines, as `inference.py --image` computes them."""
    image = in_style_of(reader.dataset)(picture)
    features = embed_images(reader.model, image[None], reader.precision)[0]
    _, probabilities = class_probabilities(reader.model, reader.classes, features)
    nearest, cosines = nearest_images(features[None], reader.gallery.image_features)
    split, names = reader.gallery.split, reader.classes.names
    neighbours = [
        (enlarged(split.images[index]), f"{names[split.labels[index]]} (cosine {cosine:.3f})")
        for index, cosine in zip(nearest[0].tolist(), cosines[0].tolist(), strict=True)
    ]
    return dict(zip(names, probabilities.tolist(), strict=True)), enlarged(image), neighbours


def sentence(message: str) -> str:
    """An error's message, which starts in lower case to follow a colon, as a sentence of its own."""
    return f"{message[0].upper()}{message[1:]}" + ("" if message.endswith(".") else ".")


def search_caption(reader: Reader, text: str) -> tuple[str, list]:
    """A caption -> a line about it and the nearest test images, ranked as `inference.py --text` ranks them."""
    if not text.strip():
        return "The caption is empty: type one, such as 7.", []
    try:
        top = nearest_to_caption(reader.model, reader.gallery, text)
    except TextError as error:
        return sentence(str(error)), []
    split, names = reader.gallery.split, reader.classes.names
    images = [
        (enlarged(split.images[index]), f"{names[split.labels[index]]} (score {score:.3f})")
        for index, score in zip(top.indices.tolist(), top.values.tolist(), strict=True)
    ]
    note = caption_cut_note(reader.model, text)
    return (sentence(note) if note else f"The {len(images)} test images nearest to the caption:"), images


def picture_handler(reader: Reader, to_picture: Callable) -> Callable:
    """An event handler: the input, turned into a picture by `to_picture`, read by the model; or a line saying
    why it cannot be read, the other outputs emptied. The server keeps serving either way."""

    def handle(value) -> tuple:
        try:
            probabilities, seen, neighbours = read_picture(reader, to_picture(value))
        except ImageError as error:
            return sentence(str(error)), None, None, []
        best = max(probabilities, key=probabilities.get)
        return f"Read as **{best}**, with probability {probabilities[best]:.1%}.", probabilities, seen, neighbours

    return handle


def image_row(label: str, elem_id: str) -> gr.Gallery:
    """A row of test images with their labels, each shown pixel for pixel."""
    return gr.Gallery(
        label=label,
        columns=5,
        height=SHOWN_SIZE + 90,
        object_fit="contain",
        format=SHOWN_FORMAT,
        buttons=[],
        elem_id=elem_id,
    )


def build_page(reader: Reader) -> gr.Blocks:
    """The page: a sketchpad and an upload on the left, what the model made of them on the right, and
    below, test images found by a caption."""
    with gr.Blocks(title="mnist-clip: draw a digit") as page:
        gr.Markdown(
            "# Draw a digit\nPick the brush and draw one digit with the mouse or a finger, or upload a photo of one."
        )
        with gr.Row():
            with gr.Column():
                sketchpad = gr.Sketchpad(
                    label="Draw a digit",
                    type="pil",
                    format="png",  # lossless, so that the strokes' alpha arrives as drawn
                    canvas_size=(CANVAS_SIZE, CANVAS_SIZE),
                    fixed_canvas=True,
                    brush=gr.Brush(default_size=BRUSH_RADIUS, colors=["#000000"], color_mode="fixed"),
                    layers=False,
                    transforms=(),
                    elem_id="sketchpad",
                )
                read_drawing = gr.Button("Read the drawing", variant="primary")
                upload = gr.File(
                    label="Or upload a photo of a digit", file_types=["image"], type="filepath", elem_id="upload"
                )
            with gr.Column():
                verdict = gr.Markdown("Draw a digit, or upload a photo.", elem_id="verdict")
                probabilities = gr.Label(
                    label="Probability of each class",
                    num_top_classes=len(reader.classes.names),
                    elem_id="probabilities",
                )
                seen = gr.Image(
                    label="What the model saw (28x28)",
                    height=SHOWN_SIZE + 50,
                    format=SHOWN_FORMAT,
                    buttons=[],
                    interactive=False,
                    elem_id="seen",
                )
        nearest = image_row("The 5 nearest test images", "nearest")
        with gr.Row():
            caption = gr.Textbox(label="Find test images by a caption", placeholder="7", scale=4, elem_id="caption")
            search = gr.Button("Find", scale=1)
        caption_verdict = gr.Markdown(elem_id="caption-verdict")
        found = image_row("Test images for the caption", "found")

        read = picture_handler(reader, drawing_to_picture)
        outputs = [verdict, probabilities, seen, nearest]
        sketchpad.change(read, sketchpad, outputs, show_progress="hidden")  # after each stroke, as people expect
        read_drawing.click(read, sketchpad, outputs)
        upload.upload(picture_handler(reader, upload_to_picture), upload, outputs)
        for event in (caption.submit, search.click):
            event(lambda text: search_caption(reader, text), caption, [caption_verdict, found])
    return page


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Gradio's usage reports and version checks off: the page reaches no one outside unless --share asks it to.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    page = build_page(load_reader(args))
    page.launch(
        server_name="127.0.0.1",
        server_port=args.port,
        share=args.share,
        max_file_size=MAX_UPLOAD_BYTES,
        quiet=True,
        prevent_thread_lock=True,
    )
    print(f"serving on {page.local_url}" + (f" and {page.share_url}" if page.share_url else "") + "; Ctrl-C stops it")
    page.block_thread()


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, DataError) as error:
        raise SystemExit(f"error: {error}") from None
