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

from image_encoder import ImageEncoder
from text_encoder import DIGIT_CAPTIONS, DigitTextEncoder

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's cap: cosines are never scaled by more than 100


@dataclass
class CLIPConfig:
    image_widths: tuple[int, ...] = (16, 32, 64, 128)
    image_blocks_per_stage: int = 1
    text_hidden_dim: int = 64
    embed_dim: int = 64

    @classmethod
    def from_dict(cls, values: dict) -> CLIPConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config fields {unknown}")
        values = dict(values)
        values["image_widths"] = tuple(values.get("image_widths", cls.image_widths))
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config.image_widths, config.image_blocks_per_stage, config.embed_dim)
        self.text_encoder = DigitTextEncoder(config.text_hidden_dim, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.image_encoder(images).float()  # the cosines and the loss stay in fp32
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.text_encoder(tokens).float()
        return F.normalize(features, dim=-1) if normalize else features

    def class_tokens(self, device: torch.device | str) -> torch.Tensor:
        """Tokens of the ten digit captions, in digit order."""
        return self.text_encoder.tokenize(DIGIT_CAPTIONS).to(device)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(N_images, N_texts) similarity logits of every image with every text, in fp32 under
        autocast too: bf16's 8-bit mantissa would round cosines near 1 by up to 0.004."""
        image_features = self.encode_image(images)
        text_features = self.encode_text(tokens)
        with torch.autocast(images.device.type, enabled=False):
            return self.logit_scale.exp() * image_features @ text_features.T

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Call after each optimizer step, as CLIP does, so the scale never exceeds 100."""
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def clip_loss(logits_per_image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch whose i-th image and i-th text share labels[i].

    MNIST has ten classes, so a batch holds many pairs of the same digit. Plain
    CLIP targets (the diagonal) would push an image away from every other
    caption of its own digit; instead every image-text pair with the same label
    is a positive, each image's target spread evenly over its positives. With
    distinct labels the target is the diagonal and this is CLIP's loss exactly.
    """
    positives = (labels[:, None] == labels[None, :]).float()  # (B, B), symmetric
    targets = positives / positives.sum(dim=1, keepdim=True)
    logits = logits_per_image.float()
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
