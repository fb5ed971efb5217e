"""Training on a collection of captioned photos (train.py --dataset photos), and using the model:
real pictures (the offline digits) exported as files by export_photos.py, read back by photo_files.py."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from test_resume import signal_on_call, stopped_run

import inference
import train
from checkpoint import load_checkpoint, load_model
from embeddings import retrieval_scores
from photo_files import PhotoPairs, collection_from_tensors, load_collection
from tools import export_photos

TINY = [
    "--image-size",
    "28",
    "--image-widths",
    "8,16",
    "--embed-dim",
    "16",
    "--batch-size",
    "32",
    "--log-interval",
    "2",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> export_photos.Exported:
    """The offline digits' 360 test images as PNG files with 5 attribute captions each, in Flickr8k's layout."""
    return export_photos.export("digits", "flickr8k", tmp_path_factory.mktemp("exported") / "digits")


@pytest.fixture(scope="module")
def photo_run(exported, tmp_path_factory) -> tuple[dict, Path]:
    """A run of two epochs on them, and the cache folder it used."""
    cache, runs = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("runs")
    argv = ["--dataset", "photos", "--data-dir", str(exported.folder), "--cache-dir", str(cache), *TINY]
    return train.main([*argv, "--epochs", "2", "--runs-dir", str(runs), "--run-name", "photos"]), cache


def test_training_on_captioned_photos_selects_by_rsum_and_scores_the_test_split(photo_run):
    result, cache = photo_run
    state = torch.load(result["run_dir"] / "best.pt", weights_only=True)
    rsums = [entry["val_rsum"] for entry in state["history"]]
    assert len(rsums) == 2 and state["best_score"] == pytest.approx(max(rsums))
    assert state["config"]["image_channels"] == 3 and state["config"]["text_encoder"] == "transformer"
    test = result["test_retrieval"]
    assert test["images"] == 36 and test["captions"] == 180  # 10% of the 360 photos, 5 captions each
    recalls = [test[way][f"recall@{k}"] for way in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
    assert test["rsum"] == pytest.approx(100 * sum(recalls))
    assert len(list(cache.glob("*.npy"))) == 1  # the photos were decoded once, into the cache


def test_a_photo_run_stopped_by_a_signal_and_resumed_ends_as_the_uninterrupted_one(
    exported, photo_run, tmp_path: Path, monkeypatch
):
    result, cache = photo_run
    argv = [
        "--dataset",
        "photos",
        "--data-dir",
        str(exported.folder),
        "--cache-dir",
        str(cache),
        *TINY,
        "--epochs",
        "2",
    ]
    signal_on_call(monkeypatch, "clip_loss", 12, signal.SIGTERM)  # mid-epoch 2 (9 steps of 32 photos an epoch)
    assert stopped_run([*argv, "--runs-dir", str(tmp_path), "--run-name", "photos"]) == 143
    monkeypatch.undo()
    train.main(["--resume", str(tmp_path / "photos" / "last.pt")])
    resumed, uninterrupted = (
        load_checkpoint(tmp_path / "photos" / "last.pt"),
        load_checkpoint(result["run_dir"] / "last.pt"),
    )
    for name, weights in uninterrupted["training_model"].items():
        assert torch.equal(resumed["training_model"][name], weights), name
    assert [e["val_rsum"] for e in resumed["history"]] == [e["val_rsum"] for e in uninterrupted["history"]]


def test_the_file_pipeline_gives_what_the_in_memory_one_gives_on_the_same_pictures(exported, photo_run, tmp_path: Path):
    """The PNGs read back, resized (not at all, at 28 pixels) and split, are the exported pixels, captions and
    split exactly, so a model retrieves alike from both."""
    result, cache = photo_run
    from_files = load_collection(exported.folder, 28, cache)
    in_memory = collection_from_tensors(
        exported.images[:, None].expand(-1, 3, -1, -1), exported.captions, exported.files
    )
    model = load_model(result["run_dir"] / "best.pt")[0]
    for name in ("train", "val", "test"):
        a, b = getattr(from_files, name), getattr(in_memory, name)
        assert a.files == b.files and a.captions == b.captions and torch.equal(a.caption_image, b.caption_image)
        assert torch.equal(a.images, b.images)
    assert retrieval_scores(model, from_files.test) == retrieval_scores(model, in_memory.test)


@pytest.mark.parametrize("layout", ["json", "folders"])
def test_every_layout_of_the_same_pictures_loads_as_the_in_memory_collection(exported, tmp_path: Path, layout: str):
    again = export_photos.export("digits", layout, tmp_path / layout)
    assert torch.equal(again.images, exported.images) and again.captions == exported.captions
    from_files = load_collection(again.folder, 28, tmp_path / "cache")
    in_memory = collection_from_tensors(again.images[:, None].expand(-1, 3, -1, -1), again.captions, again.files)
    for name in ("train", "val", "test"):
        a, b = getattr(from_files, name), getattr(in_memory, name)
        assert a.files == b.files and a.captions == b.captions and torch.equal(a.images, b.images)


def test_inference_ranks_captions_for_a_photo_and_photos_for_a_caption(photo_run, exported, tmp_path: Path, capsys):
    result, cache = photo_run
    checkpoint = str(result["run_dir"] / "best.pt")
    out = inference.main(
        ["--checkpoint", checkpoint, "--index", "3", "--text", "a thick 7", "--output-dir", str(tmp_path)]
    )
    assert len(set(out["queries"][0]["captions"])) == 5  # five distinct texts, though many photos share some
    assert (tmp_path / "text_retrieval_a-thick-7.png").is_file()
    picture = exported.folder / exported.files[0]
    out = inference.main(
        ["--checkpoint", checkpoint, "--image", str(picture), "--labels", "zero,one", "--output-dir", str(tmp_path)]
    )
    printed = capsys.readouterr().out
    assert "test photo 3" in printed and "its own captions:" in printed
    assert f"{picture.name}: predicted" in printed and len(out["queries"]) == 1


def test_evaluate_writes_every_retrieval_metric_and_its_figures(photo_run, tmp_path: Path):
    result, _ = photo_run
    out = inference.main(
        ["--checkpoint", str(result["run_dir"] / "best.pt"), "--evaluate", "--output-dir", str(tmp_path)]
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["rsum"] == pytest.approx(result["test_retrieval"]["rsum"]) == pytest.approx(out["metrics"]["rsum"])
    assert {"recall@1", "recall@5", "recall@10", "median_rank", "mean_rank"} <= set(metrics["text_to_image"])
    assert {"matching", "non_matching", "gap"} <= set(metrics["similarity"])
    assert {p.name for p in (tmp_path / "evaluation").iterdir()} == {
        "text_retrieval.png",
        "tsne.png",
        "training_curves.png",
    }


def test_pairs_draw_one_caption_per_photo_and_identical_texts_are_positives():
    photos = collection_from_tensors(
        torch.zeros(40, 3, 4, 4, dtype=torch.uint8),
        [["a dog", "a brown dog"] if i % 2 else ["a dog", f"cat {i}"] for i in range(40)],
        [f"{i:02d}.png" for i in range(40)],
    ).train
    pairs = PhotoPairs(photos, "cpu")
    batch = torch.arange(len(pairs))
    drawn, positives = pairs.draw(batch, torch.Generator().manual_seed(0))
    texts = [pairs.texts[i] for i in drawn.tolist()]
    own = [
        {photos.captions[k] for k in (photos.caption_image == i).nonzero()[:, 0].tolist()} for i in range(len(pairs))
    ]
    assert all(text in captions for text, captions in zip(texts, own, strict=True))  # each photo drew one of its own
    expected = torch.tensor([[texts[j] in own[i] for j in range(len(pairs))] for i in range(len(pairs))])
    assert torch.equal(positives, expected) and positives.diagonal().all()
    assert not torch.equal(drawn, pairs.draw(batch, torch.Generator().manual_seed(1))[0])  # the draw is random


@pytest.mark.parametrize(
    "options, message",
    [
        (["--batch-size", "512"], "exceeds the 288 training images: lower it"),
        (["--captions", "templates"], "brings its own"),
        (["--text-encoder", "digit"], "need --text-encoder transformer or lstm"),
        (["--pretrained-weights", "weights.pth"], "add --image-encoder resnet18"),
        (["--val-size", "10"], "holds out 10% of its photos for validation and 10% for test"),
    ],
)
def test_settings_a_collection_cannot_train_with_give_one_line(
    exported, photo_run, tmp_path: Path, options: list[str], message: str, capsys
):
    _, cache = photo_run
    argv = [
        "--dataset",
        "photos",
        "--data-dir",
        str(exported.folder),
        "--cache-dir",
        str(cache),
        "--runs-dir",
        str(tmp_path),
    ]
    with pytest.raises(SystemExit) as stop:
        train.main([*argv, *TINY, *options])
    said = str(stop.value) if isinstance(stop.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert message in said
    assert not any(tmp_path.iterdir())  # no run folder was left behind
