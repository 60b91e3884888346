"""
Dream's published modeling code (modeling_dream.py, written for transformers 4.x), made to load
with plain `AutoModel.from_pretrained(folder, trust_remote_code=True)` under transformers 5
(and AutoModelForCausalLM: the export's auto_map adds the entry the released config lacks).

train.py's export copies this file beside the checkpoint's own modeling_dream.py and points
config.json's auto_map at the class below, a subclass of Dream's own that changes nothing in its
forward or weights; it repairs, as backbones.py's dream_* fixes do while training:
- ROPE_INIT_FUNCTIONS["default"], which 5.x removed (KeyError while building): plain RoPE;
- the rotary `inv_freq` buffers: not in the checkpoint, and 5.x builds on the meta device and
  leaves them to `_init_weights`, which Dream's does not cover (they held uninitialised memory:
  wrong logits, different from run to run); computed here from the config once the weights are
  read, as Dream's __init__ computes them;
- `_tied_weights_keys`, a list where 5.x expects {tied: source};
- DreamGenerationConfig.validate(), which 5.x calls with arguments Dream's takes none of (every
  from_pretrained failed on it).
Only this file is ours; modeling_dream.py, configuration_dream.py and generation_utils.py are
Dream's, unchanged.
"""

import inspect

import torch
from transformers import AutoModel
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .configuration_dream import DreamConfig
from .generation_utils import DreamGenerationConfig
from .modeling_dream import DreamModel as PublishedDreamModel


def plain_rope_frequencies(config, device=None, seq_len=None, **kwargs):
    """theta^(-2i/d) for i < d/2, d the head dimension; attention scaling 1."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim), 1.0


ROPE_INIT_FUNCTIONS.setdefault("default", plain_rope_frequencies)

if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(DreamGenerationConfig.validate).parameters.values()):
    _validate = DreamGenerationConfig.validate
    DreamGenerationConfig.validate = lambda self, is_init=False, **kwargs: _validate(self, is_init)


class DreamModel(PublishedDreamModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    @torch.no_grad()
    def initialize_weights(self):
        """What from_pretrained runs once the checkpoint is read (and post_init when built): then
        the rotary tables are computed again in every rotary module (on the meta device there is
        nothing to fill yet)."""
        super().initialize_weights()
        for module in self.modules():
            inv_freq = getattr(module, "inv_freq", None)
            if hasattr(module, "rope_init_fn") and isinstance(inv_freq, torch.Tensor) and not inv_freq.is_meta:
                value, module.attention_scaling = module.rope_init_fn(
                    module.config, inv_freq.device, **getattr(module, "rope_kwargs", {}))
                inv_freq.copy_(value)
                module.original_inv_freq = inv_freq


# A modeling_dream.py that registers its own class for DreamConfig when imported would make
# AutoModel prefer it to config.json's auto_map: register this one instead.
AutoModel.register(DreamConfig, DreamModel, exist_ok=True)
