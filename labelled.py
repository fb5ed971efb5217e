"""The labelled-images track: MNIST, Fashion-MNIST and scikit-learn's digits as a run trains on them
(each image captioned by its class, as captions.py says it), scored by zero-shot accuracy, and what
inference.py shows of them."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import distributed
import figures
from captions import (
    CaptionedImages,
    attribute_queries,
    image_properties,
    stroke_edges,
    template_sets,
    training_captions,
)
from clip import CLIP
from dataset import CLASS_NAMES, Augmentation, DataError, Split, load_splits
from distributed import Process
from embeddings import (
    Classes,
    caption_cut_note,
    class_embeddings,
    class_probabilities,
    embed_images,
    embed_texts,
    print_similarities,
    user_classes,
    zero_shot_accuracy,
)
from evaluation import TOP_K, CaptionQueries, Gallery, evaluate, nearest_images
from figures import caption_slug
from metrics import centred, zero_shot_classification
from pictures import ImageError, load_user_image, load_user_style_digits, score_user_style
from text_encoder import DIGIT_CAPTIONS


class LabelledImages:
    """A data set of labelled images as a run trains on it: each training image drawn with one of its
    class's captions, varied by `Augmentation`; scored by zero-shot accuracy."""

    score_name = "accuracy"  # as the history names it: val_accuracy
    score_tag = "zero_shot_accuracy"  # as TensorBoard names it: val/zero_shot_accuracy, test/zero_shot_accuracy
    image_channels = 1

    def __init__(self, args: argparse.Namespace):
        try:
            splits = load_splits(args.dataset, args.data_dir, args.val_size)
        except DataError as error:
            raise SystemExit(f"error: {error}") from None
        train = splits.train.to(args.device)
        captions = training_captions(args.captions, args.dataset)
        edges = stroke_edges(train) if args.captions == "attributes" else None
        self.train = CaptionedImages(train.images, image_properties(train, edges), captions.to(args.device))
        self.val, self.test = splits.val.to(args.device), splits.test.to(args.device)
        self.class_captions = captions.class_captions()
        self.augment = Augmentation(
            args.max_shift, args.max_rotation, args.max_scale, args.flip, args.erase, args.stroke
        )

    @staticmethod
    def settings_error(args: argparse.Namespace) -> str | None:
        """What is wrong with settings that do not fit these images, in one line; None when they fit."""
        if args.text_encoder == "digit" and args.captions != "label":
            return (
                f"--text-encoder digit reads only the captions 0-9: with --captions {args.captions} "
                "use --text-encoder transformer or lstm"
            )
        if args.image_size != 28:
            return f"--image-size: the images of {args.dataset} are 28 pixels on a side; other sizes are for photos"
        return None

    def score(self, model: CLIP, split: Split, precision: str, process: Process) -> float:
        """Zero-shot accuracy on a split: each process scores its part, and the parts are averaged."""
        mine = distributed.part(len(split.images), process)
        accuracy = zero_shot_accuracy(model, split.images[mine], split.labels[mine], precision)
        return distributed.mean_of_parts(accuracy, len(split.images[mine]), process)

    @staticmethod
    def describe_score(value: float) -> str:
        return f"validation accuracy {value:.2%}"

    def test_results(self, model: CLIP, precision: str, process: Process) -> tuple[dict, float, str]:
        accuracy = self.score(model, self.test, precision, process)
        return (
            {"test_accuracy": accuracy},
            accuracy,
            f"test zero-shot accuracy {accuracy:.2%} ({len(self.test):,} images)",
        )

    @staticmethod
    def infer(model: CLIP, state: dict, args: argparse.Namespace, precision: str, output_dir: Path) -> dict:
        """inference.py for a model of labelled images: classify one of the split's images or the user's
        pictures, retrieve the images nearest to it and to a caption, or --evaluate the whole split."""
        gallery = load_gallery(model, state, args, precision)
        labels = gallery.split.labels.to(args.device)
        accuracy = zero_shot_classification(gallery.image_features, gallery.text_features, labels)["top1_accuracy"]
        print(f"zero-shot accuracy on the {len(gallery.split):,} {gallery.name} images: {accuracy:.2%}")
        dataset = args.dataset or state["args"]["dataset"]
        if args.evaluate:
            if dataset == "mnist":  # not for the offline digits: they are trained on these very images
                gallery.user_style = score_user_style(model, load_user_style_digits(), precision)
            return {"accuracy": accuracy, "metrics": evaluate(gallery, state, output_dir)}
        classes = Classes(list(gallery.class_names), gallery.text_features)
        if args.labels is not None:
            classes = user_classes(model, args.labels, args.template)
        if args.image:
            queries = show_user_pictures(model, gallery, classes, args.image, dataset, precision, output_dir)
        else:
            queries = [show_split_image(model, gallery, classes, args.index, precision, output_dir)]
        if args.text is not None:
            show_caption(model, gallery, args.text, output_dir)
        return {"accuracy": accuracy, "queries": queries}


# Free-text prompts whose similarity with a few test images --evaluate draws, for a model that reads sentences.
PROMPTS = (
    "a handwritten 7",
    "the number three",
    "手写的数字五",
    "a thick 0",
    "a 1 slanted to the right",
    "一个宽的数字二",
    "a photo of a cat",
)


def classify_and_retrieve(
    model: CLIP,
    gallery: Gallery,
    classes: Classes,
    name: str,
    image: torch.Tensor,
    own_index: int | None,
    precision: str,
    figure_path: Path,
) -> dict:
    """Classify one (28, 28) image zero-shot as one of `classes` and show the gallery images most like it;
    `own_index` is its place in the gallery, if it is one of the gallery's images, so that it does not find itself."""
    features = embed_images(model, image[None], precision)[0]
    similarities, probabilities = class_probabilities(model, classes, features)
    print_similarities(name, classes, similarities, probabilities)
    exclude = None if own_index is None else torch.tensor([own_index], device=features.device)
    nearest, cosines = nearest_images(features[None], gallery.image_features, exclude)
    nearest, cosines = nearest[0].cpu(), cosines.cpu()
    predicted, labels = int(probabilities.argmax()), gallery.split.labels[nearest]
    expected, title = predicted if classes.are_labels else None, f"query\npredicted {classes.names[predicted]}"
    figure = figures.plot_retrieval(
        [image], gallery.split.images[nearest][None], labels[None], cosines, [expected], [title], gallery.class_names
    )
    figures.save(figure, figure_path)
    print(f"  top-{TOP_K} similar {gallery.name} images: labels {labels.tolist()}, figure {figure_path}")
    return {
        "name": name,
        "predicted": predicted,  # the index of the class, and its name:
        "predicted_name": classes.names[predicted],
        "probabilities": probabilities.tolist(),
        "neighbours": nearest.tolist(),
        "figure": figure_path,
    }


def show_split_image(
    model: CLIP, gallery: Gallery, classes: Classes, index: int, precision: str, output_dir: Path
) -> dict:
    """--index: classify one of the split's own images and retrieve the others most like it."""
    split = gallery.split
    if not 0 <= index < len(split):
        raise SystemExit(f"error: --index {index} is outside the {gallery.name} split: pick 0 to {len(split) - 1}")
    name = f"{gallery.name} image {index} (label {gallery.class_names[split.labels[index]]})"
    figure_path = output_dir / f"retrieval_{'' if gallery.name == 'test' else 'val_'}{index}.png"
    return classify_and_retrieve(model, gallery, classes, name, split.images[index], index, precision, figure_path)


def show_user_pictures(
    model: CLIP, gallery: Gallery, classes: Classes, paths: list[Path], dataset: str, precision: str, output_dir: Path
) -> list[dict]:
    """--image: classify the user's own pictures, each converted as the data set's images were made;
    a file that cannot be used is skipped with one line saying why."""
    results, images, stems = [], [], set()
    for path in paths:
        try:
            image = load_user_image(path, dataset)
        except ImageError as error:
            print(f"{path}: skipped, {error}")
            continue
        stem, copy = path.stem, 1
        while stem in stems:  # two files of the same name, from two folders: each gets its own figure
            copy += 1
            stem = f"{path.stem}-{copy}"
        stems.add(stem)
        figure_path = output_dir / f"retrieval_{stem}.png"
        results.append(classify_and_retrieve(model, gallery, classes, path.name, image, None, precision, figure_path))
        images.append(image)
    if results:
        # What the model saw, beside what it made of it: the check when a prediction surprises.
        probabilities = torch.tensor([r["probabilities"] for r in results])
        figure = figures.plot_predictions(
            [r["name"] for r in results], torch.stack(images), probabilities, classes.names
        )
        print(
            "your pictures as the model saw them, with its probabilities: "
            f"{figures.save(figure, output_dir / 'predictions.png')}"
        )
    return results


@torch.inference_mode()
def nearest_to_caption(model: CLIP, gallery: Gallery, text: str) -> torch.return_types.topk:
    """The TOP_K gallery images nearest to a caption and their scores, on the CPU: the cosine of embeddings
    centred on their modality's mean (metrics.centred), the gallery's for the images, the class captions'
    for the text. TextError where the model cannot read the caption."""
    query = model.encode_text(model.tokenize([text]).to(gallery.text_features.device))[0]
    scores = centred(gallery.image_features) @ centred(query, mean=gallery.text_features.mean(dim=0))
    return scores.cpu().topk(TOP_K)


def show_caption(model: CLIP, gallery: Gallery, text: str, output_dir: Path) -> Path:
    """--text: the split's images nearest to a caption (nearest_to_caption), drawn as a figure."""
    note = caption_cut_note(model, text)
    if note:
        print(f"note: {note}")
    top = nearest_to_caption(model, gallery, text)
    labels = gallery.split.labels[top.indices]
    shown = text if len(text) <= 40 else text[:39] + "…"
    expected = (
        int(text) if text in DIGIT_CAPTIONS else None
    )  # red marks a wrong class only where the caption is a label
    figure = figures.plot_retrieval(
        [f'"{shown}"'],
        gallery.split.images[top.indices][None],
        labels[None],
        top.values[None],
        [expected],
        ["caption"],
        gallery.class_names,
    )
    figure_path = figures.save(figure, output_dir / f"text_retrieval_{caption_slug(text)}.png")
    print(f'{gallery.name} images nearest to the caption "{shown}": labels {labels.tolist()}, figure {figure_path}')
    return figure_path


@torch.inference_mode()
def load_gallery(model: CLIP, state: dict, args: argparse.Namespace, precision: str) -> Gallery:
    """The split that args.split names, embedded, from the data the model was trained on unless args
    say otherwise, with the validation split held out exactly as in training; for a model that reads
    sentences, also what --evaluate measures of its text side."""
    dataset, data_dir = args.dataset or state["args"]["dataset"], args.data_dir or state["args"]["data_dir"]
    splits = load_splits(
        dataset, data_dir, val_size=state["args"]["val_size"] if dataset == state["args"]["dataset"] else 1
    )
    name, split = ("validation", splits.val) if args.split == "val" else ("test", splits.test)
    gallery = Gallery(
        name, split, embed_images(model, split.images, precision), class_embeddings(model), CLASS_NAMES[dataset]
    )
    if model.config.text_encoder == "digit":
        return gallery

    gallery.template_sets = {
        name: model.encode_classes(captions.class_captions()) for name, captions in template_sets(dataset).items()
    }
    gallery.prompts = dict(zip(PROMPTS, embed_texts(model, list(PROMPTS)), strict=True))
    if state["args"].get("captions") == "attributes":
        queries, held_out = attribute_queries()
        properties = image_properties(split, stroke_edges(splits.train))
        relevant = queries.describes(properties).T  # (K, N)
        gallery.attribute_queries = CaptionQueries(
            queries.texts, embed_texts(model, queries.texts), relevant, held_out, queries.languages, properties
        )
    return gallery
