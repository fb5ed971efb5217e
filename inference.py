"""Use a trained CLIP: zero-shot digit classification and image retrieval.

python inference.py                      # newest run's best.pt, test image 0
python inference.py --index 42 --text 7  # another query image; the nearest images to the caption "7"
python inference.py --image my_digit.png # your own pictures, dark ink on light paper or the reverse
python inference.py --evaluate           # every metric and figure on the full test split
python inference.py --evaluate --split val  # the same on the validation split, for choices the test split must not make
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

import figures
from checkpoint import CheckpointError, latest_run, load_model
from clip import CLIP
from dataset import DATASETS, DataError, ImageError, Split, load_splits, load_user_image
from metrics import centred, evaluate_embeddings, mean_of_present, zero_shot_classification
from utils import PRECISIONS, class_embeddings, embed_images, pick_device, resolve_precision

TOP_K = 5
SIMILARITY_ROWS = 12  # test images in the similarity matrix figure
TSNE_POINTS = 2000  # t-SNE takes minutes on all 10,000 test images; a subsample shows the same clusters
MISCLASSIFIED_SHOWN = 50


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


def nearest_images(queries: torch.Tensor, gallery: torch.Tensor, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, TOP_K) indices of the gallery images most similar to each query, by cosine, and their
    cosines; `exclude` holds each query's own gallery index, which is never its own neighbour."""
    cosines = queries @ gallery.T
    if exclude is not None:
        cosines[torch.arange(len(queries)), exclude] = -float("inf")
    top = cosines.topk(TOP_K)
    return top.indices, top.values


def print_similarities(name: str, similarities: torch.Tensor, probabilities: torch.Tensor) -> None:
    top2 = probabilities.topk(2)
    predicted, runner_up = top2.indices.tolist()
    print(f"{name}: predicted {predicted} (p={top2.values[0]:.3f}), runner-up {runner_up} (p={top2.values[1]:.3f})")
    print("  cosine to digits " + "  ".join(f"{d}:{s:+.3f}" for d, s in enumerate(similarities.tolist())))


def print_metrics(metrics: dict, n_images: int) -> None:
    zero_shot, text_to_image = metrics["zero_shot"], metrics["text_to_image"]
    print(f"zero-shot classification: top-1 {zero_shot['top1_accuracy']:.2%}, top-2 {zero_shot['top2_accuracy']:.2%}")
    per_digit = (f"{d}:{'absent' if a is None else f'{a:.2%}'}" for d, a in enumerate(zero_shot["per_digit_accuracy"]))
    print("  accuracy per digit  " + "  ".join(per_digit))
    print("  confusion matrix (rows: true digit, columns: predicted)")
    for digit, row in enumerate(zero_shot["confusion_matrix"]):
        print(f"    {digit}: " + " ".join(f"{count:5d}" for count in row))
    image_to_image = metrics["image_to_image"]
    retrieval = ", ".join(f"{name} {value:.2%}" for name, value in image_to_image.items() if name != "hubness")
    print(f"image-to-image retrieval by cosine (each image queries the {n_images - 1:,} others): {retrieval}")
    hubs = image_to_image["hubness"]
    print(
        f"  hubness of the top-{hubs['k']} lists: {hubs['coverage']:.1%} of the images are in at least one, "
        f"k-occurrence skewness {hubs['skewness']:.2f}, the biggest hub is in {hubs['max_occurrence']}"
    )
    for name, ranking in (("text_to_image", "centred embeddings"), ("text_to_image_by_cosine", "plain cosine")):
        at_k = ", ".join(f"{k} {value:.2%}" for k, value in metrics[name].items() if "@" in k)
        print(f"text-to-image retrieval by {ranking} (mean over digits): {at_k}")
    print(f"  mean rank of the first correct image {text_to_image['mean_first_correct_rank']:.2f}")
    gap = metrics["modality_gap"]
    print(
        f"  modality gap: each caption lies {mean_of_present(gap['caption_to_centroid']):.3f} (cosine distance) from its digit's image centroid, "
        f"its images {mean_of_present(gap['image_to_centroid']):.3f}; the images a caption retrieves are more typical than "
        f"{100 - gap['mean_returned_percentile']:.0f}% of their digit ({100 - gap['mean_returned_percentile_by_cosine']:.0f}% by plain cosine)"
    )
    image_to_text, similarity = metrics["image_to_text"], metrics["similarity"]
    print(f"image-to-text: recall@1 {image_to_text['recall@1']:.2%}, mean rank of the correct digit {image_to_text['mean_rank']:.3f}")
    print(
        f"cosine similarity: matching image-text pairs {similarity['matching']:+.3f}, "
        f"non-matching {similarity['non_matching']:+.3f}, gap {similarity['gap']:.3f}"
    )


@dataclass
class Gallery:
    """A split and its embeddings: what every mode classifies against and retrieves from."""

    name: str  # "test" or "validation"
    split: Split
    image_features: torch.Tensor  # (N, D), unit norm
    text_features: torch.Tensor  # (10, D), the digit captions


def evaluate(gallery: Gallery, state: dict, output_dir: Path) -> dict:
    """Every metric on the whole split, printed and written to output_dir/metrics.json; the figures
    as PNGs in output_dir/evaluation/ and, with the embedding projector, in TensorBoard. The
    validation split's go to metrics_val.json and evaluation_val/, beside the test split's."""
    split, image_features, text_features = gallery.split, gallery.image_features.cpu(), gallery.text_features.cpu()
    labels = split.labels
    metrics = evaluate_embeddings(image_features, text_features, labels)
    print_metrics(metrics, len(split))
    suffix = "" if gallery.name == "test" else "_val"
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = output_dir / f"metrics{suffix}.json"
    metrics_path.write_text(json.dumps({"split": gallery.name, "images": len(split), **metrics}, indent=2))

    figure_dir, step = output_dir / f"evaluation{suffix}", state["step"]
    writer = SummaryWriter(str(output_dir))  # beside the training logs, so TensorBoard shows them together

    def save(figure, name: str) -> None:
        figures.save(figure, figure_dir / f"{name}.png", writer, f"{figure_dir.name}/{name}", step)

    similarities = image_features @ text_features.T
    predictions = similarities.argmax(dim=1)
    save(
        figures.plot_similarity_matrix(split.images[:SIMILARITY_ROWS], labels[:SIMILARITY_ROWS], similarities[:SIMILARITY_ROWS]),
        "similarity_matrix",
    )

    queries = torch.stack([(labels == digit).nonzero()[0, 0] for digit in labels.unique()])  # the first image of each digit
    nearest, cosines = nearest_images(image_features[queries], image_features, exclude=queries)
    query_titles = [f"query ({label})" for label in labels[queries].tolist()]
    figure = figures.plot_retrieval(
        list(split.images[queries]), split.images[nearest], labels[nearest], cosines, labels[queries].tolist(), query_titles
    )
    save(figure, "image_retrieval")

    digits = list(range(len(text_features)))
    for name, images, texts in (
        ("text_retrieval", centred(image_features), centred(text_features)),
        ("text_retrieval_by_cosine", image_features, text_features),
    ):
        top = (texts @ images.T).topk(TOP_K)
        captions = [f'"{d}"' for d in digits]
        save(
            figures.plot_retrieval(captions, split.images[top.indices], labels[top.indices], top.values, digits, ["caption"] * len(digits)),
            name,
        )

    sample = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:TSNE_POINTS]
    save(figures.plot_tsne(image_features[sample], labels[sample], text_features), "tsne")
    save(figures.plot_confusion_matrix(metrics["zero_shot"]["confusion_matrix"]), "confusion_matrix")
    wrong = (predictions != labels).nonzero()[:MISCLASSIFIED_SHOWN, 0]
    save(figures.plot_misclassified(split.images[wrong], labels[wrong], predictions[wrong]), "misclassified")
    save(figures.plot_training_curves(state["history"]), "training_curves")

    # The projector shows every embedding in 3-D (PCA, t-SNE or UMAP), each point drawn as its digit.
    writer.add_embedding(
        image_features,
        metadata=labels.tolist(),
        label_img=split.images[:, None].float() / 255,
        global_step=step,
        tag=f"{gallery.name}_images",
    )
    writer.close()
    print(f"metrics in {metrics_path}, figures in {figure_dir}/, embeddings in TensorBoard: tensorboard --logdir {output_dir}")
    return metrics


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
