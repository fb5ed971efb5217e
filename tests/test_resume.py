"""Training state: a run stopped by a signal, resumed, ends exactly as an uninterrupted one;
a non-finite loss or weight stops a run without saving it; a resume that does not fit is refused."""

import signal
from pathlib import Path

import pytest
import torch
from test_train_inference import TINY, flatten

import labelled
import settings
import train
from checkpoint import CheckpointError, load_checkpoint
from clip import CLIP, clip_loss

# Digits' 1,137 training images make 8 steps of 128 a epoch.
TWO_EPOCHS = [*TINY, "--epochs", "2"]


def signal_on_call(monkeypatch, name: str, call: int, *signals: signal.Signals, module=train) -> None:
    """Make module.<name> send `signals` to this process on its `call`-th call, as Ctrl-C or a job scheduler would."""
    original, calls = getattr(module, name), 0

    def sends_signals(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == call:
            for number in signals:
                signal.raise_signal(number)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, sends_signals)


def without_seconds(history: list[dict]) -> list[dict]:
    return [{key: value for key, value in epoch.items() if key != "seconds"} for epoch in history]


def stopped_run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    return exit_info.value.code


def test_a_run_stopped_by_signals_and_resumed_ends_identical_to_an_uninterrupted_one(
    tmp_path: Path, monkeypatch, capsys
):
    train.main([*TWO_EPOCHS, "--runs-dir", str(tmp_path / "a"), "--run-name", "run"])
    expected = load_checkpoint(tmp_path / "a" / "run" / "last.pt")

    last = tmp_path / "b" / "run" / "last.pt"
    handler_before = signal.getsignal(signal.SIGINT)  # Python's own, or SIG_IGN in a job started in the background
    signal_on_call(monkeypatch, "clip_loss", 5, signal.SIGINT)  # mid-epoch 1
    assert stopped_run([*TWO_EPOCHS, "--runs-dir", str(tmp_path / "b"), "--run-name", "run"]) == 130
    assert (load_checkpoint(last)["step"], load_checkpoint(last)["epoch"]) == (5, 0)
    assert f"python train.py --resume {last}" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers given back

    monkeypatch.undo()
    signal_on_call(monkeypatch, "zero_shot_accuracy", 1, signal.SIGTERM, module=labelled)  # during epoch 1's validation
    assert stopped_run(["--resume", "latest", "--runs-dir", str(tmp_path / "b")]) == 143
    assert (load_checkpoint(last)["step"], load_checkpoint(last)["epoch"]) == (8, 1)

    monkeypatch.undo()
    train.main(["--resume", str(last)])
    resumed = load_checkpoint(last)
    assert resumed["step"] == expected["step"] == 16
    for key in ("model", "optimizer", "rng"):
        flat, flat_expected = flatten(resumed[key]), flatten(expected[key])
        assert flat.keys() == flat_expected.keys() and len(flat) >= 2
        assert all(torch.equal(value, flat_expected[name]) for name, value in flat.items()), key
    assert resumed["scheduler"] == expected["scheduler"]
    assert without_seconds(resumed["history"]) == without_seconds(expected["history"])  # losses, accuracies


def test_a_second_ctrl_c_stops_at_once_without_saving(runs_dir: Path, monkeypatch, capsys):
    signal_on_call(monkeypatch, "clip_loss", 3, signal.SIGINT, signal.SIGINT)
    assert stopped_run([*TINY, "--epochs", "1", "--runs-dir", str(runs_dir), "--run-name", "run"]) == 130
    assert not (runs_dir / "run" / "last.pt").exists()
    assert "without saving" in capsys.readouterr().err


@pytest.mark.parametrize("bad_step, saved_step", [(3, None), (11, 8)])
def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(
    bad_step, saved_step, runs_dir, monkeypatch
):
    calls = 0

    def nan_loss_once(logits, positives, drawn):
        nonlocal calls
        calls += 1
        loss = clip_loss(logits, positives, drawn)
        return loss * float("nan") if calls == bad_step else loss

    monkeypatch.setattr(train, "clip_loss", nan_loss_once)
    last = runs_dir / "run" / "last.pt"
    with pytest.raises(train.TrainingError, match=f"at step {bad_step};") as error:
        train.main([*TWO_EPOCHS, "--runs-dir", str(runs_dir), "--run-name", "run"])
    if saved_step is None:
        assert "no checkpoint was written" in str(error.value) and not last.exists()
    else:
        assert str(last) in str(error.value)
        state = load_checkpoint(last)
        assert state["step"] == saved_step and train.all_finite(state["model"].values())


def test_weights_that_are_not_finite_are_never_saved(runs_dir: Path, monkeypatch):
    original, calls = CLIP.clamp_logit_scale, 0

    def clamp_then_break_at_step_16(model: CLIP) -> None:
        nonlocal calls
        original(model)
        calls += 1
        if calls == 16:  # the last step: its loss was finite, the weights it leaves are not
            model.logit_scale.data.fill_(float("inf"))

    monkeypatch.setattr(CLIP, "clamp_logit_scale", clamp_then_break_at_step_16)
    with pytest.raises(train.TrainingError, match="weights became NaN or infinite"):
        train.main([*TWO_EPOCHS, "--runs-dir", str(runs_dir), "--run-name", "run"])
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(runs_dir / "run" / name)
        assert state["step"] == 8 and train.all_finite(state["model"].values())


def test_resuming_with_other_settings_names_the_differing_fields(runs_dir: Path):
    train.main([*TINY, "--dry-run", "--runs-dir", str(runs_dir), "--run-name", "run"])
    last = str(runs_dir / "run" / "last.pt")
    with pytest.raises(CheckpointError) as error:
        train.main(["--resume", last, "--image-widths", "8,32", "--lr", "0.01", "--device", "cpu"])
    message = str(error.value)
    assert message.startswith(f"{last} was trained with other settings")
    assert "image_widths (8, 32) (checkpoint: (8, 16))" in message and "lr 0.01 (checkpoint: 0.003)" in message
    assert (
        "device" not in message and "batch_size" not in message
    )  # where it runs may change; unstated options come from the run


def test_a_run_from_before_stroke_augmentation_resumes_without_it(runs_dir: Path):
    train.main([*TINY, "--dry-run", "--runs-dir", str(runs_dir), "--run-name", "run"])
    last = runs_dir / "run" / "last.pt"
    checkpoint = torch.load(last, weights_only=False)
    del checkpoint["args"]["stroke"]  # as a checkpoint written before --stroke was saved
    torch.save(checkpoint, last)
    argv = ["--resume", str(last), "--device", "cpu"]
    args, _, _ = settings.resumed_settings(argv)
    assert args.stroke == 0.0  # the run goes on as it was trained, whatever the default of the day


def test_resuming_a_checkpoint_without_training_state_says_what_it_lacks(runs_dir: Path):
    train.main([*TINY, "--dry-run", "--runs-dir", str(runs_dir), "--run-name", "run"])
    best = load_checkpoint(runs_dir / "run" / "best.pt")
    inference_only = runs_dir / "run" / "model-only.pt"
    torch.save(
        {key: best[key] for key in ("model", "config", "args", "step", "epoch", "best_score", "score_name", "history")},
        inference_only,
    )
    with pytest.raises(CheckpointError, match="it lacks training_model, optimizer, scheduler, rng, epoch_loss_sum$"):
        train.main(["--resume", str(inference_only)])
