"""Real pictures with captions, written as files in the three layouts `train.py --dataset photos` reads.

python -m tools.export_photos --dataset mnist --layout flickr8k --output exported/mnist-flickr8k

The tests and the benchmark make their own collections with captions known to be right, from a
data set's test split: MNIST's digits as PNG with the attribute captions of captions.py ("a
thick 7 slanted to the right", "一个细的数字七"), Fashion-MNIST's clothes as JPEG with their class-name
captions ("a photo of a sneaker", "一件外套"), or scikit-learn's offline digits as MNIST's, which need
no download. `export` returns what it wrote, too, so that a test can hold the images and captions the
file pipeline reads against the in-memory pipeline's.

The layouts, DIR being --output:
- json: DIR/captions.json, a list of {"image_path": "images/00000.png", "captions": [...]}, and DIR/images/;
- folders: DIR/images/00000.png and DIR/captions/00000.txt, one caption a line;
- flickr8k: DIR/Images/00000.png and DIR/captions.txt, CSV with the header "image,caption" and a row
  per caption naming the file within Images/, as Kaggle's Flickr8k has it.
Text is UTF-8 with "\\n" line ends.

Each image gets K distinct captions that describe it (captions.py's `Captions.describes`), drawn by a
seeded generator uniformly among those that say more than its class, for digits the attribute captions,
and among the plain sentences only when those run out: drawn among all that describe it, nearly half of
a digit's captions (its 23 plain sentences against 28 attribute ones) would say no more than its label.
Clothes have plain sentences only, drawn uniformly.
An attribute caption's bins are measured on the exported images themselves, which are their own
collection, and as in training, no caption states a held-out combination (captions.HELD_OUT_COMBINATIONS).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from captions import ANY, Captions, image_properties, stroke_edges, training_captions
from dataset import DATASETS, DataError, Split, load_splits
from utils import positive_int

LAYOUTS = ("json", "folders", "flickr8k")
# The folder each layout keeps its images in; Kaggle's Flickr8k capitalises it.
IMAGE_FOLDERS = {"json": "images", "folders": "images", "flickr8k": "Images"}
LAYOUT_NAMES = {"json": "JSON", "folders": "folders", "flickr8k": "Flickr8k"}
DATASET_NAMES = {"mnist": "MNIST", "fashion": "Fashion-MNIST", "digits": "scikit-learn digits"}
# Digits as lossless PNG, so the files hold exactly the pixels their attribute captions were measured
# on; clothes as JPEG, as photo collections hold theirs, so the file pipeline meets a lossy format too.
IMAGE_FORMATS = {"mnist": "PNG", "digits": "PNG", "fashion": "JPEG"}
SUFFIXES = {"PNG": ".png", "JPEG": ".jpg"}
SAVE_OPTIONS = {"PNG": {}, "JPEG": {"quality": 95}}
DATASET_CAPTIONS = {"mnist": "attributes", "digits": "attributes", "fashion": "templates"}
CAPTION_KIND_NAMES = {"attributes": "attribute", "templates": "class-name"}


class ExportError(RuntimeError):
    """The export cannot be made as asked; the message says why and what to do."""


@dataclass
class Exported:
    """What `export` wrote, in memory, to compare the file pipeline with the in-memory one."""

    images: torch.Tensor  # (N, 28, 28) uint8, the pixels as written (for JPEG: as they were before compression)
    captions: list[list[str]]  # per image, its K captions in the order written
    files: list[str]  # per image, its path relative to `folder`, "/" separated; flickr8k's CSV names it within Images/
    folder: Path


def export(
    dataset: str,
    layout: str,
    output: Path,
    data_dir: str | Path = "data",
    count: int | None = None,
    captions_per_image: int = 5,
    seed: int = 0,
) -> Exported:
    """Write the first `count` test images of `dataset` (all by default), each with `captions_per_image`
    captions drawn by `seed`, into the new or empty folder `output` in `layout`. DataError when the data
    set cannot be loaded, ExportError when the export cannot be made as asked; either way nothing is written."""
    output = Path(output)
    if layout not in LAYOUTS:
        raise ExportError(f"unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    check_output(output)
    # The test split is the same whatever part of the training split is held out for validation.
    test = load_splits(dataset, data_dir, val_size=1).test
    if count is not None and count > len(test):
        raise ExportError(f"--count {count:,} exceeds the {len(test):,} test images of {dataset}: lower it")
    split = Split(test.images[:count], test.labels[:count])
    kind = DATASET_CAPTIONS[dataset]
    edges = stroke_edges(split) if kind == "attributes" else None
    drawn = draw_captions(training_captions(kind, dataset), image_properties(split, edges), captions_per_image, seed)

    image_format = IMAGE_FORMATS[dataset]
    names = [f"{index:05d}{SUFFIXES[image_format]}" for index in range(len(split))]
    with staged(output) as folder:
        images = folder / IMAGE_FOLDERS[layout]
        images.mkdir()
        for name, pixels in zip(names, split.images.numpy(), strict=True):
            Image.fromarray(pixels).save(images / name, format=image_format, **SAVE_OPTIONS[image_format])
        write_captions(folder, layout, names, drawn)
    return Exported(split.images, drawn, [f"{IMAGE_FOLDERS[layout]}/{name}" for name in names], output)


def check_output(output: Path) -> None:
    """ExportError unless `output` is a new or empty folder: an export never mixes with other files."""
    if output.exists() and not output.is_dir():
        raise ExportError(f"--output {output} is a file: give a new or empty folder")
    if output.is_dir() and any(output.iterdir()):
        raise ExportError(f"--output {output} is not empty: give a new or empty folder, or empty this one")


def draw_captions(captions: Captions, properties: torch.Tensor, per_image: int, seed: int) -> list[list[str]]:
    """Per image of (N, 4) `properties`, `per_image` distinct captions that describe it: drawn uniformly
    among those that say more than its class, then, when these are too few, among the plain ones."""
    # Each text once: the bare digit "7" is a caption in English and in Chinese alike.
    first_of_each_text = {text: caption for caption, text in reversed(list(enumerate(captions.texts)))}
    distinct = torch.zeros(len(captions.texts), dtype=torch.bool)
    distinct[list(first_of_each_text.values())] = True
    describes = captions.describes(properties) & distinct  # (N, C)
    available = describes.sum(dim=1)
    if (available < per_image).any():
        image = int((available < per_image).nonzero()[0])
        raise ExportError(
            f"--captions-per-image {per_image} exceeds the {available[image]} captions that describe image "
            f"{image:05d}: lower it"
        )
    says_more = (captions.says[:, 1:] != ANY).any(dim=1)
    # A random key per caption, in [-1, 0) for those that say more, [0, 1) for the plain ones, and
    # infinite for those that do not describe the image: the smallest keys are the draw, in order.
    keys = torch.rand(describes.shape, generator=torch.Generator().manual_seed(seed)) - says_more.float()
    chosen = keys.masked_fill(~describes, math.inf).topk(per_image, dim=1, largest=False).indices
    return [[captions.texts[caption] for caption in row] for row in chosen.tolist()]


@contextmanager
def staged(output: Path) -> Iterator[Path]:
    """A new folder to fill, moved to `output` when the block ends and removed, with any folder above
    it made for it, when the block fails or is interrupted: an export is written whole or not at all."""
    missing_parents = [parent for parent in output.absolute().parents if not parent.exists()]  # innermost first
    output.parent.mkdir(parents=True, exist_ok=True)
    # A hidden sibling on the same file system, so that the final move is a rename.
    shell = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        folder = shell / output.name
        folder.mkdir()  # not mkdtemp's own folder, which only its owner may read
        yield folder
        if output.exists():
            output.rmdir()  # empty, as check_output found it
        folder.rename(output)
    except BaseException:
        shutil.rmtree(shell, ignore_errors=True)
        for parent in missing_parents:
            with suppress(OSError):  # no longer empty: someone else is using it
                parent.rmdir()
        raise
    shell.rmdir()


def write_captions(folder: Path, layout: str, names: list[str], captions: list[list[str]]) -> None:
    """Each image's captions in `layout`'s own files, the images named by their file `names`."""
    if layout == "json":
        index = [
            {"image_path": f"{IMAGE_FOLDERS[layout]}/{name}", "captions": texts}
            for name, texts in zip(names, captions, strict=True)
        ]
        write_text(folder / "captions.json", json.dumps(index, ensure_ascii=False, indent=2) + "\n")
    elif layout == "folders":
        (folder / "captions").mkdir()
        for name, texts in zip(names, captions, strict=True):
            write_text(folder / "captions" / f"{Path(name).stem}.txt", "".join(f"{text}\n" for text in texts))
    else:
        table = io.StringIO()
        writer = csv.writer(table, lineterminator="\n")
        writer.writerow(["image", "caption"])
        writer.writerows((name, text) for name, texts in zip(names, captions, strict=True) for text in texts)
        write_text(folder / "captions.txt", table.getvalue())


def write_text(path: Path, text: str) -> None:
    """`text` as UTF-8 with "\\n" line ends on every system, so that the files are the same wherever they are made."""
    with path.open("w", encoding="utf-8", newline="\n") as file:
        file.write(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        required=True,
        help="mnist: digits as PNG with attribute captions; fashion: clothes as JPEG with class-name captions; "
        "digits: scikit-learn's offline 8x8 digits as MNIST's",
    )
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        required=True,
        help="how the files are laid out (see the top of tools/export_photos.py)",
    )
    p.add_argument("--output", type=Path, required=True, help="the new or empty folder to write into")
    p.add_argument("--data-dir", default="data", help="folder that holds (or receives) the data set")
    p.add_argument(
        "--count", type=positive_int, default=None, help="export only the first N test images (all when left out)"
    )
    p.add_argument("--captions-per-image", type=positive_int, default=5, help="distinct captions drawn for each image")
    p.add_argument("--seed", type=int, default=0, help="random seed of the captions drawn")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Exported:
    args = parse_args(argv)
    try:
        exported = export(
            args.dataset, args.layout, args.output, args.data_dir, args.count, args.captions_per_image, args.seed
        )
    except (DataError, ExportError) as error:
        raise SystemExit(f"error: {error}") from None
    n_images, n_captions = len(exported.files), sum(len(texts) for texts in exported.captions)
    print(
        f"wrote {n_images:,} {DATASET_NAMES[args.dataset]} test images ({IMAGE_FORMATS[args.dataset]}) with "
        f"{n_captions:,} "
        f"{CAPTION_KIND_NAMES[DATASET_CAPTIONS[args.dataset]]} captions in the {LAYOUT_NAMES[args.layout]} layout to "
        f"{exported.folder}; "
        f"train on them with: python train.py --dataset photos --data-dir {shlex.quote(str(exported.folder))}"
    )
    return exported


if __name__ == "__main__":
    main()
