"""CLIP: an image encoder and a text encoder trained into one embedding space.

Both encoders map their input to `embed_dim` features that are L2-normalised,
so an image-text similarity is a cosine in [-1, 1]. A learned temperature
(`logit_scale`, used as exp(logit_scale)) sharpens the cosines into logits, and
the symmetric InfoNCE loss pulls matching image-text pairs together and pushes
the others apart (Radford et al., 2021).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from image_encoder import IMAGE_ENCODERS, ImageEncoder, image_tower, tower_groups, tower_head
from text_encoder import (
    DIGIT_CAPTIONS,
    TEXT_ENCODERS,
    CharTokenizer,
    DigitTextEncoder,
    LSTMTextEncoder,
    TransformerTextEncoder,
)

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's cap: cosines are never scaled by more than 100


@dataclass
class CLIPConfig:
    image_encoder: str = "resnet"  # one of image_encoder.IMAGE_ENCODERS
    image_channels: int = 1  # 1 for grey digits and garments, 3 for colour photos
    image_size: int = 28  # pixels on a side
    image_widths: tuple[int, ...] = (16, 32, 64, 128)  # resnet's only
    image_blocks_per_stage: int = 1  # resnet's only
    text_encoder: str = "digit"  # one of text_encoder.TEXT_ENCODERS
    text_hidden_dim: int = 64
    text_layers: int = 2  # transformer blocks, or LSTM layers
    text_heads: int = 4
    text_characters: str = ""  # the tokenizer's vocabulary: every character of the training captions
    text_max_length: int = 64  # characters (tokens, for a pretrained tower) read of a caption
    # A pretrained tower's Hugging Face config, tokenizer files and pooling (hf_text.read_folder), for text_encoder
    # "pretrained": what rebuilds it without the folder it came from.
    text_model: dict | None = None
    embed_dim: int = 64
    # Embed an image, outside training, as the mean of its features and its mirror image's: for a
    # model trained on mirrored images, whose test images may face either way (test-time augmentation).
    image_mirror_average: bool = False
    # Each digit's captions, whose embeddings are averaged to classify (prompt ensembling).
    class_captions: tuple[tuple[str, ...], ...] = tuple((caption,) for caption in DIGIT_CAPTIONS)

    @classmethod
    def from_dict(cls, values: dict) -> CLIPConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config fields {unknown}")
        values = dict(values)
        values["image_widths"] = tuple(values.get("image_widths", cls.image_widths))
        values["class_captions"] = tuple(map(tuple, values.get("class_captions", cls.class_captions)))
        if values.get("text_encoder", cls.text_encoder) not in TEXT_ENCODERS:
            raise ValueError(f"unknown text encoder {values['text_encoder']!r}")
        if values.get("image_encoder", cls.image_encoder) not in IMAGE_ENCODERS:
            raise ValueError(f"unknown image encoder {values['image_encoder']!r}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        if config.image_encoder != "resnet":  # a photo tower that can start from ImageNet weights
            self.image_encoder = image_tower(
                config.image_encoder, config.embed_dim, config.image_channels, config.image_size
            )
        else:
            self.image_encoder = ImageEncoder(
                config.image_widths, config.image_blocks_per_stage, config.embed_dim, config.image_channels
            )
        self.tokenizer = CharTokenizer(config.text_characters, config.text_max_length)
        if config.text_encoder == "digit":
            self.text_encoder = DigitTextEncoder(config.text_hidden_dim, config.embed_dim)
        elif config.text_encoder == "pretrained":
            from hf_text import PretrainedTextEncoder  # imported here: only this tower needs transformers

            self.text_encoder = PretrainedTextEncoder(config.text_model, config.text_max_length, config.embed_dim)
        elif config.text_encoder == "transformer":
            size = self.tokenizer.vocabulary_size
            self.text_encoder = TransformerTextEncoder(
                size,
                config.text_max_length,
                config.text_hidden_dim,
                config.text_layers,
                config.text_heads,
                config.embed_dim,
            )
        else:
            self.text_encoder = LSTMTextEncoder(
                self.tokenizer.vocabulary_size, config.text_hidden_dim, config.text_layers, config.embed_dim
            )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.locked: list[nn.Module] = []  # what lock() froze; a plain list, so that it adds no state dict keys

    def lock(self, tower: str, unlocked_groups: int = 0) -> None:
        """LiT's locked tower: a pretrained image or text tower frozen but for its last `unlocked_groups` groups of
        layers (stages, or transformer blocks). Frozen layers stay in eval mode, so batch norm keeps its ImageNet
        statistics and dropout stays off, whatever train() says; the tower's projection always trains."""
        if tower == "image":
            groups = tower_groups(self.image_encoder, self.config.image_encoder)
        else:
            groups = self.text_encoder.groups()
        if not 0 <= unlocked_groups <= len(groups):
            raise ValueError(
                f"the {tower} tower has {len(groups)} groups of layers; {unlocked_groups} cannot stay unlocked"
            )
        for group in groups[: len(groups) - unlocked_groups]:
            group.requires_grad_(False)
            self.locked.append(group)
        self.train(self.training)

    def train(self, mode: bool = True) -> CLIP:
        super().train(mode)
        for module in self.locked:
            module.eval()
        return self

    def tokenize(self, captions: list[str] | tuple[str, ...], strict: bool = True) -> torch.Tensor:
        """Captions -> the token tensor their text encoder reads; text_encoder.TextError when it cannot (for the
        character encoders, not strict: only when a caption is empty)."""
        # The digit table and a pretrained tower bring their own tokenizer; the character encoders share one.
        if hasattr(self.text_encoder, "tokenize"):
            return self.text_encoder.tokenize(captions)
        return self.tokenizer(captions, strict)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(N, C, H, W) normalised images, or (N, F) a locked tower's cached features (feature_cache.py)
        -> (N, embed_dim), unit norm unless normalize=False."""
        if images.ndim == 2:
            features = tower_head(self.image_encoder, self.config.image_encoder)(images).float()
            return F.normalize(features, dim=-1) if normalize else features
        features = self.image_encoder(images).float()  # the cosines and the loss stay in fp32
        if self.config.image_mirror_average and not self.training:
            features = (features + self.image_encoder(images.flip(-1)).float()) / 2
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        # On a CPU, bf16 pays only in large matrix products. The text encoders' are small (width 64),
        # and the casts cost more than they save: a transformer step on 215 captions took 158 ms in
        # bf16 and 56 ms in fp32. So text is read in fp32 there, even under autocast.
        with torch.autocast("cpu", enabled=False):
            if tokens.is_floating_point():  # (N, H) a locked pretrained tower's pooled features, computed once
                features = self.text_encoder.projection(tokens).float()
            else:
                features = self.text_encoder(tokens).float()
        return F.normalize(features, dim=-1) if normalize else features

    def encode_classes(self, class_captions: tuple[tuple[str, ...], ...] | None = None) -> torch.Tensor:
        """(C, embed_dim) unit-norm: each class's captions (by default those it was trained to
        classify with) embedded, averaged and normalised again: CLIP's prompt ensembling."""
        class_captions = class_captions or self.config.class_captions
        captions = [caption for captions_of_class in class_captions for caption in captions_of_class]
        features = self.encode_text(self.tokenize(captions).to(self.logit_scale.device))
        per_class = features.split([len(captions_of_class) for captions_of_class in class_captions])
        return F.normalize(torch.stack([class_features.mean(dim=0) for class_features in per_class]), dim=-1)

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N_images, N_texts) similarity logits of every image with every text, in fp32 under
        autocast too: bf16's 8-bit mantissa would round cosines near 1 by up to 0.004. With
        features=True, what they are made of instead, as open_clip returns it: the unit-norm fp32
        features of the images and of the texts, and the scale exp(logit_scale). Training among
        several processes needs them to gather the features, and calls forward() all the same,
        which DistributedDataParallel needs to average the gradients."""
        image_features = self.encode_image(images)
        text_features = self.encode_text(tokens)
        if features:
            return image_features, text_features, self.logit_scale.exp()
        with torch.autocast(images.device.type, enabled=False):
            return self.logit_scale.exp() * image_features @ text_features.T

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Call after each optimizer step, as CLIP does, so the scale never exceeds 100."""
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def clip_loss(
    logits_per_image: torch.Tensor, positives: torch.Tensor, drawn: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE over B images and the B captions they drew; logits_per_image: (B, T), each
    image against each caption; positives[i, t] says whether caption t describes image i.

    MNIST has ten classes, so a batch holds many images of the same digit. Plain CLIP
    targets (the diagonal) would push an image away from every other caption of its own
    digit; instead every pair in which the caption describes the image is a positive: an
    image's target is spread evenly over the captions that describe it, and a caption's
    over the images it describes. Where each caption describes its own image alone, the
    target is the diagonal and this is CLIP's loss exactly.

    A caption that several images drew is scored once: drawn[t] says how many images drew caption t
    (None: one each, T = B), and the loss is that of the (B, B) logits in which it appears drawn[t]
    times. MNIST's batch of 1024 then costs a (1024, 10) matrix instead of a (1024, 1024) one.
    """
    logits, positives = logits_per_image.float(), positives.float()
    drawn = torch.ones(logits.shape[1], device=logits.device) if drawn is None else drawn.float()
    # Image to text: a softmax over the B captions, in which caption t appears drawn[t] times (log 0 = -inf:
    # a caption encoded but drawn by none is no candidate), the target spread over those that describe the image.
    weights = positives * drawn
    image_to_text = torch.logsumexp(logits + drawn.log(), dim=1) - (weights * logits).sum(1) / weights.sum(1)
    # Text to image: for each caption, a softmax over the images, the target spread over those it describes;
    # each caption counts as often as it was drawn.
    per_caption = torch.logsumexp(logits, dim=0) - (positives * logits).sum(0) / positives.sum(0).clamp(min=1)
    text_to_image = (drawn * per_caption).sum() / drawn.sum()
    return (image_to_text.mean() + text_to_image) / 2
