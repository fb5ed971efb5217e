import json
from pathlib import Path

import inference

FIGURES = ["similarity_matrix", "image_retrieval", "text_retrieval", "tsne", "confusion_matrix", "misclassified", "training_curves"]


def test_evaluate_prints_and_saves_every_metric_and_figure(digits_checkpoint: Path, tmp_path: Path, capsys):
    out = inference.main(["--checkpoint", str(digits_checkpoint), "--dataset", "digits", "--evaluate", "--output-dir", str(tmp_path)])
    metrics = out["metrics"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"split": "test", "images": 360, **metrics}
    assert set(metrics) == {"zero_shot", "image_to_image", "text_to_image", "image_to_text", "similarity"}
    assert metrics["zero_shot"]["top1_accuracy"] == metrics["image_to_text"]["recall@1"] == out["accuracy"]
    assert sum(map(sum, metrics["zero_shot"]["confusion_matrix"])) == 360
    assert set(metrics["image_to_image"]) == {"precision@1", "precision@5", "precision@10", "mAP", "hubness"}
    assert metrics["similarity"]["gap"] > 0
    for name in FIGURES:
        assert (tmp_path / "evaluation" / f"{name}.png").is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())
    assert (tmp_path / "projector_config.pbtxt").is_file()  # TensorBoard's embedding projector
    printed = capsys.readouterr().out
    for phrase in ("top-2", "confusion matrix", "mAP", "hubness", "recall@100", "mean rank of the first correct image", "gap"):
        assert phrase in printed, phrase


def test_evaluate_on_the_validation_split_leaves_the_test_split_s_results_alone(digits_checkpoint: Path, tmp_path: Path):
    inference.main(["--checkpoint", str(digits_checkpoint), "--evaluate", "--output-dir", str(tmp_path)])
    test_metrics = (tmp_path / "metrics.json").read_text()
    inference.main(["--checkpoint", str(digits_checkpoint), "--evaluate", "--split", "val", "--output-dir", str(tmp_path)])
    assert (tmp_path / "metrics.json").read_text() == test_metrics
    validation = json.loads((tmp_path / "metrics_val.json").read_text())
    assert (validation["split"], validation["images"]) == ("validation", 300)  # the digits' validation split, held out as in training
    assert sum(map(sum, validation["zero_shot"]["confusion_matrix"])) == 300
    for name in FIGURES:
        assert (tmp_path / "evaluation_val" / f"{name}.png").is_file(), name
