"""Use a trained CLIP: zero-shot digit classification and image retrieval.

python inference.py                      # newest run's best.pt, test image 0
python inference.py --index 42 --text 7  # another query image; the nearest images to the caption "7"
python inference.py --image my_digit.png # your own pictures, dark ink on light paper or the reverse
python inference.py --evaluate           # every metric and figure on the full test split
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.tensorboard import SummaryWriter

import figures
from clip import CLIP, CLIPConfig
from dataset import DATASETS, DataError, ImageError, Split, load_splits, to_mnist_style
from metrics import RERANKED, TYPICALITY_NEIGHBOURS, TYPICALITY_WEIGHT, evaluate_embeddings, ranking_scores, typicality_bonus
from utils import PRECISIONS, CheckpointError, class_embeddings, embed_images, latest_run, load_checkpoint, pick_device, resolve_precision

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
    p.add_argument("--index", type=int, default=0, help="test image to classify and to query with")
    p.add_argument("--image", type=Path, nargs="+", default=None, help="your own image files to classify instead")
    p.add_argument(
        "--text", choices=[str(d) for d in range(10)], default=None, help="also show the test images nearest to this digit caption"
    )
    p.add_argument("--output-dir", type=Path, default=None, help="where figures go (default: the checkpoint's run folder)")
    p.add_argument(
        "--typicality-weight",
        type=non_negative_float,
        default=TYPICALITY_WEIGHT,
        help=f"image retrieval re-ranks a query's {RERANKED} nearest test images by cosine plus this weight times their typicality, "
        f"their mean cosine with their own {TYPICALITY_NEIGHBOURS} nearest (0: by cosine alone)",
    )
    p.add_argument(
        "--evaluate", action="store_true", help="measure the full test split instead: metrics.json, figures in evaluation/, TensorBoard"
    )
    args = p.parse_args(argv)
    try:
        args.device = pick_device(args.device)
        resolve_precision(args.precision, args.device)  # refuses what the device cannot run, with the usage line
    except ValueError as error:
        p.error(str(error))
    return args


def non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be zero or a positive number, got {text}")
    return value


def load_model(path: Path, device: torch.device) -> tuple[CLIP, dict]:
    """Rebuild the model from the config stored in its checkpoint."""
    state = load_checkpoint(path, device, keys=("model", "config", "dataset", "args", "epoch", "best_accuracy", "history"))
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


def nearest_images(
    queries: torch.Tensor, gallery: torch.Tensor, bonus: torch.Tensor, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, TOP_K) indices of the gallery images ranked first for each query (by cosine, re-ranked
    with the gallery's typicality `bonus`), and their cosines; `exclude` holds each query's own
    gallery index, which is never its own neighbour."""
    cosines = queries @ gallery.T
    if exclude is not None:
        cosines[torch.arange(len(queries)), exclude] = -float("inf")
    indices = ranking_scores(cosines, bonus).topk(TOP_K).indices
    return indices, cosines.gather(1, indices)


def print_similarities(name: str, similarities: torch.Tensor, probabilities: torch.Tensor) -> None:
    top2 = probabilities.topk(2)
    predicted, runner_up = top2.indices.tolist()
    print(f"{name}: predicted {predicted} (p={top2.values[0]:.3f}), runner-up {runner_up} (p={top2.values[1]:.3f})")
    print("  cosine to digits " + "  ".join(f"{d}:{s:+.3f}" for d, s in enumerate(similarities.tolist())))


def print_metrics(metrics: dict, n_images: int) -> None:
    zero_shot, text_to_image = metrics["zero_shot"], metrics["text_to_image"]
    print(f"zero-shot classification: top-1 {zero_shot['top1_accuracy']:.2%}, top-2 {zero_shot['top2_accuracy']:.2%}")
    print("  accuracy per digit  " + "  ".join(f"{d}:{a:.2%}" for d, a in enumerate(zero_shot["per_digit_accuracy"])))
    print("  confusion matrix (rows: true digit, columns: predicted)")
    for digit, row in enumerate(zero_shot["confusion_matrix"]):
        print(f"    {digit}: " + " ".join(f"{count:5d}" for count in row))
    retrieval = ", ".join(f"{name} {value:.2%}" for name, value in metrics["image_to_image"].items())
    print(f"image-to-image retrieval (each image queries the {n_images - 1:,} others): {retrieval}")
    at_k = ", ".join(f"{name} {value:.2%}" for name, value in text_to_image.items() if "@" in name)
    print(f"text-to-image retrieval (mean over digits): {at_k}")
    print(f"  mean rank of the first correct image {text_to_image['mean_first_correct_rank']:.2f}")
    image_to_text, similarity = metrics["image_to_text"], metrics["similarity"]
    print(f"image-to-text: recall@1 {image_to_text['recall@1']:.2%}, mean rank of the correct digit {image_to_text['mean_rank']:.3f}")
    print(
        f"cosine similarity: matching image-text pairs {similarity['matching']:+.3f}, "
        f"non-matching {similarity['non_matching']:+.3f}, gap {similarity['gap']:.3f}"
    )


def evaluate(
    test: Split, image_features: torch.Tensor, text_features: torch.Tensor, state: dict, output_dir: Path, typicality_weight: float
) -> dict:
    """Every metric on the full test split, printed and written to output_dir/metrics.json; the
    figures as PNGs in output_dir/evaluation/ and, with the embedding projector, in TensorBoard."""
    labels = test.labels
    metrics = evaluate_embeddings(image_features, text_features, labels, typicality_weight)
    print_metrics(metrics, len(test))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps({"test_images": len(test), **metrics}, indent=2))

    figure_dir, step = output_dir / "evaluation", state["step"]
    writer = SummaryWriter(str(output_dir))  # beside the training logs, so TensorBoard shows them together

    def save(figure, name: str) -> None:
        figures.save(figure, figure_dir / f"{name}.png", writer, f"evaluation/{name}", step)

    similarities = image_features @ text_features.T
    predictions = similarities.argmax(dim=1)
    save(
        figures.plot_similarity_matrix(test.images[:SIMILARITY_ROWS], labels[:SIMILARITY_ROWS], similarities[:SIMILARITY_ROWS]),
        "similarity_matrix",
    )

    queries = torch.stack([(labels == digit).nonzero()[0, 0] for digit in labels.unique()])  # the first image of each digit
    bonus = typicality_bonus(image_features, typicality_weight)
    nearest, cosines = nearest_images(image_features[queries], image_features, bonus, exclude=queries)
    query_titles = [f"query ({label})" for label in labels[queries].tolist()]
    figure = figures.plot_retrieval(
        list(test.images[queries]), test.images[nearest], labels[nearest], cosines, labels[queries].tolist(), query_titles
    )
    save(figure, "image_retrieval")

    top = (text_features @ image_features.T).topk(TOP_K)
    digits = list(range(len(text_features)))
    figure = figures.plot_retrieval(
        [f'"{d}"' for d in digits], test.images[top.indices], labels[top.indices], top.values, digits, ["caption"] * len(digits)
    )
    save(figure, "text_retrieval")

    sample = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:TSNE_POINTS]
    save(figures.plot_tsne(image_features[sample], labels[sample], text_features), "tsne")
    save(figures.plot_confusion_matrix(metrics["zero_shot"]["confusion_matrix"]), "confusion_matrix")
    wrong = (predictions != labels).nonzero()[:MISCLASSIFIED_SHOWN, 0]
    save(figures.plot_misclassified(test.images[wrong], labels[wrong], predictions[wrong]), "misclassified")
    save(figures.plot_training_curves(state["history"]), "training_curves")

    # The projector shows every test embedding in 3-D (PCA, t-SNE or UMAP), each point drawn as its digit.
    writer.add_embedding(
        image_features, metadata=labels.tolist(), label_img=test.images[:, None].float() / 255, global_step=step, tag="test_images"
    )
    writer.close()
    print(
        f"metrics in {output_dir / 'metrics.json'}, figures in {figure_dir}/, embeddings in TensorBoard: tensorboard --logdir {output_dir}"
    )
    return metrics


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    checkpoint = args.checkpoint or latest_run(args.runs_dir, "best.pt")
    model, state = load_model(checkpoint, args.device)
    precision, why = resolve_precision(args.precision, args.device)
    output_dir = args.output_dir or checkpoint.parent
    print(f"loaded {checkpoint} (epoch {state['epoch']}, validation accuracy {state['best_accuracy']:.2%}); {why}")

    test = load_splits(args.dataset or state["dataset"], args.data_dir or state["args"]["data_dir"], val_size=1).test
    test_features = embed_images(model, test.images, precision)  # (N, D)
    text_features = class_embeddings(model)  # (10, D)
    scale = model.logit_scale.exp().item()
    predictions = (test_features @ text_features.T).argmax(dim=1).cpu()
    accuracy = (predictions == test.labels).float().mean().item()
    print(f"zero-shot accuracy on the {len(test):,} test images: {accuracy:.2%}")
    if args.evaluate:
        metrics = evaluate(test, test_features.cpu(), text_features.cpu(), state, output_dir, args.typicality_weight)
        return {"accuracy": accuracy, "metrics": metrics}

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

    bonus = typicality_bonus(test_features, args.typicality_weight)
    results = []
    for name, image, test_index in queries:
        features = embed_images(model, image[None], precision)[0]
        similarities = (features @ text_features.T).cpu()
        probabilities = (scale * similarities).softmax(dim=0)
        print_similarities(name, similarities, probabilities)
        exclude = None if test_index is None else torch.tensor([test_index], device=test_features.device)
        nearest, cosines = nearest_images(features[None], test_features, bonus, exclude)
        nearest, cosines = nearest[0].cpu(), cosines.cpu()
        predicted = int(probabilities.argmax())
        figure = figures.plot_retrieval(
            [image], test.images[nearest][None], test.labels[nearest][None], cosines, [predicted], [f"query\npredicted {predicted}"]
        )
        figure_path = figures.save(figure, output_dir / f"retrieval_{Path(name).stem if test_index is None else test_index}.png")
        print(f"  top-{TOP_K} similar test images: labels {test.labels[nearest].tolist()}, figure {figure_path}")
        results.append({"name": name, "predicted": predicted, "probabilities": probabilities.tolist(), "figure": figure_path})
    if args.image and results:
        # What the model saw, beside what it made of it: the check when a prediction surprises.
        figure = figures.plot_predictions(
            [r["name"] for r in results],
            torch.stack([image for _, image, _ in queries]),
            torch.tensor([r["probabilities"] for r in results]),
        )
        print(f"your pictures as the model saw them, with its probabilities: {figures.save(figure, output_dir / 'predictions.png')}")

    if args.text is not None:
        digit = int(args.text)
        top = (test_features @ text_features[digit]).cpu().topk(TOP_K)
        figure = figures.plot_retrieval(
            [f'"{digit}"'], test.images[top.indices][None], test.labels[top.indices][None], top.values[None], [digit], ["caption"]
        )
        figure_path = figures.save(figure, output_dir / f"text_retrieval_{digit}.png")
        print(f'test images nearest to the caption "{digit}": labels {test.labels[top.indices].tolist()}, figure {figure_path}')
    return {"accuracy": accuracy, "queries": results}


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, DataError) as error:
        raise SystemExit(f"error: {error}") from None
