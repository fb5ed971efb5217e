"""tools/export_photos.py: real pictures and their captions as files, in each layout train.py reads, read back
here independently."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captions import ANY, image_properties, stroke_edges, training_captions
from dataset import Split, Splits, load_splits
from tools import export_photos

COUNT = 12
# The files besides the images that each layout holds its captions in.
CAPTION_FILES = {
    "json": {"captions.json"},
    "folders": {f"captions/{index:05d}.txt" for index in range(COUNT)},
    "flickr8k": {"captions.txt"},
}


def digits_test_split(count: int = COUNT) -> Split:
    test = load_splits("digits", "unused", val_size=1).test
    return Split(test.images[:count], test.labels[:count])


def export_digits(output: Path, *options: str) -> export_photos.Exported:
    return export_photos.main(["--dataset", "digits", "--output", str(output), "--count", str(COUNT), *options])


def read_back(folder: Path, layout: str) -> tuple[list[str], list[list[str]]]:
    """Each image's path relative to `folder` and its captions, as the layout's own files give them."""
    if layout == "json":
        index = json.loads((folder / "captions.json").read_text(encoding="utf-8"))
        return [entry["image_path"] for entry in index], [entry["captions"] for entry in index]
    if layout == "folders":
        images = sorted((folder / "images").iterdir())
        captions = [
            (folder / "captions" / f"{image.stem}.txt").read_text(encoding="utf-8").splitlines() for image in images
        ]
        return [f"images/{image.name}" for image in images], captions
    with (folder / "captions.txt").open(encoding="utf-8", newline="") as file:
        assert file.readline() == "image,caption\n"  # Kaggle's Flickr8k header
        by_image: dict[str, list[str]] = {}
        for image, caption in csv.reader(file):
            by_image.setdefault(f"Images/{image}", []).append(caption)
    return list(by_image), list(by_image.values())


def files_in(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("layout", export_photos.LAYOUTS)
def test_each_layout_holds_the_test_images_exactly_and_their_captions_in_utf8(tmp_path: Path, layout: str, capsys):
    output = tmp_path / "exported"
    exported = export_digits(output, "--layout", layout)
    images = "Images" if layout == "flickr8k" else "images"
    assert exported.files == [f"{images}/{index:05d}.png" for index in range(COUNT)] and exported.folder == output
    assert files_in(output) == set(exported.files) | CAPTION_FILES[layout]
    assert read_back(output, layout) == (exported.files, exported.captions)
    assert any("数字" in caption for texts in exported.captions for caption in texts)  # Chinese survives the round trip

    assert torch.equal(exported.images, digits_test_split().images)  # the first test images, in order
    for file, pixels in zip(exported.files, exported.images, strict=True):
        with Image.open(output / file) as picture:
            assert (picture.format, picture.mode) == ("PNG", "L")
            assert np.array_equal(np.asarray(picture), pixels.numpy())

    layout_name = {"json": "JSON", "folders": "folders", "flickr8k": "Flickr8k"}[layout]
    assert capsys.readouterr().out == (
        "wrote 12 scikit-learn digits test images (PNG) with 60 attribute captions "
        f"in the {layout_name} layout to {output}; "
        f"train on them with: python train.py --dataset photos --data-dir {output}\n"
    )


def test_each_digit_gets_distinct_captions_that_describe_it_those_that_state_attributes_first(tmp_path: Path):
    split = digits_test_split(60)
    captions = training_captions("attributes", "digits")
    describes = captions.describes(
        image_properties(split, stroke_edges(split))
    )  # bins measured on the exported images alone
    states_attributes = (captions.says[:, 1:] != ANY).any(dim=1)
    attribute_captions_available = (describes & states_attributes).sum(dim=1).tolist()
    index = {text: caption for caption, text in enumerate(captions.texts)}
    for per_image in (5, 30):  # at 30, every digit's 28 attribute captions (12 for a held-out combination) run out
        exported = export_photos.export(
            "digits", "json", tmp_path / str(per_image), count=60, captions_per_image=per_image
        )
        for texts, describing, available in zip(
            exported.captions, describes, attribute_captions_available, strict=True
        ):
            drawn = torch.tensor([index[text] for text in texts])
            assert len(set(texts)) == per_image and describing[drawn].all()
            with_attributes = min(per_image, available)
            assert states_attributes[drawn].tolist() == [True] * with_attributes + [False] * (
                per_image - with_attributes
            )


def test_clothes_are_written_as_jpeg_close_to_their_pixels_with_captions_naming_their_class(
    tmp_path: Path, monkeypatch, capsys
):
    # Fashion-MNIST cannot be downloaded in the tests: the digits stand in for its images, their labels for its classes.
    test = digits_test_split()
    monkeypatch.setattr(export_photos, "load_splits", lambda dataset, data_dir, val_size: Splits(test, test, test))
    exported = export_photos.main(
        ["--dataset", "fashion", "--layout", "folders", "--output", str(tmp_path / "clothes")]
    )
    assert exported.files == [f"images/{index:05d}.jpg" for index in range(COUNT)] and torch.equal(
        exported.images, test.images
    )
    for file, pixels in zip(exported.files, exported.images, strict=True):
        with Image.open(tmp_path / "clothes" / file) as picture:
            assert (picture.format, picture.mode) == ("JPEG", "L")
            assert np.abs(np.asarray(picture).astype(int) - pixels.numpy()).max() <= 8  # quality 95
    templates = training_captions("templates", "fashion")
    class_of = dict(zip(templates.texts, templates.says[:, 0].tolist(), strict=True))
    for texts, label in zip(exported.captions, test.labels.tolist(), strict=True):
        assert len(set(texts)) == 5 and {class_of[text] for text in texts} == {label}
    assert (
        "12 Fashion-MNIST test images (JPEG) with 60 class-name captions in the folders layout"
        in capsys.readouterr().out
    )


def test_the_same_seed_draws_the_same_captions_in_any_layout_and_another_seed_others(tmp_path: Path):
    first = export_digits(tmp_path / "first", "--layout", "json", "--seed", "3").captions
    assert export_digits(tmp_path / "again", "--layout", "flickr8k", "--seed", "3").captions == first
    assert export_digits(tmp_path / "other", "--layout", "json", "--seed", "4").captions != first


def test_a_folder_that_is_not_empty_is_refused_in_one_line_and_left_as_it_was(tmp_path: Path):
    output = tmp_path / "mine"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as refusal:
        export_digits(output, "--layout", "json")
    message = str(refusal.value.code)
    assert message == f"error: --output {output} is not empty: give a new or empty folder, or empty this one"
    assert files_in(tmp_path) == {"mine/notes.txt"} and (output / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (["--count", "361"], "--count 361 exceeds the 360 test images of digits"),
        (["--captions-per-image", "100"], "--captions-per-image 100 exceeds the"),
        (["--dataset", "mnist", "--data-dir", "a-file"], "is a file, not a folder"),
    ],
)
def test_an_export_that_cannot_be_made_says_why_in_one_line_and_writes_nothing(
    tmp_path: Path, monkeypatch, options: list[str], reason: str
):
    monkeypatch.chdir(tmp_path)
    Path("a-file").write_text("not a data folder")
    with pytest.raises(SystemExit) as error:
        export_digits(Path("new") / "exported", "--layout", "json", *options)
    assert (
        str(error.value.code).startswith("error: ")
        and reason in str(error.value.code)
        and "\n" not in str(error.value.code)
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file"]


def test_an_export_interrupted_midway_leaves_nothing_behind_not_even_the_folders_made_for_it(
    tmp_path: Path, monkeypatch
):
    def interrupt(*args) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(export_photos, "write_captions", interrupt)  # every image is written by then
    with pytest.raises(KeyboardInterrupt):
        export_digits(tmp_path / "new" / "exported", "--layout", "flickr8k")
    assert list(tmp_path.iterdir()) == []
