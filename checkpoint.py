"""Checkpoints: what a training run's state is, saved atomically and loaded safely.

A checkpoint is a dict of tensors and plain values, so that `torch.load(...,
weights_only=True)` reads it without running code. Its keys are the fields of
`RunState`: what inference needs (the averaged weights and how to rebuild the
model) and what resuming adds to continue a run exactly where it stopped.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn

from clip import CLIP, CLIPConfig
from distributed import ONE_PROCESS, Process, gathered_states

RUNS_DIR = Path("runs")
FOR_RESUMING = {"for_resuming": True}  # the fields that only resuming needs
SETTINGS = {"restored": False}  # saved for inference and checked when resuming, but a resumed run brings its own


@dataclass
class RunState:
    """A training run at a step: what last.pt and best.pt hold, what --resume restores and what
    inference.py reads. Each field is one key of the checkpoint; a field with a `state_dict`
    (a model, the optimizer, the scheduler, the random generators) is saved through it and
    restored into the object in place. A resumed run keeps its own settings (`config`, `args`),
    which train.py checks against the checkpoint's."""

    model: nn.Module  # the moving average of the weights: what is evaluated, saved as best.pt and used
    config: dict = field(metadata=SETTINGS)  # the model's CLIPConfig, from which inference rebuilds it
    args: dict = field(metadata=SETTINGS)  # the settings of the process that saved it
    step: int  # optimizer steps taken
    epoch: int  # complete epochs
    best_score: float  # the best validation score so far: zero-shot accuracy, or RSum for photos
    score_name: str  # which score that is: "accuracy" or "rsum" (tasks.py)
    history: list[dict]  # one entry per complete epoch
    training_model: nn.Module = field(metadata=FOR_RESUMING)  # the weights the optimizer steps
    optimizer: torch.optim.Optimizer = field(metadata=FOR_RESUMING)
    scheduler: torch.optim.lr_scheduler.LRScheduler = field(metadata=FOR_RESUMING)
    rng: object = field(metadata=FOR_RESUMING)  # the random generators, with state_dict and load_state_dict
    epoch_loss_sum: torch.Tensor = field(metadata=FOR_RESUMING)  # of the current epoch's steps, on the device

    @classmethod
    def keys(cls, resuming: bool = True) -> tuple[str, ...]:
        """The keys of a checkpoint that can be resumed, or with resuming=False, of one that inference can use."""
        return tuple(f.name for f in fields(cls) if resuming or not f.metadata.get("for_resuming"))

    def state_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: value.state_dict() if hasattr(value, "state_dict") else value for name, value in values.items()}

    def load_state_dict(self, state: dict) -> None:
        for f in fields(self):
            if not f.metadata.get("restored", True):
                continue
            current = getattr(self, f.name)
            if hasattr(current, "load_state_dict"):
                current.load_state_dict(state[f.name])
            elif isinstance(current, torch.Tensor):  # on this run's device, whichever the file was loaded onto
                setattr(self, f.name, state[f.name].to(current.device))
            else:
                setattr(self, f.name, state[f.name])


class RandomState:
    """The random generators a run draws from, saved as uint8 tensors, which `weights_only` loading
    accepts: one for augmentation and one for the captions, so that the images a run sees do not
    depend on its captions. Saving torch's global generators too keeps resuming exact if
    something (dropout, say) starts to draw from them.

    Among several processes (distributed.py), each augments its own images with its own generator
    (the main process's is a single process's), and all draw the same captions for the whole batch:
    every process needs the positives of the global batch. state_dict() gathers every process's
    augmentation generator, so it is called on every process."""

    AUGMENT_STREAMS = 1_000_003  # apart the seeds of the processes' augmentation, so that no two runs share one

    def __init__(self, device: torch.device, seed: int, process: Process = ONE_PROCESS):
        self.device, self.process = device, process
        self.augment = torch.Generator(device).manual_seed(seed + self.AUGMENT_STREAMS * process.rank)
        self.captions = torch.Generator(device).manual_seed(seed + 1)

    def state_dict(self) -> dict:
        states = {
            "device": self.device.type,
            "augment": self.augment.get_state(),
            "captions": self.captions.get_state(),
        }
        if self.process.is_distributed:
            states["augment_per_process"] = gathered_states(states["augment"], self.process)  # (N, S)
        states["torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        return states

    def load_state_dict(self, states: dict) -> None:
        if states["device"] != self.device.type:  # another kind of generator: its state does not carry over
            print(
                f"note: the run was trained on {states['device']}; on {self.device.type} its data order and "
                "augmentation continue differently"
            )
            return
        # Loading moved the states onto the device; a generator wants its state on the CPU.
        per_process = states.get("augment_per_process", states["augment"][None])
        if self.process.rank < len(per_process):
            # A row is a view into the rows' storage, which set_state misreads (torch 2.14): it gets a copy of its own.
            self.augment.set_state(per_process[self.process.rank].cpu().clone())
        if len(per_process) != self.process.world_size:  # the global batches and their captions stay the run's
            print(
                f"note: the run was trained by {len(per_process)} processes and continues on "
                f"{self.process.world_size}: its augmentation continues differently"
            )
        if "captions" in states:  # runs saved before captions were drawn have none
            self.captions.set_state(states["captions"].cpu())
        torch.set_rng_state(states["torch"].cpu())
        if "cuda" in states:
            torch.cuda.set_rng_state(states["cuda"].cpu(), self.device)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded; the message names the file and the problem."""


def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a temporary file beside `path`, then move it into place: a crash never
    leaves a half-written checkpoint, and the previous one stays intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())  # on disk before the rename, so a power cut cannot leave an empty file
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu", keys: tuple[str, ...] = ("model", "config")
) -> dict:
    """Load a checkpoint safely: `weights_only=True` refuses pickles that would run code.
    CheckpointError names the file when it cannot be loaded or lacks one of `keys`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: check the path, or train one with `python train.py`")
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of files that are not zip archives; the error below says it all.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} is damaged, or holds objects other than tensors and plain values (which could run code when "
            "loaded); refusing to load it"
        ) from error
    except (
        Exception
    ) as error:  # a damaged file fails in torch.load as RuntimeError, EOFError, KeyError, ValueError and more
        raise CheckpointError(f"{path} is truncated or damaged, or not a checkpoint; use another checkpoint") from error
    if isinstance(state, dict):
        upgrade(state)
    missing = [key for key in keys if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint written by train.py: it lacks {', '.join(missing)}")
    return state


def upgrade(state: dict) -> None:
    """Checkpoints written before photo collections were called --dataset photos kept their best score as
    `best_accuracy` (RSum / 600 for photos): read them as today's."""
    args = state.get("args")
    if isinstance(args, dict) and args.get("dataset") == "captions":
        args["dataset"] = "photos"
    if "best_accuracy" in state and "best_score" not in state:
        photos = isinstance(args, dict) and args.get("dataset") == "photos"
        best = state.pop("best_accuracy")
        state["best_score"], state["score_name"] = (600 * best, "rsum") if photos else (best, "accuracy")


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[CLIP, dict]:
    """The averaged model of a checkpoint, rebuilt from the config it stores, in eval mode, and the
    checkpoint itself; CheckpointError in one line when the file cannot give one."""
    state = load_checkpoint(path, device, keys=RunState.keys(resuming=False))
    try:
        model = CLIP(CLIPConfig.from_dict(state["config"]))
        model.load_state_dict(state["model"])
    except Exception as error:  # a damaged config or state dict fails as TypeError, ValueError, RuntimeError and more
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path} holds a model that cannot be rebuilt ({reason}); use another checkpoint"
        ) from error
    return model.to(device).to(memory_format=torch.channels_last).eval(), state


def latest_run(runs_dir: Path = RUNS_DIR, filename: str = "best.pt") -> Path:
    """The newest `runs_dir/<run>/filename`."""
    candidates = sorted(runs_dir.glob(f"*/{filename}"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(f"no {filename} under {runs_dir}/: train a model with `python train.py` first")
    return candidates[-1]
