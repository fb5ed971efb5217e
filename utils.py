"""Helpers shared by the scripts: devices, precision, seeding, signals, embedding images."""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import sys

import numpy as np
import torch


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be zero or a positive number, got {text}")
    return value


def decay(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text}")
    return value


def int_tuple(text: str) -> tuple[int, ...]:
    try:
        values = tuple(positive_int(part) for part in text.split(","))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"must be comma-separated positive integers such as 16,32,64, got {text}"
        ) from None
    return values


def pick_device(name: str = "auto") -> torch.device:
    """'auto' prefers CUDA, then Apple's MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available: use --device auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps was asked for but MPS is not available: use --device auto or cpu")
    return torch.device(name)


PRECISIONS = ("auto", "fp32", "bf16")
# ATen's CPU capabilities and oneDNN's ISAs below AVX-512 with bf16: where torch is held at one of
# these (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA), bf16 is emulated even on a CPU that has it, as
# when measuring on an AVX-512 machine how an AVX2 one behaves.
ATEN_BELOW_AVX512 = ("DEFAULT", "NO AVX", "AVX2")
ONEDNN_BELOW_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def cpu_native_bf16() -> tuple[bool, str]:
    """Whether this CPU runs bf16 natively, with AVX512_BF16 or AMX, and why, in words."""
    hardware = (
        "AMX"
        if torch.cpu._is_amx_tile_supported()
        else "AVX512_BF16"
        if torch.cpu._is_avx512_bf16_supported()
        else None
    )
    if hardware is None:
        return False, "this CPU has no native bf16 (AVX512_BF16 or AMX)"
    capability, onednn_isa = (
        torch.backends.cpu.get_cpu_capability(),
        os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper(),
    )
    if capability in ATEN_BELOW_AVX512 or onednn_isa in ONEDNN_BELOW_BF16:
        return (
            False,
            f"this CPU has {hardware}, but torch is held below it (ATen at {capability}, oneDNN at {onednn_isa})",
        )
    return True, f"this CPU runs bf16 natively ({hardware})"


def resolve_precision(asked: str, device: torch.device) -> tuple[str, str]:
    """The precision to run in, 'fp32' or 'bf16', and why, for the first line a script prints.

    'auto' takes bf16 mixed precision only where the hardware runs it natively: a CUDA GPU
    with bf16 (Ampere or newer) or a CPU with AVX512_BF16 or AMX. Elsewhere bf16 is emulated
    and many times slower than fp32, so 'auto' takes fp32 there, and on Apple's MPS.
    """
    if asked not in PRECISIONS:
        raise ValueError(f"unknown precision {asked!r}: choose one of {', '.join(PRECISIONS)}")
    if asked == "bf16" and device.type == "mps":
        raise ValueError("--precision bf16 is not supported on MPS: use --precision fp32 or auto")
    if asked != "auto":
        return asked, f"{asked}: as asked by --precision {asked}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", f"bf16 mixed precision: the {name} runs bf16 natively"
        return "fp32", f"fp32: the {name} has no native bf16"
    if device.type == "cpu":
        native, why = cpu_native_bf16()
        return ("bf16", f"bf16 mixed precision: {why}") if native else ("fp32", f"fp32: {why}")
    return "fp32", f"fp32: auto takes bf16 only on CUDA and on CPUs that run it natively, not on {device.type}"


def settle_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Resolve args.device ("auto": the best there is) and check that it runs args.precision; the
    parser's usage error where it cannot."""
    try:
        args.device = pick_device(args.device)
        resolve_precision(args.precision, args.device)
    except ValueError as error:
        parser.error(str(error))


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 mixed precision when `precision` is 'bf16' (see `resolve_precision`), fp32 otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class GracefulStop:
    """Within `with GracefulStop() as stop:`, the first Ctrl-C (SIGINT) or SIGTERM only
    sets `stop.received`, so a training loop can finish its step, save and exit; a second
    one exits at once, without saving, unless `second_stops_at_once` is False. The previous
    handlers come back on leaving.

    Under torchrun a process gets each signal twice: from the terminal or the job scheduler,
    which signal every process of the job, and from torchrun, which passes on what it got. So
    there a second signal does not stop at once; torchrun kills its processes 30 s after it
    passed the signal on."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, second_stops_at_once: bool = True):
        self.second_stops_at_once = second_stops_at_once

    def __enter__(self) -> GracefulStop:
        self.received: signal.Signals | None = None
        self._previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame) -> None:
        if self.received is not None:
            if self.second_stops_at_once:
                print(f"\n{signal.Signals(number).name} again: stopping now, without saving", file=sys.stderr)
                raise SystemExit(128 + number)
            return
        self.received = signal.Signals(number)
        if self.second_stops_at_once:
            print(
                f"\n{self.received.name}: stopping after this training step, which is saved; Ctrl-C again stops at "
                "once, unsaved",
                file=sys.stderr,
            )
        else:
            print(f"\n{self.received.name}: stopping at the next log step, which is saved", file=sys.stderr)
