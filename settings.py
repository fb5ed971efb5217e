"""train.py's settings: its command line over the data set's recipe (recipes.py), or over a resumed run's own.

`read_settings(argv)` is all train.py asks: the settings, and for --resume the checkpoint and the run's folder.
`python train.py --help` lists every flag, with the defaults of the --dataset given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from captions import CAPTION_KINDS
from checkpoint import RUNS_DIR, CheckpointError, RunState, latest_run, load_checkpoint
from clip import CLIPConfig
from hf_text import POOLINGS
from image_encoder import IMAGE_ENCODERS, TOWER_INPUTS
from recipes import RECIPES, recipe
from tasks import TASKS
from text_encoder import TEXT_ENCODERS
from utils import (
    PRECISIONS,
    decay,
    int_tuple,
    non_negative_float,
    positive_float,
    positive_int,
    probability,
    settle_device,
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
RENAMED_DATASETS = {"captions": "photos"}  # the old name of --dataset photos

# Read before the whole command line: they choose the recipe that fills its defaults, or the run to resume.
first_pass = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
for flag in ("--dataset", "--captions", "--resume", "--image-encoder", "--pretrained-weights"):
    first_pass.add_argument(flag)
first_pass.add_argument("--lock-image", action="store_true")
first_pass.add_argument("--runs-dir", type=Path, default=RUNS_DIR)

DESCRIPTION = "Train CLIP: python train.py [--dataset mnist|fashion|digits|photos] [--help]"
EPILOG = """--captions label: the digit alone; templates: sentences in English and Chinese; attributes: sentences
that also say how the digit is written (its slant, thickness and width). --stroke 0.5 trains a model that
reads digits drawn with a finger or a mouse better (demo.py). The defaults shown are the recipe of the
--dataset given (recipes.py)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each default, and the description and epilog as written."""


def read_settings(argv: list[str] | None) -> tuple[argparse.Namespace, dict | None, Path | None]:
    """The run's settings; for --resume also its checkpoint and its folder (else None, None)."""
    if first_pass.parse_known_args(argv)[0].resume is not None:
        return resumed_settings(argv)
    return parse_args(argv), None, None


def parse_args(argv: list[str] | None = None, resumed: dict | None = None) -> argparse.Namespace:
    """The command line's settings over the data set's recipe, or over a resumed run's own settings."""
    resumed = resumed or {}
    first, _ = first_pass.parse_known_args(argv)
    dataset = first.dataset or resumed.get("dataset", "mnist")
    parser = new_parser()
    if dataset in RENAMED_DATASETS:
        parser.error(f"--dataset {dataset} is now called --dataset {RENAMED_DATASETS[dataset]}: use that name")
    if dataset in RECIPES:  # else the parse below names the choices
        captions = first.captions or resumed.get("captions")
        pretrained = first.pretrained_weights or resumed.get("pretrained_weights")
        tower = (first.image_encoder or resumed.get("image_encoder")) if pretrained else None
        locked = first.lock_image or resumed.get("lock_image", False)
        parser.set_defaults(**recipe(dataset, captions, tower, locked=locked))
    parser.set_defaults(**resumed)
    args = parser.parse_args(argv)
    if args.text_pretrained is not None:
        args.text_encoder = "pretrained"
    problem = TASKS[args.dataset].settings_error(args) or pretrained_settings_error(args)
    if problem is not None:
        parser.error(problem)
    settle_device(parser, args)
    return args


def new_parser() -> argparse.ArgumentParser:
    """Every flag of train.py. Those without a default here take the recipe's (recipes.py)."""
    model = CLIPConfig()  # the model's defaults
    p = argparse.ArgumentParser(description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    add = p.add_argument
    add(
        "--dataset",
        choices=tuple(TASKS),
        default="mnist",
        help="fashion: Fashion-MNIST; digits: offline; photos: yours",
    )
    add("--data-dir", default="data", help="where the data set is, or is downloaded to")
    add("--cache-dir", type=Path, default=Path("data/cache"), help="where photos are kept decoded")
    add("--val-size", type=positive_int, help="images held out to validate on")
    add("--epochs", type=positive_int, help="passes over the training split")
    add("--batch-size", type=positive_int, help="pairs per step, over all processes")
    add("--lr", type=positive_float, help="peak of the one-cycle schedule")
    add("--weight-decay", type=non_negative_float, default=5e-4, help="of weight matrices and kernels")
    add("--ema-decay", type=decay, default=0.99, help="of the weights' moving average (0: none)")
    add("--seed", type=int, default=0, help="of initialisation, order and augmentation")
    add("--max-shift", type=non_negative_float, help="random shift, in pixels")
    add("--max-rotation", type=non_negative_float, help="random rotation, in degrees")
    add("--max-scale", type=non_negative_float, help="random scaling, as a fraction")
    add("--flip", action=argparse.BooleanOptionalAction, help="mirror half the training images")
    add("--erase", type=probability, help="share of images with a rectangle blanked")
    add("--crop-area", type=probability, help="smallest share of a photo a crop keeps")
    # Off by default: it lowers MNIST's test accuracy a little (docs/results.md, people's own handwriting).
    add("--stroke", type=probability, default=0.0, help="share of digits drawn thicker or thinner")
    add("--mirror-average", action=argparse.BooleanOptionalAction, help="embed an image with its mirror image")
    add("--image-encoder", choices=IMAGE_ENCODERS, default=model.image_encoder, help="resnet18: torchvision's")
    add("--image-size", type=positive_int, help="pixels on a side of the photos")
    add("--image-widths", type=int_tuple, help="resnet: channels of each stage")
    add("--blocks-per-stage", type=positive_int, default=model.image_blocks_per_stage, help="resnet: blocks per stage")
    add("--pretrained-weights", type=Path, help="ImageNet weights (.pth) of the --image-encoder to start from")
    add("--lock-image", action="store_true", help="freeze the pretrained image tower (LiT); only its projection trains")
    add("--lock-image-unlocked-groups", type=int, default=0, help="with --lock-image: its last stages that still train")
    add("--embed-dim", type=positive_int, default=model.embed_dim, help="size of the shared embedding space")
    add("--captions", choices=CAPTION_KINDS, help="what captions say")
    add("--text-encoder", choices=TEXT_ENCODERS, help="transformer, lstm: read any sentence")
    add("--text-max-length", type=positive_int, help="characters read of a caption")
    add("--text-pretrained", type=Path, help="a Hugging Face model folder to start the text tower from")
    add("--text-pooling", choices=POOLINGS, help="of its tokens (default: as the folder says, else mean)")
    add("--lock-text", action="store_true", help="freeze the pretrained text tower (LiT); only its projection trains")
    add("--lock-text-unlocked-layers", type=int, default=0, help="with --lock-text: its last blocks that still train")
    add("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="where to train")
    add("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 where it runs natively")
    add("--no-amp", dest="precision", action="store_const", const="fp32", help="the same as --precision fp32")
    add("--compile", action="store_true", help="torch.compile the model, for GPUs")
    add("--runs-dir", type=Path, default=RUNS_DIR, help="where runs are written")
    add("--run-name", help="name of the run folder (default: dataset and time)")
    add("--resume", help="continue from a last.pt checkpoint, or 'latest'")
    add("--log-interval", type=positive_int, default=20, help="steps between loss logs")
    add("--dry-run", action="store_true", help="check the pipeline: one epoch of two steps")
    return p


def pretrained_settings_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the settings of pretrained towers, in one line; None when they fit."""
    if args.pretrained_weights is not None and args.image_encoder not in TOWER_INPUTS:
        return f"--pretrained-weights loads a photo tower: add --image-encoder {' or '.join(TOWER_INPUTS)}"
    if args.lock_image and args.pretrained_weights is None:
        return "--lock-image locks a pretrained image tower: add --pretrained-weights FILE"
    if args.text_encoder == "pretrained" and args.text_pretrained is None:
        return "--text-encoder pretrained reads a Hugging Face folder: give it with --text-pretrained FOLDER"
    if args.lock_text and args.text_pretrained is None:
        return "--lock-text locks a pretrained text tower: add --text-pretrained FOLDER"
    if args.text_pooling is not None and args.text_pretrained is None:
        return "--text-pooling pools a pretrained text tower: add --text-pretrained FOLDER"
    return None


def resumed_settings(argv: list[str] | None) -> tuple[argparse.Namespace, dict, Path]:
    """For --resume: the run's settings (the checkpoint's, where the command line says nothing else),
    the checkpoint and the run's folder. CheckpointError names any setting that would change what is trained."""
    first, _ = first_pass.parse_known_args(argv)
    path = latest_run(first.runs_dir, "last.pt") if first.resume == "latest" else Path(first.resume)
    checkpoint = load_checkpoint(path, "cpu", keys=RunState.keys())
    saved = {name: value for name, value in checkpoint["args"].items() if name not in PER_PROCESS_ARGS}
    args = parse_args(argv, resumed=saved)  # only what the command line says explicitly can differ now
    conflicts = [
        f"{name} {getattr(args, name)!r} (checkpoint: {value!r})"
        for name, value in saved.items()
        if name not in CHANGEABLE_ARGS and getattr(args, name) != value
    ]
    if conflicts:
        raise CheckpointError(
            f"{path} was trained with other settings: {', '.join(conflicts)}; "
            "leave these options out to continue the run as it was"
        )
    args.run_name = path.parent.name
    return args, checkpoint, path.parent
