"""What a run keeps: the moving average of its weights, which weights each checkpoint key holds,
the best validation epoch in best.pt, and a validation split that no training seed moves."""

from pathlib import Path

import pytest
import torch
from test_train_inference import TINY

import labelled
import settings
import train
from checkpoint import load_checkpoint
from clip import CLIP, CLIPConfig
from dataset import load_splits
from utils import seed_everything

SMALL = CLIPConfig(image_widths=(8, 16), text_hidden_dim=16, embed_dim=12)


def filled(model: CLIP, value: float) -> CLIP:
    """`model` with every floating weight and statistic set to `value`, and batch norm's step counter to 7."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.fill_(value if tensor.is_floating_point() else 7)
    return model


def test_the_moving_average_ramps_up_then_decays_at_its_rate():
    model = filled(CLIP(SMALL), 0.0)
    average = train.MovingAverage(model, decay=0.99)
    filled(model, 1.0)
    average.update(model, step=1)  # the ramp: the old weights count (1 + 1) / (10 + 1)
    expected = 1 - 2 / 11
    for name, tensor in average.model.state_dict().items():
        if tensor.is_floating_point():
            assert torch.allclose(tensor, torch.full_like(tensor, expected)), (
                name
            )  # weights and batch-norm statistics alike
        else:
            assert torch.equal(tensor, torch.full_like(tensor, 7)), name  # the step counter is copied
    average.update(model, step=10_000)  # the ramp is long over: the decay rules
    weight = average.model.image_encoder.projection.weight
    assert torch.allclose(weight, torch.full_like(weight, 0.99 * expected + 0.01))
    assert torch.equal(
        model.image_encoder.projection.weight, torch.ones_like(weight)
    )  # the trained model is left alone


def test_a_decay_of_zero_keeps_the_latest_weights():
    model = filled(CLIP(SMALL), 0.0)
    average = train.MovingAverage(model, decay=0.0)
    for step, value in enumerate((3.0, -2.0), start=1):
        average.update(filled(model, value), step)
        assert all(
            torch.equal(a, b)
            for a, b in zip(average.model.state_dict().values(), model.state_dict().values(), strict=True)
        )


def spy_on_new_run(monkeypatch) -> dict:
    """Keep the state and moving average that train.new_run makes, to compare with what was saved."""
    made, original = {}, train.new_run

    def recording_new_run(*args, **kwargs):
        made["state"], made["average"] = original(*args, **kwargs)
        return made["state"], made["average"]

    monkeypatch.setattr(train, "new_run", recording_new_run)
    return made


def test_each_checkpoint_key_holds_the_weights_it_names(runs_dir: Path, monkeypatch):
    made = spy_on_new_run(monkeypatch)
    train.main([*TINY, "--epochs", "1", "--runs-dir", str(runs_dir), "--run-name", "run"])
    saved = load_checkpoint(runs_dir / "run" / "last.pt")
    for key, module in (("model", made["average"].model), ("training_model", made["state"].training_model)):
        assert saved[key].keys() == module.state_dict().keys()
        assert all(torch.equal(saved[key][name], value) for name, value in module.state_dict().items()), key
    assert not torch.equal(
        saved["model"]["logit_scale"], saved["training_model"]["logit_scale"]
    )  # two different things
    assert saved["optimizer"]["state"][0]["step"] == saved["step"] == 8


def test_a_run_of_four_steps_trains(runs_dir: Path):
    # A quarter of four steps is one: the one-cycle schedule's warm-up would be zero steps long.
    result = train.main([*TINY, "--batch-size", "256", "--epochs", "1", "--runs-dir", str(runs_dir)])
    assert load_checkpoint(result["run_dir"] / "last.pt")["step"] == 4


def test_best_pt_is_the_best_validation_epoch_and_the_test_accuracy_comes_from_it(runs_dir: Path, monkeypatch):
    validation_scores, scored = iter([0.5, 0.9, 0.7]), []
    real_accuracy = labelled.zero_shot_accuracy

    def scripted_accuracy(model, images, labels, precision):
        scored.append({name: tensor.clone() for name, tensor in model.state_dict().items()})
        return next(validation_scores, None) or real_accuracy(model, images, labels, precision)

    monkeypatch.setattr(labelled, "zero_shot_accuracy", scripted_accuracy)
    result = train.main([*TINY, "--epochs", "3", "--runs-dir", str(runs_dir), "--run-name", "run"])
    best, last = load_checkpoint(runs_dir / "run" / "best.pt"), load_checkpoint(runs_dir / "run" / "last.pt")
    assert (best["epoch"], best["best_score"], result["best_val_score"]) == (2, 0.9, 0.9)
    assert [epoch["val_accuracy"] for epoch in last["history"]] == [0.5, 0.9, 0.7]
    epoch_2, tested = scored[1], scored[3]  # the weights validated after epoch 2, and those scored on the test split
    assert all(torch.equal(tested[name], value) for name, value in epoch_2.items())
    assert all(torch.equal(best["model"][name], value) for name, value in epoch_2.items())
    assert not torch.equal(last["model"]["logit_scale"], best["model"]["logit_scale"])


def test_the_validation_split_does_not_change_with_the_training_seed():
    seed_everything(1)
    first = load_splits("digits", "unused", val_size=300)
    seed_everything(2)
    second = load_splits("digits", "unused", val_size=300)
    assert torch.equal(first.val.images, second.val.images) and torch.equal(first.val.labels, second.val.labels)
    assert not set(map(bytes, first.val.images.numpy())) & set(
        map(bytes, first.train.images.numpy())
    )  # held out from training


# -0.0001, not -1e-4, which argparse takes for a flag and refuses before the range is checked
@pytest.mark.parametrize(
    "flag, value",
    [("--ema-decay", "1"), ("--ema-decay", "-0.1"), ("--ema-decay", "1.5"), ("--weight-decay", "-0.0001")],
)
def test_decays_outside_their_range_are_refused_with_usage(flag: str, value: str, capsys):
    with pytest.raises(SystemExit) as exit_info:
        settings.parse_args([flag, value])
    assert exit_info.value.code == 2 and "usage:" in capsys.readouterr().err
