"""
What a fine-tuned model can do, not only its loss: canvas lengths that match generation, the
loss and accuracy on real answer tokens, the collapse check, and an end-to-end run that must
answer what it was trained on.

    python -m pytest tests/test_task_accuracy.py -q
"""

import json
import math
import random

import pytest
import torch

import dllm_jepa as dj
import train
from dlm import data
from dlm.flags import parse_args
from scripts import evaluate, generate
from tasks.common import Item
from tasks.generation import canvas_for

# -----------------------------------------------------------------------------
# Canvas lengths


def test_canvas_length_by_mode():
    prompts, answers = torch.tensor([5, 7, 3]), torch.tensor([4, 9, 2])  # longest row: 7 + 9 = 16
    rng = random.Random(0)
    assert data.canvas_length(prompts, answers, 40, "fixed", rng) == 40
    assert data.canvas_length(prompts, answers, 40, "batch", rng) == 16
    drawn = {data.canvas_length(prompts, answers, 40, "random", random.Random(i)) for i in range(400)}
    assert drawn == set(range(16, 41))  # every length from the longest row to --seq-len, none outside


def test_micro_batch_canvas_is_a_pure_function_of_seed_step_and_shard(tokenizer):
    examples = data.builtin_task(64, seed=0)
    rows = data.tokenize_examples(examples, tokenizer, 40)
    args = parse_args(["--seq-len", "40"])[1]
    idx = torch.arange(16)
    lengths = lambda step, shard: train.micro_batch(rows, idx, args, step, shard, "cpu")[0].shape[1]
    args.seed = 3
    first = [lengths(step, shard) for step in range(20) for shard in range(2)]
    assert first == [lengths(step, shard) for step in range(20) for shard in range(2)]  # resume: same canvases
    assert len(set(first)) > 3  # and they do vary
    longest = int((rows.prompt_lengths[idx] + rows.answer_lengths[idx]).max())
    assert min(first) >= longest and max(first) <= 40
    ids, prompt_lengths, answer_lengths = train.micro_batch(rows, idx, args, 5, 1, "cpu")
    assert torch.equal(ids, rows.input_ids[idx, :ids.shape[1]])  # cut, never reordered or re-padded
    args.seed = 4
    assert [lengths(step, 0) for step in range(20)] != first[::2]  # another seed, other canvases


# -----------------------------------------------------------------------------
# Answer-token loss and accuracy, by hand


def test_answer_metrics_exclude_padding_and_count_argmax_hits():
    # one row: prompt (pos 0), answer tokens at 1, 2 (then EOS at 3 counts as answer), padding at 4, 5
    ids = torch.tensor([[9, 1, 2, 7, 7, 7]])
    answer = torch.tensor([[False, True, True, True, False, False]])
    masked = torch.tensor([[False, True, True, False, True, True]])  # two answer tokens, two pads
    logits = torch.full((1, 6, 10), -30.0)
    logits[0, 1, 1] = 0.0          # right, confident
    logits[0, 2, 5] = 0.0          # wrong: argmax 5, and token 2 has logit -30
    logits[0, 4:, 7] = 0.0         # padding right, but it must not count
    p = torch.tensor([0.5])
    loss, accuracy = dj.answer_metrics(logits, ids, masked, p, answer)
    ce = lambda row: -torch.log_softmax(row, -1)
    expected = (ce(logits[0, 1])[1] + ce(logits[0, 2])[2]) / 0.5 / 3  # / p, / the row's 3 answer tokens
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert accuracy.item() == 0.5


def test_answer_metrics_read_shifted_logits():
    ids = torch.tensor([[9, 1, 2]])
    answer = torch.tensor([[False, True, True]])
    masked = answer.clone()
    logits = torch.full((1, 3, 10), -30.0)
    logits[0, 0, 1] = 0.0  # output 0 predicts token 1
    logits[0, 1, 2] = 0.0  # output 1 predicts token 2
    _, accuracy = dj.answer_metrics(logits, ids, masked, torch.tensor([1.0]), answer, shift=True)
    assert accuracy.item() == 1.0
    _, unshifted = dj.answer_metrics(logits, ids, masked, torch.tensor([1.0]), answer, shift=False)
    assert unshifted.item() == 0.0


# -----------------------------------------------------------------------------
# Effective rank on hand-made embeddings


def test_effective_rank_by_hand():
    line = torch.randn(1, 16, dtype=torch.float64) * torch.linspace(1, 3, 50, dtype=torch.float64)[:, None]
    assert dj.effective_rank(line) == pytest.approx(1.0, abs=1e-9)
    basis = torch.eye(16)[:5] * 3.0  # 5 orthogonal directions, equal length
    assert dj.effective_rank(basis) == pytest.approx(5.0, rel=1e-9)
    # singular values 3 and 1 -> p = (3/4, 1/4), rank = exp(-(3/4 ln 3/4 + 1/4 ln 1/4))
    two = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert dj.effective_rank(two) == pytest.approx(expected, rel=1e-9)
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    assert dj.effective_rank(two.double() @ rotation) == pytest.approx(expected, rel=1e-9)  # basis-free


def test_model_output_carries_the_pooled_embedding_for_every_method(make_model, tokenizer):
    rows = data.tokenize_examples(data.builtin_task(4, seed=0), tokenizer, 32)
    for method in dj.METHODS:
        model = dj.DLLMJEPA(make_model(), dj.JEPAConfig(method=method), tokenizer.mask_token_id)
        out = model(rows.input_ids, rows.prompt_lengths, rows.answer_lengths,
                    generator=torch.Generator().manual_seed(0))
        assert out.embedding.shape == (4, 32) and not out.embedding.requires_grad
        # it is the layer-normalised mean over the answer tokens (default pooling)
        assert torch.allclose(out.embedding.mean(-1), torch.zeros(4), atol=1e-5)


# -----------------------------------------------------------------------------
# End to end: train -> export -> generate -> score


def test_a_short_run_answers_what_it_was_trained_on(tmp_path, tokenizer):
    """A tiny model fine-tuned for a few hundred steps on 12 rows must generate those rows'
    answers, through train.py's own final generation (the canvas it trains on) and again
    through evaluate.py on the exported model, which must find the same canvas by itself.
    Anything on which training and generation disagree (the chat template, the mask id, EOS,
    the canvas, the tokenizer saved with the export) makes it fail."""
    rows = [{"prompt": f"copy {w}", "answer": w} for w in
            ("cab", "bead", "fig", "hide", "jam", "kale", "lid", "mode", "nib", "oak", "pie", "ride")]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--data", str(path), "--eval-data", str(path), "--method", "diffusion", "--tiny-width", "64",
              "--tiny-layers", "2", "--batch-size", "12", "--seq-len", "24", "--steps", "300", "--lr", "3e-3",
              "--eval-every", "300", "--save-every", "300", "--final-eval", "12", "--no-progress"]
    final = train.main(common + ["--out", str(tmp_path / "run")])
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    generated = next(row["final_eval"] for row in log if "final_eval" in row)
    assert generated["exact_match"] >= 11 / 12, generated
    result = evaluate.main(["--model", str(final), "--task", "exact", "--data", str(path)])
    assert result["exact_match"] == generated["exact_match"]
    longest_prompt = len(data.prompt_ids(tokenizer, [{"role": "user", "content": "copy bead"}]))
    assert result["sampler"]["gen_length"] == generated["gen_length"] == 24 - longest_prompt
    # scripts/generate.py's command line finds the trained canvas too (its own default would be 128 masks)
    right = [r["answer"] for r in rows]
    assert sum(a == b for a, b in zip(generate.main(["--model", str(final), "--prompts-file", str(path)]), right)) >= 11


def test_flat_loss_weight_drops_the_one_over_p(make_model, tokenizer):
    """One row: its LLaDA loss is the flat one divided by the row's p (same masks, same model)."""
    rows = data.tokenize_examples(data.builtin_task(1, seed=2), tokenizer, 32)
    model = make_model()
    losses = {}
    for weight in ("inverse-t", "flat"):
        net = dj.DLLMJEPA(model, dj.JEPAConfig(method="diffusion", loss_weight=weight), tokenizer.mask_token_id)
        losses[weight] = net(rows.input_ids, rows.prompt_lengths, rows.answer_lengths,
                             generator=torch.Generator().manual_seed(5)).diffusion.item()
    u = torch.rand(2, 1, generator=torch.Generator().manual_seed(5))  # sample_times' first draw
    low, high = dj.VIEW_PRESETS["wide-range"]["context_t"]
    p = dj.mask_probability(low + (high - low) * u[0, 0], 1e-3).item()
    assert losses["flat"] > 0
    assert losses["inverse-t"] == pytest.approx(losses["flat"] / p, rel=1e-5)
    with pytest.raises(ValueError, match="loss_weight"):
        dj.JEPAConfig(loss_weight="uniform")


def test_evaluation_canvas_defaults_to_the_trained_one_and_warns_past_it(capsys):
    from dlm.backbones import new_tiny_backbone
    backbone = new_tiny_backbone(hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    items = [Item([{"role": "user", "content": q}], "x") for q in ("copy ab", "copy abcdef")]
    longest = len(data.prompt_ids(backbone.tokenizer, items[1].prompt))
    sampler = canvas_for(backbone, items, {"gen_length": None, "block_length": None}, 30)
    assert (sampler.gen_length, sampler.block_length, sampler.steps) == (30 - longest,) * 3
    assert capsys.readouterr().err == ""
    canvas_for(backbone, items, {"gen_length": 30 - longest, "block_length": 30 - longest}, 30)
    assert capsys.readouterr().err == ""  # exactly the trained canvas: no warning
    canvas_for(backbone, items, {"gen_length": 31 - longest, "block_length": 31 - longest}, 30)
    assert "past the longest canvas the model was trained on (30)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="fills the model's trained canvas"):
        canvas_for(backbone, items, {"gen_length": None, "block_length": None}, longest)


def test_the_closing_answers_are_the_exported_models(tmp_path):
    """A bf16 export rounds every weight: train.py's closing exact match and final_eval.jsonl
    must be what evaluate.py gives on final/ as saved, answer for answer, not what the fp32
    weights in memory would give. Two steps leave the logits nearly tied, so the rounding
    changes answers (the fp32 model in memory answers differently: this fails without the fix)."""
    words = ["cab", "bead", "fig", "hide", "jam", "kale", "lid", "mode", "nib", "oak", "pie", "ride",
             "sun", "tap", "urn", "vat", "wax", "yak", "zoo", "elm"]
    rows = [{"prompt": f"copy {w}", "answer": w} for w in words]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = train.main(["--data", str(path), "--eval-data", str(path), "--method", "diffusion", "--tiny-width", "64",
                        "--tiny-layers", "2", "--batch-size", "20", "--seq-len", "24", "--steps", "2", "--lr", "1e-4",
                        "--eval-every", "2", "--save-every", "2", "--final-eval", "20", "--no-progress",
                        "--export-dtype", "bfloat16", "--out", str(tmp_path / "run")])
    closing = [json.loads(line) for line in (tmp_path / "run" / "final_eval.jsonl").read_text().splitlines()]
    result = evaluate.main(["--model", str(final), "--task", "exact", "--data", str(path)])
    assert [a["prediction"] for a in result["answers"]] == [c["answer"] for c in closing]
