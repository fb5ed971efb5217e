"""distributed.py: two gloo processes on the CPU compute the same loss and gradients as one process
on the whole batch."""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from clip import clip_loss
from distributed import Process, local_clip_loss, shard

GLOBAL_BATCH, DIM, WORLD_SIZE = 8, 6, 2


def encoders() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return nn.Linear(5, DIM), nn.Linear(3, DIM)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images, texts = torch.randn(GLOBAL_BATCH, 5, generator=generator), torch.randn(GLOBAL_BATCH, 3, generator=generator)
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 3, 0])  # repeated classes: several positives per row
    return images, texts, labels[:, None] == labels[None, :]


def one_process() -> tuple[torch.Tensor, list[torch.Tensor]]:
    image_encoder, text_encoder = encoders()
    images, texts, positives = batch()
    logits = 10.0 * F.normalize(image_encoder(images), dim=1) @ F.normalize(text_encoder(texts), dim=1).T
    loss = clip_loss(logits, positives)
    loss.backward()
    return loss.detach(), [p.grad for p in (*image_encoder.parameters(), *text_encoder.parameters())]


def each_process(rank: int, store: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    process = Process(rank, WORLD_SIZE, rank)
    image_encoder, text_encoder = encoders()
    images, texts, positives = batch()
    mine = shard(torch.arange(GLOBAL_BATCH), process)
    image_features, text_features = F.normalize(image_encoder(images[mine]), dim=1), F.normalize(text_encoder(texts[mine]), dim=1)
    loss = local_clip_loss(image_features, text_features, torch.tensor(10.0), positives, process)
    loss.backward()
    mean_loss, grads = loss.detach().clone(), [p.grad for p in (*image_encoder.parameters(), *text_encoder.parameters())]
    for tensor in (mean_loss, *grads):  # the mean over processes, as DistributedDataParallel takes it
        dist.all_reduce(tensor)
        tensor /= WORLD_SIZE
    results[rank] = (mean_loss, grads)
    dist.destroy_process_group()


def test_two_processes_give_the_loss_and_gradients_of_one_on_the_whole_batch(tmp_path: Path):
    expected_loss, expected_grads = one_process()
    results = mp.Manager().dict()
    mp.spawn(each_process, args=(str(tmp_path / "store"), results), nprocs=WORLD_SIZE)
    for rank in range(WORLD_SIZE):
        loss, grads = results[rank]
        assert torch.allclose(loss, expected_loss, atol=1e-5)
        for grad, expected in zip(grads, expected_grads, strict=True):
            assert torch.allclose(grad, expected, atol=1e-5)
