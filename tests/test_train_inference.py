import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw

import inference
import settings
import train
from checkpoint import load_model
from embeddings import class_embeddings, embed_images
from pictures import to_mnist_style

REPO = Path(__file__).resolve().parent.parent

TINY = [
    "--dataset",
    "digits",
    "--image-widths",
    "8,16",
    "--embed-dim",
    "16",
    "--batch-size",
    "128",
    "--log-interval",
    "2",
]


def test_train_then_inference_end_to_end(runs_dir: Path, tmp_path: Path, capsys):
    result = train.main([*TINY, "--epochs", "1", "--runs-dir", str(runs_dir), "--run-name", "e2e"])
    run_dir = runs_dir / "e2e"
    assert result["run_dir"] == run_dir
    assert {"best.pt", "last.pt"} <= {p.name for p in run_dir.iterdir()}
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())

    out = inference.main(["--runs-dir", str(runs_dir), "--text", "3"])  # newest run's best.pt
    assert out["accuracy"] == pytest.approx(result["test_accuracy"])  # the same model on the same test split
    assert out["queries"][0]["figure"].is_file() and (run_dir / "text_retrieval_3.png").is_file()

    picture = Image.new("RGB", (120, 160), "white")
    ImageDraw.Draw(picture).ellipse((30, 30, 90, 130), outline="black", width=10)  # a "0"
    picture.save(tmp_path / "zero.png")
    out = inference.main(
        ["--checkpoint", str(run_dir / "best.pt"), "--precision", "fp32", "--image", str(tmp_path / "zero.png")]
    )
    model = load_model(run_dir / "best.pt")[0]
    similarities = embed_images(model, to_mnist_style(picture)[None])[0] @ class_embeddings(model).T
    assert out["queries"][0]["predicted"] == similarities.argmax().item()
    assert out["queries"][0]["probabilities"] == pytest.approx(
        (model.logit_scale.exp() * similarities).softmax(0).tolist(), abs=1e-5
    )
    printed = capsys.readouterr().out
    assert "zero-shot accuracy on the 360 test images" in printed and "zero.png: predicted" in printed


@pytest.mark.parametrize("index", [0, 17, 359])
def test_an_image_of_the_split_is_never_its_own_neighbour(index: int, digits_checkpoint: Path, tmp_path: Path):
    out = inference.main(["--checkpoint", str(digits_checkpoint), "--index", str(index), "--output-dir", str(tmp_path)])
    assert len(out["queries"][0]["neighbours"]) == 5 and index not in out["queries"][0]["neighbours"]


def test_seeded_training_on_offline_digits_reaches_90_percent(runs_dir: Path):
    result = train.main(
        ["--dataset", "digits", "--epochs", "8", "--batch-size", "128", "--seed", "0", "--runs-dir", str(runs_dir)]
    )
    assert result["test_accuracy"] >= 0.90


def test_a_new_run_never_overwrites_an_earlier_one(runs_dir: Path):
    first = train.main([*TINY, "--dry-run", "--runs-dir", str(runs_dir)])["run_dir"]
    second = train.main([*TINY, "--dry-run", "--runs-dir", str(runs_dir)])["run_dir"]
    assert first != second
    with pytest.raises(SystemExit, match="already exists"):
        train.main([*TINY, "--dry-run", "--runs-dir", str(runs_dir), "--run-name", first.name])


def flatten(tree, prefix: str = "") -> dict:
    """Every tensor in a nested state dict, by its path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else []
    return {k: v for key, sub in items for k, v in flatten(sub, f"{prefix}/{key}").items()}


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--epochs", "0"),
        ("--epochs", "-3"),
        ("--epochs", "ten"),
        ("--batch-size", "0"),
        ("--batch-size", "-4"),
        ("--lr", "0"),
        ("--lr", "-0.001"),
        ("--lr", "nan"),
        ("--lr", "inf"),
        ("--dataset", "cifar"),
    ],
)
def test_invalid_arguments_are_refused_with_usage(flag: str, value: str, capsys):
    with pytest.raises(SystemExit) as exit_info:
        settings.parse_args([flag, value])
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_garment_models_embed_images_with_their_mirror_images_and_digit_models_never():
    def model_of(argv: list[str]) -> bool:
        no_data = SimpleNamespace(train=SimpleNamespace(texts=[]), image_channels=1, class_captions=())
        return train.model_config(settings.parse_args(argv), no_data).image_mirror_average

    assert model_of(["--dataset", "fashion"]) and not model_of(["--dataset", "fashion", "--no-mirror-average"])
    assert not model_of([]) and not model_of(["--dataset", "digits"])  # a mirrored digit is another digit, or none


@pytest.mark.parametrize("script", [settings, inference])
def test_device_cuda_without_cuda_is_refused_with_usage(script, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--device", "cuda"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "CUDA is not available" in err


def test_pictures_of_the_same_name_from_two_folders_each_get_their_own_figure(digits_checkpoint: Path, tmp_path: Path):
    paths = []
    for folder, box in (("a", (30, 30, 90, 130)), ("b", (50, 20, 70, 140))):  # a 0 and a 1
        picture = Image.new("RGB", (120, 160), "white")
        ImageDraw.Draw(picture).ellipse(box, outline="black", width=10)
        (tmp_path / folder).mkdir()
        picture.save(tmp_path / folder / "digit.png")
        paths.append(str(tmp_path / folder / "digit.png"))
    out = inference.main(
        ["--checkpoint", str(digits_checkpoint), "--output-dir", str(tmp_path / "out"), "--image", *paths]
    )
    figures = [query["figure"] for query in out["queries"]]
    assert figures == [tmp_path / "out" / "retrieval_digit.png", tmp_path / "out" / "retrieval_digit-2.png"]
    assert all(figure.is_file() for figure in figures)


@pytest.mark.parametrize(
    "old, new",
    [
        ("benchmark.py", "python -m tools.benchmark"),
        ("benchmark_captions.py", "python -m tools.benchmark_photos"),
        ("export_captions.py", "python -m tools.export_photos"),
        ("user_style_digits.py", "python -m tools.user_style_digits"),
    ],
)
def test_a_tool_run_by_its_old_name_says_in_one_line_where_it_went(old: str, new: str):
    done = subprocess.run([sys.executable, old, "--help"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout == "" and done.stderr.strip().endswith(f"run {new}")
    assert len(done.stderr.strip().splitlines()) == 1


def test_the_old_name_of_the_photo_data_set_names_the_new_one(capsys):
    with pytest.raises(SystemExit):
        settings.parse_args(["--dataset", "captions"])
    assert "--dataset captions is now called --dataset photos" in capsys.readouterr().err
