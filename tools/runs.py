"""What the benchmarks share: the machine they ran on, and train.py and inference.py run as a user runs
them, in a process of their own, with what they wrote read back from the run folder."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# The CPU's vector units that decide its speed: bf16 runs natively only with AVX512_BF16 or AMX.
CPU_VECTOR_UNITS = {
    "AVX2": torch.cpu._is_avx2_supported,
    "AVX-512": torch.cpu._is_avx512_supported,
    "AVX512_BF16": torch.cpu._is_avx512_bf16_supported,
    "AMX": torch.cpu._is_amx_tile_supported,
}
# Set to measure on an AVX-512 machine how an AVX2 one behaves (docs/results.md).
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def machine(precision_why: str) -> dict:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cpu_vector_units": [name for name, probe in CPU_VECTOR_UNITS.items() if probe()],
        "isa_limits": {name: os.environ[name] for name in ISA_LIMITS if name in os.environ},
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "precision": precision_why,
    }


def run_script(script: str, argv: list[str]) -> None:
    """`python script ...` from the repository's root, its output shown as it comes; SystemExit if it fails."""
    done = subprocess.run([sys.executable, str(REPO / script), *argv], cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"error: python {script} {' '.join(argv)} failed (exit code {done.returncode})")


def train(argv: list[str], runs_dir: Path, run_name: str) -> dict:
    """Train with `python train.py ...` into runs_dir/run_name; what it wrote in results.json."""
    run_script("train.py", [*argv, "--runs-dir", str(runs_dir), "--run-name", run_name])
    return json.loads((runs_dir / run_name / "results.json").read_text())
