"""Use a trained CLIP: zero-shot digit classification and image retrieval.

python inference.py                      # newest run's best.pt, test image 0
python inference.py --index 42 --text 7  # another query image; the nearest images to the caption "7"
python inference.py --text "a thick seven"  # any sentence, for a model trained with --text-encoder transformer or lstm
python inference.py --image cat.png --labels cat,dog --template "a photo of a {}"  # your own classes and prompt
python inference.py --image my_digit.png # your own pictures, dark ink on light paper or the reverse
python inference.py --evaluate           # every metric and figure on the full test split
python inference.py --evaluate --split val  # the same on the validation split, for choices the test split must not make

A model trained on a collection of captioned photos (train.py --dataset captions) has no classes:
--index and --image rank the test split's captions for a photo, --text ranks its photos for a caption,
and --evaluate measures retrieval both ways (recall@1/5/10, ranks, RSum).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

import figures
import user_style_digits
from caption_data import decode_photo, load_caption_collection
from captions import attribute_queries, image_properties, stroke_edges, template_sets
from checkpoint import CheckpointError, latest_run, load_model
from clip import CLIP
from dataset import CLASS_NAMES, DATASETS, DataError, ImageError, load_splits, load_user_image
from evaluation import TOP_K, CaptionQueries, Gallery, PhotoGallery, evaluate, evaluate_photos, nearest_images
from metrics import centred, zero_shot_classification
from text_encoder import DIGIT_CAPTIONS, TextError, normalize_text
from utils import (
    PRECISIONS,
    class_embeddings,
    embed_captions,
    embed_images,
    embed_texts,
    resolve_precision,
    settle_device,
)

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
        help="where a captions collection's photos are cached (default: the run's)",
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
        help="measure the whole split instead: metrics.json (metrics_val.json), figures in evaluation/ (evaluation_val/), TensorBoard",
    )
    args = p.parse_args(argv)
    settle_device(p, args)
    return args


@dataclass
class Classes:
    """What a picture is classified as: each class's name and the embedding of its captions."""

    names: list[str]
    features: torch.Tensor  # (C, D), unit norm
    are_labels: bool = True  # the split's own labels, so that a neighbour of another label shows red


@torch.inference_mode()
def user_classes(model: CLIP, labels: str, template: str) -> Classes:
    """--labels and --template: the user's own classes, each embedded as its caption by the template.
    TextError, in one line, for what cannot make a set of classes."""
    path = Path(labels)
    if path.is_file():
        try:
            names = path.read_bytes().decode("utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise TextError(
                f"{path} is not UTF-8 text (byte {error.start}): save it as UTF-8, one class name per line"
            ) from None
    else:
        names = labels.split(",")
    names = [name.strip() for name in names if name.strip()]
    controls = [name for name in names if any(unicodedata.category(character) == "Cc" for character in name)]
    if controls:
        raise TextError(f"the class name {controls[0]!r} holds a control character: give names in plain text")
    if len({normalize_text(name) for name in names}) < len(names):
        raise TextError(f"--labels names a class twice ({', '.join(names)}): give each class once")
    if len(names) < 2:
        raise TextError(f"--labels gives {len(names)} class: zero-shot classification needs at least two")
    if template.count("{}") != 1:
        raise TextError(f'--template {template!r} must hold "{{}}" once, where each class name goes')
    return Classes(names, model.encode_classes(tuple((template.format(name),) for name in names)), are_labels=False)


def class_probabilities(model: CLIP, classes: Classes, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's (D,) features -> its cosine with each class and CLIP's zero-shot probabilities of them, on the CPU."""
    similarities = (features @ classes.features.T).cpu()
    return similarities, (model.logit_scale.exp().item() * similarities).softmax(dim=0)


def print_similarities(name: str, classes: Classes, similarities: torch.Tensor, probabilities: torch.Tensor) -> None:
    top2 = probabilities.topk(min(2, len(classes.names)))
    first, second = (classes.names[i] for i in top2.indices.tolist())
    print(f"{name}: predicted {first} (p={top2.values[0]:.3f}), runner-up {second} (p={top2.values[1]:.3f})")
    print(
        "  cosine to the classes "
        + "  ".join(f"{c}:{s:+.3f}" for c, s in zip(classes.names, similarities.tolist(), strict=True))
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
            f"your pictures as the model saw them, with its probabilities: {figures.save(figure, output_dir / 'predictions.png')}"
        )
    return results


def caption_cut_note(model: CLIP, text: str) -> str | None:
    """Where the tokenizer cuts a caption short, a note that says so; None where it reads all of it."""
    length = len(normalize_text(text))
    if model.config.text_encoder != "digit" and length > model.config.text_max_length:
        return f"the caption has {length:,} characters; the model reads its first {model.config.text_max_length}"
    return None


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


def caption_slug(text: str) -> str:
    """A file name of the caption's letters and digits; where that drops anything, a hash keeps two captions apart."""
    slug = re.sub(r"[^0-9a-z]+", "-", normalize_text(text)).strip("-")[:40]
    if slug != normalize_text(text).replace(" ", "-"):
        slug = f"{slug or 'caption'}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"
    return slug


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


@torch.inference_mode()
def load_photo_gallery(model: CLIP, state: dict, args: argparse.Namespace, precision: str) -> PhotoGallery:
    """The test (or validation) split of the collection the model was trained on, its photos and captions embedded."""
    data_dir, cache_dir = args.data_dir or state["args"]["data_dir"], args.cache_dir or state["args"]["cache_dir"]
    collection = load_caption_collection(data_dir, model.config.image_size, cache_dir)
    name, photos = ("validation", collection.val) if args.split == "val" else ("test", collection.test)
    caption_features, caption_text = embed_captions(model, photos.captions)
    return PhotoGallery(name, photos, embed_images(model, photos.images, precision), caption_features, caption_text)


def rank_captions(gallery: PhotoGallery, name: str, features: torch.Tensor, own_index: int | None = None) -> dict:
    """Print the split's TOP_K caption texts nearest to one photo's (D,) features, marking those that are its
    own when it is one of the split's photos (`own_index`); a text that several photos share is listed once."""
    photos = gallery.photos
    own = {c for c, photo in zip(photos.captions, photos.caption_image.tolist(), strict=True) if photo == own_index}
    first = {}  # each distinct text's first caption
    for index, caption in enumerate(photos.captions):
        first.setdefault(caption, index)
    texts = list(first)
    top = (gallery.caption_features[list(first.values())] @ features).cpu().topk(min(TOP_K, len(texts)))
    captions = [texts[k] for k in top.indices.tolist()]
    print(f"{name}: the {gallery.name} captions nearest to it")
    for caption, cosine in zip(captions, top.values.tolist(), strict=True):
        print(f"  {cosine:+.3f}  {caption}{' (its own)' if caption in own else ''}")
    if own:
        print("  its own captions: " + " | ".join(sorted(own)))
    return {"name": name, "captions": captions, "cosines": top.values.tolist()}


@torch.inference_mode()
def show_photos_for_caption(model: CLIP, gallery: PhotoGallery, text: str, output_dir: Path) -> Path:
    """--text: the split's TOP_K photos nearest to a caption, by cosine, drawn; green where the caption is one of a photo's own."""
    note = caption_cut_note(model, text)
    if note:
        print(f"note: {note}")
    query = model.encode_text(model.tokenize([text]).to(gallery.image_features.device))[0]
    top = (gallery.image_features @ query).topk(min(TOP_K, len(gallery.photos)))
    own = [k for k, caption in enumerate(gallery.photos.captions) if caption == text.strip()]
    relevant = gallery.relevant(gallery.caption_text[own[:1]], top.indices[None]) if own else None
    figure = figures.plot_caption_retrieval(
        [text], gallery.photos.images[top.indices.cpu()][None], top.values.cpu()[None], relevant
    )
    figure_path = figures.save(figure, output_dir / f"text_retrieval_{caption_slug(text)}.png")
    files = [gallery.photos.files[i] for i in top.indices.tolist()]
    print(f'{gallery.name} photos nearest to the caption "{text}": {", ".join(files)}; figure {figure_path}')
    return figure_path


def photo_main(model: CLIP, state: dict, args: argparse.Namespace, precision: str, output_dir: Path) -> dict:
    """inference.py for a model trained on a collection of captioned photos."""
    gallery = load_photo_gallery(model, state, args, precision)
    if args.evaluate:
        return {"metrics": evaluate_photos(gallery, state, output_dir)}
    classes = user_classes(model, args.labels, args.template) if args.labels is not None else None
    queries = []
    if args.image:
        for path in args.image:
            photo = decode_photo(path, model.config.image_size)
            if isinstance(photo, str):
                print(f"{path}: skipped, {photo}")
                continue
            features = embed_images(model, torch.tensor(photo)[None], precision)[0]
            queries.append(rank_captions(gallery, path.name, features))
            if classes is not None:
                print_similarities(path.name, classes, *class_probabilities(model, classes, features))
    else:
        if not 0 <= args.index < len(gallery.photos):
            raise SystemExit(
                f"error: --index {args.index} is outside the {gallery.name} split: pick 0 to {len(gallery.photos) - 1}"
            )
        name = f"{gallery.name} photo {args.index} ({gallery.photos.files[args.index]})"
        queries.append(rank_captions(gallery, name, gallery.image_features[args.index], args.index))
        if classes is not None:
            print_similarities(name, classes, *class_probabilities(model, classes, gallery.image_features[args.index]))
    if args.text is not None:
        show_photos_for_caption(model, gallery, args.text, output_dir)
    return {"queries": queries}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    checkpoint = args.checkpoint or latest_run(args.runs_dir, "best.pt")
    model, state = load_model(checkpoint, args.device)
    precision, why = resolve_precision(args.precision, args.device)
    output_dir = args.output_dir or checkpoint.parent
    if state["args"]["dataset"] == "captions":
        print(
            f"loaded {checkpoint} (epoch {state['epoch']}, validation RSum {600 * state['best_accuracy']:.1f}); {why}"
        )
        return photo_main(model, state, args, precision, output_dir)
    print(f"loaded {checkpoint} (epoch {state['epoch']}, validation accuracy {state['best_accuracy']:.2%}); {why}")

    gallery = load_gallery(model, state, args, precision)
    accuracy = zero_shot_classification(
        gallery.image_features, gallery.text_features, gallery.split.labels.to(args.device)
    )["top1_accuracy"]
    print(f"zero-shot accuracy on the {len(gallery.split):,} {gallery.name} images: {accuracy:.2%}")
    if args.evaluate:
        if state["args"]["dataset"] == "mnist":  # not for the offline digits: they are trained on these very images
            gallery.user_style = user_style_digits.score(model, user_style_digits.load_user_style_digits(), precision)
        return {"accuracy": accuracy, "metrics": evaluate(gallery, state, output_dir)}
    classes = Classes(list(gallery.class_names), gallery.text_features)
    if args.labels is not None:
        classes = user_classes(model, args.labels, args.template)
    if args.image:
        queries = show_user_pictures(
            model, gallery, classes, args.image, state["args"]["dataset"], precision, output_dir
        )
    else:
        queries = [show_split_image(model, gallery, classes, args.index, precision, output_dir)]
    if args.text is not None:
        show_caption(model, gallery, args.text, output_dir)
    return {"accuracy": accuracy, "queries": queries}


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, DataError, TextError) as error:
        raise SystemExit(f"error: {error}") from None
