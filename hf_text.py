"""A pretrained text tower: any BERT-like Hugging Face folder (all-MiniLM-L6-v2, bert-base-uncased,
bert-base-chinese, ...) read with transformers, pooled, and projected to the shared embedding.

Nothing is downloaded: the folder is one the user has (`local_files_only`). What the tower needs to be
rebuilt, its config, its tokenizer's files and its pooling, goes into the model's config, and its
weights into the model's state dict, so a checkpoint runs with the folder gone (open_clip's
hf_model.py does the same with a model name and a hub). transformers is imported only here, so the
digit models never need it: `pip install -r requirements-pretrained.txt` brings it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from text_encoder import TextError, normalize_text

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
POOLINGS = ("mean", "cls", "max")
# sentence-transformers' 1_Pooling/config.json names its pooling by these keys.
POOLING_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}


class PretrainedError(RuntimeError):
    """A pretrained tower cannot be used; the message names the problem and the fix, in one line."""


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise PretrainedError(
            "a pretrained text tower needs transformers: pip install -r requirements-pretrained.txt"
        ) from None
    transformers.logging.set_verbosity_error()  # its notes on unused pooler weights are not the user's concern
    return transformers


def read_folder(folder: Path, pooling: str | None = None) -> dict:
    """What a model config keeps of a Hugging Face folder: its config.json, its tokenizer's files and the
    pooling (`pooling`, else the folder's sentence-transformers config, else mean). PretrainedError names
    what the folder lacks."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PretrainedError(f"--text-pretrained {folder} has no config.json: give a Hugging Face model folder")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise PretrainedError(f"--text-pretrained {folder} has no weights ({' or '.join(WEIGHT_FILES)})")
    tokenizer_files = {
        name: (folder / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES if (folder / name).is_file()
    }
    if not {"tokenizer.json", "vocab.txt"} & set(tokenizer_files):
        raise PretrainedError(f"--text-pretrained {folder} has no tokenizer (tokenizer.json or vocab.txt)")
    if pooling is None:
        pooling_config = folder / "1_Pooling" / "config.json"
        said = json.loads(pooling_config.read_text()) if pooling_config.is_file() else {}
        pooling = next((name for key, name in POOLING_KEYS.items() if said.get(key)), "mean")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return {"config": config, "tokenizer_files": tokenizer_files, "pooling": pooling}


def tokenizer_from_files(files: dict[str, str]):
    """The tokenizer that `files` (name -> text) make up, read as transformers reads a folder."""
    with tempfile.TemporaryDirectory() as folder:
        for name, text in files.items():
            Path(folder, name).write_text(text, encoding="utf-8")
        return transformers_module().AutoTokenizer.from_pretrained(folder, local_files_only=True)


class PretrainedTextEncoder(nn.Module):
    """A Hugging Face encoder (`model`) rebuilt from its config, its hidden states pooled over each
    caption's own tokens, projected to the shared embedding. Its weights come from the folder once
    (`load_folder_weights`), at the start of training, and from checkpoints after."""

    def __init__(self, text_model: dict, max_length: int, embed_dim: int):
        super().__init__()
        transformers = transformers_module()
        config = transformers.AutoConfig.for_model(**text_model["config"])
        self.model = transformers.AutoModel.from_config(config, add_pooling_layer=False)
        self.tokenizer = tokenizer_from_files(text_model["tokenizer_files"])
        self.pooling, self.max_length = text_model["pooling"], max_length
        self.projection = nn.Linear(config.hidden_size, embed_dim)

    def groups(self) -> list[nn.Module]:
        """The encoder's layers in the order a caption meets them, in the groups that can stay unlocked: the
        embeddings, then each transformer block (CLIP.lock)."""
        return [self.model.embeddings, *self.model.encoder.layer]

    def load_folder_weights(self, folder: Path) -> None:
        """The encoder's weights from the folder it was read from; PretrainedError if they do not fit."""
        transformers = transformers_module()
        try:
            pretrained = transformers.AutoModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False)
        except OSError as error:
            raise PretrainedError(f"--text-pretrained {folder}: its weights cannot be read ({error})") from None
        own, theirs = self.model.state_dict(), pretrained.state_dict()
        misfits = [name for name in own if name not in theirs or theirs[name].shape != own[name].shape]
        if misfits:
            raise PretrainedError(f"--text-pretrained {folder}: {len(misfits)} of {len(own)} tensors do not fit")
        self.model.load_state_dict(theirs, strict=False)

    def tokenize(self, captions: list[str] | tuple[str, ...]) -> torch.Tensor:
        """Captions -> (N, L) token ids, padded with the tokenizer's pad id, cut at max_length tokens;
        TextError for an empty caption."""
        empty = [caption for caption in captions if not normalize_text(caption)]
        if empty:
            raise TextError(f"the caption {empty[0][:20]!r} is empty: write a few words")
        return self.tokenizer(
            list(captions), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )["input_ids"]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.projection(self.pooled(tokens))

    @torch.no_grad()  # not inference mode: the projection trains on these features
    def pooled_features(self, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """(N, H) every caption's pooled features, in eval mode: what a locked tower gives its captions in every
        step, so that training computes them once and then reads them (CLIP.encode_text)."""
        modes = [(module, module.training) for module in self.modules()]  # restored one by one: some are locked
        self.eval()
        chunks = [self.pooled(tokens[start : start + batch_size]) for start in range(0, len(tokens), batch_size)]
        for module, training in modes:
            module.training = training
        return torch.cat(chunks)

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = tokens != self.tokenizer.pad_token_id  # (N, L): the caption's own tokens
        hidden = self.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state  # (N, L, H)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":
            pooled = hidden.masked_fill(~mask[..., None], float("-inf")).amax(dim=1)
        else:
            keep = mask[..., None].to(hidden.dtype)
            pooled = (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
        return pooled
