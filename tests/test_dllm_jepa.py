"""Tests of the DLLM-JEPA objective (dllm_jepa.py) on small tiny models, CPU only.

Run: python -m pytest tests/test_dllm_jepa.py -q      (add -s to see the measured FLOP ratios)

What is checked, in the order of dllm_jepa.py: the LLaDA masking process (frequency = p,
prompt never masked or scored), the masked-diffusion loss against a hand computation, the
two-rate views (nesting, time ranges, presets), where gradients flow in each method, the
EMA update, the FLOP ratios behind the paper's 33% claim, the L2 anchor, configuration
errors, the JEPA distance, and the shifted-logits seam (Dream).
"""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode
from transformers.modeling_outputs import MaskedLMOutput

import dllm_jepa as dj
from dllm_jepa import DLLMJEPA, JEPAConfig
from dlm.sharding import truncated_forward

MASK, EOS = 257, 256  # the tiny tokenizer's ids (checked in test_tiny_model.py)


# -----------------------------------------------------------------------------
# helpers


def make_batch(B, T, prompt_lengths, answer_lengths, seed=0):
    """Byte tokens (never a special id) for prompt and answer, EOS padding after the answer."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (B, T), generator=g)
    prompt_lengths = torch.as_tensor(prompt_lengths).expand(B).clone()
    answer_lengths = torch.as_tensor(answer_lengths).expand(B).clone()
    pos = torch.arange(T)[None]
    ids[pos >= (prompt_lengths + answer_lengths)[:, None]] = EOS
    return ids, prompt_lengths, answer_lengths


def record_calls(module):
    """Record each forward call of `module`: its input ids, whether autograd was on, its output."""
    calls = []

    def pre(mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append(dict(ids=ids.clone(), grad_enabled=torch.is_grad_enabled()))

    def post(mod, args, kwargs, out):
        calls[-1]["out"] = out

    module.register_forward_pre_hook(pre, with_kwargs=True)
    module.register_forward_hook(post, with_kwargs=True)
    return calls


def build(make_model, seed=0, mask_token_id=None, shift_logits=False, backbone=None, **cfg):
    backbone = backbone if backbone is not None else make_model(seed)
    torch.manual_seed(1000 + seed)  # the predictor's init
    return DLLMJEPA(backbone, JEPAConfig(**cfg), mask_token_id=mask_token_id,
                    shift_logits=shift_logits, truncated_forward=truncated_forward())  # target passes skip the head


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


class LogitsWrapper(nn.Module):
    """A backbone seam test double: delegates to a model and edits its logits."""

    def __init__(self, model, edit):
        super().__init__()
        self.model, self.config, self.edit = model, model.config, edit

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, input_ids, output_hidden_states=False, **kwargs):
        out = self.model(input_ids=input_ids, output_hidden_states=output_hidden_states, **kwargs)
        return MaskedLMOutput(logits=self.edit(out.logits), hidden_states=out.hidden_states)


def binomial_tolerance(n, p, sigmas=5.0):
    return sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


# -----------------------------------------------------------------------------
# 1. Forward masking process


def test_mask_probability_is_llada_schedule():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    p = dj.mask_probability(t, 1e-3)
    assert torch.allclose(p, torch.tensor([1e-3, 0.999 * 0.25 + 1e-3, 0.999 * 0.5 + 1e-3, 1.0]))


@pytest.mark.parametrize("nested", [True, False])
def test_masking_frequency_matches_p_per_row(nested):
    """Each row is masked at its own p = (1 - eps) t + eps, to within 5 binomial std."""
    B, T, eps = 6, 8000, 1e-3
    t_context = torch.tensor([0.0, 0.05, 0.2, 0.5, 0.8, 1.0])
    t_target = torch.tensor([0.3, 0.5, 0.7, 0.9, 1.0, 1.0])
    ids = torch.randint(0, 256, (B, T), generator=gen(1))
    scored = torch.ones(B, T, dtype=torch.bool)
    context, target = dj.make_views(ids, scored, t_context, t_target, MASK, eps, nested, gen(2))
    for view, t in ((context, t_context), (target, t_target)):
        p = (1 - eps) * t + eps
        assert torch.allclose(view.p, p) and torch.equal(view.t, t)
        counts = view.masked.sum(1).double()
        for b in range(B):
            assert abs(counts[b] - T * p[b]) <= binomial_tolerance(T, p[b].item()), (b, counts[b], T * p[b])
        # masked positions carry the mask id, the rest are untouched
        assert torch.equal(view.ids == MASK, view.masked)
        assert torch.equal(view.ids[~view.masked], ids[~view.masked])


def test_only_scored_positions_are_masked():
    """At t = 1 every scored position is masked and nothing else: masked == scored exactly."""
    B, T = 16, 24
    prompt = torch.randint(0, 12, (B,), generator=gen(3))
    answer = torch.randint(0, 12, (B,), generator=gen(4))
    ids, prompt, answer = make_batch(B, T, prompt, answer)
    for pad_is_answer in (True, False):
        ans, scored = dj.answer_regions(prompt, answer, T, pad_is_answer)
        pos = torch.arange(T)[None]
        assert not (scored & (pos < prompt[:, None])).any()  # the prompt is never scored
        if not pad_is_answer:
            assert not (scored & (ids == EOS)).any()  # padding neither scored nor masked
        else:
            assert torch.equal(scored, pos >= prompt[:, None])
        ones = torch.ones(B)
        for nested in (True, False):
            c, tg = dj.make_views(ids, scored, ones, ones, MASK, 1e-3, nested, gen(5))
            assert torch.equal(c.masked, scored) and torch.equal(tg.masked, scored)
            # and at a moderate rate, never outside `scored`
            c, tg = dj.make_views(ids, scored, 0.5 * ones, 0.8 * ones, MASK, 1e-3, nested, gen(6))
            assert not (c.masked & ~scored).any() and not (tg.masked & ~scored).any()


def test_forward_masking_frequency_and_prompt_untouched(make_model):
    """Through DLLMJEPA.forward (narrow preset: t = 0.2 and 0.7), the backbone sees each view
    masked at its p on the scored region only; the prompt is never the mask id in either view."""
    B, T = 128, 40
    prompt = torch.randint(1, 16, (B,), generator=gen(7))
    ids, prompt, answer = make_batch(B, T, prompt, 10)
    model = build(make_model, views="narrow", method="dllm-jepa")
    ctx_calls, tgt_calls = record_calls(model.backbone), record_calls(model.target_encoder)
    with torch.no_grad():
        model(ids, prompt, answer, generator=gen(8))
    assert len(ctx_calls) == 1 and len(tgt_calls) == 1
    _, scored = dj.answer_regions(prompt, answer, T, True)
    pos = torch.arange(T)[None]
    n = scored.sum().item()
    for calls, t in ((ctx_calls, 0.2), (tgt_calls, 0.7)):
        seen = calls[0]["ids"]
        masked = seen == MASK
        assert not (masked & (pos < prompt[:, None])).any(), "a prompt token was masked"
        assert not (masked & ~scored).any()
        assert torch.equal(seen[~masked], ids[~masked])
        p = 0.999 * t + 1e-3
        assert abs(masked.sum().item() - n * p) <= binomial_tolerance(n, p), (t, masked.sum().item() / n)


def test_prompt_and_unmasked_logits_do_not_affect_diffusion_loss():
    torch.manual_seed(0)
    B, T, V = 3, 10, 7
    logits = torch.randn(B, T, V)
    ids = torch.randint(0, V, (B, T))
    prompt = torch.tensor([2, 4, 1])
    _, scored = dj.answer_regions(prompt, torch.tensor([5, 3, 6]), T, True)
    masked = scored & (torch.rand(B, T) < 0.5)
    masked[:, -1] = True
    p = torch.tensor([0.5, 0.3, 0.9])
    base = dj.diffusion_loss(logits, ids, masked, p, scored)
    noisy = logits + 100 * torch.randn(B, T, V) * (~masked)[..., None]  # prompt is never masked
    assert torch.allclose(dj.diffusion_loss(noisy, ids, masked, p, scored), base)
    # the test can fail: the same noise on a masked position moves the loss
    moved = logits + 100 * torch.randn(B, T, V) * masked[..., None]
    assert not torch.allclose(dj.diffusion_loss(moved, ids, masked, p, scored), base)


def test_forward_ignores_prompt_logits(make_model):
    """A backbone whose prompt-position logits are garbage gives the same diffusion loss."""
    B, T, P = 4, 24, 6
    ids, prompt, answer = make_batch(B, T, P, 12)
    base_model = make_model()

    def garbage_prompt(logits):
        noise = torch.zeros_like(logits)
        noise[:, :P] = 50 * torch.randn(B, P, logits.shape[-1])
        return logits + noise

    ref = build(make_model, backbone=copy.deepcopy(base_model), method="diffusion")
    wrapped = build(make_model, backbone=LogitsWrapper(copy.deepcopy(base_model), garbage_prompt),
                    method="diffusion")
    a = ref(ids, prompt, answer, generator=gen(9)).diffusion
    b = wrapped(ids, prompt, answer, generator=gen(9)).diffusion
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_forward_diffusion_loss_is_the_context_views(make_model):
    """out.diffusion is the LLaDA SFT loss of the logits the backbone produced on the (lighter)
    context view, recomputed here from the recorded call."""
    B, T = 5, 20
    prompt = torch.tensor([1, 3, 5, 2, 8])
    answer = torch.tensor([4, 10, 2, 15, 6])
    ids, prompt, answer = make_batch(B, T, prompt, answer)
    model = build(make_model, context_t=(0.5, 0.5), target_t=(0.9, 0.9))
    calls = record_calls(model.backbone)
    out = model(ids, prompt, answer, generator=gen(10))
    (call,) = calls
    logits, seen = call["out"].logits.detach(), call["ids"]
    p = 0.999 * 0.5 + 1e-3
    expected = 0.0
    for b in range(B):
        row = 0.0
        for i in range(T):
            if seen[b, i] == MASK:
                row += -torch.log_softmax(logits[b, i], -1)[ids[b, i]].item() / p
        expected += row / (T - prompt[b].item())  # pad_is_answer: answer + padding
    expected /= B
    assert math.isclose(out.diffusion.item(), expected, rel_tol=1e-5)


def layer_norm_by_hand(x):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)


def distance_by_hand(u, v, distance):
    """One pair of vectors (C,): 1 - cos, or smooth-L1 (0.5 d^2 below 1, |d| - 0.5 above), mean over C."""
    u, v = u.double(), v.double()
    if distance == "cosine":
        return 1 - (u @ v).item() / (u.norm() * v.norm()).item()
    d = (u - v).abs()
    return torch.where(d < 1, 0.5 * d ** 2, d - 0.5).mean().item()


def diffusion_by_hand(logits, ids, masked, prompt, answer, p, pad_is_answer, loss_norm):
    """Sum of CE / p over masked positions; per row / its scored count, averaged over rows
    ("answer"), or the batch sum / all scored tokens ("token"). Scored: answer (+ padding)."""
    B, T = ids.shape
    sums, counts = [], []
    for b in range(B):
        sums.append(sum(-torch.log_softmax(logits[b, i].double(), -1)[ids[b, i]].item() / p
                        for i in range(T) if masked[b, i]))
        counts.append((T if pad_is_answer else prompt[b].item() + answer[b].item()) - prompt[b].item())
    if loss_norm == "answer":
        return sum(s / c for s, c in zip(sums, counts)) / B
    return sum(sums) / sum(counts)


def jepa_by_hand(h_context, h_target, answer, token_weights, predictor, pooling, distance):
    """pooling="answer": per row, the mean of the answer tokens' states, layer-normed; the
    predictor maps the context's onto the target's; mean distance over rows. pooling="token":
    the same per token, averaged over the tokens where token_weights is True."""
    if pooling == "token":
        pairs = [(h_context[b, i], h_target[b, i]) for b, i in token_weights.nonzero().tolist()]
    else:
        pairs = [(h_context[b, answer[b]].mean(0), h_target[b, answer[b]].mean(0))
                 for b in range(len(answer))]
    with torch.no_grad():
        return sum(distance_by_hand(predictor(layer_norm_by_hand(c)), layer_norm_by_hand(t), distance)
                   for c, t in pairs) / len(pairs)


@pytest.mark.parametrize("loss_weight", ["flat", "inverse-t"])
def test_answer_loss_is_in_the_diffusion_losss_weighting(make_model, loss_weight):
    """With no padding every scored token is an answer token, so the logged answer_loss is the
    diffusion loss itself, whichever the weighting (they sit side by side in the progress line)."""
    ids, prompt, answer = make_batch(4, 12, 3, 9)  # 3 + 9 = 12: no EOS padding
    out = build(make_model, loss_weight=loss_weight)(ids, prompt, answer, generator=gen(3))
    assert out.answer_loss.item() == pytest.approx(out.diffusion.item(), rel=1e-6)


@pytest.mark.parametrize("field,value", [
    ("pad_is_answer", True), ("pad_is_answer", False), ("nested", True), ("nested", False),
    ("loss_norm", "answer"), ("loss_norm", "token"), ("distance", "cosine"), ("distance", "smooth_l1"),
    ("pooling", "answer"), ("pooling", "token"),
])
def test_forward_follows_each_config_field(make_model, field, value):
    """DLLMJEPA.forward with one field set: the views fed to the backbone (context) and to the
    EMA target, and both losses, recomputed by hand from those recorded calls. Every row has
    a prompt, an answer and EOS padding; rates are fixed (t = 0.5 and 0.8)."""
    B, T = 6, 20
    ids, prompt, answer = make_batch(B, T, torch.tensor([1, 3, 5, 2, 8, 4]),
                                     torch.tensor([4, 10, 2, 15, 6, 3]), seed=1)
    model = build(make_model, context_t=(0.5, 0.5), target_t=(0.8, 0.8), truncate_target=False,
                  **{field: value})
    cfg = model.config
    ctx_calls, tgt_calls = record_calls(model.backbone), record_calls(model.target_encoder)
    with torch.no_grad():
        out = model(ids, prompt, answer, generator=gen(21))
    (ctx,), (tgt,) = ctx_calls, tgt_calls
    ctx_masked, tgt_masked = ctx["ids"] == MASK, tgt["ids"] == MASK
    pos = torch.arange(T)[None]
    in_prompt, padding = pos < prompt[:, None], pos >= (prompt + answer)[:, None]
    answer_mask = ~in_prompt & ~padding

    # the views: the prompt is never masked; padding is masked only when it counts as answer
    assert not ((ctx_masked | tgt_masked) & in_prompt).any()
    assert bool((ctx_masked & padding).any()) == cfg.pad_is_answer
    assert bool((tgt_masked & padding).any()) == cfg.pad_is_answer
    # nested: nothing hidden from the context is visible in the target; independent: some is
    assert bool((ctx_masked & ~tgt_masked).any()) == (not cfg.nested)

    # the diffusion loss of the context view, with this loss_norm and this scored region
    logits = ctx["out"].logits
    p = 0.999 * 0.5 + 1e-3
    diffusion = {norm: diffusion_by_hand(logits, ids, ctx_masked, prompt, answer, p, cfg.pad_is_answer, norm)
                 for norm in ("answer", "token")}
    assert math.isclose(out.diffusion.item(), diffusion[cfg.loss_norm], rel_tol=1e-5)
    assert not math.isclose(diffusion["answer"], diffusion["token"], rel_tol=1e-3)  # the test can fail

    # the JEPA loss with this pooling and distance; per token, weighted by the answer only
    h_ctx, h_tgt = ctx["out"].hidden_states[-1], tgt["out"].hidden_states[-1]
    jepa = lambda distance, weights=answer_mask: jepa_by_hand(h_ctx, h_tgt, answer_mask, weights,
                                                              model.predictor, cfg.pooling, distance)
    expected = jepa(cfg.distance)
    assert math.isclose(out.jepa.item(), expected, rel_tol=1e-4), (out.jepa.item(), expected)
    other = "smooth_l1" if cfg.distance == "cosine" else "cosine"
    assert not math.isclose(jepa(other), expected, rel_tol=1e-2)  # the test can fail
    if cfg.pooling == "token":  # the padding (scored, not answer) would move the mean
        assert not math.isclose(jepa(cfg.distance, answer_mask | padding), expected, rel_tol=1e-2)


# -----------------------------------------------------------------------------
# 2. The masked-diffusion loss against a hand computation


def ce(logits, y):
    """Cross-entropy by hand: -logit[y] + log sum exp."""
    return -logits[y] + math.log(sum(math.exp(v) for v in logits))


HAND_LOGITS = [
    [[2, 0, 0], [0, 1, 0], [0.5, 0.5, 0], [0, 0, 3], [1, 2, 3]],
    [[0, 0, 0], [1, 0, -1], [0, 2, 1], [3, 1, 0], [0, 0, 1]],
]
HAND_IDS = [[0, 1, 2, 0, 1], [2, 0, 1, 0, 2]]
# row 0: prompt 1, answer at 1-2, EOS padding at 3-4; row 1: prompt 2, answer at 2-3, padding at 4


@pytest.mark.parametrize("loss_norm", ["answer", "token"])
def test_diffusion_loss_hand_computation(loss_norm):
    L = HAND_LOGITS
    logits, ids = torch.tensor(L), torch.tensor(HAND_IDS)
    _, scored = dj.answer_regions(torch.tensor([1, 2]), torch.tensor([2, 2]), 5, pad_is_answer=True)
    assert scored.tolist() == [[False, True, True, True, True], [False, False, True, True, True]]
    masked = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.bool)
    p = torch.tensor([0.5, 0.25])
    ce0 = ce(L[0][1], 1) + ce(L[0][3], 0)   # row 0 masked at 1 and 3 (padding is scored)
    ce1 = ce(L[1][2], 1) + ce(L[1][4], 2)   # row 1 masked at 2 and 4
    if loss_norm == "answer":  # LLaDA SFT: / p, / answer length (4 and 3 scored), mean over rows
        expected = (ce0 / 0.5 / 4 + ce1 / 0.25 / 3) / 2
    else:                      # / all scored tokens of the batch
        expected = (ce0 / 0.5 + ce1 / 0.25) / 7
    got = dj.diffusion_loss(logits, ids, masked, p, scored, loss_norm)
    assert math.isclose(got.item(), expected, rel_tol=1e-6), (got.item(), expected)


@pytest.mark.parametrize("loss_norm", ["answer", "token"])
def test_pad_is_answer_changes_only_the_denominator(loss_norm):
    L = HAND_LOGITS
    logits, ids = torch.tensor(L), torch.tensor(HAND_IDS)
    masked = torch.tensor([[0, 1, 0, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)  # answer tokens only
    p = torch.tensor([0.5, 0.25])
    ce0, ce1 = ce(L[0][1], 1) / 0.5, ce(L[1][3], 0) / 0.25
    got = {}
    for pad_is_answer in (True, False):
        _, scored = dj.answer_regions(torch.tensor([1, 2]), torch.tensor([2, 2]), 5, pad_is_answer)
        got[pad_is_answer] = dj.diffusion_loss(logits, ids, masked, p, scored, loss_norm).item()
    if loss_norm == "answer":
        expected = {True: (ce0 / 4 + ce1 / 3) / 2, False: (ce0 / 2 + ce1 / 2) / 2}
    else:
        expected = {True: (ce0 + ce1) / 7, False: (ce0 + ce1) / 4}
    for k in (True, False):
        assert math.isclose(got[k], expected[k], rel_tol=1e-6), (k, got[k], expected[k])


def test_diffusion_loss_of_a_row_with_nothing_scored_is_zero_not_nan():
    logits = torch.randn(2, 4, 5)
    ids = torch.randint(0, 5, (2, 4))
    scored = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    masked = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    p = torch.tensor([0.5, 0.5])
    row0 = (F.cross_entropy(logits[0, [1, 3]], ids[0, [1, 3]], reduction="sum") / 0.5 / 3).item()
    got = dj.diffusion_loss(logits, ids, masked, p, scored, "answer")
    assert math.isclose(got.item(), row0 / 2, rel_tol=1e-6)


# -----------------------------------------------------------------------------
# 3. Two-rate views


def test_nested_views_target_contains_context():
    B, T = 256, 64
    ids = torch.randint(0, 256, (B, T), generator=gen(11))
    scored = torch.arange(T)[None].expand(B, T) >= 4
    tc, tt = dj.sample_times(B, (0.01, 1.0), (0.5, 1.0), "cpu", gen(12))
    c, t = dj.make_views(ids, scored, tc, tt, MASK, 1e-3, True, gen(13))
    assert not (c.masked & ~t.masked).any(), "a token hidden from the context is visible in the target"
    assert (t.masked & ~c.masked).any()  # and the target is strictly heavier somewhere


def test_unnested_views_are_independent_draws():
    B, T = 64, 200
    ids = torch.randint(0, 256, (B, T), generator=gen(14))
    scored = torch.ones(B, T, dtype=torch.bool)
    half = torch.full((B,), 0.5)
    c, t = dj.make_views(ids, scored, half, half, MASK, 0.0, False, gen(15))
    not_contained = (c.masked & ~t.masked).any(1)
    assert not_contained.any(), "views drawn independently should not be nested"
    # independence: P(both masked) = 0.25, P(exactly one) = 0.5
    n = B * T
    both = (c.masked & t.masked).sum().item()
    assert abs(both - 0.25 * n) <= binomial_tolerance(n, 0.25)
    # the nested version of the same call gives identical masks at equal t
    c2, t2 = dj.make_views(ids, scored, half, half, MASK, 0.0, True, gen(15))
    assert torch.equal(c2.masked, t2.masked)


t_pairs = st.tuples(st.floats(0.001, 1.0), st.floats(0.001, 1.0)).map(sorted).map(tuple)


@settings(max_examples=60)
@given(context_t=t_pairs, target_t=t_pairs, seed=st.integers(0, 2**16))
def test_sample_times_ranges(context_t, target_t, seed):
    if target_t[1] < context_t[1]:
        context_t, target_t = target_t, context_t
    JEPAConfig(context_t=context_t, target_t=target_t)  # a valid configuration
    tc, tt = dj.sample_times(512, context_t, target_t, "cpu", gen(seed))
    tol = 1e-6
    assert tc.shape == tt.shape == (512,)
    assert (tc >= context_t[0] - tol).all() and (tc <= context_t[1] + tol).all()
    assert (tt >= tc - tol).all(), "target lighter than context in some row"
    assert (tt >= target_t[0] - tol).all() and (tt <= target_t[1] + tol).all()


def test_sample_times_spread_over_the_range():
    tc, tt = dj.sample_times(20000, (0.01, 1.0), (0.5, 1.0), "cpu", gen(16))
    assert tc.min() < 0.02 and tc.max() > 0.99
    assert abs(tc.mean().item() - 0.505) < 0.01  # uniform on [0.01, 1]
    assert tt.min() >= 0.5 and tt.max() > 0.99


def test_presets():
    narrow, wide = JEPAConfig(views="narrow"), JEPAConfig(views="wide-range")
    assert narrow.context_range == (0.2, 0.2) and narrow.target_range == (0.7, 0.7)
    assert wide.context_range == dj.VIEW_PRESETS["wide-range"]["context_t"]
    assert JEPAConfig().views == "wide-range"
    tc, tt = dj.sample_times(100, narrow.context_range, narrow.target_range, "cpu", gen(17))
    assert torch.allclose(tc, torch.full((100,), 0.2)) and torch.allclose(tt, torch.full((100,), 0.7))
    # an explicit range overrides the preset, the other view keeps it
    cfg = JEPAConfig(views="narrow", context_t=(0.1, 0.3))
    assert cfg.context_range == (0.1, 0.3) and cfg.target_range == (0.7, 0.7)


def test_replace_views_applies_the_new_preset():
    cfg = dataclasses.replace(JEPAConfig(views="wide-range"), views="narrow")
    assert cfg.context_range == (0.2, 0.2) and cfg.target_range == (0.7, 0.7)


def test_replace_method_from_default_config():
    # checks acceptance only: the default's target=None is valid for every method, so replacing
    # the method must not raise
    for method in ("diffusion", "two-pass", "l2-anchor"):
        dataclasses.replace(JEPAConfig(), method=method)


def test_config_round_trips_through_asdict():
    cfg = JEPAConfig(method="two-pass", views="narrow", jepa_lambda=0.5)
    assert JEPAConfig(**dataclasses.asdict(cfg)) == cfg


def test_forward_is_reproducible_with_a_generator(make_model):
    ids, prompt, answer = make_batch(4, 24, 5, 12)
    model = build(make_model)
    with torch.no_grad():
        a = model(ids, prompt, answer, generator=gen(0))
        b = model(ids, prompt, answer, generator=gen(0))
        c = model(ids, prompt, answer, generator=gen(1))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.jepa, b.jepa)
    assert not torch.equal(a.diffusion, c.diffusion)


# -----------------------------------------------------------------------------
# 4. Where gradients flow


@pytest.mark.parametrize("truncate", [False, True])
def test_ema_target_gets_no_gradient_and_is_not_recorded(make_model, truncate):
    """truncate=False runs the target's full forward, so its outputs can be inspected; the
    default truncated pass stops before the head (no output to inspect, same no-grad rule)."""
    ids, prompt, answer = make_batch(4, 24, 5, 12)
    model = build(make_model, method="dllm-jepa", target="ema", truncate_target=truncate)
    assert model.target_encoder is not None
    assert all(not p.requires_grad for p in model.target_encoder.parameters())
    trainable = {id(p) for p in model.trainable_parameters()}
    assert not trainable & {id(p) for p in model.target_encoder.parameters()}
    # Even if a user unfreezes the copy, the target forward must run with autograd off.
    model.target_encoder.requires_grad_(True)
    tgt_calls, ctx_calls = record_calls(model.target_encoder), record_calls(model.backbone)
    out = model(ids, prompt, answer, generator=gen(0))
    out.loss.backward()
    assert len(tgt_calls) == 1 and not tgt_calls[0]["grad_enabled"]
    assert ("out" in tgt_calls[0]) == (not truncate)
    if not truncate:
        assert all(h.grad_fn is None and not h.requires_grad for h in tgt_calls[0]["out"].hidden_states)
    assert all(p.grad is None for p in model.target_encoder.parameters())
    assert len(ctx_calls) == 1 and ctx_calls[0]["grad_enabled"]
    assert ctx_calls[0]["out"].hidden_states[-1].requires_grad
    assert out.jepa.item() > 0


def test_online_target_is_the_backbone_under_no_grad(make_model):
    ids, prompt, answer = make_batch(4, 24, 5, 12)
    # full target pass (truncate_target=False) so that its outputs can be inspected
    model = build(make_model, method="dllm-jepa", target="online", views="narrow", truncate_target=False)
    assert model.target_encoder is None  # no weight copy
    assert sum(p.numel() for p in model.parameters()) == (
        sum(p.numel() for p in model.backbone.parameters())
        + sum(p.numel() for p in model.predictor.parameters()))
    calls = record_calls(model.backbone)
    out = model(ids, prompt, answer, generator=gen(0))
    assert len(calls) == 2
    target_call = max(calls, key=lambda c: (c["ids"] == MASK).sum().item())  # the heavier view
    context_call = min(calls, key=lambda c: (c["ids"] == MASK).sum().item())
    assert not target_call["grad_enabled"]
    assert all(not h.requires_grad for h in target_call["out"].hidden_states)
    assert context_call["grad_enabled"] and context_call["out"].hidden_states[-1].requires_grad
    out.loss.backward()
    assert model.backbone.layers[0].qkv.weight.grad.abs().sum() > 0


def test_two_pass_target_pass_carries_gradient(make_model):
    ids, prompt, answer = make_batch(4, 24, 5, 12)
    # full target pass (truncate_target=False) so that its logits can be inspected
    model = build(make_model, method="two-pass", views="narrow", truncate_target=False)
    assert model.target_encoder is None and model.predictor is not None
    calls = record_calls(model.backbone)
    out = model(ids, prompt, answer, generator=gen(0))
    assert len(calls) == 2 and all(c["grad_enabled"] for c in calls)
    target_call = max(calls, key=lambda c: (c["ids"] == MASK).sum().item())
    context_call = min(calls, key=lambda c: (c["ids"] == MASK).sum().item())
    h_target = target_call["out"].hidden_states[-1]
    assert h_target.requires_grad and h_target.grad_fn is not None
    g_target, g_logits = torch.autograd.grad(
        out.loss, [h_target, target_call["out"].logits], retain_graph=True, allow_unused=True)
    assert g_target.abs().sum() > 0, "the JEPA loss does not reach the target pass"
    assert g_logits is None, "the target view's logits must not enter the diffusion loss"
    # the context view's logits do
    (g_ctx,) = torch.autograd.grad(out.diffusion, [context_call["out"].logits])
    assert g_ctx.abs().sum() > 0


def test_two_pass_jepa_gradient_includes_the_target_path(make_model):
    """Same weights, same masks: `two-pass` and `dllm-jepa` with an online target compute the
    same JEPA value, but only two-pass adds the gradient through the target view."""
    ids, prompt, answer = make_batch(4, 24, 5, 12)
    grads, values = {}, {}
    for method, target in (("two-pass", None), ("dllm-jepa", "online")):
        model = build(make_model, method=method, target=target)
        out = model(ids, prompt, answer, generator=gen(3))
        out.jepa.backward()  # the JEPA term alone (diffusion at zero weight)
        values[method] = out.jepa.item()
        grads[method] = torch.cat([p.grad.flatten() for p in model.backbone.layers.parameters()])
        assert grads[method].abs().sum() > 0
        assert model.backbone.lm_head.weight.grad is None  # JEPA reads the state before the head
    assert math.isclose(values["two-pass"], values["dllm-jepa"], rel_tol=1e-5)
    diff = (grads["two-pass"] - grads["dllm-jepa"]).norm() / grads["dllm-jepa"].norm()
    assert diff > 1e-2, "two-pass backbone gradient equals the context-only gradient"


def test_predictor_and_backbone_receive_gradients(make_model):
    ids, prompt, answer = make_batch(4, 24, 5, 12)
    model = build(make_model, method="dllm-jepa")
    out = model(ids, prompt, answer, generator=gen(0))
    out.jepa.backward()
    bb = model.backbone
    for p in (bb.embed.weight, bb.layers[0].qkv.weight, bb.layers[-1].down.weight, bb.norm.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert bb.lm_head.weight.grad is None
    # at init each block's output layer is zero (identity predictor): it gets the gradient
    for block in model.predictor.blocks:
        assert block[-1].weight.grad.abs().sum() > 0
    # after one step the whole predictor trains
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    opt.step()
    opt.zero_grad()
    model(ids, prompt, answer, generator=gen(1)).loss.backward()
    for name, p in model.predictor.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in bb.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_embed_layer_selects_where_jepa_reads(make_model):
    """embed_layer=1 reads the output of the first block: the JEPA gradient stops there."""
    ids, prompt, answer = make_batch(4, 24, 5, 12)
    model = build(make_model, method="dllm-jepa", embed_layer=1)
    model(ids, prompt, answer, generator=gen(0)).jepa.backward()
    bb = model.backbone
    assert bb.layers[0].qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in bb.layers[1].parameters())
    assert bb.norm.weight.grad is None


@pytest.mark.parametrize("method", list(dj.METHODS))
def test_forward_under_no_grad(make_model, method):
    ids, prompt, answer = make_batch(3, 16, 4, 8)
    with torch.no_grad():
        out = build(make_model, method=method)(ids, prompt, answer, generator=gen(0))
    assert not out.loss.requires_grad and torch.isfinite(out.loss)


# -----------------------------------------------------------------------------
# 5. The EMA target


def test_ema_momentum_schedule():
    assert dj.ema_momentum(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert dj.ema_momentum(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert dj.ema_momentum(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert dj.ema_momentum(150, 100, 0.996, 1.0) == pytest.approx(1.0)  # clamped after the end
    assert dj.ema_momentum(0, 0, 0.996, 1.0) == pytest.approx(0.996)  # total 0: no ZeroDivisionError
    assert dj.ema_momentum(7, 100, 0.9, 0.9) == pytest.approx(0.9)


def perturb_(module, scale=0.05, seed=0):
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("step,total", [(0, 100), (50, 100), (25, 100), (100, 100)])
def test_update_target_is_ema(make_model, step, total):
    model = build(make_model, method="dllm-jepa", ema_momentum=(0.996, 1.0))
    perturb_(model.target_encoder, seed=1)  # make target != online before the update
    perturb_(model.backbone, seed=2)
    old = [p.detach().clone() for p in model.target_encoder.parameters()]
    online = [p.detach().clone() for p in model.backbone.parameters()]
    m = dj.ema_momentum(step, total, 0.996, 1.0)
    model.update_target(step, total)
    for o, w, new in zip(old, online, model.target_encoder.parameters()):
        assert torch.allclose(new, m * o + (1 - m) * w, atol=1e-6, rtol=0), (new - m * o - (1 - m) * w).abs().max()
    for w, p in zip(online, model.backbone.parameters()):
        assert torch.equal(w, p)  # the online model is untouched
    if step == total:
        assert all(torch.equal(o, n) for o, n in zip(old, model.target_encoder.parameters()))
    else:
        assert not all(torch.equal(o, n) for o, n in zip(old, model.target_encoder.parameters()))


@pytest.mark.parametrize("method,target", [("diffusion", None), ("two-pass", None),
                                           ("l2-anchor", None), ("dllm-jepa", "online")])
def test_update_target_is_a_noop_without_ema(make_model, method, target):
    model = build(make_model, method=method, target=target)
    assert model.target_encoder is None
    perturb_(model.backbone)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.update_target(10, 100)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_short_run_lowers_the_loss_and_moves_the_ema(make_model):
    """30 AdamW steps on one fixed batch: the diffusion loss falls, the EMA target follows."""
    ids, prompt, answer = make_batch(8, 24, 6, 12, seed=5)
    model = build(make_model, method="dllm-jepa", views="narrow")
    target0 = [p.clone() for p in model.target_encoder.parameters()]
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)

    def eval_loss():
        with torch.no_grad():
            return sum(model(ids, prompt, answer, generator=gen(s)).diffusion.item() for s in range(4))

    start = eval_loss()
    for step in range(30):
        opt.zero_grad()
        model(ids, prompt, answer, generator=gen(100 + step)).loss.backward()
        opt.step()
        model.update_target(step, 30)
    assert eval_loss() < 0.8 * start
    moved = sum((p - p0).abs().sum().item() for p, p0 in zip(model.target_encoder.parameters(), target0))
    assert moved > 0


# -----------------------------------------------------------------------------
# 6. FLOPs: the paper's 33%


@pytest.mark.parametrize("truncate", [False, True])
def test_flop_ratios(make_model, truncate):
    """One optimizer step (forward, backward, AdamW, EMA update), same batch, per method.

    Cost with F = one forward and H = the LM head's share of it:
    - full target passes (truncate_target=False): diffusion 3F; dllm-jepa 3F + F (no-grad
      target pass); two-pass 3F + F + 2(F - H): the target view's logits are unused, so its
      backward skips the head. The head (vocab 261) is ~6% of F here, which keeps
      dllm-jepa/two-pass within 3% of 2/3.
    - truncated target passes (the default: no LM head, a saving both methods get):
      dllm-jepa 3F + (F - H), two-pass 3F + 3(F - H): exactly (4F - H)/3F and (4F - H)/(6F - 3H).
    (FlopCounterMode counts matmuls; CPU attention's T^2 part is not counted, in all methods.)
    """
    shape = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256)
    B, T = 4, 64
    ids, prompt, answer = make_batch(B, T, 16, 40)
    flops = {}
    for method in ("diffusion", "dllm-jepa", "two-pass"):
        model = build(make_model, method=method, truncate_target=truncate,
                      **({} if method != "dllm-jepa" else {"target": "ema"}),
                      backbone=make_model(0, **shape))
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
        with FlopCounterMode(display=False) as counter:
            opt.zero_grad()
            model(ids, prompt, answer, generator=gen(0)).loss.backward()
            opt.step()
            model.update_target(1, 10)
        flops[method] = counter.get_total_flops()
    bb = make_model(0, **shape)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        bb(input_ids=ids, output_hidden_states=True)
    F_ = counter.get_total_flops()
    H = 2 * B * T * bb.config.hidden_size * bb.config.vocab_size
    r_diff = flops["dllm-jepa"] / flops["diffusion"]
    r_two = flops["dllm-jepa"] / flops["two-pass"]
    print(f"\nFLOPs per step: {flops}; one forward F={F_}, head H={H} ({H / F_:.1%} of F)")
    print(f"dllm-jepa/diffusion = {r_diff:.4f}; dllm-jepa/two-pass = {r_two:.4f}")
    # the accounting, to 1% of F (the predictor is ~0.5% of F)
    target = F_ - H if truncate else F_
    assert abs(flops["diffusion"] - 3 * F_) <= 0.01 * F_
    assert abs(flops["dllm-jepa"] - flops["diffusion"] - target) <= 0.01 * F_
    assert abs(flops["two-pass"] - flops["dllm-jepa"] - 2 * (F_ - H)) <= 0.01 * F_
    if truncate:  # the exact expectation, to 1%
        assert abs(r_diff / ((4 * F_ - H) / (3 * F_)) - 1) <= 0.01, r_diff
        assert abs(r_two / ((4 * F_ - H) / (6 * F_ - 3 * H)) - 1) <= 0.01, r_two
    else:  # the paper's claim (4F against 6F)
        assert abs(r_diff / (4 / 3) - 1) <= 0.03, r_diff
        assert abs(r_two / (2 / 3) - 1) <= 0.03, r_two


# -----------------------------------------------------------------------------
# 7. l2-anchor and the diffusion baseline


def test_l2_anchor(make_model):
    ids, prompt, answer = make_batch(4, 24, 5, 12)
    mu = 0.3
    model = build(make_model, method="l2-anchor", anchor_mu=mu)
    assert model.predictor is None and model.target_encoder is None and model.anchor is not None
    assert all(not p.requires_grad for p in model.anchor.parameters())
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.backbone.parameters()}
    out = model(ids, prompt, answer, generator=gen(0))
    assert out.anchor.item() == 0.0 and out.jepa.item() == 0.0
    base = [p.detach().clone() for p in model.backbone.parameters()]
    perturb_(model.backbone, scale=0.01)
    out = model(ids, prompt, answer, generator=gen(0))
    expected = mu * sum(((p.detach() - b) ** 2).sum().item() for p, b in zip(model.backbone.parameters(), base))
    assert expected > 0
    assert math.isclose(out.anchor.item(), expected, rel_tol=1e-5)
    assert torch.allclose(out.loss, out.diffusion + out.anchor)
    out.anchor.backward()  # d/dtheta mu ||theta - theta0||^2 = 2 mu (theta - theta0)
    for p, b in zip(model.backbone.parameters(), base):
        assert torch.allclose(p.grad, 2 * mu * (p.detach() - b), atol=1e-7)
    assert all(p.grad is None for p in model.anchor.parameters())


def test_diffusion_method_is_the_plain_baseline(make_model):
    ids, prompt, answer = make_batch(4, 24, 5, 12)
    model = build(make_model, method="diffusion", jepa_lambda=2.0)
    assert model.predictor is None and model.target_encoder is None and model.anchor is None
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.backbone.parameters()}
    calls = record_calls(model.backbone)
    out = model(ids, prompt, answer, generator=gen(0))
    assert len(calls) == 1  # no target pass
    assert out.jepa.item() == 0.0 and out.anchor.item() == 0.0
    assert torch.equal(out.loss, out.diffusion)


def test_total_is_diffusion_plus_lambda_jepa(make_model):
    ids, prompt, answer = make_batch(4, 24, 5, 12)
    out = build(make_model, method="dllm-jepa", jepa_lambda=2.5)(ids, prompt, answer, generator=gen(0))
    assert out.jepa.item() > 0
    assert torch.allclose(out.loss, out.diffusion + 2.5 * out.jepa)
    # the diffusion part does not depend on lambda (same masks, same weights)
    out0 = build(make_model, method="dllm-jepa", jepa_lambda=0.0)(ids, prompt, answer, generator=gen(0))
    assert torch.allclose(out0.diffusion, out.diffusion) and torch.allclose(out0.loss, out0.diffusion)


# -----------------------------------------------------------------------------
# 8. Configuration errors


@pytest.mark.parametrize("kwargs,match", [
    (dict(context_t=(0.0, 0.5)), r"context_t.*\(0, 1\]"),
    (dict(context_t=(-0.1, 0.5)), r"context_t.*\(0, 1\]"),
    (dict(target_t=(0.5, 1.5)), r"target_t.*\(0, 1\]"),
    (dict(context_t=(0.6, 0.4)), r"context_t.*low must not exceed high"),
    (dict(target_t=(0.9, 0.8), context_t=(0.1, 0.2)), r"target_t.*low must not exceed high"),
    (dict(context_t=(0.2, 0.6), target_t=(0.3, 0.5)), r"target_t.*context_t"),
    (dict(method="bogus"), r"method='bogus'"),
    (dict(views="bogus"), r"views='bogus'"),
    (dict(jepa_lambda=-1.0), r"jepa_lambda"),
    (dict(anchor_mu=-0.5), r"anchor_mu"),
    (dict(eps=1.0), r"eps"),
    (dict(loss_norm="sum"), r"loss_norm"),
    (dict(pooling="max"), r"pooling"),
    (dict(distance="l2"), r"distance"),
    (dict(ema_momentum=(1.0, 0.9)), r"ema_momentum"),
    (dict(target="bogus"), r"target='bogus'"),
    (dict(method="diffusion", target="ema"), r"target='ema'.*dllm-jepa"),
    (dict(method="two-pass", target="online"), r"target='online'.*dllm-jepa"),
    (dict(method="l2-anchor", target="ema"), r"target='ema'.*dllm-jepa"),
    (dict(predictor_depth=0), r"predictor_depth"),
])
def test_bad_config_raises_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        JEPAConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(context_t=(1.0, 1.0), target_t=(1.0, 1.0)),   # t = 1 is allowed
    dict(context_t=(0.2, 0.2), target_t=(0.2, 0.2)),   # equal rates
    dict(context_t=(0.3, 0.5), target_t=(0.1, 0.9)),   # target low below context low (clamped per row)
    dict(method="two-pass"), dict(method="diffusion", jepa_lambda=0.0), dict(target="online"),
])
def test_good_configs_are_accepted(kwargs):
    JEPAConfig(**kwargs)  # checks acceptance only: constructing it must not raise


def test_default_config_is_the_method_with_an_ema_target():
    cfg = JEPAConfig()
    assert cfg.method == "dllm-jepa" and cfg.target_kind == "ema" and cfg.nested
    assert JEPAConfig(method="diffusion").target_kind is None
    assert cfg.ema_momentum == (0.996, 1.0)


# -----------------------------------------------------------------------------
# 9. The JEPA distance


def test_cosine_distance_values():
    z = torch.randn(4, 16, generator=gen(0))
    ones = torch.ones(4)
    assert dj.jepa_loss(z, z.clone(), ones, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert dj.jepa_loss(z, -z, ones, "cosine").item() == pytest.approx(2.0, abs=1e-6)
    assert dj.jepa_loss(3 * z, z, ones, "cosine").item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    e = torch.eye(2)
    assert dj.jepa_loss(e, e.flip(0), torch.ones(2), "cosine").item() == pytest.approx(1.0)


def test_zero_weight_rows_are_excluded():
    z = torch.randn(4, 8, generator=gen(1))
    target = z.clone()
    target[2:] = -z[2:]  # rows 2-3 are opposite
    w = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert dj.jepa_loss(z, target, w, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    w = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert dj.jepa_loss(z, target, w, "cosine").item() == pytest.approx(1.0, abs=1e-6)  # (0 + 2) / 2
    assert dj.jepa_loss(z, target, torch.zeros(4), "cosine").item() == 0.0


def test_per_token_weights():
    z = torch.randn(2, 3, 8, generator=gen(2))
    target = -z
    w = torch.tensor([[1, 0, 0], [0, 0, 1]])
    target[0, 1:] = z[0, 1:]
    target[1, :2] = z[1, :2]
    assert dj.jepa_loss(z, target, w, "cosine").item() == pytest.approx(2.0, abs=1e-6)


def test_smooth_l1_distance_values():
    pred = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    target = torch.zeros(2, 2)
    # per element: 0.5 d^2 if |d| < 1 else |d| - 0.5; mean over the 2 features; mean over rows
    expected = ((0.5 + 0) / 2 + (2.5 + 0) / 2) / 2
    assert dj.jepa_loss(pred, target, torch.ones(2), "smooth_l1").item() == pytest.approx(expected)
    assert dj.jepa_loss(pred, pred.clone(), torch.ones(2), "smooth_l1").item() == 0.0


def test_a_new_predictor_is_exactly_the_identity(make_model):
    """Each block's last Linear starts at zero, so a new predictor returns its input exactly,
    pooled (B, C) or per token (B, T, C); the Linear before it is random, not zero."""
    torch.manual_seed(0)
    predictor = dj.Predictor(16, depth=3, mult=2)
    z = torch.randn(4, 16, generator=gen(0))
    tokens = torch.randn(2, 5, 16, generator=gen(1))
    assert torch.equal(predictor(z), z) and torch.equal(predictor(tokens), tokens)
    for block in predictor.blocks:
        assert block[1].weight.abs().min() > 0
        assert not block[-1].weight.any() and not block[-1].bias.any()
    model = build(make_model)  # the one DLLMJEPA builds, at the backbone's width (32)
    z = torch.randn(3, 32, generator=gen(2))
    assert torch.equal(model.predictor(z), z)


def test_embed_pools_the_region_then_layer_norms():
    hidden = torch.randn(2, 5, 8, generator=gen(3))
    region = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    z = dj.embed(hidden, region, "answer")
    mean = hidden[0, 1:3].mean(0)
    assert torch.allclose(z[0], (mean - mean.mean()) / torch.sqrt(mean.var(unbiased=False) + 1e-5), atol=1e-5)
    assert torch.equal(z[1], torch.zeros(8))  # an empty region pools to zeros
    tok = dj.embed(hidden, region, "token")
    assert tok.shape == hidden.shape
    assert torch.allclose(tok.mean(-1), torch.zeros(2, 5), atol=1e-5)


@pytest.mark.parametrize("pad_is_answer", [True, False])
def test_visible_pooling_reads_prompt_and_answer_never_padding(make_model, monkeypatch, pad_is_answer):
    """pooling="visible": each view's embedding averages its unmasked prompt and answer tokens;
    the EOS padding is left out whether or not pad_is_answer scores (and masks) it."""
    regions, embed = [], dj.embed
    def recording_embed(hidden, region, pooling):
        regions.append(region.clone())
        return embed(hidden, region, pooling)
    monkeypatch.setattr(dj, "embed", recording_embed)
    ids, prompt, answer = make_batch(2, 12, torch.tensor([3, 5]), torch.tensor([4, 2]))
    build(make_model, method="dllm-jepa", pooling="visible", pad_is_answer=pad_is_answer)(
        ids, prompt, answer, generator=gen(0))
    target, context = regions
    pos = torch.arange(12)[None]
    padding = pos >= (prompt + answer)[:, None]
    for region in (target, context):
        assert not (region & padding).any()
        assert region[pos < prompt[:, None]].all()  # the prompt is never masked: always read
    assert not (target & ~context).any()  # nested views: the target hides all the context hides


@pytest.mark.parametrize("pooling", ["answer", "visible", "token"])
@pytest.mark.parametrize("pad_is_answer", [True, False])
@pytest.mark.parametrize("distance", ["cosine", "smooth_l1"])
def test_rows_with_an_empty_answer_stay_finite(make_model, pooling, pad_is_answer, distance):
    """Row 1 has no answer tokens (padding only), row 2 is all prompt: no NaN anywhere."""
    ids, prompt, answer = make_batch(3, 16, torch.tensor([4, 6, 16]), torch.tensor([8, 0, 0]))
    model = build(make_model, method="dllm-jepa", pooling=pooling, pad_is_answer=pad_is_answer,
                  distance=distance)
    out = model(ids, prompt, answer, generator=gen(0))
    for part in (out.loss, out.diffusion, out.jepa):
        assert torch.isfinite(part), (part, out)
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


def test_all_rows_empty_gives_zero_loss(make_model):
    ids, prompt, answer = make_batch(2, 12, 12, 0)
    out = build(make_model)(ids, prompt, answer, generator=gen(0))
    assert out.loss.item() == 0.0 and out.diffusion.item() == 0.0 and out.jepa.item() == 0.0


# -----------------------------------------------------------------------------
# 10. The shifted-logits seam (Dream); that shift_logits recovers the unshifted losses exactly
# is tested on a real shifted model in tests/test_backbones.py


def test_shifted_logits_need_a_prompt_token_in_every_row(make_model):
    """Position 0 of a shifted-logit backbone predicts nothing of its own: a row with an empty
    prompt is refused, naming the rule; the same rows with a 1-token prompt run."""
    ids, prompt, answer = make_batch(2, 16, torch.tensor([3, 0]), torch.tensor([8, 10]))
    model = build(make_model, mask_token_id=MASK, shift_logits=True, context_t=(1.0, 1.0),
                  target_t=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"shifted-logit backbones need a prompt of >= 1 token"):
        model(ids, prompt, answer, generator=gen(0))
    assert torch.isfinite(model(ids, torch.tensor([3, 1]), answer, generator=gen(0)).loss)
    # an unshifted backbone scores position 0 like any other: no prompt needed
    assert torch.isfinite(build(make_model)(ids, prompt, answer, generator=gen(0)).loss)


def test_a_bf16_backbone_gets_a_bf16_predictor(make_model):
    model = build(make_model, backbone=make_model().to(torch.bfloat16))
    assert all(p.dtype == torch.bfloat16 for p in model.predictor.parameters())
    ids, prompt, answer = make_batch(2, 16, 4, 12)
    out = model(ids, prompt, answer, generator=gen(0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.jepa > 0
    assert model.predictor.blocks[0][1].weight.grad is not None


def test_mask_token_id_defaults_to_the_config(make_model):
    model = build(make_model)
    assert model.mask_token_id == MASK == model.backbone.config.mask_token_id
    assert build(make_model, mask_token_id=5).mask_token_id == 5


# -----------------------------------------------------------------------------
# 10. The readings of the paper's open choices: target direction, predictor form and init


def test_lighter_target_hides_part_of_what_the_context_hides():
    """target_view="lighter": t_target ~ U(0, t_context), and with nested views (one uniform draw)
    every token hidden from the target is hidden from the context: the target knows more."""
    B, T = 256, 64
    ids = torch.randint(0, 256, (B, T), generator=gen(31))
    scored = torch.arange(T)[None].expand(B, T) >= 4
    tc, tt = dj.sample_times(B, (0.01, 1.0), (0.5, 1.0), "cpu", gen(32), target_view="lighter")
    assert (tt <= tc).all() and (tt >= 0).all()
    assert abs((tt / tc).mean().item() - 0.5) < 0.05  # uniform on (0, t_context)
    c, t = dj.make_views(ids, scored, tc, tt, MASK, 1e-3, True, gen(33))
    assert not (t.masked & ~c.masked).any(), "a token hidden from the lighter target is visible in the context"
    assert (c.masked & ~t.masked).any()


def test_clean_target_time_is_zero():
    """target_view="clean": t_target = 0 in every row (forward then feeds the target the sequence
    itself, without even eps's masks: see the next test), what data2vec's teacher sees."""
    tc, tt = dj.sample_times(64, (0.01, 1.0), (0.5, 1.0), "cpu", gen(35), target_view="clean")
    assert (tt == 0).all() and (tc > 0).all()


@pytest.mark.parametrize("target_view", ["lighter", "clean"])
def test_forward_feeds_the_lighter_view_to_the_target(make_model, target_view):
    """In forward, the EMA target encodes the lighter (or unmasked) view and the backbone the
    heavier context view, which carries the diffusion loss; the first call is the target's."""
    ids, prompt, answer = make_batch(8, 24, 4, 12, seed=3)
    model = build(make_model, target_view=target_view, truncate_target=False)
    ctx_calls, tgt_calls = record_calls(model.backbone), record_calls(model.target_encoder)
    with torch.no_grad():
        model(ids, prompt, answer, generator=gen(37))
    (ctx,), (tgt,) = ctx_calls, tgt_calls
    ctx_masked, tgt_masked = ctx["ids"] == MASK, tgt["ids"] == MASK
    assert not (tgt_masked & ~ctx_masked).any() and ctx_masked.sum() > tgt_masked.sum()
    assert (target_view == "clean") == (not tgt_masked.any())


@pytest.mark.parametrize("predictor", [dj.Predictor, dj.TokenPredictor])
def test_random_init_predictor_is_not_the_identity(predictor):
    """init="identity" returns its input exactly (every residual branch ends at zero); "random"
    keeps PyTorch's init, so the output differs from the input from the first step."""
    torch.manual_seed(0)
    h = torch.randn(2, 6, 64, generator=gen(38))
    run = (lambda p: p(h, torch.ones(2, 6, dtype=torch.bool))) if predictor is dj.TokenPredictor else (lambda p: p(h))
    assert torch.equal(run(predictor(64, depth=2, init="identity")), h)
    out = run(predictor(64, depth=2, init="random"))
    assert (out - h).abs().mean() > 1e-2


def test_token_predictor_depends_on_token_order_and_only_on_attended_tokens():
    """The transformer predictor attends across tokens: reordering the same states changes the
    pooled output (the position code on queries and keys; without it, attention then mean pooling
    would not see order), and a token outside `attend` changes no attended token's output."""
    torch.manual_seed(0)
    predictor = dj.TokenPredictor(64, depth=2, init="random")
    h = torch.randn(1, 8, 64, generator=gen(39))
    attend = torch.ones(1, 8, dtype=torch.bool)
    pooled = lambda x: predictor(x, attend).mean(1)
    order = torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])
    assert not torch.allclose(pooled(h), pooled(h[:, order]), atol=1e-4)
    attend[0, 5:] = False
    changed = h.clone()
    changed[0, 6] += 10.0
    a, b = predictor(h, attend), predictor(changed, attend)
    assert torch.allclose(a[0, :5], b[0, :5], atol=1e-5)


def test_transformer_predictor_in_forward_is_pooled_like_the_target(make_model):
    """predictor="transformer": the prediction is embed(TokenPredictor(context states), region);
    at identity init it is the context embedding itself, so the JEPA loss is the plain distance
    between the two views' embeddings, and the predictor receives gradient."""
    ids, prompt, answer = make_batch(6, 20, 3, 10, seed=4)
    model = build(make_model, predictor="transformer", truncate_target=False)
    plain = build(make_model, truncate_target=False)
    out, ref = model(ids, prompt, answer, generator=gen(40)), plain(ids, prompt, answer, generator=gen(40))
    assert math.isclose(out.jepa.item(), ref.jepa.item(), rel_tol=1e-5)
    out.loss.backward()
    assert all(p.grad is not None for p in model.predictor.parameters())
    assert model.predictor.attn_out[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_view="sideways"), r"target_view='sideways'"),
    (dict(target_view="lighter", target_t=(0.5, 1.0)), r"target_t.*heavier"),
    (dict(predictor="rnn"), r"predictor='rnn'"),
    (dict(predictor_init="zeros"), r"predictor_init='zeros'"),
    (dict(predictor="transformer", pooling="token"), r"transformer.*pooling"),
])
def test_bad_readings_raise_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        JEPAConfig(**kwargs)
