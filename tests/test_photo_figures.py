"""The figures of image-caption collections: each draws grey and colour images, and Chinese captions, and shows
what its inputs say. figures.py selects matplotlib's Agg backend, so nothing opens a window."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.collections import LineCollection
from matplotlib.colors import same_color
from matplotlib.figure import Figure
from matplotlib.offsetbox import AnnotationBbox

import figures

SHAPES = {
    "grey": (28, 28),
    "colour": (3, 24, 32),
}  # one image's shape; colour ones not square, so a transposition shows
CAPTIONS = [
    "a black dog runs across the grass with a stick in its mouth",
    "一只小狗在草地上奔跑，嘴里叼着一根树枝",
    "a 7",
]


def rendered(figure: Figure) -> None:
    """Draw `figure` to a PNG in memory, as `figures.save` does: images and text are only laid out then."""
    figure.savefig(io.BytesIO(), format="png")


def assert_draws(artist, image: torch.Tensor) -> None:
    """`artist` (an axis' image or a thumbnail's) draws `image`: a (3, H, W) one as (H, W, 3) colours, a (H, W) one
    in grey from 0 black to 255 white, whatever range the picture holds (a faint digit stays faint)."""
    if image.ndim == 3:
        np.testing.assert_array_equal(artist.get_array(), image.numpy().transpose(1, 2, 0))
    else:
        np.testing.assert_array_equal(artist.get_array(), image.numpy())
        assert (artist.get_cmap().name, artist.norm.vmin, artist.norm.vmax) == ("gray", 0, 255)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES)
def test_caption_retrieval_shows_each_caption_and_titles_its_images_by_relevance(shape: tuple[int, ...]):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 5, *shape), dtype=torch.uint8, generator=generator)
    scores = torch.rand(3, 5, generator=generator)
    relevant = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    figure = figures.plot_caption_retrieval(CAPTIONS, images, scores, relevant)
    rows = np.array(figure.axes).reshape(3, 6)
    for row, caption in enumerate(CAPTIONS):
        text_axis, *image_axes = rows[row]
        assert not text_axis.images
        (text,) = text_axis.texts
        assert "".join(text.get_text().split()) == "".join(caption.split())  # the whole caption, wrapped
        assert (len(text.get_text().splitlines()) > 1) == (caption != "a 7")  # the long ones on several lines
        for column, axis in enumerate(image_axes):
            assert_draws(axis.images[0], images[row, column])
            assert axis.get_title() == f"{scores[row, column]:.2f}"
            assert same_color(axis.title.get_color(), "green" if relevant[row, column] else "red")
    rendered(figure)


def caption_collection(
    shape: tuple[int, ...], gap: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ten images with three captions each (40 points), every caption near its image; `gap` moves the images
    and the captions apart, along opposite ways of one axis, as CLIP's modality gap does:
    (image_features, caption_features, caption_image, thumbnails)."""
    generator = torch.Generator().manual_seed(0)
    caption_image = torch.arange(10).repeat_interleave(3)
    centres = F.normalize(torch.randn(10, 16, generator=generator), dim=1)
    offset = gap * F.one_hot(torch.tensor(0), 16)
    images = F.normalize(centres + 0.05 * torch.randn(10, 16, generator=generator) + offset, dim=1)
    captions = F.normalize(centres[caption_image] + 0.05 * torch.randn(30, 16, generator=generator) - offset, dim=1)
    return images, captions, caption_image, torch.randint(0, 256, (10, *shape), dtype=torch.uint8, generator=generator)


def dots(figure: Figure) -> tuple[np.ndarray, np.ndarray]:
    """The t-SNE map's image and caption coordinates, from its two scatter plots."""
    scatters = {collection.get_label(): collection.get_offsets() for collection in figure.axes[0].collections}
    return np.asarray(scatters["image"]), np.asarray(scatters["caption"])


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES)
def test_caption_tsne_pictures_a_few_images_and_joins_each_to_its_own_captions(shape: tuple[int, ...]):
    images, captions, caption_image, thumbnails = caption_collection(shape)
    figure = figures.plot_caption_tsne(images, captions, caption_image, thumbnails)
    image_xy, caption_xy = dots(figure)
    assert (len(image_xy), len(caption_xy)) == (10, 30)
    boxes = [artist for artist in figure.axes[0].artists if isinstance(artist, AnnotationBbox)]
    assert len(boxes) == figures.THUMBNAILS
    pictured = []
    for box in boxes:
        (i,) = np.flatnonzero((image_xy == box.xy).all(axis=1))  # each picture points at an image's dot...
        assert_draws(box.offsetbox.image, thumbnails[i])  # ...and is that image
        pictured.append(i)
    (lines,) = [collection for collection in figure.axes[0].collections if isinstance(collection, LineCollection)]
    drawn = {(tuple(start), tuple(end)) for start, end in lines.get_segments()}
    assert drawn == {
        (tuple(image_xy[i]), tuple(caption_xy[k]))
        for i in pictured
        for k in (caption_image == i).nonzero().flatten().tolist()
    }
    assert "t-SNE" in figure.axes[0].get_title()
    rendered(figure)


def test_caption_tsne_centres_each_modality_so_images_land_among_their_captions():
    # Images and captions in two cones apart: uncentred, t-SNE maps them as two islands, and an image's
    # nearest dot is another image; centred, each image lands among its own three captions.
    images, captions, caption_image, thumbnails = caption_collection(SHAPES["grey"], gap=1.0)

    def nearest_dot_is_own_caption(centre: bool) -> list[bool]:
        image_xy, caption_xy = dots(
            figures.plot_caption_tsne(images, captions, caption_image, thumbnails, centre=centre)
        )
        points, owner = np.concatenate([image_xy, caption_xy]), np.concatenate([np.full(10, -1), caption_image.numpy()])
        distances = np.linalg.norm(image_xy[:, None] - points[None], axis=2)
        distances[np.arange(10), np.arange(10)] = np.inf  # not itself
        return [owner[nearest] == i for i, nearest in enumerate(distances.argmin(axis=1))]

    assert all(nearest_dot_is_own_caption(centre=True))
    assert not any(nearest_dot_is_own_caption(centre=False))
