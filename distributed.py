"""Training on several processes started by torchrun: which process this is, and CLIP's loss over
the global batch, whose image and text features every process shares.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is the one process of a plain
run, and everything here does what a single process would. Each process trains on its own shard
of every global batch. The loss is open_clip's local form: each process scores its own images
against every process's captions, and its own captions against every process's images, with the
features gathered so that gradients flow back through the gather to the process that made them.
The mean of the processes' losses is the loss of the whole batch, and DistributedDataParallel's
mean of their gradients is its gradient.

Besides the loss, the few messages the processes exchange: the run folder's name, the main process's
batch-norm statistics, each process's part of a split scored, their random generators for the
checkpoint, and which signal stops them all.
"""

from __future__ import annotations

import builtins
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel


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


ONE_PROCESS = Process()  # a plain run's


def this_process() -> Process:
    """Which process this is, from torchrun's environment; the one process of a plain run without it."""
    return Process(
        int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    )


def start(process: Process, device: torch.device) -> None:
    """Join the other processes, and let only the main one print. Between GPUs, NCCL carries the CUDA
    tensors and gloo the few CPU ones (a stop flag, a score): those never wait for a GPU."""
    if not process.is_distributed:
        return
    if device.type == "cuda":
        torch.cuda.set_device(own_device(process, device))
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    if not process.is_main:  # every process runs the same code: one copy of each line is enough
        builtins.print = lambda *args, **kwargs: None


def leave(process: Process) -> None:
    """Leave the other processes, whichever way the run ended."""
    if process.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def own_device(process: Process, device: torch.device) -> torch.device:
    """The device this process trains on: its own GPU, cuda:LOCAL_RANK, among several processes."""
    return torch.device("cuda", process.local_rank) if device.type == "cuda" and process.is_distributed else device


def wrap(model: nn.Module, process: Process) -> nn.Module:
    """The model as the training step calls it: DistributedDataParallel, which averages the gradients of
    the processes during backward, among several. The step calls its forward(), which it needs for that;
    batch norm normalises each process's own images (b = B / N), as torch's SyncBatchNorm runs only on GPUs."""
    if not process.is_distributed:
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


@contextmanager
def main_first(process: Process) -> Iterator[None]:
    """Run the block in the main process first, then in the others: a download or a cache that the main
    process writes is read by the others, not written by all at once."""
    if process.is_distributed and not process.is_main:
        dist.barrier()
    yield
    if process.is_distributed and process.is_main:
        dist.barrier()


def wait_for_main(process: Process) -> None:
    """Wait until the main process is here: it may be writing a file that the others read next."""
    if process.is_distributed:
        dist.barrier()


def from_main(value, process: Process):
    """The main process's `value` (any picklable object), on every process."""
    if not process.is_distributed:
        return value
    values = [value]
    dist.broadcast_object_list(values, src=0)
    return values[0]


def shard(batch: torch.Tensor, process: Process) -> torch.Tensor:
    """This process's part of a global batch (indices, say): an equal, contiguous slice for each process."""
    size = len(batch) // process.world_size
    return batch[process.rank * size : (process.rank + 1) * size]


def part(n: int, process: Process) -> slice:
    """This process's share of n items that are evaluated, not trained on: contiguous, and every item
    in one share, which therefore differ in length by at most one."""
    return slice(process.rank * n // process.world_size, (process.rank + 1) * n // process.world_size)


@torch.no_grad()
def gathered_parts(values: torch.Tensor, n: int, process: Process) -> torch.Tensor:
    """Every process's `values` of its part(n) of n items, concatenated: (n, ...) on every process."""
    if not process.is_distributed:
        return values
    lengths = [len(range(n)[part(n, Process(rank, process.world_size))]) for rank in range(process.world_size)]
    padded = values.new_zeros((max(lengths), *values.shape[1:]))  # all_gather wants one shape from each
    padded[: len(values)] = values
    everyone = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(everyone, padded)
    return torch.cat([chunk[:length] for chunk, length in zip(everyone, lengths, strict=True)])


def mean_of_parts(score: float, count: int, process: Process) -> float:
    """The mean over all items of a score (an accuracy) that each process averaged over its `count` of them."""
    if not process.is_distributed:
        return score
    totals = torch.tensor([score * count, count], dtype=torch.float64)
    dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def mean(tensor: torch.Tensor, process: Process) -> torch.Tensor:
    """The mean of every process's `tensor` (a loss, say), on every process; without a wait for the device."""
    if not process.is_distributed:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total / process.world_size


@torch.no_grad()
def buffers_from_main(model: nn.Module, process: Process) -> None:
    """Give every process the main process's buffers (batch norm's running statistics): each process's
    statistics follow its own images, and the main process's are those that are saved."""
    if process.is_distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def agreed_signal(received: signal.Signals | None, process: Process) -> signal.Signals | None:
    """The signal that stops the run, the same for every process, so that all stop after the same step:
    the highest number any process received, or None. A message between CPUs; no wait for a GPU."""
    if not process.is_distributed:
        return received
    number = torch.tensor(int(received or 0))
    dist.all_reduce(number, op=dist.ReduceOp.MAX)
    return signal.Signals(int(number)) if number else None


def gathered_states(state: torch.Tensor, process: Process) -> torch.Tensor:
    """(N, ...) every process's `state` (a random generator's, uint8 on the CPU), in rank order."""
    if not process.is_distributed:
        return state[None]
    everyone = [torch.empty_like(state) for _ in range(process.world_size)]
    dist.all_gather(everyone, state)
    return torch.stack(everyone)


def gathered(tensor: torch.Tensor, process: Process) -> torch.Tensor:
    """Every process's `tensor`, concatenated in rank order; gradients flow back to each process's own part."""
    return GatherWithGradients.apply(tensor) if process.is_distributed else tensor


class GatherWithGradients(torch.autograd.Function):
    """dist.all_gather, through which gradients flow. Every process's loss depends on every process's
    rows, so a process's rows get the sum of the gradients that all the processes computed for them.
    (torch.distributed.nn's all_gather does the same, and is deprecated.)"""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> torch.Tensor:
        summed = gradient.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(summed)
        rows = len(summed) // dist.get_world_size()
        return summed[dist.get_rank() * rows : (dist.get_rank() + 1) * rows]


def local_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    positives: torch.Tensor,
    process: Process,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of clip.clip_loss over the global batch, and its (b, B) logits of its images
    against every caption. image_features and text_features: (b, D), this process's images and their
    captions, unit norm; positives: (B, B) for the global batch, whether caption j describes image i.
    The mean over processes equals clip_loss on the whole batch."""
    rows = slice(process.rank * len(image_features), (process.rank + 1) * len(image_features))
    all_images, all_texts = gathered(image_features, process), gathered(text_features, process)
    image_to_text = logit_scale * image_features.float() @ all_texts.float().T  # (b, B)
    text_to_image = logit_scale * text_features.float() @ all_images.float().T  # (b, B)
    positives = positives.float()
    image_targets = positives[rows] / positives[rows].sum(dim=1, keepdim=True)
    text_targets = positives[:, rows].T / positives[:, rows].T.sum(dim=1, keepdim=True)
    loss = (F.cross_entropy(image_to_text, image_targets) + F.cross_entropy(text_to_image, text_targets)) / 2
    return loss, image_to_text
