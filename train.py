"""Train CLIP: python train.py [--dataset mnist|fashion|digits|photos] [--help]

Images and their captions are embedded by clip.py's two encoders and trained with the symmetric
InfoNCE loss. Each epoch ends with a score on a validation split held out from the training data
(zero-shot accuracy for labelled images, retrieval RSum for a photo collection: tasks.py); best.pt
keeps the epoch that scored best there, and only that model is scored on the test split. Everything
lands in runs/<run-name>/ (TensorBoard logs, last.pt, best.pt). Each data set's defaults are its
recipe (recipes.py) and its command line is read by settings.py: `python train.py --dataset fashion --help`
shows Fashion-MNIST's.

Ctrl-C or SIGTERM ends the current step, saves last.pt and prints the command that continues the run
exactly where it stopped: python train.py --resume runs/<run-name>/last.pt (or --resume latest).

torchrun --nproc_per_node N train.py ... trains one model on N processes (GPUs, or CPUs), each on its
share of every batch; --batch-size stays the whole batch (distributed.py).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
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
from checkpoint import CheckpointError, RandomState, RunState, load_model, save_checkpoint
from clip import CLIP, CLIPConfig, clip_loss
from dataset import model_input, shuffled_batches
from distributed import Process, local_clip_loss
from feature_cache import locked_features
from hf_text import PretrainedError, read_folder
from image_encoder import WeightsError, load_pretrained_weights
from settings import read_settings
from tasks import TASKS, Task
from text_encoder import CharTokenizer
from training import LossWatch, MovingAverage, NoWriter, TrainingError, all_finite, non_finite_error, param_groups
from utils import GracefulStop, autocast, resolve_precision, seed_everything


def new_run_dir(runs_dir: Path, run_name: str | None, dataset: str) -> Path:
    """A fresh run folder: an earlier run is never overwritten."""
    if run_name is not None:
        run_dir = runs_dir / run_name
        if run_dir.exists():
            raise SystemExit(
                f"error: {run_dir} already exists: choose another --run-name, "
                f"or continue it with --resume {run_dir / 'last.pt'}"
            )
        return run_dir
    stem = f"{dataset}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir, suffix = runs_dir / stem, 1
    while run_dir.exists():
        run_dir, suffix = runs_dir / f"{stem}-{suffix}", suffix + 1
    return run_dir


def model_config(args: argparse.Namespace, task: Task) -> CLIPConfig:
    """The model the settings ask for, for the images of `task`, its tokenizer built from its training
    captions, and each class's captions to classify with (none for a collection of captioned photos)."""
    reads_characters = args.text_encoder in ("transformer", "lstm")
    characters = (
        CharTokenizer.from_captions(task.train.texts, args.text_max_length).characters if reads_characters else ""
    )
    pretrained = read_folder(args.text_pretrained, args.text_pooling) if args.text_encoder == "pretrained" else None
    return CLIPConfig(
        image_encoder=args.image_encoder,
        image_channels=task.image_channels,
        image_size=args.image_size,
        image_widths=args.image_widths,
        image_blocks_per_stage=args.blocks_per_stage,
        embed_dim=args.embed_dim,
        image_mirror_average=args.mirror_average,
        text_encoder=args.text_encoder,
        text_characters=characters,
        text_max_length=args.text_max_length,
        text_model=pretrained,
        class_captions=task.class_captions,
    )


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
    # What the step calls: the training model, in DistributedDataParallel among several processes, or compiled.
    model: nn.Module
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
    try:
        if args.lock_image:
            model.lock("image", args.lock_image_unlocked_groups)
        if args.lock_text:
            model.lock("text", args.lock_text_unlocked_layers)
    except ValueError as error:
        raise SystemExit(f"error: {error}: lower --lock-image-unlocked-groups or --lock-text-unlocked-layers") from None
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    # A quarter of the steps warm up. OneCycleLR divides by the warm-up's steps less one, zero where the warm-up is
    # a single step (a run of four: the digits' 1,137 images in batches of 256, one epoch): such a run warms up twice
    # as long.
    warm_up = 0.25
    average = MovingAverage(model, args.ema_decay)
    state = RunState(
        model=average.model,
        config=config.to_dict(),
        args={
            name: str(value) if isinstance(value, (Path, torch.device)) else value for name, value in vars(args).items()
        },
        step=0,
        epoch=0,
        best_score=-1.0,
        score_name=TASKS[args.dataset].score_name,
        history=[],
        training_model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=args.lr,
            total_steps=total_steps,
            pct_start=warm_up if warm_up * total_steps != 1 else 2 * warm_up,
        ),
        rng=RandomState(device, args.seed, process),
        epoch_loss_sum=torch.zeros((), device=device),
    )
    return state, average


def train_one_epoch(loop: Loop, state: RunState, average: MovingAverage, task: Task, tokens: torch.Tensor) -> None:
    """Train on epoch `state.epoch` until it ends, or until a signal asks to stop; `tokens` are those of
    every caption of `task.train`. A resumed run skips the steps of this epoch it has trained on already."""
    args, model, pairs = loop.args, state.training_model, task.train
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
        images = task.augment(pairs.images[mine.to(pairs.images.device)].to(args.device), state.rng.augment)
        # Every process draws the captions of the whole batch, the same ones: each needs the (B, B) positives.
        captions, positives = pairs.draw(batch, state.rng.captions)  # (B,) a caption each; (B, B) which describe which
        texts, column = texts_to_encode(
            tokens, distributed.shard(captions, loop.process), avoid_waiting=args.device.type != "cpu"
        )
        with autocast(args.device, loop.precision):
            features = loop.model(model_input(images), texts, features=True)
        loss, hits = batch_loss(*features, column, positives, loop.process)
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
            batch_accuracy = hits.float().mean().item()
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
    """This process's loss of the batch, and for each of its images whether the caption it scores highest
    describes it. image_features: (b, D), text_features: (T, D) of the captions encoded, column: (b,) which of
    them each image drew, positives: (B, B) whether image j's caption describes image i."""
    if process.is_distributed:  # each image's caption, so that every process gathers b of them
        loss, logits = local_clip_loss(image_features, text_features[column], scale, positives, process)
        return loss, distributed.shard(positives, process).gather(1, logits.argmax(dim=1, keepdim=True))
    # (T,) how many images drew each caption; torch.bincount would wait for a GPU to learn its output's size.
    drawn = torch.zeros(len(text_features), dtype=column.dtype, device=column.device)
    drawn.scatter_add_(0, column, torch.ones_like(column))
    # Images that drew the same caption have the same column of positives: one of them stands for it (an
    # undrawn caption, drawn 0 times, takes any).
    one_each = torch.zeros_like(drawn).scatter_(0, column, torch.arange(len(column), device=column.device))
    described = positives[:, one_each]  # (B, T): whether caption t describes image i
    logits = scale * image_features @ text_features.T  # fp32 outside autocast, as CLIP.forward computes logits
    best = (logits + drawn.log()).argmax(dim=1, keepdim=True)  # the highest-scoring caption that was drawn
    return clip_loss(logits, described, drawn), described.gather(1, best)


def validate(loop: Loop, state: RunState, task: Task, seconds: float) -> None:
    """End the epoch: score the moving average on the validation split, record the epoch, save
    last.pt, and best.pt when the score is the best so far."""
    distributed.buffers_from_main(state.model, loop.process)  # every process scores the model that the main one saves
    score = task.score(state.model, task.val, loop.precision, loop.process)
    record = {
        "epoch": state.epoch + 1,
        "step": state.step,
        "train_loss": state.epoch_loss_sum.item() / loop.steps_per_epoch,
        f"val_{task.score_name}": score,
        "logit_scale": state.model.logit_scale.exp().item(),
        "seconds": seconds,
        "precision": loop.precision,  # what ran, where --precision auto chose: a resumed run may change machine
    }
    loop.writer.add_scalar(f"val/{task.score_tag}", score, state.step)
    improved = score > state.best_score
    state.history.append(record)
    state.epoch += 1
    state.epoch_loss_sum = torch.zeros((), device=loop.args.device)  # the next epoch's sum starts from zero
    state.best_score = max(state.best_score, score)
    save(loop, state, "last.pt")
    if improved:
        save(loop, state, "best.pt")
    scored = f"{task.describe_score(score)}{' (best)' if improved else ''}"
    print(f"epoch {state.epoch}/{loop.epochs}: loss {record['train_loss']:.4f}, {scored}, {seconds:.0f}s")


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
        f"stopped by {received.name} after step {state.step}, saved in {last}; "
        f"continue with\n  python train.py --resume {last}",
        file=sys.stderr,
    )
    raise SystemExit(128 + received)  # the shell's convention for a process ended by a signal: 130, 143


def finish(loop: Loop, state: RunState, task: Task, train_seconds: float) -> dict:
    """Score the epoch that did best on validation (best.pt), once, on the test split; the results also go
    to the run folder's results.json."""
    model = load_model(loop.run_dir / "best.pt", loop.args.device)[0]
    scores, headline, scored = task.test_results(model, loop.precision, loop.process)
    loop.writer.add_scalar(f"test/{task.score_tag}", headline, state.step)
    loop.writer.close()
    results = {"best_val_score": state.best_score, "score_name": task.score_name, "train_seconds": train_seconds}
    results |= scores
    if loop.process.is_main:
        (loop.run_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"{scored} with the best validation epoch; training took {train_seconds:.0f}s")
    print(f"next: python inference.py --checkpoint {loop.run_dir / 'best.pt'}")
    return {"run_dir": loop.run_dir} | results


def unvaried(features: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The augmentation of cached features, which nothing varies."""
    return features


def start_from_pretrained(state: RunState, average: MovingAverage, args: argparse.Namespace) -> None:
    """A fresh run's towers start from the user's pretrained weights, where given: torchvision's for the
    image tower (--pretrained-weights), a Hugging Face folder's for the text tower (--text-pretrained)."""
    model = state.training_model
    if args.pretrained_weights is not None:
        try:
            fresh = load_pretrained_weights(model.image_encoder, args.image_encoder, args.pretrained_weights)
        except WeightsError as error:
            raise SystemExit(f"error: {error}") from None
        print(f"image encoder from {args.pretrained_weights}; trained from scratch: {', '.join(fresh)}")
    if args.text_pretrained is not None:
        model.text_encoder.load_folder_weights(args.text_pretrained)
        print(f"text encoder from {args.text_pretrained}, {model.config.text_model['pooling']} pooling")
    average.model.load_state_dict(model.state_dict())


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
    args, checkpoint, run_dir = read_settings(argv)
    distributed.start(process, args.device)
    if checkpoint is None:  # named by the main process: the time in the name may differ between processes
        run_dir = distributed.from_main(
            new_run_dir(args.runs_dir, args.run_name, args.dataset) if process.is_main else None, process
        )
    args.device = distributed.own_device(process, args.device)
    if args.batch_size % process.world_size:
        raise SystemExit(
            f"error: --batch-size {args.batch_size} is split evenly over the {process.world_size} processes: "
            f"make it a multiple of {process.world_size}"
        )
    precision, why = resolve_precision(args.precision, args.device)
    seed_everything(args.seed)
    with distributed.main_first(process):  # the main process downloads the data set, or fills the cache, for all
        task = TASKS[args.dataset](args)

    steps_per_epoch = 2 if args.dry_run else len(task.train) // args.batch_size
    epochs = 1 if args.dry_run else args.epochs
    if steps_per_epoch == 0:
        raise SystemExit(
            f"error: --batch-size {args.batch_size} exceeds the {len(task.train)} training images: lower it"
        )
    # A resumed run is rebuilt from its checkpoint's config, which holds what the model was.
    config = CLIPConfig.from_dict(checkpoint["config"]) if checkpoint else model_config(args, task)
    state, average = new_run(args, config, epochs * steps_per_epoch, process)
    if checkpoint:
        state.load_state_dict(checkpoint)
    else:
        start_from_pretrained(state, average, args)
    if args.lock_image and args.lock_image_unlocked_groups == 0 and not task.augment.varies:
        # Every epoch would give each photo the same features: the projection trains and is scored on them, cached.
        for split in (task.train, task.val, task.test):
            split.images = locked_features(state.training_model, split.images, precision, args.cache_dir)
        task.augment = unvaried
    tokens = state.training_model.tokenize(task.train.texts).to(args.device)
    if args.lock_text and args.lock_text_unlocked_layers == 0:  # so do the captions of a locked text tower
        tokens = state.training_model.text_encoder.pooled_features(tokens)
    model = distributed.wrap(state.training_model, process)
    if args.compile:
        model = torch.compile(model)
    writer = SummaryWriter(str(run_dir)) if process.is_main else NoWriter()
    loop = Loop(args, precision, run_dir, epochs, steps_per_epoch, writer, LossWatch(args.device), stop, model, process)

    parameters = sum(p.numel() for p in state.model.parameters())
    trained = sum(p.numel() for p in state.training_model.parameters() if p.requires_grad)
    locked = f" ({parameters - trained:,} of them locked)" if trained < parameters else ""
    print(f"{why}; training on {args.device}, {parameters:,} parameters{locked}, run folder {run_dir}")
    if process.is_distributed:
        share = args.batch_size // process.world_size
        print(f"{process.world_size} processes, each training on {share} images of every batch of {args.batch_size}")
    start_time = time.perf_counter()
    while state.epoch < epochs:
        train_one_epoch(loop, state, average, task, tokens)
        if received := loop.stopping():
            save(loop, state, "last.pt")
            exit_after_signal(loop, state, received)
        validate(loop, state, task, time.perf_counter() - start_time)
        if received := loop.stopping():  # it came during validation; last.pt is saved already
            exit_after_signal(loop, state, received)
    return finish(loop, state, task, time.perf_counter() - start_time)


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, TrainingError, PretrainedError) as error:
        raise SystemExit(f"error: {error}") from None
