"""Image–caption collections read from files, for `train.py --dataset photos --data-dir PATH`.

Four layouts are recognised (`LAYOUTS`), in this order: Karpathy's split JSON of Flickr8k,
Flickr30k or COCO (dataset_flickr8k.json and its kin, with the train/val/test split that
retrieval papers use), a JSON list of images and their captions, an images/ folder beside a
captions/ folder, and Flickr8k as it is distributed, with its official split files when they
are there. A collection without a split of its own is split by a seed, by image, so that no
image's captions straddle train, validation and test.

Each image is decoded once, in colour, its shorter side scaled to the image size and its
middle cropped square, and all of them are kept in one uint8 .npy cache keyed by the image
files' names, sizes and modification times: a second run reads the pixels back in seconds,
memory-mapped when they would not fit in memory. Captions are small and re-read every run.
Entries that cannot be used (a missing or damaged image, an empty or repeated caption) are
skipped, one line each saying why, and the rest of the collection loads.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from dataset import DataError

LAYOUTS = {
    "karpathy": "Karpathy's split file dataset_flickr8k.json, dataset_flickr30k.json or dataset_coco.json, "
    "here or given itself, with its images in Images/ or Flicker8k_Dataset/ (Flickr8k), flickr30k-images/ or "
    "Images/ (Flickr30k), their filepath folder such as val2014/ (COCO), or beside it",
    "json": 'a .json file, or a folder holding exactly one, listing {"image_path": ..., "caption": "..."} '
    'or {"image_path": ..., "captions": ["...", ...]} objects',
    "folders": "images/ beside captions/, one captions/<stem>.txt of one caption per line for each image",
    "flickr8k": "captions.txt (CSV image,caption) or Flickr8k.token.txt, here or in Flickr8k_text/, "
    "with the images in Images/ or Flicker8k_Dataset/",
}
FLICKR_TEXT_FOLDERS = (
    ".",
    "Flickr8k_text",
)  # the Kaggle copy keeps its text files at the top, the original in Flickr8k_text/
FLICKR_CAPTION_FILES = ("captions.txt", "Flickr8k.token.txt")
FLICKR_IMAGE_FOLDERS = ("Images", "Flicker8k_Dataset")  # sic: the original archive misspells it
FLICKR_SPLIT_FILES = ("Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt", "Flickr_8k.testImages.txt")
KARPATHY_FILES = ("dataset_flickr8k.json", "dataset_flickr30k.json", "dataset_coco.json")
# Where each collection's images are looked for beside its split file, in order, before the split file's own folder;
# a COCO entry names its folder itself, in "filepath" (train2014, val2014).
KARPATHY_IMAGE_FOLDERS = {"flickr8k": FLICKR_IMAGE_FOLDERS, "flickr30k": ("flickr30k-images", "Images"), "coco": ()}
KARPATHY_SPLITS = {"train": 0, "restval": 0, "val": 1, "test": 2}  # restval: COCO's validation images trained on
CACHE_FORMAT = 1  # raise it when what the cache holds changes, so that older caches miss
DECODE_AHEAD = 64  # images decoding at once: memory stays bounded whatever the collection's size
PROGRESS_FROM = 1_000  # images; fewer decode in a few seconds, without a progress bar
PROBLEMS_NAMED = 5  # skipped entries named in a message; the rest are counted

T = TypeVar("T")


@dataclass
class CaptionedPhotos:
    """One split of a collection."""

    images: torch.Tensor  # (N, 3, S, S) uint8 RGB
    captions: list[str]  # (K,) every caption of the split's images, stripped
    caption_image: torch.Tensor  # (K,) int64: index (0..N-1) of the image each caption belongs to
    files: list[str]  # (N,) each image's path relative to the collection's folder, "/" separated
    mapped_file: Path | None = None  # the cache file that `images` is a memory-mapped view of, if it is one

    def __len__(self) -> int:
        return len(self.files)

    @property
    def memory_mapped(self) -> bool:
        """Whether the images are read from the cache file on demand rather than held in memory."""
        return self.mapped_file is not None

    def to(self, device: torch.device | str) -> CaptionedPhotos:
        """The split with its images on `device`; a memory-mapped split stays where it is, as it does
        not fit in memory: the caller moves each batch instead. caption_image stays on the CPU, beside
        the captions it indexes."""
        if self.memory_mapped:
            return self
        return CaptionedPhotos(self.images.to(device), self.captions, self.caption_image, self.files)


class PhotoPairs:
    """A training split as the training loop draws from it: each distinct caption text once (`texts`,
    whose tokens it trains on), and per photo the indices of its captions' texts."""

    def __init__(self, photos: CaptionedPhotos, device: torch.device | str):
        self.images = photos.images  # on the device, or memory-mapped on the CPU
        self.texts = sorted(set(photos.captions))
        text_ids = {text: index for index, text in enumerate(self.texts)}
        per_photo: list[list[int]] = [[] for _ in range(len(photos))]
        for caption, photo in zip(photos.captions, photos.caption_image.tolist(), strict=True):
            per_photo[photo].append(text_ids[caption])
        width = max(map(len, per_photo))
        self.photo_texts = torch.tensor(
            [ids + [-1] * (width - len(ids)) for ids in per_photo], device=device
        )  # (N, M), -1: none

    def __len__(self) -> int:
        return len(self.photo_texts)

    def draw(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """For the photos of `batch`, one of its captions each, at random: (B,) indices into `texts`, and
        (B, B) whether photo j's caption is also one of photo i's, the positives: two photos that drew
        the same text ("a dog runs on the grass") are each other's."""
        options = self.photo_texts[batch]  # (B, M)
        counts = (options >= 0).sum(dim=1)
        pick = (torch.rand(len(batch), device=options.device, generator=generator) * counts).long()
        drawn = options.gather(1, pick[:, None])[:, 0]
        return drawn, (options[:, :, None] == drawn[None, None, :]).any(dim=1)


@dataclass
class Collection:
    train: CaptionedPhotos
    val: CaptionedPhotos
    test: CaptionedPhotos
    layout: str  # a key of LAYOUTS; "tensors" for collection_from_tensors
    source: str  # what was read, in words, e.g. "captions.txt and Images/ in DIR"
    official_splits: bool  # the collection's own split was used: Flickr8k's split files or Karpathy's split JSON
    skipped: list[str]  # one line per skipped entry: "<what>: <why>", in the order met
    cache: Path | None  # the cache file used (None for collection_from_tensors)
    cache_hit: bool  # read from the cache (True) or decoded and written now (False)
    outside_splits: list[str] = field(default_factory=list)  # images in none of the official split files, left out


@dataclass
class Listing:
    """What a collection's text files say, before any image is opened: each image's captions,
    stripped, in the order met; the entries skipped and why; the official split, if it has one."""

    layout: str
    source: str
    root: Path  # the folder that image files are named relative to
    captions: dict[str, list[str]] = field(default_factory=dict)  # image file -> its captions
    skipped: list[str] = field(default_factory=list)
    official: list[list[str]] | None = None  # the image files of train, validation and test

    def add(self, file: str, caption: str, what: str) -> None:
        """Add one caption of image `file`, read from `what`, unless it is empty or repeats one of the image's."""
        text = caption.strip()
        if not text:
            self.skip(what, "empty caption")
        elif text in self.captions.get(file, ()):
            self.skip(what, f"repeats a caption of {file}")
        else:
            self.captions.setdefault(file, []).append(text)

    def skip(self, what: str, why: str) -> None:
        self.skipped.append(f"{what}: {why}")


@dataclass
class CachedImages:
    """The images of a cache file, in split order, and what its sidecar records of them."""

    images: torch.Tensor  # (rows, 3, S, S) uint8: the training images, then validation, then test
    splits: list[list[str]]  # the files of each split that decoded, in the order of their rows
    failed: list[list[str]]  # [file, why] of each image that could not be decoded
    mapped: bool  # memory-mapped rather than held in memory


def load_collection(
    data_dir: str | Path,
    image_size: int,
    cache_dir: str | Path,
    split_seed: int = 0,
    held_out_fraction: float = 0.1,
    max_in_memory_bytes: int | None = None,
) -> Collection:
    """The image–caption collection at `data_dir`, in the first layout of LAYOUTS it has, each image
    (3, image_size, image_size) uint8. The images come from the cache in `cache_dir` when it holds
    these very files at this size and split, else they are decoded and cached there; they are held
    in memory when they take at most `max_in_memory_bytes` (default: a quarter of the machine's
    memory), else memory-mapped. The splits are the collection's own when it has them (Karpathy's
    split JSON, Flickr8k's three split files), else split_by_image(files, split_seed,
    held_out_fraction). DataError says what is wrong and what to do when the collection cannot be
    read or nothing usable is left."""
    if image_size < 1:
        raise DataError(f"the image size must be at least 1 pixel, got {image_size}")
    listing = read_listing(Path(data_dir))
    stats = image_stats(listing)
    if not stats:
        raise nothing_usable(listing.source, listing.skipped)
    if listing.official is None:
        files = list(stats)
        splits = [[files[i] for i in split] for split in split_by_image(files, split_seed, held_out_fraction)]
        outside = []
    else:
        splits = [sorted(file for file in official if file in stats) for official in listing.official]
        in_a_split = set().union(*splits)
        outside = sorted(file for file in stats if file not in in_a_split)
        for index, split in enumerate(splits):
            if not split:
                raise empty_official_split(listing, index, len(stats))
    cache = Path(cache_dir) / f"captions-{image_size}px-{cache_key(splits, stats, image_size)}.npy"
    budget = memory_budget() if max_in_memory_bytes is None else max_in_memory_bytes
    cached = read_cache(cache, image_size, budget)
    cache_hit = cached is not None
    if cached is None:
        write_cache(cache, listing.root, splits, image_size)
        cached = read_cache(cache, image_size, budget)
        if cached is None:
            raise DataError(
                f"the image cache {cache} cannot be read back just after it was written: is {cache.parent} on a "
                "faulty disk?"
            )
    skipped = listing.skipped + [f"{file}: {why}" for file, why in cached.failed]
    mapped_file = cache if cached.mapped else None
    return assemble(listing, cached.images, cached.splits, skipped, cache, cache_hit, mapped_file, outside)


def collection_from_tensors(
    images: torch.Tensor,
    captions_per_image: list[list[str]],
    files: list[str],
    split_seed: int = 0,
    held_out_fraction: float = 0.1,
) -> Collection:
    """The collection that loading these images from files would give: image i of `images`, (N, 3, S, S)
    uint8, is named files[i] and captioned by captions_per_image[i], the captions are cleaned and the
    images split by the same rules. It shows that the file pipeline gives what the in-memory one gives."""
    if not len(images) == len(captions_per_image) == len(files) or len(set(files)) < len(files):
        raise ValueError(
            "images, captions_per_image and files must have one entry per image, and the files distinct names"
        )
    listing = Listing("tensors", "images given in memory", Path())
    for file, captions in zip(files, captions_per_image, strict=True):
        for number, caption in enumerate(captions, start=1):
            listing.add(file, caption, f"{file} caption {number}")
    usable = list(listing.captions)
    if not usable:
        raise nothing_usable(listing.source, listing.skipped)
    splits = [[usable[i] for i in split] for split in split_by_image(usable, split_seed, held_out_fraction)]
    row = {file: index for index, file in enumerate(files)}
    in_split_order = images[torch.tensor([row[file] for split in splits for file in split])]
    return assemble(listing, in_split_order, splits, listing.skipped, cache=None, cache_hit=False)


def split_by_image(files: list[str], seed: int, held_out_fraction: float) -> tuple[list[int], list[int], list[int]]:
    """Training, validation and test indices into `files`, each in the order of the files' names:
    validation and test each get round(held_out_fraction * N) images, at least one, and training the
    rest. The files are sorted before a seeded shuffle, so the split depends on their names and the
    seed alone, not on the order in which they were listed; splitting images rather than captions
    keeps all captions of an image in one split."""
    if not 0 <= held_out_fraction < 0.5:
        raise DataError(f"the held-out fraction must be at least 0 and below 0.5, got {held_out_fraction}")
    held_out = max(1, round(held_out_fraction * len(files)))
    if len(files) <= 2 * held_out:
        raise DataError(
            f"{len(files):,} usable images are too few to hold out {held_out:,} for validation and {held_out:,} for "
            "test "
            "and train on the rest: add images"
        )
    by_name = sorted(range(len(files)), key=files.__getitem__)
    shuffled = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    val, test, train = shuffled[:held_out], shuffled[held_out : 2 * held_out], shuffled[2 * held_out :]
    return tuple([by_name[position] for position in sorted(part)] for part in (train, val, test))


def assemble(
    listing: Listing,
    images: torch.Tensor,
    splits: list[list[str]],
    skipped: list[str],
    cache: Path | None,
    cache_hit: bool,
    mapped_file: Path | None = None,
    outside_splits: list[str] | None = None,
) -> Collection:
    """The collection of `images`, (N, 3, S, S) in split order, whose rows hold the files of `splits`
    one after the other: each split is a view of its rows. DataError when a split is left empty."""
    parts, start = [], 0
    for name, files in zip(("training", "validation", "test"), splits, strict=True):
        if not files:
            raise DataError(f"no usable image is left in the {name} split of {listing.source}: {named(skipped)}")
        counts = torch.tensor([len(listing.captions[file]) for file in files])
        captions = [caption for file in files for caption in listing.captions[file]]
        caption_image = torch.arange(len(files)).repeat_interleave(counts)
        parts.append(CaptionedPhotos(images[start : start + len(files)], captions, caption_image, files, mapped_file))
        start += len(files)
    return Collection(
        *parts,
        layout=listing.layout,
        source=listing.source,
        official_splits=listing.official is not None,
        skipped=skipped,
        cache=cache,
        cache_hit=cache_hit,
        outside_splits=outside_splits or [],
    )


def describe(collection: Collection) -> list[str]:
    """The lines train.py prints about a collection: what was found and how it is split, where its
    images came from, and which entries were skipped and why."""
    splits = (collection.train, collection.val, collection.test)
    images, captions = sum(map(len, splits)), sum(len(split.captions) for split in splits)
    sizes = " / ".join(f"{len(split):,}" for split in splits)
    if not collection.official_splits:
        how = f"seeded split by image {sizes}"
    elif collection.outside_splits:
        how = f"official splits {sizes} images ({len(collection.outside_splits):,} images in no split left out)"
    else:
        how = f"official splits {sizes} images"
    lines = [f"found {collection.layout} layout, {collection.source}: {images:,} images, {captions:,} captions; {how}"]
    if collection.cache is not None:
        mapped = " (memory-mapped: they take more memory than allowed)" if collection.train.memory_mapped else ""
        if collection.cache_hit:
            lines.append(f"images: read from the cache {collection.cache}{mapped}")
        else:
            lines.append(f"decoded {images:,} images and cached them in {collection.cache}{mapped}")
    if collection.skipped:
        count = len(collection.skipped)
        lines.append(f"skipped {count:,} {'entry' if count == 1 else 'entries'}: {named(collection.skipped)}")
    return lines


def named(problems: list[str]) -> str:
    """The first few of `problems` on one line, and how many more there are."""
    more = len(problems) - PROBLEMS_NAMED
    return "; ".join(problems[:PROBLEMS_NAMED]) + (f"; ... and {more:,} more" if more > 0 else "")


def nothing_usable(source: str, skipped: list[str]) -> DataError:
    return DataError(f"no usable image–caption pair in {source}: " + (named(skipped) if skipped else "it lists none"))


def empty_official_split(listing: Listing, index: int, usable: int) -> DataError:
    """Why split `index` (0 train, 1 validation, 2 test) of a collection's own split holds no usable image."""
    if listing.layout == "karpathy":
        split = ('"train" or "restval"', '"val"', '"test"')[index]
        why = named(listing.skipped) if listing.skipped else "it gives that split no image"
        return DataError(f"none of the {usable:,} usable images of {listing.source} has the split {split}: {why}")
    return DataError(
        f"none of the {usable:,} usable images of {listing.source} is named in {FLICKR_SPLIT_FILES[index]}: is it "
        "Flickr8k's?"
    )


# Layouts: what each collection's text files say.


def read_listing(data_dir: Path) -> Listing:
    """What the collection at `data_dir` says, in the first layout of LAYOUTS that it has."""
    if not data_dir.exists():
        raise DataError(
            f"--data-dir {data_dir} does not exist: pass the folder or the .json file of your image–caption collection"
        )
    if not data_dir.is_dir():
        if data_dir.suffix.lower() == ".json":
            return read_json_listing(data_dir)
        raise DataError(f"--data-dir {data_dir} is a file but not a .json caption list: pass a .json file or a folder")
    json_files = sorted(
        path
        for path in data_dir.iterdir()
        if path.suffix.lower() == ".json" and not path.name.startswith(".") and path.is_file()
    )
    karpathy_files = [path for path in json_files if path.name in KARPATHY_FILES]
    if len(karpathy_files) > 1:
        raise DataError(
            f"{data_dir} holds {' and '.join(path.name for path in karpathy_files)}, Karpathy's splits of different "
            "collections: pass the one meant as --data-dir"
        )
    if karpathy_files:
        # The split file wins over Flickr8k's caption files beside it: its split is the one retrieval papers use.
        caption_files = [path for name in FLICKR_CAPTION_FILES if (path := flickr_text_file(data_dir, name))]
        not_used = [path for path in json_files + caption_files if path != karpathy_files[0]]
        return read_json_listing(karpathy_files[0], [path.relative_to(data_dir).as_posix() for path in not_used])
    if len(json_files) == 1:
        return read_json_listing(json_files[0])
    if (data_dir / "images").is_dir() and (data_dir / "captions").is_dir():
        return read_folders_listing(data_dir)
    caption_file = next((path for name in FLICKR_CAPTION_FILES if (path := flickr_text_file(data_dir, name))), None)
    image_folder = next((data_dir / name for name in FLICKR_IMAGE_FOLDERS if (data_dir / name).is_dir()), None)
    if caption_file and image_folder:
        return read_flickr8k_listing(data_dir, caption_file, image_folder)
    looked_for = "; ".join(f"{layout}: {how}" for layout, how in LAYOUTS.items())
    raise DataError(f"no image–caption collection recognised in {data_dir}; looked for {looked_for}")


def read_json_listing(path: Path, not_used: list[str] | None = None) -> Listing:
    """A JSON list of {"image_path", "caption"} or {"image_path", "captions"} objects; an image may
    appear in several. Relative image paths are taken from the JSON file's folder. Karpathy's split
    JSON is read by read_karpathy_listing, saying that the files `not_used` beside it were not."""
    listing = Listing("json", f"{path.name} in {path.parent}", path.parent)
    try:
        entries = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}; correct it there"
        ) from error
    if is_karpathy(path, entries):
        return read_karpathy_listing(path, entries, not_used or [])
    if not isinstance(entries, list):
        raise DataError(
            f'the top level of {path} is not a JSON list: make it a list of {{"image_path": ..., "caption": ...}} '
            "objects"
        )
    for number, entry in enumerate(entries, start=1):
        what = f"{path.name} entry {number}"
        if not isinstance(entry, dict):
            listing.skip(what, "not an object")
            continue
        image_path = entry.get("image_path")
        texts = [entry["caption"]] if "caption" in entry else entry.get("captions")
        if not isinstance(image_path, str) or not image_path.strip():
            listing.skip(what, "no image_path")
        elif "caption" in entry and "captions" in entry:
            listing.skip(what, 'both "caption" and "captions": keep one')
        elif not (isinstance(texts, list) and texts and all(isinstance(text, str) for text in texts)):
            listing.skip(what, 'no "caption" string or "captions" list of strings')
        else:
            file = collection_path(path.parent, image_path)
            for text in texts:
                listing.add(file, text, what)
    return listing


def is_karpathy(path: Path, data: object) -> bool:
    """Whether `data`, read from `path`, is Karpathy's split JSON: {"images": [...]} in a file of his name, or
    whose first image has "sentences"; COCO's own annotation files, {"images": [...], "annotations": [...]}, are
    not."""
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        return False
    return path.name in KARPATHY_FILES or any(isinstance(image, dict) and "sentences" in image for image in images[:1])


def read_karpathy_listing(path: Path, data: dict, not_used: list[str]) -> Listing:
    """Karpathy's split of Flickr8k, Flickr30k or COCO: {"images": [{"filename", "filepath" (COCO),
    "split", "sentences": [{"raw"}, ...]}, ...], "dataset"}, each image's captions its sentences' raw
    texts and its split train (with restval), val or test. The images are looked for in the first of
    the collection's KARPATHY_IMAGE_FOLDERS beside the file that exists, else beside the file itself."""
    root = path.parent
    kind = data.get("dataset") if isinstance(data.get("dataset"), str) else path.stem.removeprefix("dataset_")
    kind = kind.lower()
    folder = next((name for name in KARPATHY_IMAGE_FOLDERS.get(kind, ()) if (root / name).is_dir()), None)
    where = f"{folder}/" if folder else "its images beside it"
    unused = f" ({', '.join(not_used)} not used)" if not_used else ""
    listing = Listing("karpathy", f"Karpathy's split {path.name} with {where} in {root}{unused}", root)
    listing.official = [[], [], []]
    first_entry: dict[str, int] = {}  # image file -> the entry that named it
    for number, entry in enumerate(data["images"], start=1):
        what = f"{path.name} image {number}"
        if not isinstance(entry, dict):
            listing.skip(what, "not an object")
            continue
        filename, filepath = entry.get("filename"), entry.get("filepath", "")
        split, sentences = entry.get("split"), entry.get("sentences")
        if not isinstance(filename, str) or not filename.strip() or not isinstance(filepath, str):
            listing.skip(what, 'no "filename" string')
            continue
        file = collection_path(root, "/".join(part for part in (folder, filepath, filename.strip()) if part))
        what = f"{what} ({file})"
        if split is None:
            listing.skip(what, 'no "split"')
        elif not isinstance(split, str) or split not in KARPATHY_SPLITS:
            listing.skip(what, f"split {json.dumps(split)} is none of train, val, test and restval")
        elif not isinstance(sentences, list) or not sentences:
            listing.skip(what, 'no "sentences"')
        elif file in first_entry:
            listing.skip(what, f"repeats image {first_entry[file]}: keep one")
        else:
            first_entry[file] = number
            listing.official[KARPATHY_SPLITS[split]].append(file)
            for count, sentence in enumerate(sentences, start=1):
                raw = sentence.get("raw") if isinstance(sentence, dict) else None
                if isinstance(raw, str):
                    listing.add(file, raw, f"{what} sentence {count}")
                else:
                    listing.skip(f"{what} sentence {count}", 'no "raw" string')
    return listing


def collection_path(root: Path, image_path: str) -> str:
    """`image_path` as the collection names it: relative to `root`, "/"-separated, without "." or
    ".." steps, so that two spellings of one file give one name; absolute when outside `root`."""
    base = root.absolute()
    path = Path(os.path.normpath(base / image_path))
    return path.relative_to(base).as_posix() if path.is_relative_to(base) else path.as_posix()


def read_folders_listing(root: Path) -> Listing:
    """images/<stem>.<ext>, each captioned by captions/<stem>.txt, one caption per line (blank lines
    separate nothing and are ignored)."""
    listing = Listing("folders", f"images/ and captions/ in {root}", root)
    by_stem: dict[str, list[Path]] = {}
    for image in image_files(root / "images"):
        by_stem.setdefault(image.stem, []).append(image)
    caption_files = {
        path.stem: path
        for path in sorted((root / "captions").iterdir())
        if path.suffix.lower() == ".txt" and path.is_file()
    }
    for stem, images in by_stem.items():
        file, caption_file = f"images/{images[0].name}", caption_files.get(stem)
        if len(images) > 1:
            listing.skip(
                ", ".join(f"images/{image.name}" for image in images),
                f"{len(images)} images share one stem: rename all but one",
            )
        elif caption_file is None:
            listing.skip(file, f"no captions/{stem}.txt")
        else:
            read_caption_file(listing, file, caption_file)
    for stem, caption_file in caption_files.items():
        if stem not in by_stem:
            listing.skip(f"captions/{caption_file.name}", f"no image images/{stem}.*")
    return listing


def read_caption_file(listing: Listing, file: str, caption_file: Path) -> None:
    """Add the captions of image `file` from `caption_file`, one per line; skip the image, saying why,
    when there are none or the file cannot be read."""
    name = f"captions/{caption_file.name}"
    try:
        lines = utf8_text(caption_file).splitlines()
    except (OSError, UnicodeDecodeError) as error:
        listing.skip(name, unreadable(error))
        return
    captions = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if not captions:
        listing.skip(name, "empty")
    for number, caption in captions:
        listing.add(file, caption, f"{name} line {number}")


def read_flickr8k_listing(data_dir: Path, caption_file: Path, image_folder: Path) -> Listing:
    """Flickr8k's captions, from the Kaggle copy's captions.txt or the original Flickr8k.token.txt,
    and its official split when all three split files are there."""
    listing = Listing(
        "flickr8k", f"{caption_file.relative_to(data_dir).as_posix()} and {image_folder.name}/ in {data_dir}", data_dir
    )
    read_lines = read_flickr8k_csv if caption_file.name == "captions.txt" else read_flickr8k_tokens
    mentioned = read_lines(listing, caption_file, image_folder.name)
    for image in image_files(image_folder):
        if (file := f"{image_folder.name}/{image.name}") not in mentioned:
            listing.skip(file, f"no caption in {caption_file.name}")
    split_files = [flickr_text_file(data_dir, name) for name in FLICKR_SPLIT_FILES]
    if all(split_files):
        listing.official = [
            [f"{image_folder.name}/{line.strip()}" for line in read_text(path).splitlines() if line.strip()]
            for path in split_files
        ]
        for (first, first_files), (second, second_files) in combinations(
            zip(split_files, listing.official, strict=True), 2
        ):
            if shared := sorted(set(first_files) & set(second_files)):
                raise DataError(
                    f"{shared[0]} is in both {first} and {second}: an image belongs in one split; remove it from one "
                    "of them"
                )
    return listing


def read_flickr8k_csv(listing: Listing, path: Path, image_folder: str) -> set[str]:
    """Add the captions of captions.txt, a CSV file of image,caption lines under that header; return the
    image files it names. An unquoted comma is taken to be part of the caption: image names hold none."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    if [name.strip().lower() for name in next(reader, [])] != ["image", "caption"]:
        raise DataError(
            f"{path} does not start with the line image,caption, as the captions.txt of Flickr8k does: add it"
        )
    mentioned = set()
    for row in reader:
        what = f"{path.name} line {reader.line_num}"
        if not row:
            continue
        name, *caption = row
        if not name.strip() or not caption:
            listing.skip(what, "not image,caption")
            continue
        mentioned.add(file := f"{image_folder}/{name.strip()}")
        listing.add(file, ",".join(caption), what)
    return mentioned


def read_flickr8k_tokens(listing: Listing, path: Path, image_folder: str) -> set[str]:
    """Add the captions of Flickr8k.token.txt, lines of name.jpg#k<TAB>caption; return the image files it names."""
    mentioned = set()
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        what = f"{path.name} line {number}"
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, hash_sign, _ = key.rpartition("#")
        if not tab or not hash_sign or not name.strip():
            listing.skip(what, "not name.jpg#k<TAB>caption")
            continue
        mentioned.add(file := f"{image_folder}/{name.strip()}")
        listing.add(file, caption, what)
    return mentioned


def flickr_text_file(data_dir: Path, name: str) -> Path | None:
    """The file `name` at the top of `data_dir` or in its Flickr8k_text/ folder, or None."""
    return next((path for folder in FLICKR_TEXT_FOLDERS if (path := data_dir / folder / name).is_file()), None)


def image_files(folder: Path) -> list[Path]:
    """The picture files at the top of `folder`, known by a suffix Pillow reads, sorted; not hidden ones
    such as macOS's ._name.jpg."""
    suffixes = Image.registered_extensions()
    return sorted(
        path
        for path in folder.iterdir()
        if path.suffix.lower() in suffixes and not path.name.startswith(".") and path.is_file()
    )


def read_text(path: Path) -> str:
    """The text of a caption or split file that must be readable UTF-8; DataError naming the problem otherwise."""
    try:
        return utf8_text(path)
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: {unreadable(error)}") from error


def utf8_text(path: Path) -> str:
    # Decoded as UTF-8 with the byte-order mark removed after, not as utf-8-sig, so that an error's offset counts the
    # file's bytes.
    return path.read_bytes().decode("utf-8").removeprefix("\ufeff")


def unreadable(error: OSError | UnicodeDecodeError) -> str:
    """Why a text file cannot be read, and what to do, for a message."""
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 (byte {error.start}); save it as UTF-8"
    return f"cannot be read ({error.strerror or error})"


def image_stats(listing: Listing) -> dict[str, tuple[int, int]]:
    """(size in bytes, modification time in ns) of each captioned image file, in the order met; a
    missing one is skipped."""
    stats = {}
    for file in listing.captions:
        try:
            info = (listing.root / file).stat()
        except OSError as error:
            listing.skip(
                file, "missing" if isinstance(error, FileNotFoundError) else f"cannot be read ({error.strerror})"
            )
            continue
        stats[file] = (info.st_size, info.st_mtime_ns)
    return stats


# The cache: every usable image of a collection, decoded once.


def cache_key(splits: list[list[str]], stats: dict[str, tuple[int, int]], image_size: int) -> str:
    """A name for the cache of these images: it changes when an image file is added, removed, renamed
    or rewritten (its size or modification time), when an image moves to another split (the rows are
    in split order), and when the image size or CACHE_FORMAT changes."""
    described = json.dumps([CACHE_FORMAT, image_size, [[[file, *stats[file]] for file in split] for split in splits]])
    return hashlib.sha256(described.encode()).hexdigest()[:20]


def memory_budget() -> int:
    """A quarter of the machine's physical memory: the most that cached images take in memory by default.
    0 where the system does not say (no os.sysconf, as on Windows): memory-mapping suits any size."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (AttributeError, ValueError, OSError):
        return 0


def read_cache(array_file: Path, image_size: int, max_in_memory_bytes: int) -> CachedImages | None:
    """The images cached in `array_file` as its sidecar (the .json beside it) describes them; None when
    either is absent or they disagree, as after a damaged write: the cache is then written afresh."""
    try:
        record = json.loads(array_file.with_suffix(".json").read_text(encoding="utf-8"))
        array = np.load(array_file, mmap_mode="c")  # copy-on-write: writable, so torch.from_numpy does not warn
    except (OSError, ValueError):  # absent, truncated or not .npy; json.JSONDecodeError is a ValueError
        return None
    splits, failed = record["splits"], record["failed"]
    rows = sum(map(len, splits))
    if array.dtype != np.uint8 or array.shape != (rows + len(failed), 3, image_size, image_size):
        return None
    mapped = array[:rows].nbytes > max_in_memory_bytes
    images = torch.from_numpy(array[:rows] if mapped else np.array(array[:rows]))
    return CachedImages(images, splits, failed, mapped)


def write_cache(array_file: Path, root: Path, splits: list[list[str]], image_size: int) -> None:
    """Decode the images of `splits`, files relative to `root`, into `array_file`, and write its sidecar.
    Both are written to a temporary file and then moved into place, the sidecar last: an interrupted
    run leaves no cache that a later run reads."""
    try:
        array_file.parent.mkdir(parents=True, exist_ok=True)
        kept, failed = write_atomically(array_file, lambda temporary: decode_into(temporary, root, splits, image_size))
        sidecar = json.dumps({"splits": kept, "failed": failed})
        write_atomically(
            array_file.with_suffix(".json"), lambda temporary: temporary.write_text(sidecar, encoding="utf-8")
        )
    except OSError as error:
        raise DataError(
            f"cannot write the image cache in {array_file.parent}: {error.strerror or error}; give a writable cache "
            "folder"
        ) from error


def write_atomically(path: Path, write: Callable[[Path], T]) -> T:
    """write(temporary), a new file beside `path`, then move it onto `path`: an interrupted run leaves
    at most a temporary file, whose name no run reads. Returns what `write` returns."""
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    temporary = Path(name)
    try:
        result = write(temporary)
        os.replace(temporary, path)
        return result
    finally:
        temporary.unlink(missing_ok=True)


def decode_into(
    array_file: Path, root: Path, splits: list[list[str]], image_size: int
) -> tuple[list[list[str]], list[list[str]]]:
    """Decode the images of `splits` into a new .npy file of one row per image: the training images,
    then validation, then test, each image in the row after the last one that decoded, so that a split
    is a run of rows, and the last rows, one per image that failed, stay unused. Written through a
    memory map: a collection larger than memory never has to be in memory at once. Returns the files
    of each split that decoded, and [file, why] of each that did not."""
    files = [(index, file) for index, split in enumerate(splits) for file in split]
    array = np.lib.format.open_memmap(
        array_file, mode="w+", dtype=np.uint8, shape=(len(files), 3, image_size, image_size)
    )
    kept: list[list[str]] = [[] for _ in splits]
    failed = []
    row = 0
    pixels_of_each = decoded([root / file for _, file in files], image_size)
    progress = tqdm(
        pixels_of_each, total=len(files), desc="decoding images", unit="image", disable=len(files) < PROGRESS_FROM
    )
    for (split, file), pixels in zip(files, progress, strict=True):
        if isinstance(pixels, str):
            failed.append([file, pixels])
        else:
            array[row] = pixels
            kept[split].append(file)
            row += 1
    array.flush()
    return kept, failed


def decoded(paths: list[Path], image_size: int) -> Iterator[np.ndarray | str]:
    """decode_photo of each path, in order, by a pool of threads (Pillow releases the GIL while it
    decodes and resizes); at most DECODE_AHEAD at a time, so that memory stays bounded."""
    with ThreadPoolExecutor() as pool:
        pending: deque[Future[np.ndarray | str]] = deque()
        for path in paths:
            pending.append(pool.submit(decode_photo, path, image_size))
            if len(pending) == DECODE_AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def decode_photo(path: Path, image_size: int) -> np.ndarray | str:
    """An image file -> (3, S, S) uint8 RGB, S = image_size: turned upright by its EXIF orientation,
    transparency composited on white, its shorter side scaled to S and its middle cropped square;
    or, when it cannot be decoded, why."""
    try:
        with Image.open(path) as image:
            if Image.MAX_IMAGE_PIXELS and image.width * image.height > Image.MAX_IMAGE_PIXELS:
                # Pillow only warns up to twice its limit; refuse before decoding, as dataset.read_image_file does.
                size = f"{image.width}x{image.height}"
                return f"refused: {size} is more than {Image.MAX_IMAGE_PIXELS:,} pixels (a decompression bomb?)"
            image.draft(
                "RGB", (image_size, image_size)
            )  # a JPEG decodes at 1/2, 1/4 or 1/8 scale when that still covers S x S
            upright = ImageOps.exif_transpose(image)
            if upright.mode != "RGB" or "transparency" in upright.info:
                rgba = upright.convert("RGBA")
                upright = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
            square = ImageOps.fit(upright, (image_size, image_size), Image.Resampling.LANCZOS)
    except (
        Exception
    ) as error:  # Pillow reports damaged files as OSError, SyntaxError, ValueError, struct.error and more
        return f"cannot be decoded ({type(error).__name__}: {' '.join(str(error).split())})"
    return np.asarray(square).transpose(2, 0, 1)
