"""tools/user_style_digits.py: scikit-learn's handwritten digits, converted as users' pictures are, scored per digit."""

import json
from pathlib import Path

import pytest
from PIL import Image

import inference
import pictures
from checkpoint import load_model
from tools import user_style_digits


def test_every_digit_is_scored_and_the_digits_accuracies_make_up_the_whole(digits_checkpoint: Path, capsys):
    split = pictures.load_user_style_digits()
    per_digit = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert split.images.shape == (1797, 28, 28) and split.labels.bincount().tolist() == per_digit
    result = user_style_digits.main(["--checkpoint", str(digits_checkpoint)])
    assert result == pictures.score_user_style(load_model(digits_checkpoint)[0], split)
    counts = split.labels.bincount().tolist()
    weighted = sum(
        accuracy * count for accuracy, count in zip(result["per_digit_accuracy"], counts, strict=True)
    ) / sum(counts)
    assert weighted == pytest.approx(result["accuracy"], abs=1e-6)
    assert f"scikit-learn's 1,797 digits as users' pictures: {result['accuracy']:.1%}" in capsys.readouterr().out


def test_the_figure_draws_the_digits_read_wrong_and_what_they_were_read_as(digits_checkpoint: Path, tmp_path: Path):
    result = user_style_digits.main(["--checkpoint", str(digits_checkpoint), "--figure", str(tmp_path / "misread.png")])
    labels = pictures.load_user_style_digits().labels
    assert len(result["misread"]) == round((1 - result["accuracy"]) * len(labels))
    assert all(labels[i] != read_as for i, read_as in zip(result["misread"], result["read_as"], strict=True))
    assert Image.open(tmp_path / "misread.png").size[0] > 500


def test_evaluate_reports_it_for_a_model_trained_on_mnist_only(
    mnist_checkpoint: Path, digits_checkpoint: Path, tmp_path: Path
):
    model = load_model(mnist_checkpoint)[0]
    argv = [
        "--checkpoint",
        str(mnist_checkpoint),
        "--evaluate",
        "--precision",
        "fp32",
        "--output-dir",
        str(tmp_path / "mnist"),
    ]
    metrics = inference.main(argv)["metrics"]
    expected = pictures.score_user_style(model, pictures.load_user_style_digits())
    assert metrics["user_style_digits"]["accuracy"] == pytest.approx(expected["accuracy"])
    assert (
        json.loads((tmp_path / "mnist" / "metrics.json").read_text())["user_style_digits"]
        == metrics["user_style_digits"]
    )
    # A model of the offline digits was trained on these very images: the figure would mean nothing.
    metrics = inference.main(
        ["--checkpoint", str(digits_checkpoint), "--evaluate", "--output-dir", str(tmp_path / "digits")]
    )["metrics"]
    assert "user_style_digits" not in metrics
