"""LiT's shortcut: a locked image tower whose input is not augmented gives every training image the same features
in every epoch, so they are computed once, kept on disk, and training costs only the projections and the text side.

The cache file is named by a hash of what decides the features: the tower's weights, the images' pixels, their
size and the precision they were computed in. Another weights file, another collection or another size misses
it and computes anew; a later run on the same finds it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from tqdm import tqdm

from dataset import model_input
from image_encoder import tower_features
from photo_files import write_atomically
from utils import autocast

BATCH = 64  # images a step: a 224-pixel batch of EfficientNet-Lite0 stays within a few hundred MB


def features_key(model, images: torch.Tensor, precision: str) -> str:
    """A hash of the tower (its name and every weight and statistic), the pixels, their size and the precision."""
    digest = hashlib.sha256(f"{model.config.image_encoder} {tuple(images.shape)} {precision}".encode())
    for value in model.image_encoder.state_dict().values():
        digest.update(value.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(images.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


@torch.inference_mode()
def locked_features(model, images: torch.Tensor, precision: str, cache_dir: Path) -> torch.Tensor:
    """(N, F) the locked image tower's features of (N, C, H, W) uint8 images, from the cache in `cache_dir` or
    computed now (with a progress bar) and cached there; on the images' device."""
    path = Path(cache_dir) / f"features-{model.config.image_encoder}-{features_key(model, images, precision)}.pt"
    if path.is_file():
        print(f"locked image tower: features of {len(images):,} images read from {path}")
        return torch.load(path, map_location=images.device, weights_only=True)
    encoder, device = model.image_encoder, next(model.parameters()).device
    was_training = encoder.training
    encoder.eval()
    chunks = []
    for start in tqdm(range(0, len(images), BATCH), desc="locked image tower: features", leave=False):
        with autocast(device, precision):
            chunks.append(
                tower_features(
                    encoder, model.config.image_encoder, model_input(images[start : start + BATCH].to(device))
                ).float()
            )
    encoder.train(was_training)
    features = torch.cat(chunks).to(images.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda temporary: torch.save(features, temporary))
    print(f"locked image tower: features of {len(images):,} images computed and cached in {path}")
    return features
