"""Image–caption collections read from files (photo_files.py): each layout on small drawn
pictures, resizing, the split by image, bad input skipped or refused in one line, and the cache."""

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from dataset import DataError
from photo_files import (
    Collection,
    collection_from_tensors,
    describe,
    load_collection,
    split_by_image,
)

SIZE = 8  # pixels of a loaded image's side
RED, GREEN, BLUE, WHITE = (220, 20, 20), (20, 220, 20), (20, 20, 220), (255, 255, 255)
# Pictures of the sizes, aspect ratios, modes and formats users' collections hold, each of one
# colour, and the colour it loads as: grey on all three channels, transparency as white paper.
PICTURES = {
    "wide.png": (Image.new("RGB", (48, 24), RED), RED),
    "tall.jpg": (Image.new("RGB", (20, 40), BLUE), BLUE),
    "grey.png": (Image.new("L", (32, 32), 90), (90, 90, 90)),
    "clear.png": (Image.new("RGBA", (30, 30), (0, 0, 0, 0)), WHITE),
    "square.png": (Image.new("RGB", (16, 16), GREEN), GREEN),
}
CAPTIONS = {
    "wide.png": ['a red field, wide and "flat"', "a red field"],
    "tall.jpg": ["a blue tower, tall"],
    "grey.png": ["grey", "a grey square"],
    "clear.png": ["nothing at all"],
    "square.png": ["a green square", "green"],
}


def write_pictures(folder: Path, names=PICTURES) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        PICTURES[name][0].save(folder / name)


def load(data_dir: Path, tmp_path: Path, **options) -> Collection:
    return load_collection(data_dir, SIZE, tmp_path / "cache", **options)


def splits(collection: Collection):
    return (collection.train, collection.val, collection.test)


def caption_pairs(collection: Collection) -> list[tuple[str, str]]:
    """(image file, caption) of every caption in the collection, sorted: repeats would show."""
    return sorted(
        (split.files[image], caption)
        for split in splits(collection)
        for caption, image in zip(split.captions, split.caption_image.tolist(), strict=True)
    )


def expected_pairs(folder: str) -> list[tuple[str, str]]:
    return sorted((f"{folder}{name}", caption) for name, captions in CAPTIONS.items() for caption in captions)


def all_files(collection: Collection) -> list[str]:
    return [file for split in splits(collection) for file in split.files]


def write_json(path: Path, entries) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=1))


def write_folders(root: Path) -> None:
    write_pictures(root / "images")
    (root / "captions").mkdir()
    for name, captions in CAPTIONS.items():
        (root / "captions" / f"{Path(name).stem}.txt").write_text("\n".join(captions) + "\n")


def write_flickr8k_csv(root: Path) -> None:
    write_pictures(root / "Images")
    # Written by hand, as the Kaggle copy is: quoted captions hold commas and quotes, and an
    # unquoted comma is part of the caption.
    (root / "captions.txt").write_text(
        "image,caption\n"
        'wide.png,"a red field, wide and ""flat"""\n'
        "wide.png,a red field\n"
        "tall.jpg,a blue tower, tall\n"
        "grey.png,grey\n"
        "grey.png,a grey square\n"
        "clear.png,nothing at all\n"
        "square.png,a green square\n"
        "square.png,green\n"
    )


def write_flickr8k_tokens(root: Path) -> None:
    """The original distribution: Flicker8k_Dataset/ (sic) and Flickr8k_text/."""
    write_pictures(root / "Flicker8k_Dataset")
    lines = [f"{name}#{k}\t{caption}" for name, captions in CAPTIONS.items() for k, caption in enumerate(captions)]
    (root / "Flickr8k_text").mkdir()
    (root / "Flickr8k_text" / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")


def write_official_splits(folder: Path) -> None:
    """wide and tall to train, grey to validation, clear to test; square in none."""
    folder.mkdir(exist_ok=True)
    for name, images in (("train", "wide.png\ntall.jpg\n"), ("dev", "grey.png\n"), ("test", "clear.png\n")):
        (folder / f"Flickr_8k.{name}Images.txt").write_text(images)


KARPATHY_SPLIT = {
    "wide.png": "train",
    "tall.jpg": "restval",
    "grey.png": "val",
    "clear.png": "test",
    "square.png": "train",
}


def karpathy_entries(filepath: str | None = None) -> list[dict]:
    """Karpathy's entries of PICTURES, split by KARPATHY_SPLIT; each sentence's tokens differ from its raw text."""
    entries = [
        {
            "filename": name,
            "imgid": number,
            "split": KARPATHY_SPLIT[name],
            "sentences": [{"raw": caption, "tokens": ["not", "this"]} for caption in CAPTIONS[name]],
        }
        for number, name in enumerate(PICTURES)
    ]
    return [{**entry, "filepath": filepath} for entry in entries] if filepath else entries


def write_karpathy(path: Path, entries: list, dataset: str = "flickr8k") -> None:
    write_json(path, {"images": entries, "dataset": dataset})


def seed_training_on(files: list[str], damaged: list[str]) -> int:
    """A split seed that puts the `damaged` files in the training split, so that skipping them leaves
    no held-out split of these few images empty."""
    wanted = {files.index(file) for file in damaged}
    return next(seed for seed in range(1000) if wanted <= set(split_by_image(files, seed, 0.1)[0]))


def assert_one_line_naming(error: pytest.ExceptionInfo, *words: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message


# Layouts


@pytest.mark.parametrize("as_file", [False, True], ids=["folder", "json-file"])
def test_json_with_caption_and_captions_resolves_paths_from_the_json_folder(tmp_path, monkeypatch, as_file):
    data = tmp_path / "data"
    write_pictures(data / "pictures")
    entries = [{"image_path": "pictures/wide.png", "caption": CAPTIONS["wide.png"][0]}]
    entries += [
        {"image_path": f"pictures/{name}", "captions": captions}
        for name, captions in CAPTIONS.items()
        if name != "wide.png"
    ]
    # The same image again, spelled otherwise, with a caption in spaces.
    entries += [{"image_path": "./pictures/../pictures/wide.png", "caption": f"  {CAPTIONS['wide.png'][1]}\t"}]
    write_json(data / "captions.json", entries)
    monkeypatch.chdir(tmp_path)  # the image paths are not relative to the working folder

    collection = load(data / "captions.json" if as_file else data, tmp_path)

    assert collection.layout == "json" and "captions.json" in collection.source
    assert caption_pairs(collection) == expected_pairs("pictures/")
    assert collection.skipped == [] and not collection.official_splits


def test_folders_layout_pairs_each_image_with_its_caption_file(tmp_path):
    write_folders(tmp_path / "data")
    collection = load(tmp_path / "data", tmp_path)
    assert collection.layout == "folders"
    assert caption_pairs(collection) == expected_pairs("images/")
    assert collection.skipped == []


def test_flickr8k_csv_without_split_files_is_split_by_seed(tmp_path):
    write_flickr8k_csv(tmp_path / "data")
    csv_file = tmp_path / "data" / "captions.txt"
    csv_file.write_text(
        csv_file.read_text(), encoding="utf-8-sig"
    )  # with a byte-order mark, as Windows Notepad saves it
    collection = load(tmp_path / "data", tmp_path)
    assert collection.layout == "flickr8k" and collection.source.startswith("captions.txt and Images/")
    assert caption_pairs(collection) == expected_pairs("Images/")
    assert not collection.official_splits
    assert [len(split) for split in splits(collection)] == [3, 1, 1]
    assert "seeded split by image 3 / 1 / 1" in describe(collection)[0]


@pytest.mark.parametrize("form", ["csv", "tokens"])
def test_flickr8k_official_splits_are_respected_and_images_in_none_left_out(tmp_path, form):
    data = tmp_path / "data"
    if form == "csv":
        write_flickr8k_csv(data)
        write_official_splits(data)
        folder = "Images/"
    else:
        write_flickr8k_tokens(data)
        write_official_splits(data / "Flickr8k_text")
        folder = "Flicker8k_Dataset/"

    collection = load(data, tmp_path)

    assert collection.official_splits
    assert [split.files for split in splits(collection)] == [
        [f"{folder}tall.jpg", f"{folder}wide.png"],
        [f"{folder}grey.png"],
        [f"{folder}clear.png"],
    ]
    assert collection.outside_splits == [f"{folder}square.png"]
    assert caption_pairs(collection) == [pair for pair in expected_pairs(folder) if "square" not in pair[0]]
    assert "official splits 2 / 1 / 1 images (1 images in no split left out)" in describe(collection)[0]


def test_karpathy_split_json_gives_its_own_splits_with_restval_in_training_and_raw_captions(tmp_path):
    data = tmp_path / "data"
    write_pictures(data / "Images")
    write_karpathy(data / "dataset_flickr8k.json", karpathy_entries())

    collection = load(data, tmp_path)

    assert collection.layout == "karpathy" and collection.official_splits
    assert [split.files for split in splits(collection)] == [
        ["Images/square.png", "Images/tall.jpg", "Images/wide.png"],  # tall.jpg is restval
        ["Images/grey.png"],
        ["Images/clear.png"],
    ]
    assert caption_pairs(collection) == expected_pairs("Images/")
    assert collection.skipped == [] and collection.outside_splits == []
    assert collection.source == f"Karpathy's split dataset_flickr8k.json with Images/ in {data}"
    assert "official splits 3 / 1 / 1 images" in describe(collection)[0]


@pytest.mark.parametrize(
    "name, folder, filepath",
    [
        ("dataset_flickr8k.json", "Flicker8k_Dataset", None),
        ("dataset_flickr30k.json", "flickr30k-images", None),
        ("dataset_coco.json", None, "val2014"),
        ("dataset_flickr8k.json", None, None),
    ],
    ids=["flickr8k", "flickr30k", "coco", "beside"],
)
def test_a_karpathy_json_given_itself_finds_the_images_where_its_collection_keeps_them(
    tmp_path, name, folder, filepath
):
    data = tmp_path / "data"
    write_pictures(data / (folder or filepath or "."))
    write_karpathy(data / name, karpathy_entries(filepath), dataset=name.removeprefix("dataset_").removesuffix(".json"))

    collection = load(data / name, tmp_path)

    prefix = f"{folder or filepath}/" if folder or filepath else ""
    assert collection.layout == "karpathy" and collection.official_splits and collection.skipped == []
    assert caption_pairs(collection) == expected_pairs(prefix)
    assert collection.test.files == [f"{prefix}clear.png"]
    where = f"{folder}/" if folder else "its images beside it"
    assert collection.source == f"Karpathy's split {name} with {where} in {data}"


def test_a_folder_with_karpathy_json_and_flickr8k_captions_uses_the_json_and_says_so(tmp_path):
    data = tmp_path / "data"
    write_flickr8k_csv(data)
    write_karpathy(data / "dataset_flickr8k.json", karpathy_entries())

    collection = load(data, tmp_path)

    assert collection.layout == "karpathy" and collection.official_splits  # captions.txt alone is split by seed
    assert collection.val.files == ["Images/grey.png"] and collection.test.files == ["Images/clear.png"]
    source = f"Karpathy's split dataset_flickr8k.json with Images/ in {data} (captions.txt not used)"
    assert collection.source == source
    assert describe(collection)[0].startswith(f"found karpathy layout, {source}: 5 images, 8 captions;")


def test_a_karpathy_image_whose_file_is_missing_is_skipped_and_counted(tmp_path):
    data = tmp_path / "data"
    write_pictures(data / "Images")
    (data / "Images" / "square.png").unlink()
    write_karpathy(data / "dataset_flickr8k.json", karpathy_entries())

    collection = load(data, tmp_path)

    assert collection.train.files == ["Images/tall.jpg", "Images/wide.png"]
    assert collection.skipped == ["Images/square.png: missing"]
    assert describe(collection)[-1] == "skipped 1 entry: Images/square.png: missing"


def test_bad_karpathy_entries_are_skipped_one_line_each_with_their_reason(tmp_path):
    data = tmp_path / "data"
    write_pictures(data / "Images")
    entries = karpathy_entries() + [
        {"filename": "tall.jpg", "split": "dev", "sentences": [{"raw": "a tower"}]},  # 6
        {"filename": "wide.png", "split": "train"},  # 7
        {"filename": "wide.png", "split": "train", "sentences": []},  # 8
        {"filename": "grey.png", "split": "test", "sentences": [{"raw": "grey again"}]},  # 9: grey.png is in val
        {"split": "train", "sentences": [{"raw": "where?"}]},  # 10
        "a string",  # 11
        {"filename": "tall.jpg", "split": ["train"], "sentences": [{"raw": "a tower"}]},  # 12
        {"filename": "tall.jpg", "sentences": [{"raw": "a tower"}]},  # 13
    ]
    entries[0]["sentences"] += [{"tokens": ["no", "raw"]}, {"raw": "  "}]  # wide.png's sentences 3 and 4
    write_karpathy(data / "dataset_flickr8k.json", entries)

    collection = load(data, tmp_path)

    assert caption_pairs(collection) == expected_pairs("Images/")
    assert collection.val.files == ["Images/grey.png"] and collection.test.files == ["Images/clear.png"]
    named = "dataset_flickr8k.json image"
    assert collection.skipped == [
        f'{named} 1 (Images/wide.png) sentence 3: no "raw" string',
        f"{named} 1 (Images/wide.png) sentence 4: empty caption",
        f'{named} 6 (Images/tall.jpg): split "dev" is none of train, val, test and restval',
        f'{named} 7 (Images/wide.png): no "sentences"',
        f'{named} 8 (Images/wide.png): no "sentences"',
        f"{named} 9 (Images/grey.png): repeats image 3: keep one",
        f'{named} 10: no "filename" string',
        f"{named} 11: not an object",
        f'{named} 12 (Images/tall.jpg): split ["train"] is none of train, val, test and restval',
        f'{named} 13 (Images/tall.jpg): no "split"',
    ]


def test_a_karpathy_split_left_without_usable_images_is_refused(tmp_path):
    data = tmp_path / "data"
    write_pictures(data / "Images")
    (data / "Images" / "clear.png").unlink()  # the only test image
    write_karpathy(data / "dataset_flickr8k.json", karpathy_entries())
    with pytest.raises(DataError) as error:
        load(data, tmp_path)
    assert_one_line_naming(error, 'has the split "test"', "dataset_flickr8k.json", "Images/clear.png: missing")


def test_two_karpathy_files_in_one_folder_are_refused(tmp_path):
    for name in ("dataset_flickr8k.json", "dataset_coco.json"):
        write_karpathy(tmp_path / "data" / name, karpathy_entries())
    with pytest.raises(DataError) as error:
        load(tmp_path / "data", tmp_path)
    assert_one_line_naming(error, "dataset_coco.json and dataset_flickr8k.json", "pass the one meant as --data-dir")


def test_an_image_in_two_official_splits_is_refused(tmp_path):
    data = tmp_path / "data"
    write_flickr8k_csv(data)
    write_official_splits(data)
    (data / "Flickr_8k.devImages.txt").write_text("grey.png\nwide.png\n")
    with pytest.raises(DataError) as error:
        load(data, tmp_path)
    assert_one_line_naming(error, "Images/wide.png", "Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt")


def test_an_official_split_file_naming_no_usable_image_is_refused(tmp_path):
    data = tmp_path / "data"
    write_flickr8k_csv(data)
    write_official_splits(data)
    (data / "Flickr_8k.devImages.txt").write_text("elsewhere.jpg\n")
    with pytest.raises(DataError) as error:
        load(data, tmp_path)
    assert_one_line_naming(error, "Flickr_8k.devImages.txt", "none of the 5 usable images")


# Images


def test_images_are_colour_squares_of_the_asked_size_whatever_their_mode(tmp_path):
    write_folders(tmp_path / "data")
    collection = load(tmp_path / "data", tmp_path)
    for split in splits(collection):
        assert split.images.dtype == torch.uint8 and split.images.shape == (len(split), 3, SIZE, SIZE)
        for file, image in zip(split.files, split.images, strict=True):
            colour = torch.tensor(PICTURES[Path(file).name][1]).view(3, 1, 1)
            assert (image.int() - colour).abs().max() <= 4, file  # JPEG is lossy


@pytest.mark.parametrize("size", [(60, 20), (20, 60)], ids=["wide", "tall"])
def test_the_shorter_side_is_scaled_and_the_middle_kept(tmp_path, size):
    """A picture in three bands, red, green and blue, along its longer side: scaled so that its
    shorter side fits and cropped in the middle it is all green; squashed or cropped at a corner,
    it would show red or blue."""
    bands = Image.new("RGB", size, RED)
    third = max(size) // 3
    box = (third, 0, 2 * third, size[1]) if size[0] > size[1] else (0, third, size[0], 2 * third)
    bands.paste(GREEN, box)
    bands.paste(BLUE, (2 * third, 0, *size) if size[0] > size[1] else (0, 2 * third, *size))
    data = tmp_path / "data"
    write_pictures(data, ["square.png", "grey.png"])
    bands.save(data / "bands.png")
    write_json(
        data / "captions.json",
        [{"image_path": name, "caption": name} for name in ("bands.png", "square.png", "grey.png")],
    )

    collection = load(data, tmp_path)

    split = next(split for split in splits(collection) if "bands.png" in split.files)
    image = split.images[split.files.index("bands.png")].int()
    # The resampling filter reads a little of the bands beside the middle into the edge pixels.
    assert (image - torch.tensor(GREEN).view(3, 1, 1)).abs().max() <= 16


def test_a_photo_is_turned_upright_by_its_exif_orientation(tmp_path):
    """Stored wide, red on the left and blue on the right, with orientation 6 (turn a quarter clockwise
    to view): upright it is tall, red at the top and blue at the bottom."""
    data = tmp_path / "data"
    write_pictures(data, ["square.png", "grey.png"])
    photo = Image.new("RGB", (40, 20), RED)
    photo.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    photo.save(data / "phone.jpg", exif=exif)
    write_json(
        data / "c.json", [{"image_path": name, "caption": name} for name in ("phone.jpg", "square.png", "grey.png")]
    )

    collection = load(data, tmp_path)

    split = next(split for split in splits(collection) if "phone.jpg" in split.files)
    image = split.images[split.files.index("phone.jpg")].int()
    assert (image[:, 0, :] - torch.tensor(RED)[:, None]).abs().max() <= 24  # the top row
    assert (image[:, -1, :] - torch.tensor(BLUE)[:, None]).abs().max() <= 24  # the bottom row


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_picture_over_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_pictures(data)
    Image.new("RGB", (40, 40)).save(data / "huge.png")
    names = [*PICTURES, "huge.png"]
    write_json(data / "c.json", [{"image_path": name, "caption": "x"} for name in names])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_200)  # the others have at most 1,152 pixels, huge.png 1,600

    collection = load(data, tmp_path, split_seed=seed_training_on(names, ["huge.png"]))

    assert "huge.png" not in all_files(collection) and len(all_files(collection)) == len(PICTURES)
    assert collection.skipped == ["huge.png: refused: 40x40 is more than 1,200 pixels (a decompression bomb?)"]


# The split


def test_split_by_image_is_disjoint_complete_sized_and_seeded():
    files = [f"images/{index:03d}.jpg" for index in range(95)]
    train, val, test = split_by_image(files, seed=0, held_out_fraction=0.1)
    assert len(val) == len(test) == 10 and len(train) == 75  # round(9.5) is 10
    assert sorted(train + val + test) == list(range(95))
    assert split_by_image(files, 0, 0.1) == (train, val, test)
    assert split_by_image(files, 1, 0.1) != (train, val, test)
    # The split depends on the names alone, not on the order they were listed in.
    reversed_split = split_by_image(files[::-1], 0, 0.1)
    assert [sorted(files[::-1][i] for i in part) for part in reversed_split] == [
        sorted(files[i] for i in part) for part in (train, val, test)
    ]


def test_split_by_image_holds_out_at_least_one_image_each_and_refuses_too_few():
    assert [len(part) for part in split_by_image(["a", "b", "c"], 0, 0.1)] == [1, 1, 1]
    with pytest.raises(DataError) as error:
        split_by_image(["a", "b"], 0, 0.1)
    assert_one_line_naming(error, "2 usable images are too few")


def test_a_collection_is_split_by_image_with_every_caption_beside_its_image(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "captions").mkdir()
    for index in range(30):
        Image.new("RGB", (12, 10), (index * 8, 0, 0)).save(data / "images" / f"{index:02d}.png")
        (data / "captions" / f"{index:02d}.txt").write_text(f"picture {index}\nred {index * 8}\n")

    collection = load(data, tmp_path, held_out_fraction=0.2)

    files = [split.files for split in splits(collection)]
    assert [len(split) for split in files] == [18, 6, 6]
    assert sorted(sum(files, [])) == [f"images/{index:02d}.png" for index in range(30)]  # each image in one split
    for split in splits(collection):
        for caption, image in zip(split.captions, split.caption_image.tolist(), strict=True):
            index = int(Path(split.files[image]).stem)
            assert caption in (f"picture {index}", f"red {index * 8}")
            assert split.images[image, 0, 0, 0] == index * 8
    expected = split_by_image([f"images/{index:02d}.png" for index in range(30)], 0, 0.2)
    assert files == [[f"images/{index:02d}.png" for index in part] for part in expected]


def test_collection_from_tensors_gives_what_loading_the_same_pictures_gives(tmp_path):
    images = torch.randint(0, 256, (12, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    files = [f"images/{index:02d}.png" for index in range(12)]
    captions = [[f"picture {index}", f" number {index} "] for index in range(12)]
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "captions").mkdir()
    for image, file, texts in zip(images, files, captions, strict=True):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(data / file)
        (data / "captions" / f"{Path(file).stem}.txt").write_text("\n".join(texts))

    from_files = load(data, tmp_path, split_seed=3, held_out_fraction=0.2)
    in_memory = collection_from_tensors(images, captions, files, split_seed=3, held_out_fraction=0.2)

    for loaded, given in zip(splits(from_files), splits(in_memory), strict=True):
        assert loaded.files == given.files
        assert loaded.captions == given.captions
        assert torch.equal(loaded.caption_image, given.caption_image)
        assert torch.equal(loaded.images, given.images)
    assert in_memory.cache is None and in_memory.skipped == []


# Bad input


def test_bad_json_entries_are_skipped_one_line_each_and_the_rest_loads(tmp_path):
    data = tmp_path / "data"
    write_pictures(data / "pictures")
    (data / "pictures" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    truncated = data / "pictures" / "cut.jpg"
    Image.effect_noise((64, 64), 50).convert("RGB").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    entries = [{"image_path": f"pictures/{name}", "captions": captions} for name, captions in CAPTIONS.items()] + [
        {"image_path": "pictures/gone.png", "caption": "not there"},  # 6
        {"image_path": "pictures/gone.png", "caption": "still not there"},  # 7
        {"image_path": "pictures/broken.png", "caption": "broken"},  # 8
        {"image_path": "pictures/cut.jpg", "caption": "cut short"},  # 9
        {"image_path": "pictures/grey.png", "caption": "  \t "},  # 10
        {"image_path": "pictures/grey.png", "caption": " grey"},  # 11: grey.png has "grey" already
        {"caption": "where?"},  # 12
        "a string",  # 13
        {"image_path": "pictures/tall.jpg", "captions": "not a list"},  # 14
        {"image_path": "pictures/tall.jpg"},  # 15
        {"image_path": "pictures/tall.jpg", "caption": "one", "captions": ["two"]},  # 16
    ]
    write_json(data / "captions.json", entries)
    names = [f"pictures/{name}" for name in [*PICTURES, "broken.png", "cut.jpg"]]
    seed = seed_training_on(names, ["pictures/broken.png", "pictures/cut.jpg"])

    collection = load(data, tmp_path, split_seed=seed)

    assert caption_pairs(collection) == expected_pairs("pictures/")
    assert collection.skipped[:8] == [
        "captions.json entry 10: empty caption",
        "captions.json entry 11: repeats a caption of pictures/grey.png",
        "captions.json entry 12: no image_path",
        "captions.json entry 13: not an object",
        'captions.json entry 14: no "caption" string or "captions" list of strings',
        'captions.json entry 15: no "caption" string or "captions" list of strings',
        'captions.json entry 16: both "caption" and "captions": keep one',
        "pictures/gone.png: missing",
    ]
    undecodable = sorted(collection.skipped[8:])
    assert len(undecodable) == 2
    assert undecodable[0].startswith("pictures/broken.png: cannot be decoded (")
    assert undecodable[1].startswith("pictures/cut.jpg: cannot be decoded (")
    assert all("\n" not in line for line in collection.skipped)
    assert describe(collection)[-1].startswith("skipped 10 entries: captions.json entry 10: empty caption; ")
    assert describe(collection)[-1].endswith("; ... and 5 more")
    again = load(data, tmp_path, split_seed=seed)
    assert again.cache_hit and again.skipped == collection.skipped  # decoding failures are remembered by the cache


@pytest.mark.parametrize(
    "text, words",
    [
        ('[\n  {"image_path": "a.png" "caption": "x"}\n]', ["not valid JSON", "line 2, column 26"]),
        ('{"image_path": "a.png", "caption": "x"}', ["top level", "not a JSON list"]),
        # COCO's own annotations hold "images" too, but are not Karpathy's split.
        ('{"images": [{"file_name": "a.png", "id": 1}], "annotations": []}', ["top level", "not a JSON list"]),
    ],
    ids=["malformed", "not-a-list", "coco-annotations"],
)
def test_a_json_file_that_is_not_a_list_of_entries_is_refused_in_one_line(tmp_path, text, words):
    (tmp_path / "captions.json").write_text(text)
    with pytest.raises(DataError) as error:
        load(tmp_path, tmp_path)
    assert_one_line_naming(error, "captions.json", *words)


@pytest.mark.parametrize("name", ["captions.json", "captions.txt", "Flickr8k.token.txt"])
def test_a_caption_list_that_is_not_utf8_is_refused_naming_the_byte(tmp_path, name):
    data = tmp_path / "data"
    write_pictures(data / "Images")
    before = {
        "captions.json": b'[{"image_path": "Images/wide.png", "caption": "caf',
        "captions.txt": b"image,caption\nwide.png,caf",
        "Flickr8k.token.txt": b"wide.png#0\tcaf",
    }[name]
    (data / name).write_bytes(before + b"\xe9 au lait" + b'"}]' * (name == "captions.json"))
    with pytest.raises(DataError) as error:
        load(data, tmp_path)
    assert_one_line_naming(error, name, f"not UTF-8 (byte {len(before)})", "save it as UTF-8")


def test_bad_caption_files_in_folders_skip_their_image_and_the_rest_loads(tmp_path):
    data = tmp_path / "data"
    write_folders(data)
    (data / "captions" / "tall.txt").write_bytes(b"a blue tower\nna\xefve\n")  # not UTF-8 from byte 15
    (data / "captions" / "grey.txt").write_text("grey\n\n  grey  \na grey square\n")  # a blank line, a repeat
    (data / "captions" / "clear.txt").write_text(" \n\n")
    (data / "captions" / "orphan.txt").write_text("an image that is not there\n")
    Image.new("RGB", (10, 10)).save(data / "images" / "alone.png")
    for twin in ("twin.png", "twin.jpg"):
        Image.new("RGB", (10, 10)).save(data / "images" / twin)
    (data / "captions" / "twin.txt").write_text("which one?\n")

    collection = load(data, tmp_path)

    assert collection.skipped == [
        "images/alone.png: no captions/alone.txt",
        "captions/clear.txt: empty",
        "captions/grey.txt line 3: repeats a caption of images/grey.png",
        "captions/tall.txt: not UTF-8 (byte 15); save it as UTF-8",
        "images/twin.jpg, images/twin.png: 2 images share one stem: rename all but one",
        "captions/orphan.txt: no image images/orphan.*",
    ]
    assert caption_pairs(collection) == [
        pair for pair in expected_pairs("images/") if pair[0] not in ("images/tall.jpg", "images/clear.png")
    ]


def test_malformed_flickr8k_lines_are_skipped(tmp_path):
    data = tmp_path / "data"
    write_flickr8k_tokens(data)
    token_file = data / "Flickr8k_text" / "Flickr8k.token.txt"
    token_file.write_text(token_file.read_text() + "no tab here\nsquare.png#9\t\n\n")
    Image.new("RGB", (10, 10)).save(data / "Flicker8k_Dataset" / "uncaptioned.png")
    lines = len(token_file.read_text().splitlines())

    collection = load(data, tmp_path)

    assert collection.skipped == [
        f"Flickr8k.token.txt line {lines - 2}: not name.jpg#k<TAB>caption",
        f"Flickr8k.token.txt line {lines - 1}: empty caption",
        "Flicker8k_Dataset/uncaptioned.png: no caption in Flickr8k.token.txt",
    ]
    assert caption_pairs(collection) == expected_pairs("Flicker8k_Dataset/")


def test_a_captions_csv_without_its_header_is_refused(tmp_path):
    write_flickr8k_csv(tmp_path / "data")
    csv_file = tmp_path / "data" / "captions.txt"
    csv_file.write_text(csv_file.read_text().split("\n", 1)[1])
    with pytest.raises(DataError) as error:
        load(tmp_path / "data", tmp_path)
    assert_one_line_naming(error, "captions.txt", "image,caption")


def test_a_folder_of_no_known_layout_is_refused_naming_the_layouts(tmp_path):
    for name in ("a.json", "b.json", "notes.txt"):  # two JSON files: which one is meant?
        (tmp_path / "data" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "data" / name).write_text("[]")
    with pytest.raises(DataError) as error:
        load(tmp_path / "data", tmp_path)
    assert_one_line_naming(
        error,
        str(tmp_path / "data"),
        "karpathy:",
        "dataset_coco.json",
        "json:",
        "folders:",
        "flickr8k:",
        "Flickr8k.token.txt",
    )


def test_a_data_dir_that_does_not_exist_is_refused(tmp_path):
    with pytest.raises(DataError) as error:
        load(tmp_path / "nowhere", tmp_path)
    assert_one_line_naming(error, "nowhere", "does not exist")


def test_a_collection_with_nothing_usable_is_refused_naming_the_first_problems(tmp_path):
    write_json(
        tmp_path / "c.json",
        [{"image_path": f"{index}.png", "caption": "gone"} for index in range(7)] + [{"caption": "x"}],
    )
    with pytest.raises(DataError) as error:
        load(tmp_path, tmp_path)
    assert_one_line_naming(
        error, "no usable image–caption pair", "c.json entry 8: no image_path; 0.png: missing", "and 3 more"
    )


# The cache


def test_the_second_load_reads_the_cache_and_gives_equal_tensors(tmp_path):
    write_folders(tmp_path / "data")
    first = load(tmp_path / "data", tmp_path)
    second = load(tmp_path / "data", tmp_path)
    assert not first.cache_hit and second.cache_hit and first.cache == second.cache
    assert sorted(path.name for path in first.cache.parent.iterdir()) == [
        first.cache.with_suffix(".json").name,
        first.cache.name,
    ]
    for decoded, cached in zip(splits(first), splits(second), strict=True):
        assert torch.equal(decoded.images, cached.images)
        assert decoded.files == cached.files and decoded.captions == cached.captions
    assert describe(first)[1] == f"decoded 5 images and cached them in {first.cache}"
    assert describe(second)[1] == f"images: read from the cache {first.cache}"


def test_a_changed_image_or_image_size_misses_the_cache(tmp_path):
    data = tmp_path / "data"
    write_folders(data)
    first = load(data, tmp_path)
    picture = data / "images" / "square.png"
    Image.new("RGB", (16, 16), BLUE).save(picture)
    later = picture.stat().st_mtime_ns + 10**9
    os.utime(picture, ns=(later, later))

    changed = load(data, tmp_path)
    resized = load_collection(data, SIZE * 2, tmp_path / "cache")

    assert not changed.cache_hit and changed.cache != first.cache
    split = next(split for split in splits(changed) if "images/square.png" in split.files)
    assert split.images[split.files.index("images/square.png"), :, 0, 0].tolist() == list(BLUE)
    assert not resized.cache_hit and resized.train.images.shape[-1] == SIZE * 2


def test_an_interrupted_cache_write_is_never_trusted(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_folders(data)
    expected = load(data, tmp_path / "reference")
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    stray = cache_dir / f".{expected.cache.name}.x1y2.tmp"  # left by a run that was killed
    stray.write_bytes(b"half an array")
    replace = os.replace

    def interrupted_before_the_sidecar(source, target):
        if str(target).endswith(".json"):
            raise KeyboardInterrupt
        replace(source, target)

    monkeypatch.setattr(os, "replace", interrupted_before_the_sidecar)
    with pytest.raises(KeyboardInterrupt):
        load(data, tmp_path)
    monkeypatch.undo()
    # The array is in place, its sidecar is not, and the interrupted run's temporary files are gone.
    assert sorted(path.name for path in cache_dir.iterdir()) == [stray.name, expected.cache.name]

    resumed = load(data, tmp_path)
    assert not resumed.cache_hit  # the array without its sidecar was not trusted

    resumed.cache.write_bytes(resumed.cache.read_bytes()[:200])  # a damaged array beside its sidecar
    rewritten = load(data, tmp_path)
    assert not rewritten.cache_hit
    for reference, loaded in zip(splits(expected), splits(rewritten), strict=True):
        assert torch.equal(reference.images, loaded.images)
    assert load(data, tmp_path).cache_hit


def test_a_cache_larger_than_allowed_in_memory_is_memory_mapped_with_equal_pixels(tmp_path):
    write_folders(tmp_path / "data")
    in_memory = load(tmp_path / "data", tmp_path)
    mapped = load(tmp_path / "data", tmp_path, max_in_memory_bytes=0)
    assert mapped.cache_hit and "memory-mapped" in describe(mapped)[1]
    assert (
        len({split.images.untyped_storage().data_ptr() for split in splits(mapped)}) == 1
    )  # views of one map, not copies
    for held, view in zip(splits(in_memory), splits(mapped), strict=True):
        assert not held.memory_mapped and view.memory_mapped
        assert torch.equal(held.images, view.images)
        assert view.to("cpu") is view  # it stays mapped: batches are moved instead
        moved = held.to("cpu")
        assert torch.equal(moved.images, held.images) and moved.captions == held.captions
