"""
Backbones: load a masked-diffusion LM and describe it to the trainer.

`DLLMJEPA` only needs a model that returns logits and hidden states, plus two facts (the
mask id, whether logits are shifted). The trainer needs a few more: where the transformer
blocks are (to shard them and checkpoint their activations) and which id pads an answer.
An adapter per family (`Family`, in `FAMILIES`) supplies these facts; `load_backbone`
detects the family from the config's `model_type`.

Supported: the tiny model of `tiny_model.py`, LLaDA (GSAI-ML/LLaDA-8B-Instruct, -Base) and
Dream (Dream-org/Dream-v0-Instruct-7B, -Base). Both real families ship their modeling code
with the checkpoint (`trust_remote_code=True`), written for transformers 4.x. Under 5.x
that code needs a few narrow repairs; each is a small function below that first checks
whether its problem is present, does nothing if not, and otherwise returns one line saying
what it changed (collected in `Backbone.fixes`, so the trainer can log them).

Conventions every family here shares (checked against the public modeling files):
- forward(input_ids=..., output_hidden_states=True) returns `.logits` (B, T, V) and
  `.hidden_states`, a tuple of n_layers + 1 tensors (B, T, C): the embeddings, the input of
  each later block, and last the output of the final norm;
- no attention mask is needed (a diffusion LM attends over the whole canvas);
- never pass `labels`: Dream would compute an autoregressive loss with them.

Activation checkpointing is applied by the trainer to each module of `Backbone.blocks`, the
same way for every family, not through transformers' `gradient_checkpointing_enable()`:
under 5.x that fails on LLaDA (its `_set_gradient_checkpointing` override predates the
`every_n_layers` argument 5.x passes).
"""

import contextlib
import functools
import inspect
import json
import logging
import re
import shutil
import struct
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors import SafetensorError
from torch.overrides import TorchFunctionMode
from transformers import AutoConfig, AutoModel, AutoTokenizer

import tiny_model
from dlm import load_checks
from dlm.held_logs import HeldLogs

# A fix runs before the model is built (`before`: it may patch the config or the remote
# class, or enter a context on the ExitStack that stays open while the model loads) or
# after (`after`: it repairs the loaded model). It returns None when its problem is absent.
BeforeFix = Callable[[object, type, contextlib.ExitStack], str | None]
AfterFix = Callable[[nn.Module], str | None]


@dataclass(frozen=True)
class Family:
    name: str
    blocks: Callable[[nn.Module], nn.ModuleList]   # the transformer blocks, in order
    shift_logits: bool = False                      # output at i predicts token i + 1 (Dream)
    published_mask_token_id: int | None = None      # the released checkpoints' id, a cross-check
    chat_template: str | None = None                # only for tokenizers without one (-Base)
    before: tuple[BeforeFix, ...] = ()
    after: tuple[AfterFix, ...] = ()
    # What an export ships so that plain AutoModel.from_pretrained(trust_remote_code=True) loads
    # it under 5.x: a file of remote_fixes/ and the auto_map entry (module.Class) it subclasses.
    remote_fixes: tuple[str, str] | None = None


@dataclass
class Backbone:
    model: nn.Module
    tokenizer: object
    family: Family
    mask_token_id: int
    eos_token_id: int                               # ends an answer and pads the canvas after it
    fixes: list[str] = field(default_factory=list)  # what load_backbone repaired, for the log
    saved_dtype: torch.dtype | None = None          # the checkpoint's weights' dtype (None: unknown/new)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.family.blocks(self.model)

# -----------------------------------------------------------------------------
# Fixes for LLaDA's remote code (GSAI-ML/LLaDA-8B-*) under transformers 5.x


def llada_restore_use_cache(config, model_class, stack):
    """LLaDAConfig passes `use_cache` to PretrainedConfig, which 5.x no longer keeps as an
    attribute; LLaDA's forward reads `self.config.use_cache` and fails. A diffusion LM has no
    KV cache, so False is the only meaningful value."""
    if hasattr(config, "use_cache"):
        return None
    config.use_cache = False
    return "config.use_cache was missing: set to False"


def _is_cuda(x) -> bool:
    return (isinstance(x, torch.device) and x.type == "cuda"
            or isinstance(x, str) and x.startswith("cuda"))


class _CudaTo(TorchFunctionMode):
    """While active, torch calls asked to put a tensor on "cuda" (device=..., or a device
    passed positionally as in tensor.to(device)) put it on `device` instead. A device object
    made with torch.device("cuda") names the CPU: code passes it to torch.autocast (which has
    no meta backend) and builds small caches on it that must hold values (LLaDA's rotary
    sin/cos tables, which are no buffers, so no state dict or broadcast carries them)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        to = torch.device("cpu") if func is torch.device else self.device
        args = tuple(to if _is_cuda(a) else a for a in args)
        kwargs = {k: to if k == "device" and _is_cuda(v) else v for k, v in (kwargs or {}).items()}
        return func(*args, **kwargs)


def _source(function) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):  # no source file (built-in or generated): nothing to detect
        return ""


def llada_build_on_cpu(config, model_class, stack):
    """Newer copies of LLaDAModelLM.__init__ set `init_device = "cuda"` under a comment that
    says CPU, so building fails without a GPU, and with one puts a full fp32 copy of the
    model on every rank's GPU. While the model is built, allocations asked on "cuda" go to
    the CPU, as the original code intended (or to the meta device, when only the structure
    is built: `load_backbone(weights=False)`); the trainer moves and shards it afterwards."""
    if not re.search(r"init_device\s*=\s*[\"']cuda", _source(model_class.__init__)):
        return None
    on_meta = torch.get_default_device().type == "meta"
    stack.enter_context(_CudaTo(torch.device("meta" if on_meta else "cpu")))
    return (f"{model_class.__name__}.__init__ hard-codes init_device='cuda': built on "
            f"{'the meta device' if on_meta else 'CPU'} instead")


def llada_run_post_init(config, model_class, stack):
    """LLaDAModelLM.__init__ never calls `post_init()`, which 5.x relies on to record the
    model's tied-weight keys and parallel plans: from_pretrained and save_pretrained fail
    on the missing `all_tied_weights_keys`. Make __init__ end with it, as 5.x models do
    (inside from_pretrained it initialises no weights: those come from the checkpoint)."""
    init = model_class.__init__
    if getattr(init, "runs_post_init", False) or "post_init" in _source(init):
        return None

    @functools.wraps(init)
    def init_then_post_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.post_init()
    init_then_post_init.runs_post_init = True
    model_class.__init__ = init_then_post_init
    return f"{model_class.__name__}.__init__ skips post_init(): now runs it"


def llada_tie_weights_accepts_arguments(config, model_class, stack):
    """LLaDAModelLM overrides `tie_weights(self)` with no parameters; 5.x calls it with
    `missing_keys=` and `recompute_mapping=` (in post_init and from_pretrained): TypeError.
    Accept and ignore them; LLaDA's own tying (output head = input embedding, only when
    config.weight_tying, which the released 8B models leave off) is unchanged."""
    tie = model_class.__dict__.get("tie_weights")
    if (tie is None or getattr(tie, "accepts_arguments", False)
            or len(inspect.signature(tie).parameters) > 1):
        return None

    @functools.wraps(tie)
    def tie_weights(self, *args, **kwargs):
        return tie(self)
    tie_weights.accepts_arguments = True
    model_class.tie_weights = tie_weights
    return f"{model_class.__name__}.tie_weights() takes no arguments: now ignores 5.x's"


# -----------------------------------------------------------------------------
# Fixes for Dream's remote code (Dream-org/Dream-v0-*-7B) under transformers 5.x


def plain_rope_frequencies(config, device=None, seq_len=None, **kwargs):
    """Inverse frequencies of plain rotary embeddings (Su et al., 2021): theta^(-2i/d) for
    i < d/2, d the head dimension; attention scaling 1."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / theta ** exponents, 1.0


def dream_register_default_rope(config, model_class, stack):
    """Dream's rotary module looks up ROPE_INIT_FUNCTIONS["default"], which 5.x removed
    (KeyError while building). Register plain RoPE under that name; it is what "default"
    computed."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    if "default" in ROPE_INIT_FUNCTIONS:
        return None
    ROPE_INIT_FUNCTIONS["default"] = plain_rope_frequencies
    return 'ROPE_INIT_FUNCTIONS["default"] was missing: registered plain RoPE'


def dream_tied_weights_as_dict(config, model_class, stack):
    """5.x expects `_tied_weights_keys` as {tied parameter: source parameter}; DreamModel
    declares a list (4.x style) and save_pretrained fails on it. Dream's output head ties to its
    input embedding (only when config.tie_word_embeddings, which the 7B models leave off)."""
    keys = getattr(model_class, "_tied_weights_keys", None)
    if not isinstance(keys, list):
        return None
    model_class._tied_weights_keys = {key: "model.embed_tokens.weight" for key in keys}
    return f"{model_class.__name__}._tied_weights_keys was a list: made a dict"


def dream_generation_config_accepts_arguments(config, model_class, stack):
    """DreamModel.from_pretrained always reads a DreamGenerationConfig, whose `validate(self,
    is_init=False)` 5.x calls with `user_set_attributes=` (TypeError: no Dream checkpoint with a
    generation_config.json loaded). Accept and ignore the new arguments; Dream's validate does
    nothing either way."""
    generation_config = getattr(sys.modules.get(model_class.__module__), "DreamGenerationConfig", None)
    validate = getattr(generation_config, "validate", None)
    if (validate is None or getattr(validate, "accepts_arguments", False)
            or any(p.kind is p.VAR_KEYWORD for p in inspect.signature(validate).parameters.values())):
        return None

    @functools.wraps(validate)
    def validate_ignoring_arguments(self, is_init=False, **kwargs):
        return validate(self, is_init)
    validate_ignoring_arguments.accepts_arguments = True
    generation_config.validate = validate_ignoring_arguments
    return "DreamGenerationConfig.validate() takes no 5.x arguments: now ignores them"


def dream_recompute_rotary(model):
    """`inv_freq` is a non-persistent buffer: not in the checkpoint, and 5.x builds the model
    on the meta device, so after from_pretrained it holds uninitialised memory and the
    logits are silently wrong. Recompute it in float32 in every rotary module."""
    repaired = 0
    for module in model.modules():
        if not (isinstance(getattr(module, "inv_freq", None), torch.Tensor)
                and hasattr(module, "rope_init_fn")) or module.inv_freq.is_meta:
            continue  # on the meta device (a structure only), the trainer copies rank 0's buffers
        inv_freq, module.attention_scaling = module.rope_init_fn(
            module.config, module.inv_freq.device, **getattr(module, "rope_kwargs", {}))
        if not torch.equal(module.inv_freq, inv_freq):
            repaired += 1
        module.register_buffer("inv_freq", inv_freq, persistent=False)
        module.original_inv_freq = module.inv_freq
    return f"recomputed rotary inv_freq in {repaired} module(s)" if repaired else None


def dream_refuse_labels(model):
    """Passing `labels` to Dream computes a next-token (autoregressive) loss that has
    nothing to do with diffusion; refuse it loudly instead."""
    def check(module, args, kwargs):
        if kwargs.get("labels") is not None:
            raise ValueError("do not pass labels to Dream: it would compute an autoregressive "
                             "loss; DLLMJEPA computes the diffusion loss from the logits")
    model.register_forward_pre_hook(check, with_kwargs=True)
    return None  # a guard, not a repair

# -----------------------------------------------------------------------------
# The families

# Chat formats for checkpoints whose tokenizer ships none (the -Base models): LLaDA's
# Instruct format (Llama-3 style headers) and Dream's (ChatML, as Qwen2.5).
LLADA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
DREAM_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def llada_blocks(model):
    inner = model.model.transformer  # LLaDAModelLM -> LLaDAModel -> ModuleDict
    if "blocks" not in inner:
        raise ValueError("this LLaDA config groups its blocks (block_group_size > 1): "
                         "shard and checkpoint model.model.transformer.block_groups instead")
    return inner.blocks


FAMILIES = {
    tiny_model.TinyDLMConfig.model_type: Family("tiny-dlm", blocks=lambda m: m.layers),
    "llada": Family(
        "llada", blocks=llada_blocks, published_mask_token_id=126336,
        chat_template=LLADA_CHAT_TEMPLATE,
        before=(llada_restore_use_cache, llada_build_on_cpu, llada_tie_weights_accepts_arguments,
                llada_run_post_init),
        remote_fixes=("llada_transformers5.py", "modeling_llada.LLaDAModelLM")),
    "Dream": Family(
        "dream", blocks=lambda m: m.model.layers, shift_logits=True,
        published_mask_token_id=151666, chat_template=DREAM_CHAT_TEMPLATE,
        before=(dream_register_default_rope, dream_tied_weights_as_dict,
                dream_generation_config_accepts_arguments),
        after=(dream_recompute_rotary, dream_refuse_labels),
        remote_fixes=("dream_transformers5.py", "modeling_dream.DreamModel")),
}


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"unknown model family model_type={model_type!r}: supported are {sorted(FAMILIES)}. "
            "To add one, give backbones.FAMILIES a Family naming where its transformer blocks "
            "are and whether its logits are shifted (output at i predicts token i + 1). The "
            "model must return .logits and .hidden_states from forward(input_ids=..., "
            "output_hidden_states=True), and its config (or tokenizer) must give mask_token_id")
    return FAMILIES[model_type]

# -----------------------------------------------------------------------------
# Special ids


def mask_token_id_of(config, tokenizer, family: Family | None = None) -> int:
    """The config's mask_token_id (LLaDA's tokenizer may set no mask token), else the
    tokenizer's; both, when given, must agree. It must lie in the vocabulary and differ from
    EOS/padding (LLaDA's config class defaults mask, EOS and pad all to GPT-2's 50256, so a
    config that lost its mask id would otherwise silently mask with EOS)."""
    from_config = getattr(config, "mask_token_id", None)
    from_tokenizer = getattr(tokenizer, "mask_token_id", None)
    if from_config is not None and from_tokenizer is not None and from_config != from_tokenizer:
        raise ValueError(f"config.mask_token_id={from_config} but the tokenizer's mask token "
                         f"{tokenizer.mask_token!r} has id {from_tokenizer}: fix one of them")
    mask_id = from_config if from_config is not None else from_tokenizer
    if mask_id is None:
        raise ValueError("the model has no mask token: neither config.mask_token_id nor "
                         "tokenizer.mask_token_id is set")
    if not 0 <= mask_id < config.vocab_size:
        raise ValueError(f"mask_token_id={mask_id} lies outside the vocabulary "
                         f"(vocab_size={config.vocab_size})")
    specials = {getattr(config, "eos_token_id", None), getattr(config, "pad_token_id", None),
                getattr(tokenizer, "eos_token_id", None)}
    if mask_id in specials:
        raise ValueError(f"mask_token_id={mask_id} is also the EOS/padding id: the config "
                         "probably lacks its own mask_token_id")
    if family and family.published_mask_token_id not in (None, mask_id):
        warnings.warn(f"{family.name}: mask_token_id={mask_id}, but the released checkpoints "
                      f"use {family.published_mask_token_id}; fine for a custom model")
    return mask_id


def eos_token_id_of(config, tokenizer) -> int:
    """The tokenizer's EOS (what data.py appends and pads with), else the config's."""
    eos = getattr(tokenizer, "eos_token_id", None)
    from_config = getattr(config, "eos_token_id", None)
    if isinstance(from_config, (list, tuple)):
        from_config = from_config[0] if from_config else None
    if eos is None:
        eos = from_config
    if eos is None:
        raise ValueError("no EOS id: neither the tokenizer nor the config defines one")
    if from_config is not None and from_config != eos:
        warnings.warn(f"tokenizer EOS id {eos} differs from config.eos_token_id={from_config}; "
                      "answers are ended and padded with the tokenizer's")
    return eos

# -----------------------------------------------------------------------------
# Loading


def new_tiny_backbone(**overrides) -> Backbone:
    """A randomly initialised tiny model with its byte-level tokenizer (no files, no network)."""
    tokenizer = tiny_model.make_tokenizer()
    model = tiny_model.make_tiny_model(tokenizer, **overrides)
    return Backbone(model, tokenizer, family_of(model.config), model.config.mask_token_id,
                    tokenizer.eos_token_id)


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def saved_dtype_of(config, name_or_path: str, read_weights: bool = True) -> torch.dtype | None:
    """The dtype the checkpoint stores its weights in (what an export writes by default): its
    config's `dtype` (config.json's "dtype" or "torch_dtype"), else that of the first floating
    tensor in its safetensors (only the file's header is read; a hub checkpoint's only when
    read_weights, i.e. when its files are fetched anyway). None when neither tells."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    path, files = Path(name_or_path).expanduser(), []
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
    elif read_weights:
        from transformers.utils import cached_file
        with contextlib.suppress(Exception):  # none there, offline: unknown
            index = cached_file(name_or_path, "model.safetensors.index.json",
                                _raise_exceptions_for_missing_entries=False)
            name = (next(iter(json.loads(Path(index).read_text())["weight_map"].values()))
                    if index else "model.safetensors")
            files = [Path(f) for f in [cached_file(name_or_path, name, _raise_exceptions_for_missing_entries=False)] if f]
    for file in files:
        with contextlib.suppress(OSError, ValueError, struct.error):
            with open(file, "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
            for entry in header.values():
                if isinstance(entry, dict) and entry.get("dtype") in SAFETENSORS_DTYPES:
                    return SAFETENSORS_DTYPES[entry["dtype"]]
    return None


def install_remote_fixes(folder: Path, family: Family) -> str | None:
    """After save_pretrained of a LLaDA or Dream model into `folder`: copy the family's file of
    remote_fixes/ beside the checkpoint's own modeling code and point config.json's auto_map
    (AutoModel, AutoModelForCausalLM, and any entry naming the same class) at its subclass, so
    that plain `AutoModel.from_pretrained(folder, trust_remote_code=True)` loads it under
    transformers 5, and AutoModelForCausalLM too (the class is the LM, head included; Dream's
    released config lists AutoModel only). Returns the auto_map entry now used, or None when the
    family needs none or the folder's code is not the published one this repairs (then
    backbones.load_backbone(folder) loads it)."""
    if family.remote_fixes is None:
        return None
    file, published = family.remote_fixes
    config_file = Path(folder) / "config.json"
    config = json.loads(config_file.read_text())
    auto_map = config.get("auto_map") or {}
    ours = f"{Path(file).stem}.{published.rpartition('.')[2]}"
    module = published.partition(".")[0]
    if auto_map.get("AutoModel") not in (published, ours) or not (Path(folder) / f"{module}.py").is_file():
        return None
    shutil.copyfile(Path(__file__).resolve().parent / "remote_fixes" / file, Path(folder) / file)
    config["auto_map"] = {key: ours if value in (published, ours) else value for key, value in auto_map.items()}
    config["auto_map"]["AutoModelForCausalLM"] = ours
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return ours


def model_class_of(config, name_or_path: str) -> type:
    """The class AutoModel will build: the checkpoint's remote code (config.auto_map), or a
    class registered with AutoModel (the tiny model)."""
    auto_map = getattr(config, "auto_map", None) or {}
    if "AutoModel" in auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
        return get_class_from_dynamic_module(auto_map["AutoModel"], name_or_path)
    if type(config) not in AutoModel._model_mapping:
        raise ValueError(f"{name_or_path}: config.auto_map has no 'AutoModel' entry and no model "
                         f"class is registered with AutoModel for {type(config).__name__}")
    return AutoModel._model_mapping[type(config)]


def load_backbone(name_or_path: str, dtype: torch.dtype = torch.float32, weights: bool = True) -> Backbone:
    """A hub id or a local folder: the model, its tokenizer and chat template, its adapter.
    weights=False builds the same modules on the meta device (shapes and dtypes, no memory,
    no weight file read): what the trainer's ranks other than 0 do.

    A damaged folder raises ValueError with one line naming it and what is wrong (a truncated
    or foreign weight file, a config.json whose sizes or layer count do not match the weights, a
    missing or broken tokenizer or JSON file), not a SafetensorError or size-mismatch traceback
    nor a model with a block at random; the key table transformers logs before such an error is
    held back (logged as usual on success)."""
    loading_logs = [logging.getLogger(f"transformers.{name}") for name in ("modeling_utils", "configuration_utils")]
    with HeldLogs(*loading_logs) as reports:  # the key table, the config's complaints about ids
        try:
            backbone = read_backbone(name_or_path, dtype, weights)
        except (SafetensorError, RuntimeError, OSError, ValueError) as e:
            line = load_checks.load_error(name_or_path, e, reports.records, FAMILIES)
            if line is None:
                raise
            raise ValueError(line) from None
        reports.release()  # loaded: the report (missing or unexpected keys) is shown as usual
    if problem := (load_checks.stored_dtype_problem(Path(name_or_path).expanduser())
                   or load_checks.weights_problem(backbone.model)):
        raise ValueError(f"{name_or_path}: {problem}")
    return backbone


def read_backbone(name_or_path: str, dtype: torch.dtype = torch.float32, weights: bool = True) -> Backbone:
    """load_backbone without its error lines."""
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=True)
    family = family_of(config)
    vocab_size = getattr(config, "vocab_size", None)
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"config.json's vocab_size {vocab_size!r} is not a positive number of tokens; restore the "
                         "config.json saved with the weights")
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=True)
    if tokenizer.chat_template is None and family.chat_template is not None:
        tokenizer.chat_template = family.chat_template  # base checkpoints ship none
    mask_id = mask_token_id_of(config, tokenizer, family)
    eos_id = eos_token_id_of(config, tokenizer)
    if tokenizer.pad_token is None:  # LLaDA's SFT recipe pads with EOS
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(eos_id)

    saved_dtype = saved_dtype_of(config, name_or_path, weights)  # before from_pretrained sets config.dtype
    fixes = []
    with contextlib.ExitStack() as stack:
        model_class = model_class_of(config, name_or_path)
        if not weights:
            stack.enter_context(torch.device("meta"))
        fixes += [fix(config, model_class, stack) for fix in family.before]
        # AutoModel must build the class the fixes saw: importing a remote modeling file registers
        # its own class for the config class (LLaDA's does), which AutoModel would then prefer to
        # this checkpoint's auto_map (an export's remote_fixes subclass, after a base in-process)
        AutoModel.register(type(config), model_class, exist_ok=True)
        if "AutoModel" in (getattr(config, "auto_map", None) or {}):  # remote code: save_pretrained
            model_class.register_for_auto_class("AutoModel")  # copies its files, as AutoModel's own path does
        if weights:
            model, loading = AutoModel.from_pretrained(name_or_path, config=config, dtype=dtype, trust_remote_code=True,
                                                       output_loading_info=True)
            if problem := load_checks.keys_problem(model, loading):
                raise ValueError(f"{name_or_path}: {problem}")
        else:
            model = AutoModel.from_config(config, dtype=dtype, trust_remote_code=True)
    fixes += [fix(model) for fix in family.after]
    return Backbone(model, tokenizer, family, mask_id, eos_id, [f for f in fixes if f], saved_dtype)
