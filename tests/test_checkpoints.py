"""Checkpoint files: written atomically, loaded without running code, and a bad one named in one line."""

import io
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoint import CheckpointError, RunState, load_checkpoint, load_model, save_checkpoint
from clip import CLIP, CLIPConfig

REPO = Path(__file__).resolve().parents[1]
SMALL = CLIPConfig(image_widths=(8, 16), text_hidden_dim=16, embed_dim=16)


def small_checkpoint() -> dict:
    return {
        "model": CLIP(SMALL).state_dict(),
        "config": SMALL.to_dict(),
        "epoch": 1,
        "best_score": 0.5,
        "dataset": "digits",
    }


def checkpoint_bytes(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


class CreatesFileWhenUnpickled:
    """Unpickling this calls open(marker, "w"): a stand-in for a checkpoint that runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("container", ["torch zip archive", "bare pickle"])
def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(container: str, tmp_path: Path):
    marker = tmp_path / "code-ran"
    state = {"model": CreatesFileWhenUnpickled(marker), "config": {}}
    path = tmp_path / "evil.pt"
    path.write_bytes(checkpoint_bytes(state) if container == "torch zip archive" else pickle.dumps(state))
    with pytest.raises(CheckpointError, match="refusing to load it") as error:
        load_checkpoint(path)
    assert not marker.exists()
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def zip_of_text() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "not a checkpoint")
    return buffer.getvalue()


# name -> the bytes of a file that is not a loadable checkpoint of this project
BAD_CHECKPOINTS = {
    "truncated": lambda: checkpoint_bytes(small_checkpoint())[:5000],
    "cut at the end": lambda: checkpoint_bytes(small_checkpoint())[:-10],
    "empty": lambda: b"",
    "text": lambda: b"model: not really\n",
    "random bytes": lambda: bytes(range(256)) * 8,
    "another zip archive": zip_of_text,
    "a list, not a dict": lambda: checkpoint_bytes([torch.ones(2)]),
    "a bare state dict": lambda: checkpoint_bytes(CLIP(SMALL).state_dict()),
}


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_a_bad_checkpoint_gives_one_line_naming_the_file(kind: str, tmp_path: Path):
    path = tmp_path / "bad.pt"
    path.write_bytes(BAD_CHECKPOINTS[kind]())
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_missing_checkpoint_is_named(tmp_path: Path):
    with pytest.raises(CheckpointError, match=f"no checkpoint at {tmp_path / 'none.pt'}: check the path"):
        load_checkpoint(tmp_path / "none.pt")


def inference_checkpoint() -> dict:
    """What inference reads from a checkpoint: the model, its config, and the step and history --evaluate reports."""
    state = {
        "model": CLIP(SMALL).state_dict(),
        "config": SMALL.to_dict(),
        "args": {},
        "step": 10,
        "history": [],
        "epoch": 1,
        "best_score": 0.5,
        "score_name": "accuracy",
    }
    assert set(state) == set(RunState.keys(resuming=False))
    return state


@pytest.mark.parametrize(
    "dataset, best_accuracy, expected",
    [("mnist", 0.99, ("mnist", 0.99, "accuracy")), ("captions", 0.5, ("photos", 300.0, "rsum"))],
)
def test_a_checkpoint_written_before_best_score_loads_with_its_score_named(
    tmp_path: Path, dataset: str, best_accuracy: float, expected: tuple
):
    # Earlier checkpoints kept best_accuracy (RSum / 600 for photos) and called photo collections "captions".
    state = inference_checkpoint()
    del state["best_score"], state["score_name"]
    state |= {"best_accuracy": best_accuracy, "args": {"dataset": dataset}}
    torch.save(state, tmp_path / "old.pt")
    loaded = load_model(tmp_path / "old.pt")[1]
    name, score, score_name = expected
    assert (loaded["args"]["dataset"], loaded["score_name"]) == (name, score_name)
    assert loaded["best_score"] == pytest.approx(score)


# name -> how a checkpoint that loads as a dict still cannot give a model, and what the error says
UNUSABLE_FOR_INFERENCE = {
    "without step": (lambda state: state.pop("step"), "it lacks step"),
    "a config with a field of the wrong type": (
        lambda state: state["config"].update(image_widths=8),
        "cannot be rebuilt",
    ),
    "a config with an unknown field": (lambda state: state["config"].update(depth=3), "cannot be rebuilt"),
    "a weight of the wrong shape": (
        lambda state: state["model"].update(logit_scale=torch.ones(3)),
        "cannot be rebuilt",
    ),
    "a missing weight": (lambda state: state["model"].pop("logit_scale"), "cannot be rebuilt"),
}


def test_a_valid_inference_checkpoint_gives_a_model_in_eval_mode(tmp_path: Path):
    save_checkpoint(inference_checkpoint(), tmp_path / "best.pt")
    model, state = load_model(tmp_path / "best.pt")
    assert isinstance(model, CLIP) and not model.training and state["step"] == 10


@pytest.mark.parametrize("kind", UNUSABLE_FOR_INFERENCE)
def test_a_checkpoint_that_cannot_give_a_model_is_named_in_one_line(kind: str, tmp_path: Path):
    damage, reason = UNUSABLE_FOR_INFERENCE[kind]
    state = inference_checkpoint()
    damage(state)
    path = tmp_path / "best.pt"
    save_checkpoint(state, path)
    with pytest.raises(CheckpointError, match=reason) as error:
        load_model(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@settings(max_examples=150, deadline=None)  # no deadline: the shared CPU's speed varies
@given(data=st.data())
def test_a_damaged_checkpoint_loads_or_raises_checkpoint_error(data, tmp_path_factory):
    original = checkpoint_bytes({"model": {"weight": torch.arange(6.0)}, "config": {"embed_dim": 6}})
    damaged = bytearray(original[: data.draw(st.integers(0, len(original)), label="length")])
    for position in data.draw(st.lists(st.integers(0, max(0, len(damaged) - 1)), max_size=4), label="flipped bytes"):
        if damaged:
            damaged[position] ^= 0xFF
    path = tmp_path_factory.mktemp("damaged") / "last.pt"
    path.write_bytes(bytes(damaged))
    try:
        state = load_checkpoint(path)
    except CheckpointError as error:
        assert str(path) in str(error) and "\n" not in str(error)
    else:
        assert {"model", "config"} <= state.keys()  # damage in the tensor bytes goes unseen: no checksum


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path: Path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"weight": torch.ones(3)}, "config": {}}, path)

    def write_half_then_fail(state, file) -> None:
        file.write(b"PK\x03\x04 the first bytes of a zip archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"model": {"weight": torch.zeros(3)}, "config": {}}, path)
    assert torch.equal(load_checkpoint(path)["model"]["weight"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


@pytest.mark.parametrize("script, option", [("inference.py", "--checkpoint"), ("train.py", "--resume")])
def test_scripts_report_a_bad_checkpoint_in_one_line(script: str, option: str, tmp_path: Path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "run" / "last.pt"
    path.parent.mkdir()
    path.write_bytes(checkpoint_bytes({"model": CreatesFileWhenUnpickled(marker), "config": {}}))
    result = subprocess.run(
        [sys.executable, script, option, str(path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path} "), result.stderr
    assert not marker.exists()
