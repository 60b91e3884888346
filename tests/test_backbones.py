"""Tests of the backbone adapters (backbones.py), on the tiny model and a shifted-logits variant.

Run: python -m pytest tests/test_backbones.py -q

No LLaDA or Dream code or weights are needed (nor any network): the family table, the
special-id logic and load_backbone's plumbing are checked on the tiny model; each
transformers-5.x fix is checked on a small stand-in with exactly the problem it repairs
(and shown to do nothing when the problem is absent); Dream's shifted logits are checked
with `ShiftedTinyDLM`, a TinyDLM whose output at i predicts token i + 1.
"""

import contextlib
import dataclasses
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModel, LlamaConfig, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import tiny_model
from dllm_jepa import DLLMJEPA, JEPAConfig
from dlm import backbones
from dlm.backbones import Backbone, Family, FAMILIES

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=128)

# -----------------------------------------------------------------------------
# A shifted-logits tiny model (Dream's convention), registered like a remote family


class ShiftedTinyDLMConfig(tiny_model.TinyDLMConfig):
    model_type = "tiny-dlm-shifted"

    def __init__(self, **kwargs):  # explicit: transformers 5.x would otherwise generate one
        super().__init__(**kwargs)


class ShiftedTinyDLM(tiny_model.TinyDLM):
    """TinyDLM whose output at position i is its prediction for token i + 1."""
    config_class = ShiftedTinyDLMConfig

    def forward(self, input_ids, **kwargs):
        out = super().forward(input_ids, **kwargs)
        # The last position predicts a token past the end: never read, filled arbitrarily.
        logits = torch.cat([out.logits[:, 1:], out.logits[:, -1:]], dim=1)
        return MaskedLMOutput(logits=logits, hidden_states=out.hidden_states)


AutoConfig.register(ShiftedTinyDLMConfig.model_type, ShiftedTinyDLMConfig, exist_ok=True)
AutoModel.register(ShiftedTinyDLMConfig, ShiftedTinyDLM, exist_ok=True)
SHIFTED = Family("tiny-dlm-shifted", blocks=lambda m: m.layers, shift_logits=True)


@pytest.fixture
def shifted_family(monkeypatch):
    monkeypatch.setitem(FAMILIES, ShiftedTinyDLMConfig.model_type, SHIFTED)
    return SHIFTED


def save_tiny(path, tokenizer, model_class=tiny_model.TinyDLM,
              config_class=tiny_model.TinyDLMConfig, seed=0):
    torch.manual_seed(seed)
    config = config_class(vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          **SMALL)
    model = model_class(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def shifted_twin(plain):
    """A ShiftedTinyDLM with the same weights as the TinyDLM `plain`."""
    c = plain.config
    twin = ShiftedTinyDLM(ShiftedTinyDLMConfig(
        vocab_size=c.vocab_size, mask_token_id=c.mask_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id, **SMALL))
    twin.load_state_dict(plain.state_dict())
    return twin


def batch(T=24, seed=0):
    ids = torch.randint(0, 256, (3, T), generator=torch.Generator().manual_seed(seed))
    prompt_lengths = torch.tensor([4, 7, 10])
    answer_lengths = torch.tensor([12, 9, 14])
    return ids, prompt_lengths, answer_lengths

# -----------------------------------------------------------------------------
# The family table


def test_families_know_the_released_models():
    llada, dream = FAMILIES["llada"], FAMILIES["Dream"]  # the model_type of each config.json
    assert not llada.shift_logits and dream.shift_logits
    assert llada.published_mask_token_id == 126336 and dream.published_mask_token_id == 151666
    assert llada.chat_template and dream.chat_template
    assert not FAMILIES["tiny-dlm"].shift_logits


def test_family_of_detects_by_model_type():
    assert backbones.family_of(tiny_model.TinyDLMConfig()) is FAMILIES["tiny-dlm"]
    assert backbones.family_of(SimpleNamespace(model_type="Dream")) is FAMILIES["Dream"]


def test_unknown_family_error_names_what_an_adapter_needs():
    with pytest.raises(ValueError) as err:
        backbones.family_of(SimpleNamespace(model_type="gpt2"))
    message = str(err.value)
    for needed in ("'gpt2'", "tiny-dlm", "llada", "Dream", "FAMILIES", "blocks", "shifted",
                   "hidden_states", "mask_token_id"):
        assert needed in message


def test_llada_blocks_refuses_grouped_blocks():
    grouped = SimpleNamespace(model=SimpleNamespace(transformer=nn.ModuleDict(
        {"block_groups": nn.ModuleList()})))
    with pytest.raises(ValueError, match="block_groups"):
        backbones.llada_blocks(grouped)
    blocks = nn.ModuleList([nn.Linear(2, 2)])
    flat = SimpleNamespace(model=SimpleNamespace(transformer=nn.ModuleDict({"blocks": blocks})))
    assert backbones.llada_blocks(flat) is blocks

# -----------------------------------------------------------------------------
# Special ids


def ids(vocab_size=100, mask=None, eos=1, pad=1):
    return SimpleNamespace(vocab_size=vocab_size, mask_token_id=mask, eos_token_id=eos,
                           pad_token_id=pad)


def tok(mask=None, eos=1):
    return SimpleNamespace(mask_token_id=mask, mask_token="<m>", eos_token_id=eos)


def test_mask_id_from_config_when_the_tokenizer_has_none():  # LLaDA's tokenizer defines none
    assert backbones.mask_token_id_of(ids(mask=7), tok()) == 7


def test_mask_id_from_tokenizer_when_the_config_has_none():
    assert backbones.mask_token_id_of(ids(), tok(mask=9)) == 9


@pytest.mark.parametrize("config, tokenizer, match", [
    (ids(), tok(), "no mask token"),
    (ids(mask=100), tok(), "outside the vocabulary"),
    (ids(mask=-1), tok(), "outside the vocabulary"),
    (ids(mask=5), tok(mask=6), "must agree|fix one"),
    (ids(mask=1), tok(), "also the EOS/padding"),  # LLaDA's config class defaults all three alike
])
def test_bad_mask_ids_raise(config, tokenizer, match):
    with pytest.raises(ValueError, match=match):
        backbones.mask_token_id_of(config, tokenizer)


def test_mask_id_unlike_the_released_checkpoints_warns():
    with pytest.warns(UserWarning, match="126336"):
        assert backbones.mask_token_id_of(ids(mask=7), tok(), FAMILIES["llada"]) == 7


def test_eos_id_prefers_the_tokenizer_and_falls_back_to_the_config():
    assert backbones.eos_token_id_of(ids(eos=3), tok(eos=3)) == 3
    assert backbones.eos_token_id_of(ids(eos=[4, 5]), tok(eos=None)) == 4
    with pytest.warns(UserWarning, match="differs"):
        assert backbones.eos_token_id_of(ids(eos=4), tok(eos=3)) == 3
    with pytest.raises(ValueError, match="no EOS"):
        backbones.eos_token_id_of(ids(eos=None), tok(eos=None))

# -----------------------------------------------------------------------------
# Loading


def test_new_tiny_backbone():
    b = backbones.new_tiny_backbone(**SMALL)
    assert b.family is FAMILIES["tiny-dlm"] and b.fixes == []
    assert b.mask_token_id == b.tokenizer.mask_token_id == b.model.config.mask_token_id
    assert b.eos_token_id == b.tokenizer.eos_token_id
    assert b.blocks is b.model.layers and isinstance(b.blocks, nn.ModuleList)


def test_load_backbone_from_a_saved_folder(tmp_path, tokenizer):
    model = save_tiny(tmp_path, tokenizer)
    b = backbones.load_backbone(str(tmp_path))
    assert isinstance(b, Backbone) and isinstance(b.model, tiny_model.TinyDLM)
    assert b.family is FAMILIES["tiny-dlm"] and b.fixes == []
    assert b.mask_token_id == tokenizer.mask_token_id and b.eos_token_id == tokenizer.eos_token_id
    assert b.blocks is b.model.layers and len(b.blocks) == SMALL["num_hidden_layers"]
    assert b.tokenizer.chat_template == tokenizer.chat_template
    x = batch()[0]
    with torch.no_grad():
        assert torch.equal(b.model(input_ids=x).logits, model(input_ids=x).logits)


def test_load_backbone_dtype(tmp_path, tokenizer):
    save_tiny(tmp_path, tokenizer)
    b = backbones.load_backbone(str(tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in b.model.parameters()} == {torch.bfloat16}


def test_load_backbone_without_weights_builds_the_same_modules_on_meta(tmp_path, tokenizer):
    save_tiny(tmp_path, tokenizer)
    real, meta = backbones.load_backbone(str(tmp_path)), backbones.load_backbone(str(tmp_path), weights=False)
    shapes = lambda b: {k: (v.shape, v.dtype) for k, v in b.model.state_dict().items()}
    assert shapes(meta) == shapes(real)
    assert all(p.is_meta for p in meta.model.parameters()) and not any(p.is_meta for p in real.model.parameters())
    assert (meta.mask_token_id, meta.eos_token_id, meta.family) == (real.mask_token_id, real.eos_token_id, real.family)


def test_load_backbone_runs_the_familys_fixes_in_order(tmp_path, tokenizer, monkeypatch):
    """`before` fixes run ahead of from_pretrained, and a context they enter stays open
    while it runs; `after` fixes see the loaded model; applied ones are recorded."""
    save_tiny(tmp_path, tokenizer)
    events = []

    @contextlib.contextmanager
    def recording():
        events.append("enter")
        yield
        events.append("exit")

    def before(config, model_class, stack):
        assert model_class is tiny_model.TinyDLM and config.model_type == "tiny-dlm"
        stack.enter_context(recording())
        return "before: applied"

    def absent(config, model_class, stack):
        return None

    def after(model):
        events.append("after")
        assert isinstance(model, tiny_model.TinyDLM)
        return "after: applied"

    real_from_pretrained = AutoModel.from_pretrained
    monkeypatch.setattr(AutoModel, "from_pretrained",
                        lambda *a, **k: events.append("load") or real_from_pretrained(*a, **k))
    monkeypatch.setitem(FAMILIES, "tiny-dlm", dataclasses.replace(
        FAMILIES["tiny-dlm"], before=(before, absent), after=(after,)))
    b = backbones.load_backbone(str(tmp_path))
    assert events == ["enter", "load", "exit", "after"]
    assert b.fixes == ["before: applied", "after: applied"]


def test_tokenizer_gaps_are_filled(tmp_path, tokenizer, monkeypatch):
    """A base checkpoint's tokenizer without chat template gets the family's; one without a
    pad token pads with EOS (LLaDA's SFT recipe)."""
    bare = tiny_model.make_tokenizer()
    bare.chat_template = None
    bare.pad_token = None
    save_tiny(tmp_path, bare)
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    monkeypatch.setitem(FAMILIES, "tiny-dlm", dataclasses.replace(FAMILIES["tiny-dlm"],
                                                                  chat_template=template))
    b = backbones.load_backbone(str(tmp_path))
    assert b.tokenizer.chat_template == template
    assert b.tokenizer.pad_token_id == b.eos_token_id == tokenizer.eos_token_id
    prompt = b.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt == "[user]hi"


def test_a_shipped_chat_template_is_kept(tmp_path, tokenizer, monkeypatch):
    save_tiny(tmp_path, tokenizer)
    monkeypatch.setitem(FAMILIES, "tiny-dlm", dataclasses.replace(FAMILIES["tiny-dlm"],
                                                                  chat_template="other"))
    assert backbones.load_backbone(str(tmp_path)).tokenizer.chat_template == tokenizer.chat_template


def test_load_backbone_of_an_unknown_family_fails_before_loading_weights(tmp_path, tokenizer):
    save_tiny(tmp_path, tokenizer, ShiftedTinyDLM, ShiftedTinyDLMConfig)  # not in FAMILIES here
    with pytest.raises(ValueError, match="unknown model family.*tiny-dlm-shifted"):
        backbones.load_backbone(str(tmp_path))

# -----------------------------------------------------------------------------
# Shifted logits (Dream's convention)


def test_shifted_family_is_detected_from_a_saved_folder(tmp_path, tokenizer, shifted_family):
    save_tiny(tmp_path, tokenizer, ShiftedTinyDLM, ShiftedTinyDLMConfig)
    b = backbones.load_backbone(str(tmp_path))
    assert b.family is shifted_family and b.family.shift_logits
    assert isinstance(b.model, ShiftedTinyDLM) and b.blocks is b.model.layers


@pytest.mark.parametrize("method", ["diffusion", "dllm-jepa", "two-pass"])
def test_shifted_model_gives_the_unshifted_losses(tokenizer, method):
    """The same weights behind both conventions, the same masks (one generator seed): with
    shift_logits the shifted model's losses equal the unshifted model's exactly."""
    torch.manual_seed(0)
    plain = tiny_model.make_tiny_model(tokenizer, **SMALL)
    shifted = shifted_twin(plain)
    config = JEPAConfig(method=method, target="online" if method == "dllm-jepa" else None)
    x, prompt_lengths, answer_lengths = batch()
    outputs = []
    for model, shift in ((plain, False), (shifted, True)):
        torch.manual_seed(1)  # same predictor initialisation
        objective = DLLMJEPA(model, config, tokenizer.mask_token_id, shift_logits=shift)
        outputs.append(objective(x, prompt_lengths, answer_lengths,
                                 generator=torch.Generator().manual_seed(2)))
    a, b = outputs
    assert a.diffusion.item() > 0
    torch.testing.assert_close(a.diffusion, b.diffusion, rtol=0, atol=0)
    torch.testing.assert_close(a.jepa, b.jepa, rtol=0, atol=0)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)


def test_ignoring_the_shift_gives_a_different_loss(tokenizer):
    """The check above has teeth: read unshifted, the shifted model's loss changes."""
    torch.manual_seed(0)
    plain = tiny_model.make_tiny_model(tokenizer, **SMALL)
    shifted = shifted_twin(plain)
    x, p, a = batch()
    losses = [DLLMJEPA(m, JEPAConfig(method="diffusion"), tokenizer.mask_token_id)(
        x, p, a, generator=torch.Generator().manual_seed(2)).diffusion for m in (plain, shifted)]
    assert not torch.allclose(*losses)

# -----------------------------------------------------------------------------
# transformers-5.x fixes, each on a stand-in with exactly its problem


def no_stack():
    return contextlib.ExitStack()


def test_llada_restore_use_cache():
    config = PretrainedConfig()
    if hasattr(config, "use_cache"):
        del config.use_cache
    assert "use_cache" in backbones.llada_restore_use_cache(config, None, no_stack())
    assert config.use_cache is False
    assert backbones.llada_restore_use_cache(config, None, no_stack()) is None


class BuildsOnCuda(nn.Module):
    def __init__(self, config):
        super().__init__()
        config.init_device = "cuda"  # as newer LLaDA copies do
        self.lin = nn.Linear(2, 2, device=config.init_device)
        self.table = torch.arange(4, device=torch.device(config.init_device))
        self.moved = torch.zeros(2).to(torch.device(config.init_device))


class BuildsOnCpu(BuildsOnCuda):
    def __init__(self, config):
        nn.Module.__init__(self)


def test_llada_build_on_cpu_redirects_cuda_allocations():
    with contextlib.ExitStack() as stack:
        message = backbones.llada_build_on_cpu(None, BuildsOnCuda, stack)
        model = BuildsOnCuda(SimpleNamespace())
    assert "init_device='cuda'" in message
    devices = {model.lin.weight.device.type, model.table.device.type, model.moved.device.type}
    assert devices == {"cpu"}
    with contextlib.ExitStack() as stack:
        assert backbones.llada_build_on_cpu(None, BuildsOnCpu, stack) is None


class BuildsLikeLLaDA(BuildsOnCuda):
    def __init__(self, config):
        nn.Module.__init__(self)
        config.init_device = "cuda"
        self.lin = nn.Linear(2, 2, device=config.init_device)
        device = torch.device(config.init_device)  # LLaDA's rotary cache: autocast, then a small table
        with torch.autocast(device.type, enabled=False):
            self.table = torch.arange(4, device=device).float()


def test_llada_build_on_cpu_goes_to_meta_when_building_without_weights():
    """Weights go to the meta device; a torch.device("cuda") names the CPU, so that autocast
    (no meta backend) works and LLaDA's rotary cache, which no state dict carries, holds values."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.device("meta"))  # as load_backbone(weights=False) does
        assert "meta device" in backbones.llada_build_on_cpu(None, BuildsLikeLLaDA, stack)
        model = BuildsLikeLLaDA(SimpleNamespace())
    assert model.lin.weight.is_meta
    assert torch.equal(model.table, torch.arange(4.0))


def test_llada_tie_weights_accepts_arguments():
    calls = []

    class OldTie:
        def tie_weights(self):
            calls.append("tied")

    message = backbones.llada_tie_weights_accepts_arguments(None, OldTie, no_stack())
    assert "tie_weights" in message
    OldTie().tie_weights(missing_keys=set(), recompute_mapping=False)  # 5.x's call
    OldTie().tie_weights()
    assert calls == ["tied", "tied"]
    assert backbones.llada_tie_weights_accepts_arguments(None, OldTie, no_stack()) is None


class SkipsPostInit(PreTrainedModel):
    config_class = tiny_model.TinyDLMConfig

    def __init__(self, config):
        super().__init__(config)
        self.lin = nn.Linear(2, 2)


def test_llada_run_post_init():
    assert not hasattr(SkipsPostInit(tiny_model.TinyDLMConfig(**SMALL)), "all_tied_weights_keys")
    message = backbones.llada_run_post_init(None, SkipsPostInit, no_stack())
    assert "post_init" in message
    assert hasattr(SkipsPostInit(tiny_model.TinyDLMConfig(**SMALL)), "all_tied_weights_keys")
    assert backbones.llada_run_post_init(None, SkipsPostInit, no_stack()) is None
    assert backbones.llada_run_post_init(None, tiny_model.TinyDLM, no_stack()) is None  # calls it


def test_plain_rope_frequencies_match_transformers_llama():
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500000.0)
    expected, scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    got, got_scaling = backbones.plain_rope_frequencies(config)
    torch.testing.assert_close(got, expected)
    assert got_scaling == scaling == 1.0


def test_dream_register_default_rope(monkeypatch):
    monkeypatch.delitem(ROPE_INIT_FUNCTIONS, "default", raising=False)
    assert "default" in backbones.dream_register_default_rope(None, None, no_stack())
    assert ROPE_INIT_FUNCTIONS["default"] is backbones.plain_rope_frequencies
    assert backbones.dream_register_default_rope(None, None, no_stack()) is None


def test_dream_tied_weights_as_dict():
    class ListStyle:
        _tied_weights_keys = ["lm_head.weight"]

    assert "dict" in backbones.dream_tied_weights_as_dict(None, ListStyle, no_stack())
    assert ListStyle._tied_weights_keys == {"lm_head.weight": "model.embed_tokens.weight"}
    assert backbones.dream_tied_weights_as_dict(None, ListStyle, no_stack()) is None


class Rotary(nn.Module):
    """Shaped like Dream's rotary module: inv_freq buffer, rope_init_fn, config, rope_kwargs."""

    def __init__(self, config):
        super().__init__()
        self.config, self.rope_kwargs = config, {}
        self.rope_init_fn = backbones.plain_rope_frequencies
        self.register_buffer("inv_freq", torch.full((8,), float("nan")), persistent=False)
        self.original_inv_freq = self.inv_freq


def test_dream_recompute_rotary():
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=10000.0)
    model = nn.Sequential(Rotary(config), nn.Linear(2, 2), Rotary(config))
    assert "2 module(s)" in backbones.dream_recompute_rotary(model)
    expected = backbones.plain_rope_frequencies(config)[0]
    for rotary in (model[0], model[2]):
        torch.testing.assert_close(rotary.inv_freq, expected)
        assert rotary.original_inv_freq is rotary.inv_freq
        assert "inv_freq" not in rotary.state_dict()  # still not saved
    assert backbones.dream_recompute_rotary(model) is None  # already right: nothing to report
    with torch.device("meta"):  # a structure only: its buffers come from rank 0 (sharding.materialize)
        model = Rotary(config)
    assert backbones.dream_recompute_rotary(model) is None and model.inv_freq.is_meta


def test_dream_refuse_labels():
    model = tiny_model.make_tiny_model(tiny_model.make_tokenizer(), **SMALL)
    assert backbones.dream_refuse_labels(model) is None
    x = batch()[0]
    model(input_ids=x)  # no labels: fine
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=x, labels=x)


@pytest.mark.parametrize("key", ["llada", "Dream"])
def test_every_fix_is_documented(key):
    """Each fix says why it exists (the docstring is its comment)."""
    family = FAMILIES[key]
    assert family.before or family.after
    for fix in family.before + family.after:
        assert fix.__doc__ and len(fix.__doc__.split()) > 15


def test_dream_generation_config_accepts_arguments(monkeypatch):
    """DreamGenerationConfig.validate(self, is_init=False), found through the model class's module
    (modeling_dream imports it), takes 5.x's keyword arguments once repaired."""
    import sys
    import types

    class DreamGenerationConfig:
        def validate(self, is_init=False):
            self.checked = is_init

    module = types.ModuleType("fake_modeling_dream")
    module.DreamGenerationConfig = DreamGenerationConfig
    model_class = type("DreamModel", (), {"__module__": module.__name__})
    monkeypatch.setitem(sys.modules, module.__name__, module)
    assert "validate" in backbones.dream_generation_config_accepts_arguments(None, model_class, no_stack())
    config = DreamGenerationConfig()
    config.validate(user_set_attributes=set())
    assert config.checked is False
    assert backbones.dream_generation_config_accepts_arguments(None, model_class, no_stack()) is None
    assert backbones.dream_generation_config_accepts_arguments(None, tiny_model.TinyDLM, no_stack()) is None

# -----------------------------------------------------------------------------
# Exports: the checkpoint's dtype, and loading LLaDA/Dream exports with plain AutoModel


def test_saved_dtype_of(tmp_path, tokenizer):
    """The config's dtype; else the first floating tensor's in the safetensors header; else None."""
    assert backbones.saved_dtype_of(SimpleNamespace(dtype="bfloat16"), "x") is torch.bfloat16
    assert backbones.saved_dtype_of(SimpleNamespace(dtype=torch.float16), "x") is torch.float16
    model = save_tiny(tmp_path, tokenizer).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert backbones.saved_dtype_of(SimpleNamespace(dtype=None), str(tmp_path)) is torch.bfloat16
    assert backbones.load_backbone(str(tmp_path)).saved_dtype is torch.bfloat16
    assert backbones.saved_dtype_of(SimpleNamespace(dtype=None), str(tmp_path / "none")) is None
    assert backbones.new_tiny_backbone(**SMALL).saved_dtype is None  # a new model: train.py exports fp32


def test_install_remote_fixes_only_over_the_published_code(tmp_path):
    """The family's remote_fixes file goes beside modeling_llada.py and auto_map entries naming
    LLaDA's class point at its subclass (again: unchanged), AutoModelForCausalLM's too, also where
    the config had none (Dream's); other code, or the tiny model: nothing."""
    llada = FAMILIES["llada"]
    auto_map = {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llada", "auto_map": auto_map}))
    (tmp_path / "modeling_llada.py").write_text("# LLaDA's\n")
    for _ in range(2):
        assert backbones.install_remote_fixes(tmp_path, llada) == "llada_transformers5.LLaDAModelLM"
        assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == auto_map | {
            "AutoModel": "llada_transformers5.LLaDAModelLM", "AutoModelForCausalLM": "llada_transformers5.LLaDAModelLM"}
    assert (tmp_path / "llada_transformers5.py").read_text().startswith('"""\nLLaDA\'s published modeling code')
    dream = tmp_path / "dream"  # the released Dream config's auto_map has no AutoModelForCausalLM: it gets one
    dream.mkdir()
    (dream / "config.json").write_text(json.dumps({"model_type": "Dream", "auto_map": {
        "AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"}}))
    (dream / "modeling_dream.py").write_text("# Dream's\n")
    assert backbones.install_remote_fixes(dream, FAMILIES["Dream"]) == "dream_transformers5.DreamModel"
    assert json.loads((dream / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "dream_transformers5.DreamModel",
        "AutoModelForCausalLM": "dream_transformers5.DreamModel"}
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "my_llada.Model"}}))
    assert backbones.install_remote_fixes(other, llada) is None and sorted(os.listdir(other)) == ["config.json"]
    assert backbones.install_remote_fixes(other, FAMILIES["tiny-dlm"]) is None


# Tiny random LLaDA and Dream models built from their published modeling code, which this
# repository does not contain: the tests below read it from $DLLM_JEPA_REMOTE_CODE/<family>/
# (configuration_*.py, modeling_*.py, Dream's generation_utils.py) or from the Hugging Face
# cache of the released checkpoints, and are skipped where neither has it.
PUBLISHED = {"llada": ("GSAI-ML/LLaDA-8B-Instruct", ("configuration_llada.py", "modeling_llada.py")),
             "dream": ("Dream-org/Dream-v0-Instruct-7B",
                       ("configuration_dream.py", "modeling_dream.py", "generation_utils.py"))}


def published_code(family: str) -> dict[str, str]:
    repo, files = PUBLISHED[family]
    folder = Path(os.environ.get("DLLM_JEPA_REMOTE_CODE", "/nonexistent")) / family
    if all((folder / name).is_file() for name in files):
        return {name: (folder / name).read_text() for name in files}
    try:
        from huggingface_hub import hf_hub_download
        return {name: Path(hf_hub_download(repo, name, local_files_only=True)).read_text() for name in files}
    except Exception:  # not in the cache
        pytest.skip(f"{family}'s published modeling code: set DLLM_JEPA_REMOTE_CODE (a folder with "
                    f"{family}/{', '.join(files)}) or have {repo}'s files in the Hugging Face cache")


def tiny_published_model(folder: Path, family: str, tokenizer, init_device: str | None = None,
                         weight_tying: bool = False) -> Path:
    """A random bf16 checkpoint of the family's published code, 2 blocks of width 64, laid out as
    the released ones (config.json with auto_map, the code, tokenizer, generation_config.json for
    Dream). init_device: the value LLaDAModelLM.__init__ sets (released copies say "cpu" or "cuda")."""
    from dlm import sharding
    from safetensors.torch import save_file
    folder.mkdir(parents=True)
    for name, text in published_code(family).items():
        if init_device:
            text = re.sub(r'(model_config\.init_device = )"\w+"', rf'\1"{init_device}"', text)
        (folder / name).write_text(text)
    vocab, specials = 320, dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                                mask_token_id=tokenizer.mask_token_id)
    if family == "llada":
        config = dict(
            model_type="llada", architectures=["LLaDAModelLM"], auto_map={
                "AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
            d_model=64, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=128, mlp_ratio=4, vocab_size=vocab,
            embedding_size=vocab, max_sequence_length=256, activation_type="silu", block_type="llama",
            block_group_size=1, layer_norm_type="rms", rms_norm_eps=1e-5, rope=True, rope_theta=500000.0,
            rope_full_precision=True, include_bias=False, include_qkv_bias=False, bias_for_layer_norm=False,
            layer_norm_with_affine=True, attention_layer_norm=False, attention_layer_norm_with_affine=True,
            alibi=False, alibi_bias_max=8.0, attention_dropout=0.0, embedding_dropout=0.0, residual_dropout=0.0,
            flash_attention=False, init_device="meta", init_fn="mitchell", init_std=0.02, init_cutoff_factor=None,
            input_emb_norm=False, multi_query_attention=None, precision="amp_bf16", scale_logits=False,
            use_cache=False, weight_tying=weight_tying, torch_dtype="bfloat16", **specials)
    else:
        config = dict(
            model_type="Dream", architectures=["DreamModel"], auto_map={
                "AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, max_window_layers=2, hidden_act="silu", rms_norm_eps=1e-6,
            rope_theta=1000000.0, rope_scaling=None, sliding_window=None, use_sliding_window=False,
            tie_word_embeddings=False, attention_dropout=0.0, initializer_range=0.02, use_cache=False,
            vocab_size=vocab, bos_token_id=tokenizer.eos_token_id, torch_dtype="bfloat16", **specials)
        (folder / "generation_config.json").write_text(json.dumps(dict(bos_token_id=tokenizer.eos_token_id,
                                                                       **specials)))
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(folder)
    structure = backbones.load_backbone(str(folder), weights=False).model  # shapes only, on meta
    aliases, generator = sharding.aliased_keys(structure), torch.Generator().manual_seed(0)
    save_file({key: (torch.randn(value.shape, generator=generator) * 0.05 if value.dim() > 1
                     else 1 + 0.1 * torch.randn(value.shape, generator=generator)).to(torch.bfloat16)
               for key, value in structure.state_dict().items() if key not in aliases},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


PLAIN_LOAD = """
import sys, torch
from transformers import AutoModel, AutoModelForCausalLM
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)  # the default dtype: config.json's
as_float = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
as_lm = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
ids = torch.arange(3, 27).reshape(2, 12)
with torch.no_grad():
    logits, lm_logits = as_float(input_ids=ids).logits, as_lm(input_ids=ids).logits
torch.save({"class": type(model).__module__ + "." + type(model).__name__, "dtype": model.dtype, "logits": logits,
            "lm_class": type(as_lm).__module__ + "." + type(as_lm).__name__, "lm_logits": lm_logits}, sys.argv[2])
"""


@pytest.mark.parametrize("family,variant", [("llada", "published"), ("llada", "init_device cuda"),
                                            ("llada", "weight_tying"), ("dream", "published")])
def test_exports_load_with_plain_automodel(tmp_path, tokenizer, family, variant):
    """train.py (LoRA, merged export; full fine-tuning for tied LLaDA) on a tiny model of the family's
    published code: final/ is bf16, as the checkpoint; a fresh process loads it with nothing but
    AutoModel.from_pretrained(final, trust_remote_code=True) (and AutoModelForCausalLM, which
    Dream's released auto_map lacks), in bf16 by default, and its logits
    equal those of backbones.load_backbone(final) (the one-line load train.py also prints): the
    weights, the rotary tables (Dream: recomputed, not left uninitialised) and the tied head all
    arrive. Under 5.x the published code alone does not load (LLaDA: post_init, tie_weights and
    the hard-coded CUDA device; Dream: the "default" RoPE, tied-weight keys, generation config)."""
    import subprocess
    import sys
    import train
    base = tiny_published_model(tmp_path / "base", family, tokenizer,
                                init_device="cuda" if variant == "init_device cuda" else None,
                                weight_tying=variant == "weight_tying")
    lora = [] if variant == "weight_tying" else ["--lora-rank", "4", "--export-adapter"]
    final = train.main(["--model", str(base), "--seq-len", "32", "--builtin-size", "200", "--batch-size", "4",
                        "--steps", "2", "--lr", "1e-2", "--eval-every", "100", "--save-every", "100",
                        "--final-eval", "0", "--no-progress", "--out", str(tmp_path / "run"), *lora])
    config = json.loads((final / "config.json").read_text())
    shim = {"llada": "llada_transformers5.LLaDAModelLM", "dream": "dream_transformers5.DreamModel"}[family]
    assert config["dtype"] == "bfloat16" and config["auto_map"]["AutoModel"] == shim
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_LOAD)
    result = subprocess.run([sys.executable, str(script), str(final), str(tmp_path / "plain.pt")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    plain = torch.load(tmp_path / "plain.pt", weights_only=False)
    assert plain["class"].endswith(shim) and plain["lm_class"].endswith(shim) and plain["dtype"] == torch.bfloat16
    loaded = backbones.load_backbone(str(final)).model.eval()
    with torch.no_grad():
        expected = loaded(input_ids=torch.arange(3, 27).reshape(2, 12)).logits
    torch.testing.assert_close(plain["logits"], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(plain["lm_logits"], expected, rtol=0, atol=1e-5)  # AutoModelForCausalLM too
    if lora:  # the adapter alone, named after its base, beside the merged model
        adapter = json.loads((final / "adapter" / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str(base.resolve())
