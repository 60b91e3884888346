"""
Backbones: load a masked-diffusion LM and describe it to the trainer.

`DLLMJEPA` only needs a model that returns logits and hidden states, plus two facts (the
mask id, whether logits are shifted). The trainer needs one more: where the transformer
blocks are, to shard them and checkpoint their activations. An adapter per family supplies
these facts; `load_backbone` detects the family from the model's config.
"""

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

import tiny_model


@dataclass(frozen=True)
class Family:
    name: str
    blocks: Callable[[nn.Module], nn.ModuleList]  # the transformer blocks, in order
    shift_logits: bool = False                     # output at i predicts token i + 1 (Dream)


FAMILIES = {
    tiny_model.TinyDLMConfig.model_type: Family("tiny-dlm", blocks=lambda m: m.layers),
}


@dataclass
class Backbone:
    model: nn.Module
    tokenizer: object
    family: Family
    mask_token_id: int

    @property
    def blocks(self) -> nn.ModuleList:
        return self.family.blocks(self.model)


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"unknown model family model_type={model_type!r}: supported are {sorted(FAMILIES)}. "
            "To add one, give backbones.FAMILIES an adapter naming its transformer blocks and "
            "whether its logits are shifted, and make sure its config has mask_token_id")
    return FAMILIES[model_type]


def mask_token_id_of(config, tokenizer) -> int:
    mask_id = getattr(config, "mask_token_id", None)
    if mask_id is None:
        mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise ValueError("the model has no mask token: neither config.mask_token_id nor "
                         "tokenizer.mask_token_id is set")
    if not 0 <= mask_id < config.vocab_size:
        raise ValueError(f"mask_token_id={mask_id} lies outside the vocabulary "
                         f"(vocab_size={config.vocab_size})")
    return mask_id


def new_tiny_backbone(**overrides) -> Backbone:
    """A randomly initialised tiny model with its byte-level tokenizer (no files, no network)."""
    tokenizer = tiny_model.make_tokenizer()
    model = tiny_model.make_tiny_model(tokenizer, **overrides)
    return Backbone(model, tokenizer, family_of(model.config), model.config.mask_token_id)


def load_backbone(name_or_path: str, dtype: torch.dtype = torch.float32) -> Backbone:
    """A hub id or a local folder holding a model saved with save_pretrained."""
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=True)
    family = family_of(config)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=True)
    model = AutoModel.from_pretrained(name_or_path, config=config, dtype=dtype,
                                      trust_remote_code=True)
    return Backbone(model, tokenizer, family, mask_token_id_of(config, tokenizer))
