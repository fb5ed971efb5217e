"""Text encoders: captions -> (N, embed_dim) features.

A text encoder turns captions into token tensors with `tokenize` and token
tensors into features with `forward`. The training loop only uses these two,
so a free-text encoder (a small transformer over characters, say) can be added
beside `DigitTextEncoder` without touching it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

DIGIT_CAPTIONS = tuple(str(digit) for digit in range(10))


class DigitTextEncoder(nn.Module):
    """One learned embedding per digit caption "0".."9", refined by a small MLP."""

    def __init__(self, hidden_dim: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(len(DIGIT_CAPTIONS), hidden_dim)
        self.mlp = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim))
        self.projection = nn.Linear(hidden_dim, embed_dim)

    @staticmethod
    def tokenize(captions: list[str] | tuple[str, ...]) -> torch.Tensor:
        """Captions "0".."9" -> (N,) token ids."""
        unknown = [c for c in captions if c not in DIGIT_CAPTIONS]
        if unknown:
            raise ValueError(f"the digit text encoder knows only the captions 0-9, not {unknown[:3]}")
        return torch.tensor([DIGIT_CAPTIONS.index(c) for c in captions], dtype=torch.long)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)  # (N, hidden)
        return self.projection(x + self.mlp(x))
