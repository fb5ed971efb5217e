"""Text encoders: captions -> (N, embed_dim) features, and the tokenizer that feeds them.

`DigitTextEncoder` is a lookup table of the ten captions "0".."9": the simplest
text side CLIP can have. `TransformerTextEncoder` and `LSTMTextEncoder` read any
sentence in any language, character by character, through `CharTokenizer`.
Characters suit a small model that must read both English and Chinese: a
Chinese character is a word, an English word is a few characters, and a word
never seen in training is still made of characters that were.
"""

from __future__ import annotations

import unicodedata

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

DIGIT_CAPTIONS = tuple(str(digit) for digit in range(10))
PAD, UNKNOWN = 0, 1  # token ids before the characters'
TEXT_ENCODERS = ("digit", "transformer", "lstm", "pretrained")  # pretrained: hf_text.py, from --text-pretrained
LENGTH_GROUPS = 4  # groups of similar length in which the transformer reads a batch's captions


class TextError(ValueError):
    """A caption cannot be read; the message says why and what to do."""


def normalize_text(text: str) -> str:
    """The form in which a caption is read: Unicode NFKC (full-width "７" is "7"), lower case, single spaces."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


class CharTokenizer:
    """Captions -> (N, L) character ids, padded with PAD to the longest caption (at most
    `max_length` characters; a longer caption is cut there). The vocabulary is every
    character of the training captions; any other character reads as UNKNOWN, so an
    unseen word or alphabet never fails. `characters` is all it needs, so a checkpoint
    stores it as a plain string."""

    def __init__(self, characters: str, max_length: int):
        self.characters, self.max_length = characters, max_length
        self.ids = {character: index for index, character in enumerate(characters, start=UNKNOWN + 1)}

    @classmethod
    def from_captions(cls, captions: list[str], max_length: int) -> CharTokenizer:
        return cls(
            "".join(sorted({character for caption in captions for character in normalize_text(caption)})), max_length
        )

    @property
    def vocabulary_size(self) -> int:
        return len(self.characters) + UNKNOWN + 1

    def check(self, caption: str, strict: bool = True) -> str:
        """The caption as it will be read; TextError if it is empty or, when strict, if nothing of it can be read."""
        text = normalize_text(caption)
        if not text:
            raise TextError(f"the caption {caption[:20]!r} is empty: write a few words")
        if strict and not any(character in self.ids for character in text[: self.max_length]):
            raise TextError(
                f"no character of {text[:20]!r} occurs in the training captions: write it in words this model has read"
            )
        return text

    def __call__(self, captions: list[str] | tuple[str, ...], strict: bool = True) -> torch.Tensor:
        """strict=False reads a caption of only unseen characters as unknown ones, as a split's captions are scored:
        a held-out caption may use an alphabet that no training caption did."""
        texts = [self.check(caption, strict)[: self.max_length] for caption in captions]
        tokens = torch.full((len(texts), max(map(len, texts))), PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens[row, : len(text)] = torch.tensor([self.ids.get(character, UNKNOWN) for character in text])
        return tokens

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """(N, L) ids -> the captions as read, with "?" for an unknown character."""
        return [
            "".join(self.characters[i - UNKNOWN - 1] if i > UNKNOWN else "?" for i in row if i != PAD)
            for row in tokens.tolist()
        ]


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
            raise TextError(
                f"this model's text encoder knows only the captions 0-9, not {unknown[0][:20]!r}: "
                "to read sentences, train with --text-encoder transformer --captions templates"
            )
        return torch.tensor([DIGIT_CAPTIONS.index(c) for c in captions], dtype=torch.long)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)  # (N, hidden)
        return self.projection(x + self.mlp(x))


class TransformerTextEncoder(nn.Module):
    """A small pre-LayerNorm transformer over characters: token and position embeddings, `layers`
    blocks of self-attention in which padding takes no part, then the mean over the caption's own
    characters, projected to the shared embedding."""

    def __init__(self, vocabulary_size: int, max_length: int, width: int, layers: int, heads: int, embed_dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocabulary_size, width, padding_idx=PAD)
        self.position_embedding = nn.Parameter(torch.randn(max_length, width) * 0.02)
        block = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.projection = nn.Linear(width, embed_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # A padded position costs as much as a character. The captions of a batch are read in
        # groups of similar length, each cut to its own longest caption: the templates average
        # 10 characters but are padded to 31, so this reads about a third of the positions.
        lengths = (tokens != PAD).sum(dim=1)
        order = lengths.argsort()
        groups = order.chunk(LENGTH_GROUPS)
        # Sorted, each group's last caption is its longest: one wait for the device, not one per group.
        longest = lengths[torch.stack([group[-1] for group in groups])].clamp(min=1).tolist()
        read = [self.read(tokens[group, :length]) for group, length in zip(groups, longest, strict=True)]
        return torch.cat(read)[order.argsort()]

    def read(self, tokens: torch.Tensor) -> torch.Tensor:
        padding = tokens == PAD  # (N, L)
        x = self.token_embedding(tokens) + self.position_embedding[: tokens.shape[1]]
        x = self.norm(self.blocks(x, src_key_padding_mask=padding))  # (N, L, width)
        keep = (~padding).unsqueeze(-1).to(x.dtype)
        return self.projection((x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1))


class LSTMTextEncoder(nn.Module):
    """A bidirectional LSTM over characters, packed so that padding never enters it; the last
    hidden state of each direction, projected to the shared embedding."""

    def __init__(self, vocabulary_size: int, width: int, layers: int, embed_dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocabulary_size, width, padding_idx=PAD)
        self.lstm = nn.LSTM(width, width, num_layers=layers, batch_first=True, bidirectional=True)
        self.projection = nn.Linear(2 * width, embed_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        lengths = (tokens != PAD).sum(dim=1).clamp(min=1).cpu()  # packing wants them on the CPU
        packed = pack_padded_sequence(self.token_embedding(tokens), lengths, batch_first=True, enforce_sorted=False)
        _, (hidden, _) = self.lstm(packed)  # (2 * layers, N, width): the last layer's two directions come last
        return self.projection(torch.cat([hidden[-2], hidden[-1]], dim=1))
