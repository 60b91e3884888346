"""
Faults from outside: bad data, bad flags, crashes and resume, numerical faults.

    python -m pytest tests/test_faults.py -q        # about a minute on 2 CPU cores

1. Bad data: every malformed row stops loading with one line naming file:line, what is wrong
   and how to fix it; blank answers/prompts and exact duplicates are skipped, counted and
   reported; hypothesis throws generated bad lines and texts at the reader and tokeniser.
2. Bad configuration: every refusal is one line naming the flag (or file), no traceback.
3. Crashes: one run is stopped by SIGTERM, SIGKILLed at seeded random moments (mostly with
   a checkpoint per step, so kills land while saving) and once for certain in the middle of
   a checkpoint write, each time resumed with --resume auto; after every interruption the
   latest checkpoint equals the uninterrupted run's at that step, bit for bit (weights, EMA,
   AdamW moments), and the finished run equals it too, log included: nothing is lost.
   SIGINT and half-written .tmp folders are checked in-process.
4. Numerical faults: poisoned steps (NaN loss, infinite gradient) leave weights, AdamW
   moments and EMA exactly as the step before; K in a row stop the run with a message.
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import tiny_model
import train
from dllm_jepa import DLLMJEPA, JEPAConfig
from dlm import checkpoints, data, sharding

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--tiny-width", "32", "--tiny-layers", "2", "--batch-size", "8", "--seq-len", "32",
         "--builtin-size", "400", "--no-progress", "--eval-every", "100"]
TOKENIZER = tiny_model.make_tokenizer()


def run(out, *flags):
    return train.main(SMALL + ["--out", str(out), *flags])


@contextlib.contextmanager
def quiet_one_thread():
    """For module fixtures, which run before conftest's one-thread fixture: results must not
    depend on the thread count (the subprocesses run with OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            yield stdout
    finally:
        torch.set_num_threads(threads)


def refusal(capsys, *flags):
    """train.main(flags) must stop with one line and no traceback -> (exit code, that line)."""
    with pytest.raises(SystemExit) as e:
        train.main(SMALL + list(flags))
    err = capsys.readouterr().err
    status = e.value.code if isinstance(e.value.code, int) else 1  # SystemExit("error: ...") exits 1
    message = err.strip().splitlines()[-1] if status == 2 else str(e.value.code)
    assert "Traceback" not in err and message.count("\n") == 0, err
    return status, message


def steps_of(out):
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row]


def state(checkpoint, scratch):
    """A checkpoint consolidated: {"model": ... (backbone, predictor, EMA target), "optim": ...}."""
    scratch.mkdir(parents=True, exist_ok=True)
    dcp_to_torch_save(str(checkpoint), str(scratch / "state.pt"))
    return torch.load(scratch / "state.pt", weights_only=False)


def assert_identical(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)

# -----------------------------------------------------------------------------
# 1. Bad data


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


OK = '{"prompt": "q", "answer": "a"}\n'


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", OK + '{"prompt": "q", "answer": \n', r"bad.jsonl:2: invalid JSON .*each line must be one"),
    ("bad.jsonl", OK.encode() * 2 + b'{"prompt": "caf\xe9", "answer": "a"}\n',  # Latin-1 on line 3
     r"bad.jsonl: not UTF-8 text at line 3 \(byte 0xe9.*re-save the file as UTF-8"),
    ("bad.jsonl", OK + '{"prompt": "q", "answer": null}\n', r"bad.jsonl:2: no usable fields \(found \['prompt'\]; null: \['answer'\]\); give"),
    ("bad.jsonl", '{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}\n',
     r"bad.jsonl:1: 'messages' must be a list .*e.g."),
    ("bad.jsonl", '{"messages": [{"role": "assistant", "content": "a"}]}\n', r"bad.jsonl:1: 'messages' must"),
    ("bad.jsonl", '{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]}\n',
     r"bad.jsonl:1: the last message must have role 'assistant' \(the answer\), got 'user'; end each"),
    ("bad.jsonl", '{"prompt": "\\ud800", "answer": "a"}\n', r"bad.jsonl:1: .*unpaired surrogate"),
    ("bad.jsonl", "[" * 100_000 + "\n", r"bad.jsonl:1: JSON nested too deeply"),
    ("bad.jsonl", '"just a string"\n', r"bad.jsonl:1: expected a JSON object, got str; give"),
    ("bad.jsonl", "", r"bad.jsonl: holds no examples .*give one row per example"),
    ("bad.jsonl", " \n\t\n\n", r"bad.jsonl: holds no examples"),
    ("bad.json", '{"data": [{"prompt": "q", "answer": "a"}]}', r"bad.json: a .json file must hold a list"),
    ("bad.json", '[\n{"prompt": "q", "answer": "a"},\n{"prompt": "q" "answer": "a"}\n]',
     r"bad.json:3: invalid JSON"),
    ("bad.json", '[{"prompt": "q", "answer": "a"}, {"prompt": "q"}]', r"bad.json item 1: no usable fields"),
])
def test_malformed_rows_stop_with_file_line_and_fix(tmp_path, name, content, message):
    with pytest.raises(ValueError, match=message):
        data.read_examples(write(tmp_path, name, content))


def test_harmless_oddities_are_read(tmp_path):
    """A byte-order mark, CRLF line ends, U+2028 inside a string (str.splitlines would cut the
    line there) and trailing blank lines are all fine."""
    rows = '\ufeff{"prompt": "a\u2028b", "answer": "x"}\r\n{"question": "c", "answer": "y"}\r\n\r\n\n'
    examples = data.read_examples(write(tmp_path, "ok.jsonl", rows))
    assert [(e.prompt[0]["content"], e.answer, e.where[-1]) for e in examples] == [("a\u2028b", "x", "1"),
                                                                                  ("c", "y", "2")]


def test_blank_and_duplicate_rows_are_skipped_counted_and_reported(tmp_path):
    lines = ['{"prompt": "q1", "answer": "a"}',           # 1 kept
             '{"prompt": "q2", "answer": ""}',            # 2 blank answer (would be a lone EOS)
             '{"prompt": "q3", "answer": " \\n\\t"}',     # 3 blank answer (whitespace)
             '{"prompt": "  ", "answer": "a"}',           # 4 blank prompt
             '{"answer": "a", "prompt": "q1"}',           # 5 duplicate of 1 (key order differs)
             '{"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}]}',  # 6 dup
             '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": ""}, '
             '{"role": "assistant", "content": "a"}]}',   # 7 kept: the system message is a prompt
             '{"prompt": "q1", "answer": "a "}']          # 8 kept: not an exact duplicate
    path = write(tmp_path, "d.jsonl", "\n".join(lines) + "\n")
    kept, note = data.clean_examples(data.read_examples(path), "d.jsonl")
    assert [e.where for e in kept] == [f"{path}:{i}" for i in (1, 7, 8)]
    assert note == (f"d.jsonl: skipped 5 of 8 rows: 2 blank answers ({path}:2, {path}:3), "
                    f"1 blank prompt ({path}:4), 2 duplicates ({path}:5, {path}:6)")
    with pytest.raises(ValueError, match=r"all.jsonl: all 2 rows were skipped: 2 blank answers .*give answers"):
        data.clean_examples(data.read_examples(write(tmp_path, "all.jsonl", lines[1] + "\n" + lines[1])),
                            "all.jsonl")


def test_messy_file_trains_and_reports_what_it_skipped_and_cut(tmp_path, capsys):
    rows = [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(30)]
    rows += [{"prompt": "blank", "answer": ""}, rows[0], {"prompt": "x" * 200, "answer": "long prompt"},
             {"prompt": "q", "answer": "y" * 200}]
    path = write(tmp_path, "messy.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    run(tmp_path / "out", "--data", str(path), "--steps", "2", "--save-every", "100")
    out = capsys.readouterr().out
    assert f"note: {path}: skipped 2 of 34 rows: 1 blank answer ({path}:31), 1 duplicate ({path}:32)" in out
    assert f"warning: {path}: 2 of 32 examples were longer than --seq-len 32 and were cut (1 at the prompt" in out
    assert "--seq-len 214 keeps all whole" in out
    assert all(math.isfinite(row["loss"]) for row in steps_of(tmp_path / "out"))


@pytest.mark.parametrize("flags, message", [
    (["--data", "{all_blank}"], r"error: .*all_blank.jsonl: all 2 rows were skipped: 2 blank answers"),
    (["--seq-len", "3"], r"error: --seq-len 3: no prompt of builtin fits \(rows need up to \d+ tokens\); "
                         r"use --seq-len \d+"),
    (["--data", "{latin1_txt}"], r"error: .*latin1.txt: not UTF-8 text at line 2"),
    (["--data", "{tiny_txt}", "--seq-len", "64"], r"error: .*tiny.txt: 5 tokens, fewer than one row"),
    (["--data", "{xlsx}"], r"error: --data .*table.xlsx: unsupported file type; use .jsonl, .json, .csv, .parquet, .txt"),
    (["--data", "{folder}"], r"error: --data .*: not a file"),
    (["--data", "{missing}"], r"error: --data .*missing.jsonl: no such file"),
    (["--data", "{unreadable}"], r"error: .*unreadable.jsonl: cannot be read \(Input/output error\); give a regular file$"),
])
def test_bad_data_stops_train_with_one_line(tmp_path, capsys, flags, message):
    files = {"all_blank": write(tmp_path, "all_blank.jsonl", '{"prompt": "q", "answer": ""}\n' * 2),
             "latin1_txt": write(tmp_path, "latin1.txt", b"hello\ncaf\xe9\n"),
             "tiny_txt": write(tmp_path, "tiny.txt", "hello"), "xlsx": write(tmp_path, "table.xlsx", "a,b\n"),
             "folder": tmp_path, "missing": tmp_path / "missing.jsonl", "unreadable": tmp_path / "unreadable.jsonl"}
    (tmp_path / "unreadable.jsonl").symlink_to("/proc/self/mem")  # opens, but read() fails: EIO, no file name
    code, line = refusal(capsys, "--out", str(tmp_path / "out"), *[f.format(**files) for f in flags])
    assert code != 0
    assert re.search(message, line), line


# Generated bad input: any mix of valid rows, broken JSON, other JSON values and raw text.
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=3), max_leaves=8)
rows = st.one_of(
    st.fixed_dictionaries({"prompt": st.text(max_size=40), "answer": st.text(max_size=40)}).map(json.dumps),
    st.fixed_dictionaries({"question": json_values, "answer": json_values}).map(json.dumps),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", 3]), "content": json_values | st.text()}),
        max_size=4)}).map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=30).filter(lambda s: "\n" not in s),
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(rows, max_size=8), seq_len=st.integers(2, 48))
def test_generated_files_are_read_or_refused_by_line(tmp_path_factory, lines, seq_len):
    """Reading never fails with anything but a one-line ValueError naming the file (and the
    line, for a row); what is read cleans and tokenises into valid rows or a ValueError."""
    path = tmp_path_factory.mktemp("gen") / "gen.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    try:
        examples = data.read_examples(path)
        examples, _ = data.clean_examples(examples, str(path))
    except ValueError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e), e
        return
    check_rows(data.tokenize_examples(examples, TOKENIZER, seq_len), len(examples), seq_len)


@settings(max_examples=20, deadline=None)
@given(suffix=st.sampled_from([".jsonl", ".json"]), before=st.integers(0, 3), extra=st.integers(1, 300),
       sign=st.sampled_from(["", "-"]), field=st.sampled_from(["answer", "prompt"]))
def test_a_number_past_pythons_digit_limit_is_named_by_line(tmp_path_factory, suffix, before, extra, sign, field):
    """json.loads refuses an integer of more than sys.get_int_max_str_digits() digits with a bare
    ValueError (no file, no line); the reader names the file and the line it sits on."""
    digits = sys.get_int_max_str_digits() + extra
    rows = [json.dumps({"prompt": f"q{i}", "answer": "a"}) for i in range(before)]
    rows.append(json.dumps({"prompt": "q", "answer": "a"}).replace(f'"{field}": "{"q" if field == "prompt" else "a"}"',
                                                                   f'"{field}": {sign}{"7" * digits}'))
    text = "\n".join(rows) + "\n" if suffix == ".jsonl" else "[\n" + ",\n".join(rows) + "\n]\n"
    path = tmp_path_factory.mktemp("digits") / f"big{suffix}"
    path.write_text(text)
    line = before + 1 + (suffix == ".json")
    with pytest.raises(ValueError) as e:
        data.read_examples(path)
    assert str(e.value) == (f"{path}:{line}: a number of {digits} digits, more than the {digits - extra} Python reads "
                            "as an integer; write it as a string (in quotes) or shorten it"), e.value


def test_train_and_evaluate_name_the_row_of_a_number_past_the_digit_limit(tmp_path, capsys, small_run):
    from scripts import evaluate
    path = write(tmp_path, "big.jsonl", OK * 40 + '{"prompt": "q", "answer": ' + "9" * 5000 + "}\n")
    said = f"{path}:41: a number of 5000 digits, more than the 4300 Python reads as an integer"
    for flag in ("--data", "--eval-data"):
        code, line = refusal(capsys, "--out", str(tmp_path / "out"), flag, str(path))
        assert code == 1 and line.startswith(f"error: {said}"), line
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", str(small_run / "final"), "--task", "exact", "--data", str(path)])
    assert str(e.value.code).startswith(f"error: {said}"), e.value.code


@settings(max_examples=25, deadline=None)
@given(suffix=st.sampled_from([".jsonl", ".json", ".csv"]), before=st.integers(0, 3), field=st.sampled_from(["prompt", "answer"]),
       over=st.integers(-3, 3))
def test_a_row_longer_than_any_run_can_use_is_refused_before_tokenising(tmp_path_factory, suffix, before, field, over):
    """With the bound lowered to 64 tokens (512 characters), rows around it are read or refused by
    their length alone, naming file and row, before any tokenizer sees them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "MAX_ROW_TOKENS", 64)
        bound = 64 * data.CHARS_PER_TOKEN
        long = {"prompt": "p", "answer": "a"} | {field: "x" * (bound - 1 + over)}
        rows = [{"prompt": f"q{i}", "answer": "a"} for i in range(before)] + [long]
        path = tmp_path_factory.mktemp("long") / f"long{suffix}"
        if suffix == ".csv":
            path.write_text("prompt,answer\n" + "".join(f"{r['prompt']},{r['answer']}\n" for r in rows))
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows) if suffix == ".jsonl" else json.dumps(rows))
        where = {".jsonl": f"{path}:{before + 1}", ".json": f"{path} item {before}", ".csv": f"{path} row {before + 1}"}
        if over <= 0:
            assert len(data.read_examples(path)) == before + 1
            return
        with pytest.raises(ValueError) as e:
            data.read_examples(path)
        assert str(e.value) == (f"{where[suffix]}: a row of {bound + over:,} characters, longer than the {bound:,} any "
                                f"run can use (64 tokens of at most 8 characters); shorten or split it")


def test_a_row_of_more_tokens_than_any_run_can_use_is_refused(monkeypatch):
    """Few characters, many tokens (the byte-level tokenizer spends 2 on an 'é'): the tokens count."""
    monkeypatch.setattr(data, "MAX_ROW_TOKENS", 64)
    example = data.Example([{"role": "user", "content": "q"}], "é" * 60, "f.jsonl:3")
    with pytest.raises(ValueError, match=r"^f.jsonl:3: a row of \d+ tokens, longer than the 64 any run can use"):
        data.encode_examples([example], TOKENIZER)


def test_a_row_of_megabytes_is_one_line_in_train_evaluate_and_generate(tmp_path, capsys, small_run):
    """At the real bound (8 Mi characters): a 9 MB line used to take gigabytes in the tokenizer."""
    from scripts import evaluate, generate
    path = write(tmp_path, "huge.jsonl", OK * 30 + json.dumps({"prompt": "q", "answer": "z" * 9_000_000}) + "\n")
    said = f"{path}:31: a row of 9,000,001 characters, longer than the 8,388,608 any run can use"
    code, line = refusal(capsys, "--out", str(tmp_path / "out"), "--data", str(path))
    assert code == 1 and line.startswith(f"error: {said}"), line
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", str(small_run / "final"), "--task", "exact", "--data", str(path)])
    assert str(e.value.code).startswith(f"error: {said}"), e.value.code
    prompts = write(tmp_path, "prompts.txt", "hello\n" + "w" * 9_000_000 + "\n")
    with pytest.raises(SystemExit) as e:
        generate.main(["--model", str(small_run / "final"), "--prompts-file", str(prompts)])
    assert str(e.value.code).startswith(f"error: {prompts}:2: a row of 9,000,000 characters"), e.value.code


def check_rows(rows, n, seq_len):
    """Fixed-length rows with a prompt and a non-empty answer that fit, never an empty batch."""
    assert rows.input_ids.shape == (n, seq_len) and n > 0
    assert (rows.prompt_lengths >= 1).all() and (rows.answer_lengths >= 1).all()
    assert (rows.prompt_lengths + rows.answer_lengths <= seq_len).all()
    assert 0 <= rows.prompts_cut <= rows.truncated <= n


@settings(max_examples=150)
@given(prompt=st.text(max_size=300), answer=st.text(min_size=1, max_size=300), seq_len=st.integers(2, 64))
def test_any_text_tokenises_to_a_valid_row(prompt, answer, seq_len):
    """Answers longer than the context and prompts that fill it are cut, never dropped whole."""
    rows = data.tokenize_examples([data.Example([{"role": "user", "content": prompt}], answer)], TOKENIZER, seq_len)
    check_rows(rows, 1, seq_len)
    assert rows.truncated == (rows.longest > seq_len)

# -----------------------------------------------------------------------------
# 2. Bad configuration: one line, naming the flag


@pytest.mark.parametrize("flags, message", [
    (["--grad-clip", "0"], "--grad-clip 0.0: must be > 0"),
    (["--grad-clip", "-1"], "--grad-clip -1.0: must be > 0"),
    (["--warmup-steps", "50", "--steps", "10"], "--warmup-steps 50: must lie in [0, --steps 10]"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--context-t", "0.1", "inf"], "--context-t inf: must be a finite number"),
    (["--seq-len", "1"], "--seq-len 1: must be >= 2"),
    (["--seed", "-1"], "--seed -1: must lie in [0, 2**27)"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio 2.0: must lie in [0, 1]"),
    (["--tiny-width", "30"], "--tiny-width 30: must be a positive multiple of 8"),
    (["--eval-fraction", "0"], "--eval-fraction 0.0: must lie in (0, 1)"),
    (["--keep", "0"], "--keep 0: must be >= 1"),
    (["--max-bad-steps", "0"], "--max-bad-steps 0: must be >= 1"),
    (["--ema-momentum", "1.0", "0.5"], "--ema-momentum=[1.0, 0.5]: need 0 <= start <= end <= 1"),
    (["--method", "diffusion", "--target", "ema"], "--target='ema' applies only to"),
    (["--eps", "1"], "--eps=1.0: must lie in [0, 1)"),
    (["--context-t", "0.5", "0.2"], "--context-t=(0.5, 0.2): low must not exceed high"),
    (["--target-t", "0.0", "0.5"], "--target-t=(0.0, 0.5): t must lie in (0, 1]"),
    (["--jepa-lambda", "-1"], "--jepa-lambda=-1.0: must be >= 0"),
    (["--method", "two-pass", "--target", "online"],
     "--target='online' applies only to --method='dllm-jepa' (two-pass has no separate target encoder)"),
    (["--steps", "0"], "--steps 0: must be >= 1"),
    (["--eval-fraction", "1.5"], "--eval-fraction 1.5: must lie in (0, 1)"),
    (["--method", "magic"], "argument --method: invalid choice: 'magic'"),
] + ([(["--device", "cuda"], "--device cuda: no CUDA device"),
      (["--cpu-offload"], "--cpu-offload: needs a CUDA device")] if not torch.cuda.is_available() else []))
def test_bad_flags_are_refused_in_one_line(capsys, tmp_path, flags, message):
    code, line = refusal(capsys, "--out", str(tmp_path), *flags)
    assert code == 2 and line.startswith("error: ") and message in line, line


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A finished 3-step run with a checkpoint per step (and --resume auto on an empty --out)."""
    out = tmp_path_factory.mktemp("small") / "run"
    with quiet_one_thread() as stdout:
        run(out, "--steps", "3", "--save-every", "1", "--keep", "3", "--resume", "auto")
    assert f"note: --resume auto: no checkpoint in {out / 'checkpoints'}; starting fresh" in stdout.getvalue()
    return out


def test_bad_paths_and_checkpoints_are_refused_in_one_line(small_run, tmp_path, capsys):
    ckpts = small_run / "checkpoints"
    incomplete = tmp_path / "step_00000002"
    shutil.copytree(ckpts / "step_00000002", incomplete)
    (incomplete / "extra_rank0.pt").unlink()
    unfinished = tmp_path / "step_00000004.tmp"
    unfinished.mkdir()
    truncated, junk, unsealed = (tmp_path / name / "step_00000002" for name in ("truncated", "junk", "unsealed"))
    for copy in (truncated, junk, unsealed):
        shutil.copytree(ckpts / "step_00000002", copy)
    (unsealed / "manifest.json").unlink()
    (shards,) = truncated.glob("*.distcp")
    shards.write_bytes(shards.read_bytes()[:1000])
    (junk / "extra_rank0.pt").write_text("not a pickle")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "nomodel").mkdir()
    new = ["--out", str(tmp_path / "new")]
    cases = [
        (new + ["--model", str(tmp_path / "missing")], "no such folder"),
        (new + ["--model", str(tmp_path / "nomodel")], "the folder has no config.json; give a save_pretrained"),
        (new + ["--model", str(small_run / "final"), "--embed-layer", "5"],
         "--embed-layer 5: the model has 2 blocks, so hidden states 0..2 (or -3..-1)"),
        (new + ["--resume", str(tmp_path / "nothing")], f"--resume {tmp_path / 'nothing'}: no such checkpoint folder"),
        (new + ["--resume", str(unfinished)], "an unfinished write (the run was killed while saving)"),
        (new + ["--resume", str(incomplete)], "an incomplete checkpoint (no extra_rank0.pt)"),
        (new + ["--resume", str(small_run)], f"holds some; give one (latest: {ckpts / 'step_00000003'})"),
        (new + ["--resume", str(truncated)], f"--resume {truncated}: an unreadable checkpoint (__0_0.distcp: 1000 "
         "bytes, written as"),
        (new + ["--resume", str(junk)], f"--resume {junk}: an unreadable checkpoint (extra_rank0.pt: 12 bytes"),
        (new + ["--resume", str(unsealed)], f"--resume {unsealed}: a checkpoint without its manifest.json"),
        (new + ["--resume", str(ckpts / "step_00000003"), "--method", "diffusion"],
         "the checkpoint's run had other settings (method dllm-jepa -> diffusion"),
        (new + ["--resume", str(ckpts / "step_00000003"), "--tiny-width", "64"], "tiny_width 32 -> 64"),
        (new + ["--resume", str(ckpts / "step_00000003"), "--steps", "2"],
         "the checkpoint is at step 3, past --steps 2; raise --steps"),
        (["--out", str(tmp_path / "afile")], "is a file, not a folder"),
        (["--out", str(small_run)], "already holds checkpoints (latest step_00000003); add --resume auto"),
    ]
    for flags, message in cases:
        code, line = refusal(capsys, *flags)
        assert code == 1 and line.startswith("error: ") and message in line, (flags, line)


def test_resume_with_changed_settings_warns_and_goes_on(small_run, tmp_path, capsys):
    out = tmp_path / "fork"
    run(out, "--resume", str(small_run / "checkpoints" / "step_00000002"), "--steps", "3", "--lr", "2e-3",
        "--save-every", "100")
    printed = capsys.readouterr().out
    assert "warning: resuming with changed settings (lr 0.001 -> 0.002)" in printed
    assert [row["step"] for row in steps_of(out)] == [3]

def test_resuming_an_earlier_step_sets_the_later_checkpoints_aside(small_run, tmp_path, capsys):
    """Resume at step 1 of a run that reached 3: steps 2 and 3 are moved to abandoned/ (not
    deleted, never picked by --resume auto or pruned); with --keep 1 the checkpoint just
    written is the one kept."""
    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    ckpts = out / "checkpoints"
    run(out, "--resume", str(ckpts / "step_00000001"), "--steps", "2", "--save-every", "1", "--keep", "1")
    printed = capsys.readouterr().out
    (abandoned,) = (ckpts / "abandoned").iterdir()
    assert sorted(p.name for p in abandoned.iterdir()) == ["step_00000002", "step_00000003"]
    assert f"note: step_00000003 is past the resumed step 1: moved to {abandoned / 'step_00000003'}" in printed
    assert [p.name for p in checkpoints.checkpoint_dirs(ckpts)] == ["step_00000002"]
    assert checkpoints.latest_checkpoint(ckpts) == ckpts / "step_00000002"
    assert [row["step"] for row in steps_of(out)] == [1, 2]


def test_checkpoint_pruning_keeps_the_newest(tmp_path):
    """save_checkpoint's pruning, on folders alone: keep=2 leaves the one written and the
    newest other; a later-numbered folder never pushes out the one just written."""
    for step in (1, 2, 3, 9):
        (tmp_path / f"step_{step:08d}").mkdir()
    env = sharding.init_distributed("cpu")
    model = torch.nn.Linear(2, 2)
    checkpoints.save_checkpoint(tmp_path, 4, model, torch.optim.SGD(model.parameters()), {}, 2, env)
    assert [p.name for p in checkpoints.checkpoint_dirs(tmp_path)] == ["step_00000004", "step_00000009"]
    checkpoints.save_checkpoint(tmp_path, 5, model, torch.optim.SGD(model.parameters()), {}, 1, env)
    assert [p.name for p in checkpoints.checkpoint_dirs(tmp_path)] == ["step_00000005"]

# -----------------------------------------------------------------------------
# 3. Crashes: SIGTERM, SIGINT, SIGKILL (also mid-write), resume, compare bit for bit

STEPS = 16
CRASH = ["--steps", str(STEPS), "--warmup-steps", "4"]
# A subprocess that SIGKILLs itself right after its 2nd checkpoint's shards and .metadata are
# written, before its extra state and the rename: a half-written checkpoint for certain.
KILL_MID_WRITE = """
import os, signal, sys
import train
from dlm import checkpoints
save, calls = checkpoints.dcp.save, []
def save_then_die(*args, **kwargs):
    save(*args, **kwargs)
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoints.dcp.save = save_then_die
train.main(sys.argv[1:])
"""


def launch(out, stage, *flags, wrapper=None):
    """`python train.py ... --resume auto` (or the wrapper), its output in out/../stage<i>.stdout."""
    stdout = open(out.parent / f"stage{stage}.stdout", "w")
    cmd = [sys.executable] + (["-c", wrapper] if wrapper else [str(ROOT / "train.py")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd + SMALL + CRASH + ["--out", str(out), "--resume", "auto", *flags],
                            stdout=stdout, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    proc.stdout_path = Path(stdout.name)
    return proc


def wait_for_step(proc, out, step, timeout=120):
    """Block until the run has logged `step` (or exited); returns the last step logged. The
    log is read only once the run says it starts (it has trimmed the steps lost by a kill)."""
    deadline, last = time.time() + timeout, 0
    while time.time() < deadline and proc.poll() is None:
        if " at step " in proc.stdout_path.read_text() and (out / "log.jsonl").is_file():
            for line in (out / "log.jsonl").read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    last = max(last, json.loads(line).get("step", 0) if "loss" in line else 0)
        if last >= step:
            return last
        time.sleep(0.02)
    return last


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in this process (bitwise equal to a `python train.py` run with
    OMP_NUM_THREADS=1), keeping every step's checkpoint."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with quiet_one_thread():
        run(out, *CRASH, "--save-every", "1", "--keep", str(STEPS))
    return out


@pytest.fixture(scope="module")
def crash_chain(reference, tmp_path_factory):
    """One run, interrupted four times and resumed each time; a record per interruption."""
    root = tmp_path_factory.mktemp("chain")
    out, ckpts, rng, records = root / "run", root / "run" / "checkpoints", random.Random(6), []

    def interrupted(kind, proc, rc):
        named = checkpoints.checkpoint_dirs(ckpts)
        records.append({"kind": kind, "rc": rc, "latest": checkpoints.latest_checkpoint(ckpts), "named": named,
                        "named_incomplete": [p for p in named if not ((p / ".metadata").is_file()
                                                                      and (p / "extra_rank0.pt").is_file())],
                        "tmp": {p.name: sorted(f.name for f in p.iterdir()) for p in ckpts.glob("*.tmp")},
                        "logged": max([r["step"] for r in steps_of(out)], default=0)})
        latest, records[-1]["same_as_reference"] = records[-1]["latest"], False
        with contextlib.suppress(AssertionError):
            assert_identical(state(latest, root / "scratch"), state(reference / "checkpoints" / latest.name,
                                                                    root / "scratch"))
            records[-1]["same_as_reference"] = True

    # 1. SIGTERM in step >= 3, no periodic checkpoint: the only checkpoint is the signal's
    proc = launch(out, 0, "--save-every", "100")
    wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGTERM)
    interrupted("SIGTERM", proc, proc.wait(120))
    # 2-4. SIGKILL at seeded random moments (a checkpoint per step), and once mid-write
    for stage, kind in enumerate(("SIGKILL", "SIGKILL mid-write", "SIGKILL"), start=1):
        start = int(records[-1]["latest"].name[5:])
        if kind == "SIGKILL mid-write":
            proc = launch(out, stage, "--save-every", "1", wrapper=KILL_MID_WRITE)
        else:
            proc = launch(out, stage, "--save-every", "1")
            wait_for_step(proc, out, rng.randint(start + 1, start + 4))
            time.sleep(rng.uniform(0, 0.3))
            proc.kill()
        interrupted(kind, proc, proc.wait(120))
        records[-1]["resumed_from"] = start
    # 5. to the end
    proc = launch(out, 4, "--save-every", "1")
    stdout = "".join((root / f"stage{i}.stdout").read_text() for i in range(5))
    assert proc.wait(180) == 0, stdout[-3000:]
    return out, records, "".join((root / f"stage{i}.stdout").read_text() for i in range(5))


def test_sigterm_exits_143_with_a_resumable_checkpoint(crash_chain):
    out, records, stdout = crash_chain
    term = records[0]
    assert term["rc"] == 143, stdout[-2000:]
    assert term["named"] == [term["latest"]] and term["named_incomplete"] == [] and term["tmp"] == {}  # the signal's checkpoint, complete
    assert term["latest"].name == f"step_{term['logged']:08d}"  # every finished step is in it: none lost
    assert f"stopped by signal 15 after step {term['logged']}; continue with --resume auto" in stdout
    assert term["same_as_reference"]
    assert f"resuming from {term['latest']} at step {term['logged']}" in stdout


def test_sigkill_never_leaves_a_half_written_latest_checkpoint(crash_chain):
    out, records, stdout = crash_chain
    kills = records[1:]
    assert [r["rc"] for r in kills] == [-signal.SIGKILL] * 3, stdout[-2000:]
    for record in kills:
        assert record["latest"] is not None and record["same_as_reference"], record
        assert record["named_incomplete"] == [], record  # whatever carries a final name is complete
        assert f"resuming from {record['latest']} at step" in stdout  # the next run loaded it
    mid_write = records[2]  # shards and .metadata written, not the extra state: never loaded
    assert mid_write["tmp"] == {f"step_{mid_write['resumed_from'] + 2:08d}.tmp": [".metadata", "__0_0.distcp"]}
    assert mid_write["latest"].name == f"step_{mid_write['resumed_from'] + 1:08d}"
    assert not list((out / "checkpoints").glob("*.tmp"))  # cleaned up


def test_interrupted_run_reproduces_the_uninterrupted_one_bitwise(crash_chain, reference, tmp_path):
    out, records, _ = crash_chain
    a, b = load_file(reference / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = f"step_{STEPS:08d}"  # EMA target, predictor and AdamW moments too
    assert_identical(state(reference / "checkpoints" / last, tmp_path / "a"),
                     state(out / "checkpoints" / last, tmp_path / "b"))
    # the log reads as one run: each step once, with the uninterrupted run's numbers
    assert steps_of(out) == steps_of(reference)


def test_sigint_and_stale_tmp_folders_in_process(reference, tmp_path, monkeypatch):
    """SIGINT in step 5 -> exit 130 after saving step 5; a half-written step_6.tmp and a stray
    .tmp beyond the run are ignored on resume, then removed; the result is the reference's."""
    out = tmp_path / "run"
    forward, calls = DLLMJEPA.forward, []

    def forward_then_sigint(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        if calls.count(True) == 5 and calls[-1]:
            signal.raise_signal(signal.SIGINT)
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(DLLMJEPA, "forward", forward_then_sigint)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        run(out, *CRASH, "--save-every", "100")
    assert e.value.code == 130
    assert signal.getsignal(signal.SIGINT) is handler  # handlers restored
    monkeypatch.setattr(DLLMJEPA, "forward", forward)
    ckpts = out / "checkpoints"
    assert checkpoints.checkpoint_dirs(ckpts) == [ckpts / "step_00000005"]
    shutil.copytree(ckpts / "step_00000005", ckpts / "step_00000006.tmp")
    (ckpts / "step_00000006.tmp" / "extra_rank0.pt").unlink()
    (ckpts / "step_00000099.tmp").mkdir()
    assert checkpoints.latest_checkpoint(ckpts) == ckpts / "step_00000005"
    run(out, *CRASH, "--save-every", "100", "--resume", "auto")
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000005", f"step_{STEPS:08d}"]
    a, b = load_file(reference / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

# -----------------------------------------------------------------------------
# 4. Numerical faults


class InfiniteGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite); infinite gradient backward."""
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def poison(monkeypatch, nan_loss=(), inf_grad=()):
    """Training step k (1-based) gets a NaN loss or an infinite gradient: a test seam around
    DLLMJEPA.forward, counting gradient-carrying calls (held-out evaluation runs under no_grad)."""
    forward, calls = DLLMJEPA.forward, []

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if not torch.is_grad_enabled():
            return out
        calls.append(1)
        if len(calls) in nan_loss:
            return dataclasses.replace(out, loss=out.loss * math.nan, diffusion=out.diffusion * math.nan)
        if len(calls) in inf_grad:
            return dataclasses.replace(out, loss=InfiniteGradient.apply(out.loss))
        return out
    monkeypatch.setattr(DLLMJEPA, "forward", poisoned)


def test_poisoned_steps_leave_weights_optimizer_and_ema_untouched(tmp_path, monkeypatch, capsys):
    poison(monkeypatch, nan_loss={3}, inf_grad={5})
    out = tmp_path / "run"
    run(out, "--steps", "7", "--save-every", "1", "--keep", "7", "--max-bad-steps", "2")
    log = steps_of(out)
    assert [row["skipped"] for row in log] == [False, False, True, False, True, False, False]
    # non-finite values are strict JSON strings: "NaN", "Infinity", which float() reads back
    assert log[2]["loss"] == "NaN" and math.isnan(float(log[2]["loss"])) and math.isfinite(log[4]["loss"])
    assert log[4]["grad_norm"] in ("Infinity", "NaN")
    printed = capsys.readouterr().out
    assert "done: step 7 (7 steps in" in printed and "2 skipped as non-finite in all)" in printed
    states = {k: state(out / "checkpoints" / f"step_{k:08d}", tmp_path / str(k)) for k in range(2, 7)}
    assert all({"exp_avg", "exp_avg_sq", "step"} <= set(moments) for moments in states[2]["optim"]["state"].values())
    assert any(key.startswith("target_encoder.") for key in states[2]["model"])
    for bad in (3, 5):  # weights, predictor, EMA target, AdamW moments and step count, lr
        assert_identical(states[bad - 1], states[bad], f"step {bad}")
    with pytest.raises(AssertionError):  # ... and the run went on learning after each
        assert_identical(states[3]["model"], states[4]["model"])
    with pytest.raises(AssertionError):
        assert_identical(states[5]["model"], states[6]["model"])


def test_k_bad_steps_in_a_row_stop_the_run(tmp_path, monkeypatch):
    poison(monkeypatch, nan_loss={2, 4}, inf_grad={3})
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "run", "--steps", "8", "--save-every", "100", "--max-bad-steps", "3")
    assert str(e.value.code).startswith("error: 3 non-finite steps in a row (steps 2-4), each skipped: "
                                        "stopping. Lower --lr or --grad-clip")
    assert signal.getsignal(signal.SIGTERM) is handler  # handlers restored


@pytest.mark.parametrize("method", ["dllm-jepa", "two-pass", "diffusion"])
def test_rows_with_nothing_to_mask_give_finite_zero_not_nan(make_model, method):
    """Rows whose prompt fills the row (nothing scored) and a batch where no token is masked
    (eps 0, t tiny): losses and gradients are finite."""
    T = 16
    ids = torch.randint(0, 256, (4, T))
    prompt_lengths, answer_lengths = torch.tensor([T, T, 4, 8]), torch.tensor([0, 0, 3, 8])
    for config in (JEPAConfig(method=method), JEPAConfig(method=method, eps=0.0, context_t=(1e-6, 1e-6),
                                                         target_t=(1e-6, 1e-6))):
        model = DLLMJEPA(make_model(), config)
        out = model(ids, prompt_lengths, answer_lengths, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        assert all(torch.isfinite(v) for v in (out.loss, out.diffusion, out.jepa)), out
        assert all(torch.isfinite(p.grad).all() for p in model.trainable_parameters() if p.grad is not None)

# -----------------------------------------------------------------------------
# Damaged state is refused, never passed over


DAMAGES = {  # a newest checkpoint damaged as copies, deletions and bit rot leave it
    "no .metadata": lambda step: (step / ".metadata").unlink(),
    "no rank state": lambda step: (step / "extra_rank0.pt").unlink(),
    "no manifest": lambda step: (step / "manifest.json").unlink(),
    "a shard cut": lambda step: next(step.glob("*.distcp")).write_bytes(b"\0" * 10),
    "an empty folder": lambda step: (shutil.rmtree(step), step.mkdir()),
    "a file in its place": lambda step: (shutil.rmtree(step), step.write_text("x")),
}


@settings(max_examples=9, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=st.sampled_from(sorted(DAMAGES)), copies=st.integers(1, 3))
def test_resume_auto_refuses_a_damaged_latest_checkpoint_as_an_explicit_resume_does(small_run, tmp_path, capsys,
                                                                                     damage, copies):
    """--resume auto used to pass over a damaged newest checkpoint: start from an older one or
    from step 0, rewriting log.jsonl. It is refused in one line naming it (and the one before)."""
    out = tmp_path / f"run-{damage}-{copies}".replace(" ", "_")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(small_run, out)
    for step in sorted((out / "checkpoints").iterdir())[:3 - copies]:  # keep the newest `copies`
        shutil.rmtree(step)
    latest = out / "checkpoints" / "step_00000003"
    DAMAGES[damage](latest)
    log = (out / "log.jsonl").read_text()
    code, line = refusal(capsys, "--out", str(out), "--steps", "3", "--resume", "auto")
    assert code == 1 and line.startswith(f"error: --resume auto: {latest}: "), line
    assert (f"--resume {out / 'checkpoints' / 'step_00000002'}" in line) == (copies > 1), line
    assert (out / "log.jsonl").read_text() == log


def test_a_step_that_leaves_non_finite_weights_stops_the_run_before_saving_them(tmp_path):
    """--weight-decay 1e300: the loss and gradients of step 1 are finite, AdamW's decay overflows
    every weight. The run stops there in one line; no checkpoint or final/ holds such weights
    (before: the evaluation's SVD of NaN embeddings ended in a LinAlgError traceback)."""
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "run", "--steps", "3", "--save-every", "1", "--weight-decay", "1e300")
    assert str(e.value.code) == ("error: step 1 left non-finite weights although its loss and gradients were finite "
                                 "(the optimizer's update overflowed): lower --lr or --weight-decay; the checkpoints "
                                 "hold the weights from before")
    assert not (tmp_path / "run" / "final").exists()
    assert checkpoints.checkpoint_dirs(tmp_path / "run" / "checkpoints") == []


def test_a_run_whose_every_step_was_skipped_exports_nothing(tmp_path, monkeypatch):
    """--jepa-lambda 1e300 and the like: every step non-finite, fewer than --max-bad-steps: the
    untouched model must not be exported as fine-tuned with exit 0."""
    poison(monkeypatch, nan_loss={1, 2})
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "run", "--steps", "2", "--final-eval", "0")
    assert str(e.value.code).startswith("error: all 2 steps were non-finite and skipped: the model is not "
                                        "fine-tuned, so nothing is exported")
    assert not (tmp_path / "run" / "final").exists()


@pytest.fixture(scope="module")
def damaged_models(tmp_path_factory):
    """A tiny model saved whole, with one NaN weight, and with a tensor stored as integers."""
    root = tmp_path_factory.mktemp("damaged")
    from safetensors.torch import save_file
    for kind in ("nan", "int"):
        torch.manual_seed(0)
        path = root / kind
        tiny_model.make_tiny_model(TOKENIZER, hidden_size=32, num_hidden_layers=2,
                                   intermediate_size=64).save_pretrained(path)
        TOKENIZER.save_pretrained(path)
        state = load_file(path / "model.safetensors")
        name = sorted(state)[0]
        state[name] = state[name].to(torch.int32) if kind == "int" else state[name].index_fill(0, torch.tensor([0]), math.nan)
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return root


@pytest.mark.parametrize("kind, message", [("nan", "holds NaN or infinite weights"),
                                           ("int", "is stored as I32, not floating point")])
@pytest.mark.parametrize("command", ["evaluate", "generate"])
def test_nan_or_integer_weights_are_one_line_in_evaluate_and_generate(damaged_models, tmp_path, command, kind,
                                                                      message, capsys):
    import importlib
    main = importlib.import_module(f"scripts.{command}").main
    text = tmp_path / "probe.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    argv = (["--task", "probe", "--data", str(text), "--probe-seq-len", "16", "--probe-windows", "2"]
            if command == "evaluate" else ["--prompt", "hello", "--gen-length", "4", "--block-length", "4"])
    with pytest.raises(SystemExit) as e:
        main(["--model", str(damaged_models / kind), *argv])
    line = str(e.value.code)
    assert line.startswith(f"error: {damaged_models / kind}: ") and message in line and "\n" not in line, line
    assert "Traceback" not in capsys.readouterr().err


def test_evaluate_no_progress_leaves_stderr_to_the_refusal(damaged_models, tmp_path, capsys):
    """--no-progress silences transformers' "Loading weights" bar too, so a refusal after loading
    is all stderr holds (before: two bar lines ahead of it in a log file)."""
    from transformers.utils import logging as hf_logging

    from scripts import evaluate
    text = tmp_path / "probe.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # as in a fresh process (train.main, run earlier here, turns it off)
    try:
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--model", str(damaged_models / "nan"), "--task", "probe", "--data", str(text),
                           "--probe-seq-len", "16", "--probe-windows", "2", "--no-progress"])
    finally:
        (hf_logging.enable_progress_bar if was_on else hf_logging.disable_progress_bar)()
    assert "holds NaN or infinite weights" in str(e.value.code)
    assert capsys.readouterr().err == ""


def test_evaluate_refuses_blank_reference_answers(tmp_path, small_run):
    from scripts import evaluate
    rows = tmp_path / "dev.jsonl"
    rows.write_text(json.dumps({"prompt": "1+1", "answer": "2"}) + "\n" + json.dumps({"prompt": "2+2", "answer": " "}) + "\n")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", str(small_run / "final"), "--task", "exact", "--data", str(rows)])
    assert str(e.value.code) == (f"error: {rows} item 1: blank reference answer: no answer can be scored against it; "
                                 "fix or drop the row")
