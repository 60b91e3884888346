"""
Training loop, data handling and checkpoints, on a very small tiny model (CPU, offline).

    python -m pytest tests/test_train.py -q
"""

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import AutoModel, AutoTokenizer

import data
import tiny_model
import train

SMALL = ["--tiny-width", "32", "--tiny-layers", "2", "--batch-size", "8", "--seq-len", "32",
         "--builtin-size", "400", "--no-progress"]


def run(tmp_path, name, *flags):
    out = tmp_path / name
    final = train.main(SMALL + ["--out", str(out), *flags])
    return out, final


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def checkpoint_state(path, tmp_path):
    dcp_to_torch_save(str(path), str(tmp_path / "consolidated.pt"))
    return torch.load(tmp_path / "consolidated.pt", weights_only=False)


def test_short_run_lowers_heldout_loss(tmp_path):
    out, final = run(tmp_path, "run", "--steps", "60", "--lr", "3e-3", "--warmup-steps", "5",
                     "--eval-every", "60", "--save-every", "60")
    evals = [row["held_out"] for row in read_log(out) if "held_out" in row]
    assert len(evals) == 2
    assert evals[-1]["diffusion"] < 0.75 * evals[0]["diffusion"], evals
    steps = [row for row in read_log(out) if "loss" in row]
    assert [row["step"] for row in steps] == list(range(1, 61))
    assert all(row["jepa"] > 0 for row in steps)  # the JEPA term is live in dllm-jepa
    assert (final / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["objective"]["method"] == "dllm-jepa"


def test_resume_is_bitwise_exact(tmp_path):
    """6 uninterrupted steps == 3 steps, (lost progress), resume from step 3, 3 more steps."""
    flags = ["--steps", "6", "--eval-every", "100", "--save-every", "3"]
    _, straight = run(tmp_path, "straight", *flags)
    out, _ = run(tmp_path, "resumed", *flags)
    step6 = checkpoint_state(out / "checkpoints" / "step_00000006", tmp_path)
    for lost in (out / "checkpoints" / "step_00000006", out / "final"):
        for f in sorted(lost.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        lost.rmdir()
    _, resumed = run(tmp_path, "resumed", *flags, "--resume", "auto")
    a, b = AutoModel.from_pretrained(straight), AutoModel.from_pretrained(resumed)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    again = checkpoint_state(out / "checkpoints" / "step_00000006", tmp_path)
    for key, value in step6["model"].items():  # EMA target and predictor too
        assert torch.equal(value, again["model"][key]), key


def test_export_round_trip_matches_checkpoint(tmp_path):
    out, final = run(tmp_path, "run", "--steps", "2", "--eval-every", "100", "--save-every", "100")
    model = AutoModel.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.mask_token_id == model.config.mask_token_id
    state = checkpoint_state(out / "checkpoints" / "step_00000002", tmp_path)["model"]
    for name, p in model.named_parameters():
        assert torch.equal(p, state["backbone." + name]), name
    assert set(state) >= {k for k in state if k.startswith("target_encoder.")} != set()
    json.loads((final / "training_config.json").read_text())


def test_checkpoints_keep_last_n_and_leave_no_tmp(tmp_path):
    out, _ = run(tmp_path, "run", "--steps", "4", "--eval-every", "100", "--save-every", "1", "--keep", "2")
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_00000003", "step_00000004"]


@pytest.mark.parametrize("method", ["diffusion", "two-pass", "l2-anchor"])
def test_every_method_trains(tmp_path, method):
    out, _ = run(tmp_path, method, "--method", method, "--steps", "3", "--eval-every", "100",
                 "--save-every", "100")
    steps = [row for row in read_log(out) if "loss" in row]
    assert len(steps) == 3 and all(torch.isfinite(torch.tensor(row["loss"])) for row in steps)
    if method != "two-pass":
        assert all(row["jepa"] == 0 for row in steps)


# -----------------------------------------------------------------------------
# Bad flags and bad data: one clear line, naming the flag / file and line


@pytest.mark.parametrize("flags, message", [
    (["--context-t", "0.5", "0.2"], "--context-t"),
    (["--target-t", "0.0", "0.5"], "--target-t"),
    (["--jepa-lambda", "-1"], "--jepa-lambda"),
    (["--method", "two-pass", "--target", "online"], "--target"),
    (["--steps", "0"], "--steps"),
    (["--eval-fraction", "1.5"], "--eval-fraction"),
    (["--method", "magic"], "--method"),
])
def test_bad_flags_name_the_flag(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(SMALL + ["--out", str(tmp_path)] + flags)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ('{"question": "q", "answer": "a"}\nnot json\n', "bad.jsonl:2: invalid JSON"),
    ('{"question": "q"}\n', "bad.jsonl:1: no usable fields"),
    ('{"question": 3, "answer": "a"}\n', "bad.jsonl:1: fields 'question' and 'answer' must be strings"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]}\n',
     "bad.jsonl:1: the last message must have role 'assistant'"),
    ('{"messages": "hello"}\n', "bad.jsonl:1: 'messages' must be a list"),
    ("[1, 2]\n", "bad.jsonl:1: expected a JSON object"),
    ("\n\n", "bad.jsonl: holds no examples"),
])
def test_bad_rows_are_reported_with_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        data.read_examples(path)


def test_bad_data_file_stops_train_with_one_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"question": "caf\xe9", "answer": "a"}\n')  # Latin-1, not UTF-8
    with pytest.raises(SystemExit, match="bad.jsonl: not UTF-8"):
        train.main(SMALL + ["--out", str(tmp_path / "out"), "--data", str(path)])
    with pytest.raises(SystemExit, match="no such file"):
        train.main(SMALL + ["--out", str(tmp_path / "out"), "--data", str(tmp_path / "missing.jsonl")])


def test_accepted_row_shapes(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a"}]},
            {"prompt": "p", "answer": "a"}, {"question": "q", "answer": "a"},
            {"prompt": "p", "completion": "c"}]
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(rows))
    examples = data.read_examples(path)
    assert [len(e.prompt) for e in examples] == [2, 1, 1, 1]
    assert [e.answer for e in examples] == ["a", "a", "a", "c"]


# -----------------------------------------------------------------------------
# Tokenisation and batches


def test_rows_are_prompt_answer_eos_padding():
    tok = tiny_model.make_tokenizer()
    ex = data.Example([{"role": "user", "content": "add 1 2"}], "3")
    rows = data.tokenize_examples([ex], tok, 24)
    prompt = data.prompt_ids(tok, ex.prompt)
    P, A = rows.prompt_lengths[0].item(), rows.answer_lengths[0].item()
    assert P == len(prompt) and A == 2  # "3" then EOS
    ids = rows.input_ids[0].tolist()
    assert ids[:P] == prompt and ids[P] == ord("3")
    assert ids[P + 1:] == [tok.eos_token_id] * (24 - P - 1)


def test_truncation_never_drops_the_answer():
    tok = tiny_model.make_tokenizer()
    long_prompt = data.Example([{"role": "user", "content": "x" * 200}], "answer")
    long_answer = data.Example([{"role": "user", "content": "q"}], "y" * 200)
    rows = data.tokenize_examples([long_prompt, long_answer], tok, 32)
    assert rows.truncated == 2
    assert rows.answer_lengths.tolist()[0] == 7  # "answer" + EOS kept whole
    assert rows.answer_lengths.tolist()[1] == 32 - rows.prompt_lengths.tolist()[1]
    assert (rows.prompt_lengths + rows.answer_lengths <= 32).all()
    assert tok.decode(rows.input_ids[0, rows.prompt_lengths[0] - 1:rows.prompt_lengths[0]]) == "<|assistant|>"


def test_each_epoch_visits_every_row_once():
    seen = torch.cat([data.batch_rows(step, 10, 5, seed=3) for step in range(4)])
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])  # a fresh permutation per epoch
    assert torch.equal(data.batch_rows(2, 10, 5, seed=3), data.batch_rows(2, 10, 5, seed=3))


def test_plain_text_rows(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("abcdefgh" * 10)
    rows = data.tokenize_text(path, tiny_model.make_tokenizer(), 16)
    assert rows.input_ids.shape == (5, 16)
    assert rows.prompt_lengths.tolist() == [1] * 5 and rows.answer_lengths.tolist() == [15] * 5
    with pytest.raises(ValueError, match="fewer than one row"):
        data.tokenize_text(path, tiny_model.make_tokenizer(), 100)
