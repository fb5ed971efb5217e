"""Captions for the images of MNIST and Fashion-MNIST: what each says, and which images it describes.

`train.py --captions` picks one of three kinds:
- label: the class alone, "7", as the original model was trained (for clothes, the
  class's number: the digit text encoder has only ten entries);
- templates: a sentence made of a template and one of the class's names, in English
  or in Chinese: "a handwritten 7", "the number seven", "手写的数字七", "a photo of a sneaker";
- attributes (digits only): those sentences, and sentences that also say how the digit
  is written, "a thick 7 slanted to the right", by a rule over its pixels (`measure_strokes`).

A caption states the value of some of an image's properties (`PROPERTIES`): its class
always, an attribute caption its thickness, width or slant too. It describes every image
that has those values, so the positives of a training batch are the image-caption pairs
where it does, and zero-shot classification averages the captions that state a class alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from itertools import product

import torch
import torch.nn.functional as F

from dataset import Split

CAPTION_KINDS = ("label", "templates", "attributes")
LANGUAGES = ("en", "zh")
PROPERTIES = ("label", "thickness", "width", "slant")
ANY = -1  # what a caption that does not state a property holds for it

# Each class's names, in label order, per data set and language.
CLASS_WORDS = {
    "mnist": {
        "en": [
            (str(d), name)
            for d, name in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
        ],
        "zh": [(str(d), name) for d, name in enumerate("零一二三四五六七八九")],
    },
    "fashion": {
        "en": [
            ("t-shirt", "top"),
            ("pair of trousers", "pair of pants"),
            ("pullover", "sweater"),
            ("dress",),
            ("coat", "jacket"),
            ("sandal",),
            ("shirt",),
            ("sneaker", "trainer"),
            ("bag", "handbag"),
            ("ankle boot", "boot"),
        ],
        "zh": [
            ("T恤", "短袖"),
            ("裤子", "长裤"),
            ("套头衫", "毛衣"),
            ("连衣裙",),
            ("外套", "大衣"),
            ("凉鞋",),
            ("衬衫",),
            ("运动鞋",),
            ("包", "手提包"),
            ("短靴", "靴子"),
        ],
    },
}
# Every character of the held-out templates occurs in the trained ones, in other words and
# orders: they measure whether the text encoder reads sentences it has not seen, not new letters.
TEMPLATES = {
    "mnist": {
        "en": [
            "{}",
            "a {}",
            "a handwritten {}",
            "the number {}",
            "the digit {} written by hand",
            "a drawing of the number {}",
        ],
        "zh": ["{}", "数字{}", "手写的{}", "一个手写的数字{}", "这是一个{}", "图中的数字是{}"],
    },
    "fashion": {
        "en": [
            "{}",
            "a {}",
            "a photo of a {}",
            "a picture of the {}",
            "a product photo of a {}",
            "a black and white photo of a {}",
        ],
        "zh": ["{}", "一件{}", "一张{}的照片", "这是{}", "商品图：{}", "一张黑白的{}照片"],
    },
}
HELD_OUT_TEMPLATES = {
    "mnist": {
        "en": ["a figure showing the number {}", "this is a {} drawn by hand"],
        "zh": ["这是手写数字{}", "图中是一个{}"],
    },
    "fashion": {"en": ["a photo showing a {}", "this is a {}"], "zh": ["这是一张{}的图片", "一件黑白的{}"]},
}


def words_of(dataset: str) -> str:
    """The data set whose words describe `dataset`: the offline digits are digits."""
    return "mnist" if dataset == "digits" else dataset


# Words for the three bins of each attribute: the thinnest, narrowest, most left-leaning third
# of a digit's training images, the middle third, and the rest.
ATTRIBUTE_WORDS = {
    "en": {
        "thickness": ("thin", "medium-weight", "thick"),
        "width": ("narrow", "medium-width", "wide"),
        "slant": ("slanted to the left", "standing upright", "slanted to the right"),
    },
    "zh": {
        "thickness": ("细的", "粗细适中的", "粗的"),
        "width": ("窄的", "宽度适中的", "宽的"),
        "slant": ("向左倾斜的", "直立的", "向右倾斜的"),
    },
}
# (digit, attribute, bin) combinations that no training caption states: retrieving "a thin 4"
# after training on thin 7s and thick 4s measures compositional zero-shot.
HELD_OUT_COMBINATIONS = ((4, "thickness", 0), (7, "slant", 0), (2, "width", 2))


@dataclass
class Captions:
    """A set of captions: their texts, what each states (`says`, (K, 4): a value per property,
    ANY where it says nothing) and its language."""

    texts: list[str]
    says: torch.Tensor
    languages: list[str]

    def to(self, device: torch.device | str) -> Captions:
        """The same captions, with `says` on the device that their images are on: a copy to a GPU at each
        step would make it wait."""
        return replace(self, says=self.says.to(device))

    def describes(self, properties: torch.Tensor) -> torch.Tensor:
        """(N, 4) image properties -> (N, K): whether each caption describes each image."""
        says = self.says.to(properties.device)
        return ((says[None] == ANY) | (says[None] == properties[:, None])).all(dim=2)

    def class_captions(self) -> tuple[tuple[str, ...], ...]:
        """Per class, the captions that state the class alone: averaged, they classify (prompt ensembling)."""
        digit_only = (self.says[:, 1:] == ANY).all(dim=1)
        return tuple(
            tuple(
                t
                for t, d, only in zip(self.texts, self.says[:, 0].tolist(), digit_only.tolist(), strict=True)
                if d == digit and only
            )
            for digit in range(10)
        )


@dataclass
class CaptionedImages:
    """A split's images with the captions they are trained with, and each image's properties
    (PROPERTIES), which say which captions describe it."""

    images: torch.Tensor  # (N, 28, 28) uint8
    properties: torch.Tensor  # (N, 4)
    captions: Captions

    def __len__(self) -> int:
        return len(self.images)

    @property
    def texts(self) -> list[str]:
        return self.captions.texts

    def draw(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """For the images of `batch`, one caption each, drawn among those that describe it: (B,)
        indices into `texts`, and (B, B) whether image j's caption describes image i, the positives."""
        describes = self.captions.describes(self.properties[batch])  # (B, K)
        # The describing caption with the highest random score: each equally likely. torch.multinomial
        # would draw the same way, but some versions of torch check its input by waiting for the GPU.
        scores = torch.rand(describes.shape, device=describes.device, generator=generator).masked_fill(~describes, -1)
        drawn = scores.argmax(dim=1)
        return drawn, describes[:, drawn]


def with_article(text: str) -> str:
    """English's "an" before a vowel, "8" and "eight", which a template's "a" cannot know it will meet."""
    return re.sub(r"\ba (?=[aeio]|8\b)", "an ", text)


def template_captions(templates: dict[str, list[str]], names: dict[str, list[tuple[str, ...]]]) -> Captions:
    """Every template with every name of every class, in each language of the templates."""
    texts, says, languages = [], [], []
    for language, language_templates in templates.items():
        for template, label in product(language_templates, range(len(names[language]))):
            for name in names[language][label]:
                texts.append(with_article(template.format(name)))
                says.append([label, ANY, ANY, ANY])
                languages.append(language)
    return Captions(texts, torch.tensor(says), languages)


def attribute_caption(language: str, name: str, bins: dict[str, int]) -> str:
    """A sentence naming a digit and the bins of some of its attributes."""
    words = {attribute: ATTRIBUTE_WORDS[language][attribute][b] for attribute, b in bins.items()}
    if language == "zh":
        described = "、".join(words[a] for a in ("thickness", "width", "slant") if a in words)
        return f"一个{described}数字{name}"
    adjectives = [words[a] for a in ("thickness", "width") if a in words]
    return with_article(" ".join(["a", *adjectives, name, words.get("slant", "")]).strip())


def attribute_captions(held_out: tuple[tuple[int, str, int], ...] = HELD_OUT_COMBINATIONS) -> Captions:
    """The template captions, and captions stating a digit with one, two or three of its
    attributes, except those stating a held-out (digit, attribute, bin) combination."""
    templates = template_captions(TEMPLATES["mnist"], CLASS_WORDS["mnist"])
    texts, says, languages = list(templates.texts), templates.says.tolist(), list(templates.languages)
    attributes = PROPERTIES[1:]
    for language, digit in product(LANGUAGES, range(10)):
        for choice in product(range(ANY, 3), repeat=len(attributes)):  # ANY: the caption does not state it
            bins = {a: b for a, b in zip(attributes, choice, strict=True) if b != ANY}
            if not bins or any((digit, a, b) in held_out for a, b in bins.items()):
                continue
            for name in CLASS_WORDS["mnist"][language][digit]:
                texts.append(attribute_caption(language, name, bins))
                says.append([digit, *choice])
                languages.append(language)
    return Captions(texts, torch.tensor(says), languages)


def training_captions(kind: str, dataset: str) -> Captions:
    if kind == "label":
        return Captions(
            [str(label) for label in range(10)],
            torch.tensor([[label, ANY, ANY, ANY] for label in range(10)]),
            ["en"] * 10,
        )
    if kind == "templates":
        return template_captions(TEMPLATES[words_of(dataset)], CLASS_WORDS[words_of(dataset)])
    if kind == "attributes" and words_of(dataset) == "mnist":
        return attribute_captions()
    raise ValueError(
        f"no {kind} captions for {dataset}: choose one of {', '.join(CAPTION_KINDS)} (attributes: digits only)"
    )


def template_sets(dataset: str) -> dict[str, Captions]:
    """The caption sets zero-shot accuracy is measured with: the trained templates and the held-out
    ones, in both languages and in each."""
    names, sets = CLASS_WORDS[words_of(dataset)], {}
    for kind, templates in (("trained templates", TEMPLATES), ("held-out templates", HELD_OUT_TEMPLATES)):
        templates = templates[words_of(dataset)]
        sets[kind] = template_captions(templates, names)
        for language in LANGUAGES:
            sets[f"{kind}, {language}"] = template_captions({language: templates[language]}, names)
    return sets


def attribute_queries() -> tuple[Captions, torch.Tensor]:
    """Captions that state a digit and the bin of one attribute, in each language with each of the
    digit's names ("a thin 4", "一个细的数字四"), and which of them state a held-out combination."""
    texts, says, languages, held_out = [], [], [], []
    for language, digit, (index, attribute), b in product(
        LANGUAGES, range(10), enumerate(PROPERTIES[1:], start=1), range(3)
    ):
        for name in CLASS_WORDS["mnist"][language][digit]:
            texts.append(attribute_caption(language, name, {attribute: b}))
            says.append([digit] + [b if i == index else ANY for i in (1, 2, 3)])
            languages.append(language)
            held_out.append((digit, attribute, b) in HELD_OUT_COMBINATIONS)
    return Captions(texts, torch.tensor(says), languages), torch.tensor(held_out)


def measure_strokes(images: torch.Tensor) -> torch.Tensor:
    """(N, 28, 28) uint8 digits -> (N, 3): their thickness, width and slant, by a rule over the pixels.

    thickness: the share of the ink (pixels above half brightness) that survives a 3x3 erosion;
        a stroke two pixels wide vanishes, one five pixels wide keeps most of its middle.
    width: the standard deviation of the ink's columns, in pixels, weighted by brightness.
    slant: how far the ink moves right per pixel it goes up (second moments, as deskewing uses);
        positive when the digit leans right.
    """
    ink = images.float() / 255
    solid = (ink > 0.5).float()[:, None]
    eroded = -F.max_pool2d(-solid, 3, stride=1, padding=1)
    thickness = eroded.sum(dim=(1, 2, 3)) / solid.sum(dim=(1, 2, 3)).clamp(min=1)
    rows, cols = torch.meshgrid(
        torch.arange(28.0, device=ink.device), torch.arange(28.0, device=ink.device), indexing="ij"
    )
    mass = ink.sum(dim=(1, 2)).clamp(min=1e-6)
    mean_row, mean_col = (ink * rows).sum(dim=(1, 2)) / mass, (ink * cols).sum(dim=(1, 2)) / mass
    d_row, d_col = rows - mean_row[:, None, None], cols - mean_col[:, None, None]
    width = ((ink * d_col**2).sum(dim=(1, 2)) / mass).sqrt()
    slant = -(ink * d_row * d_col).sum(dim=(1, 2)) / (ink * d_row**2).sum(dim=(1, 2)).clamp(
        min=1e-6
    )  # rows grow downwards
    return torch.stack([thickness, width, slant], dim=1)


def stroke_edges(train: Split) -> torch.Tensor:
    """(10, 3, 2): per digit and attribute, the values that cut the training split's images into thirds."""
    measures, quantiles = measure_strokes(train.images), torch.tensor([1 / 3, 2 / 3], device=train.images.device)
    edges = torch.zeros(
        10, 3, 2, device=train.images.device
    )  # a digit the split lacks keeps zeros: no image will use them
    for digit in train.labels.unique().tolist():
        edges[digit] = torch.quantile(measures[train.labels == digit], quantiles, dim=0).T
    return edges


def image_properties(split: Split, edges: torch.Tensor | None) -> torch.Tensor:
    """(N, 4) long: each image's digit and the bin (0, 1, 2) of its thickness, width and slant by the
    training split's `edges`; ANY for the attributes without edges, where the captions state none."""
    if edges is None:
        return F.pad(split.labels[:, None], (0, 3), value=ANY)
    bins = (measure_strokes(split.images)[:, :, None] > edges.to(split.images.device)[split.labels]).sum(
        dim=2
    )  # (N, 3)
    return torch.cat([split.labels[:, None], bins], dim=1)
