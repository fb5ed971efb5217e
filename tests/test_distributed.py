"""distributed.py and train.py under torchrun: two gloo processes on the CPU compute the same loss and
gradients as one process on the whole batch, through the real model and DistributedDataParallel, and
score a split as one process does; a two-process run writes one run folder that inference.py loads;
stopped by SIGTERM and resumed, it ends as the uninterrupted one."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from test_train_inference import TINY, flatten

import inference
import train
from checkpoint import load_checkpoint, load_model
from clip import CLIP, CLIPConfig, clip_loss
from distributed import ONE_PROCESS, Process, gathered_parts, local_clip_loss, mean, mean_of_parts, part, shard, wrap
from embeddings import retrieval_scores
from photo_files import load_collection
from text_encoder import DIGIT_CAPTIONS
from tools import export_photos

GLOBAL_BATCH, DIM, WORLD_SIZE = 8, 6, 2
LABELS = torch.tensor([0, 1, 0, 2, 1, 1, 3, 0])  # repeated classes: several positives per row
REPOSITORY = Path(__file__).resolve().parents[1]


def encoders() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return nn.Linear(5, DIM), nn.Linear(3, DIM)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images, texts = torch.randn(GLOBAL_BATCH, 5, generator=generator), torch.randn(GLOBAL_BATCH, 3, generator=generator)
    return images, texts, LABELS[:, None] == LABELS[None, :]


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
    image_features, text_features = (
        F.normalize(image_encoder(images[mine]), dim=1),
        F.normalize(text_encoder(texts[mine]), dim=1),
    )
    loss, _ = local_clip_loss(image_features, text_features, torch.tensor(10.0), positives, process)
    loss.backward()
    mean_loss, grads = (
        loss.detach().clone(),
        [p.grad for p in (*image_encoder.parameters(), *text_encoder.parameters())],
    )
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


def clip_step(process: Process) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step's loss of the whole batch and every parameter's gradient, as train.py computes them:
    the CLIP model, called through distributed.wrap (DistributedDataParallel among several processes), and
    train.batch_loss. Batch norm reads its running statistics (eval mode), so that each image's features
    are its own: in training, each process normalises its own images (the README's Many GPUs)."""
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(image_widths=(8, 16), text_hidden_dim=16, embed_dim=12)).eval()
    with torch.no_grad():  # off the initial weights, whose zeroed batch-norm scales would zero some gradients
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    images = torch.randn(GLOBAL_BATCH, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    tokens, positives = model.tokenize(DIGIT_CAPTIONS), LABELS[:, None] == LABELS[None, :]
    positives[0, 3] = True  # caption 3 describes image 0 too, not the reverse: positives need not be symmetric
    texts, column = train.texts_to_encode(
        tokens, shard(LABELS, process), avoid_waiting=False
    )  # each image's caption: its digit
    wrapped = wrap(model, process)  # kept until after backward, which it hooks into to average the gradients
    features = wrapped(images[shard(torch.arange(GLOBAL_BATCH), process)], texts, features=True)
    loss, _ = train.batch_loss(*features, column, positives, process)
    loss.backward()
    return mean(loss.detach(), process), {name: p.grad for name, p in model.named_parameters()}


def each_process_of_clip(rank: int, store: str, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    results[rank] = clip_step(Process(rank, WORLD_SIZE, rank))
    dist.destroy_process_group()


def test_the_clip_model_in_distributed_data_parallel_gives_the_loss_and_gradients_of_one_process(tmp_path: Path):
    expected_loss, expected_grads = clip_step(ONE_PROCESS)
    assert all(grad.any() for grad in expected_grads.values())
    results = mp.Manager().dict()
    mp.spawn(each_process_of_clip, args=(str(tmp_path / "store"), results), nprocs=WORLD_SIZE)
    for rank in range(WORLD_SIZE):
        loss, grads = results[rank]
        assert torch.allclose(loss, expected_loss, atol=1e-5, rtol=0)
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            assert torch.allclose(grad, expected_grads[name], atol=1e-5, rtol=0), name


def each_process_of_a_split(rank: int, store: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    process, items = Process(rank, WORLD_SIZE, rank), torch.arange(7.0)[:, None] * torch.tensor([1.0, -1.0])  # (7, 2)
    mine = items[part(len(items), process)]
    results[rank] = (
        gathered_parts(mine, len(items), process),
        mean_of_parts(mine[:, 0].mean().item(), len(mine), process),
    )
    dist.destroy_process_group()


def test_the_parts_of_a_split_that_does_not_divide_evenly_gather_to_the_whole_split(tmp_path: Path):
    items = torch.arange(7.0)[:, None] * torch.tensor([1.0, -1.0])
    assert [len(range(7)[part(7, Process(rank, WORLD_SIZE))]) for rank in range(WORLD_SIZE)] == [3, 4]
    results = mp.Manager().dict()
    mp.spawn(each_process_of_a_split, args=(str(tmp_path / "store"), results), nprocs=WORLD_SIZE)
    for rank in range(WORLD_SIZE):
        gathered, mean_of_all = results[rank]
        assert torch.equal(gathered, items) and mean_of_all == pytest.approx(
            3.0
        )  # not the mean of the parts' means, 2.25


def torchrun(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """train.py with these arguments, in two processes on the CPU, started by torchrun."""
    return subprocess.run(
        torchrun_command(*argv), cwd=REPOSITORY, env=unbuffered(), capture_output=True, text=True, timeout=timeout
    )


def torchrun_command(*argv: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(WORLD_SIZE),
        "train.py",
        *argv,
    ]


def unbuffered() -> dict[str, str]:
    return os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # lines as they are printed


THREE_EPOCHS = [*TINY, "--epochs", "3", "--device", "cpu", "--precision", "fp32"]  # 8 steps of 128 an epoch


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    runs = tmp_path_factory.mktemp("runs")
    return runs, torchrun(*THREE_EPOCHS, "--runs-dir", str(runs))


def test_two_processes_write_one_run_that_inference_loads(two_process_run, tmp_path: Path):
    runs, result = two_process_run
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = runs.iterdir()  # one run folder, named by the main process
    assert {"best.pt", "last.pt"} <= {path.name for path in run_dir.iterdir()}
    assert len(list(run_dir.glob("events.out.tfevents*"))) == 1  # the main process's logs alone
    assert (
        result.stdout.count("epoch 3/3:") == 1 and result.stdout.count("test zero-shot accuracy") == 1
    )  # printed once
    last = load_checkpoint(run_dir / "last.pt")
    assert last["step"] == 24 and last["rng"]["augment_per_process"].shape[0] == WORLD_SIZE
    assert not torch.equal(*last["rng"]["augment_per_process"])  # each process augments its images its own way
    out = inference.main(
        ["--checkpoint", str(run_dir / "best.pt"), "--precision", "fp32", "--output-dir", str(tmp_path)]
    )
    assert f"test zero-shot accuracy {out['accuracy']:.2%}" in result.stdout  # the same model, on the same test split


def test_two_processes_stopped_by_sigterm_save_once_and_resume_to_the_uninterrupted_run(
    two_process_run, tmp_path: Path, capsys
):
    runs, _ = two_process_run
    job = subprocess.Popen(
        torchrun_command(*THREE_EPOCHS, "--runs-dir", str(tmp_path), "--run-name", "run"),
        cwd=REPOSITORY,
        env=unbuffered(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in job.stdout:
        if line.startswith("epoch 1/3:"):  # two epochs to go: the signal comes mid-run
            job.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to both processes
            break
    _, stderr = job.communicate(timeout=120)
    last = tmp_path / "run" / "last.pt"
    assert stderr.count("stopped by SIGTERM after step") == 1, stderr[-3000:]  # the main process's message
    assert "Unable to shutdown process" not in stderr  # both exited after saving, before torchrun would kill them
    stopped = load_checkpoint(last)
    assert 8 <= stopped["step"] < 24

    one = tmp_path / "one" / "run"  # the same run, continued by one process instead
    shutil.copytree(last.parent, one)
    assert train.main(["--resume", str(one / "last.pt")])["run_dir"] == one
    assert "note: the run was trained by 2 processes and continues on 1" in capsys.readouterr().out
    assert load_checkpoint(one / "last.pt")["step"] == 24

    resumed = torchrun("--resume", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (run_dir,) = runs.iterdir()
    expected, final = load_checkpoint(run_dir / "last.pt"), load_checkpoint(last)
    assert final["step"] == expected["step"] == 24
    for key in ("training_model", "model", "optimizer", "rng"):
        flat, flat_expected = flatten(final[key]), flatten(expected[key])
        assert flat.keys() == flat_expected.keys()
        assert all(torch.equal(value, flat_expected[name]) for name, value in flat.items()), key


def test_two_processes_score_retrieval_on_captioned_photos_as_one_process_does(tmp_path: Path):
    exported = export_photos.export("digits", "flickr8k", tmp_path / "digits")  # 360 photos, 5 captions each
    photos = ["--dataset", "photos", "--data-dir", str(exported.folder), "--cache-dir", str(tmp_path / "cache")]
    small = [
        "--image-size",
        "28",
        "--image-widths",
        "8,16",
        "--embed-dim",
        "16",
        "--batch-size",
        "32",
        "--device",
        "cpu",
    ]
    result = torchrun(
        *photos, *small, "--epochs", "1", "--precision", "fp32", "--runs-dir", str(tmp_path), "--run-name", "run"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    collection, (model, best) = (
        load_collection(exported.folder, 28, tmp_path / "cache"),
        load_model(tmp_path / "run" / "best.pt"),
    )
    assert best["history"][0]["val_rsum"] == pytest.approx(retrieval_scores(model, collection.val)["rsum"], abs=1e-9)
    assert (
        f"test retrieval (36 photos, 180 captions): RSum {retrieval_scores(model, collection.test)['rsum']:.1f};"
        in result.stdout
    )
