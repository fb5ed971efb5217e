"""Tux Paint's stamps as a captioned collection of drawings, for `train.py --dataset photos`.

python -m tools.tuxpaint --output exported/tuxpaint
python -m tools.tuxpaint --output exported/tuxpaint-en-zh --language en --language zh_CN --size 224
python train.py --dataset photos --data-dir exported/tuxpaint/captions.json

Debian's tuxpaint-stamps-default (`apt-get install tuxpaint-stamps-default`, or `dpkg-deb -x` of its .deb)
holds some 950 drawings under topic folders of /usr/share/tuxpaint/stamps (animals/birds, food/fruit,
vehicles, ...): a PNG with transparency, or only an SVG, each described by the .txt of the same stem beside
it, whose first line is in English ("A great blue heron.") and whose other lines are `LANG.utf8=...` in some
70 other languages (zh_CN.utf8=... in Simplified Chinese). A picture's captions are its descriptions in the
--language asked for (English by default), one per language, in the order asked; where a stamp has none in
a language its English one stands in, and is counted. A stamp without a .txt is left out and counted, and so
is each `NAME_mirror` picture, the ready-mirrored copy of stamp NAME that Tux Paint shows when it is
mirrored. The .dat (colorable, tintable, scale, ...) and the sounds (.ogg, .wav) are not used.

Each picture has its transparency composited on white, its longer side scaled to --size and is padded to a
square on white, its aspect ratio kept, and is written as PNG. A stamp that has a PNG is read from it; an
SVG-only one is rasterised by librsvg's `rsvg-convert` (Debian's librsvg2-bin, the library Tux Paint itself
draws SVG with), straight at --size, or, when that is not installed, left out and counted. The output is the
same bytes for the same stamps, options and rsvg-convert.

DIR being --output:
- DIR/captions.json: a list of {"image_path": "images/animals/birds/heron.png", "captions": [...],
  "languages": [the language of each caption], "topic": "animals", "subtopic": "animals/birds",
  "stamp": "animals/birds/heron.png"}, the topic being the first folder under the stamps folder and the
  subtopic the whole folder path, so that zero-shot classification by topic can be scored;
- DIR/topics.json: {"topics": [...], "subtopics": [...], "pictures_per_topic": {"animals": 154, ...},
  "pictures_per_subtopic": {"animals/birds": 36, ...}}, a subtopic counting the pictures right in its folder;
- DIR/images/: the pictures, in the stamps' own folders.
As DIR holds two .json files, train on DIR/captions.json: photo_files reads a folder as the JSON layout only
when it holds exactly one. The collection is written into a hidden folder beside DIR and renamed to DIR when
it is complete: it is there whole or not at all.

License: the drawings and their descriptions are Tux Paint's, under the GNU GPL version 2
(/usr/share/doc/tuxpaint-stamps-default/copyright). What this writes is for training on this machine; it is
not meant to be redistributed, which the GPL would only allow with its terms and sources.
"""

from __future__ import annotations

import argparse
import difflib
import io
import json
import re
import shlex
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from tools.export_photos import ExportError, check_output, staged, write_text

STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
ENGLISH = "en"  # the language of a description's first line
CAPTIONS_FILE = "captions.json"
TOPICS_FILE = "topics.json"
IMAGE_FOLDER = "images"
MIRROR_SUFFIX = "_mirror"
SVG_RENDERER = "rsvg-convert"
SVG_INSTALL = "apt-get install librsvg2-bin"
SVG_TIMEOUT_S = 60
INSTALL_HINT = (
    "install the stamps with: apt-get install tuxpaint-stamps-default, or unpack its .deb with "
    "dpkg-deb -x tuxpaint-stamps-default_*.deb DIR and pass --stamps-dir DIR/usr/share/tuxpaint/stamps"
)
LANGUAGES_NAMED = 12  # available languages named when an unknown one is asked for
# A translated line: zh_CN.utf8=..., ca@valencia.utf8=..., sr@latin.utf8=...
TRANSLATION = re.compile(r"^([A-Za-z]{2,3}(?:_[A-Za-z]{2})?(?:@[A-Za-z]+)?)\.utf-?8=(.*)$")


class StampsError(RuntimeError):
    """The collection cannot be made as asked; the message says why and what to do."""


@dataclass
class Stamp:
    """One drawing of the stamps folder."""

    name: str  # its path under the stamps folder without suffix, "/" separated: "animals/birds/heron"
    picture: Path  # its PNG, else its SVG
    descriptions: dict[str, str]  # language -> description; "en" the .txt's first line

    @property
    def is_svg(self) -> bool:
        return self.picture.suffix.lower() == ".svg"

    @property
    def topic(self) -> str:
        """The first folder under the stamps folder ("animals"); "" for a stamp at its top."""
        return self.name.split("/")[0] if "/" in self.name else ""

    @property
    def subtopic(self) -> str:
        """The whole folder path under the stamps folder ("animals/birds"); "" for a stamp at its top."""
        return self.name.rpartition("/")[0]


@dataclass
class Stamps:
    """What a stamps folder holds, before any picture is opened."""

    stamps: list[Stamp]  # with a description, sorted by name
    undescribed: list[str] = field(default_factory=list)  # names of the pictures without a .txt
    mirrors: list[str] = field(default_factory=list)  # names of the NAME_mirror pictures left out

    def languages(self) -> list[str]:
        """Every language a description is in: English first, then the rest sorted."""
        found = {language for stamp in self.stamps for language in stamp.descriptions}
        return [ENGLISH, *sorted(found - {ENGLISH})]


@dataclass
class Built:
    """What `build` wrote."""

    output: Path
    entries: list[dict]  # captions.json, as written
    languages: list[str]
    fallbacks: Counter  # language -> pictures captioned in English for want of it
    svg_skipped: list[str]  # names of the SVG-only stamps left out
    svg_missing_renderer: bool  # they were left out because rsvg-convert is not installed
    unreadable: list[str]  # "name: why" of pictures that could not be read
    undescribed: list[str]
    mirrors: list[str]

    @property
    def captions(self) -> int:
        return sum(len(entry["captions"]) for entry in self.entries)


def read_descriptions(path: Path) -> dict[str, str]:
    """A stamp's .txt -> {language: description}: the first line in English, then each `LANG.utf8=TEXT`
    line; whitespace runs become one space, and empty or undecodable descriptions are left out."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    descriptions: dict[str, str] = {}
    for number, line in enumerate(lines):
        match = TRANSLATION.match(line.strip())
        language, text = (match[1], match[2]) if match else (ENGLISH, line) if number == 0 else (None, "")
        text = " ".join(text.split())
        if language and text and language not in descriptions:
            descriptions[language] = text
    return descriptions


def find_stamps(stamps_dir: Path) -> Stamps:
    """The stamps under `stamps_dir`, each a PNG or SVG with its .txt beside it; none is opened."""
    pictures: dict[str, Path] = {}
    for path in sorted(stamps_dir.rglob("*")):
        suffix = path.suffix.lower()
        if suffix in (".png", ".svg") and path.is_file():
            name = path.relative_to(stamps_dir).with_suffix("").as_posix()
            if name not in pictures or suffix == ".png":  # a PNG, when there is one, over its SVG
                pictures[name] = path
    found = Stamps([])
    for name, picture in sorted(pictures.items()):
        if name.endswith(MIRROR_SUFFIX) and name.removesuffix(MIRROR_SUFFIX) in pictures:
            found.mirrors.append(name)
            continue
        descriptions = read_descriptions(picture.with_suffix(".txt"))
        if ENGLISH not in descriptions:
            found.undescribed.append(name)
        else:
            found.stamps.append(Stamp(name, picture, descriptions))
    return found


def captions_of(stamp: Stamp, languages: list[str]) -> tuple[list[str], list[str], list[str]]:
    """The stamp's captions in `languages`, the language of each, and the languages it has no description
    in, whose place its English one takes: each text once, in the order of `languages`."""
    captions: list[str] = []
    written_in: list[str] = []
    missing: list[str] = []
    for language in languages:
        if language not in stamp.descriptions:
            missing.append(language)
        text = stamp.descriptions.get(language, stamp.descriptions[ENGLISH])
        if text not in captions:
            captions.append(text)
            written_in.append(language if language in stamp.descriptions else ENGLISH)
    return captions, written_in, missing


def on_white_square(image: Image.Image, size: int) -> Image.Image:
    """`image` with its transparency composited on white, its longer side scaled to `size` and padded
    to a `size` x `size` square on white, centred."""
    rgba = image.convert("RGBA")
    # Composited before scaling, so that the colours of transparent pixels do not bleed into the edges.
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    scale = size / max(flat.size)
    scaled_size = tuple(max(1, min(size, round(side * scale))) for side in flat.size)
    if scaled_size != flat.size:
        flat = flat.resize(scaled_size, Image.Resampling.LANCZOS)
    square = Image.new("RGB", (size, size), "white")
    square.paste(flat, ((size - flat.width) // 2, (size - flat.height) // 2))
    return square


def rasterise_svg(path: Path, size: int, renderer: str) -> Image.Image:
    """An SVG drawn by rsvg-convert with its longer side `size` pixels, its aspect ratio kept, as RGBA."""
    command = [renderer, "--width", str(size), "--height", str(size), "--keep-aspect-ratio", str(path)]
    try:
        done = subprocess.run(command, capture_output=True, timeout=SVG_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as error:
        raise ValueError(f"{SVG_RENDERER} took more than {SVG_TIMEOUT_S} s") from error
    if done.returncode != 0:
        message = " ".join(done.stderr.decode("utf-8", "replace").split()) or f"exit status {done.returncode}"
        raise ValueError(f"{SVG_RENDERER}: {message}")
    with Image.open(io.BytesIO(done.stdout)) as image:
        return image.convert("RGBA")


def read_picture(stamp: Stamp, size: int, renderer: str | None) -> Image.Image:
    """The stamp's picture as `on_white_square` makes it."""
    if stamp.is_svg:
        assert renderer is not None
        return on_white_square(rasterise_svg(stamp.picture, size, renderer), size)
    with Image.open(stamp.picture) as image:
        return on_white_square(image, size)


def check_languages(asked: list[str], available: list[str]) -> list[str]:
    """`asked`, each once in the order given, or StampsError naming one that no description is in."""
    for language in asked:
        if language not in available:
            close = difflib.get_close_matches(language, available, n=3, cutoff=0.5)
            named = list(dict.fromkeys([*close, *available]))[:LANGUAGES_NAMED]
            raise StampsError(
                f"unknown --language {language!r}: no stamp is described in it; the {len(available)} available "
                f"include {', '.join(named)}"
            )
    return list(dict.fromkeys(asked))


def build(
    stamps_dir: Path,
    output: Path,
    languages: list[str] | None = None,
    size: int = 224,
    renderer: str | None = None,
    progress: bool = True,
) -> Built:
    """Write the stamps of `stamps_dir` captioned in `languages` (English by default) into the new or empty
    folder `output`, each picture `size` pixels square. SVG-only stamps are drawn by `renderer` (default:
    rsvg-convert when it is on the PATH; "" for none: they are left out). StampsError or ExportError when it
    cannot be made as asked; either way nothing is written."""
    stamps_dir, output = Path(stamps_dir), Path(output)
    if size < 1:
        raise StampsError(f"--size must be at least 1 pixel, got {size}")
    if not stamps_dir.is_dir():
        raise StampsError(f"the stamps folder {stamps_dir} does not exist: {INSTALL_HINT}")
    check_output(output)
    found = find_stamps(stamps_dir)
    if not found.stamps:
        raise StampsError(f"no described stamps (a .png or .svg with its .txt) in {stamps_dir}: {INSTALL_HINT}")
    languages = check_languages(languages or [ENGLISH], found.languages())
    renderer = shutil.which(SVG_RENDERER) if renderer is None else renderer
    svg_missing_renderer = not renderer and any(stamp.is_svg for stamp in found.stamps)

    entries: list[dict] = []
    fallbacks: Counter = Counter()
    svg_skipped: list[str] = []
    unreadable: list[str] = []
    with staged(output) as folder:
        for stamp in tqdm(found.stamps, desc="stamps", unit="stamp", disable=not progress):
            if stamp.is_svg and not renderer:
                svg_skipped.append(stamp.name)
                continue
            try:
                picture = read_picture(stamp, size, renderer)
            except Exception as error:  # Pillow reports damaged files as OSError, SyntaxError, ValueError and more
                unreadable.append(f"{stamp.name}: {type(error).__name__}: {' '.join(str(error).split())}")
                if stamp.is_svg:
                    svg_skipped.append(stamp.name)
                continue
            image_path = f"{IMAGE_FOLDER}/{stamp.name}.png"
            (folder / image_path).parent.mkdir(parents=True, exist_ok=True)
            picture.save(folder / image_path, format="PNG")
            captions, written_in, missing = captions_of(stamp, languages)
            fallbacks.update(missing)
            entries.append(
                {
                    "image_path": image_path,
                    "captions": captions,
                    "languages": written_in,
                    "topic": stamp.topic,
                    "subtopic": stamp.subtopic,
                    "stamp": stamp.picture.relative_to(stamps_dir).as_posix(),
                }
            )
        if not entries:
            hint = f": {SVG_INSTALL}" if svg_missing_renderer else ""
            raise StampsError(f"none of the {len(found.stamps):,} stamps of {stamps_dir} could be written{hint}")
        write_text(folder / CAPTIONS_FILE, json.dumps(entries, ensure_ascii=False, indent=2) + "\n")
        write_text(folder / TOPICS_FILE, json.dumps(topics_of(entries), ensure_ascii=False, indent=2) + "\n")
    return Built(
        output,
        entries,
        languages,
        fallbacks,
        svg_skipped,
        svg_missing_renderer,
        unreadable,
        found.undescribed,
        found.mirrors,
    )


def topics_of(entries: list[dict]) -> dict:
    """topics.json: the topics and subtopics of the pictures written, and how many pictures each has."""
    per_topic = Counter(entry["topic"] for entry in entries)
    per_subtopic = Counter(entry["subtopic"] for entry in entries)
    return {
        "topics": sorted(per_topic),
        "subtopics": sorted(per_subtopic),
        "pictures_per_topic": dict(sorted(per_topic.items())),
        "pictures_per_subtopic": dict(sorted(per_subtopic.items())),
    }


def summary(built: Built) -> str:
    """The one line that says what was written and how to train on it."""
    topics = len({entry["topic"] for entry in built.entries})
    non_english = [language for language in built.languages if language != ENGLISH]
    fallbacks = ", ".join(f"{language} {built.fallbacks[language]:,}" for language in non_english)
    parts = [
        f"wrote {len(built.entries):,} pictures in {topics} topics with {built.captions:,} captions "
        f"({', '.join(built.languages)}) to {built.output}"
    ]
    if non_english:
        parts.append(f"captioned in English for want of a description in: {fallbacks}")
    if built.svg_missing_renderer:
        parts.append(f"{len(built.svg_skipped):,} SVG-only stamps skipped: {SVG_RENDERER} draws them: {SVG_INSTALL}")
    else:
        parts.append(f"{len(built.svg_skipped):,} SVG-only stamps skipped")
    parts.append(
        f"{len(built.undescribed):,} pictures without a description and {len(built.mirrors):,} _mirror copies left out"
    )
    if built.unreadable:
        parts.append(f"{len(built.unreadable):,} unreadable (first: {built.unreadable[0]})")
    data = shlex.quote(str(built.output / CAPTIONS_FILE))
    parts.append(f"train on it with: python train.py --dataset photos --data-dir {data}")
    return "; ".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--output", type=Path, required=True, help="the new or empty folder to write into")
    p.add_argument("--stamps-dir", type=Path, default=STAMPS_DIR, help="Tux Paint's stamps folder")
    p.add_argument(
        "--language",
        action="append",
        default=None,
        help="a language of the captions (en, zh_CN, fr, ... as the stamps' .txt name them); repeat it for a "
        "caption per language (default: en)",
    )
    p.add_argument("--size", type=int, default=224, help="pixels on a side of the square pictures")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Built:
    args = parse_args(argv)
    try:
        built = build(args.stamps_dir, args.output, args.language, args.size)
    except (StampsError, ExportError) as error:
        raise SystemExit(f"error: {error}") from None
    print(summary(built))
    return built


if __name__ == "__main__":
    main()
