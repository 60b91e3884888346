"""
A tiny bidirectional transformer and byte-level tokenizer that train on a laptop CPU.

It has the shape of the masked-diffusion LMs DLLM-JEPA fine-tunes (LLaDA-8B, Dream-7B)
at a thousandth of their width, so every line of `dllm_jepa.py` and `train.py` runs on it
unchanged:
- full (non-causal) attention through F.scaled_dot_product_attention: a diffusion LM sees
  the whole canvas, masked positions included,
- RMSNorm, rotary position embeddings and SwiGLU MLPs, as in LLaDA (Nie et al., 2025),
- the blocks sit in `model.layers` (the FSDP and activation-checkpointing loops walk it),
- forward returns logits and every hidden state (embeddings, then one per block, the last
  one after the final norm), the seam `dllm_jepa.DLLMJEPA` reads,
- forward can take the keys and values of earlier positions (`past_key_values`) and return
  its own (`use_cache`): what dlm/sampler.py's prefix cache reuses across a block's steps.

It is a transformers `PreTrainedModel`, so save_pretrained / from_pretrained / AutoModel
work offline, and `make_tokenizer()` builds a real `PreTrainedTokenizerFast` (256 byte
tokens plus specials, a chat template), so prompts go through `apply_chat_template` exactly
as they do for LLaDA and Dream.
"""

import json
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerFast)
from transformers.modeling_outputs import MaskedLMOutput

SPECIAL_TOKENS = ["<|eos|>", "<|mask|>", "<|user|>", "<|assistant|>", "<|system|>"]
# Roles become special tokens, so a chat prompt can never be confused with its content.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_level_chars() -> list[str]:
    """The printable character that byte-level BPE (GPT-2) uses for each byte 0..255:
    printable Latin-1 bytes stand for themselves, the others take code points from 256 on.
    (ByteLevel.alphabet() has the same set in an arbitrary order: ids must not depend on it.)"""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) \
        | set(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        chars.append(chr(byte) if byte in printable else chr(256 + extra))
        extra += byte not in printable
    return chars


def make_tokenizer(corpus=None, merges: int = 0) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: one token per UTF-8 byte (ids 0-255), then the specials.

    Without a corpus it has no merges, so it needs no training data and any text round-trips
    exactly. With `corpus` (an iterable of strings) and `merges` > 0, byte-pair merges learned
    on it (Sennrich et al., 2016) follow the bytes, ids 256 on, in the order learned, and the
    specials come after them: text still round-trips exactly, in ~3-4x fewer tokens, which a
    tiny model trains on faster. EOS doubles as padding, as in LLaDA's SFT recipe.
    """
    byte_vocab = {ch: byte for byte, ch in enumerate(byte_level_chars())}
    learned = []
    if corpus is not None and merges > 0:
        trainer = trainers.BpeTrainer(vocab_size=256 + merges, initial_alphabet=list(byte_vocab),
                                      show_progress=False)
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.train_from_iterator(corpus, trainer)
        learned = json.loads(bpe.to_str())["model"]["merges"]
        learned = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned]
    vocab = dict(byte_vocab)
    for left, right in learned:
        vocab.setdefault(left + right, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=learned))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=bool(learned))
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|eos|>",
                                  pad_token="<|eos|>", mask_token="<|mask|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


class TinyDLMConfig(PretrainedConfig):
    model_type = "tiny-dlm"

    def __init__(self, vocab_size=261, hidden_size=128, num_hidden_layers=4,
                 num_attention_heads=4, intermediate_size=352, max_position_embeddings=512,
                 rope_theta=10000.0, rms_norm_eps=1e-6, initializer_range=0.02,
                 mask_token_id=257, eos_token_id=256, pad_token_id=256,
                 tie_word_embeddings=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)


def rotary_tables(seq_len, head_dim, theta, device):
    """cos/sin tables of rotary embeddings (Su et al., 2021), each (T, head_dim/2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate each pair (x[..., i], x[..., i + D/2]) of x (B, H, T, D) by its position's angle
    (the rotate-half layout of Llama and LLaDA).

    x is a strided view into the fused qkv output; elementwise kernels on it run ~4x slower
    on CPU than on a contiguous copy (same values, bit for bit), so copy first."""
    x1, x2 = x.float().contiguous().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.type_as(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + swiglu(norm(x))."""

    def __init__(self, cfg: TinyDLMConfig):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.attn_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.gate_up = nn.Linear(d, 2 * f, bias=False)
        self.down = nn.Linear(f, d, bias=False)

    def forward(self, x, cos, sin, attention_mask=None, past=None, kept=None):
        """x (B, T, C) -> (B, T, C). past: this block's keys and values of S earlier positions,
        each (B, H, S, D), rotary applied; x's positions attend to them and to each other.
        kept: a list to which the block appends the keys and values it attended over (past and
        x's own, each (B, H, S + T, D)), for a later forward's `past`."""
        B, T, C = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, H, T, D)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, H, S + T, D)
        if kept is not None:
            kept.append((k, v))
        # is_causal=False: every position attends to every other, masked ones included.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=False)
        x = x + self.attn_out(y.transpose(1, 2).reshape(B, T, C))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


@dataclass
class TinyDLMOutput(MaskedLMOutput):
    """MaskedLMOutput and, with use_cache, every block's keys and values."""
    past_key_values: tuple | None = None


class TinyDLM(PreTrainedModel):
    config_class = TinyDLMConfig
    base_model_prefix = "tiny_dlm"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: TinyDLMConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, past_key_values=None,
                use_cache=False, **kwargs):
        """input_ids (B, T) -> logits (B, T, V), and every hidden state when asked.

        past_key_values: keys and values of S positions before input_ids, one (k, v) pair per
        block, each (B, H, S, D), as use_cache returns them (cut to the first S positions):
        input_ids then holds positions S .. S + T - 1, which attend to those S as well, and
        attention_mask, if given, covers all S + T. use_cache: return every block's keys and
        values, past ones included, as past_key_values (dlm/sampler.py's prefix cache).
        """
        B, T = input_ids.shape
        S = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if S + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {S + T} tokens is longer than max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if attention_mask is not None:  # (B, S + T) of 1 = attend; broadcast to (B, 1, 1, S + T)
            attention_mask = attention_mask[:, None, None, :].bool()
        cos, sin = rotary_tables(S + T, self.config.hidden_size // self.config.num_attention_heads,
                                 self.config.rope_theta, input_ids.device)
        cos, sin = cos[S:], sin[S:]  # the input's own positions (past keys are rotated already)
        x = self.embed(input_ids)  # (B, T, C)
        hidden_states = [x]  # kept only when asked: a no-grad pass would otherwise hold all L+1
        kept = [] if use_cache else None
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, attention_mask, None if past_key_values is None else past_key_values[i], kept)
            hidden_states = hidden_states + [x] if output_hidden_states else [x]
        x = self.norm(x)
        hidden_states[-1] = x  # HF convention (and LLaDA's): the last state is after the final norm
        logits = self.lm_head(x)  # (B, T, V)
        return TinyDLMOutput(logits=logits, hidden_states=tuple(hidden_states) if output_hidden_states else None,
                             past_key_values=tuple(kept) if use_cache else None)


AutoConfig.register(TinyDLMConfig.model_type, TinyDLMConfig)
AutoModel.register(TinyDLMConfig, TinyDLM)


def shape(width: int, layers: int, seq_len: int = 0) -> dict:
    """TinyDLMConfig fields of a new tiny model of `width` and `layers` blocks (train.py's
    --tiny-width/--tiny-layers): SwiGLU hidden width 8/3 of the model's, rounded to a multiple of
    32 (LLaMA's rule), and positions for canvases of seq_len (at least 512)."""
    return dict(hidden_size=width, num_hidden_layers=layers, intermediate_size=round(width * 8 / 3 / 32) * 32,
                max_position_embeddings=max(512, seq_len))


def make_tiny_model(tokenizer: PreTrainedTokenizerFast, **overrides) -> TinyDLM:
    """A randomly initialised TinyDLM whose special ids match `tokenizer`, and its vocabulary
    too unless `vocab_size` is given (a larger table, as bench.py builds a real model's shape)."""
    fields = dict(vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    fields.update(overrides)
    if fields["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size={fields['vocab_size']}: the tokenizer has {len(tokenizer)} tokens; "
                         "give at least that many")
    return TinyDLM(TinyDLMConfig(**fields))
