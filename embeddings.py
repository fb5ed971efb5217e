"""A model's embeddings of whole splits, of its classes and of captions, and zero-shot classes made from them."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

from clip import CLIP
from dataset import model_input
from distributed import ONE_PROCESS, Process, gathered_parts, part
from metrics import image_caption_retrieval, zero_shot_classification
from text_encoder import TextError, normalize_text
from utils import autocast


@torch.inference_mode()
def embed_images(model, images: torch.Tensor, precision: str = "fp32", batch_size: int = 1000) -> torch.Tensor:
    """(N, 28, 28) or (N, 3, H, W) uint8 images -> (N, embed_dim) unit-norm fp32 embeddings, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = model_input(images[start : start + batch_size].to(device))
        with autocast(device, precision):
            chunks.append(model.encode_image(batch))
    model.train(was_training)
    return torch.cat(chunks)


@torch.inference_mode()
def class_embeddings(model) -> torch.Tensor:
    """(C, embed_dim) unit-norm embeddings of the classes, each the mean of its captions (CLIP.encode_classes)."""
    return model.encode_classes()


def zero_shot_accuracy(model, images: torch.Tensor, labels: torch.Tensor, precision: str = "fp32") -> float:
    """Share of images whose most similar digit caption is their own label, as metrics.py counts it."""
    image_features = embed_images(model, images, precision)
    return zero_shot_classification(image_features, class_embeddings(model), labels.to(image_features.device))[
        "top1_accuracy"
    ]


@torch.inference_mode()
def embed_texts(model, texts: list[str], batch_size: int = 1000, strict: bool = True) -> torch.Tensor:
    """Captions -> (N, embed_dim) unit-norm fp32 embeddings, in batches; strict as CLIP.tokenize."""
    device = model.logit_scale.device
    return torch.cat(
        [
            model.encode_text(model.tokenize(texts[start : start + batch_size], strict).to(device))
            for start in range(0, len(texts), batch_size)
        ]
    )


def embed_captions(model, captions: list[str], process: Process = ONE_PROCESS) -> tuple[torch.Tensor, torch.Tensor]:
    """Every caption of a split -> (K, embed_dim) unit-norm embeddings and (K,) an id of each caption's text:
    identical texts share one id (and are embedded once), as training treats them as the same caption.
    Among several processes, each embeds its part of the texts, and every process gets them all."""
    distinct = sorted(set(captions))
    text_ids = {text: index for index, text in enumerate(distinct)}
    caption_text = torch.tensor([text_ids[caption] for caption in captions])
    # A split's captions are scored as they are, even one written only in characters the model never read.
    mine = distinct[part(len(distinct), process)]
    features = gathered_parts(embed_texts(model, mine, strict=False), len(distinct), process)
    return features[caption_text.to(features.device)], caption_text.to(features.device)


def retrieval_scores(model, photos, precision: str = "fp32", process: Process = ONE_PROCESS) -> dict:
    """Image-to-text and text-to-image retrieval over a split of captioned photos (photo_files.CaptionedPhotos),
    as metrics.image_caption_retrieval measures it. Among several processes, each embeds its part of the
    photos and of the captions, and every process ranks them all: a rank depends on every item."""
    caption_features, caption_text = embed_captions(model, photos.captions, process)
    mine = part(len(photos), process)
    image_features = gathered_parts(embed_images(model, photos.images[mine], precision), len(photos), process)
    return image_caption_retrieval(
        image_features, caption_features, photos.caption_image.to(caption_text.device), caption_text
    )


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
    """One image's (D,) features -> its cosine with each class and CLIP's zero-shot probabilities, on the CPU."""
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


def caption_cut_note(model: CLIP, text: str) -> str | None:
    """Where the tokenizer cuts a caption short, a note that says so; None where it reads all of it."""
    length = len(normalize_text(text))
    if model.config.text_encoder != "digit" and length > model.config.text_max_length:
        return f"the caption has {length:,} characters; the model reads its first {model.config.text_max_length}"
    return None
