"""The LLaDA sampler: schedule, block order, every mask filled, batching, shifted logits;
the command line: answers equal generate_text's, --show's frames, prompt files, bad inputs.

Run: python -m pytest tests/test_generate.py -q
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from dlm import backbones, data
from dlm import sampler as G
from scripts import generate as command


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


def test_on_step_sees_every_committing_step(peaky, tokenizer):
    """The hook runs once per forward (one per step that commits something: 16 steps for 8
    masks per block skip the 8 that have none), after the commit; the last call is the output."""
    recorder, seen = Recorder(peaky), []
    cfg = G.SamplerConfig(gen_length=16, block_length=8, steps=32)
    out = G.generate(recorder, [[1, 2, 3]], tokenizer.mask_token_id, cfg,
                     on_step=lambda canvas: seen.append(canvas.clone()))
    assert len(seen) == len(recorder.calls) == 16
    masks = [int((c == tokenizer.mask_token_id).sum()) for c in seen]
    assert masks == list(range(15, -1, -1))
    assert torch.equal(seen[-1], out)

# -----------------------------------------------------------------------------
# The exact default, parallel decoding (--threshold) and the prefix cache (--prefix-cache)

# What the sampler answered before --threshold and --prefix-cache existed (the sampler as of the
# commit that added them, run on `peaky`): the default must stay LLaDA's sampler token for token.
RECORDED = {
    ("greedy, 3 blocks", False): [[243, 108, 161, 206, 161, 243, 19, 108, 175, 206, 249, 12],
                                  [246, 246, 246, 246, 246, 192, 192, 192, 192, 192, 192, 192],
                                  [64, 64, 86, 86, 86, 64, 221, 64, 64, 221, 221, 221]],
    ("greedy, 3 blocks", True): [[148, 24, 24, 161, 107, 221, 24, 24, 246, 215, 246, 67],
                                 [155, 246, 246, 53, 192, 246, 64, 192, 34, 192, 192, 228],
                                 [24, 127, 192, 86, 252, 221, 221, 221, 228, 147, 213, 213]],
    ("temperature 1", False): [[107, 260, 161, 197, 161, 24, 24, 193], [221, 246, 200, 226, 86, 222, 192, 192],
                               [213, 202, 90, 69, 77, 161, 221, 246]],
    ("temperature 1", True): [[208, 58, 12, 161, 161, 206, 24, 24], [39, 246, 238, 246, 246, 221, 192, 192],
                              [18, 92, 225, 86, 2, 24, 250, 215]],
    ("random remasking", False): [[24, 224, 33, 12, 12, 12, 165, 165], [246, 246, 84, 246, 246, 192, 192, 192],
                                  [79, 64, 86, 64, 86, 221, 221, 64]],
    ("random remasking", True): [[24, 108, 33, 118, 19, 161, 12, 12], [155, 246, 53, 225, 191, 246, 64, 79],
                                 [24, 246, 84, 112, 112, 88, 55, 64]],
}
RECORDED_CONFIGS = {"greedy, 3 blocks": dict(gen_length=12, block_length=4, steps=6),
                    "temperature 1": dict(gen_length=8, block_length=8, steps=8, temperature=1.0),
                    "random remasking": dict(gen_length=8, block_length=4, steps=8, remasking="random")}
BATCH = ["hi", "a somewhat longer prompt", "mid"]


@pytest.mark.parametrize("case,shift", list(RECORDED))
def test_exact_default_is_unchanged_token_for_token(peaky, tokenizer, case, shift):
    """A padded batch, several blocks, greedy, sampled and random remasking, shifted logits:
    the defaults (no threshold, no cache) give exactly the recorded canvases."""
    out = G.generate(peaky, prompts_of(tokenizer, BATCH), tokenizer.mask_token_id,
                     G.SamplerConfig(**RECORDED_CONFIGS[case]), shift_logits=shift, pad_id=tokenizer.pad_token_id,
                     generator=torch.Generator().manual_seed(0))
    assert out.tolist() == RECORDED[case, shift]


@pytest.mark.parametrize("block_length", [16, 8, 4])
@pytest.mark.parametrize("shift", [False, True])
def test_threshold_nothing_reaches_is_the_exact_sampler_one_token_a_step(peaky, tokenizer, block_length, shift):
    """No confidence is above 1, so --threshold 1 commits one token a step, the most confident:
    LLaDA's sampler with steps = gen_length, the same canvases and the same 16 forwards."""
    prompts, model = prompts_of(tokenizer, BATCH), (ShiftedOutput(peaky) if shift else peaky)
    run = lambda cfg, recorder: G.generate(recorder, prompts, tokenizer.mask_token_id, cfg, shift_logits=shift,
                                           pad_id=tokenizer.pad_token_id)
    exact, fast = Recorder(model), Recorder(model)
    expected = run(G.SamplerConfig(gen_length=16, block_length=block_length, steps=16), exact)
    assert torch.equal(run(G.SamplerConfig(gen_length=16, block_length=block_length, threshold=1.0), fast), expected)
    assert len(fast.calls) == len(exact.calls) == 16


def test_threshold_commits_every_confident_token_at_once(tokenizer):
    """The model is 98% sure of one token everywhere: with --threshold 0.9 each block of 8 fills
    in one forward (2 blocks: 2 forwards, against 16 for the exact sampler); with 0.99 nothing
    passes and each step commits one."""
    model = AlwaysToken(len(tokenizer), 7, 8)
    for threshold, forwards in ((0.9, 2), (0.99, 16)):
        recorder = Recorder(model)
        out = G.generate(recorder, [[1, 2, 3]], tokenizer.mask_token_id,
                         G.SamplerConfig(gen_length=16, block_length=8, threshold=threshold))
        assert (out == 7).all() and len(recorder.calls) == forwards


def test_threshold_batch_rows_finish_blocks_at_different_steps(peaky, tokenizer):
    """Rows whose blocks need different numbers of steps: the batch runs until its slowest row is
    done, a finished row's canvas no longer changes, and every row decodes exactly as alone."""
    prompts = prompts_of(tokenizer, ["hi", "a somewhat longer prompt", "mid length", "x"])
    cfg = G.SamplerConfig(gen_length=16, block_length=8, threshold=0.2)
    frames = []
    batched = G.generate(peaky, prompts, tokenizer.mask_token_id, cfg, pad_id=tokenizer.pad_token_id,
                         on_step=lambda canvas: frames.append(canvas.clone()))
    alone = torch.cat([G.generate(peaky, [p], tokenizer.mask_token_id, cfg) for p in prompts])
    assert torch.equal(batched, alone)
    assert not (batched == tokenizer.mask_token_id).any()
    first_block = torch.stack([(f[:, :8] == tokenizer.mask_token_id).any(1) for f in frames])  # (steps, B)
    done_at = (~first_block).float().argmax(0)  # the step after which each row's first block is full
    assert len(set(done_at.tolist())) > 1, "the rows should finish the block at different steps"
    for row, step in enumerate(done_at.tolist()):  # once full, a row's block stays as it is
        assert all(torch.equal(f[row, :8], batched[row, :8]) for f in frames[step:])


def test_threshold_with_shifted_logits(peaky, tokenizer):
    prompts, recorder = prompts_of(tokenizer, BATCH), Recorder(peaky)
    cfg = G.SamplerConfig(gen_length=16, block_length=8, threshold=0.1)
    plain = G.generate(recorder, prompts, tokenizer.mask_token_id, cfg, pad_id=tokenizer.pad_token_id)
    realigned = G.generate(ShiftedOutput(peaky), prompts, tokenizer.mask_token_id, cfg, shift_logits=True,
                           pad_id=tokenizer.pad_token_id)
    assert torch.equal(plain, realigned)
    assert len(recorder.calls) < 16  # some steps committed several tokens


class CachedShiftedOutput(ShiftedOutput):
    """ShiftedOutput that passes the prefix cache through (its output is one column behind, so a
    cached window starts one column earlier: the sampler's business, checked below)."""

    def __init__(self, model):
        super().__init__(model)
        self.config = model.config

    def forward(self, input_ids, **kwargs):
        out = self.model(input_ids=input_ids, **kwargs)
        logits = torch.cat([out.logits[:, 1:], torch.randn_like(out.logits[:, :1])], 1)
        return SimpleNamespace(logits=logits, past_key_values=out.past_key_values)


@pytest.mark.parametrize("cfg", [dict(gen_length=16, block_length=16, steps=16),
                                 dict(gen_length=16, block_length=4, steps=8),
                                 dict(gen_length=16, block_length=8, threshold=0.1)])
@pytest.mark.parametrize("shift", [False, True])
def test_prefix_cache_is_exact_for_a_one_layer_model(make_model, tokenizer, cfg, shift):
    """With one layer the prefix's keys and values are functions of its tokens and positions
    alone, which never change once committed: the cache loses nothing, so the answers are the
    uncached ones token for token (a padded batch, one block or several, the exact schedule or a
    threshold, shifted logits); the cached steps run only the block's columns and what follows."""
    model = make_model(seed=1, num_hidden_layers=1, initializer_range=0.3).eval()
    model = CachedShiftedOutput(model) if shift else model
    prompts = prompts_of(tokenizer, BATCH)
    run = lambda model, **extra: G.generate(model, prompts, tokenizer.mask_token_id,
                                            G.SamplerConfig(**cfg, **extra), shift_logits=shift,
                                            pad_id=tokenizer.pad_token_id)
    recorder = Recorder(model)
    recorder.config = model.config
    assert torch.equal(run(recorder, prefix_cache=True), run(model))
    P, widths = max(map(len, prompts)), [c.shape[1] for c in recorder.calls]  # (B, T): T per forward
    block, T = cfg["block_length"], P + 16
    starts = {P + b * block - shift for b in range(16 // block)}  # the columns a cached forward starts at
    assert widths[0] == T and set(widths) <= {T} | {T - s for s in starts}
    assert widths.count(T) == 16 // block  # one full forward per block, the rest cached
    if "threshold" in cfg:
        assert len(widths) < 16  # some steps committed several tokens


@pytest.mark.parametrize("kwargs,match", [
    (dict(threshold=0.0), r"--threshold 0.0: must be a probability in \(0, 1\]"),
    (dict(threshold=1.5), r"--threshold 1.5: must be a probability"),
    (dict(threshold=float("nan")), r"--threshold nan: must be a probability"),
    (dict(threshold=0.9, steps=8), "--steps 8 with --threshold 0.9: a threshold decides"),
    (dict(threshold=0.9, remasking="random"), "--threshold 0.9 with --remasking random"),
])
def test_bad_threshold(kwargs, match):
    with pytest.raises(ValueError, match=match):
        G.SamplerConfig(gen_length=8, block_length=4, **kwargs)


def test_prefix_cache_refused_where_the_model_takes_no_cache(peaky, tokenizer):
    """LLaDA's and Dream's published forwards take or return no keys/values: one line, before
    any forward."""
    recorder = Recorder(peaky)
    recorder.config = SimpleNamespace(model_type="llada")
    with pytest.raises(ValueError, match=r"^--prefix-cache: a llada model cannot reuse keys/values .* drop "
                                         r"--prefix-cache$"):
        G.generate(recorder, [[1, 2]], tokenizer.mask_token_id, G.SamplerConfig(8, 4, prefix_cache=True))
    assert recorder.calls == []

# -----------------------------------------------------------------------------
# The command line

CLI_SAMPLER = ["--gen-length", "16", "--block-length", "8", "--steps", "16"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny model (128 positions) with large weights, as train.py's final/ folder."""
    path = tmp_path_factory.mktemp("model")
    torch.manual_seed(1)
    backbone = backbones.new_tiny_backbone(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, max_position_embeddings=128,
                                           initializer_range=0.3)
    backbone.model.save_pretrained(path)
    backbone.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    return backbones.load_backbone(str(model_dir))


def expected_answers(backbone, message_lists, cfg, batch_size=8, seed=0):
    ids = [data.prompt_ids(backbone.tokenizer, m) for m in message_lists]
    return G.generate_text(backbone, ids, cfg, batch_size, seed)


def user(text, system=None):
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def cli(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr) as the shell would see them."""
    try:
        command.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    if isinstance(code, str):  # SystemExit("error: ...") prints it and exits 1
        code, err = 1, err + code + "\n"
    return code, out, err


@pytest.mark.parametrize("flags,system", [
    ([], None),
    (["--temperature", "1.0", "--remasking", "random", "--seed", "3", "--batch-size", "1"], None),
    (["--suppress-eos", "--batch-size", "2"], "be brief"),
])
def test_cli_prints_generate_texts_answers(model_dir, loaded, capsys, flags, system):
    texts = ["reverse abc", "hello there", "add 1 2"]
    argv = ["--model", model_dir, *CLI_SAMPLER, *flags] + [a for t in texts for a in ("--prompt", t)]
    argv += ["--system", system] if system else []
    code, out, err = cli(argv, capsys)
    assert code == 0, err
    cfg = G.SamplerConfig(16, 8, 16, temperature=1.0 if "--temperature" in flags else 0.0,
                          remasking="random" if "random" in flags else "low_confidence",
                          suppress_eos="--suppress-eos" in flags)
    batch = int(flags[flags.index("--batch-size") + 1]) if "--batch-size" in flags else 8
    seed = 3 if "--seed" in flags else 0
    answers = expected_answers(loaded, [user(t, system) for t in texts], cfg, batch, seed)
    assert out == "".join(a + "\n" for a in answers)
    code, out, _ = cli(argv + ["--jsonl"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["answer"] for r in rows] == answers
    assert [(r["source"], r["prompt"]) for r in rows] == [(f"--prompt {i}", t) for i, t in enumerate(texts, 1)]


def frames_of(out):
    return [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("[1] step ")]


def test_show_draws_each_committing_step(model_dir, loaded, capsys):
    """16 masks, 2 blocks, 16 steps: each step commits one token (more steps than masks are
    refused: they would commit nothing). With EOS suppressed every mask is visible: 15, ..., 0."""
    argv = ["--model", model_dir, "--prompt", "sort dcba", "--gen-length", "16", "--block-length", "8",
            "--steps", "16", "--suppress-eos", "--show"]
    code, out, err = cli(argv, capsys)
    assert code == 0, err
    frames = frames_of(out)
    [answer] = expected_answers(loaded, [user("sort dcba")], G.SamplerConfig(16, 8, 16, suppress_eos=True))
    assert len(frames) == 16
    assert [f.count("░") for f in frames] == list(range(15, -1, -1))
    assert out.splitlines()[:16] == [f"[1] step {n}: {f}" for n, f in enumerate(frames, 1)]
    assert frames[-1] == command.visible(answer)
    assert out.endswith(answer + "\n")


def test_show_and_no_progress_hide_the_loading_bar(model_dir):
    """The real entry point: with --show the frames are all there is, on a terminal's two streams
    (transformers' "Loading weights" bar, which a plain run prints on stderr, would come first);
    --no-progress leaves the answers alone on stdout and nothing on stderr."""
    def run(*flags):
        done = subprocess.run([sys.executable, "-m", "scripts.generate", "--model", str(model_dir), "--prompt", "hi",
                               *CLI_SAMPLER, *flags], capture_output=True, text=True, timeout=300,
                              cwd=Path(G.__file__).parent.parent, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr
        return done.stdout, done.stderr
    _, plain_err = run()
    assert "Loading weights" in plain_err  # the bar --show must hide
    out, err = run("--show")
    assert err == "" and out.startswith("[1] step 1: ") and len(frames_of(out)) == 16
    out, err = run("--no-progress", "--jsonl")  # one JSON line (an untrained model's answer may hold newlines)
    assert err == "" and json.loads(out)["source"] == "--prompt 1"


def test_show_and_answers_with_threshold_and_prefix_cache(model_dir, loaded, capsys):
    """--threshold and --prefix-cache on the command line: the answers are generate_text's with
    both set, and --show draws one frame per step of the batch, fewer than the 16 masks (the
    first prompt's canvas waits, unchanged, while another row still fills its block)."""
    texts = ["sort dcba", "reverse abc", "hello there"]
    argv = ["--model", model_dir, "--gen-length", "16", "--block-length", "8", "--threshold", "0.1",
            "--prefix-cache", "--suppress-eos"] + [a for t in texts for a in ("--prompt", t)]
    cfg = G.SamplerConfig(16, 8, threshold=0.1, prefix_cache=True, suppress_eos=True)
    answers = expected_answers(loaded, [user(t) for t in texts], cfg)
    code, out, err = cli(argv, capsys)
    assert code == 0, err
    assert out == "".join(a + "\n" for a in answers)
    code, out, err = cli(argv + ["--show"], capsys)
    masks = [f.count("░") for f in frames_of(out)]
    assert code == 0 and masks[-1] == 0 and len(masks) < 16, err
    assert all(a >= b for a, b in zip(masks, masks[1:])) and any(a - b > 1 for a, b in zip(masks, masks[1:]))
    assert out.endswith("".join(a + "\n" for a in answers))


def test_show_with_eos_and_a_batch(model_dir, loaded, capsys):
    """EOS allowed: a committed EOS is drawn as $ until the last frame, so every mask left is
    shown (16 steps commit one of the 16 each); every prompt of the batch has a line per step,
    and its last frame is its answer."""
    texts = ["reverse abc", "hello there"]
    code, out, err = cli(["--model", model_dir, *CLI_SAMPLER, "--show", "--prompt", texts[0],
                          "--prompt", texts[1]], capsys)
    assert code == 0, err
    answers = expected_answers(loaded, [user(t) for t in texts], G.SamplerConfig(16, 8, 16))
    for i, answer in enumerate(answers, 1):
        frames = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith(f"[{i}] step ")]
        assert len(frames) == 16
        masks = [f.count("░") for f in frames]
        assert masks == list(range(15, -1, -1))  # one token a step: no mask vanishes behind an EOS
        assert frames[-1] == command.visible(answer)


class Terminal:
    """A stream that says it is a terminal and records what is written."""
    encoding = "utf-8"

    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_show_redraws_in_place_on_a_terminal(loaded, monkeypatch):
    """On a terminal each frame moves the cursor back over the previous one (counting wrapped
    rows) and erases it; a new batch starts below the last."""
    monkeypatch.setattr(command.shutil, "get_terminal_size", lambda: SimpleNamespace(columns=10))
    screen, frames = Terminal(), []
    show = command.Show(loaded, screen)
    def hook(first, canvases):
        frames.append(first)
        show(first, canvases)
    ids = [data.prompt_ids(loaded.tokenizer, user(t)) for t in ["a", "b", "c"]]
    G.generate_text(loaded, ids, G.SamplerConfig(8, 8, 8, suppress_eos=True), batch_size=2, on_step=hook)
    assert frames == [0] * 8 + [2] * 8
    # "[1] step 1: " + 8 cells > 10 columns: 2 rows per line, 2 lines in the first batch's frame
    # ("[1] step 8: " is 12 columns and the answer may be wider: at least 2 rows each)
    redraws = [int(n) for n in re.findall(r"\x1b\[(\d+)F\x1b\[J", screen.text)]
    assert len(redraws) == 7 + 7 and all(n >= 4 for n in redraws[:7]) and all(n >= 2 for n in redraws[7:])
    assert redraws[0] == 4 and redraws[7] == 2
    last = screen.text.rsplit("\x1b[J", 1)[1]
    assert last.startswith("[3] step 8: ") and "░" not in last


def test_render_canvas_draws_eos_until_the_last_frame_which_cuts_at_the_first_stop(tokenizer):
    ids = tokenizer("ab")["input_ids"]
    mask, eos = tokenizer.mask_token_id, tokenizer.eos_token_id
    canvas = ids + [mask, mask] + tokenizer("\nc")["input_ids"] + [eos, mask, eos]
    assert command.render_canvas(tokenizer, canvas, mask, {eos}, "_") == "ab__\\nc$_$"  # one line, EOS as $
    done = ids + tokenizer("\nc")["input_ids"] + [eos, eos] + ids
    assert command.render_canvas(tokenizer, done, mask, {eos}, "_") == "ab\\nc"  # the answer


def test_prompt_file_formats(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_bytes(b"first question\r\n\n  \nsecond {\"not\": json}\n")
    assert [(p.messages, p.where) for p in command.read_prompts(txt)] == [
        (user("first question"), f"{txt}:1"), (user('second {"not": json}'), f"{txt}:4")]
    rows = [{"prompt": "p"}, {"question": "q", "answer": "a"}, "s",
            {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "m"},
                          {"role": "assistant", "content": "the reference, dropped"}]}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:]))
    expected = [user("p"), user("q"), user("s"), user("m", "sys")]
    got = command.read_prompts(jsonl)
    assert [p.messages for p in got] == expected
    assert [p.where for p in got] == [f"{jsonl}:{n}" for n in (1, 2, 4, 5)]
    js = tmp_path / "p.json"
    js.write_text(json.dumps(rows))
    assert [p.messages for p in command.read_prompts(js)] == expected


def test_cli_prompts_file_and_system(model_dir, loaded, capsys, tmp_path):
    """--prompt comes first, then the file's prompts in order; --system goes before each
    prompt that has no system message of its own; batches of 2."""
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "add 1 2"}) + "\n"
                    + json.dumps({"messages": [{"role": "system", "content": "own"},
                                               {"role": "user", "content": "sort cba"}]}) + "\n"
                    + json.dumps({"prompt": "reverse xyz"}) + "\n")
    code, out, err = cli(["--model", model_dir, *CLI_SAMPLER, "--prompt", "hi", "--prompts-file", path,
                          "--system", "terse", "--batch-size", "2", "--jsonl"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    messages = [user("hi", "terse"), user("add 1 2", "terse"), user("sort cba", "own"), user("reverse xyz", "terse")]
    assert [r["answer"] for r in rows] == expected_answers(loaded, messages, G.SamplerConfig(16, 8, 16), 2)
    assert [r["source"] for r in rows] == ["--prompt 1", f"{path}:1", f"{path}:2", f"{path}:3"]


BAD_FILES = {
    "empty.txt": b"",
    "blank.txt": b"\n  \n",
    "bad.jsonl": b'{"prompt": "ok"}\n{"prompt": oops}\n',
    "fields.jsonl": b'{"prompt": "ok"}\n{"text": "no"}\n',
    "number.jsonl": b'{"prompt": 3}\n',
    "answer_only.jsonl": b'{"messages": [{"role": "assistant", "content": "a"}]}\n',
    "blank.jsonl": b'{"prompt": "  "}\n',
    "latin1.txt": b"ok\ncaf\xe9\n",
    "dict.json": b'{"prompt": "not a list"}',
    "long.txt": b"ok\n" + b"x" * 120 + b"\n",
    "badcfg/config.json": b'{"model_type": "nonsense"}',
}


@pytest.mark.parametrize("argv,code,message", [
    ([], 2, "give --prompt TEXT (repeatable) or --prompts-file FILE"),
    (["--prompt", "ok", "--prompt", " "], 2, "--prompt 2 is blank"),
    (["--prompt", "ok", "--system", ""], 2, "--system is blank"),
    (["--prompt", "ok", "--batch-size", "0"], 2, "--batch-size 0: must be >= 1"),
    (["--prompt", "ok", "--steps", "0"], 2, "--steps 0: must lie in [1, "),
    (["--prompt", "ok", "--gen-length", "12", "--block-length", "8"], 2,
     "--gen-length 12 is not a multiple of --block-length 8"),
    (["--prompt", "ok", "--remasking", "best"], 2, "argument --remasking: invalid choice"),
    (["--prompt", "ok", "--gen-length", "oops"], 2, "argument --gen-length: invalid int value"),
    (["--prompt", "ok"], 2, "--gen-length 128 leaves no room for a prompt in the model's 128 positions"),
    (["--prompt", "x" * 120, *CLI_SAMPLER], 2, "--prompt 1: the prompt is 122 tokens and --gen-length 16 more"),
    (["--prompts-file", "{tmp}/none.txt", *CLI_SAMPLER], 1, "--prompts-file {tmp}/none.txt: no such file"),
    (["--prompts-file", "{tmp}/empty.txt", *CLI_SAMPLER], 1, "--prompts-file {tmp}/empty.txt: holds no prompts"),
    (["--prompts-file", "{tmp}/blank.txt", *CLI_SAMPLER], 1, "--prompts-file {tmp}/blank.txt: holds no prompts"),
    (["--prompts-file", "{tmp}/bad.jsonl", *CLI_SAMPLER], 1, "{tmp}/bad.jsonl:2: invalid JSON"),
    (["--prompts-file", "{tmp}/fields.jsonl", *CLI_SAMPLER], 1,
     "{tmp}/fields.jsonl:2: no 'prompt', 'question' or 'messages' field (found ['text'])"),
    (["--prompts-file", "{tmp}/number.jsonl", *CLI_SAMPLER], 1, "{tmp}/number.jsonl:1: 'prompt' must be a string"),
    (["--prompts-file", "{tmp}/answer_only.jsonl", *CLI_SAMPLER], 1, "answer_only.jsonl:1: 'messages' holds only"),
    (["--prompts-file", "{tmp}/blank.jsonl", *CLI_SAMPLER], 1, "{tmp}/blank.jsonl:1: the prompt is blank"),
    (["--prompts-file", "{tmp}/latin1.txt", *CLI_SAMPLER], 1, "{tmp}/latin1.txt: not UTF-8 text at line 2"),
    (["--prompts-file", "{tmp}/dict.json", *CLI_SAMPLER], 1, "{tmp}/dict.json: a .json file must hold a list"),
    (["--prompts-file", "{tmp}/long.txt", *CLI_SAMPLER], 1, "{tmp}/long.txt:2: the prompt is 122 tokens"),
    (["--model", "{tmp}/missing", "--prompt", "ok"], 1, "--model {tmp}/missing: no such folder"),
    (["--model", "{tmp}", "--prompt", "ok"], 1, "--model {tmp}: no config.json in the folder"),
    (["--model", "{tmp}/badcfg", "--prompt", "ok"], 1, "--model {tmp}/badcfg: cannot read its config"),
])
def test_bad_input_is_one_error_line(model_dir, capsys, tmp_path, argv, code, message):
    for name, content in BAD_FILES.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(content)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--model" not in argv:
        argv = ["--model", model_dir] + argv
    got, out, err = cli(argv, capsys)
    *before, last = err.strip().splitlines()
    assert (got, out) == (code, "")
    assert last.startswith("error: ") and message.replace("{tmp}", str(tmp_path)) in last, last
    assert all(line.startswith("Loading weights") for line in before), before  # progress, if any


@pytest.mark.parametrize("flags, message", [
    (["--threshold", "0"], "--threshold 0.0: must be a probability in (0, 1], e.g. 0.9"),
    (["--threshold", "0.9", "--steps", "4"], "--steps 4 with --threshold 0.9: a threshold decides how many tokens"),
    (["--threshold", "0.9", "--remasking", "random"], "--threshold 0.9 with --remasking random: the threshold"),
])
def test_sampler_flags_that_need_no_canvas_are_refused_before_the_weights_load(model_dir, tmp_path, capsys,
                                                                                monkeypatch, flags, message):
    """A train.py model's canvas is settled once the prompts are tokenised, after loading; the
    checks that do not depend on it come first (before: after loading, under the loading bar)."""
    trained = tmp_path / "final"
    shutil.copytree(model_dir, trained)
    (trained / "training_config.json").write_text(json.dumps({"args": {"seq_len": 64}}))
    monkeypatch.setattr(backbones, "load_backbone", lambda *a, **k: pytest.fail("the weights were loaded"))
    code, out, err = cli(["--model", trained, "--prompt", "ok", *flags], capsys)
    assert (code, out) == (2, "") and err.strip().startswith(f"error: {message}") and "\n" not in err.strip(), err


def test_script_error_is_one_line_and_status_1(model_dir, tmp_path):
    """The real entry point (one subprocess: in-process calls cover the rest): a bad file is
    exactly one line on stderr, nothing on stdout, exit status 1."""
    bad = subprocess.run([sys.executable, "-m", "scripts.generate", "--model", str(model_dir), "--prompts-file",
                          str(tmp_path / "none.jsonl")], capture_output=True, text=True,
                         cwd=Path(G.__file__).parent.parent, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert (bad.returncode, bad.stdout, bad.stderr) == (1, "", f"error: --prompts-file {tmp_path}/none.jsonl: no such file\n")
