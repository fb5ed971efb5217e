"""Use a trained CLIP: zero-shot digit classification and image retrieval.

python inference.py                      # newest run's best.pt, test image 0
python inference.py --index 42 --text 7  # another query image; the nearest images to the caption "7"
python inference.py --image my_digit.png # your own pictures, dark ink on light paper or the reverse
python inference.py --evaluate           # every metric and figure on the full test split
python inference.py --evaluate --split val  # the same on the validation split, for choices the test split must not make
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import figures
from checkpoint import CheckpointError, latest_run, load_model
from clip import CLIP
from dataset import DATASETS, DataError, ImageError, load_splits, load_user_image
from evaluation import TOP_K, Gallery, evaluate, nearest_images
from metrics import centred, zero_shot_classification
from utils import PRECISIONS, class_embeddings, embed_images, pick_device, resolve_precision


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint to load (default: the newest runs/*/best.pt)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where to look for the newest run")
    p.add_argument("--dataset", choices=DATASETS, default=None, help="test data (default: the checkpoint's)")
    p.add_argument("--data-dir", default=None, help="folder that holds (or receives) MNIST (default: the one the model was trained on)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="where to run")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16 where the hardware runs it natively, fp32 elsewhere (as train.py)",
    )
    p.add_argument(
        "--split", choices=("test", "val"), default="test", help="the images to classify and retrieve from: test, or the validation split"
    )
    p.add_argument("--index", type=int, default=0, help="image of the split to classify and to query with")
    p.add_argument("--image", type=Path, nargs="+", default=None, help="your own image files to classify instead")
    p.add_argument("--text", choices=[str(d) for d in range(10)], default=None, help="also show the images nearest to this digit caption")
    p.add_argument("--output-dir", type=Path, default=None, help="where figures go (default: the checkpoint's run folder)")
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="measure the whole split instead: metrics.json (metrics_val.json), figures in evaluation/ (evaluation_val/), TensorBoard",
    )
    args = p.parse_args(argv)
    try:
        args.device = pick_device(args.device)
        resolve_precision(args.precision, args.device)  # refuses what the device cannot run, with the usage line
    except ValueError as error:
        p.error(str(error))
    return args


def print_similarities(name: str, similarities: torch.Tensor, probabilities: torch.Tensor) -> None:
    top2 = probabilities.topk(2)
    predicted, runner_up = top2.indices.tolist()
    print(f"{name}: predicted {predicted} (p={top2.values[0]:.3f}), runner-up {runner_up} (p={top2.values[1]:.3f})")
    print("  cosine to digits " + "  ".join(f"{d}:{s:+.3f}" for d, s in enumerate(similarities.tolist())))


def classify_and_retrieve(
    model: CLIP, gallery: Gallery, name: str, image: torch.Tensor, own_index: int | None, precision: str, figure_path: Path
) -> dict:
    """Classify one (28, 28) image zero-shot and show the gallery images most like it; `own_index`
    is its place in the gallery, if it is one of the gallery's images, so that it does not find itself."""
    features = embed_images(model, image[None], precision)[0]
    similarities = (features @ gallery.text_features.T).cpu()
    probabilities = (model.logit_scale.exp().item() * similarities).softmax(dim=0)
    print_similarities(name, similarities, probabilities)
    exclude = None if own_index is None else torch.tensor([own_index], device=features.device)
    nearest, cosines = nearest_images(features[None], gallery.image_features, exclude)
    nearest, cosines = nearest[0].cpu(), cosines.cpu()
    predicted, labels = int(probabilities.argmax()), gallery.split.labels[nearest]
    figure = figures.plot_retrieval(
        [image], gallery.split.images[nearest][None], labels[None], cosines, [predicted], [f"query\npredicted {predicted}"]
    )
    figures.save(figure, figure_path)
    print(f"  top-{TOP_K} similar {gallery.name} images: labels {labels.tolist()}, figure {figure_path}")
    return {
        "name": name,
        "predicted": predicted,
        "probabilities": probabilities.tolist(),
        "neighbours": nearest.tolist(),
        "figure": figure_path,
    }


def show_split_image(model: CLIP, gallery: Gallery, index: int, precision: str, output_dir: Path) -> dict:
    """--index: classify one of the split's own images and retrieve the others most like it."""
    split = gallery.split
    if not 0 <= index < len(split):
        raise SystemExit(f"error: --index {index} is outside the {gallery.name} split: pick 0 to {len(split) - 1}")
    name = f"{gallery.name} image {index} (a {split.labels[index]})"
    figure_path = output_dir / f"retrieval_{'' if gallery.name == 'test' else 'val_'}{index}.png"
    return classify_and_retrieve(model, gallery, name, split.images[index], index, precision, figure_path)


def show_user_pictures(model: CLIP, gallery: Gallery, paths: list[Path], precision: str, output_dir: Path) -> list[dict]:
    """--image: classify the user's own pictures, each converted as MNIST was made; a file that
    cannot be used is skipped with one line saying why."""
    results, images, stems = [], [], set()
    for path in paths:
        try:
            image = load_user_image(path)
        except ImageError as error:
            print(f"{path}: skipped, {error}")
            continue
        stem, copy = path.stem, 1
        while stem in stems:  # two files of the same name, from two folders: each gets its own figure
            copy += 1
            stem = f"{path.stem}-{copy}"
        stems.add(stem)
        results.append(classify_and_retrieve(model, gallery, path.name, image, None, precision, output_dir / f"retrieval_{stem}.png"))
        images.append(image)
    if results:
        # What the model saw, beside what it made of it: the check when a prediction surprises.
        probabilities = torch.tensor([r["probabilities"] for r in results])
        figure = figures.plot_predictions([r["name"] for r in results], torch.stack(images), probabilities)
        print(f"your pictures as the model saw them, with its probabilities: {figures.save(figure, output_dir / 'predictions.png')}")
    return results


def show_caption(gallery: Gallery, digit: int, output_dir: Path) -> Path:
    """--text: the split's images nearest to a digit's caption, by the cosine of centred embeddings (metrics.centred)."""
    top = (centred(gallery.image_features) @ centred(gallery.text_features)[digit]).cpu().topk(TOP_K)
    labels = gallery.split.labels[top.indices]
    figure = figures.plot_retrieval(
        [f'"{digit}"'], gallery.split.images[top.indices][None], labels[None], top.values[None], [digit], ["caption"]
    )
    figure_path = figures.save(figure, output_dir / f"text_retrieval_{digit}.png")
    print(f'{gallery.name} images nearest to the caption "{digit}": labels {labels.tolist()}, figure {figure_path}')
    return figure_path


def load_gallery(model: CLIP, state: dict, args: argparse.Namespace, precision: str) -> Gallery:
    """The split that args.split names, from the data the model was trained on unless args say otherwise,
    with the validation split held out exactly as in training."""
    dataset, data_dir = args.dataset or state["args"]["dataset"], args.data_dir or state["args"]["data_dir"]
    if args.split == "val":
        name, split = "validation", load_splits(dataset, data_dir, val_size=state["args"]["val_size"]).val
    else:
        name, split = "test", load_splits(dataset, data_dir, val_size=1).test
    return Gallery(name, split, embed_images(model, split.images, precision), class_embeddings(model))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    checkpoint = args.checkpoint or latest_run(args.runs_dir, "best.pt")
    model, state = load_model(checkpoint, args.device)
    precision, why = resolve_precision(args.precision, args.device)
    output_dir = args.output_dir or checkpoint.parent
    print(f"loaded {checkpoint} (epoch {state['epoch']}, validation accuracy {state['best_accuracy']:.2%}); {why}")

    gallery = load_gallery(model, state, args, precision)
    accuracy = zero_shot_classification(gallery.image_features, gallery.text_features, gallery.split.labels.to(args.device))[
        "top1_accuracy"
    ]
    print(f"zero-shot accuracy on the {len(gallery.split):,} {gallery.name} images: {accuracy:.2%}")
    if args.evaluate:
        return {"accuracy": accuracy, "metrics": evaluate(gallery, state, output_dir)}
    if args.image:
        queries = show_user_pictures(model, gallery, args.image, precision, output_dir)
    else:
        queries = [show_split_image(model, gallery, args.index, precision, output_dir)]
    if args.text is not None:
        show_caption(gallery, int(args.text), output_dir)
    return {"accuracy": accuracy, "queries": queries}


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, DataError) as error:
        raise SystemExit(f"error: {error}") from None
