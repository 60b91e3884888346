"""The truncated target pass (dlm/sharding.py: stop_module, forward_until, truncated_forward,
which DLLMJEPA receives): the same embedding, fewer FLOPs, the same gradients, FSDP2-safe.

Run: python -m pytest tests/test_truncated_forward.py -q
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dllm_jepa import DLLMJEPA, JEPAConfig
from dlm import sharding
from dlm.sharding import stop_module, truncated_forward

blocks_of = lambda model: model.layers


def flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def make_batch(B=4, T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (B, T), generator=g)
    return ids, torch.full((B,), T // 4), torch.full((B,), T // 2)


@pytest.mark.parametrize("layer", [0, 1, 2, 3, 4, -1, -2, -5])
@pytest.mark.parametrize("with_blocks", [True, False])
def test_truncated_pass_returns_the_full_pass_state(make_model, layer, with_blocks):
    model = make_model(0, num_hidden_layers=4)
    ids, _, _ = make_batch()
    full = model(input_ids=ids, output_hidden_states=True).hidden_states[layer]
    jepa = DLLMJEPA(model, JEPAConfig(embed_layer=layer, target="online"),
                    truncated_forward=truncated_forward(blocks_of if with_blocks else None))
    logits, hidden = jepa.encode(model, ids, logits=False)
    assert torch.equal(hidden, full)  # bit for bit
    assert (logits is None) == (with_blocks or layer == -1)  # without blocks: only the head is skipped


def test_truncated_pass_flops(make_model):
    """Stopping at block l costs l/L of the blocks' FLOPs; the last state skips only the head."""
    L = 4
    model = make_model(0, num_hidden_layers=L)
    ids, _, _ = make_batch()
    with torch.no_grad():
        F_ = flops(lambda: model(input_ids=ids, output_hidden_states=True))
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        h = flops(lambda: model.lm_head(hidden))
        for layer in range(L + 1):
            for truncate in (True, False):
                jepa = DLLMJEPA(model, JEPAConfig(embed_layer=layer, target="online", truncate_target=truncate),
                                truncated_forward=truncated_forward(blocks_of))
                cost = flops(lambda: jepa.encode(model, ids, logits=False))
                assert cost == ((F_ - h) * layer // L if truncate else F_), (layer, truncate)


@pytest.mark.parametrize("method,target", [("dllm-jepa", "ema"), ("dllm-jepa", "online"), ("two-pass", None)])
@pytest.mark.parametrize("layer", [-1, 2])
def test_truncation_changes_no_loss_and_no_gradient(make_model, method, target, layer):
    """Two steps with and without truncation: the same losses and gradients, bit for bit
    (two-pass included: its gradient flows through the truncated target pass)."""
    ids, prompt, answer = make_batch()
    results = []
    for truncate in (True, False):
        torch.manual_seed(1)
        model = DLLMJEPA(make_model(0, num_hidden_layers=4),
                         JEPAConfig(method=method, target=target, embed_layer=layer, truncate_target=truncate),
                         truncated_forward=truncated_forward(blocks_of))
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
        losses, grads = [], []
        for step in range(2):
            out = model(ids, prompt, answer, generator=torch.Generator().manual_seed(step))
            out.loss.backward()
            grads.append([p.grad.clone() for p in model.trainable_parameters()])
            losses.append((out.loss.item(), out.jepa.item()))
            opt.step()
            opt.zero_grad()
            model.update_target(step, 10)
        results.append((losses, grads))
    (l1, g1), (l2, g2) = results
    assert l1 == l2
    assert all(torch.equal(a, b) for s1, s2 in zip(g1, g2) for a, b in zip(s1, s2))


def test_truncation_under_fsdp2_reshards_the_target(make_model):
    """sharding.shard_model (blocks, then each root with reshard_after_forward=True): after
    a truncated target pass the target's root is resharded and idle, and the losses match
    the unsharded model's."""
    sharding.init_distributed("cpu")
    ids, prompt, answer = make_batch()
    losses = []
    for shard in (False, True):
        torch.manual_seed(1)
        model = DLLMJEPA(make_model(0, num_hidden_layers=4), JEPAConfig(embed_layer=2),
                         truncated_forward=truncated_forward(blocks_of))
        if shard:
            sharding.shard_model(model, blocks_of)
        out = model(ids, prompt, answer, generator=torch.Generator().manual_seed(0))
        losses.append(out.loss.item())
        if shard:
            state = model.target_encoder._get_fsdp_state()
            assert not state._fsdp_param_group.is_unsharded
            assert state._training_state.name == "IDLE"
            with torch.no_grad():  # no backward to clean up after an evaluation pass
                model(ids, prompt, answer, generator=torch.Generator().manual_seed(0))
            assert not state._fsdp_param_group.is_unsharded
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_stop_module_without_blocks(make_model):
    """Without blocks_of only the LM head can be skipped: other layers run the full pass."""
    model = make_model(0)
    assert stop_module(model, -1) is model.lm_head
    assert stop_module(model, 1) is None
    assert stop_module(model, 1, blocks_of) is model.layers[1]


def test_without_a_truncated_forward_the_target_pass_runs_whole(make_model):
    """DLLMJEPA given no truncated_forward runs the whole target pass (its LM head too): the
    same embedding as a truncated pass, at the cost of a full forward."""
    model = make_model(0, num_hidden_layers=4)
    ids, _, _ = make_batch()
    whole = DLLMJEPA(model, JEPAConfig(embed_layer=2, target="online"))
    cut = DLLMJEPA(model, JEPAConfig(embed_layer=2, target="online"), truncated_forward=truncated_forward(blocks_of))
    with torch.no_grad():
        logits, hidden = whole.encode(model, ids, logits=False)
        no_logits, same = cut.encode(model, ids, logits=False)
        assert logits is not None and no_logits is None and torch.equal(hidden, same)
        cost = {jepa: flops(lambda: jepa.encode(model, ids, logits=False)) for jepa in (whole, cut)}
    assert cost[cut] < cost[whole] == flops(lambda: model(input_ids=ids, output_hidden_states=True))


def test_a_head_tied_to_the_embeddings_is_never_a_stop(make_model):
    """LLaDA with weight_tying returns its input embedding as the output embedding: a hook
    there would fire first, on the ids; the target pass must run whole and read the state."""
    model = make_model(0)
    model.get_output_embeddings = model.get_input_embeddings
    jepa = DLLMJEPA(model, JEPAConfig(), truncated_forward=truncated_forward(blocks_of))
    assert stop_module(model, -1, blocks_of) is None
    ids, prompt, answer = make_batch()
    assert torch.isfinite(jepa(ids, prompt, answer, generator=torch.Generator().manual_seed(0)).jepa)


def test_target_autocast(make_model):
    """bf16 autocast for the no-grad target pass: close to the fp32 loss, not identical;
    refused for methods whose target pass carries gradient or that have none."""
    ids, prompt, answer = make_batch()
    values = []
    for autocast in (False, True):
        torch.manual_seed(1)
        model = DLLMJEPA(make_model(0), JEPAConfig(target_autocast=autocast),
                         truncated_forward=truncated_forward(blocks_of))
        out = model(ids, prompt, answer, generator=torch.Generator().manual_seed(0))
        values.append(out.jepa.item())
    assert values[0] == pytest.approx(values[1], abs=1e-2) and values[0] != values[1]  # bf16 really ran
    for method in ("two-pass", "diffusion"):
        with pytest.raises(ValueError, match="target_autocast"):
            JEPAConfig(method=method, target_autocast=True)
