"""benchmark.py's measurements of one training run."""

from pathlib import Path

import pytest

import labelled
import recipes
import settings
import train
from clip import CLIP, CLIPConfig
from dataset import load_splits
from tools import benchmark, flops, runs

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

    # The report says where that time went and what share of the machine's arithmetic the steps used.
    peak = {"precision": "fp32", "nominal": None, "matmul_size": 64, "matmul_gflops": 100.0}
    summary = {"default": benchmark.summarise([run], benchmark.LEVELS["mnist"])}
    report = {"command": "python -m tools.benchmark", "machine": runs.machine("fp32"), "peak": peak, "summary": summary}
    text = benchmark.markdown(report)
    assert f"default: a step is {run['step_gflop']:.1f} GFLOP" in text
    assert f"validation {run['validation_seconds']:.0f} s" in text


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


def test_a_steps_flops_are_its_convolutions_counted_by_hand_and_little_else():
    # Widths (8, 16) on 28x28 digits: the stem (1 -> 8 channels at 28x28), the strided convolution (8 -> 16 at
    # 14x14) and the residual block's two (16 -> 16 at 14x14), 2 FLOPs a multiply-add. Backward computes twice
    # forward's, less the stem's gradient of the images, which nothing needs.
    forward = 2 * 9 * (784 * 1 * 8 + 196 * 8 * 16 + 2 * 196 * 16 * 16)
    per_image = 3 * forward - 2 * 9 * 784 * 8
    test = load_splits("digits", "unused", val_size=300).test
    model = CLIP(CLIPConfig(image_widths=(8, 16), embed_dim=16))
    counted = flops.step_flops(model, test.images[:32], test.labels[:32], "fp32")
    rest = counted - 32 * per_image  # the projections, the captions' layers and the logits
    assert 0 < rest < counted / 100


def test_the_nominal_peak_follows_the_vector_width_and_the_precision(monkeypatch):
    monkeypatch.setattr(flops, "cpu_clock_ghz", lambda: 2.5)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    units = ["AVX2", "AVX-512", "AVX512_BF16"]
    assert flops.nominal_peak("fp32", units, 2)["flops"] == 2 * 16 * 2 * 2 * 2.5e9
    assert flops.nominal_peak("bf16", units, 2)["flops"] == 2 * 32 * 2 * 2 * 2.5e9
    assert flops.nominal_peak("fp32", ["AVX2"], 2)["flops"] == 2 * 8 * 2 * 2 * 2.5e9
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # torch held to AVX2 uses 256-bit vectors
    assert flops.nominal_peak("fp32", units, 2)["flops"] == 2 * 8 * 2 * 2 * 2.5e9
    monkeypatch.setattr(flops, "cpu_clock_ghz", lambda: None)
    assert flops.nominal_peak("fp32", units, 2) is None


def test_the_previous_default_is_mnists_recipe_before_the_five_stages():
    # The benchmark times today's default beside the one before it: its flags must train that recipe exactly.
    before = settings.parse_args(benchmark.SETTINGS["previous-default"])
    now = settings.parse_args([])
    assert {name: getattr(before, name) for name in recipes.FOUR_STAGES} == recipes.FOUR_STAGES
    differing = {name for name in vars(now) if getattr(now, name) != getattr(before, name)}
    assert differing == set(recipes.FOUR_STAGES)


def test_the_report_gives_the_defaults_time_as_a_share_of_the_previous_ones():
    summary = {
        "default": {"median_train_seconds": 150.0, "test_accuracy_mean": 0.9961},
        "previous-default": {"median_train_seconds": 320.0, "test_accuracy_mean": 0.9963},
    }
    sentence = benchmark.speed_up_sentence(summary)
    assert sentence.startswith("The default trains in 47% of the previous default's time (150 s against 320 s")
    assert "99.61% test accuracy against 99.63%" in sentence
