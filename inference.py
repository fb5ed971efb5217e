"""Use a trained CLIP: zero-shot digit classification and image retrieval.

python inference.py                      # newest run's best.pt, test image 0
python inference.py --index 42 --text 7  # another query image; the nearest images to the caption "7"
python inference.py --text "a thick seven"  # any sentence, for a model trained with --text-encoder transformer or lstm
python inference.py --image cat.png --labels cat,dog --template "a photo of a {}"  # your own classes and prompt
python inference.py --image my_digit.png # your own pictures, dark ink on light paper or the reverse
python inference.py --evaluate           # every metric and figure on the full test split
python inference.py --evaluate --split val  # the same on the validation split, for choices the test split must not make

A model trained on a collection of captioned photos (train.py --dataset photos) has no classes:
--index and --image rank the test split's captions for a photo, --text ranks its photos for a caption,
and --evaluate measures retrieval both ways (recall@1/5/10, ranks, RSum).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from checkpoint import CheckpointError, latest_run, load_model
from dataset import DATASETS, DataError
from tasks import TASKS
from text_encoder import TextError
from utils import (
    PRECISIONS,
    resolve_precision,
    settle_device,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint to load (default: the newest runs/*/best.pt)"
    )
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where to look for the newest run")
    p.add_argument("--dataset", choices=DATASETS, default=None, help="test data (default: the checkpoint's)")
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder that holds (or receives) the data set (default: the one the model was trained on)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where a photo collection is cached (default: the run's)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="where to run")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16 where the hardware runs it natively, fp32 elsewhere (as train.py)",
    )
    p.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="the images to classify and retrieve from: test, or the validation split",
    )
    p.add_argument("--index", type=int, default=0, help="image of the split to classify and to query with")
    p.add_argument("--image", type=Path, nargs="+", default=None, help="your own image files to classify instead")
    p.add_argument(
        "--text",
        default=None,
        help='also show the images nearest to this caption: "0".."9", or any sentence for a model that reads them',
    )
    p.add_argument(
        "--labels",
        default=None,
        help="classify as these classes instead: comma-separated names, or a UTF-8 file of one name per line",
    )
    p.add_argument("--template", default="{}", help='the caption made of each of --labels, such as "a photo of a {}"')
    p.add_argument(
        "--output-dir", type=Path, default=None, help="where figures go (default: the checkpoint's run folder)"
    )
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="measure the whole split: metrics.json (metrics_val.json), figures in evaluation/ (evaluation_val/)",
    )
    args = p.parse_args(argv)
    settle_device(p, args)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    checkpoint = args.checkpoint or latest_run(args.runs_dir, "best.pt")
    model, state = load_model(checkpoint, args.device)
    precision, why = resolve_precision(args.precision, args.device)
    task = TASKS[state["args"]["dataset"]]  # what the model was trained on says what it can show
    print(f"loaded {checkpoint} (epoch {state['epoch']}, {task.describe_score(state['best_score'])}); {why}")
    return task.infer(model, state, args, precision, args.output_dir or checkpoint.parent)


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, DataError, TextError) as error:
        raise SystemExit(f"error: {error}") from None
