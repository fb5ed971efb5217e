"""Each data set's recipe: the settings its runs take where the command line says nothing else.

Declared once, as real values; `python train.py --help` shows MNIST's, and the help of each flag
named here says that the data set can change it. MNIST's recipe reaches 99.59% zero-shot test
accuracy in half the time of the recipe before it (99.55% in fp32, docs/results.md); the others
say only how they differ from it.
"""

from __future__ import annotations

from image_encoder import TOWER_INPUTS

MNIST = dict(
    # Five stages, the first only 8 channels wide at 28x28: a third of the arithmetic an image of four
    # stages of 16 to 128 channels. Batches of 1024 at a higher peak learning rate bring twelve epochs of
    # it within 0.1 point of their test accuracy in under half the time (docs/experiments/mnist-speed.md).
    image_widths=(8, 16, 32, 64, 128),
    epochs=12,
    batch_size=1024,
    lr=6e-3,
    val_size=5000,  # validation images held out from the 60,000 training images, the same whatever --seed
    # Handwriting varies by a few pixels, degrees and per cent; digits are never mirrored.
    max_shift=2.0,
    max_rotation=10.0,
    max_scale=0.1,
    flip=False,
    erase=0.0,
    crop_area=1.0,
    image_size=28,
    mirror_average=False,
    captions="label",
    text_encoder="digit",
    text_max_length=64,
)

# The recipe MNIST had before (14 epochs of four stages, 16 to 128 channels): the other data sets were
# tuned on it, and keep it.
FOUR_STAGES = dict(image_widths=(16, 32, 64, 128), epochs=14, batch_size=512, lr=3e-3)

RECIPES = {
    "mnist": MNIST,
    # Clothes are mirrored, digits never; a model of clothes then embeds each image as the mean of it and
    # its mirror image (test-time augmentation). Fashion-MNIST centres and scales every garment the same
    # way, so shifting or scaling them only teaches poses the test never shows (chosen on validation).
    "fashion": MNIST
    | FOUR_STAGES
    | dict(epochs=18, max_shift=0.0, max_rotation=0.0, max_scale=0.0, flip=True, erase=0.5, mirror_average=True),
    # The offline digits are 1,797 images: smaller batches give them enough steps.
    "digits": MNIST | FOUR_STAGES | dict(val_size=300, batch_size=128),
    # A photo collection is cropped at random and mirrored, at a size a CPU trains on; it brings its own
    # captions and splits (so no --captions and no --val-size), sentences the transformer reads.
    "photos": MNIST
    | FOUR_STAGES
    | dict(epochs=30, batch_size=128, max_shift=0.0, max_rotation=0.0, max_scale=0.0, flip=True, crop_area=0.5)
    | dict(image_size=64, val_size=None, captions=None, text_encoder="transformer", text_max_length=128),
}

# An attribute caption states the slant, thickness and width measured on the image as it is: rotating
# it changes the slant and scaling it the other two, so the caption would no longer say what the image
# shows. These take precedence over the data set's recipe.
CAPTION_RECIPES = {"attributes": dict(max_rotation=0.0, max_scale=0.0)}


# A locked image tower (--lock-image) reads each photo as it is, as LiT trains: then its features are the same in
# every epoch, and computed once (feature_cache.py).
LOCKED_IMAGE_RECIPE = dict(flip=False, crop_area=1.0)


def recipe(
    dataset: str, captions: str | None = None, pretrained_tower: str | None = None, locked: bool = False
) -> dict:
    """The settings of a data set's runs, with those that its captions (--captions) change, the image size that a
    pretrained image tower was trained at (--pretrained-weights), and a locked image tower's (--lock-image)."""
    settings = RECIPES[dataset] | CAPTION_RECIPES.get(captions or RECIPES[dataset]["captions"], {})
    if pretrained_tower in TOWER_INPUTS:
        settings |= {"image_size": TOWER_INPUTS[pretrained_tower][2]}
    return settings | (LOCKED_IMAGE_RECIPE if locked else {})
