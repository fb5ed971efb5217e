"""The photo track: a collection of captioned photos (read by photo_files.py) as a run trains on it,
cropped and mirrored at random, scored by image-caption retrieval (RSum); and what inference.py and
--evaluate show of it."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import figures
from clip import CLIP
from dataset import DataError
from distributed import Process
from embeddings import (
    caption_cut_note,
    class_probabilities,
    embed_captions,
    embed_images,
    print_similarities,
    retrieval_scores,
    user_classes,
)
from evaluation import TOP_K
from figures import caption_slug
from metrics import image_caption_retrieval, rsum_line
from photo_files import CaptionedPhotos, PhotoPairs, decode_photo, describe, load_collection


class PhotoCollection:
    """A collection of captioned photos as a run trains on it: each photo drawn with one of its own
    captions, cropped and mirrored at random (`PhotoAugmentation`); scored by retrieval, RSum, the sum
    of recall@1, 5 and 10 both ways (at most 600)."""

    score_name = "rsum"  # as the history names it: val_rsum
    score_tag = "rsum"  # as TensorBoard names it: val/rsum, test/rsum
    image_channels = 3

    def __init__(self, args: argparse.Namespace):
        try:
            collection = load_collection(args.data_dir, args.image_size, args.cache_dir)
        except DataError as error:
            raise SystemExit(f"error: {error}") from None
        print("\n".join(describe(collection)))
        self.train = PhotoPairs(collection.train.to(args.device), args.device)
        self.val, self.test = collection.val.to(args.device), collection.test.to(args.device)
        self.class_captions = ()
        self.augment = PhotoAugmentation(args.crop_area, args.flip)

    @staticmethod
    def settings_error(args: argparse.Namespace) -> str | None:
        """What is wrong with settings that do not fit a photo collection, in one line; None when they fit."""
        if args.captions is not None:
            return (
                "--captions makes captions for mnist, fashion and digits: a photo collection brings its own; "
                "leave it out"
            )
        if args.text_encoder == "digit":
            return (
                "--text-encoder digit reads only the captions 0-9: "
                "a collection's captions need --text-encoder transformer or lstm"
            )
        if args.val_size is not None:
            return (
                "--val-size: a photo collection holds out 10% of its photos for validation and 10% for test "
                "(or uses Flickr8k's own splits)"
            )
        return None

    def score(self, model: CLIP, split: CaptionedPhotos, precision: str, process: Process) -> float:
        return retrieval_scores(model, split, precision, process)["rsum"]

    @staticmethod
    def describe_score(value: float) -> str:
        return f"validation RSum {value:.1f}"

    def test_results(self, model: CLIP, precision: str, process: Process) -> tuple[dict, float, str]:
        retrieval = retrieval_scores(model, self.test, precision, process)
        photos = f"{len(self.test):,} photos, {len(self.test.captions):,} captions"
        return {"test_retrieval": retrieval}, retrieval["rsum"], f"test retrieval ({photos}): {rsum_line(retrieval)}"

    @staticmethod
    def infer(model: CLIP, state: dict, args: argparse.Namespace, precision: str, output_dir: Path) -> dict:
        """inference.py for a model of captioned photos: it has no classes, so a photo ranks the split's
        captions, a caption ranks its photos, and --evaluate measures retrieval both ways."""
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
                    f"error: --index {args.index} is outside the {gallery.name} split: "
                    f"pick 0 to {len(gallery.photos) - 1}"
                )
            name = f"{gallery.name} photo {args.index} ({gallery.photos.files[args.index]})"
            queries.append(rank_captions(gallery, name, gallery.image_features[args.index], args.index))
            if classes is not None:
                print_similarities(
                    name, classes, *class_probabilities(model, classes, gallery.image_features[args.index])
                )
        if args.text is not None:
            show_photos_for_caption(model, gallery, args.text, output_dir)
        return {"queries": queries}


@dataclass
class PhotoAugmentation:
    """How training photos are varied, each its own way, on the device: a random part of the
    photo, stretched back to full size (random resized crop), mirrored half of the time."""

    crop_area: float = 0.5  # the smallest share of the photo a crop keeps; 1: no cropping
    flip: bool = True

    @property
    def varies(self) -> bool:
        """Whether it changes the photos at all: a locked tower's features of unvaried ones can be cached."""
        return self.crop_area < 1 or self.flip

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return random_resized_crop(images, self.crop_area, self.flip, generator)


def random_resized_crop(images: torch.Tensor, min_area: float, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Each (N, C, H, W) uint8 image's own random crop, of `min_area` to all of its area and an aspect
    ratio of 3/4 to 4/3 (torchvision's RandomResizedCrop, without its retries), resized to H x W;
    mirrored left to right with probability 1/2 if `flip`."""
    n, _, h, w = images.shape
    u = torch.rand(5, n, device=images.device, generator=generator)
    area = min_area + (1 - min_area) * u[0]
    # Within [area, 1 / area] the crop fits inside the photo, where torchvision would draw again.
    aspect = torch.exp(math.log(3 / 4) + u[1] * math.log(16 / 9)).clamp(min=area, max=1 / area)
    width, height = (area * aspect).sqrt(), (area / aspect).sqrt()  # shares of the side
    # affine_grid maps each output pixel to where it is read from, in [-1, 1] image coordinates.
    centre_x, centre_y = (2 * u[2] - 1) * (1 - width), (2 * u[3] - 1) * (1 - height)
    mirror = torch.where(u[4] < 0.5, -1.0, 1.0) if flip else torch.ones(n, device=images.device)
    zero = torch.zeros(n, device=images.device)
    theta = torch.stack(
        [torch.stack([width * mirror, zero, centre_x], dim=1), torch.stack([zero, height, centre_y], dim=1)], dim=1
    )
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    cropped = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return cropped.round().clamp(0, 255).to(torch.uint8)


CAPTION_QUERIES = 8  # captions whose nearest photos --evaluate draws, for a collection of captioned photos


TSNE_PHOTOS = 300  # photos drawn in its t-SNE, with their captions


@dataclass
class PhotoGallery:
    """A split of captioned photos (photo_files.CaptionedPhotos) and its embeddings: what --evaluate
    measures, and what inference.py retrieves from, for a model trained on such a collection."""

    name: str  # "test" or "validation"
    photos: object  # photo_files.CaptionedPhotos
    image_features: torch.Tensor  # (N, D), unit norm
    caption_features: torch.Tensor  # (K, D), unit norm, one row per caption
    caption_text: torch.Tensor  # (K,) an id of each caption's text: identical texts share one

    def relevant(self, texts: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Whether each image of `images` (Q, k) has a caption of text `texts[q]`, (Q, k) bool."""
        owns = torch.zeros(
            len(self.photos), int(self.caption_text.max()) + 1, dtype=torch.bool, device=self.caption_text.device
        )
        owns[self.photos.caption_image.to(owns.device), self.caption_text] = True
        return owns[images, texts[:, None]]


def evaluate_photos(gallery: PhotoGallery, state: dict, output_dir: Path) -> dict:
    """Every retrieval metric of a collection's split, printed and written to output_dir/metrics.json
    (metrics_val.json), and its figures in output_dir/evaluation/ (evaluation_val/) and TensorBoard:
    the photos nearest to a few of the split's captions, a t-SNE of photos among their captions,
    and the training curves."""
    photos = gallery.photos
    caption_image = photos.caption_image.to(gallery.caption_text.device)
    metrics = image_caption_retrieval(
        gallery.image_features, gallery.caption_features, caption_image, gallery.caption_text
    )
    print(f"{gallery.name} retrieval ({len(photos):,} photos, {len(photos.captions):,} captions): {rsum_line(metrics)}")
    similarity = metrics["similarity"]
    print(
        f"cosine similarity: a photo and its captions {similarity['matching']:+.3f}, "
        f"other pairs {similarity['non_matching']:+.3f}, gap {similarity['gap']:.3f}"
    )
    suffix = "" if gallery.name == "test" else "_val"
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = output_dir / f"metrics{suffix}.json"
    metrics_path.write_text(json.dumps({"split": gallery.name, **metrics}, indent=2))

    from torch.utils.tensorboard import SummaryWriter  # imported here, as in evaluate()

    figure_dir, step = output_dir / f"evaluation{suffix}", state["step"]
    writer = SummaryWriter(str(output_dir))

    def save(figure, name: str) -> None:
        figures.save(figure, figure_dir / f"{name}.png", writer, f"{figure_dir.name}/{name}", step)

    # The first caption of photos spread evenly over the split.
    queried_photos = (
        torch.linspace(0, len(photos) - 1, min(CAPTION_QUERIES, len(photos))).round().long().to(caption_image.device)
    )
    queries = torch.stack([(caption_image == photo).nonzero()[0, 0] for photo in queried_photos])
    top = (gallery.caption_features[queries] @ gallery.image_features.T).topk(min(TOP_K, len(photos)))
    relevant = gallery.relevant(gallery.caption_text[queries], top.indices)
    shown = photos.images[top.indices.cpu()]
    save(
        figures.plot_caption_retrieval(
            [photos.captions[q] for q in queries.tolist()], shown, top.values.cpu(), relevant.cpu()
        ),
        "text_retrieval",
    )

    sample = torch.randperm(len(photos), generator=torch.Generator().manual_seed(0))[:TSNE_PHOTOS].to(
        caption_image.device
    )
    in_sample = torch.isin(caption_image, sample)
    # Renumbered: the sampled photos are 0..S-1 in the figure.
    renumbered = torch.full((len(photos),), -1, dtype=torch.long, device=caption_image.device)
    renumbered[sample] = torch.arange(len(sample), device=caption_image.device)
    figure = figures.plot_caption_tsne(
        gallery.image_features[sample].cpu(),
        gallery.caption_features[in_sample].cpu(),
        renumbered[caption_image[in_sample]].cpu(),
        photos.images[sample.cpu()],
    )
    save(figure, "tsne")
    save(figures.plot_training_curves(state["history"]), "training_curves")
    writer.add_embedding(
        gallery.image_features[sample],
        label_img=photos.images[sample.cpu()].float() / 255,
        global_step=step,
        tag=f"{gallery.name}_photos",
    )
    writer.close()
    print(
        f"metrics in {metrics_path}, figures in {figure_dir}/, "
        f"embeddings in TensorBoard: tensorboard --logdir {output_dir}"
    )
    return metrics


@torch.inference_mode()
def load_photo_gallery(model: CLIP, state: dict, args: argparse.Namespace, precision: str) -> PhotoGallery:
    """The test (or validation) split of the collection the model was trained on, its photos and captions embedded."""
    data_dir, cache_dir = args.data_dir or state["args"]["data_dir"], args.cache_dir or state["args"]["cache_dir"]
    collection = load_collection(data_dir, model.config.image_size, cache_dir)
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
    """--text: the split's TOP_K photos nearest to a caption, by cosine, drawn; green where it is a photo's own."""
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
