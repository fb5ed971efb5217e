"""What a run trains on: the one small interface that train.py and inference.py speak to.

Two kinds of data share the training loop. Labelled images (MNIST, Fashion-MNIST, scikit-learn's
digits; labelled.py) are captioned by their class and scored by zero-shot accuracy; a collection of
captioned photos (photos.py) brings its own captions and is scored by retrieval, RSum. Each kind is a
class with the attributes and methods of `Task`; `TASKS` names the class of each --dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Protocol

import torch

from distributed import Process
from labelled import LabelledImages
from photos import PhotoCollection


class Pairs(Protocol):
    """A training split as the loop draws from it."""

    images: torch.Tensor  # (N, ...) uint8, on the device (or memory-mapped on the CPU)
    texts: list[str]  # every caption text trained on; draw() indexes into it

    def __len__(self) -> int: ...

    def draw(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One caption for each image of `batch`, (B,) indices into `texts`, and (B, B) which images each describes."""
        ...


class Task(Protocol):
    score_name: ClassVar[str]  # what `score` measures, as checkpoints and their history name it: "accuracy", "rsum"
    score_tag: ClassVar[str]  # and as TensorBoard does: "zero_shot_accuracy", "rsum"
    image_channels: ClassVar[int]  # 1 for grey images, 3 for colour photos

    train: Pairs
    val: object  # the splits that `score` takes
    test: object
    class_captions: tuple[tuple[str, ...], ...]  # each class's captions to classify with; none for photos

    def __init__(self, args) -> None:
        """Load the data the settings name onto args.device; SystemExit in one line where it cannot be."""
        ...

    @staticmethod
    def settings_error(args) -> str | None:
        """What is wrong with settings that do not fit this kind of data, in one line; None when they fit."""
        ...

    def augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A training batch varied at random, on its device; `augment.varies` says whether it varies them at all."""
        ...

    def score(self, model, split, precision: str, process: Process) -> float:
        """The number that chooses best.pt on the validation split: higher is better."""
        ...

    @staticmethod
    def describe_score(value: float) -> str:
        """The validation score in words: "validation accuracy 99.60%", "validation RSum 301.2"."""
        ...

    def test_results(self, model, precision: str, process: Process) -> tuple[dict, float, str]:
        """The test split scored: what train.py returns, its headline number and the line it prints."""
        ...

    @staticmethod
    def infer(model, state: dict, args, precision: str, output_dir: Path) -> dict:
        """inference.py for a model trained on this kind of data."""
        ...


TASKS: dict[str, type[Task]] = {
    "mnist": LabelledImages,
    "fashion": LabelledImages,
    "digits": LabelledImages,
    "photos": PhotoCollection,
}
