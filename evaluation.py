"""--evaluate: every metric of a trained CLIP on a whole split, printed, saved as metrics.json
and drawn as figures, which TensorBoard shows beside the training curves."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

import figures
from captions import ATTRIBUTE_WORDS
from dataset import Split
from metrics import (
    caption_retrieval,
    centred,
    evaluate_embeddings,
    mean_of_present,
    zero_shot_classification,
)
from pictures import describe_user_style

TOP_K = 5  # neighbours shown for a query
SIMILARITY_ROWS = 12  # images in the similarity matrix figure
TSNE_POINTS = 2000  # t-SNE takes minutes on all 10,000 test images; a subsample shows the same clusters
MISCLASSIFIED_SHOWN = 50


@dataclass
class CaptionQueries:
    """Captions to retrieve the split's images with, and which images each describes."""

    texts: list[str]
    features: torch.Tensor  # (K, D), unit norm
    relevant: torch.Tensor  # (K, N) bool
    held_out: torch.Tensor  # (K,) bool: the caption states a combination that no training caption did
    languages: list[str]
    properties: torch.Tensor  # (N, 4): each image's digit and the bins of its attributes


@dataclass
class Gallery:
    """A split and its embeddings: what every mode classifies against and retrieves from. A model
    that reads sentences has more to measure: each set of templates it can classify with, a few
    free-text prompts, and for one trained on attribute captions, captions that state them."""

    name: str  # "test" or "validation"
    split: Split
    image_features: torch.Tensor  # (N, D), unit norm
    text_features: torch.Tensor  # (10, D), the class captions
    class_names: tuple[str, ...] = figures.DIGITS
    template_sets: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # name -> (10, D), each digit's captions averaged
    prompts: dict[str, torch.Tensor] = field(default_factory=dict)  # free text -> (D,)
    attribute_queries: CaptionQueries | None = None
    # For a model trained on MNIST: how it reads handwriting from other writers (pictures.score_user_style).
    user_style: dict | None = None


def evaluate_captions(gallery: Gallery) -> dict:
    """What a model that reads sentences adds to metrics.json: zero-shot accuracy with each set of
    templates, and attribute retrieval for seen and held-out combinations, beside its chance level."""
    labels, image_features = gallery.split.labels, gallery.image_features.cpu()
    results = {}
    if gallery.template_sets:
        results["zero_shot_by_templates"] = {
            name: zero_shot_classification(image_features, features.cpu(), labels)["top1_accuracy"]
            for name, features in gallery.template_sets.items()
        }
    queries = gallery.attribute_queries
    if queries is not None:
        retrieval = caption_retrieval(image_features, queries.features.cpu(), queries.relevant.cpu())
        groups = {"seen": ~queries.held_out, "held-out": queries.held_out}
        groups |= {
            f"{kind}, {language}": mask & torch.tensor([lang == language for lang in queries.languages])
            for kind, mask in list(groups.items())
            for language in sorted(set(queries.languages))
        }
        results["attribute_retrieval"] = {
            name: {
                "captions": int(mask.sum()),
                "precision@10": torch.tensor(retrieval["precision@10"])[mask].mean().item(),
                "chance": torch.tensor(retrieval["chance"])[mask].mean().item(),
            }
            for name, mask in groups.items()
        }
    return results


def print_captions(results: dict) -> None:
    for name, accuracy in results.get("zero_shot_by_templates", {}).items():
        print(f"  zero-shot with the {name}: {accuracy:.2%}")
    for name, group in results.get("attribute_retrieval", {}).items():
        print(
            f"attribute retrieval, {name} (digit, attribute) combinations: precision@10 {group['precision@10']:.2%} "
            f"(chance {group['chance']:.2%}; {group['captions']} captions)"
        )


def nearest_images(
    queries: torch.Tensor, gallery: torch.Tensor, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, TOP_K) indices of the gallery images most similar to each query, by cosine, and their
    cosines; `exclude` holds each query's own gallery index, which is never its own neighbour."""
    cosines = queries @ gallery.T
    if exclude is not None:
        cosines[torch.arange(len(queries)), exclude] = -float("inf")
    top = cosines.topk(TOP_K)
    return top.indices, top.values


def print_metrics(metrics: dict, n_images: int, names: tuple[str, ...]) -> None:
    zero_shot, text_to_image = metrics["zero_shot"], metrics["text_to_image"]
    print(f"zero-shot classification: top-1 {zero_shot['top1_accuracy']:.2%}, top-2 {zero_shot['top2_accuracy']:.2%}")
    per_class = (
        f"{name}:{'absent' if a is None else f'{a:.2%}'}"
        for name, a in zip(names, zero_shot["per_digit_accuracy"], strict=True)
    )
    print("  accuracy per class  " + "  ".join(per_class))
    print("  confusion matrix (rows: true class, columns: predicted)")
    width = max(map(len, names))
    for name, row in zip(names, zero_shot["confusion_matrix"], strict=True):
        print(f"    {name:>{width}}: " + " ".join(f"{count:5d}" for count in row))
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
        print(f"text-to-image retrieval by {ranking} (mean over classes): {at_k}")
    print(f"  mean rank of the first correct image {text_to_image['mean_first_correct_rank']:.2f}")
    gap = metrics["modality_gap"]
    print(
        f"  modality gap: each caption lies {mean_of_present(gap['caption_to_centroid']):.3f} (cosine distance) from "
        "its class's image centroid, "
        f"its images {mean_of_present(gap['image_to_centroid']):.3f}; the images a caption retrieves are more "
        "typical than "
        f"{100 - gap['mean_returned_percentile']:.0f}% of their class "
        f"({100 - gap['mean_returned_percentile_by_cosine']:.0f}% by plain cosine)"
    )
    image_to_text, similarity = metrics["image_to_text"], metrics["similarity"]
    print(
        f"image-to-text: recall@1 {image_to_text['recall@1']:.2%}, mean rank of the correct class "
        f"{image_to_text['mean_rank']:.3f}"
    )
    print(
        f"cosine similarity: matching image-text pairs {similarity['matching']:+.3f}, "
        f"non-matching {similarity['non_matching']:+.3f}, gap {similarity['gap']:.3f}"
    )


def evaluate(gallery: Gallery, state: dict, output_dir: Path) -> dict:
    """Every metric on the whole split, printed and written to output_dir/metrics.json; the figures
    as PNGs in output_dir/evaluation/ and, with the embedding projector, in TensorBoard. The
    validation split's go to metrics_val.json and evaluation_val/, beside the test split's."""
    split, image_features, text_features = gallery.split, gallery.image_features.cpu(), gallery.text_features.cpu()
    labels = split.labels
    metrics = evaluate_embeddings(image_features, text_features, labels) | evaluate_captions(gallery)
    print_metrics(metrics, len(split), gallery.class_names)
    print_captions(metrics)
    if gallery.user_style is not None:
        metrics["user_style_digits"] = gallery.user_style
        print(describe_user_style(gallery.user_style))
    suffix = "" if gallery.name == "test" else "_val"
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = output_dir / f"metrics{suffix}.json"
    metrics_path.write_text(json.dumps({"split": gallery.name, "images": len(split), **metrics}, indent=2))

    from torch.utils.tensorboard import (
        SummaryWriter,
    )  # imported here: TensorBoard takes seconds to import, and only --evaluate needs it

    figure_dir, step = output_dir / f"evaluation{suffix}", state["step"]
    writer = SummaryWriter(str(output_dir))  # beside the training logs, so TensorBoard shows them together

    def save(figure, name: str) -> None:
        figures.save(figure, figure_dir / f"{name}.png", writer, f"{figure_dir.name}/{name}", step)

    similarities = image_features @ text_features.T
    predictions = similarities.argmax(dim=1)
    save(
        figures.plot_similarity_matrix(
            split.images[:SIMILARITY_ROWS],
            labels[:SIMILARITY_ROWS],
            similarities[:SIMILARITY_ROWS],
            names=gallery.class_names,
        ),
        "similarity_matrix",
    )

    if gallery.prompts:
        prompt_features = torch.stack(list(gallery.prompts.values())).cpu()
        rows = slice(0, SIMILARITY_ROWS)
        figure = figures.plot_similarity_matrix(
            split.images[rows],
            labels[rows],
            image_features[rows] @ prompt_features.T,
            list(gallery.prompts),
            gallery.class_names,
        )
        save(figure, "prompt_similarity")
    if gallery.attribute_queries is not None:
        words = ATTRIBUTE_WORDS["en"]
        save(
            figures.plot_attribute_bins(split.images, gallery.attribute_queries.properties.cpu(), words),
            "attribute_bins",
        )

    names = gallery.class_names
    queries = torch.stack(
        [(labels == label).nonzero()[0, 0] for label in labels.unique()]
    )  # the first image of each class
    nearest, cosines = nearest_images(image_features[queries], image_features, exclude=queries)
    query_titles = [f"query ({names[label]})" for label in labels[queries].tolist()]
    figure = figures.plot_retrieval(
        list(split.images[queries]),
        split.images[nearest],
        labels[nearest],
        cosines,
        labels[queries].tolist(),
        query_titles,
        names,
    )
    save(figure, "image_retrieval")

    classes = list(range(len(text_features)))
    for name, images, texts in (
        ("text_retrieval", centred(image_features), centred(text_features)),
        ("text_retrieval_by_cosine", image_features, text_features),
    ):
        top = (texts @ images.T).topk(TOP_K)
        captions = [f'"{names[c]}"' for c in classes]
        figure = figures.plot_retrieval(
            captions,
            split.images[top.indices],
            labels[top.indices],
            top.values,
            classes,
            ["caption"] * len(classes),
            names,
        )
        save(figure, name)

    sample = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:TSNE_POINTS]
    save(figures.plot_tsne(image_features[sample], labels[sample], text_features, names), "tsne")
    save(figures.plot_confusion_matrix(metrics["zero_shot"]["confusion_matrix"], names), "confusion_matrix")
    wrong = (predictions != labels).nonzero()[:MISCLASSIFIED_SHOWN, 0]
    save(figures.plot_misclassified(split.images[wrong], labels[wrong], predictions[wrong], names), "misclassified")
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
    print(
        f"metrics in {metrics_path}, figures in {figure_dir}/, embeddings in TensorBoard: tensorboard --logdir "
        f"{output_dir}"
    )
    return metrics
