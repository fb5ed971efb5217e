"""Use a trained CLIP: zero-shot digit classification and image retrieval.

python inference.py                      # newest run's best.pt, test image 0
python inference.py --index 42 --text 7  # another query image; the nearest images to the caption "7"
python inference.py --image my_digit.png # your own pictures, dark ink on light paper or the reverse
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are saved, never shown: works without a display
import matplotlib.pyplot as plt
import torch
from PIL import Image, UnidentifiedImageError

from clip import CLIP, CLIPConfig
from dataset import DATASETS, DataError, ImageError, load_splits, to_mnist_style
from utils import CheckpointError, class_embeddings, embed_images, latest_run, load_checkpoint, pick_device, show_digit

TOP_K = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint to load (default: the newest runs/*/best.pt)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where to look for the newest run")
    p.add_argument("--dataset", choices=DATASETS, default=None, help="test data (default: the checkpoint's)")
    p.add_argument("--data-dir", default="data", help="folder that holds (or receives) MNIST")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="where to run")
    p.add_argument("--index", type=int, default=0, help="test image to classify and to query with")
    p.add_argument("--image", type=Path, nargs="+", default=None, help="your own image files to classify instead")
    p.add_argument(
        "--text", choices=[str(d) for d in range(10)], default=None, help="also show the test images nearest to this digit caption"
    )
    p.add_argument("--output-dir", type=Path, default=None, help="where figures go (default: the checkpoint's run folder)")
    args = p.parse_args(argv)
    try:
        args.device = pick_device(args.device)
    except ValueError as error:
        p.error(str(error))
    return args


def load_model(path: Path, device: torch.device) -> tuple[CLIP, dict]:
    """Rebuild the model from the config stored in its checkpoint."""
    state = load_checkpoint(path, device)
    model = CLIP(CLIPConfig.from_dict(state["config"])).to(device).to(memory_format=torch.channels_last)
    model.load_state_dict(state["model"])
    return model.eval(), state


def load_user_image(path: Path) -> torch.Tensor:
    """An image file -> (28, 28) uint8 in MNIST's style; ImageError with the reason when impossible."""
    return to_mnist_style(read_image_file(path))


def read_image_file(path: Path) -> Image.Image:
    """Decode an image file whole (an animation's first frame); ImageError with the reason when impossible."""
    if path.is_dir():
        raise ImageError("it is a folder, not an image file")
    try:
        with warnings.catch_warnings():
            # Pillow refuses more than twice MAX_IMAGE_PIXELS but only warns above it: refuse both, before decoding.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return image
    except (FileNotFoundError, PermissionError) as error:
        raise ImageError(f"cannot open it: {error.strerror}") from error
    except UnidentifiedImageError as error:
        raise ImageError("not a picture: the file is empty or of a kind Pillow cannot read") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"refused: more than {Image.MAX_IMAGE_PIXELS:,} pixels, too large for a digit (a decompression bomb?)") from error
    except Exception as error:  # Pillow reports damaged data as OSError, SyntaxError, ValueError, struct.error and more
        raise ImageError(f"the picture is damaged or truncated ({type(error).__name__}: {error})") from error


def save_retrieval_figure(
    query: torch.Tensor,
    query_title: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    expected: int | None,
    path: Path,
) -> None:
    """The query (an image or a caption) beside its nearest test images; wrong digits in red."""
    figure, axes = plt.subplots(1, len(images) + 1, figsize=(1.6 * (len(images) + 1), 2.0))
    if query.ndim == 2:
        show_digit(axes[0], query, query_title)
    else:
        axes[0].text(0.5, 0.5, query_title, ha="center", va="center", fontsize=14)
        axes[0].axis("off")
    for axis, image, label, score in zip(axes[1:], images, labels.tolist(), scores.tolist(), strict=True):
        show_digit(axis, image, f"{label}  ({score:.3f})", color="black" if expected in (None, label) else "red")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def print_similarities(name: str, similarities: torch.Tensor, probabilities: torch.Tensor) -> None:
    top2 = probabilities.topk(2)
    predicted, runner_up = top2.indices.tolist()
    print(f"{name}: predicted {predicted} (p={top2.values[0]:.3f}), runner-up {runner_up} (p={top2.values[1]:.3f})")
    print("  cosine to digits " + "  ".join(f"{d}:{s:+.3f}" for d, s in enumerate(similarities.tolist())))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    checkpoint = args.checkpoint or latest_run(args.runs_dir, "best.pt")
    model, state = load_model(checkpoint, args.device)
    output_dir = args.output_dir or checkpoint.parent
    print(f"loaded {checkpoint} (epoch {state['epoch']}, validation accuracy {state['best_accuracy']:.2%})")

    test = load_splits(args.dataset or state["dataset"], args.data_dir, val_size=1).test
    test_features = embed_images(model, test.images)  # (N, D)
    text_features = class_embeddings(model)  # (10, D)
    scale = model.logit_scale.exp().item()
    predictions = (test_features @ text_features.T).argmax(dim=1).cpu()
    accuracy = (predictions == test.labels).float().mean().item()
    print(f"zero-shot accuracy on the {len(test):,} test images: {accuracy:.2%}")

    if args.image:
        queries = []
        for path in args.image:
            try:
                queries.append((path.name, load_user_image(path), None))
            except ImageError as error:
                print(f"{path}: skipped, {error}")
    else:
        if not 0 <= args.index < len(test):
            raise SystemExit(f"error: --index {args.index} is outside the test split: pick 0 to {len(test) - 1}")
        queries = [(f"test image {args.index} (a {test.labels[args.index]})", test.images[args.index], args.index)]

    results = []
    for name, image, test_index in queries:
        features = embed_images(model, image[None])[0]
        similarities = (features @ text_features.T).cpu()
        probabilities = (scale * similarities).softmax(dim=0)
        print_similarities(name, similarities, probabilities)
        gallery_scores = (test_features @ features).cpu()
        if test_index is not None:
            gallery_scores[test_index] = -float("inf")  # the query is not its own neighbour
        top = gallery_scores.topk(TOP_K)
        predicted = int(probabilities.argmax())
        figure_path = output_dir / f"retrieval_{Path(name).stem if test_index is None else test_index}.png"
        save_retrieval_figure(
            image, f"query\npredicted {predicted}", test.images[top.indices], test.labels[top.indices], top.values, predicted, figure_path
        )
        print(f"  top-{TOP_K} similar test images: labels {test.labels[top.indices].tolist()}, figure {figure_path}")
        results.append({"name": name, "predicted": predicted, "probabilities": probabilities.tolist(), "figure": figure_path})

    if args.text is not None:
        digit = int(args.text)
        top = (test_features @ text_features[digit]).cpu().topk(TOP_K)
        figure_path = output_dir / f"text_retrieval_{digit}.png"
        save_retrieval_figure(
            torch.empty(0), f'caption\n"{digit}"', test.images[top.indices], test.labels[top.indices], top.values, digit, figure_path
        )
        print(f'test images nearest to the caption "{digit}": labels {test.labels[top.indices].tolist()}, figure {figure_path}')
    return {"accuracy": accuracy, "queries": results}


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, DataError) as error:
        raise SystemExit(f"error: {error}") from None
