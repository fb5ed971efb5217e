"""Train CLIP on MNIST: python train.py [--help]

Images and their digit captions are embedded by clip.py's two encoders and
trained with the symmetric InfoNCE loss. Each epoch ends with zero-shot
accuracy on a validation split held out from the training images; best.pt
keeps the epoch that scored best there, and only that model is scored on the
test split. Everything lands in runs/<run-name>/ (TensorBoard logs, last.pt,
best.pt). With --dataset captions --data-dir PATH it trains on any collection
of captioned photos instead (caption_data.py), and chooses best.pt by the
validation split's retrieval (RSum).

What the defaults reach, and how fast on which CPU, is measured by
benchmark.py and listed in the README's Results.

Ctrl-C or SIGTERM ends the current step, saves last.pt and prints the command
that continues the run exactly where it stopped: python train.py --resume
runs/<run-name>/last.pt (or --resume latest).

torchrun --nproc_per_node N train.py ... trains one model on N processes (GPUs, or
CPUs), each on its share of every batch; --batch-size stays the whole batch
(distributed.py, and the README's Many GPUs).
"""

from __future__ import annotations

import argparse
import copy
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn as nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import distributed
from caption_data import CaptionedPhotos, PhotoPairs, describe, load_caption_collection
from captions import CAPTION_KINDS, CaptionedImages, image_properties, stroke_edges, training_captions
from checkpoint import (
    RUNS_DIR,
    CheckpointError,
    RandomState,
    RunState,
    latest_run,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from clip import CLIP, CLIPConfig, clip_loss
from dataset import (
    DATASETS,
    Augmentation,
    DataError,
    PhotoAugmentation,
    Split,
    load_splits,
    normalize,
    shuffled_batches,
)
from distributed import Process, local_clip_loss
from image_encoder import IMAGE_ENCODERS, WeightsError, load_torchvision_weights
from metrics import rsum_line
from text_encoder import TEXT_ENCODERS, CharTokenizer
from utils import (
    PRECISIONS,
    GracefulStop,
    autocast,
    decay,
    int_tuple,
    non_negative_float,
    positive_float,
    positive_int,
    probability,
    resolve_precision,
    retrieval_scores,
    seed_everything,
    settle_device,
    zero_shot_accuracy,
)

# A resumed run takes its settings from its checkpoint, except these, which say where this process runs.
PER_PROCESS_ARGS = ("resume", "run_name", "runs_dir", "device")
# These may differ from the checkpoint's too; any other setting decides what is trained, and resuming
# refuses to change it. A run trained in bf16 on one machine continues in fp32 on one without native bf16.
CHANGEABLE_ARGS = (
    *PER_PROCESS_ARGS,
    "precision",
    "data_dir",
    "cache_dir",
    "log_interval",
    "pretrained_weights",
    "compile",
)
# Image-caption collections read from files (caption_data.py), beside the data sets of labelled images.
TRAINING_DATASETS = (*DATASETS, "captions")


# What each data set's runs take for the settings the command line leaves out: MNIST's, and how
# the others differ. The offline digits are 1,797 images: smaller batches give them enough steps.
# Clothes are mirrored, digits never; a model of clothes then embeds each image as the mean of it and
# its mirror image (test-time augmentation). Fashion-MNIST centres and scales every garment the same
# way, so shifting or scaling them only teaches poses the test never shows (chosen on validation;
# see the README's Fashion-MNIST section).
# A collection of photos is cropped at random and mirrored instead (PhotoAugmentation), at a size a CPU
# trains on, and its captions are sentences, which the transformer reads, up to 128 characters.
MNIST_DEFAULTS = dict(
    epochs=14,
    val_size=5000,
    batch_size=512,
    max_shift=2.0,
    max_rotation=10.0,
    max_scale=0.1,
    flip=False,
    erase=0.0,
    crop_area=1.0,
)
MNIST_DEFAULTS |= dict(
    image_size=28,
    mirror_average=False,
    text_encoder="digit",
    captions="label",
    text_max_length=CLIPConfig.text_max_length,
)
DATASET_DEFAULTS = {
    "mnist": MNIST_DEFAULTS,
    "fashion": MNIST_DEFAULTS
    | {
        "epochs": 18,
        "max_shift": 0.0,
        "max_rotation": 0.0,
        "max_scale": 0.0,
        "flip": True,
        "erase": 0.5,
        "mirror_average": True,
    },
    "digits": MNIST_DEFAULTS | {"val_size": 300, "batch_size": 128},
    "captions": MNIST_DEFAULTS
    | dict(
        epochs=30,
        batch_size=128,
        max_shift=0.0,
        max_rotation=0.0,
        max_scale=0.0,
        flip=True,
        crop_area=0.5,
        image_size=64,
    )
    | dict(val_size=None, text_encoder="transformer", captions=None, text_max_length=128),
}
# An attribute caption states the slant, thickness and width measured on the image as it is:
# rotating it changes the slant and scaling it the other two, so the caption would no longer
# say what the image shows. These take precedence over the data set's defaults.
CAPTION_DEFAULTS = {"attributes": {"max_rotation": 0.0, "max_scale": 0.0}}


def per_dataset(setting: str) -> str:
    """How --help states a default that depends on the data set."""
    return "default: " + ", ".join(
        f"{defaults[setting]} for {dataset}" for dataset, defaults in DATASET_DEFAULTS.items()
    )


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what was saved."""


def parse_args(argv: list[str] | None = None, run_defaults: dict | None = None) -> argparse.Namespace:
    """The command line's settings; `run_defaults` (a resumed run's) replace the built-in defaults."""
    defaults = CLIPConfig()
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--epochs", type=positive_int, default=None, help=f"passes over the training split ({per_dataset('epochs')})"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help=f"image-text pairs per step ({per_dataset('batch_size')})"
    )
    p.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument(
        "--weight-decay",
        type=non_negative_float,
        default=5e-4,
        help="AdamW weight decay on weight matrices and kernels",
    )
    p.add_argument(
        "--ema-decay",
        type=decay,
        default=0.99,
        help="decay of the weights' moving average that is evaluated and saved (0: none)",
    )
    p.add_argument(
        "--max-shift",
        type=non_negative_float,
        default=None,
        help=f"random translation of training images, in pixels ({per_dataset('max_shift')})",
    )
    p.add_argument(
        "--max-rotation",
        type=non_negative_float,
        default=None,
        help=f"random rotation of training images, in degrees ({per_dataset('max_rotation')}; 0 with --captions attributes)",
    )
    p.add_argument(
        "--max-scale",
        type=non_negative_float,
        default=None,
        help=f"random scaling of training images, as a fraction ({per_dataset('max_scale')}; 0 with --captions attributes)",
    )
    p.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"mirror half the training images ({per_dataset('flip')})",
    )
    p.add_argument(
        "--mirror-average",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"embed each image, outside training, as the mean of it and its mirror image ({per_dataset('mirror_average')})",
    )
    p.add_argument(
        "--erase",
        type=probability,
        default=None,
        help=f"share of training images with a random rectangle blanked ({per_dataset('erase')})",
    )
    # Off by default: it lowers MNIST's test accuracy a little (see the README's "People's own handwriting").
    p.add_argument(
        "--stroke",
        type=probability,
        default=0.0,
        help="share of training digits drawn with thicker or thinner strokes, as fingers and mice draw: 0.5 for a model to draw on in demo.py",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of initialisation, data order and augmentation")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="where to train")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16 mixed precision where the hardware runs it natively (CUDA GPUs with bf16, CPUs with AVX512_BF16 or AMX), fp32 elsewhere",
    )
    p.add_argument(
        "--no-amp", dest="precision", action="store_const", const="fp32", help="the same as --precision fp32"
    )
    p.add_argument(
        "--dataset",
        choices=TRAINING_DATASETS,
        default="mnist",
        help="mnist, fashion (Fashion-MNIST), digits (scikit-learn's, offline), or captions: your own captioned photos in --data-dir",
    )
    p.add_argument(
        "--data-dir",
        default="data",
        help="folder that holds (or receives) the data set; for --dataset captions, a JSON index, images/ beside captions/, or Flickr8k",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path("data/cache"),
        help="where --dataset captions keeps its photos, decoded and resized",
    )
    p.add_argument(
        "--val-size",
        type=positive_int,
        default=None,
        help="validation images held out from train (default: 5000 for mnist, 300 for digits; captions: 10%% of the photos)",
    )
    p.add_argument(
        "--image-encoder",
        choices=IMAGE_ENCODERS,
        default=defaults.image_encoder,
        help="resnet: the small ResNet of image_encoder.py; resnet18: torchvision's, for photos",
    )
    p.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="pixels on a side of the photos trained on (default: 64; 28 for MNIST's)",
    )
    p.add_argument(
        "--pretrained-weights",
        type=Path,
        default=None,
        help="a torchvision resnet18 state dict (.pth) to start from; nothing is downloaded",
    )
    p.add_argument(
        "--crop-area",
        type=probability,
        default=None,
        help=f"smallest share of a photo a random crop keeps ({per_dataset('crop_area')})",
    )
    p.add_argument(
        "--image-widths",
        type=int_tuple,
        default=defaults.image_widths,
        help="resnet: channels of the stem and of each downsampling stage",
    )
    p.add_argument(
        "--blocks-per-stage",
        type=positive_int,
        default=defaults.image_blocks_per_stage,
        help="resnet: residual blocks per stage",
    )
    p.add_argument(
        "--embed-dim", type=positive_int, default=defaults.embed_dim, help="size of the shared embedding space"
    )
    p.add_argument(
        "--captions",
        choices=CAPTION_KINDS,
        default=None,
        help="label (default): the digit alone; templates: sentences in English and Chinese; attributes: sentences that also say how it is written",
    )
    p.add_argument(
        "--text-encoder",
        choices=TEXT_ENCODERS,
        default=None,
        help="digit: a table of the captions 0-9 (default); transformer or lstm: read any sentence, character by character (transformer for captions)",
    )
    p.add_argument(
        "--text-max-length",
        type=positive_int,
        default=None,
        help=f"characters read of a caption ({per_dataset('text_max_length')})",
    )
    p.add_argument("--runs-dir", type=Path, default=RUNS_DIR, help="where runs are written")
    p.add_argument("--run-name", default=None, help="name of the run folder (default: dataset and time)")
    p.add_argument("--resume", default=None, help="continue from a last.pt checkpoint, or 'latest'")
    p.add_argument("--log-interval", type=positive_int, default=20, help="steps between loss logs")
    p.add_argument("--dry-run", action="store_true", help="check the pipeline: one epoch of two steps")
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the training model with torch.compile: optional, for GPUs; the first steps compile",
    )
    p.set_defaults(**(run_defaults or {}))
    args = p.parse_args(argv)
    for name, value in (DATASET_DEFAULTS[args.dataset] | CAPTION_DEFAULTS.get(args.captions, {})).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.dataset == "captions":
        if args.captions is not None:
            p.error(
                "--captions makes captions for mnist, fashion and digits: a --dataset captions collection brings its own; leave it out"
            )
        if args.text_encoder == "digit":
            p.error(
                "--text-encoder digit reads only the captions 0-9: a collection's captions need --text-encoder transformer or lstm"
            )
    elif args.text_encoder == "digit" and args.captions != "label":
        p.error(
            f"--text-encoder digit reads only the captions 0-9: with --captions {args.captions} use --text-encoder transformer or lstm"
        )
    elif args.image_size != 28:
        p.error(
            f"--image-size: the images of {args.dataset} are 28 pixels on a side; other sizes are for --dataset captions"
        )
    if args.dataset == "captions" and args.val_size is not None:
        p.error(
            "--val-size: a captions collection holds out 10% of its photos for validation and 10% for test (or uses Flickr8k's own splits)"
        )
    if args.pretrained_weights is not None and args.image_encoder != "resnet18":
        p.error("--pretrained-weights loads torchvision's resnet18: add --image-encoder resnet18")
    settle_device(p, args)
    return args


def new_run_dir(runs_dir: Path, run_name: str | None, dataset: str) -> Path:
    """A fresh run folder: an earlier run is never overwritten."""
    if run_name is not None:
        run_dir = runs_dir / run_name
        if run_dir.exists():
            raise SystemExit(
                f"error: {run_dir} already exists: choose another --run-name, or continue it with --resume {run_dir / 'last.pt'}"
            )
        return run_dir
    stem = f"{dataset}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir, suffix = runs_dir / stem, 1
    while run_dir.exists():
        run_dir, suffix = runs_dir / f"{stem}-{suffix}", suffix + 1
    return run_dir


def model_config(args: argparse.Namespace, texts: list[str], class_captions: tuple[tuple[str, ...], ...]) -> CLIPConfig:
    """The model the settings ask for, its tokenizer built from its training captions (`texts`), and
    each class's captions to classify with (none for a collection of captioned photos)."""
    reads_text = args.text_encoder != "digit"
    return CLIPConfig(
        image_encoder=args.image_encoder,
        image_channels=3 if args.dataset == "captions" else 1,
        image_size=args.image_size,
        image_widths=args.image_widths,
        image_blocks_per_stage=args.blocks_per_stage,
        embed_dim=args.embed_dim,
        image_mirror_average=args.mirror_average,
        text_encoder=args.text_encoder,
        text_characters=CharTokenizer.from_captions(texts, args.text_max_length).characters if reads_text else "",
        text_max_length=args.text_max_length,
        class_captions=class_captions,
    )


def resumed_settings(argv: list[str] | None, args: argparse.Namespace) -> tuple[argparse.Namespace, dict, Path]:
    """For --resume: the run's settings (the checkpoint's, where the command line says nothing else),
    the checkpoint and the run's folder. CheckpointError names any setting that would change what is trained."""
    path = latest_run(args.runs_dir, "last.pt") if args.resume == "latest" else Path(args.resume)
    checkpoint = load_checkpoint(path, args.device, keys=RunState.keys())
    saved = {name: value for name, value in checkpoint["args"].items() if name not in PER_PROCESS_ARGS}
    args = parse_args(argv, run_defaults=saved)  # only what the command line says explicitly can differ now
    conflicts = [
        f"{name} {getattr(args, name)!r} (checkpoint: {value!r})"
        for name, value in saved.items()
        if name not in CHANGEABLE_ARGS and getattr(args, name) != value
    ]
    if conflicts:
        raise CheckpointError(
            f"{path} was trained with other settings: {', '.join(conflicts)}; leave these options out to continue the run as it was"
        )
    args.run_name = path.parent.name
    return args, checkpoint, path.parent


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
    # Decay only weight matrices and kernels, never norms, biases or the temperature.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
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


@dataclass
class TrainingData:
    """What a run trains on, and the splits it is scored on: labelled images (MNIST and its kin),
    scored by zero-shot accuracy, or captioned photos, scored by retrieval."""

    train: CaptionedImages | PhotoPairs  # the images, the captions they are trained with, and draw()
    val: Split | CaptionedPhotos
    test: Split | CaptionedPhotos
    class_captions: tuple[tuple[str, ...], ...]  # each class's captions to classify with; none for photos
    augment: Augmentation | PhotoAugmentation  # how training images are varied, on the device


def load_data(args: argparse.Namespace) -> TrainingData:
    """The data set the settings name, on the training device; SystemExit in one line when it cannot be loaded."""
    try:
        if args.dataset == "captions":
            collection = load_caption_collection(args.data_dir, args.image_size, args.cache_dir)
            print("\n".join(describe(collection)))
            train = PhotoPairs(collection.train.to(args.device), args.device)
            augment = PhotoAugmentation(args.crop_area, args.flip)
            return TrainingData(train, collection.val.to(args.device), collection.test.to(args.device), (), augment)
        splits = load_splits(args.dataset, args.data_dir, args.val_size)
    except DataError as error:
        raise SystemExit(f"error: {error}") from None
    train = splits.train.to(args.device)
    captions = training_captions(args.captions, args.dataset)
    edges = stroke_edges(train) if args.captions == "attributes" else None
    captioned = CaptionedImages(train.images, image_properties(train, edges), captions.to(args.device))
    augment = Augmentation(args.max_shift, args.max_rotation, args.max_scale, args.flip, args.erase, args.stroke)
    return TrainingData(
        captioned, splits.val.to(args.device), splits.test.to(args.device), captions.class_captions(), augment
    )


class NoWriter:
    """The TensorBoard writer of a process other than the main one: the main one writes the logs."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class Loop:
    """What the steps of one training process share, besides the run's state: how and where it runs."""

    args: argparse.Namespace
    precision: str
    run_dir: Path
    epochs: int
    steps_per_epoch: int
    writer: SummaryWriter | NoWriter
    watch: LossWatch
    stop: GracefulStop
    model: nn.Module  # what the step calls: the training model, in DistributedDataParallel among several processes, compiled with --compile
    process: Process

    def stopping(self) -> signal.Signals | None:
        """The signal that stops the run, the same in every process; None while none came."""
        return distributed.agreed_signal(self.stop.received, self.process)


def new_run(
    args: argparse.Namespace, config: CLIPConfig, total_steps: int, process: Process
) -> tuple[RunState, MovingAverage]:
    """A run at step 0: the model, its moving average, AdamW and the one-cycle schedule."""
    device = args.device
    model = CLIP(config).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    average = MovingAverage(model, args.ema_decay)
    state = RunState(
        model=average.model,
        config=config.to_dict(),
        args={
            name: str(value) if isinstance(value, (Path, torch.device)) else value for name, value in vars(args).items()
        },
        step=0,
        epoch=0,
        best_accuracy=-1.0,
        history=[],
        training_model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=args.lr, total_steps=total_steps, pct_start=0.25
        ),
        rng=RandomState(device, args.seed, process),
        epoch_loss_sum=torch.zeros((), device=device),
    )
    return state, average


def train_one_epoch(
    loop: Loop, state: RunState, average: MovingAverage, data: TrainingData, tokens: torch.Tensor
) -> None:
    """Train on epoch `state.epoch` until it ends, or until a signal asks to stop; `tokens` are those of
    every caption of `data.train`. A resumed run skips the steps of this epoch it has trained on already."""
    args, model, pairs = loop.args, state.training_model, data.train
    # The data order depends on (seed, epoch) alone, so a resumed run sees the same batches.
    order = torch.Generator(args.device).manual_seed(args.seed * 100_003 + state.epoch)
    done = state.step - state.epoch * loop.steps_per_epoch
    progress = tqdm(
        islice(shuffled_batches(len(pairs), args.batch_size, order), done, loop.steps_per_epoch),
        initial=done,
        total=loop.steps_per_epoch,
        desc=f"epoch {state.epoch + 1}/{loop.epochs}",
        leave=False,
        disable=not loop.process.is_main,
    )
    loop.model.train()
    for batch in progress:
        mine = distributed.shard(batch, loop.process)  # this process's images of the global batch (all of it in one)
        # A collection too large for memory stays memory-mapped on the CPU: its batch is gathered there.
        images = data.augment(pairs.images[mine.to(pairs.images.device)].to(args.device), state.rng.augment)
        # Every process draws the captions of the whole batch, the same ones: each needs the (B, B) positives.
        captions, positives = pairs.draw(
            batch, state.rng.captions
        )  # one caption per image; (B, B) which describe which
        texts, column = texts_to_encode(
            tokens, distributed.shard(captions, loop.process), avoid_waiting=args.device.type != "cpu"
        )
        with autocast(args.device, loop.precision):
            features = loop.model(normalize(images).contiguous(memory_format=torch.channels_last), texts, features=True)
        loss, logits = batch_loss(*features, column, positives, loop.process)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        model.clamp_logit_scale()
        state.step += 1
        average.update(model, state.step)
        whole_batch_loss = distributed.mean(loss.detach(), loop.process)  # the same in every process
        state.epoch_loss_sum += whole_batch_loss
        loop.watch.update(whole_batch_loss, state.step)
        if state.step % args.log_interval == 0:  # .item() waits for the device: only at log steps
            loop.watch.check(loop.run_dir / "last.pt")
            mine_positives = distributed.shard(positives, loop.process)  # (b, B): this process's images' rows
            batch_accuracy = mine_positives.gather(1, logits.argmax(dim=1, keepdim=True)).float().mean().item()
            progress.set_postfix(loss=f"{whole_batch_loss.item():.4f}", acc=f"{batch_accuracy:.3f}")
            loop.writer.add_scalar("train/loss", whole_batch_loss.item(), state.step)
            loop.writer.add_scalar("train/lr", state.scheduler.get_last_lr()[0], state.step)
            loop.writer.add_scalar("train/logit_scale", model.logit_scale.exp().item(), state.step)
        # Several processes agree on stopping by a message between them, so only at log steps.
        if (state.step % args.log_interval == 0 or not loop.process.is_distributed) and loop.stopping():
            return


def texts_to_encode(
    tokens: torch.Tensor, captions: torch.Tensor, avoid_waiting: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of the captions to encode for a batch that drew `captions` (indices into `tokens`),
    and which of them each image drew. A caption that several images drew is encoded once. Finding
    those (`unique`) makes a GPU's step wait, so with `avoid_waiting`, where the data set has no more
    captions than the batch has images (MNIST's ten), all of them are encoded instead."""
    if avoid_waiting and len(tokens) <= len(captions):
        return tokens, captions
    distinct, column = captions.unique(return_inverse=True)
    return tokens[distinct], column


def batch_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    scale: torch.Tensor,
    column: torch.Tensor,
    positives: torch.Tensor,
    process: Process,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's loss of the batch, and its (b, B) logits of its images against every caption. image_features:
    (b, D), text_features: (T, D) of the captions encoded, column: (b,) which of them each image drew."""
    if process.is_distributed:  # each image's caption, so that every process gathers b of them
        return local_clip_loss(image_features, text_features[column], scale, positives, process)
    # fp32 outside autocast, as CLIP.forward computes logits
    logits = (scale * image_features @ text_features.T)[:, column]
    return clip_loss(logits, positives), logits


def zero_shot_score(model: CLIP, split: Split, precision: str, process: Process) -> float:
    """Zero-shot accuracy on a split of labelled images: each process scores its part, and the parts are averaged."""
    mine = distributed.part(len(split.images), process)
    accuracy = zero_shot_accuracy(model, split.images[mine], split.labels[mine], precision)
    return distributed.mean_of_parts(accuracy, len(split.images[mine]), process)


def validate(loop: Loop, state: RunState, split: Split | CaptionedPhotos, seconds: float) -> None:
    """End the epoch: score the moving average on the validation split, record the epoch, save
    last.pt, and best.pt when the score is the best so far. Labelled images are scored by zero-shot
    accuracy; captioned photos by retrieval, RSum, of which `best_accuracy` keeps the mean recall (RSum / 600)."""
    record = {
        "epoch": state.epoch + 1,
        "step": state.step,
        "train_loss": state.epoch_loss_sum.item() / loop.steps_per_epoch,
        "logit_scale": state.model.logit_scale.exp().item(),
        "seconds": seconds,
        "precision": loop.precision,  # what ran, where --precision auto chose: a resumed run may change machine
    }
    distributed.buffers_from_main(state.model, loop.process)  # every process scores the model that the main one saves
    if isinstance(split, CaptionedPhotos):
        rsum = retrieval_scores(state.model, split, loop.precision, loop.process)["rsum"]
        score, record["val_rsum"], scored = rsum / 600, rsum, f"validation RSum {rsum:.1f}"
        loop.writer.add_scalar("val/rsum", rsum, state.step)
    else:
        score = zero_shot_score(state.model, split, loop.precision, loop.process)
        record["val_accuracy"], scored = score, f"validation accuracy {score:.2%}"
        loop.writer.add_scalar("val/zero_shot_accuracy", score, state.step)
    improved = score > state.best_accuracy
    state.history.append(record)
    state.epoch += 1
    state.epoch_loss_sum = torch.zeros((), device=loop.args.device)  # the next epoch's sum starts from zero
    state.best_accuracy = max(state.best_accuracy, score)
    save(loop, state, "last.pt")
    if improved:
        save(loop, state, "best.pt")
    print(
        f"epoch {state.epoch}/{loop.epochs}: loss {record['train_loss']:.4f}, {scored}{' (best)' if improved else ''}, {seconds:.0f}s"
    )


def save(loop: Loop, state: RunState, name: str) -> None:
    """Save the run as it stands in the run folder; never a run whose loss or weights are not finite.
    Called in every process; the main one writes."""
    last = loop.run_dir / "last.pt"
    loop.watch.check(last)
    if not all_finite(state.training_model.state_dict().values()):
        raise non_finite_error(f"the weights became NaN or infinite by step {state.step}", last)
    checkpoint = state.state_dict()  # in every process: it gathers their random generators
    if loop.process.is_main:
        save_checkpoint(checkpoint, loop.run_dir / name)
    distributed.wait_for_main(loop.process)  # the others may read it next: finish() scores best.pt


def exit_after_signal(loop: Loop, state: RunState, received: signal.Signals) -> NoReturn:
    loop.writer.close()  # flush the TensorBoard logs too
    last = loop.run_dir / "last.pt"
    print(
        f"stopped by {received.name} after step {state.step}, saved in {last}; continue with\n  python train.py --resume {last}",
        file=sys.stderr,
    )
    raise SystemExit(128 + received)  # the shell's convention for a process ended by a signal: 130, 143


def finish(loop: Loop, state: RunState, split: Split | CaptionedPhotos, train_seconds: float) -> dict:
    """Score the epoch that did best on validation (best.pt), once, on the test split."""
    model = load_model(loop.run_dir / "best.pt", loop.args.device)[0]
    results = {"run_dir": loop.run_dir, "best_val_accuracy": state.best_accuracy, "train_seconds": train_seconds}
    if isinstance(split, CaptionedPhotos):
        results["test_retrieval"] = retrieval = retrieval_scores(model, split, loop.precision, loop.process)
        loop.writer.add_scalar("test/rsum", retrieval["rsum"], state.step)
        scored = f"test retrieval ({len(split):,} photos, {len(split.captions):,} captions): {rsum_line(retrieval)}"
    else:
        results["test_accuracy"] = accuracy = zero_shot_score(model, split, loop.precision, loop.process)
        loop.writer.add_scalar("test/zero_shot_accuracy", accuracy, state.step)
        scored = f"test zero-shot accuracy {accuracy:.2%} ({len(split):,} images)"
    loop.writer.close()
    print(f"{scored} with the best validation epoch; training took {train_seconds:.0f}s")
    print(f"next: python inference.py --checkpoint {loop.run_dir / 'best.pt'}")
    return results


def start_from_pretrained(state: RunState, average: MovingAverage, path: Path) -> None:
    """--pretrained-weights: the image encoder of a fresh run starts from the user's torchvision weights."""
    try:
        fresh = load_torchvision_weights(state.training_model.image_encoder, path)
    except WeightsError as error:
        raise SystemExit(f"error: {error}") from None
    average.model.load_state_dict(state.training_model.state_dict())
    print(f"image encoder from {path}; trained from scratch: {', '.join(fresh) or 'nothing'}")


def main(argv: list[str] | None = None) -> dict:
    process = distributed.this_process()
    with GracefulStop(second_stops_at_once=not process.is_distributed) as stop:
        try:
            return run(argv, stop, process)
        finally:
            distributed.leave(process)


def run(argv: list[str] | None, stop: GracefulStop, process: Process) -> dict:
    """Train as the command line says, as `process` of those torchrun started (or the only one); `stop`
    tells the loop when a signal asks it to save and exit."""
    args, checkpoint = parse_args(argv), None
    distributed.start(process, args.device)
    if args.resume is not None:
        args, checkpoint, run_dir = resumed_settings(argv, args)
    else:  # named by the main process: the time in the name may differ between processes
        run_dir = distributed.from_main(
            new_run_dir(args.runs_dir, args.run_name, args.dataset) if process.is_main else None, process
        )
    args.device = distributed.own_device(process, args.device)
    if args.batch_size % process.world_size:
        raise SystemExit(
            f"error: --batch-size {args.batch_size} is split evenly over the {process.world_size} processes: make it a multiple of {process.world_size}"
        )
    precision, why = resolve_precision(args.precision, args.device)
    seed_everything(args.seed)
    with distributed.main_first(process):  # the main process downloads the data set, or fills the cache, for all
        data = load_data(args)

    steps_per_epoch = 2 if args.dry_run else len(data.train) // args.batch_size
    epochs = 1 if args.dry_run else args.epochs
    if steps_per_epoch == 0:
        raise SystemExit(
            f"error: --batch-size {args.batch_size} exceeds the {len(data.train)} training images: lower it"
        )
    # A resumed run is rebuilt from its checkpoint's config, which holds what the model was.
    config = (
        CLIPConfig.from_dict(checkpoint["config"])
        if checkpoint
        else model_config(args, data.train.texts, data.class_captions)
    )
    state, average = new_run(args, config, epochs * steps_per_epoch, process)
    if checkpoint:
        state.load_state_dict(checkpoint)
    elif args.pretrained_weights is not None:
        start_from_pretrained(state, average, args.pretrained_weights)
    tokens = state.training_model.tokenize(data.train.texts).to(args.device)
    model = distributed.wrap(state.training_model, process)
    if args.compile:
        model = torch.compile(model)
    writer = SummaryWriter(str(run_dir)) if process.is_main else NoWriter()
    loop = Loop(args, precision, run_dir, epochs, steps_per_epoch, writer, LossWatch(args.device), stop, model, process)

    print(
        f"{why}; training on {args.device}, {sum(p.numel() for p in state.model.parameters()):,} parameters, run folder {run_dir}"
    )
    if process.is_distributed:
        print(
            f"{process.world_size} processes, each training on {args.batch_size // process.world_size} images of every batch of {args.batch_size}"
        )
    start_time = time.perf_counter()
    while state.epoch < epochs:
        train_one_epoch(loop, state, average, data, tokens)
        if received := loop.stopping():
            save(loop, state, "last.pt")
            exit_after_signal(loop, state, received)
        validate(loop, state, data.val, time.perf_counter() - start_time)
        if received := loop.stopping():  # it came during validation; last.pt is saved already
            exit_after_signal(loop, state, received)
    return finish(loop, state, data.test, time.perf_counter() - start_time)


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, TrainingError) as error:
        raise SystemExit(f"error: {error}") from None
