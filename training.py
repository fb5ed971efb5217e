"""The safeguards of a training run: a moving average of its weights, weight decay where it belongs, and
the check that its loss and weights stay finite."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import torch

from clip import CLIP


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what was saved."""


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors if t.is_floating_point()]).all())


def non_finite_error(what: str, last_checkpoint: Path) -> TrainingError:
    saved = (
        f"the last good checkpoint is {last_checkpoint}" if last_checkpoint.is_file() else "no checkpoint was written"
    )
    return TrainingError(f"{what}; {saved}. Start again with a lower --lr")


class LossWatch:
    """Remembers the first step whose loss was NaN or infinite. The test runs on the device at
    every step, but reading its result waits for the device: do that only now and then."""

    def __init__(self, device: torch.device):
        self.first_bad_step = torch.tensor(-1, device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        first = (self.first_bad_step < 0) & ~torch.isfinite(loss)
        self.first_bad_step = torch.where(first, step, self.first_bad_step)

    def check(self, last_checkpoint: Path) -> None:
        """TrainingError naming the bad step and the last good checkpoint, if there was a bad step."""
        bad_step = int(self.first_bad_step)
        if bad_step >= 0:
            raise non_finite_error(f"the loss became NaN or infinite at step {bad_step}", last_checkpoint)


def param_groups(model: CLIP, weight_decay: float) -> list[dict]:
    # Decay only weight matrices and kernels, never norms, biases or the temperature; a locked tower's
    # weights (requires_grad off) are not the optimizer's at all.
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim >= 2]
    no_decay = [p for p in trained if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class MovingAverage:
    """Exponential moving average of a model's weights and batch-norm statistics, which
    generalises better than the last step's weights; it is what gets evaluated and saved.
    The decay ramps up from 0.1 so the poor weights of the first steps are soon forgotten.

    torch.optim.swa_utils.AveragedModel does not replace it: it has no ramp, it reads its
    update count back from the device twice an update (a wait for the GPU at every step),
    and its state dict's "module." keys would no longer load old checkpoints."""

    def __init__(self, model: CLIP, decay: float):
        self.model = copy.deepcopy(model)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: CLIP, step: int) -> None:
        """Fold in `model`'s weights after optimizer step `step` (1 for the first)."""
        weight = min(self.decay, (1 + step) / (10 + step))
        for averaged, current in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if averaged.is_floating_point():
                averaged.lerp_(current, 1 - weight)
            else:  # batch norm's step counter
                averaged.copy_(current)


class NoWriter:
    """The TensorBoard writer of a process other than the main one: the main one writes the logs."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass
