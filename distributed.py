"""Training on several processes started by torchrun: which process this is, and CLIP's loss over
the global batch, whose image and text features every process shares.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is the one process of a plain
run, and everything here does what a single process would. Each process trains on its own shard
of every global batch. The loss is open_clip's local form: each process scores its own images
against every process's captions, and its own captions against every process's images, with the
features gathered so that gradients flow back through the gather to the process that made them.
The mean of the processes' losses is the loss of the whole batch, and DistributedDataParallel's
mean of their gradients is its gradient.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather


@dataclass(frozen=True)
class Process:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The process that prints, logs and saves."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def this_process() -> Process:
    """Which process this is, from torchrun's environment; the one process of a plain run without it."""
    return Process(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def start(process: Process, device: torch.device) -> None:
    """Join the other processes: NCCL between GPUs, gloo between CPUs."""
    if process.is_distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def shard(batch: torch.Tensor, process: Process) -> torch.Tensor:
    """This process's part of a global batch (indices, say): an equal, contiguous slice for each process."""
    size = len(batch) // process.world_size
    return batch[process.rank * size : (process.rank + 1) * size]


def gathered(tensor: torch.Tensor, process: Process) -> torch.Tensor:
    """Every process's `tensor`, concatenated in rank order; gradients flow back to each process's own part."""
    return torch.cat(all_gather(tensor), dim=0) if process.is_distributed else tensor


def local_clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, positives: torch.Tensor, process: Process
) -> torch.Tensor:
    """This process's share of clip.clip_loss over the global batch. image_features and text_features:
    (b, D), this process's images and their captions, unit norm; positives: (B, B) for the global batch,
    whether caption j describes image i. The mean over processes equals clip_loss on the whole batch."""
    rows = slice(process.rank * len(image_features), (process.rank + 1) * len(image_features))
    all_images, all_texts = gathered(image_features, process), gathered(text_features, process)
    image_to_text = logit_scale * image_features.float() @ all_texts.float().T  # (b, B)
    text_to_image = logit_scale * text_features.float() @ all_images.float().T  # (b, B)
    positives = positives.float()
    image_targets = positives[rows] / positives[rows].sum(dim=1, keepdim=True)
    text_targets = positives[:, rows].T / positives[:, rows].T.sum(dim=1, keepdim=True)
    return (F.cross_entropy(image_to_text, image_targets) + F.cross_entropy(text_to_image, text_targets)) / 2
