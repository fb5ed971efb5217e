"""benchmark.py's measurements of one training run."""

from pathlib import Path

import pytest

import labelled
import train
from clip import CLIP, CLIPConfig
from dataset import load_splits
from tools import benchmark

TINY_DIGITS = ["--image-widths", "8,16", "--embed-dim", "16", "--batch-size", "128", "--epochs", "3"]


def test_training_speed_counts_every_epoch_trained_not_only_those_up_to_the_best(tmp_path: Path, monkeypatch):
    # Validation is best after the first of three epochs, so best.pt's history holds that epoch alone.
    validation_then_test = iter([0.9, 0.5, 0.4, 0.8])
    monkeypatch.setattr(labelled, "zero_shot_accuracy", lambda *args: next(validation_then_test))
    splits = load_splits("digits", "unused", val_size=300)
    result = train.main(["--dataset", "digits", *TINY_DIGITS, "--runs-dir", str(tmp_path), "--run-name", "run"])
    run = benchmark.measure(tmp_path / "run", result, splits.test, "fp32", None)
    assert len(run["curve"]) == 1
    trained_images = 3 * (len(splits.train) // 128) * 128  # three epochs of full batches
    assert run["train_images_per_second"] * run["train_seconds"] == pytest.approx(trained_images)


def test_a_mirror_averaging_model_is_also_scored_seeing_each_image_once(monkeypatch):
    # A garment model's accuracy with mirror averaging is reported beside the way it was scored before.
    monkeypatch.setattr(
        benchmark, "zero_shot_accuracy", lambda model, *args: 0.9 if model.config.image_mirror_average else 0.8
    )
    test = load_splits("digits", "unused", val_size=300).test
    model = CLIP(CLIPConfig(image_widths=(8, 16), embed_dim=16, image_mirror_average=True))
    scores = benchmark.evaluate(model, test, "fp32")
    assert (scores["test_accuracy"], scores["test_accuracy_one_view"]) == (0.9, 0.8)
    assert model.config.image_mirror_average  # as it was
    model.config.image_mirror_average = False
    assert "test_accuracy_one_view" not in benchmark.evaluate(model, test, "fp32")
