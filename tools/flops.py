"""How close a training step comes to the machine's limit: the arithmetic of one step, counted, against what the
CPU can do in the precision it trains in.

`step_flops` counts a step's forward and backward FLOPs with torch.utils.flop_counter (matrix products and
convolutions, the work that the vector units do); `step_seconds` times that step alone, on one batch already in
memory, so that what a run spends beyond it is the data, augmentation, Python and validation. `nominal_peak` is
the CPU's peak by its datasheet formula (cores × FLOPs per cycle × clock) and `matmul_peak` what one large matrix
product reaches on it, the ceiling the convolutions could hope for in practice.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from clip import CLIP, clip_loss
from dataset import model_input
from utils import autocast


def class_batch(model: CLIP, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A labelled batch as a training step sees it: the tokens of each class's first caption, which of them
    describes which image, and how many images drew each (its own class's)."""
    captions = [captions_of_class[0] for captions_of_class in model.config.class_captions]
    tokens = model.tokenize(captions).to(labels.device)
    positives = labels[:, None] == torch.arange(len(captions), device=labels.device)[None, :]
    return tokens, positives, torch.bincount(labels, minlength=len(captions))


def training_step(model: CLIP, images: torch.Tensor, batch: tuple[torch.Tensor, ...], precision: str) -> None:
    """Forward and backward of one step of `images` (uint8, as the data set holds them) against the captions of
    `batch` (class_batch), tokenized once before the steps as train.py does."""
    tokens, positives, drawn = batch
    with autocast(images.device, precision):
        logits = model(model_input(images), tokens)
    clip_loss(logits, positives, drawn).backward()


def step_flops(model: CLIP, images: torch.Tensor, labels: torch.Tensor, precision: str) -> int:
    """FLOPs of one training step's forward and backward pass on the batch `images` (a copy of `model` takes it)."""
    model = copy.deepcopy(model).train()
    batch = class_batch(model, labels)
    with FlopCounterMode(display=False) as counter:
        training_step(model, images, batch, precision)
    return counter.get_total_flops()


def step_seconds(model: CLIP, images: torch.Tensor, labels: torch.Tensor, precision: str, repeats: int = 10) -> float:
    """Median time of a whole optimizer step (forward, backward, AdamW) on one batch held in memory, after a
    warm-up: the step with nothing around it. The weights are laid out channels last, as train.py trains them."""
    model = copy.deepcopy(model).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batch = class_batch(model, labels)
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        training_step(model, images, batch, precision)
        optimizer.step()
        if images.device.type == "cuda":  # a GPU runs the step after the call returns
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def cpu_clock_ghz() -> float | None:
    """The clock /proc/cpuinfo reports (its first core's), in GHz; None where it reports none."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return None
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("cpu MHz"):
            return float(line.split(":", 1)[1]) / 1000
    return None


def nominal_peak(precision: str, vector_units: list[str], cores: int) -> dict | None:
    """The CPU's peak FLOP/s in `precision` by the datasheet formula: cores × lanes × 2 (a fused multiply-add is two
    FLOPs) × 2 FMA units × clock, lanes being the fp32 numbers of a vector register (16 with AVX-512, 8 with AVX2),
    twice as many bf16 pairs with AVX512_BF16's dot products. Two FMA units per core is the common case of server
    and desktop cores since Haswell; a CPU with one, or with AVX-512 split into two halves, reaches half of this.
    None without a clock to read."""
    clock = cpu_clock_ghz()
    if clock is None:
        return None
    # torch held to AVX2 (docs/results.md) uses 256-bit vectors whatever the CPU has.
    wide = "AVX-512" in vector_units and os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() != "AVX2"
    lanes = 16 if wide else 8
    if precision == "bf16" and "AVX512_BF16" in vector_units:
        lanes *= 2
    flops = cores * lanes * 2 * 2 * clock * 1e9
    formula = f"{cores} cores × {lanes} lanes × 2 (FMA) × 2 FMA units × {clock:.2f} GHz"
    return {"flops": flops, "formula": formula}


def matmul_peak(precision: str, device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a (size × size) @ (size × size) matrix product in `precision`, the median of `repeats` after a
    warm-up: what the machine's matrix kernels reach on work that suits them best."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)
