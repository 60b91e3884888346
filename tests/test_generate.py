"""The LLaDA sampler: schedule, block order, every mask filled, batching, shifted logits.

Run: python -m pytest tests/test_generate.py -q
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import generate as G


class Recorder(nn.Module):
    """Wraps a model and keeps every canvas it is asked to denoise."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, input_ids, **kwargs):
        self.calls.append(input_ids.clone())
        return self.model(input_ids=input_ids, **kwargs)


class ShiftedOutput(nn.Module):
    """A Dream-like model: its output at i predicts token i + 1 (here: the wrapped model's
    output for position i + 1; the last row is junk, as nothing predicts past the end)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, **kwargs):
        logits = self.model(input_ids=input_ids, **kwargs).logits
        return SimpleNamespace(logits=torch.cat([logits[:, 1:], torch.randn_like(logits[:, :1])], 1))


class AlwaysToken(nn.Module):
    """Predicts `token` everywhere with a huge margin (and `runner_up` second)."""

    def __init__(self, vocab, token, runner_up):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab))
        self.weight.data[token], self.weight.data[runner_up] = 10.0, 5.0

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.weight.expand(*input_ids.shape, -1))


@pytest.fixture
def peaky(make_model):
    """A random tiny model with large weights: confident, position-dependent predictions, so
    greedy decoding has no near-ties that float rounding could flip."""
    return make_model(seed=1, initializer_range=0.3).eval()


def prompts_of(tokenizer, texts):
    return [tokenizer(t)["input_ids"] for t in texts]


def test_commit_schedule_is_linear_and_complete():
    n = torch.tensor([0, 1, 7, 32])
    schedule = G.commit_schedule(n, 4)
    assert schedule.shape == (4, 4)
    assert schedule.sum(1).tolist() == n.tolist()
    assert (schedule.max(1).values - schedule.min(1).values).le(1).all()  # evenly spread
    assert schedule[3].tolist() == [8, 8, 8, 8]


def test_commit_schedule_gives_leftovers_to_early_steps_as_llada():
    """LLaDA's get_num_transfer_tokens: n // steps each, the first n % steps steps one more."""
    assert G.commit_schedule(torch.tensor([8]), 3).tolist() == [[3, 3, 2]]
    assert G.commit_schedule(torch.tensor([7, 1]), 4).tolist() == [[2, 2, 2, 1], [1, 0, 0, 0]]


@pytest.mark.parametrize("remasking,temperature", [("low_confidence", 0.0), ("random", 0.0),
                                                   ("low_confidence", 1.0)])
def test_fills_every_mask(peaky, tokenizer, remasking, temperature):
    cfg = G.SamplerConfig(gen_length=16, block_length=8, steps=6, temperature=temperature,
                          remasking=remasking)
    out = G.generate(peaky, prompts_of(tokenizer, ["abc", "hello world"]), tokenizer.mask_token_id,
                     cfg, pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 16)
    assert not (out == tokenizer.mask_token_id).any()


def test_blocks_fill_in_order_and_prompt_is_never_rewritten(peaky, tokenizer):
    prompt = tokenizer("abc")["input_ids"] + [tokenizer.mask_token_id]  # a literal mask in the prompt
    recorder = Recorder(peaky)
    cfg = G.SamplerConfig(gen_length=12, block_length=4, steps=6)  # 2 steps per block
    G.generate(recorder, [prompt], tokenizer.mask_token_id, cfg)
    P, mask = len(prompt), tokenizer.mask_token_id
    assert len(recorder.calls) == 6
    committed_before = 0
    for canvas in recorder.calls:
        assert canvas[0, :P].tolist() == prompt
        blocks = (canvas[0, P:] != mask).view(3, 4)           # committed positions per block
        for b in range(2):
            if blocks[b + 1].any():
                assert blocks[b].all(), "a later block moved before the earlier one was full"
        committed = int(blocks.sum())
        assert committed >= committed_before
        committed_before = committed


def test_batched_equals_unbatched_at_temperature_zero(peaky, tokenizer):
    prompts = prompts_of(tokenizer, ["hi", "a somewhat longer prompt", "mid length"])
    cfg = G.SamplerConfig(gen_length=16, block_length=8, steps=8)
    batched = G.generate(peaky, prompts, tokenizer.mask_token_id, cfg, pad_id=tokenizer.pad_token_id)
    alone = torch.cat([G.generate(peaky, [p], tokenizer.mask_token_id, cfg) for p in prompts])
    assert torch.equal(batched, alone)


def test_shifted_logits_are_realigned(peaky, tokenizer):
    """A model whose outputs are shifted by one, sampled with shift_logits=True, decodes exactly
    what the unshifted model decodes; without the flag it decodes something else."""
    prompts = prompts_of(tokenizer, ["abc", "a longer prompt"])
    cfg = G.SamplerConfig(gen_length=8, block_length=4, steps=8)
    plain = G.generate(peaky, prompts, tokenizer.mask_token_id, cfg, pad_id=tokenizer.pad_token_id)
    shifted_model = ShiftedOutput(peaky)
    realigned = G.generate(shifted_model, prompts, tokenizer.mask_token_id, cfg, shift_logits=True,
                           pad_id=tokenizer.pad_token_id)
    misaligned = G.generate(shifted_model, prompts, tokenizer.mask_token_id, cfg,
                            pad_id=tokenizer.pad_token_id)
    assert torch.equal(plain, realigned)
    assert not torch.equal(plain, misaligned)


def test_shifted_logits_need_a_prompt(peaky, tokenizer):
    with pytest.raises(ValueError, match="non-empty prompt"):
        G.generate(peaky, [[]], tokenizer.mask_token_id, G.SamplerConfig(8, 4), shift_logits=True)


def test_eos_suppression(tokenizer):
    eos, other = tokenizer.eos_token_id, tokenizer("x")["input_ids"][0]
    model = AlwaysToken(len(tokenizer), eos, other)
    cfg = dict(gen_length=8, block_length=8, steps=4)
    free = G.generate(model, [[1, 2]], tokenizer.mask_token_id, G.SamplerConfig(**cfg), suppress_ids=[eos])
    assert (free == eos).all()
    suppressed = G.generate(model, [[1, 2]], tokenizer.mask_token_id,
                            G.SamplerConfig(**cfg, suppress_eos=True), suppress_ids=[eos])
    assert (suppressed == other).all()


def test_sampling_is_reproducible_with_a_seed(peaky, tokenizer):
    cfg = G.SamplerConfig(gen_length=8, block_length=4, steps=8, temperature=1.0)
    run = lambda seed: G.generate(peaky, [[1, 2, 3]], tokenizer.mask_token_id, cfg,
                                  generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0), run(0))


def test_sampling_follows_the_seed_at_a_positive_temperature(tokenizer):
    """Flat logits (every token but the mask id equally likely): at temperature 1 the Gumbel
    noise alone picks each token, so seeds 0 and 1 give different canvases, each spread over
    many ids; at temperature 0 argmax's tie goes to id 0, whatever the seed."""
    model = AlwaysToken(len(tokenizer), 0, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[tokenizer.mask_token_id] = -float("inf")
    def run(seed, temperature):
        cfg = G.SamplerConfig(gen_length=16, block_length=8, steps=8, temperature=temperature)
        return G.generate(model, [[1, 2, 3]], tokenizer.mask_token_id, cfg,
                          generator=torch.Generator().manual_seed(seed))
    sample = run(0, 1.0)
    assert torch.equal(sample, run(0, 1.0))
    assert not torch.equal(sample, run(1, 1.0))
    assert len(set(sample.flatten().tolist())) >= 8  # 16 draws from 260 ids: not one argmax
    assert (run(0, 0.0) == 0).all() and (run(1, 0.0) == 0).all()


def test_padding_mask_formats():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert G.padding_mask_for(mask, four_d=False) is mask
    four = G.padding_mask_for(mask, four_d=True)
    assert four.shape == (2, 1, 3, 3)
    assert four[0, 0].tolist() == [[False, True, True]] * 3  # keys hidden, every query row live


def test_decode_answer_stops_at_eos(tokenizer):
    ids = tokenizer(" ab c ")["input_ids"] + [tokenizer.eos_token_id] + tokenizer("junk")["input_ids"]
    assert G.decode_answer(tokenizer, ids, {tokenizer.eos_token_id}) == "ab c"


@pytest.mark.parametrize("kwargs,match", [
    (dict(gen_length=10, block_length=4), "--gen-length 10 is not a multiple of --block-length 4"),
    (dict(gen_length=8, block_length=4, steps=3), "--steps 3 cannot be shared evenly"),
    (dict(steps=0), r"--steps 0: must be >= 1"),           # not silently gen_length
    (dict(temperature=-1.0), "--temperature -1.0: must be a finite number >= 0"),
    (dict(temperature=float("nan")), "--temperature nan"),
    (dict(temperature=float("inf")), "--temperature inf"),
    (dict(remasking="best"), "--remasking 'best'"),
])
def test_bad_sampler_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        G.SamplerConfig(**kwargs)


def test_steps_default_to_gen_length():
    assert G.SamplerConfig(gen_length=8, block_length=4).steps == 8
