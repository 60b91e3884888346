"""
LLaDA's published modeling code (modeling_llada.py, written for transformers 4.x), made to load
with plain `AutoModel.from_pretrained(folder, trust_remote_code=True)` under transformers 5.

train.py's export copies this file beside the checkpoint's own modeling_llada.py and points
config.json's auto_map at the class below, a subclass of LLaDA's own that changes nothing in its
forward or weights; it repairs, as backbones.py's llada_* fixes do while training:
- `init_device = "cuda"`, hard-coded in newer copies of LLaDAModelLM.__init__ (a CUDA error
  without a GPU, a full fp32 copy on the GPU with one): the inner model is built here with no
  fixed device, so the weights go where transformers builds them (meta, then the checkpoint's);
- `post_init()`, never called by LLaDAModelLM.__init__, which 5.x needs (`all_tied_weights_keys`);
- `tie_weights()`, which 5.x calls with arguments LLaDA's takes none of;
- `config.use_cache`, which 5.x no longer keeps (a diffusion LM has no KV cache: False).
Only this file is ours; modeling_llada.py and configuration_llada.py are LLaDA's, unchanged.
"""

from transformers import AutoModel

from .configuration_llada import LLaDAConfig
from .modeling_llada import LLaDAModel, LLaDAModelLM as PublishedLLaDAModelLM
from .modeling_llada import create_model_config_from_pretrained_config


class LLaDAModelLM(PublishedLLaDAModelLM):
    def __init__(self, config, model=None, init_params=False):
        if not hasattr(config, "use_cache"):
            config.use_cache = False
        if model is None:
            model_config = create_model_config_from_pretrained_config(config)
            model_config.init_device = None  # the default device, not a hard-coded "cuda"
            model = LLaDAModel(model_config, init_params=init_params)
        super().__init__(config, model=model)
        self.post_init()

    def tie_weights(self, *args, **kwargs):
        return super().tie_weights()


# modeling_llada.py registers its own class for LLaDAConfig when imported (as it just was, above),
# and AutoModel prefers a registered class to config.json's auto_map: register this one instead.
AutoModel.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
