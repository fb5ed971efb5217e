"""--precision: auto takes bf16 only where the hardware runs it natively; an explicit choice is
honoured; a run may be resumed on a machine where auto chooses differently."""

import signal
from pathlib import Path

import pytest
import torch
from test_resume import TWO_EPOCHS, signal_on_call, stopped_run
from test_train_inference import TINY

import embeddings
import inference
import settings
import train
import utils
from checkpoint import load_checkpoint

CPU = torch.device("cpu")


def fake_cpu(monkeypatch, avx512_bf16: bool = False, amx: bool = False, capability: str = "AVX512") -> None:
    """Make torch's CPU probes report another CPU: they read the hardware, which a test cannot change."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)


def record_precisions(monkeypatch, script) -> list[str]:
    """The precision of every autocast region `script` opens."""
    used, original = [], script.autocast

    def recording_autocast(device, precision):
        used.append(precision)
        return original(device, precision)

    monkeypatch.setattr(script, "autocast", recording_autocast)
    return used


@pytest.mark.parametrize(
    "cpu, expected, reason",
    [
        ({"capability": "AVX2"}, "fp32", "this CPU has no native bf16"),
        ({}, "fp32", "this CPU has no native bf16"),  # AVX-512 without its bf16 extension
        ({"avx512_bf16": True}, "bf16", "this CPU runs bf16 natively (AVX512_BF16)"),
        ({"avx512_bf16": True, "amx": True}, "bf16", "this CPU runs bf16 natively (AMX)"),
        ({"avx512_bf16": True, "capability": "AVX2"}, "fp32", "torch is held below it"),  # ATEN_CPU_CAPABILITY=avx2
    ],
)
def test_auto_takes_bf16_only_on_a_cpu_that_runs_it_natively(cpu: dict, expected: str, reason: str, monkeypatch):
    fake_cpu(monkeypatch, **cpu)
    precision, why = utils.resolve_precision("auto", CPU)
    assert precision == expected
    assert why.startswith(f"{expected}") and reason in why


def test_auto_takes_fp32_where_onednn_is_held_below_bf16(monkeypatch):
    fake_cpu(monkeypatch, avx512_bf16=True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert utils.resolve_precision("auto", CPU)[0] == "fp32"


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_follows_the_gpus_native_bf16(native_bf16: bool, expected: str, monkeypatch):
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16 or including_emulation
    )
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    assert utils.resolve_precision("auto", torch.device("cuda"))[0] == expected


def test_auto_on_mps_is_fp32_and_bf16_there_is_refused():
    assert utils.resolve_precision("auto", torch.device("mps"))[0] == "fp32"
    with pytest.raises(ValueError, match="not supported on MPS"):
        utils.resolve_precision("bf16", torch.device("mps"))


@pytest.mark.parametrize("asked, native_bf16", [("bf16", False), ("fp32", True)])
def test_an_explicit_precision_is_honoured_whatever_the_cpu(
    asked: str, native_bf16: bool, runs_dir: Path, monkeypatch, capsys
):
    fake_cpu(monkeypatch, avx512_bf16=native_bf16)
    used = record_precisions(monkeypatch, train)
    result = train.main([*TINY, "--dry-run", "--runs-dir", str(runs_dir), "--precision", asked])
    assert set(used) == {asked}
    assert capsys.readouterr().out.startswith(f"{asked}: as asked by --precision {asked}")
    assert load_checkpoint(result["run_dir"] / "last.pt")["history"][-1]["precision"] == asked


def test_no_amp_still_means_fp32(monkeypatch):
    assert settings.parse_args(["--no-amp"]).precision == "fp32"
    assert settings.parse_args([]).precision == "auto"


def test_training_says_in_its_first_line_which_precision_auto_chose_and_why(runs_dir: Path, monkeypatch, capsys):
    fake_cpu(monkeypatch, capability="AVX2")
    used = record_precisions(monkeypatch, train)
    train.main([*TINY, "--dry-run", "--runs-dir", str(runs_dir)])
    assert set(used) == {"fp32"}
    assert capsys.readouterr().out.startswith("fp32: this CPU has no native bf16 (AVX512_BF16 or AMX); training on cpu")


def test_inference_follows_the_same_rule(digits_checkpoint: Path, tmp_path: Path, monkeypatch, capsys):
    fake_cpu(monkeypatch, avx512_bf16=True)
    used = record_precisions(monkeypatch, embeddings)
    inference.main(["--checkpoint", str(digits_checkpoint), "--output-dir", str(tmp_path)])
    assert used and set(used) == {"bf16"}
    assert "bf16 mixed precision: this CPU runs bf16 natively (AVX512_BF16)" in capsys.readouterr().out


def test_a_run_started_in_bf16_resumes_in_fp32_on_a_cpu_without_it(tmp_path: Path, monkeypatch):
    fake_cpu(monkeypatch, avx512_bf16=True)
    last = tmp_path / "run" / "last.pt"
    signal_on_call(monkeypatch, "clip_loss", 11, signal.SIGINT)  # in epoch 2, after epoch 1 ran in bf16
    assert stopped_run([*TWO_EPOCHS, "--runs-dir", str(tmp_path), "--run-name", "run"]) == 130

    monkeypatch.undo()
    fake_cpu(monkeypatch, capability="AVX2")
    train.main(["--resume", str(last)])  # not refused: auto was asked, and auto now means fp32
    state = load_checkpoint(last)
    assert state["args"]["precision"] == "auto"  # what was asked...
    assert [epoch["precision"] for epoch in state["history"]] == ["bf16", "fp32"]  # ...and what each epoch ran in
