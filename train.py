"""Train CLIP on MNIST: python train.py [--help]

Images and their digit captions are embedded by clip.py's two encoders and
trained with the symmetric InfoNCE loss. Each epoch ends with zero-shot
accuracy on a validation split held out from the training images; best.pt
keeps the epoch that scored best there, and only that model is scored on the
test split. Everything lands in runs/<run-name>/ (TensorBoard logs, last.pt,
best.pt).

What the defaults reach, and how fast on which CPU, is measured by
benchmark.py and listed in the README's Results.

Ctrl-C or SIGTERM ends the current step, saves last.pt and prints the command
that continues the run exactly where it stopped: python train.py --resume
runs/<run-name>/last.pt (or --resume latest).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import NoReturn

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from captions import CAPTION_KINDS, Captions, image_properties, stroke_edges, training_captions
from checkpoint import RUNS_DIR, CheckpointError, RandomState, RunState, latest_run, load_checkpoint, load_model, save_checkpoint
from clip import CLIP, CLIPConfig, clip_loss
from dataset import DATASETS, Augmentation, DataError, Split, load_splits, normalize, shuffled_batches
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
    seed_everything,
    settle_device,
    zero_shot_accuracy,
)

# A resumed run takes its settings from its checkpoint, except these, which say where this process runs.
PER_PROCESS_ARGS = ("resume", "run_name", "runs_dir", "device")
# These may differ from the checkpoint's too; any other setting decides what is trained, and resuming
# refuses to change it. A run trained in bf16 on one machine continues in fp32 on one without native bf16.
CHANGEABLE_ARGS = (*PER_PROCESS_ARGS, "precision", "data_dir", "log_interval")


# What each data set's runs take for the settings the command line leaves out: MNIST's, and how
# the others differ. The offline digits are 1,797 images: smaller batches give them enough steps.
# Clothes are mirrored, digits never. Fashion-MNIST centres and scales every garment the same way,
# so shifting or scaling them only teaches poses the test never shows (chosen on validation; see
# the README's Fashion-MNIST section).
MNIST_DEFAULTS = dict(epochs=14, val_size=5000, batch_size=512, max_shift=2.0, max_rotation=10.0, max_scale=0.1, flip=False, erase=0.0)
DATASET_DEFAULTS = {
    "mnist": MNIST_DEFAULTS,
    "fashion": MNIST_DEFAULTS | {"epochs": 18, "max_shift": 0.0, "max_rotation": 0.0, "max_scale": 0.0, "flip": True, "erase": 0.5},
    "digits": MNIST_DEFAULTS | {"val_size": 300, "batch_size": 128},
}
# An attribute caption states the slant, thickness and width measured on the image as it is:
# rotating it changes the slant and scaling it the other two, so the caption would no longer
# say what the image shows. These take precedence over the data set's defaults.
CAPTION_DEFAULTS = {"attributes": {"max_rotation": 0.0, "max_scale": 0.0}}


def per_dataset(setting: str) -> str:
    """How --help states a default that depends on the data set."""
    return "default: " + ", ".join(f"{DATASET_DEFAULTS[dataset][setting]} for {dataset}" for dataset in DATASET_DEFAULTS)


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what was saved."""


def parse_args(argv: list[str] | None = None, run_defaults: dict | None = None) -> argparse.Namespace:
    """The command line's settings; `run_defaults` (a resumed run's) replace the built-in defaults."""
    defaults = CLIPConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=positive_int, default=None, help=f"passes over the training split ({per_dataset('epochs')})")
    p.add_argument("--batch-size", type=positive_int, default=None, help=f"image-text pairs per step ({per_dataset('batch_size')})")
    p.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--weight-decay", type=non_negative_float, default=5e-4, help="AdamW weight decay on weight matrices and kernels")
    p.add_argument(
        "--ema-decay", type=decay, default=0.99, help="decay of the weights' moving average that is evaluated and saved (0: none)"
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
        "--flip", action=argparse.BooleanOptionalAction, default=None, help=f"mirror half the training images ({per_dataset('flip')})"
    )
    p.add_argument(
        "--erase", type=probability, default=None, help=f"share of training images with a random rectangle blanked ({per_dataset('erase')})"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of initialisation, data order and augmentation")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="where to train")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16 mixed precision where the hardware runs it natively (CUDA GPUs with bf16, CPUs with AVX512_BF16 or AMX), fp32 elsewhere",
    )
    p.add_argument("--no-amp", dest="precision", action="store_const", const="fp32", help="the same as --precision fp32")
    p.add_argument(
        "--dataset", choices=DATASETS, default="mnist", help="mnist, fashion (Fashion-MNIST), or digits (scikit-learn's, offline)"
    )
    p.add_argument("--data-dir", default="data", help="folder that holds (or receives) the data set")
    p.add_argument(
        "--val-size",
        type=positive_int,
        default=None,
        help="validation images held out from train (default: 5000 for mnist, 300 for digits)",
    )
    p.add_argument(
        "--image-widths", type=int_tuple, default=defaults.image_widths, help="channels of the stem and of each downsampling stage"
    )
    p.add_argument("--blocks-per-stage", type=positive_int, default=defaults.image_blocks_per_stage, help="residual blocks per stage")
    p.add_argument("--embed-dim", type=positive_int, default=defaults.embed_dim, help="size of the shared embedding space")
    p.add_argument(
        "--captions",
        choices=CAPTION_KINDS,
        default="label",
        help="label: the digit alone; templates: sentences in English and Chinese; attributes: sentences that also say how it is written",
    )
    p.add_argument(
        "--text-encoder",
        choices=TEXT_ENCODERS,
        default=defaults.text_encoder,
        help="digit: a table of the captions 0-9; transformer or lstm: read any sentence, character by character",
    )
    p.add_argument("--runs-dir", type=Path, default=RUNS_DIR, help="where runs are written")
    p.add_argument("--run-name", default=None, help="name of the run folder (default: dataset and time)")
    p.add_argument("--resume", default=None, help="continue from a last.pt checkpoint, or 'latest'")
    p.add_argument("--log-interval", type=positive_int, default=20, help="steps between loss logs")
    p.add_argument("--dry-run", action="store_true", help="check the pipeline: one epoch of two steps")
    p.set_defaults(**(run_defaults or {}))
    args = p.parse_args(argv)
    for name, value in (DATASET_DEFAULTS[args.dataset] | CAPTION_DEFAULTS.get(args.captions, {})).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.text_encoder == "digit" and args.captions != "label":
        p.error(f"--text-encoder digit reads only the captions 0-9: with --captions {args.captions} use --text-encoder transformer or lstm")
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


def model_config(args: argparse.Namespace, captions: Captions) -> CLIPConfig:
    """The model the settings ask for, its tokenizer built from its training captions, and each digit's captions to classify with."""
    reads_text = args.text_encoder != "digit"
    return CLIPConfig(
        image_widths=args.image_widths,
        image_blocks_per_stage=args.blocks_per_stage,
        embed_dim=args.embed_dim,
        text_encoder=args.text_encoder,
        text_characters=CharTokenizer.from_captions(captions.texts, CLIPConfig.text_max_length).characters if reads_text else "",
        class_captions=captions.class_captions(),
    )


@dataclass
class CaptionedImages:
    """A split's images with the captions they are trained with: each caption's tokens, and each image's
    properties (captions.PROPERTIES), which say which captions describe it."""

    split: Split
    properties: torch.Tensor  # (N, 4)
    captions: Captions
    tokens: torch.Tensor  # (K, ...) the tokens of every caption


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
    saved = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint.is_file() else "no checkpoint was written"
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
class Loop:
    """What the steps of one training process share, besides the run's state: how and where it runs."""

    args: argparse.Namespace
    precision: str
    run_dir: Path
    epochs: int
    steps_per_epoch: int
    writer: SummaryWriter
    watch: LossWatch
    stop: GracefulStop


def new_run(args: argparse.Namespace, config: CLIPConfig, total_steps: int) -> tuple[RunState, MovingAverage]:
    """A run at step 0: the model, its moving average, AdamW and the one-cycle schedule."""
    device = args.device
    model = CLIP(config).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    average = MovingAverage(model, args.ema_decay)
    state = RunState(
        model=average.model,
        config=config.to_dict(),
        args={name: str(value) if isinstance(value, (Path, torch.device)) else value for name, value in vars(args).items()},
        step=0,
        epoch=0,
        best_accuracy=-1.0,
        history=[],
        training_model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total_steps, pct_start=0.25),
        rng=RandomState(device, args.seed),
        epoch_loss_sum=torch.zeros((), device=device),
    )
    return state, average


def train_one_epoch(loop: Loop, state: RunState, average: MovingAverage, data: CaptionedImages) -> None:
    """Train on epoch `state.epoch` until it ends, or until a signal asks to stop. A resumed run skips
    the steps of this epoch it has trained on already."""
    args, model = loop.args, state.training_model
    # The data order depends on (seed, epoch) alone, so a resumed run sees the same batches.
    order = torch.Generator(args.device).manual_seed(args.seed * 100_003 + state.epoch)
    done = state.step - state.epoch * loop.steps_per_epoch
    progress = tqdm(
        islice(shuffled_batches(len(data.split), args.batch_size, order), done, loop.steps_per_epoch),
        initial=done,
        total=loop.steps_per_epoch,
        desc=f"epoch {state.epoch + 1}/{loop.epochs}",
        leave=False,
    )
    augment = Augmentation(args.max_shift, args.max_rotation, args.max_scale, args.flip, args.erase)
    model.train()
    for batch in progress:
        images = augment(data.split.images[batch], state.rng.augment)
        describes = data.captions.describes(data.properties[batch])  # (B, K): which captions describe which image
        captions = torch.multinomial(describes.float(), 1, generator=state.rng.captions)[:, 0]  # one of them per image
        distinct, column = captions.unique(return_inverse=True)  # a caption that several images drew is encoded once
        with autocast(args.device, loop.precision):
            logits = model(normalize(images).contiguous(memory_format=torch.channels_last), data.tokens[distinct])[:, column]
        positives = describes[:, captions]  # (B, B): whether image j's caption describes image i
        loss = clip_loss(logits, positives)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        model.clamp_logit_scale()
        state.step += 1
        average.update(model, state.step)
        state.epoch_loss_sum += loss.detach()
        loop.watch.update(loss.detach(), state.step)
        if state.step % args.log_interval == 0:  # .item() waits for the device: only at log steps
            loop.watch.check(loop.run_dir / "last.pt")
            batch_accuracy = positives.gather(1, logits.argmax(dim=1, keepdim=True)).float().mean().item()
            progress.set_postfix(loss=f"{loss.item():.4f}", acc=f"{batch_accuracy:.3f}")
            loop.writer.add_scalar("train/loss", loss.item(), state.step)
            loop.writer.add_scalar("train/lr", state.scheduler.get_last_lr()[0], state.step)
            loop.writer.add_scalar("train/logit_scale", model.logit_scale.exp().item(), state.step)
        if loop.stop.received:
            return


def validate(loop: Loop, state: RunState, split: Split, seconds: float) -> None:
    """End the epoch: score the moving average on the validation split, record the epoch, save
    last.pt, and best.pt when the accuracy is the best so far."""
    accuracy = zero_shot_accuracy(state.model, split.images, split.labels, loop.precision)
    improved = accuracy > state.best_accuracy
    state.history.append(
        {
            "epoch": state.epoch + 1,
            "step": state.step,
            "train_loss": state.epoch_loss_sum.item() / loop.steps_per_epoch,
            "val_accuracy": accuracy,
            "logit_scale": state.model.logit_scale.exp().item(),
            "seconds": seconds,
            "precision": loop.precision,  # what ran, where --precision auto chose: a resumed run may change machine
        }
    )
    state.epoch += 1
    state.epoch_loss_sum = torch.zeros((), device=loop.args.device)  # the next epoch's sum starts from zero
    state.best_accuracy = max(state.best_accuracy, accuracy)
    loop.writer.add_scalar("val/zero_shot_accuracy", accuracy, state.step)
    save(loop, state, "last.pt")
    if improved:
        save(loop, state, "best.pt")
    print(
        f"epoch {state.epoch}/{loop.epochs}: loss {state.history[-1]['train_loss']:.4f}, validation accuracy {accuracy:.2%}{' (best)' if improved else ''}, {seconds:.0f}s"
    )


def save(loop: Loop, state: RunState, name: str) -> None:
    """Save the run as it stands in the run folder; never a run whose loss or weights are not finite."""
    last = loop.run_dir / "last.pt"
    loop.watch.check(last)
    if not all_finite(state.training_model.state_dict().values()):
        raise non_finite_error(f"the weights became NaN or infinite by step {state.step}", last)
    save_checkpoint(state.state_dict(), loop.run_dir / name)


def exit_after_signal(loop: Loop, state: RunState) -> NoReturn:
    loop.writer.close()  # flush the TensorBoard logs too
    last = loop.run_dir / "last.pt"
    print(
        f"stopped by {loop.stop.received.name} after step {state.step}, saved in {last}; continue with\n  python train.py --resume {last}",
        file=sys.stderr,
    )
    raise SystemExit(loop.stop.exit_code)


def finish(loop: Loop, state: RunState, split: Split, train_seconds: float) -> dict:
    """Score the epoch that did best on validation (best.pt), once, on the test split."""
    model = load_model(loop.run_dir / "best.pt", loop.args.device)[0]
    test_accuracy = zero_shot_accuracy(model, split.images, split.labels, loop.precision)
    loop.writer.add_scalar("test/zero_shot_accuracy", test_accuracy, state.step)
    loop.writer.close()
    print(
        f"test zero-shot accuracy {test_accuracy:.2%} ({len(split):,} images) with the best validation epoch; training took {train_seconds:.0f}s"
    )
    print(f"next: python inference.py --checkpoint {loop.run_dir / 'best.pt'}")
    return {
        "run_dir": loop.run_dir,
        "best_val_accuracy": state.best_accuracy,
        "test_accuracy": test_accuracy,
        "train_seconds": train_seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    with GracefulStop() as stop:
        return run(argv, stop)


def run(argv: list[str] | None, stop: GracefulStop) -> dict:
    """Train as the command line says; `stop` tells the loop when a signal asks it to save and exit."""
    args, checkpoint = parse_args(argv), None
    if args.resume is not None:
        args, checkpoint, run_dir = resumed_settings(argv, args)
    else:
        run_dir = new_run_dir(args.runs_dir, args.run_name, args.dataset)
    precision, why = resolve_precision(args.precision, args.device)
    seed_everything(args.seed)
    try:
        splits = load_splits(args.dataset, args.data_dir, args.val_size)
    except DataError as error:
        raise SystemExit(f"error: {error}") from None
    train_split, val_split, test_split = splits.train.to(args.device), splits.val.to(args.device), splits.test.to(args.device)

    steps_per_epoch = 2 if args.dry_run else len(train_split) // args.batch_size
    epochs = 1 if args.dry_run else args.epochs
    if steps_per_epoch == 0:
        raise SystemExit(f"error: --batch-size {args.batch_size} exceeds the {len(train_split)} training images: lower it")
    captions = training_captions(args.captions, args.dataset)
    # A resumed run is rebuilt from its checkpoint's config, which holds what the model was.
    config = CLIPConfig.from_dict(checkpoint["config"]) if checkpoint else model_config(args, captions)
    state, average = new_run(args, config, epochs * steps_per_epoch)
    if checkpoint:
        state.load_state_dict(checkpoint)
    edges = stroke_edges(train_split) if args.captions == "attributes" else None
    tokens = state.training_model.tokenize(captions.texts).to(args.device)
    train_data = CaptionedImages(train_split, image_properties(train_split, edges), captions, tokens)
    loop = Loop(args, precision, run_dir, epochs, steps_per_epoch, SummaryWriter(str(run_dir)), LossWatch(args.device), stop)

    print(f"{why}; training on {args.device}, {sum(p.numel() for p in state.model.parameters()):,} parameters, run folder {run_dir}")
    start_time = time.perf_counter()
    while state.epoch < epochs:
        train_one_epoch(loop, state, average, train_data)
        if stop.received:
            save(loop, state, "last.pt")
            exit_after_signal(loop, state)
        validate(loop, state, val_split, time.perf_counter() - start_time)
        if stop.received:  # it came during validation; last.pt is saved already
            exit_after_signal(loop, state)
    return finish(loop, state, test_split, time.perf_counter() - start_time)


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, TrainingError) as error:
        raise SystemExit(f"error: {error}") from None
