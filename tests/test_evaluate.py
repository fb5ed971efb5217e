import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import evaluation
import inference
from dataset import Split

FIGURES = [
    "similarity_matrix",
    "image_retrieval",
    "text_retrieval",
    "text_retrieval_by_cosine",
    "tsne",
    "confusion_matrix",
    "misclassified",
    "training_curves",
]


def rounded(tree, digits: int = 6):
    """Every float in a nested structure rounded, so that two structures compare up to float error."""
    if isinstance(tree, float):
        return round(tree, digits)
    if isinstance(tree, dict):
        return {key: rounded(value, digits) for key, value in tree.items()}
    if isinstance(tree, list):
        return [rounded(value, digits) for value in tree]
    return tree


HISTORY = [{"epoch": 1, "step": 10, "train_loss": 2.0, "val_accuracy": 0.5, "logit_scale": 20.0, "seconds": 3.0}]


def test_evaluate_reports_every_metric_of_a_hand_made_embedding_set(tmp_path: Path, capsys):
    # Three digits, four images each, every image and caption of a digit on that digit's own axis:
    # a perfect embedding whose every metric can be worked out by hand.
    labels = torch.arange(3).repeat_interleave(4)
    images, captions = F.one_hot(labels, 3).float(), torch.eye(3)
    split = Split(torch.randint(0, 256, (12, 28, 28), dtype=torch.uint8), labels)
    evaluation.evaluate(
        evaluation.Gallery("test", split, images, captions, class_names=("0", "1", "2")),
        {"step": 10, "history": HISTORY},
        tmp_path,
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())

    # Each query's top 5: its 3 same-digit images, then the two first others (ties keep the split's
    # order). k-occurrences: 11, 11, 3, 3 for digit 0, 7, 7, 3, 3 for digit 1, 3 for each of digit 2.
    occurrences = torch.tensor([11, 11, 3, 3, 7, 7, 3, 3, 3, 3, 3, 3], dtype=torch.float64)
    deviations = occurrences - 5
    skewness = (deviations.pow(3).mean() / deviations.pow(2).mean().pow(1.5)).item()
    text_to_image = {
        "precision@1": 1.0,
        "precision@10": 0.4,
        "recall@1": 0.25,
        "recall@10": 1.0,
        "mean_first_correct_rank": 1.0,
        "per_digit": {
            "precision@1": [1.0] * 3,
            "precision@10": [0.4] * 3,
            "recall@1": [0.25] * 3,
            "recall@10": [1.0] * 3,
            "first_correct_rank": [1.0] * 3,
        },
    }
    assert rounded(metrics) == rounded(
        {
            "split": "test",
            "images": 12,
            "zero_shot": {
                "top1_accuracy": 1.0,
                "top2_accuracy": 1.0,
                "per_digit_accuracy": [1.0] * 3,
                "confusion_matrix": [[4, 0, 0], [0, 4, 0], [0, 0, 4]],
            },
            "image_to_image": {
                "precision@1": 1.0,
                "precision@5": 0.6,
                "precision@10": 0.3,
                "mAP": 1.0,
                "hubness": {"k": 5, "coverage": 1.0, "skewness": skewness, "max_occurrence": 11},
            },
            "text_to_image": text_to_image,
            "text_to_image_by_cosine": text_to_image,
            "image_to_text": {"recall@1": 1.0, "mean_rank": 1.0},
            "similarity": {"matching": 1.0, "non_matching": 0.0, "gap": 1.0},
            "modality_gap": {
                "caption_to_centroid": [0.0] * 3,
                "image_to_centroid": [0.0] * 3,
                "returned_percentile": [0.0] * 3,
                "mean_returned_percentile": 0.0,
                "returned_percentile_by_cosine": [0.0] * 3,
                "mean_returned_percentile_by_cosine": 0.0,
            },
        }
    )
    for name in FIGURES:
        assert (tmp_path / "evaluation" / f"{name}.png").is_file(), name
    printed = capsys.readouterr().out
    for phrase in (
        "top-1 100.00%",
        "precision@5 60.00%",
        "mAP 100.00%",
        "100.0% of the images are in at least one",
        "biggest hub is in 11",
    ):
        assert phrase in printed, phrase


def test_the_image_retrieval_figure_never_shows_a_query_as_its_own_neighbour(tmp_path: Path, monkeypatch):
    drawn = {}
    plot_retrieval = evaluation.figures.plot_retrieval

    def recording(queries, images, *args):
        drawn.setdefault("image_retrieval", (queries, images))  # the first retrieval figure drawn is image to image
        return plot_retrieval(queries, images, *args)

    monkeypatch.setattr(evaluation.figures, "plot_retrieval", recording)
    labels = torch.arange(3).repeat_interleave(4)
    split = Split(torch.randint(0, 256, (12, 28, 28), dtype=torch.uint8), labels)  # twelve different pictures
    # Each digit's four images share one embedding, so a query ties with itself unless it is left out.
    evaluation.evaluate(
        evaluation.Gallery("test", split, F.one_hot(labels, 3).float(), torch.eye(3), class_names=("0", "1", "2")),
        {"step": 10, "history": HISTORY},
        tmp_path,
    )
    queries, neighbours = drawn["image_retrieval"]
    assert len(queries) == 3
    for query, row in zip(queries, neighbours, strict=True):
        assert not any(torch.equal(query, image) for image in row)


def test_evaluate_on_a_trained_model_writes_its_metrics_figures_and_projector(digits_checkpoint: Path, tmp_path: Path):
    out = inference.main(
        ["--checkpoint", str(digits_checkpoint), "--dataset", "digits", "--evaluate", "--output-dir", str(tmp_path)]
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["split"], metrics["images"]) == ("test", 360)
    assert metrics["zero_shot"]["top1_accuracy"] == pytest.approx(out["accuracy"])  # main measures it on its own
    assert sum(map(sum, metrics["zero_shot"]["confusion_matrix"])) == 360
    for name in FIGURES:
        assert (tmp_path / "evaluation" / f"{name}.png").is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())
    assert (tmp_path / "projector_config.pbtxt").is_file()  # TensorBoard's embedding projector


def test_evaluate_on_the_validation_split_leaves_the_test_split_s_results_alone(
    digits_checkpoint: Path, tmp_path: Path
):
    inference.main(["--checkpoint", str(digits_checkpoint), "--evaluate", "--output-dir", str(tmp_path)])
    test_metrics = (tmp_path / "metrics.json").read_text()
    inference.main(
        ["--checkpoint", str(digits_checkpoint), "--evaluate", "--split", "val", "--output-dir", str(tmp_path)]
    )
    assert (tmp_path / "metrics.json").read_text() == test_metrics
    validation = json.loads((tmp_path / "metrics_val.json").read_text())
    assert (validation["split"], validation["images"]) == (
        "validation",
        300,
    )  # the digits' validation split, held out as in training
    assert sum(map(sum, validation["zero_shot"]["confusion_matrix"])) == 300
    for name in FIGURES:
        assert (tmp_path / "evaluation_val" / f"{name}.png").is_file(), name
