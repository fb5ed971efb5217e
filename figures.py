"""Figures that make a trained CLIP's embedding space visible.

Each `plot_*` function draws one figure from tensors and returns it; `save`
writes it as a PNG and, given a TensorBoard writer, logs it there too. Images
are uint8, (H, W) grey or (3, H, W) colour; digits are (28, 28), white on black
as in MNIST. Wrong digits, and images a caption does not describe, are red.
"""

from __future__ import annotations

import hashlib
import re
import textwrap
import warnings
from pathlib import Path

import matplotlib

from text_encoder import normalize_text

matplotlib.use("Agg")  # figures are saved, never shown: works without a display
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import font_manager
from matplotlib.collections import LineCollection
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.offsetbox import AnnotationBbox, OffsetImage

from metrics import centred

DPI = 90  # small PNGs that still read well
DIGITS = tuple(str(digit) for digit in range(10))  # the class names of digit data sets; others pass their own
THUMBNAILS = (
    6  # images drawn as pictures on a caption t-SNE: enough to show a pattern, few enough to leave the map readable
)
THUMBNAIL_POINTS = 30  # their height
IMAGE_COLOUR, CAPTION_COLOUR = "tab:blue", "tab:orange"
# Chinese captions need a font with its glyphs: matplotlib takes each glyph from the first font of
# the list that has it. Without any of these, Chinese shows as empty boxes (Debian: apt install fonts-noto-cjk).
CJK_FONTS = ("Noto Sans CJK SC", "Source Han Sans SC", "Microsoft YaHei", "SimHei", "PingFang SC", "WenQuanYi Zen Hei")
_installed = {font.name for font in font_manager.fontManager.ttflist}
plt.rcParams["font.family"] = ["DejaVu Sans", *(font for font in CJK_FONTS if font in _installed)]
if not _installed & set(CJK_FONTS):
    warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)


def picture(image: torch.Tensor) -> tuple[np.ndarray, dict]:
    """A uint8 image, (H, W) grey or (3, H, W) colour, as matplotlib draws it: the array, (H, W) or
    (H, W, 3), and the keywords that draw grey as grey, 0 black and 255 white, whatever its range."""
    array = image.cpu().numpy()
    if array.ndim == 3:
        return array.transpose(1, 2, 0), {}
    return array, {"cmap": "gray", "norm": Normalize(0, 255)}


def show_image(axis, image: torch.Tensor, title: str, color: str = "black") -> None:
    """Draw one uint8 image, (H, W) grey or (3, H, W) colour, on a matplotlib axis, without ticks."""
    array, style = picture(image)
    axis.imshow(array, **style)
    axis.set_title(title, fontsize=9, color=color)
    axis.axis("off")


def save(figure: Figure, path: Path, writer=None, tag: str | None = None, step: int = 0) -> Path:
    """Write `figure` to `path` as a PNG, log it to a TensorBoard `writer` under `tag` if given, and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    if writer is not None:
        writer.add_figure(tag or path.stem, figure, step)
    plt.close(figure)
    return path


def plot_retrieval(
    queries: list[torch.Tensor | str],
    images: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    expected: list[int | None],
    query_titles: list[str],
    names: tuple[str, ...] = DIGITS,
) -> Figure:
    """One row per query (a digit image, or a caption as text) and its K nearest test images
    (images: (Q, K, H, W) or (Q, K, 3, H, W); labels, scores: (Q, K)), each titled with its digit and cosine
    similarity; a neighbour whose digit is not the row's `expected` one is red."""
    n_rows, k = labels.shape
    figure, axes = plt.subplots(n_rows, k + 1, figsize=(1.25 * (k + 1), 1.4 * n_rows), squeeze=False)
    for row, (query, title, target) in enumerate(zip(queries, query_titles, expected, strict=True)):
        if isinstance(query, str):
            axes[row, 0].text(
                0.5, 0.5, textwrap.fill(query, 16), ha="center", va="center", fontsize=12 if len(query) < 8 else 8
            )
            axes[row, 0].set_title(title, fontsize=9)
            axes[row, 0].axis("off")
        else:
            show_image(axes[row, 0], query, title)
        for axis, image, label, score in zip(
            axes[row, 1:], images[row], labels[row].tolist(), scores[row].tolist(), strict=True
        ):
            show_image(
                axis, image, f"{names[label]} ({score:.2f})", color="black" if target in (None, label) else "red"
            )
    figure.tight_layout()
    return figure


def plot_caption_retrieval(
    captions: list[str], images: torch.Tensor, scores: torch.Tensor, relevant: torch.Tensor | None
) -> Figure:
    """One row per caption query: its text, then its K nearest images (images: (Q, K, H, W) grey or
    (Q, K, 3, H, W) colour; scores, relevant: (Q, K)), each titled with its cosine similarity, green
    where it is relevant to the caption and red where it is not; black for a free-text query
    (`relevant` None), of which nothing is known."""
    n_rows, k = scores.shape
    figure, axes = plt.subplots(
        n_rows, k + 1, figsize=(2.5 + 1.25 * k, 1.4 * n_rows), width_ratios=(2, *[1] * k), squeeze=False
    )
    for row, caption in enumerate(captions):
        # A CJK character is about as wide as two Latin letters; textwrap breaks unspaced Chinese at the width.
        text = textwrap.fill(caption, 24 if caption.isascii() else 12, max_lines=6, placeholder=" ...")
        axes[row, 0].text(0, 0.5, text, ha="left", va="center", fontsize=8)
        axes[row, 0].axis("off")
        matches = [None] * k if relevant is None else relevant[row].tolist()
        for axis, image, score, match in zip(axes[row, 1:], images[row], scores[row].tolist(), matches, strict=True):
            show_image(axis, image, f"{score:.2f}", color={None: "black", True: "green", False: "red"}[match])
    figure.tight_layout()
    return figure


def plot_similarity_matrix(
    images: torch.Tensor,
    labels: torch.Tensor,
    similarities: torch.Tensor,
    prompts: list[str] | None = None,
    names: tuple[str, ...] = DIGITS,
) -> Figure:
    """Cosine similarity of a batch of images (rows, drawn at the left) with the ten digit captions
    (columns), each row named by its true and predicted digit; or, given `prompts`, with those
    free-text captions, each row named by its digit."""
    n = len(images)
    predictions = similarities.argmax(dim=1).tolist()
    wide = prompts is not None
    figure, (image_axis, heat_axis) = plt.subplots(
        1, 2, figsize=(9.5 if wide else 7.5, 0.42 * n + (2.2 if wide else 1)), width_ratios=(1, 10), sharey=True
    )
    # The images stacked into one column, each filling the height of its heatmap row.
    image_axis.imshow(
        images.reshape(-1, images.shape[-1]).cpu().numpy(), cmap="gray", extent=(0, 1, n - 0.5, -0.5), aspect="auto"
    )
    image_axis.set_xticks([])
    rows = [
        f"a {names[t]}" if wide else f"true {names[t]}, pred {names[p]}"
        for t, p in zip(labels.tolist(), predictions, strict=True)
    ]
    image_axis.set_yticks(range(n), rows, fontsize=8)
    for tick, true, predicted in zip(image_axis.get_yticklabels(), labels.tolist(), predictions, strict=True):
        tick.set_color("black" if wide or true == predicted else "red")
    heat = heat_axis.imshow(similarities.cpu().numpy(), cmap="viridis", aspect="auto")
    for row, col in np.ndindex(*similarities.shape):
        value = similarities[row, col].item()
        heat_axis.text(
            col, row, f"{value:.2f}", ha="center", va="center", fontsize=6, color="black" if value > 0.5 else "white"
        )
    columns = prompts if wide else [f'"{name}"' for name in names]
    heat_axis.set_xticks(
        range(similarities.shape[1]), columns, rotation=35 if wide else 0, ha="left" if wide else "center", fontsize=8
    )
    heat_axis.xaxis.tick_top()
    heat_axis.set_title(
        f"cosine similarity of test images with {'free-text prompts' if wide else 'the class captions'}", fontsize=10
    )
    figure.colorbar(heat, ax=heat_axis, fraction=0.04)
    return figure


def tsne_2d(features: torch.Tensor, seed: int) -> np.ndarray:
    """(M, D) embeddings -> (M, 2) t-SNE coordinates, by cosine distance, starting from their PCA."""
    # Imported here: scikit-learn takes seconds to import, and only --evaluate draws a t-SNE.
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    perplexity = min(30.0, (len(features) - 1) / 3)  # t-SNE needs more points than 3x the perplexity
    tsne = TSNE(n_components=2, metric="cosine", init="pca", perplexity=perplexity, random_state=seed)
    # One thread: t-SNE synchronises its threads 1,000 times, and on a busy machine (a shared CI runner)
    # each wait can cost a time slice: 100 points took a minute instead of 0.3 s.
    with threadpool_limits(limits=1, user_api="openmp"):
        return tsne.fit_transform(features.cpu().numpy())


def plot_tsne(
    image_features: torch.Tensor,
    labels: torch.Tensor,
    text_features: torch.Tensor,
    names: tuple[str, ...] = DIGITS,
    seed: int = 0,
) -> Figure:
    """A 2-D t-SNE map of image embeddings, coloured by digit, with the caption embeddings
    mapped alongside as numbered stars. t-SNE keeps neighbourhoods, not distances: tight,
    separate clusters are the point, their sizes and the gaps between them mean little."""
    embedded = tsne_2d(torch.cat([image_features, text_features]), seed)
    images_2d, texts_2d = embedded[: len(image_features)], embedded[len(image_features) :]
    figure, axis = plt.subplots(figsize=(6.5, 6))
    colours = plt.get_cmap("tab10")
    axis.scatter(
        images_2d[:, 0], images_2d[:, 1], c=labels.cpu().numpy(), cmap="tab10", vmin=-0.5, vmax=9.5, s=4, alpha=0.6
    )
    for digit, (x, y) in enumerate(texts_2d):
        axis.scatter(x, y, marker="*", s=400, color=colours(digit), edgecolors="black", linewidths=1.2)
        axis.annotate(
            f'"{names[digit]}"',
            (x, y),
            xytext=(9, 5),
            textcoords="offset points",
            fontsize=11,
            weight="bold",
            bbox={"fc": "white", "ec": "none", "alpha": 0.7},
        )
    handles = [
        plt.Line2D([], [], marker="o", linestyle="", color=colours(d), label=name) for d, name in enumerate(names)
    ]
    axis.legend(handles=handles, title="class", loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8)
    axis.set_title(f"t-SNE of {len(image_features):,} test image embeddings; stars: the captions", fontsize=10)
    axis.set_xticks([])
    axis.set_yticks([])
    return figure


def plot_caption_tsne(
    image_features: torch.Tensor,
    caption_features: torch.Tensor,
    caption_image: torch.Tensor,
    thumbnails: torch.Tensor,
    seed: int = 0,
    centre: bool = True,
) -> Figure:
    """One 2-D t-SNE map of images (N, D) and their captions (K, D) together, as dots of two colours; a few
    images are drawn as pictures (thumbnails: (N, H, W) grey or (N, 3, H, W) colour) and joined by thin lines
    to their own captions (caption_image: (K,), the image of each), so a reader sees whether an image lands
    among its captions. Meant for a sample: a few hundred images and their captions.

    Each modality is `centred` first unless centre=False: a CLIP model puts its images and its captions in
    two cones apart (the modality gap), and t-SNE would draw those as two islands, every image far from
    every caption."""
    if centre:
        image_features, caption_features = centred(image_features), centred(caption_features)
    embedded = tsne_2d(torch.cat([image_features, caption_features]).float(), seed)
    n, k = len(image_features), len(caption_features)
    images_2d, captions_2d = embedded[:n], embedded[n:]
    figure, axis = plt.subplots(figsize=(7, 6.5))
    # The images last, on top: there are several captions to each.
    axis.scatter(captions_2d[:, 0], captions_2d[:, 1], s=8, color=CAPTION_COLOUR, alpha=0.7, label="caption")
    axis.scatter(images_2d[:, 0], images_2d[:, 1], s=8, color=IMAGE_COLOUR, alpha=0.7, label="image")
    shown = torch.linspace(0, n - 1, min(THUMBNAILS, n)).round().long().unique().tolist()  # spread over the sample
    owners = caption_image.cpu().numpy()
    segments = [(images_2d[i], caption_2d) for i in shown for caption_2d in captions_2d[owners == i]]
    axis.add_collection(LineCollection(segments, colors="black", linewidths=0.6, alpha=0.7))
    for i in shown:
        array, style = picture(thumbnails[i])
        thumbnail = OffsetImage(array, zoom=THUMBNAIL_POINTS / array.shape[0], **style)
        # Above its dot rather than on it, where it would hide the captions around it.
        axis.add_artist(
            AnnotationBbox(
                thumbnail,
                images_2d[i],
                xybox=(0, 0.9 * THUMBNAIL_POINTS),
                boxcoords="offset points",
                pad=0.1,
                bboxprops={"edgecolor": IMAGE_COLOUR},
                arrowprops={"arrowstyle": "-", "color": IMAGE_COLOUR, "linewidth": 0.8},
            )
        )
    axis.legend(loc="upper right", fontsize=8, markerscale=2)
    how = ", each modality centred" if centre else ""
    axis.set_title(
        f"t-SNE of {n:,} image and {k:,} caption embeddings{how}; lines join {len(shown)} images to their own "
        "captions.\n"
        "t-SNE keeps neighbourhoods: an image among its captions is matched, but sizes and gaps between groups mean "
        "little",
        fontsize=9,
    )
    axis.set_xticks([])
    axis.set_yticks([])
    return figure


def plot_confusion_matrix(confusion: list[list[int]], names: tuple[str, ...] = DIGITS) -> Figure:
    """Counts of (true class, predicted class); a log colour scale keeps the few errors visible beside the diagonal."""
    counts = np.asarray(confusion)
    figure, axis = plt.subplots(figsize=(5.5, 5))
    axis.imshow(np.ma.masked_equal(counts, 0), cmap="Blues", norm=LogNorm(vmin=1, vmax=max(counts.max(), 1)))
    for (row, col), count in np.ndenumerate(counts):
        if count:
            axis.text(
                col, row, str(count), ha="center", va="center", fontsize=7, color="white" if row == col else "black"
            )
    wide = max(map(len, names)) > 2
    axis.set_xticks(range(len(counts)), names, rotation=45 if wide else 0, ha="right" if wide else "center")
    axis.set_yticks(range(len(counts)), names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(
        f"zero-shot confusion matrix ({counts.sum() - np.trace(counts)} errors in {counts.sum():,})", fontsize=10
    )
    return figure


def plot_misclassified(
    images: torch.Tensor,
    labels: torch.Tensor,
    predictions: torch.Tensor,
    names: tuple[str, ...] = DIGITS,
    columns: int = 10,
    title: str = "misclassified test images: true -> predicted",
) -> Figure:
    """A gallery of misclassified images, each titled "true -> predicted"."""
    rows = max(1, -(-len(images) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.1 * columns, 1.25 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, label, predicted in zip(axes.flat, images, labels.tolist(), predictions.tolist(), strict=False):
        show_image(
            axis,
            image,
            f"{names[label]} ->\n{names[predicted]}" if len(names[label]) > 2 else f"{label} -> {predicted}",
            color="red",
        )
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def plot_training_curves(history: list[dict]) -> Figure:
    """Training loss, the validation score (zero-shot accuracy, or RSum for captioned photos) and logit
    scale per epoch, from a checkpoint's history."""
    epochs = [entry["epoch"] for entry in history]
    score = (
        ("val_rsum", "validation RSum")
        if "val_rsum" in history[0]
        else ("val_accuracy", "validation zero-shot accuracy")
    )
    panels = (("train_loss", "training loss"), score, ("logit_scale", "logit scale exp(t)"))
    figure, axes = plt.subplots(1, len(panels), figsize=(11, 3))
    for axis, (key, title) in zip(axes, panels, strict=True):
        axis.plot(epochs, [entry[key] for entry in history], marker="o", markersize=3)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def plot_predictions(names: list[str], images: torch.Tensor, probabilities: torch.Tensor, classes: list[str]) -> Figure:
    """For each user picture: the 28x28 image the model saw, beside its probability for each class."""
    figure, axes = plt.subplots(
        len(names), 2, figsize=(max(6, 1 + 0.55 * len(classes)), 1.7 * len(names)), width_ratios=(1, 3), squeeze=False
    )
    for (image_axis, bar_axis), name, image, p in zip(axes, names, images, probabilities, strict=True):
        top2 = p.topk(2)
        predicted, runner_up = top2.indices.tolist()
        show_image(image_axis, image, name)
        # A log scale: a confident model puts ~0.999 on one class, and the runner-ups are what is worth seeing.
        bar_axis.bar(
            range(len(classes)),
            p.tolist(),
            color=["tab:blue" if c == predicted else "tab:gray" for c in range(len(classes))],
            log=True,
        )
        bar_axis.set_xticks(range(len(classes)), classes, fontsize=8)
        bar_axis.set_ylim(1e-4, 1)
        bar_axis.set_ylabel("probability", fontsize=8)
        title = (
            f"predicted {classes[predicted]} (p={top2.values[0]:.3f}), "
            f"runner-up {classes[runner_up]} (p={top2.values[1]:.3f})"
        )
        bar_axis.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure


def plot_attribute_bins(images: torch.Tensor, properties: torch.Tensor, words: dict[str, tuple[str, ...]]) -> Figure:
    """A row per bin of each attribute and a column per class, each cell the first image of that class
    in that bin. The bins are a class's thirds, so read down a column: a wide 1 is wide for a 1.
    properties: (N, 4), the class and three attributes' bins."""
    rows = [(attribute, b) for attribute in words for b in range(len(words[attribute]))]
    classes = properties[:, 0].unique().tolist()
    figure, axes = plt.subplots(len(rows), len(classes), figsize=(0.8 * len(classes), 0.95 * len(rows)), squeeze=False)
    for row, (attribute, b) in enumerate(rows):
        in_bin = properties[:, 1 + list(words).index(attribute)] == b
        for axis, label in zip(axes[row], classes, strict=True):
            axis.axis("off")
            chosen = (in_bin & (properties[:, 0] == label)).nonzero()
            if len(chosen):
                show_image(axis, images[chosen[0, 0]], "")
        axes[row, 0].set_title(f"{attribute}: {words[attribute][b]}", fontsize=9, loc="left")
    figure.tight_layout()
    return figure


def caption_slug(text: str) -> str:
    """A file name of the caption's letters and digits; where that drops anything, a hash keeps two captions apart."""
    slug = re.sub(r"[^0-9a-z]+", "-", normalize_text(text)).strip("-")[:40]
    if slug != normalize_text(text).replace(" ", "-"):
        slug = f"{slug or 'caption'}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"
    return slug
