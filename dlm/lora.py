"""
LoRA fine-tuning for DLLM-JEPA: low-rank adapters (Hu et al., 2021) through the `peft` library.

The objective (`dllm_jepa.DLLMJEPA`) sees only "a model" and "a target encoder"; this file is
the LoRA plumbing around it:
- `apply_lora` injects adapters in place (`peft.inject_adapter_in_model`): the model keeps its
  class, forward signature and block list, so `DLLMJEPA`, `backbones.Family.blocks` and FSDP2
  sharding treat it as before. Only the adapter ("default") trains; the base weights are frozen.
  Adapted layers: the blocks' linear layers named in `DEFAULT_TARGETS` or `--lora-targets`.
- The EMA target without a weight copy (`EMAAdapterTarget`): a second adapter, "ema", in the
  same layers, equal to the trained one at start and moved towards it after every optimizer
  step (DLLMJEPA.update_target lerps the pairs `ema_pairs()` names). The target pass runs the
  backbone itself with "ema" active, in eval mode: frozen base + EMA adapter. Its memory is the
  adapter's size, not the model's.
- The L2 anchor under LoRA (`lora_delta_sq`): a LoRA model's weights differ from the base only
  by scaling * B @ A in each adapted layer, so ||theta - theta_base||^2 is exactly
  sum ||scaling * B A||_F^2, computed from r x r products (no frozen copy, no out x in matrix).
- Export: `merged_state` (the base weights plus the adapter, under the base model's names: what
  save_pretrained writes, loadable without peft) and `merge_and_unload` (the same, in place);
  `save_adapter` writes the adapter alone in peft's format (`PeftModel.from_pretrained` loads it).
- Loading an adapter folder (evaluate.py): `read_adapter_config` checks adapter_config.json and
  the weights before any model loads, `load_adapter` merges it into its base; each problem is
  one line naming the folder or file (peft's are size-mismatch tables, a bare JSON error).

How train.py uses it (flags --lora-rank, --lora-alpha, --lora-dropout, --lora-targets):

    lora.apply_lora(backbone.model, backbone.family.name, rank, alpha, dropout, targets)
    model = DLLMJEPA(..., **lora.dllm_jepa_kwargs(backbone.model, config))
    ...
    checkpoints.export_pretrained(..., transform=lambda s: lora.merged_state(model.backbone, s))
    lora.save_adapter(model.backbone, final / "adapter", is_main=env.is_main)

`python -m scripts.bench_lora` measures the tiny model: trainable parameters, target-encoder memory
and step time, LoRA against full fine-tuning.
"""

import contextlib
import dataclasses
import json
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch.distributed.tensor import DTensor

from dlm import backbones, sharding

TRAINED, EMA = "default", "ema"  # the adapter the optimizer trains; its EMA copy (the target)

# Linear layers adapted by default, per backbones.Family name: every projection of attention and
# MLP. LLaDA-8B's blocks (LLaDALlamaBlock) and Dream's (Qwen2) as in their public modeling code.
DEFAULT_TARGETS = {
    "tiny-dlm": ("qkv", "attn_out", "gate_up", "down"),
    "llada": ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"),
    "dream": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}



def settled(rank: int, alpha: float | None, targets: str | None, family_name: str) -> dict:
    """train.py's LoRA flags with their defaults settled (none without --lora-rank): alpha such
    that the scale alpha / rank is 2 whatever the rank; targets as named, or the family's."""
    if not rank:
        return {}
    names = targets.split(",") if targets is not None else DEFAULT_TARGETS.get(family_name, ())
    return dict(lora_alpha=alpha or 2.0 * rank,
                lora_targets=",".join(dict.fromkeys(name.strip() for name in names if name.strip())))

# -----------------------------------------------------------------------------
# Injecting adapters


def family_named(name: str) -> backbones.Family:
    for family in backbones.FAMILIES.values():
        if family.name == name:
            return family
    raise ValueError(f"unknown family {name!r}: one of {sorted(f.name for f in backbones.FAMILIES.values())}")


def block_linears(model: nn.Module, family: backbones.Family) -> dict[str, list[str]]:
    """{short name: full names (relative to model)} of the nn.Linear layers inside the blocks.
    Only inside the blocks: LLaDA's untied LM head is also called `ff_out`."""
    blocks = family.blocks(model)
    block_ids = {id(block) for block in blocks}
    found = {}
    for name, module in model.named_modules():
        if id(module) in block_ids:
            for sub_name, sub in module.named_modules():
                if isinstance(sub, nn.Linear) and sub_name:
                    found.setdefault(sub_name.rpartition(".")[2], []).append(f"{name}.{sub_name}")
    return found


def resolve_targets(model: nn.Module, family_name: str, targets=None) -> list[str]:
    """Full names of the layers to adapt. targets: short names (a list, or one string separated by
    commas) of linear layers inside the blocks; None = the family's DEFAULT_TARGETS. A name that
    matches no layer is an error (peft would silently skip it when another name matches)."""
    if isinstance(targets, str):
        targets = targets.split(",")
    if not targets and family_name not in DEFAULT_TARGETS:
        raise ValueError(f"--lora-targets: the {family_name} family has no default LoRA targets; name them")
    names = list(dict.fromkeys(t.strip() for t in (targets or DEFAULT_TARGETS[family_name]) if t.strip()))
    if not names:
        raise ValueError("--lora-targets: give at least one layer name")
    available = block_linears(model, family_named(family_name))
    for name in names:
        if name not in available:
            raise ValueError(f"--lora-targets: {name!r} names no linear layer in the {family_name} blocks; "
                             f"available: {', '.join(sorted(available))}")
    return [full for name in names for full in available[name]]


def apply_lora(model: nn.Module, family_name: str, rank: int, alpha: float, dropout: float = 0.0,
               targets=None) -> nn.Module:
    """Inject a trainable LoRA adapter into `model` in place and freeze everything else.

    Each adapted nn.Linear W becomes W x + (alpha / rank) * B A dropout(x), A (rank, in) random,
    B (out, rank) zero: at start the model computes exactly what it did. family_name: a
    backbones.Family name ("tiny-dlm", "llada", "dream"). Returns the same model object.
    """
    if rank < 1:
        raise ValueError(f"--lora-rank {rank}: must be >= 1")
    if not alpha > 0:
        raise ValueError(f"--lora-alpha {alpha}: must be > 0")
    if not 0 <= dropout < 1:
        raise ValueError(f"--lora-dropout {dropout}: must lie in [0, 1)")
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    names = resolve_targets(model, family_name, targets)
    full = max(min(model.get_submodule(name).weight.shape) for name in names)
    if rank > full:  # B A has rank <= min(out, in): a larger rank only costs memory (and may not fit)
        raise ValueError(f"--lora-rank {rank}: above {full}, where the update of every adapted layer is already "
                         "full rank; give at most that, or --lora-rank 0 for full fine-tuning")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names)
    inject_adapter_in_model(config, model, adapter_name=TRAINED)
    for _, layer in lora_layers(model):  # fp32 masters, whatever the base's dtype (peft gives a bf16 base
        layer.lora_A[TRAINED].float()    # bf16 adapters, whose small updates would round away); on every
        layer.lora_B[TRAINED].float()    # rank alike (peft leaves adapters on the meta device uncast)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(f".{TRAINED}." in name and ".lora_" in name)
    return model


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(module, LoraLayer) for module in model.modules())


def adapter_parameters(model: nn.Module, adapter: str = TRAINED) -> list[nn.Parameter]:
    """The adapter's tensors, layer by layer (A then B), in a fixed order."""
    return [p for _, layer in lora_layers(model) for adapters in (layer.lora_A, layer.lora_B)
            for p in adapters[adapter].parameters()]

# -----------------------------------------------------------------------------
# The EMA target: the frozen base plus an EMA copy of the adapter


@contextlib.contextmanager
def using_adapter(model: nn.Module, adapter: str):
    """Run `model` with `adapter` active in every LoRA layer, then restore the active adapters.

    It sets peft's `_active_adapter` directly: peft's set_adapter would also flip requires_grad,
    and under FSDP2 a block's gathered parameters keep the requires_grad they had at their first
    all-gather (the first target pass would freeze the trained adapter for good)."""
    layers = [layer for _, layer in lora_layers(model)]
    before = [layer.active_adapter for layer in layers]
    for layer in layers:
        layer._active_adapter = adapter
    try:
        yield
    finally:
        for layer, active in zip(layers, before):
            layer._active_adapter = active


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Eval mode (no dropout) inside, each module's own mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


class EMAAdapterTarget(nn.Module):
    """DLLMJEPA's target encoder for a LoRA backbone: the backbone itself, run in eval mode with
    its EMA adapter active, so the target is frozen base + EMA adapter, without a weight copy.

    Building it adds the "ema" adapter (same layers, rank and scaling, no dropout), equal to the
    trained one and never trained. The backbone is held, not registered: its weights (the EMA
    adapter included) are saved, moved and sharded once, as the backbone's; this module owns no
    parameters. Other attributes read through to the backbone (blocks, embeddings, config), so
    DLLMJEPA finds where a truncated target pass stops.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not has_lora(model):
            raise ValueError("EMAAdapterTarget: the model has no LoRA adapter (apply_lora first)")
        self.__dict__["_model"] = model  # not a submodule
        if EMA not in model.peft_config:
            config = dataclasses.replace(model.peft_config[TRAINED], lora_dropout=0.0)
            with warnings.catch_warnings():  # "multiple adapters in the model": intended
                warnings.simplefilter("ignore", UserWarning)
                inject_adapter_in_model(config, model, adapter_name=EMA)
            for _, layer in lora_layers(model):
                layer.set_adapter(TRAINED)  # the trained adapter active again: it trains, "ema" does not
                for adapters in (layer.lora_A, layer.lora_B):  # the trained one's dtype (fp32): EMA steps
                    adapters[EMA].to(adapters[TRAINED].weight.dtype)  # of (1 - m) * gap must not round away
            with torch.no_grad():
                torch._foreach_copy_(adapter_parameters(model, EMA), adapter_parameters(model, TRAINED))

    @property
    def adapted(self) -> nn.Module:
        """The LoRA backbone it runs. (Not `model`: LLaDA's and Dream's wrappers name their inner
        model `.model`, which families' blocks() read through this module.)"""
        return self.__dict__["_model"]

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_model" not in self.__dict__:
                raise
            return getattr(self.__dict__["_model"], name)

    def forward(self, *args, **kwargs):
        model = self.adapted
        with using_adapter(model, EMA), evaluating(model):
            try:
                return model(*args, **kwargs)
            except sharding.StopForward as stop:  # a truncated pass (forward_until): finish the
                sharding.finish_stopped_forward(model, stop.args[0])  # backbone's FSDP forward, as it would
                raise

    def ema_pairs(self) -> tuple[list, list]:
        """(EMA adapter tensors, trained adapter tensors), pair by pair: what update_target lerps.
        Read each call: fully_shard replaces parameters with sharded ones."""
        return (adapter_parameters(self.adapted, EMA),
                [p.detach() for p in adapter_parameters(self.adapted, TRAINED)])

    def extra_repr(self) -> str:
        return f"EMA adapter of {type(self.adapted).__name__}"

# -----------------------------------------------------------------------------
# The anchor under LoRA


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 shard (DTensor) is gathered, differentiably (every rank calls)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def lora_delta_sq(model: nn.Module, adapter: str = TRAINED) -> torch.Tensor:
    """sum over adapted layers of ||scaling * B @ A||_F^2: exactly ||theta - theta_base||^2 for a
    LoRA model (only those weights differ from the base), the L2 anchor without a frozen copy.

    ||s B A||_F^2 = s^2 tr(A^T B^T B A) = s^2 <B^T B, A A^T>: two r x r products per layer, never
    the out x in delta. Under FSDP every rank gathers the (small) adapter and computes the whole
    sum; it returns 1/world_size of the value (as l2_distance returns this rank's share, which
    the trainer sums over ranks) with the gradient of the whole (each rank's shard gets its own
    part of it, which no reduce-scatter averages).
    """
    total, world = None, 1
    for _, layer in lora_layers(model):
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        if isinstance(a, DTensor):
            world = a.device_mesh.size()
        a, b = full(a).float(), full(b).float()
        term = layer.scaling[adapter] ** 2 * ((b.T @ b) * (a @ a.T)).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("lora_delta_sq: the model has no LoRA adapter")
    return total - total.detach() * (1 - 1 / world)  # value total / world, gradient of total


def dllm_jepa_kwargs(model: nn.Module, config) -> dict:
    """DLLMJEPA's keyword arguments for a LoRA backbone (config: a dllm_jepa.JEPAConfig): the EMA
    target as an EMA adapter, the anchor as the adapter's weight change. Neither copies the model."""
    return dict(target_encoder=EMAAdapterTarget(model) if config.target_kind == "ema" else None,
                anchor_fn=lora_delta_sq if config.method_spec["anchor"] else None)

# -----------------------------------------------------------------------------
# Export


def merged_state(model: nn.Module, state: dict | None = None, adapter: str = TRAINED) -> dict:
    """The state dict of the plain model: base weights plus scaling * B @ A of `adapter` in each
    adapted layer, under the names the model had before apply_lora; every adapter tensor
    dropped. state: the model's full state dict (checkpoints.export_pretrained gathers it); None
    = model.state_dict() (gathered here if sharded: then every rank must call)."""
    state = model.state_dict() if state is None else state
    layers = {f"{name}.": layer for name, layer in lora_layers(model)}
    merged = {}
    for key, value in state.items():
        prefix = next((p for p in layers if key.startswith(p)), None)
        if prefix is None:
            merged[key] = full(value)
            continue
        rest = key[len(prefix):]
        if not rest.startswith("base_layer."):
            continue  # lora_A, lora_B, dropout of any adapter
        value = full(value)
        if rest == "base_layer.weight":
            layer = layers[prefix]
            a = full(state[f"{prefix}lora_A.{adapter}.weight"]).float()
            b = full(state[f"{prefix}lora_B.{adapter}.weight"]).float()
            delta = layer.scaling[adapter] * (b @ a)
            value = (value.float() + (delta.T if layer.fan_in_fan_out else delta)).to(value.dtype)
        merged[prefix + rest[len("base_layer."):]] = value
    return merged


def merge_and_unload(model: nn.Module, adapter: str = TRAINED) -> nn.Module:
    """In place (one process, unsharded): merge `adapter` into each base layer, put the base
    layer back where its LoRA layer was, drop every adapter. Returns the model, now plain."""
    modules = dict(model.named_modules())
    for name, layer in lora_layers(model):
        layer.merge(safe_merge=True, adapter_names=[adapter])
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, layer.get_base_layer())
    model.__dict__.pop("peft_config", None)
    return model


def adapter_state(model: nn.Module, adapter: str = TRAINED) -> dict:
    """{name: full tensor on CPU} of the adapter (gathered if sharded: every rank must call)."""
    marker = f".{adapter}."
    return {name: full(p.detach()).cpu() for name, p in model.named_parameters()
            if ".lora_" in name and marker in name}


def save_adapter(model: nn.Module, out_dir, adapter: str = TRAINED, is_main: bool = True,
                 state: dict | None = None) -> Path:
    """Write the adapter alone, as PeftModel.save_pretrained does (adapter_config.json and
    adapter_model.safetensors): `PeftModel.from_pretrained(base_model, out_dir)` loads it onto
    the base model. Every rank calls (the adapter is gathered); rank 0 writes. state: the
    adapter_state already gathered (then only rank 0 needs to call)."""
    from safetensors.torch import save_file
    state = adapter_state(model, adapter) if state is None else state
    out_dir = Path(out_dir)
    if is_main:
        tensors = get_peft_model_state_dict(model, state_dict=state, adapter_name=adapter)
        config = dataclasses.replace(model.peft_config[adapter], inference_mode=True,
                                     base_model_name_or_path=getattr(model, "name_or_path", None) or None)
        out_dir.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(out_dir)
        # PeftModel's own names: its wrapper (base_model) around the model (model)
        save_file({f"base_model.model.{k}": v.contiguous() for k, v in tensors.items()},
                  out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    return out_dir

# -----------------------------------------------------------------------------
# Loading an adapter folder (evaluate.py --adapter, or --model ADAPTER_FOLDER)

ADAPTER_FIELDS = {  # what peft reads before it loads weights: the types it needs, in words
    "r": (int, "a positive integer"), "lora_alpha": ((int, float), "a number"),
    "target_modules": ((list, str, type(None)), "a list of layer names"),
    "base_model_name_or_path": ((str, type(None)), "a folder or hub id (a string)")}


def read_adapter_config(folder: Path) -> dict:
    """A peft adapter folder's adapter_config.json, checked before any model loads: ValueError,
    one line naming the file and what to do, when it is missing, not JSON, not an object, its
    fields of the wrong type (a rank "8", a base named by a number), or its weights are absent."""
    file = Path(folder) / "adapter_config.json"
    if not file.is_file():
        raise ValueError(f"{folder}: no adapter_config.json there; give a peft adapter folder (train.py "
                         "--export-adapter writes final/adapter)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: not valid JSON ({' '.join(str(e).split())}); restore the adapter's files") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: holds a {type(config).__name__}, not a JSON object; restore the adapter's files")
    for key, (kinds, wanted) in ADAPTER_FIELDS.items():
        value = config.get(key)
        if not isinstance(value, kinds) or isinstance(value, bool) or (key == "r" and value < 1):
            raise ValueError(f"{file}: {key} is {json.dumps(value)}, not {wanted}; restore the adapter's files")
    if not any((Path(folder) / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ValueError(f"{folder}: no adapter_model.safetensors (the adapter's weights); copy the whole adapter folder")
    return config


def load_adapter(model: nn.Module, folder: Path, base: str) -> nn.Module:
    """The adapter in `folder` (read_adapter_config: checked) merged into `model`, the model of
    `base` (PeftModel.from_pretrained, then merge_and_unload): a plain model again. ValueError,
    one line naming the folder, when it does not fit the base (another width, targets the model
    lacks) or its weights are damaged, instead of peft's tables of size mismatches."""
    from peft import PeftModel
    from safetensors import SafetensorError
    read_adapter_config(folder)
    try:
        return PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    except RuntimeError as e:
        text = " ".join(str(e).split())
        size = re.search(r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from "
                         r"checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)", text)
        if not size:
            raise
        count = text.count("size mismatch for")
        raise ValueError(f"{folder}: the adapter does not fit the base model {base}: {size[1]} is [{size[2]}] in the "
                         f"adapter but [{size[3]}] in the model" + (f" ({count} tensors differ)" if count > 1 else "")
                         + "; give the base it was trained on (--model)") from None
    except SafetensorError as e:
        raise ValueError(f"{folder}: adapter_model.safetensors is damaged ({' '.join(str(e).split())}); copy the "
                         "adapter again") from None
    except ValueError as e:  # peft's own refusals, e.g. target modules the base lacks
        raise ValueError(f"{folder}: peft could not apply the adapter to {base} ({' '.join(str(e).split())}); give "
                         "the base it was trained on (--model)") from None


def summary(model: nn.Module, rank: int, alpha: float, targets: str) -> str:
    """One line on what LoRA trains in a DLLMJEPA `model`: the adapters' size against the base's
    (every parameter that is no adapter's), the predictor's, and the EMA adapter's memory (the
    target encoder it replaces would be a full copy)."""
    base = model.backbone
    adapter = sum(p.numel() for p in adapter_parameters(base))
    base_parameters = sum(p.numel() for name, p in base.named_parameters() if "lora_" not in name)
    ema = (sum(p.numel() * p.element_size() for p in adapter_parameters(base, EMA))
           if isinstance(model.target_encoder, EMAAdapterTarget) else 0)
    predictor = sum(p.numel() for p in model.predictor.parameters()) if model.predictor is not None else 0
    return (f"LoRA rank {rank}, alpha {alpha:g} on {targets.replace(',', ', ')} ({len(lora_layers(base))} layers): "
            f"{adapter:,} trainable parameters ({adapter / base_parameters:.1%} of the base's {base_parameters:,})"
            + (f", plus the predictor's {predictor:,}" if predictor else "")
            + (f"; EMA target: an EMA adapter, {ema / 2**20:.2f} MiB" if ema else ""))
