"""Tests of the tiny bidirectional transformer and its byte-level tokenizer (tiny_model.py).

Run: python -m pytest tests/test_tiny_model.py -q

Checked: output shapes and hidden states (the seam dllm_jepa reads), full bidirectional
attention, rotary positions, the attention mask, past keys/values (dlm/sampler.py's prefix
cache), save/load through AutoModel, and the
tokenizer (exact round trip of any text, special tokens, chat template, save/load).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel

from tiny_model import CHAT_TEMPLATE, SPECIAL_TOKENS, TinyDLM, TinyDLMConfig


def random_ids(B, T, seed=0, high=256):
    return torch.randint(0, high, (B, T), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# the model


def test_config_matches_tokenizer(tokenizer, make_model):
    model = make_model()
    cfg = model.config
    assert isinstance(model, PreTrainedModel) and isinstance(cfg, TinyDLMConfig)
    assert cfg.vocab_size == len(tokenizer) == 256 + len(SPECIAL_TOKENS)
    assert cfg.mask_token_id == tokenizer.mask_token_id
    assert cfg.eos_token_id == tokenizer.eos_token_id == cfg.pad_token_id == tokenizer.pad_token_id
    assert isinstance(model.layers, torch.nn.ModuleList) and len(model.layers) == cfg.num_hidden_layers
    assert model.get_input_embeddings() is model.embed
    assert model.get_input_embeddings().embedding_dim == cfg.hidden_size


def test_vocab_size_can_grow_but_not_shrink(tokenizer, make_model):
    """A larger table builds a real model's shape (bench.py); ids stay the tokenizer's."""
    model = make_model(vocab_size=1000)
    assert model.get_input_embeddings().weight.shape[0] == 1000 == model(random_ids(1, 8)).logits.shape[-1]
    assert model.config.mask_token_id == tokenizer.mask_token_id
    with pytest.raises(ValueError, match=f"vocab_size=100: the tokenizer has {len(tokenizer)} tokens"):
        make_model(vocab_size=100)


def test_output_shapes_and_hidden_states(make_model):
    model = make_model(num_hidden_layers=3)
    B, T, C = 2, 11, model.config.hidden_size
    ids = random_ids(B, T)
    out = model(input_ids=ids, output_hidden_states=True)
    assert out.logits.shape == (B, T, model.config.vocab_size)
    assert len(out.hidden_states) == 3 + 1
    assert all(h.shape == (B, T, C) for h in out.hidden_states)
    assert model(input_ids=ids).hidden_states is None
    assert torch.isfinite(out.logits).all()


def test_hidden_states_are_embeddings_blocks_then_final_norm(make_model):
    model = make_model(num_hidden_layers=2).eval()
    ids = random_ids(2, 9, seed=1)
    block_outputs = []
    for block in model.layers:
        block.register_forward_hook(lambda mod, args, out: block_outputs.append(out))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        hs = out.hidden_states
        assert torch.equal(hs[0], model.embed(ids))
        assert torch.equal(hs[1], block_outputs[0])
        # the last hidden state is the final-normed output of the last block ...
        assert torch.allclose(hs[-1], model.norm(block_outputs[-1]), atol=1e-6)
        assert not torch.allclose(hs[-1], block_outputs[-1], atol=1e-3)
        # ... and the LM head reads exactly it
        assert torch.allclose(out.logits, model.lm_head(hs[-1]), atol=1e-6)


def test_attention_is_bidirectional(make_model):
    model = make_model().eval()
    ids = random_ids(1, 12, seed=2)
    later = ids.clone()
    later[0, -1] = (ids[0, -1] + 1) % 256  # change only the LAST token
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=later).logits
    assert not torch.allclose(a[0, 0], b[0, 0]), "position 0 does not see a later token"
    assert (a[0, :-1] - b[0, :-1]).abs().amax(-1).min() > 0  # every earlier position sees it


def test_positions_matter(make_model):
    """Rotary embeddings: without them attention is permutation-equivariant and swapping two
    tokens would only swap their outputs."""
    model = make_model().eval()
    ids = random_ids(1, 8, seed=3)
    swapped = ids.clone()
    swapped[0, [0, 1]] = ids[0, [1, 0]]
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=swapped).logits
    assert not torch.allclose(a[0, 0], b[0, 1], atol=1e-5)


def test_attention_mask_hides_keys(make_model):
    model = make_model().eval()
    ids = random_ids(2, 10, seed=4)
    attn = torch.ones(2, 10, dtype=torch.long)
    attn[:, 7:] = 0
    other = ids.clone()
    other[:, 7:] = (ids[:, 7:] + 13) % 256
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=attn).logits
        b = model(input_ids=other, attention_mask=attn).logits
        c = model(input_ids=other).logits
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, :7], c[:, :7], atol=1e-4)


def test_batch_rows_are_independent(make_model):
    model = make_model().eval()
    ids = random_ids(3, 10, seed=5)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        row = model(input_ids=ids[1:2]).logits
    assert torch.allclose(full[1:2], row, atol=1e-5)


def test_past_key_values_continue_a_forward_exactly(make_model):
    """dlm/sampler.py's prefix cache's seam: the keys/values of the first S columns of a forward,
    handed to a forward of the remaining columns, give exactly the full forward's logits there
    (several layers, left padding hidden)."""
    model = make_model(num_hidden_layers=3).eval()
    ids = random_ids(2, 20)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, use_cache=True)
        past = tuple((k[:, :, :12], v[:, :, :12]) for k, v in full.past_key_values)
        rest = model(input_ids=ids[:, 12:], attention_mask=mask, past_key_values=past)
    assert len(full.past_key_values) == 3 and full.past_key_values[0][0].shape == (2, 2, 20, 16)
    torch.testing.assert_close(rest.logits, full.logits[:, 12:], rtol=0, atol=1e-5)


def test_too_long_sequence_raises(make_model):
    model = make_model(max_position_embeddings=16)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=random_ids(1, 17))
    past = model(input_ids=random_ids(1, 10), use_cache=True).past_key_values  # past keys count too
    with pytest.raises(ValueError, match="sequence of 17 tokens"):
        model(input_ids=random_ids(1, 7), past_key_values=past)


def test_initialisation_is_normal_002_and_unit_norms(make_model):
    """Every matrix starts N(0, initializer_range), every norm at 1: guards against a
    transformers release that skips or repeats _init_weights on some modules."""
    model = make_model()
    std = model.config.initializer_range
    for name, p in model.named_parameters():
        if p.dim() == 2:
            assert abs(p.std().item() - std) < 0.1 * std and abs(p.mean().item()) < 0.1 * std, name
        else:
            assert torch.equal(p, torch.ones_like(p)), name


def test_gradients_reach_every_parameter(make_model):
    model = make_model()
    out = model(input_ids=random_ids(2, 10, seed=6), output_hidden_states=True)
    out.logits.float().logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_save_and_load_round_trip(tmp_path, tokenizer, make_model):
    model = make_model(seed=7).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, TinyDLMConfig)
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "mask_token_id", "eos_token_id",
                "pad_token_id", "intermediate_size", "num_attention_heads", "rope_theta"):
        assert getattr(config, key) == getattr(model.config, key), key
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is TinyDLM
    ids = random_ids(2, 13, seed=8, high=len(tokenizer))
    with torch.no_grad():
        a = model(input_ids=ids, output_hidden_states=True)
        b = loaded(input_ids=ids, output_hidden_states=True)
    assert torch.equal(a.logits, b.logits)
    assert all(torch.equal(x, y) for x, y in zip(a.hidden_states, b.hidden_states))
    # and a different init is not identical (the comparison can fail)
    with torch.no_grad():
        assert not torch.equal(make_model(seed=9).eval()(input_ids=ids).logits, a.logits)


# -----------------------------------------------------------------------------
# the tokenizer


@settings(max_examples=50)
@given(text=st.text(max_size=60))
def test_tokenizer_round_trips_any_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    if not any(s in text for s in SPECIAL_TOKENS):
        assert len(ids) == len(text.encode("utf-8"))  # one token per UTF-8 byte
        assert all(0 <= i < 256 for i in ids)


def test_tokenizer_examples(tokenizer):
    for text in ["", "hello world", "  two  spaces\n\ttab", "héllo 世界 🙂", "\x00\x7f\u200b", "a" * 300]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert len(ids) == len(text.encode("utf-8"))
    # the 128 one-byte (ASCII) characters get 128 distinct ids
    single = {tokenizer(bytes([b]).decode("latin-1"), add_special_tokens=False)["input_ids"][0]
              for b in range(128)}
    assert len(single) == 128


def test_special_tokens(tokenizer):
    assert len(tokenizer) == 256 + len(SPECIAL_TOKENS)
    assert tokenizer.mask_token == "<|mask|>" and tokenizer.mask_token_id == 257
    assert tokenizer.eos_token == "<|eos|>" and tokenizer.eos_token_id == 256
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # LLaDA: EOS doubles as padding
    for token in SPECIAL_TOKENS:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] >= 256, token
        assert tokenizer.decode(ids) == token
    assert tokenizer.decode([1, 2, tokenizer.eos_token_id], skip_special_tokens=True) == \
        tokenizer.decode([1, 2])


def test_chat_template_renders_roles(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|system|>Be brief.<|user|>2+2?<|assistant|>4"
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|system|>Be brief.<|user|>2+2?<|assistant|>"
    ids = tokenizer.apply_chat_template(messages[1:2], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    user, assistant = tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    assert ids == [user] + tokenizer("2+2?", add_special_tokens=False)["input_ids"] + [assistant]
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_tokenizer_save_and_load_round_trip(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tokenizer)
    for attr in ("mask_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(loaded, attr) == getattr(tokenizer, attr), attr
    for text in ["héllo 世界 🙂", "<|user|>hi<|assistant|>yo<|eos|>", "x\ny"]:
        a = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert loaded(text, add_special_tokens=False)["input_ids"] == a
        assert loaded.decode(a) == text
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
