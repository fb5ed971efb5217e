"""Train CLIP on MNIST: python train.py [--help]

Images and their digit captions are embedded by clip.py's two encoders and
trained with the symmetric InfoNCE loss. Each epoch ends with zero-shot
accuracy on a validation split held out from the training images; best.pt
keeps the epoch that scored best there, and only that model is scored on the
test split. Everything lands in runs/<run-name>/ (TensorBoard logs, last.pt,
best.pt).

The defaults reach 99.62% zero-shot accuracy on MNIST's test split (mean of
three seeds) in 189 s of training on a 2-core CPU; `--epochs 1 --batch-size 128
--lr 5e-3` reaches 99.15% in 14 s (python benchmark.py, README's results).

Ctrl-C or SIGTERM ends the current step, saves last.pt and prints the command
that continues the run exactly where it stopped: python train.py --resume
runs/<run-name>/last.pt (or --resume latest).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import NoReturn

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from clip import CLIP, CLIPConfig, clip_loss
from dataset import DATASETS, DataError, batches, load_splits, normalize, random_affine
from utils import (
    PRECISIONS,
    RUNS_DIR,
    CheckpointError,
    GracefulStop,
    autocast,
    latest_run,
    load_checkpoint,
    pick_device,
    resolve_precision,
    save_checkpoint,
    seed_everything,
    zero_shot_accuracy,
)

# A resumed run takes its settings from its checkpoint, except these, which say where this process runs.
PER_PROCESS_ARGS = ("resume", "run_name", "runs_dir", "device")
# Settings that decide what is trained: resuming refuses other values (and compares the model config too).
# The others (--precision, --data-dir, --log-interval) may change: a run trained in bf16 on one machine
# continues in fp32 on a machine without native bf16.
RUN_ARGS = (
    "dataset",
    "val_size",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "ema_decay",
    "max_shift",
    "max_rotation",
    "max_scale",
    "seed",
    "dry_run",
)
# What --resume needs from a checkpoint, besides loading safely.
RESUME_KEYS = (
    "model",
    "training_model",
    "optimizer",
    "scheduler",
    "config",
    "args",
    "step",
    "epoch",
    "best_accuracy",
    "history",
    "rng",
    "epoch_loss_sum",
)


# The offline digits are 1,797 images: smaller batches give them enough steps.
DATASET_DEFAULTS = {"mnist": {"val_size": 5000, "batch_size": 512}, "digits": {"val_size": 300, "batch_size": 128}}


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what was saved."""


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def int_tuple(text: str) -> tuple[int, ...]:
    try:
        values = tuple(positive_int(part) for part in text.split(","))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers such as 16,32,64, got {text}") from None
    return values


def parse_args(argv: list[str] | None = None, run_defaults: dict | None = None) -> argparse.Namespace:
    """The command line's settings; `run_defaults` (a resumed run's) replace the built-in defaults."""
    defaults = CLIPConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=positive_int, default=16, help="passes over the training split")
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help="image-text pairs per step (default: 512 for mnist, 128 for digits)"
    )
    p.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="AdamW weight decay on weight matrices and kernels")
    p.add_argument(
        "--ema-decay", type=float, default=0.99, help="decay of the weights' moving average that is evaluated and saved (0: none)"
    )
    p.add_argument("--max-shift", type=float, default=2.0, help="random translation of training images, in pixels")
    p.add_argument("--max-rotation", type=float, default=10.0, help="random rotation of training images, in degrees")
    p.add_argument("--max-scale", type=float, default=0.1, help="random scaling of training images, as a fraction")
    p.add_argument("--seed", type=int, default=0, help="random seed of initialisation, data order and augmentation")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="where to train")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16 mixed precision where the hardware runs it natively (CUDA GPUs with bf16, CPUs with AVX512_BF16 or AMX), fp32 elsewhere",
    )
    p.add_argument("--no-amp", dest="precision", action="store_const", const="fp32", help="the same as --precision fp32")
    p.add_argument("--dataset", choices=DATASETS, default="mnist", help="mnist, or digits (scikit-learn's, offline)")
    p.add_argument("--data-dir", default="data", help="folder that holds (or receives) MNIST")
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
    p.add_argument("--runs-dir", type=Path, default=RUNS_DIR, help="where runs are written")
    p.add_argument("--run-name", default=None, help="name of the run folder (default: dataset and time)")
    p.add_argument("--resume", default=None, help="continue from a last.pt checkpoint, or 'latest'")
    p.add_argument("--log-interval", type=positive_int, default=20, help="steps between loss logs")
    p.add_argument("--dry-run", action="store_true", help="check the pipeline: one epoch of two steps")
    p.set_defaults(**(run_defaults or {}))
    args = p.parse_args(argv)
    for flag in ("max_shift", "max_rotation", "max_scale"):
        if getattr(args, flag) < 0:
            p.error(f"argument --{flag.replace('_', '-')}: must be zero or positive, got {getattr(args, flag)}")
    for name, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        args.device = pick_device(args.device)
        resolve_precision(args.precision, args.device)  # refuses what the device cannot run, with the usage line
    except ValueError as error:
        p.error(str(error))
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


def model_config(args: argparse.Namespace) -> CLIPConfig:
    return CLIPConfig(image_widths=args.image_widths, image_blocks_per_stage=args.blocks_per_stage, embed_dim=args.embed_dim)


def resume_conflicts(args: argparse.Namespace, state: dict) -> list[str]:
    """The settings in `args` that differ from those the checkpoint `state` was trained with."""
    saved_args, saved_config = state["args"], CLIPConfig.from_dict(state["config"]).to_dict()
    conflicts = [
        f"{name} {getattr(args, name)!r} (checkpoint: {saved_args.get(name)!r})"
        for name in RUN_ARGS
        if getattr(args, name) != saved_args.get(name)
    ]
    conflicts += [
        f"{name} {value!r} (checkpoint: {saved_config[name]!r})"
        for name, value in model_config(args).to_dict().items()
        if value != saved_config[name]
    ]
    return conflicts


def rng_states(augment_generator: torch.Generator, device: torch.device) -> dict:
    """The random generators' states as uint8 tensors, which `weights_only` loading accepts. Nothing
    draws from torch's global generators while training today; saving them keeps resuming exact if
    something (dropout, say) starts to."""
    states = {"device": device.type, "augment": augment_generator.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict, augment_generator: torch.Generator, device: torch.device) -> None:
    if states["device"] != device.type:  # another kind of generator: its state does not carry over
        print(f"note: the run was trained on {states['device']}; on {device.type} its data order and augmentation continue differently")
        return
    augment_generator.set_state(states["augment"].cpu())  # loading moved the states onto the device
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)


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
    The step count is a Python int, so an update never waits for the GPU."""

    def __init__(self, model: CLIP, decay: float):
        self.model = copy.deepcopy(model)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: CLIP) -> None:
        self.updates += 1
        weight = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for averaged, current in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if averaged.is_floating_point():
                averaged.lerp_(current, 1 - weight)
            else:  # batch norm's step counter
                averaged.copy_(current)


def main(argv: list[str] | None = None) -> dict:
    with GracefulStop() as stop:
        return run(argv, stop)


def run(argv: list[str] | None, stop: GracefulStop) -> dict:
    """Train as the command line says; `stop` tells the loop when a signal asks it to save and exit."""
    args = parse_args(argv)
    resume_state = None
    if args.resume is not None:
        resume_path = latest_run(args.runs_dir, "last.pt") if args.resume == "latest" else Path(args.resume)
        resume_state = load_checkpoint(resume_path, args.device, keys=RESUME_KEYS)
        saved = {name: value for name, value in resume_state["args"].items() if name not in PER_PROCESS_ARGS}
        args = parse_args(argv, run_defaults=saved)  # only what the command line says explicitly can differ now
        conflicts = resume_conflicts(args, resume_state)
        if conflicts:
            raise CheckpointError(
                f"{resume_path} was trained with other settings: {', '.join(conflicts)}; leave these options out to continue the run as it was"
            )
        args.run_name = resume_path.parent.name
        run_dir = resume_path.parent
    else:
        run_dir = new_run_dir(args.runs_dir, args.run_name, args.dataset)
    device = args.device
    precision, why = resolve_precision(args.precision, device)
    seed_everything(args.seed)

    try:
        splits = load_splits(args.dataset, args.data_dir, args.val_size)
    except DataError as error:
        raise SystemExit(f"error: {error}") from None
    train_split, val_split, test_split = splits.train.to(device), splits.val.to(device), splits.test.to(device)

    config = model_config(args)
    model = CLIP(config).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    ema = MovingAverage(model, args.ema_decay)
    steps_per_epoch = 2 if args.dry_run else len(train_split) // args.batch_size
    epochs = 1 if args.dry_run else args.epochs
    if steps_per_epoch == 0:
        raise SystemExit(f"error: --batch-size {args.batch_size} exceeds the {len(train_split)} training images: lower it")
    total_steps = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total_steps, pct_start=0.25)

    step, start_epoch, best_accuracy, history = 0, 0, -1.0, []
    augment_generator = torch.Generator(device).manual_seed(args.seed)
    loss_sum = torch.zeros((), device=device)  # of the current epoch's steps, summed on the device
    if resume_state is not None:
        model.load_state_dict(resume_state["training_model"])
        ema.model.load_state_dict(resume_state["model"])
        ema.updates = resume_state["step"]
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        step, start_epoch = resume_state["step"], resume_state["epoch"]
        best_accuracy, history, loss_sum = resume_state["best_accuracy"], resume_state["history"], resume_state["epoch_loss_sum"]
        restore_rng_states(resume_state["rng"], augment_generator, device)
    loss_watch = LossWatch(device)

    def checkpoint(path: Path, epochs_done: int) -> None:
        """Save the run as it stands after `step` steps, `epochs_done` of them complete epochs."""
        loss_watch.check(run_dir / "last.pt")
        if not all_finite(model.state_dict().values()):
            raise non_finite_error(f"the weights became NaN or infinite by step {step}", run_dir / "last.pt")
        save_checkpoint(
            {
                "model": ema.model.state_dict(),  # the weights to evaluate and use
                "training_model": model.state_dict(),  # the weights the optimizer steps
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "config": config.to_dict(),
                "args": {k: str(v) if isinstance(v, (Path, torch.device)) else v for k, v in vars(args).items()},
                "dataset": args.dataset,
                "step": step,
                "epoch": epochs_done,
                "best_accuracy": best_accuracy,
                "history": history,
                "rng": rng_states(augment_generator, device),
                "epoch_loss_sum": loss_sum,
            },
            path,
        )

    def exit_after_signal() -> NoReturn:
        writer.close()  # flush the TensorBoard logs too
        print(
            f"stopped by {stop.received.name} after step {step}, saved in {run_dir / 'last.pt'}; continue with\n"
            f"  python train.py --resume {run_dir / 'last.pt'}",
            file=sys.stderr,
        )
        raise SystemExit(stop.exit_code)

    writer = SummaryWriter(str(run_dir))
    print(f"{why}; training on {device}, {sum(p.numel() for p in model.parameters()):,} parameters, run folder {run_dir}")
    class_tokens = model.class_tokens(device)
    start_time = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        model.train()
        # The data order depends on (seed, epoch) alone, so a resumed run sees the same batches,
        # and skips those of this epoch it has trained on already.
        order_generator = torch.Generator(device).manual_seed(args.seed * 100_003 + epoch)
        done = step - epoch * steps_per_epoch
        progress = tqdm(
            islice(batches(train_split, args.batch_size, order_generator), done, steps_per_epoch),
            initial=done,
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{epochs}",
            leave=False,
        )
        for images, labels in progress:
            images = normalize(random_affine(images, args.max_shift, args.max_rotation, args.max_scale, augment_generator)).contiguous(
                memory_format=torch.channels_last
            )
            with autocast(device, precision):
                logits = model(images, class_tokens[labels])
            loss = clip_loss(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            model.clamp_logit_scale()
            ema.update(model)
            loss_sum += loss.detach()
            step += 1
            loss_watch.update(loss.detach(), step)
            if step % args.log_interval == 0:  # .item() waits for the device: only at log steps
                loss_watch.check(run_dir / "last.pt")
                batch_accuracy = (labels[logits.argmax(dim=1)] == labels).float().mean().item()
                progress.set_postfix(loss=f"{loss.item():.4f}", acc=f"{batch_accuracy:.3f}")
                writer.add_scalar("train/loss", loss.item(), step)
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
                writer.add_scalar("train/logit_scale", model.logit_scale.exp().item(), step)
            if stop.received:
                checkpoint(run_dir / "last.pt", epoch)
                exit_after_signal()

        val_accuracy = zero_shot_accuracy(ema.model, val_split.images, val_split.labels, precision)
        history.append(
            {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": loss_sum.item() / steps_per_epoch,
                "val_accuracy": val_accuracy,
                "logit_scale": ema.model.logit_scale.exp().item(),
                "seconds": time.perf_counter() - start_time,
                "precision": precision,  # what ran, where --precision auto chose: a resumed run may change machine
            }
        )
        loss_sum = torch.zeros((), device=device)  # the next epoch's sum starts from zero
        writer.add_scalar("val/zero_shot_accuracy", val_accuracy, step)
        improved = val_accuracy > best_accuracy
        best_accuracy = max(best_accuracy, val_accuracy)
        checkpoint(run_dir / "last.pt", epoch + 1)
        if improved:
            checkpoint(run_dir / "best.pt", epoch + 1)
        print(
            f"epoch {epoch + 1}/{epochs}: loss {history[-1]['train_loss']:.4f}, validation accuracy {val_accuracy:.2%}{' (best)' if improved else ''}, {history[-1]['seconds']:.0f}s"
        )
        if stop.received:  # it came during validation; last.pt is saved already
            exit_after_signal()

    train_seconds = time.perf_counter() - start_time
    model.load_state_dict(load_checkpoint(run_dir / "best.pt", device)["model"])
    test_accuracy = zero_shot_accuracy(model, test_split.images, test_split.labels, precision)
    writer.add_scalar("test/zero_shot_accuracy", test_accuracy, step)
    writer.close()
    print(
        f"test zero-shot accuracy {test_accuracy:.2%} ({len(test_split):,} images) with the best validation epoch; training took {train_seconds:.0f}s"
    )
    print(f"next: python inference.py --checkpoint {run_dir / 'best.pt'}")
    return {"run_dir": run_dir, "best_val_accuracy": best_accuracy, "test_accuracy": test_accuracy, "train_seconds": train_seconds}


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, TrainingError) as error:
        raise SystemExit(f"error: {error}") from None
