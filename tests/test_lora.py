"""
LoRA fine-tuning (lora.py): adapters only train, the EMA target is an EMA adapter, the anchor is
the adapter's exact weight change, export merges; on one process and sharded.

    OMP_NUM_THREADS=1 python -m pytest tests/test_lora.py -q
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tiny_model
from dllm_jepa import DLLMJEPA, JEPAConfig, ema_momentum, l2_distance
from dlm import backbones, lora
from dlm.sharding import stop_module, truncated_forward

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=64)
TINY_TARGETS = ("qkv", "attn_out", "gate_up", "down")


def tiny(seed=0, rank=4, alpha=8.0, dropout=0.0, targets=None, b_scale=0.0):
    """(LoRA backbone, an untouched copy of its base). b_scale > 0: random B, so the adapter
    already changes the model (B starts at zero)."""
    torch.manual_seed(seed)
    backbone = backbones.new_tiny_backbone(**SMALL)
    base = copy.deepcopy(backbone.model)
    lora.apply_lora(backbone.model, backbone.family.name, rank, alpha, dropout, targets)
    if b_scale:
        with torch.no_grad():
            for _, layer in lora.lora_layers(backbone.model):
                layer.lora_B[lora.TRAINED].weight.normal_(0, b_scale)
    return backbone, base


def batch(B=4, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T), generator=g), torch.full((B,), 6)


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def trained_names(model):
    return {name for name, p in model.named_parameters() if ".lora_" in name and f".{lora.TRAINED}." in name}

# -----------------------------------------------------------------------------
# Injection and targets


def test_family_defaults_resolve_on_the_tiny_model():
    backbone, base = tiny()
    model = backbone.model
    adapted = {name for name, _ in lora.lora_layers(model)}
    assert adapted == {f"layers.{i}.{t}" for i in range(2) for t in TINY_TARGETS}
    assert backbone.family.blocks(model) is model.layers and len(model.layers) == 2  # blocks still found
    ids, _ = batch()
    out = model(input_ids=ids, output_hidden_states=True)
    assert len(out.hidden_states) == 3
    assert torch.allclose(out.logits, logits(base, ids), atol=1e-6)  # B = 0: the base model at start


def test_llada_and_dream_defaults_resolve_inside_the_blocks():
    """Skeletons with the real families' module names: every default name resolves, and
    LLaDA's LM head, also called ff_out, is left alone (only the blocks' layers are adapted)."""
    def block(names):
        return nn.ModuleDict({name: nn.Linear(8, 8) for name in names})

    llada = nn.Module()
    llada.model = nn.Module()
    llada.model.transformer = nn.ModuleDict(dict(
        blocks=nn.ModuleList(block(lora.DEFAULT_TARGETS["llada"]) for _ in range(2)), ff_out=nn.Linear(8, 8)))
    names = lora.resolve_targets(llada, "llada")
    assert len(names) == 2 * 7 and "model.transformer.ff_out" not in names
    assert "model.transformer.blocks.1.ff_out" in names

    dream = nn.Module()
    dream.model = nn.Module()
    layer = lambda: nn.ModuleDict(dict(self_attn=block(("q_proj", "k_proj", "v_proj", "o_proj")),
                                       mlp=block(("gate_proj", "up_proj", "down_proj"))))
    dream.model.layers = nn.ModuleList(layer() for _ in range(3))
    dream.lm_head = nn.Linear(8, 8)
    names = lora.resolve_targets(dream, "dream")
    assert len(names) == 3 * 7 and "model.layers.2.mlp.down_proj" in names
    lora.apply_lora(dream, "dream", 2, 4)
    assert len(lora.lora_layers(dream)) == 21 and not isinstance(dream.lm_head, lora.LoraLayer)


def test_a_target_that_matches_nothing_raises_one_line():
    backbone = backbones.new_tiny_backbone(**SMALL)
    with pytest.raises(ValueError) as error:
        lora.apply_lora(backbone.model, "tiny-dlm", 4, 8, targets="qkv,q_proj")
    message = str(error.value)
    assert "\n" not in message and "--lora-targets" in message and "'q_proj'" in message
    assert "available: attn_out, down, gate_up, qkv" in message
    assert not lora.has_lora(backbone.model)  # nothing injected


def test_chosen_targets_and_bad_settings():
    backbone, _ = tiny(targets=["down", " qkv "])
    assert {name for name, _ in lora.lora_layers(backbone.model)} == {f"layers.{i}.{t}" for i in range(2)
                                                                     for t in ("down", "qkv")}
    for flags, flag in (((0, 8.0, 0.0), "--lora-rank"), ((4, 0.0, 0.0), "--lora-alpha"),
                        ((4, 8.0, 1.0), "--lora-dropout"), ((33, 8.0, 0.0), "--lora-rank 33: above 32,")):
        with pytest.raises(ValueError, match=flag):  # width 32: no adapted layer's update has a rank over 32
            lora.apply_lora(backbones.new_tiny_backbone(**SMALL).model, "tiny-dlm", *flags)
    lora.apply_lora(backbones.new_tiny_backbone(**SMALL).model, "tiny-dlm", 32, 8.0)  # full rank: allowed


def test_built_on_meta_like_ranks_other_than_0():
    """train.py's ranks > 0 build on the meta device: the same tensors, names and shapes."""
    backbone, _ = tiny()
    lora.EMAAdapterTarget(backbone.model)
    with torch.device("meta"):
        on_meta = backbones.new_tiny_backbone(**SMALL).model
        lora.apply_lora(on_meta, "tiny-dlm", 4, 8.0)
        lora.EMAAdapterTarget(on_meta)
    spec = lambda m: {k: (tuple(v.shape), v.dtype) for k, v in m.state_dict().items()}
    assert spec(on_meta) == spec(backbone.model)
    assert trained_names(on_meta) == {n for n, p in on_meta.named_parameters() if p.requires_grad}

def test_objective_arguments_follow_the_method():
    """An EMA adapter only for dllm-jepa's EMA target; the adapter's weight change only for
    l2-anchor; DLLMJEPA refuses either where its method has no use for it."""
    backbone, _ = tiny()
    kinds = {}
    for config in (JEPAConfig(), JEPAConfig(target="online"), JEPAConfig(method="l2-anchor"),
                   JEPAConfig(method="two-pass"), JEPAConfig(method="diffusion")):
        kwargs = lora.dllm_jepa_kwargs(backbone.model, config)
        kinds[(config.method, config.target)] = (type(kwargs["target_encoder"]).__name__, kwargs["anchor_fn"])
    assert kinds == {("dllm-jepa", None): ("EMAAdapterTarget", None), ("dllm-jepa", "online"): ("NoneType", None),
                     ("l2-anchor", None): ("NoneType", lora.lora_delta_sq), ("two-pass", None): ("NoneType", None),
                     ("diffusion", None): ("NoneType", None)}
    with pytest.raises(ValueError, match="no EMA target"):
        DLLMJEPA(backbone.model, JEPAConfig(target="online"), target_encoder=lora.EMAAdapterTarget(backbone.model))
    with pytest.raises(ValueError, match="no anchor"):
        DLLMJEPA(backbone.model, JEPAConfig(), anchor_fn=lora.lora_delta_sq)

# -----------------------------------------------------------------------------
# Training: gradients, EMA adapter, target pass


def test_only_the_trained_adapter_gets_gradients():
    backbone, _ = tiny(dropout=0.1, b_scale=0.02)
    config = JEPAConfig(method="dllm-jepa")
    model = DLLMJEPA(backbone.model, config, truncated_forward=truncated_forward(backbone.family.blocks),
                     **lora.dllm_jepa_kwargs(backbone.model, config))
    model(*batch()).loss.backward()
    with_grad = {n for n, p in model.backbone.named_parameters() if p.grad is not None}
    assert with_grad == trained_names(model.backbone) and len(with_grad) == 2 * 4 * 2
    assert all(p.grad.abs().sum() > 0 for n, p in model.backbone.named_parameters() if n in with_grad)
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for n, p in model.named_parameters()
                         if n.startswith("predictor.") or n[len("backbone."):] in with_grad}


def run_steps(model, steps, lr=0.05, total=None):
    """`steps` optimizer steps as train.py takes them (SGD here: exact and cheap)."""
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=lr)
    for step in range(steps):
        model.train()
        model(*batch(seed=step), generator=torch.Generator().manual_seed(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        yield step
        model.update_target(step + 1, total or steps)


def test_ema_adapter_follows_the_ema_rule_and_the_base_never_changes():
    backbone, base = tiny(b_scale=0.02)
    config = JEPAConfig(method="dllm-jepa", ema_momentum=(0.5, 0.9))
    model = DLLMJEPA(backbone.model, config, truncated_forward=truncated_forward(backbone.family.blocks),
                     **lora.dllm_jepa_kwargs(backbone.model, config))
    ema = lambda: [p.detach().clone() for p in lora.adapter_parameters(backbone.model, lora.EMA)]
    online = lambda: [p.detach().clone() for p in lora.adapter_parameters(backbone.model, lora.TRAINED)]
    assert all(torch.equal(e, o) for e, o in zip(ema(), online()))  # equal at start
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    expected = ema()
    steps = 4
    for step in run_steps(model, steps):
        m = ema_momentum(step + 1, steps, 0.5, 0.9)
        expected = [m * e + (1 - m) * o for e, o in zip(expected, online())]  # after this step's update
    for got, want in zip(ema(), expected):
        assert torch.allclose(got, want, atol=1e-7, rtol=0)
    assert not all(torch.equal(e, o) for e, o in zip(ema(), online()))  # it lags the trained adapter
    base_after = {k.replace("base_layer.", ""): v for k, v in backbone.model.state_dict().items() if ".lora_" not in k}
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_after[k], v) for k, v in base_before.items())  # only adapters moved
    assert model.target_encoder is not None and not list(model.target_encoder.parameters())  # no copy


def ema_reference(backbone_model):
    """The EMA target by hand: a copy whose trained adapter holds the EMA adapter's values."""
    reference = copy.deepcopy(backbone_model)
    with torch.no_grad():
        for e, o in zip(lora.adapter_parameters(reference, lora.EMA), lora.adapter_parameters(reference, lora.TRAINED)):
            o.copy_(e)
    return reference.eval()


@pytest.mark.parametrize("embed_layer", [-1, 1])
def test_the_target_pass_runs_the_ema_adapter(embed_layer):
    """Target hidden states equal the online model's at start, then differ, and always equal
    a hand-built model with the EMA values, truncated (embed_layer=1, a pre-hook on block 1)
    or not; the online model's active adapter and train mode come back after each pass."""
    backbone, _ = tiny(dropout=0.2, b_scale=0.02)
    config = JEPAConfig(method="dllm-jepa", ema_momentum=(0.5, 0.5), embed_layer=embed_layer)
    model = DLLMJEPA(backbone.model, config, truncated_forward=truncated_forward(backbone.family.blocks),
                     **lora.dllm_jepa_kwargs(backbone.model, config))
    ids, _ = batch(seed=9)

    def target():
        model.train()
        with torch.no_grad():
            _, hidden = model.encode(model.target_encoder, ids, logits=False)
        assert all(layer.active_adapters == [lora.TRAINED] for _, layer in lora.lora_layers(backbone.model))
        assert backbone.model.training and backbone.model.layers[0].qkv.lora_dropout[lora.TRAINED].training
        return hidden

    def online():
        backbone.model.eval()
        with torch.no_grad():
            return backbone.model(input_ids=ids, output_hidden_states=True).hidden_states[embed_layer]

    assert stop_module(model.target_encoder, embed_layer, backbone.family.blocks) is (
        backbone.model.layers[1] if embed_layer == 1 else backbone.model.lm_head)
    assert torch.allclose(target(), online(), atol=1e-6)
    for _ in run_steps(model, 3, lr=0.5):
        pass
    reference = ema_reference(backbone.model)
    with torch.no_grad():
        by_hand = reference(input_ids=ids, output_hidden_states=True).hidden_states[embed_layer]
    assert torch.allclose(target(), by_hand, atol=1e-6)
    assert (target() - online()).abs().max() > 1e-3


def test_the_target_pass_runs_in_eval_mode():
    """As a frozen copy does: dropout in the backbone (added by a hook here: LLaDA, Dream and the
    tiny model have none) is off in the target pass, and on again in the online model's."""
    backbone, _ = tiny(b_scale=0.02)
    config = JEPAConfig(method="dllm-jepa")
    model = DLLMJEPA(backbone.model, config, truncated_forward=truncated_forward(backbone.family.blocks),
                     **lora.dllm_jepa_kwargs(backbone.model, config))
    backbone.model.layers[0].register_forward_hook(lambda m, args, out: F.dropout(out, 0.5, m.training))
    ids, _ = batch()
    model.train()
    with torch.no_grad():
        first, second = (model.encode(model.target_encoder, ids, logits=False)[1] for _ in range(2))
        online = [backbone.model(input_ids=ids).logits for _ in range(2)]
    assert torch.equal(first, second) and not torch.equal(*online)


def test_lora_anchor_is_the_exact_weight_change():
    """mu * sum ||s B A||_F^2 (B A formed explicitly here), its gradient by autograd of that
    formula, and the same as the L2 distance of the merged weights to the base: no copy kept."""
    backbone, base = tiny(b_scale=0.05, alpha=6.0)
    config = JEPAConfig(method="l2-anchor", anchor_mu=0.3)
    model = DLLMJEPA(backbone.model, config, truncated_forward=truncated_forward(backbone.family.blocks),
                     **lora.dllm_jepa_kwargs(backbone.model, config))
    assert model.anchor is None and model.target_encoder is None
    out = model(*batch())
    params = lora.adapter_parameters(backbone.model)
    grads = torch.autograd.grad(out.anchor, params)
    layers = [layer for _, layer in lora.lora_layers(backbone.model)]
    pairs = [(layer.lora_A["default"].weight.detach().clone().requires_grad_(),
              layer.lora_B["default"].weight.detach().clone().requires_grad_()) for layer in layers]
    by_hand = 0.3 * sum(((6.0 / 4) * b @ a).pow(2).sum() for a, b in pairs)
    hand_grads = torch.autograd.grad(by_hand, [t for a, b in pairs for t in (a, b)])
    assert by_hand > 0 and torch.allclose(out.anchor, by_hand, rtol=1e-5)
    for got, want in zip(grads, hand_grads):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-8)
    merged = base.__class__(base.config)
    merged.load_state_dict(lora.merged_state(backbone.model))
    assert torch.allclose(0.3 * l2_distance(merged, base), by_hand, rtol=1e-4)

# -----------------------------------------------------------------------------
# Export


def test_merged_export_equals_base_plus_adapter(tmp_path):
    from transformers import AutoModel
    backbone, base = tiny(b_scale=0.05)
    lora.EMAAdapterTarget(backbone.model)  # an EMA adapter in the layers too: never exported
    ids, _ = batch(seed=3)
    want = logits(backbone.model, ids)
    assert (want - logits(base, ids)).abs().max() > 1e-3  # the adapter matters

    plain = base.__class__(base.config)
    plain.load_state_dict(lora.merged_state(backbone.model))  # strict: exactly the base's names
    assert torch.allclose(logits(plain, ids), want, atol=1e-5)

    backbone.model.save_pretrained(tmp_path / "merged", state_dict=lora.merged_state(backbone.model))
    loaded = AutoModel.from_pretrained(tmp_path / "merged")
    assert not lora.has_lora(loaded) and torch.allclose(logits(loaded, ids), want, atol=1e-5)

    lora.save_adapter(backbone.model, tmp_path / "adapter")  # the adapter alone, peft's format
    from peft import PeftModel
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    with_adapter = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    assert torch.allclose(logits(with_adapter, ids), want, atol=1e-5)

    unloaded = lora.merge_and_unload(copy.deepcopy(backbone.model))
    assert not lora.has_lora(unloaded) and torch.allclose(logits(unloaded, ids), want, atol=1e-5)
    assert set(unloaded.state_dict()) == set(base.state_dict())

# -----------------------------------------------------------------------------
# Sharding (FSDP2 on a one-process gloo group; then two processes)


@pytest.mark.parametrize("method", ["dllm-jepa", "l2-anchor"])
def test_sharded_lora_matches_unsharded(method, tmp_path):
    """fully_shard per block then root (sharding.shard_model), LoRA layers and the EMA
    target's adapter inside the blocks: losses, trained and EMA adapters equal the unsharded
    twin's after 3 steps, the base is unchanged, and the merged export equals the model."""
    from dlm import checkpoints, sharding
    from transformers import AutoModel
    env = sharding.init_distributed("cpu")
    config = JEPAConfig(method=method, embed_layer=1, anchor_mu=1.0, ema_momentum=(0.5, 0.5))
    models, losses = [], []
    for shard in (False, True):
        backbone, _ = tiny(b_scale=0.02)
        model = DLLMJEPA(backbone.model, config, truncated_forward=truncated_forward(backbone.family.blocks),
                         **lora.dllm_jepa_kwargs(backbone.model, config))
        if shard:
            sharding.shard_model(model, backbone.family.blocks)
            assert isinstance(model.backbone.layers[0].qkv.lora_A["default"].weight, torch.distributed.tensor.DTensor)
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
        row = []
        for step in range(3):
            model.train()
            out = model(*batch(seed=step), generator=torch.Generator().manual_seed(step))
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            model.update_target(step + 1, 3)
            row.append((out.loss.item(), out.anchor.item()))
            if shard and method == "dllm-jepa":  # a truncated target pass leaves the backbone's root resharded, idle
                with torch.no_grad():
                    model.encode(model.target_encoder, batch()[0], logits=False)
                state = model.backbone._get_fsdp_state()
                assert not state._fsdp_param_group.is_unsharded and state._training_state.name == "IDLE"
        models.append((model, backbone))
        losses.append(row)
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-7)  # (step, loss/anchor)
    if method == "l2-anchor":
        assert losses[1][-1][1] > 0
    (plain, _), (sharded, backbone) = models
    state = {k: lora.full(v) for k, v in sharded.state_dict().items()}
    for key, value in plain.state_dict().items():
        # 1e-5, not 1e-6: AdamW divides each gradient by its running RMS, so where a gradient is
        # near zero (the predictor's second block, behind its zero-initialised output layer) the
        # sharded sum's rounding moves a weight by ~3e-6; a sharding error moves it by ~lr = 1e-2
        assert torch.allclose(state[key], value, atol=1e-5), (key, (state[key] - value).abs().max())
    checkpoints.export_pretrained(sharded.backbone, backbone.tokenizer, tmp_path / "final", env, {},
                                  transform=lambda s: lora.merged_state(sharded.backbone, s))
    ids, _ = batch(seed=7)
    loaded = AutoModel.from_pretrained(tmp_path / "final")
    assert torch.allclose(logits(loaded, ids), logits(plain.backbone, ids), atol=1e-5)


TWO_PROCESSES = r"""
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from dlm import lora, sharding
from dlm.sharding import truncated_forward
from tests.test_lora import tiny, batch
from dllm_jepa import DLLMJEPA, JEPAConfig
env = sharding.init_distributed("cpu")
result = {}
for method in ("l2-anchor", "dllm-jepa"):
    backbone, _ = tiny(b_scale=0.02)
    config = JEPAConfig(method=method, embed_layer=1, anchor_mu=1.0, ema_momentum=(0.5, 0.5))
    model = DLLMJEPA(backbone.model, config, truncated_forward=truncated_forward(backbone.family.blocks),
                     **lora.dllm_jepa_kwargs(backbone.model, config))
    sharding.shard_model(model, backbone.family.blocks)
    rows = []
    for step in range(2):
        out = model(*batch(seed=step), generator=torch.Generator().manual_seed(step))  # the same rows on both ranks
        out.loss.backward()
        grads = {n: lora.full(p.grad).tolist() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            for p in model.trainable_parameters():
                p -= 0.05 * p.grad
                p.grad = None
        model.update_target(step + 1, 2)
        anchor = sharding.all_reduce_sum(out.anchor.reshape(1))  # the trainer sums each rank's share
        rows.append(dict(diffusion=out.diffusion.item(), jepa=out.jepa.item(), anchor=anchor.item(), grads=grads))
    result[method] = dict(rows=rows, state={k: lora.full(v).tolist() for k, v in model.state_dict().items()})
if env.is_main:
    json.dump(result, open(sys.argv[2], "w"))
dist.destroy_process_group()
"""


def test_two_processes_match_one(tmp_path):
    """Two FSDP2 ranks fed the same rows: the anchor (summed over ranks), its gradients, the EMA
    target's losses and every adapter after two steps equal one unsharded process."""
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESSES)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(ROOT), str(tmp_path / "out.json")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    two = json.loads((tmp_path / "out.json").read_text())
    for method, got in two.items():
        backbone, _ = tiny(b_scale=0.02)
        config = JEPAConfig(method=method, embed_layer=1, anchor_mu=1.0, ema_momentum=(0.5, 0.5))
        model = DLLMJEPA(backbone.model, config, truncated_forward=truncated_forward(backbone.family.blocks),
                         **lora.dllm_jepa_kwargs(backbone.model, config))
        for step, row in enumerate(got["rows"]):
            out = model(*batch(seed=step), generator=torch.Generator().manual_seed(step))
            out.loss.backward()
            for key in ("diffusion", "jepa"):  # each rank's loss holds its share of the anchor: compare parts
                assert row[key] == pytest.approx(getattr(out, key).item(), rel=1e-5), (method, step, key)
            assert row["anchor"] == pytest.approx(out.anchor.item(), rel=1e-5, abs=1e-9), (method, step)
            for name, p in model.named_parameters():
                if p.grad is not None:
                    assert torch.allclose(torch.tensor(row["grads"][name]), p.grad, atol=1e-6), (method, step, name)
            with torch.no_grad():
                for p in model.trainable_parameters():
                    p -= 0.05 * p.grad
                    p.grad = None
            model.update_target(step + 1, 2)
        for key, value in model.state_dict().items():
            assert torch.allclose(torch.tensor(got["state"][key]), value, atol=1e-6), (method, key)


def launch_train(out, nproc, *flags):
    """train.py in `nproc` gloo processes (torchrun) or one plain process; its log rows."""
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
           if nproc > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    small = ["--tiny-width", "32", "--tiny-layers", "2", "--seq-len", "32", "--builtin-size", "400",
             "--eval-every", "100", "--no-progress", "--final-eval", "0"]
    result = subprocess.run(cmd + [str(ROOT / "train.py"), *small, "--out", str(out), *flags],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_train_py_two_processes_match_one_under_lora(tmp_path):
    """train.py with LoRA, bf16 compute (the base stored in bf16, adapters and predictor in fp32: one
    FSDP group holds both): 2 gloo processes (rank 1 builds on meta and receives rank 0's base and
    adapters) against 1 process with 2 accumulation micro-batches, the same masks: losses per step,
    every tensor of the last checkpoint (base, adapters, EMA adapter, predictor) and the merged
    export agree up to the order of floating-point reductions."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModel
    flags = ("--lora-rank", "4", "--lr", "1e-2", "--steps", "4", "--save-every", "4", "--embed-layer", "1",
             "--activation-checkpointing", "--ema-momentum", "0.5", "0.9", "--dtype", "bfloat16")
    two = launch_train(tmp_path / "two", 2, "--batch-size", "4", *flags)
    one = launch_train(tmp_path / "one", 1, "--batch-size", "4", "--grad-accum", "2", *flags)
    steps = lambda log: [row for row in log if "loss" in row]
    assert len(steps(two)) == 4
    for a, b in zip(steps(two), steps(one)):
        for key in ("loss", "diffusion", "jepa", "grad_norm"):
            assert abs(a[key] - b[key]) < 1e-5, (a["step"], key, a[key], b[key])
    states = []
    for run in ("two", "one"):
        dcp_to_torch_save(str(tmp_path / run / "checkpoints" / "step_00000004"), str(tmp_path / f"{run}.pt"))
        states.append(torch.load(tmp_path / f"{run}.pt", weights_only=False)["model"])
    assert any(".lora_A.ema." in key for key in states[0])
    assert {v.dtype for k, v in states[0].items() if ".lora_" in k} == {torch.float32}
    assert states[0]["backbone.layers.0.qkv.base_layer.weight"].dtype == torch.bfloat16
    for key, value in states[0].items():
        assert torch.allclose(value, states[1][key], atol=1e-6, rtol=0), key
    a, b = (AutoModel.from_pretrained(tmp_path / run / "final").state_dict() for run in ("two", "one"))
    for key, value in a.items():
        assert torch.allclose(value, b[key], atol=1e-6, rtol=0), key


def test_bench_lora_counts_what_lora_trains_and_copies():
    """The benchmark's counts against hand computations on a width-32, 1-block tiny model:
    LoRA trains r x (in + out) per adapted linear layer, and its anchor needs no frozen copy."""
    from scripts.bench_lora import report
    torch.manual_seed(0)
    rows = report(width=32, layers=1, rank=2, alpha=4.0, batch=2, seq_len=16, steps=1, threads=1)
    by = {(r["method"], r["lora"]): r for r in rows}
    model = backbones.new_tiny_backbone(**tiny_model.shape(32, 1, 16)).model
    linears = [m for name, m in model.named_modules() if isinstance(m, nn.Linear)
               and name.split(".")[-1] in lora.DEFAULT_TARGETS["tiny-dlm"]]
    assert by[("l2-anchor", True)]["backbone_trainable"] == sum(2 * (m.in_features + m.out_features) for m in linears)
    assert by[("l2-anchor", False)]["backbone_trainable"] == sum(p.numel() for p in model.parameters())
    assert by[("l2-anchor", True)]["copy_bytes"] == 0
    assert by[("l2-anchor", False)]["copy_bytes"] == 4 * sum(p.numel() for p in model.parameters())
    assert by[("dllm-jepa", True)]["copy_bytes"] == 4 * by[("l2-anchor", True)]["backbone_trainable"]
