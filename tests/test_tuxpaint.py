"""tools/tuxpaint.py: Tux Paint's stamps as a captioned collection, on a small stamps tree made here, and
the real one's descriptions when tuxpaint-stamps-default is installed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from photo_files import load_collection
from tools import benchmark_tuxpaint, tuxpaint

REAL_STAMPS = Path("/usr/share/tuxpaint/stamps")
HAS_RSVG = shutil.which(tuxpaint.SVG_RENDERER) is not None
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
SVG = '<svg xmlns="http://www.w3.org/2000/svg" width="20" height="10"><rect width="20" height="10" fill="#00f"/></svg>'


def write_stamp(folder: Path, stem: str, image: Image.Image | str | None, description: str | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(image, str):
        (folder / f"{stem}.svg").write_text(image, encoding="utf-8")
    elif image is not None:
        image.save(folder / f"{stem}.png")
    if description is not None:
        (folder / f"{stem}.txt").write_text(description, encoding="utf-8")


def heron() -> Image.Image:
    """8 x 4: the left half transparent (and blue beneath, which must not show), the right half opaque red."""
    image = Image.new("RGBA", (8, 4), (*BLUE, 0))
    image.paste((*RED, 255), (4, 0, 8, 4))
    return image


@pytest.fixture
def stamps(tmp_path: Path) -> Path:
    root = tmp_path / "stamps"
    birds = root / "animals" / "birds"
    write_stamp(birds, "heron", heron(), "A great blue heron.\nfr.utf8=Un grand héron.\nzh_CN.utf8=一只大蓝鹭。\n")
    write_stamp(birds, "heron_mirror", heron().transpose(Image.Transpose.FLIP_LEFT_RIGHT), None)
    write_stamp(root / "animals", "cat", Image.new("LA", (3, 6), (0, 255)), "A cat.\nzh_CN.utf8=一只猫。\n")
    write_stamp(
        root / "food" / "fruit", "apple", Image.new("RGBA", (5, 5), (*RED, 255)), "An  apple. \nfr.utf8=Une pomme.\n"
    )
    (root / "food" / "fruit" / "apple.dat").write_text("colorable\n")
    (root / "food" / "fruit" / "apple.ogg").write_bytes(b"OggS")
    write_stamp(root / "vehicles", "car", SVG, "A car.\nzh_CN.utf8=一辆汽车。\n")
    write_stamp(root / "vehicles", "nameless", Image.new("RGBA", (2, 2)), None)
    return root


def run(stamps: Path, output: Path, *options: str) -> tuxpaint.Built:
    return tuxpaint.main(["--stamps-dir", str(stamps), "--output", str(output), "--size", "16", *options])


def by_stamp(built: tuxpaint.Built) -> dict[str, dict]:
    return {Path(entry["stamp"]).stem: entry for entry in built.entries}


def test_english_captions_by_default(stamps: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "out"
    built = run(stamps, output)
    entries = by_stamp(built)
    expected = {"heron", "cat", "apple"} | ({"car"} if HAS_RSVG else set())
    assert set(entries) == expected  # the _mirror copy and the stamp without a .txt are left out
    assert entries["heron"]["captions"] == ["A great blue heron."]
    assert entries["apple"]["captions"] == ["An apple."]  # whitespace tidied
    assert all(entry["languages"] == ["en"] for entry in entries.values())
    assert built.mirrors == ["animals/birds/heron_mirror"] and built.undescribed == ["vehicles/nameless"]
    assert json.loads((output / "captions.json").read_text(encoding="utf-8")) == built.entries
    assert {path.relative_to(output).as_posix() for path in (output / "images").rglob("*.png")} == {
        entry["image_path"] for entry in built.entries
    }
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and line.startswith(f"wrote {len(expected)} pictures in ")
    assert "1 pictures without a description and 1 _mirror copies left out" in line
    assert line.endswith(f"train on it with: python train.py --dataset photos --data-dir {output / 'captions.json'}")


def test_captions_per_language_and_fallbacks(stamps: Path, tmp_path: Path, capsys) -> None:
    chinese = run(stamps, tmp_path / "zh", "--language", "zh_CN")
    entries = by_stamp(chinese)
    assert entries["heron"]["captions"] == ["一只大蓝鹭。"] and entries["heron"]["languages"] == ["zh_CN"]
    assert entries["cat"]["captions"] == ["一只猫。"]
    assert entries["apple"]["captions"] == ["An apple."] and entries["apple"]["languages"] == ["en"]
    assert chinese.fallbacks["zh_CN"] == 1
    assert "for want of a description in: zh_CN 1" in capsys.readouterr().out

    several = run(stamps, tmp_path / "en-zh-fr", "--language", "en", "--language", "zh_CN", "--language", "fr")
    entries = by_stamp(several)
    assert entries["heron"]["captions"] == ["A great blue heron.", "一只大蓝鹭。", "Un grand héron."]
    assert entries["heron"]["languages"] == ["en", "zh_CN", "fr"]
    assert entries["cat"]["captions"] == ["A cat.", "一只猫。"]  # no French: its English is there already
    assert entries["apple"]["captions"] == ["An apple.", "Une pomme."]
    assert dict(several.fallbacks) == {"zh_CN": 1, "fr": 1 + HAS_RSVG}
    assert f"for want of a description in: zh_CN 1, fr {1 + HAS_RSVG};" in capsys.readouterr().out


def test_pictures_on_white_squares(stamps: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    built = run(stamps, output)
    with Image.open(output / by_stamp(built)["heron"]["image_path"]) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (16, 16)
        pixels = image.load()
        # 8 x 4 scaled to 16 x 8 and centred: 4 white rows above and below.
        assert pixels[12, 1] == WHITE and pixels[12, 14] == WHITE
        assert pixels[2, 8] == WHITE  # transparent, blue beneath: white
        assert pixels[13, 8] == RED
    with Image.open(output / by_stamp(built)["cat"]["image_path"]) as image:  # LA, 3 x 6: 8 x 16, centred
        assert image.size == (16, 16) and image.getpixel((8, 8)) == (0, 0, 0) and image.getpixel((1, 8)) == WHITE


def test_deterministic(stamps: Path, tmp_path: Path) -> None:
    first, second = run(stamps, tmp_path / "a"), run(stamps, tmp_path / "b")
    files = sorted(path.relative_to(first.output) for path in first.output.rglob("*") if path.is_file())
    assert files == sorted(path.relative_to(second.output) for path in second.output.rglob("*") if path.is_file())
    for file in files:
        assert (first.output / file).read_bytes() == (second.output / file).read_bytes()


def test_topics(stamps: Path, tmp_path: Path) -> None:
    built = run(stamps, tmp_path / "out")
    entries = by_stamp(built)
    assert (entries["heron"]["topic"], entries["heron"]["subtopic"]) == ("animals", "animals/birds")
    assert (entries["cat"]["topic"], entries["cat"]["subtopic"]) == ("animals", "animals")
    assert (entries["apple"]["topic"], entries["apple"]["subtopic"]) == ("food", "food/fruit")
    assert entries["heron"]["image_path"] == "images/animals/birds/heron.png"
    topics = json.loads((built.output / "topics.json").read_text(encoding="utf-8"))
    assert topics["topics"] == ["animals", "food"] + (["vehicles"] if HAS_RSVG else [])
    assert topics["subtopics"] == ["animals", "animals/birds", "food/fruit"] + (["vehicles"] if HAS_RSVG else [])
    assert topics["pictures_per_topic"] == {"animals": 2, "food": 1} | ({"vehicles": 1} if HAS_RSVG else {})
    assert topics["pictures_per_subtopic"]["animals"] == 1 and topics["pictures_per_subtopic"]["animals/birds"] == 1


def test_loads_as_a_collection(stamps: Path, tmp_path: Path) -> None:
    built = run(stamps, tmp_path / "out", "--language", "en", "--language", "zh_CN")
    collection = load_collection(built.output / "captions.json", 8, tmp_path / "cache")
    assert collection.layout == "json" and collection.skipped == []
    loaded = collection.train.files + collection.val.files + collection.test.files
    assert sorted(loaded) == sorted(entry["image_path"] for entry in built.entries)
    assert sum(len(split.captions) for split in (collection.train, collection.val, collection.test)) == built.captions


@pytest.mark.skipif(not HAS_RSVG, reason=f"needs {tuxpaint.SVG_RENDERER}: {tuxpaint.SVG_INSTALL}")
def test_svg_rasterised(stamps: Path, tmp_path: Path) -> None:
    built = run(stamps, tmp_path / "out")
    assert built.svg_skipped == [] and by_stamp(built)["car"]["stamp"] == "vehicles/car.svg"
    with Image.open(built.output / "images/vehicles/car.png") as image:
        assert image.size == (16, 16) and image.getpixel((8, 8)) == BLUE and image.getpixel((8, 1)) == WHITE


def test_svg_skipped_without_renderer(stamps: Path, tmp_path: Path) -> None:
    built = tuxpaint.build(stamps, tmp_path / "out", size=16, renderer="", progress=False)
    assert built.svg_skipped == ["vehicles/car"] and built.svg_missing_renderer
    assert "car" not in by_stamp(built)
    assert "1 SVG-only stamps skipped: rsvg-convert draws them: apt-get install librsvg2-bin" in tuxpaint.summary(built)


def test_read_descriptions(tmp_path: Path) -> None:
    path = tmp_path / "stamp.txt"
    path.write_text("\ufeffA  heron.\nzh_CN.utf8=鹭。\nca@valencia.utf8=Un agró.\nfr.utf8=\nde.utf8=Ein Reiher.\n")
    assert tuxpaint.read_descriptions(path) == {
        "en": "A heron.",
        "zh_CN": "鹭。",
        "ca@valencia": "Un agró.",
        "de": "Ein Reiher.",
    }
    assert tuxpaint.read_descriptions(tmp_path / "absent.txt") == {}


def error_of(stamps: Path, output: Path, *options: str) -> str:
    with pytest.raises(SystemExit) as raised:
        run(stamps, output, *options)
    message = str(raised.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_errors(stamps: Path, tmp_path: Path) -> None:
    missing = error_of(tmp_path / "no-stamps", tmp_path / "out")
    assert "apt-get install tuxpaint-stamps-default" in missing and "dpkg-deb -x" in missing

    unknown = error_of(stamps, tmp_path / "out", "--language", "zh")
    assert "unknown --language 'zh'" in unknown and "zh_CN" in unknown and "fr" in unknown

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert "is not empty" in error_of(stamps, full)
    assert [path.name for path in full.iterdir()] == ["keep.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["full", "stamps"]  # nothing else was written


def test_nothing_half_written(stamps: Path, tmp_path: Path, monkeypatch) -> None:
    read = tuxpaint.read_picture
    calls = []

    def interrupted(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return read(*args)

    monkeypatch.setattr(tuxpaint, "read_picture", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(stamps, tmp_path / "parent" / "out")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["stamps"]


@pytest.mark.skipif(not REAL_STAMPS.is_dir(), reason="needs Debian's tuxpaint-stamps-default")
def test_real_stamps() -> None:
    found = tuxpaint.find_stamps(REAL_STAMPS)  # reads the descriptions only: no picture is opened
    assert len(found.stamps) > 900
    assert sum(stamp.is_svg for stamp in found.stamps) > 100
    assert sum("zh_CN" in stamp.descriptions for stamp in found.stamps) > 700
    assert {"animals", "food", "vehicles"} <= {stamp.topic for stamp in found.stamps}
    assert all(not stamp.name.endswith("_mirror") for stamp in found.stamps) and found.mirrors
    assert {"en", "zh_CN", "fr"} <= set(found.languages())


def test_the_benchmarks_chance_is_that_of_a_random_ranking_of_its_test_split(tmp_path: Path) -> None:
    # tools/benchmark_tuxpaint.py reports its rows beside chance: R@K = K/N both ways for N test pictures (at most
    # 1), and for topics, the share of the test split that its largest topic holds.
    for index in range(30):
        topic = "animals" if index < 20 else "food"
        picture = Image.new("RGB", (4, 4), (index, 0, 0))
        write_stamp(tmp_path / "stamps" / topic, f"s{index}", picture, f"Stamp {index}.")
    built = run(tmp_path / "stamps", tmp_path / "out")
    captions_file = built.output / tuxpaint.CAPTIONS_FILE
    test = load_collection(captions_file, 8, tmp_path / "cache").test
    topic_of = {entry["image_path"]: entry["topic"] for entry in built.entries}
    largest = max(sum(topic_of[file] == topic for file in test.files) for topic in ("animals", "food"))

    pictures, rsum, topic_chance = benchmark_tuxpaint.chance(captions_file, tmp_path / "cache")
    assert pictures == len(test) == 3  # 10% of 30
    assert rsum == pytest.approx(2 * (1 / 3 + 1 + 1) * 100)
    assert topic_chance == pytest.approx(100 * largest / 3)
