"""
Bring your own data: the formats read, lengths from the data, --epochs, the held-out set and
the answers at the end, --report-to. Every file is built here, in a tmp folder.

    python -m pytest tests/test_user_data.py -q
"""

import json
import math
import sys
import types

import pandas as pd
import pytest
import torch

import tiny_model
import train
from dlm import data, hub, preflight, tracking
from dlm.flags import parse_args

SMALL = ["--tiny-width", "32", "--tiny-layers", "1", "--batch-size", "8", "--no-progress"]

# -----------------------------------------------------------------------------
# Formats: the same two examples in every shape and file type read


def ask(prompt):
    return [{"role": "user", "content": prompt}]


EXPECTED = [(ask("Reverse.\n\nabc"), "cba"), (ask("Say 007."), "007")]  # Alpaca: instruction, blank line, input
ALPACA = [{"instruction": "Reverse.", "input": "abc", "output": "cba"},
          {"instruction": "Say 007.", "input": "", "output": "007"}]


def write_rows(path, rows):
    """rows (a list of dicts) in the file type of path's suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
@pytest.mark.parametrize("shape", ["alpaca", "prompt-completion", "question-answer", "messages", "fields"])
def test_every_shape_reads_in_every_file_type(tmp_path, suffix, shape):
    if shape == "messages" and suffix == ".csv":
        pytest.skip("a CSV cell holds text, not a list of messages")
    rows = {"alpaca": ALPACA,
            "prompt-completion": [{"prompt": p[0]["content"], "completion": a} for p, a in EXPECTED],
            "question-answer": [{"question": p[0]["content"], "answer": a} for p, a in EXPECTED],
            "messages": [{"messages": p + [{"role": "assistant", "content": a}]} for p, a in EXPECTED],
            "fields": [{"src": p[0]["content"], "tgt": a, "id": i} for i, (p, a) in enumerate(EXPECTED)]}[shape]
    fields = ("src", "tgt") if shape == "fields" else None
    examples = data.read_examples(write_rows(tmp_path / f"d{suffix}", rows), fields)
    assert [(e.prompt, e.answer) for e in examples] == EXPECTED  # a CSV's "007" stays text


def test_a_row_that_fits_no_shape_is_one_line_naming_file_row_and_fields(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", ALPACA + [{"query": "q", "reply": "r"}])
    with pytest.raises(ValueError, match=r"d.jsonl:3: no usable fields \(found \['query', 'reply'\]\); give .*"
                                         r"--prompt-field and --answer-field"):
        data.read_examples(path)
    table = write_rows(tmp_path / "d.parquet", [{"query": "q", "reply": "r"}])
    with pytest.raises(ValueError, match=r"d.parquet row 1: no usable fields \(found \['query', 'reply'\]\)"):
        data.read_examples(table)
    with pytest.raises(ValueError, match=r"d.parquet row 1: .*--prompt-field 'query' and --answer-field 'answer'"):
        data.read_examples(table, ("query", "answer"))


def test_a_field_flag_alone_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--prompt-field", "query"])
    assert e.value.code == 2 and "--prompt-field and --answer-field: give both" in capsys.readouterr().err

# -----------------------------------------------------------------------------
# Lengths from the data; --epochs


def corpus(kind, longest=40, rows=100):
    """A hub.Corpus as read_corpus returns it: `rows` examples, the longest needing `longest` tokens."""
    if kind == "text":
        return hub.Corpus(hub.Source("t.txt", ids=list(range(rows * 32))), None, kind, 0, [])
    encoded = [([1] * 10, [2] * (longest - 10 if i == 0 else 5)) for i in range(rows)]
    return hub.Corpus(hub.Source("d", encoded, [None] * rows), None, kind, 0, [])


def settle(flags, kind="examples", positions=None, **shape):
    return train.settle(parse_args(flags)[1], "tiny-dlm", corpus(kind, **shape), positions)


def test_seq_len_is_the_longest_row_capped_at_the_models_positions_unless_given():
    assert settle([]).seq_len == 40
    assert settle([], positions=24).seq_len == 24
    assert settle(["--seq-len", "16"]).seq_len == 16
    assert settle([], "builtin").seq_len == 32 and settle([], "text").seq_len == 32


def test_a_seq_len_far_past_the_longest_row_is_warned_about():
    """Rows are padded with EOS to --seq-len: 10x the longest row means steps 10x (or more) as
    costly, which a user who typed --seq-len 100000 should hear before a step that takes minutes."""
    warned = lambda seq_len, given=True: [w for w in corpus("examples", longest=40).rows(seq_len, 0.1, 0, given)[3]
                                          if "the longest row of the data" in w]
    line, = warned(400)
    assert line.startswith("warning: --seq-len 400 is 10x the longest row of the data (40 tokens)") and \
        "--seq-len 40, which keeps every row whole" in line
    assert warned(160) == [] and warned(161) != []  # 4x the longest row is still quiet
    assert corpus("text").rows(400, 0.1, 0, True)[3] == []  # plain text is cut into rows, never padded


def test_epochs_set_the_steps_and_user_data_trains_one_epoch_by_default():
    # 100 rows, 5 held out (--eval-fraction 0.05): 95 training rows; a global batch of 8 x 2 = 16
    assert settle(["--batch-size", "8", "--grad-accum", "2"]).steps == math.ceil(95 / 16)
    assert settle(["--batch-size", "8", "--epochs", "2.5"]).steps == math.ceil(2.5 * 95 / 8)
    assert settle(["--batch-size", "8", "--steps", "7"]).steps == 7
    assert settle([], "builtin").steps == 2000 and settle([], "text").steps == 2000
    assert settle(["--batch-size", "8", "--epochs", "1"], "text").steps == math.ceil(95 / 8)  # 100 rows of 32
    with pytest.raises(SystemExit):
        parse_args(["--steps", "3", "--epochs", "1"])


def test_final_eval_is_on_for_user_data_by_default():
    assert (settle([]).final_eval, settle([], "builtin").final_eval, settle([], "text").final_eval) == (50, 200, 0)

# -----------------------------------------------------------------------------
# End to end: a small Alpaca file, no --seq-len, then one cut short


def alpaca_file(tmp_path, n=40):
    words = ["".join("abcdefgh"[int(d)] for d in oct(64 + i * 37)[2:]) for i in range(n)]  # distinct, 3-4 letters
    return write_rows(tmp_path / "alpaca.jsonl",
                      [{"instruction": "Reverse the word.", "input": w, "output": w[::-1]} for w in words])


def test_user_data_trains_whole_rows_and_answers_at_the_end(tmp_path, capsys):
    path = alpaca_file(tmp_path)
    longest = max(len(p) + len(a) for p, a in data.encode_examples(data.read_examples(path),
                                                                   tiny_model.make_tokenizer()))
    out = tmp_path / "run"
    train.main(SMALL + ["--data", str(path), "--out", str(out), "--eval-every", "100"])
    printed = capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())["args"]
    assert config["seq_len"] == longest and f"--seq-len {longest}: the longest row" in printed
    assert "cut" not in printed.replace("no row is cut", "")
    assert config["steps"] == math.ceil(38 / 8) and "--epochs 1: 5 steps of 8 rows" in printed  # 2 held out
    assert "warning: the held-out set has 2 distinct rows" in printed
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(row["held_out"]["embedding_rank"] <= 2 + 1e-4 for row in log if "held_out" in row)  # no copies
    answers = (out / "final_eval.jsonl").read_text().splitlines()
    assert len(answers) == 2 and "held-out exact match" in printed


def test_rows_cut_by_a_given_seq_len_are_counted_again_in_the_closing_lines(tmp_path, capsys):
    path = alpaca_file(tmp_path)
    lengths = [len(p) + len(a) for p, a in data.encode_examples(data.read_examples(path), tiny_model.make_tokenizer())]
    seq_len = max(lengths) - 1
    train.main(SMALL + ["--data", str(path), "--out", str(tmp_path / "run"), "--seq-len", str(seq_len),
                        "--steps", "1", "--final-eval", "0"])
    printed = capsys.readouterr().out.splitlines()
    done = next(i for i, line in enumerate(printed) if line.startswith("done: "))
    cut = [line for line in printed[done:] if "were cut" in line]
    assert len(cut) == 1 and cut[0].startswith(f"warning: {lengths.count(max(lengths))} rows were cut to "
                                               f"--seq-len {seq_len}")

# -----------------------------------------------------------------------------
# The held-out set


def test_a_held_out_set_of_few_distinct_rows_is_warned_about():
    rows = lambda ids: data.Tokenized(torch.tensor(ids), torch.ones(len(ids)), torch.ones(len(ids)))
    args = parse_args([])[1]
    few = preflight.held_out_warnings(rows([[1, 2], [1, 2], [3, 4]] * 20), args)  # 60 rows, 2 distinct
    assert len(few) == 1 and "held-out set has 2 distinct rows (fewer than 32)" in few[0]
    assert preflight.held_out_warnings(rows([[i, 0] for i in range(32)]), args) == []

# -----------------------------------------------------------------------------
# --report-to


def test_scalars_name_each_number_of_a_log_row_by_its_part():
    assert tracking.scalars({"step": 3, "loss": 1.5, "skipped": False, "lr": 1e-3}) == {
        "train/loss": 1.5, "train/skipped": 0.0, "train/lr": 1e-3}
    assert tracking.scalars({"step": 9, "final_eval": {"exact_match": 0.5, "n": 4, "skipped": "why"}}) == {
        "final_eval/exact_match": 0.5, "final_eval/n": 4.0}


def test_report_to_wandb_sends_log_rows_at_their_step(tmp_path, monkeypatch):
    sent = []
    run = types.SimpleNamespace(log=lambda values, step: sent.append((step, values)), finish=lambda: sent.append("end"))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kwargs: run))
    with tracking.Log(tmp_path, "wandb", {"args": {}}) as log:
        log.write({"step": 1, "loss": 2.0})
        log.write({"step": 100, "held_out": {"loss": 1.0}})
    assert sent == [(1, {"train/loss": 2.0}), (100, {"held_out/loss": 1.0}), "end"]
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2


def test_report_to_tensorboard_writes_the_same_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    with tracking.Log(tmp_path, "tensorboard") as log:
        log.write({"step": 1, "loss": 2.0})
        log.write({"step": 2, "loss": 1.5})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.0), (2, 1.5)]


def test_a_missing_tracker_package_is_refused_in_one_line_before_anything_loads(tmp_path, monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    monkeypatch.setattr(train, "read_corpus", lambda *a: pytest.fail("data read before the refusal"))
    with pytest.raises(SystemExit, match=r"^error: --report-to wandb: the wandb package is not installed; "
                                         r"`pip install wandb`"):
        train.main(SMALL + ["--report-to", "wandb", "--out", str(tmp_path / "run")])


@pytest.mark.parametrize("name, flags", [("qa.csv", []), ("chat.json", []), ("pc.parquet", []),
                                         ("named.parquet", ["--prompt-field", "src", "--answer-field", "tgt"])])
def test_each_format_trains_with_no_seq_len_and_no_row_cut(tmp_path, capsys, name, flags):
    words = ["".join("abcdefgh"[int(d)] for d in oct(64 + i * 37)[2:]) for i in range(24)]
    rows = {"qa.csv": [{"question": f"reverse {w}", "answer": w[::-1]} for w in words],
            "chat.json": [{"messages": [{"role": "user", "content": f"reverse {w}"},
                                        {"role": "assistant", "content": w[::-1]}]} for w in words],
            "pc.parquet": [{"prompt": f"reverse {w}", "completion": w[::-1]} for w in words],
            "named.parquet": [{"src": f"reverse {w}", "tgt": w[::-1]} for w in words]}[name]
    out = tmp_path / "run"
    train.main(SMALL + ["--data", str(write_rows(tmp_path / name, rows)), "--out", str(out), "--final-eval", "0",
                        *flags])
    printed = capsys.readouterr().out
    assert "the longest row (prompt, answer, EOS) of the data, so no row is cut" in printed and "were cut" not in printed
    assert json.loads((out / "config.json").read_text())["args"]["steps"] == math.ceil(23 / 8)  # 1 held out
