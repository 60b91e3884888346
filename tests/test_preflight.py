"""
The guards of dlm/preflight.py and dlm/files.py, and the commands' outputs: never destroy an
input, never lose finished work, never hang, one line for every refusal.

    python -m pytest tests/test_preflight.py -q

1. An --out that is, contains or lies inside an input (--model, --data, --eval-data, --resume's
   checkpoint and run), a model folder or a checkpoint is refused up front (train.py,
   evaluate.py --out/--plot, experiments.py): the input stays byte for byte.
2. Output paths fail before anything loads: a file in the way, a read-only folder.
3. evaluate.py checks --out/--plot first, writes results atomically, and prints them in full
   when the write still fails.
4. Damaged model folders: one line naming the folder and what is wrong (train.py, evaluate.py).
5. A resumed log equals the uninterrupted run's, held-out rows included; every file is strict
   JSON (non-finite values as "NaN"/"Infinity" strings).
7. Ranks that hold different runs stop together with one line; a second SIGTERM stops a rank
   stuck in a collective.
8. Sizes that cannot fit: one line naming the flag before allocating; a caught out-of-memory
   error is one line too.
"""

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import train
from dllm_jepa import DLLMJEPA
from dlm import backbones, files, preflight
from dlm.flags import parse_args
from scripts import evaluate as E
from scripts import experiments as X

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--tiny-width", "32", "--tiny-layers", "2", "--batch-size", "8", "--seq-len", "32",
         "--builtin-size", "400", "--no-progress", "--eval-every", "100", "--final-eval", "0"]
NO_MODEL = "/nonexistent/model"  # loading it fails: an --out error proves it came first
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def strict_loads(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity, as RFC 8259 and JSON.parse do."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def train_refusal(capfd, *flags) -> str:
    """train.main must stop with one 'error: ' line and no traceback -> that line."""
    with pytest.raises(SystemExit) as e:
        train.main(SMALL + list(flags))
    err = capfd.readouterr().err
    assert "Traceback" not in err and "LOAD REPORT" not in err, err
    line = str(e.value.code)
    assert line.startswith("error: ") and "\n" not in line, line
    return line


def nothing_loads(monkeypatch):
    """Make any model or data loading fail loudly: a refusal must come before it."""
    def loaded(*args, **kwargs):
        raise AssertionError("the model or the data were loaded before the refusal")
    for name in ("load_backbone", "read_corpus"):
        monkeypatch.setattr(train, name, loaded)
    monkeypatch.setattr(E, "run", loaded)


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A tiny save_pretrained folder (weights and tokenizer), as a user would give --model."""
    path = tmp_path_factory.mktemp("model") / "tiny"
    b = backbones.new_tiny_backbone(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=128)
    b.model.save_pretrained(path)
    b.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """A finished 3-step run with a checkpoint per step."""
    out = tmp_path_factory.mktemp("run") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            train.main(SMALL + ["--out", str(out), "--steps", "3", "--save-every", "1", "--keep", "3"])
    finally:
        torch.set_num_threads(threads)
    return out


@contextlib.contextmanager
def read_only(folder: Path):
    """Make `folder` refuse new files, even for root (which ignores permission bits): the
    immutable attribute (chattr +i, ext4 and friends) or, not as root, chmod 555. Skips the test
    when neither works here."""
    folder.mkdir(parents=True, exist_ok=True)
    undo = None
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = lambda: folder.chmod(0o755)
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        undo = lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
    if undo is None:
        pytest.skip("cannot make a read-only folder here (root, and chattr +i is refused on this filesystem)")
    try:
        with contextlib.suppress(OSError):
            (folder / "probe").write_text("x")
            undo()
            pytest.skip("the folder still accepts files (chattr/chmod had no effect here)")
        yield folder
    finally:
        undo()

# -----------------------------------------------------------------------------
# 1. Never destroy an input


def test_out_equal_to_model_is_refused_and_the_model_is_untouched(saved_model, tmp_path, capfd, monkeypatch):
    """The reported case: `train.py --model M --out M` rewrote M/config.json; M no longer loaded."""
    model = tmp_path / "M"
    shutil.copytree(saved_model, model)
    before = snapshot(model)
    nothing_loads(monkeypatch)
    line = train_refusal(capfd, "--model", str(model), "--out", str(model))
    assert line == (f"error: --out {model}: is --model {model}; the outputs would be written over or among "
                    "the inputs: give an --out apart from them")
    assert snapshot(model) == before


def test_out_meeting_any_input_is_refused_naming_both(saved_model, small_run, tmp_path, capfd, monkeypatch):
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(30)))
    held = tmp_path / "held.jsonl"
    shutil.copy(data, held)
    other = tmp_path / "other"
    shutil.copytree(small_run, other)
    ckpt = other / "checkpoints" / "step_00000002"
    before = {path: snapshot(path) for path in (saved_model, data.parent, other)}
    nothing_loads(monkeypatch)
    cases = [
        (["--model", str(saved_model), "--out", str(saved_model / "run")], f"lies inside --model {saved_model}"),
        (["--model", str(saved_model), "--out", str(saved_model.parent)], f"contains --model {saved_model}"),
        (["--data", str(data), "--out", str(data)], f"is --data {data}"),
        (["--data", str(data), "--out", str(data.parent)], f"contains --data {data}"),
        (["--eval-data", str(held), "--out", str(held)], f"is --eval-data {held}"),
        (["--resume", str(ckpt), "--out", str(ckpt)], f"is --resume {ckpt}"),
        (["--resume", str(ckpt), "--out", str(ckpt / "sub")], f"lies inside --resume {ckpt}"),
        (["--resume", str(ckpt), "--out", str(other / "final")], f"lies inside the run of --resume {other}"),
        (["--resume", str(ckpt), "--out", str(tmp_path)], "contains --resume"),
        (["--out", str(other / "checkpoints")], f"is the checkpoint folder {other / 'checkpoints'}"),
        (["--out", str(ckpt / "x")], f"lies inside the checkpoint folder {ckpt}"),
        (["--out", str(other / "final" / "x")], f"lies inside the model folder {other / 'final'}"),
    ]
    for flags, message in cases:
        line = train_refusal(capfd, *flags)
        assert line.startswith("error: --out ") and message in line, (flags, line)
    assert {path: snapshot(path) for path in before} == before


def test_continuing_a_run_in_place_is_still_allowed(small_run):
    """--out the run that holds --resume's checkpoint is the ordinary way to continue it."""
    resume = small_run / "checkpoints" / "step_00000002"
    preflight.check_output(parse_args(SMALL + ["--out", str(small_run), "--resume", str(resume)])[1])
    preflight.check_output(parse_args(SMALL + ["--out", str(small_run), "--resume", "auto"])[1])


def test_evaluate_out_and_plot_never_meet_an_input(saved_model, tmp_path, monkeypatch):
    text = tmp_path / "held.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    before = snapshot(saved_model)
    nothing_loads(monkeypatch)
    base = ["--model", str(saved_model), "--task", "probe", "--data", str(text)]
    cases = [
        (base + ["--out", str(text)], f"error: --out {text}: is --data {text}"),
        (base + ["--out", str(saved_model / "results.json")],
         f"error: --out {saved_model / 'results.json'}: lies inside --model {saved_model}"),
        (base + ["--out", str(saved_model / "config.json")], f"lies inside --model {saved_model}"),
        (["--model", str(tmp_path / "m"), "--task", "drift", "--data", str(text), "--base", str(saved_model),
          "--plot", str(saved_model / "drift.png")], f"error: --plot {saved_model / 'drift.png'}: lies inside --base"),
        (["--model", NO_MODEL, "--task", "drift", "--data", str(text), "--base", NO_MODEL, "--out",
          str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.json")], f"--plot {tmp_path / 'r.json'}: is --out"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit) as e:
            E.main(flags)
        assert message in str(e.value.code) and "\n" not in str(e.value.code), (flags, e.value.code)
    assert snapshot(saved_model) == before


def test_experiments_out_never_meets_the_data_dir(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    monkeypatch.setattr(X, "run", lambda args: pytest.fail("ran"))
    for out, relation in ((data_dir, "is"), (data_dir / "out", "lies inside"), (tmp_path, "contains")):
        with pytest.raises(SystemExit) as e:
            X.main(["--smoke", "--data-dir", str(data_dir), "--out", str(out)])
        assert str(e.value.code).startswith(f"error: --out {out}: {relation} --data-dir {data_dir}"), e.value.code

# -----------------------------------------------------------------------------
# 2. Output paths fail early, in one line


def test_a_file_in_the_way_of_out_is_refused_before_loading(tmp_path, capfd, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    nothing_loads(monkeypatch)
    line = train_refusal(capfd, "--out", str(afile / "run"))
    assert line == f"error: --out {afile / 'run'}: {afile} is a file, so no folder can be made there; give another --out"
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("x")  # used to fail only when the first checkpoint was saved
    line = train_refusal(capfd, "--out", str(run))
    assert line.startswith(f"error: --out {run}: {run / 'checkpoints'} is a file, not a folder"), line
    (run / "checkpoints").unlink()
    (run / "log.jsonl").mkdir()
    line = train_refusal(capfd, "--out", str(run))
    assert line.startswith(f"error: --out {run}: {run / 'log.jsonl'} is a folder, not a file"), line


def test_a_read_only_out_is_refused_before_loading(tmp_path, capfd, monkeypatch):
    nothing_loads(monkeypatch)
    with read_only(tmp_path / "ro") as folder:
        line = train_refusal(capfd, "--out", str(folder / "run"))
        assert line.startswith(f"error: --out {folder / 'run'}: cannot write in {folder} ("), line
        with pytest.raises(SystemExit) as e:
            E.main(["--model", "/nonexistent/model", "--task", "probe", "--data", "x.txt",
                    "--out", str(folder / "r.json")])
        assert str(e.value.code).startswith(f"error: --out {folder / 'r.json'}: cannot write in {folder} (")


def test_check_writable_probe_leaves_nothing_behind(tmp_path):
    files.check_writable(tmp_path / "a" / "b", "--out")
    files.check_writable(tmp_path / "r.json", "--out", folder=False)
    assert list(tmp_path.iterdir()) == []

# -----------------------------------------------------------------------------
# 3. evaluate.py never loses finished results


def test_evaluate_out_is_checked_before_the_model_loads(tmp_path):
    text = tmp_path / "held.txt"
    text.write_text("some text " * 50)
    (tmp_path / "afile").write_text("x")
    cases = [(tmp_path, f"error: --out {tmp_path}: is a folder; give a file name"),
             (tmp_path / "afile" / "r.json", f"error: --out {tmp_path / 'afile' / 'r.json'}: {tmp_path / 'afile'} is a file")]
    for out, message in cases:
        with pytest.raises(SystemExit) as e:
            E.main(["--model", NO_MODEL, "--task", "probe", "--data", str(text), "--out", str(out)])
        assert str(e.value.code).startswith(message), e.value.code
    with pytest.raises(SystemExit) as e:  # the drift plot too
        E.main(["--model", NO_MODEL, "--task", "drift", "--data", str(text), "--base", NO_MODEL,
                "--plot", str(tmp_path)])
    assert str(e.value.code).startswith(f"error: --plot {tmp_path}: is a folder"), e.value.code


def probe_args(model, text, out):
    return ["--model", str(model), "--task", "probe", "--data", str(text), "--probe-seq-len", "32",
            "--probe-windows", "2", "--probe-grid", "2", "--out", str(out)]


def test_evaluate_prints_the_results_when_the_write_fails(saved_model, tmp_path, monkeypatch, capsys):
    text = tmp_path / "held.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "results.json"
    out.write_text("old results\n")

    def disk_full(path, content):
        raise ValueError(f"{path}: could not write (OSError: [Errno 28] No space left on device); 0 B are free "
                         "there; its previous content is unchanged")
    monkeypatch.setattr(files, "atomic_write_text", disk_full)
    with pytest.raises(SystemExit) as e:
        E.main(probe_args(saved_model, text, out))
    line = str(e.value.code)
    assert line.startswith(f"error: --out {out}: could not write (OSError: [Errno 28] No space left") and "\n" not in line
    assert line.endswith("the results are printed above in full")
    printed = capsys.readouterr().out
    results = strict_loads(printed[printed.rindex('{\n  "model"'):])  # the full results, not only the summary
    assert results["task"] == "probe" and len(results["per_t"]) == 2 and math.isfinite(results["probe_loss"])
    assert out.read_text() == "old results\n"


def test_evaluate_writes_strict_json_atomically(saved_model, tmp_path, monkeypatch):
    text = tmp_path / "held.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "results.json"
    writes = []
    real = files.atomic_write_text
    monkeypatch.setattr(files, "atomic_write_text", lambda path, content: (writes.append(path), real(path, content)))
    monkeypatch.setattr(E, "diffusion_probe", lambda *a, **k: {"probe_loss": math.nan, "per_t": [math.inf, 1.0]})
    E.main(probe_args(saved_model, text, out))
    assert writes == [out]
    assert strict_loads(out.read_text())["per_t"] == ["Infinity", 1.0]

# -----------------------------------------------------------------------------
# 4. Damaged model folders


def truncate(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def edit_config(**changes):
    def damage(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | {k: config[k] + v for k, v in changes.items()}))
    return damage


def set_config(folder, **values):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | values))


def remove_tokenizer(folder):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)


DAMAGES = {
    "truncated-weights": (truncate, "model.safetensors is damaged: truncated or not a safetensors file"),
    "foreign-weights": (lambda f: (f / "model.safetensors").write_bytes(b"\0" * 64),
                        "model.safetensors is damaged: truncated or not a safetensors file"),
    "config-width": (edit_config(hidden_size=32), "config.json does not match the weights: "),
    "config-vocab": (edit_config(vocab_size=7), "config.json does not match the weights: embed.weight is [261, 32] "
                                                "in the weights but [268, 32] by config.json"),
    "config-more-layers": (edit_config(num_hidden_layers=1), "config.json does not match the weights: 6 of the "
                           "model's tensors are not in the weights (layers.2.attn_norm.weight, layers.2.attn_out.weight, ...)"),
    "config-fewer-layers": (edit_config(num_hidden_layers=-1), "config.json does not match the weights: 6 tensors of "
                            "the weights have no place in the model (layers.1.attn_norm.weight, layers.1.attn_out.weight"),
    "config-vocab-zero": (lambda f: set_config(f, vocab_size=0), "config.json's vocab_size 0 is not a positive number"),
    "config-unknown-type": (lambda f: set_config(f, model_type="nosuch"), "config.json's model_type 'nosuch' is "
                            "unknown to transformers (supported here: Dream, llada, tiny-dlm); restore"),
    "config-other-family": (lambda f: set_config(f, model_type="bert"), "unknown model family model_type='bert'"),
    "config-not-json": (lambda f: (f / "config.json").write_text("{not json"), "config.json is not valid JSON"),
    "tokenizer-missing": (remove_tokenizer, "no usable tokenizer (no tokenizer files"),
    "tokenizer-json-missing": (lambda f: (f / "tokenizer.json").unlink(), "no usable tokenizer (its files: "),
    "tokenizer-broken": (lambda f: (f / "tokenizer.json").write_text('{"version": '), "tokenizer.json is not valid JSON"),
    "tokenizer-config-broken": (lambda f: (f / "tokenizer_config.json").write_text("[1,"),
                                "tokenizer_config.json is not valid JSON"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_model_folder_is_one_line_naming_it(saved_model, tmp_path, capfd, damage):
    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    harm, problem = DAMAGES[damage]
    harm(folder)
    line = train_refusal(capfd, "--model", str(folder), "--out", str(tmp_path / "out"))
    assert line.startswith(f"error: {folder}: {problem}"), line
    assert not (tmp_path / "out").exists()
    text = tmp_path / "held.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    with pytest.raises(SystemExit) as e:
        E.main(["--model", str(folder), "--task", "probe", "--data", str(text), "--probe-seq-len", "32"])
    assert str(e.value.code) == line, (e.value.code, line)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "LOAD REPORT" not in err and "Model config:" not in err, err


def test_a_sound_folder_still_loads(saved_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    assert backbones.load_backbone(str(folder)).model.config.hidden_size == 32

# -----------------------------------------------------------------------------
# 5. The log reads as one run; strict JSON


def log_rows(out):
    return [strict_loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_a_resume_off_the_eval_cadence_logs_exactly_the_uninterrupted_rows(tmp_path):
    """Resume at step 3 with --eval-every 2: the uninterrupted run evaluates at 0, 2, 4, 6; the
    resumed one used to add a held-out row at step 3."""
    flags = ["--steps", "6", "--eval-every", "2", "--save-every", "1", "--keep", "6"]
    reference = tmp_path / "reference"
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(SMALL + flags + ["--out", str(reference)])
        resumed = tmp_path / "resumed"
        shutil.copytree(reference, resumed)
        train.main(SMALL + flags + ["--out", str(resumed), "--resume",
                                    str(resumed / "checkpoints" / "step_00000003")])
    assert [r["step"] for r in log_rows(reference) if "held_out" in r] == [0, 2, 4, 6]
    assert log_rows(resumed) == log_rows(reference)


def test_trim_log_keeps_rows_and_makes_old_bare_nan_strict(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": 1.5}\n{"step": 2, "held_out": {"loss": 2.0}}\n'
                   '{"step": 3, "loss": 1.0}\n{"step": 3, "lo')
    preflight.trim_log(log, 2)
    assert log_rows(tmp_path) == [{"step": 1, "loss": "NaN"}, {"step": 2, "loss": 1.5}]


def test_non_finite_values_are_strict_json_in_the_log_and_config(tmp_path, monkeypatch):
    forward, calls = DLLMJEPA.forward, []

    def nan_at_step_2(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 2:
                out.loss, out.diffusion = out.loss * math.nan, out.diffusion * math.nan
        return out
    monkeypatch.setattr(DLLMJEPA, "forward", nan_at_step_2)
    out = tmp_path / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(SMALL + ["--out", str(out), "--steps", "3", "--save-every", "100", "--grad-clip", "inf"])
    rows = log_rows(out)  # strict_loads: a bare NaN would raise
    assert [r.get("skipped") for r in rows if "loss" in r] == [False, True, False]
    assert rows[2]["step"] == 2 and rows[2]["loss"] == "NaN" and math.isnan(float(rows[2]["loss"]))
    assert rows[2]["grad_norm"] == "NaN"
    assert strict_loads((out / "config.json").read_text())["args"]["grad_clip"] == "Infinity"
    assert strict_loads((out / "final" / "training_config.json").read_text())["args"]["grad_clip"] == "Infinity"

# -----------------------------------------------------------------------------
# 7. Ranks agree or stop together; a second SIGTERM stops a stuck rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(cmd_of, cwd_of=lambda rank: ROOT):
    port = free_port()
    return [subprocess.Popen(cmd_of(rank), cwd=cwd_of(rank), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env={**CHILD_ENV, "RANK": str(rank), "LOCAL_RANK": str(rank),
                                             "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
            for rank in (0, 1)]


def test_ranks_reading_different_data_stop_together_in_one_line(tmp_path):
    """torchrun gives every rank the same flags; a relative --data names another file on each
    node. Both ranks must stop with the same line, not wait for each other forever."""
    for rank, n in ((0, 60), (1, 80)):  # each enough for 2 processes: only the check stops them
        (tmp_path / f"node{rank}").mkdir()
        (tmp_path / f"node{rank}" / "train.jsonl").write_text(
            "".join(json.dumps({"prompt": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(n)))
    procs = two_ranks(lambda rank: [sys.executable, str(ROOT / "train.py"), *SMALL, "--data", "train.jsonl",
                                    "--steps", "2", "--batch-size", "2", "--out", str(tmp_path / "out")],
                      cwd_of=lambda rank: tmp_path / f"node{rank}")
    try:
        outputs = [proc.communicate(timeout=240)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [1, 1], "\n".join(o[-3000:] for o in outputs)
    lines = [[l for l in out.splitlines() if l.startswith("error: ")] for out in outputs]
    assert lines[0] == lines[1] and len(lines[0]) == 1, outputs
    assert re.match(r"error: rank 1 does not hold the same run as rank 0 \(training rows: (\d+) rows on rank 0, "
                    r"(\d+) rows on rank 1", lines[0][0]), lines[0][0]
    assert "every process must be started with the same flags and read the same data files" in lines[0][0]
    assert not any("Traceback" in out for out in outputs)


STUCK = """
import os, signal, sys, time
import torch, torch.distributed as dist
from dlm import files, sharding
env = sharding.init_distributed("cpu")
if env.rank == 1:  # a peer that hangs (stopped, deadlocked): rank 0 waits for it in a collective
    time.sleep(600)
files.stop_on_second_signal(grace_s=1.0)
caught = []
def on_signal(signum, frame):  # train.py's handler: it runs only when the main thread is free
    caught.append(signum)
signal.signal(signal.SIGTERM, on_signal)
print("blocking", flush=True)
dist.all_reduce(torch.zeros(1))
print("returned", flush=True)
"""


def test_a_second_sigterm_stops_a_rank_stuck_in_a_collective(tmp_path):
    script = tmp_path / "stuck.py"
    script.write_text(STUCK)
    procs = two_ranks(lambda rank: [sys.executable, str(script)])
    try:
        deadline = time.time() + 120
        line = ""
        while "blocking" not in line and time.time() < deadline:
            line = procs[0].stdout.readline()
        assert "blocking" in line
        time.sleep(1)
        procs[0].send_signal(signal.SIGTERM)  # the Python handler cannot run: the main thread is in gloo
        time.sleep(1)
        assert procs[0].poll() is None  # the first signal asks for a graceful stop, it does not kill
        procs[0].send_signal(signal.SIGTERM)
        rc = procs[0].wait(timeout=30)  # without the watcher it hangs here until the collective times out
        assert rc == 128 + signal.SIGTERM
        assert "signal 15 again: stopping now" in procs[0].stdout.read()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()

REPEATED = """
import os, signal, time
from dlm import files
files.stop_on_second_signal(grace_s=0.2)
with files.stop_requests() as stop:
    os.kill(os.getpid(), signal.SIGTERM)  # a SIGKILLed parent of several threads: the kernel repeats
    os.kill(os.getpid(), signal.SIGTERM)  # the parent-death signal within a millisecond
    time.sleep(1.5)  # past the watcher's grace: a second signal would have ended the process by now
    print("one request", stop, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # a second request, later: stop now
    time.sleep(10)
    print("not stopped", flush=True)
"""


def test_a_signal_repeated_at_once_is_one_stop_request_and_a_later_one_stops_now(tmp_path):
    """experiments.py's children get SIGTERM from the kernel when the runner dies (PR_SET_PDEATHSIG),
    once per runner thread they are handed to: train.py took the repeat for a second request and
    died in the middle of the checkpoint the first one asked for."""
    script = tmp_path / "repeated.py"
    script.write_text(REPEATED)
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert done.stdout.splitlines() == [f"one request [{int(signal.SIGTERM)}]"], (done.stdout, done.stderr)
    assert done.returncode == -signal.SIGTERM, done.stderr

def test_a_repeat_inside_the_first_signals_handler_is_the_same_request(monkeypatch):
    """Python runs a handler between bytecodes, also inside a handler: the kernel's repeat of the
    parent-death SIGTERM can run in the middle of the first one's. It found the request half
    recorded and died of an IndexError, leaving no checkpoint (seen once in a full test run)."""
    with files.stop_requests() as stop:
        handler, real, nested = signal.getsignal(signal.SIGTERM), time.monotonic, []

        def clock():  # the repeat lands while the first handler reads the clock
            if not nested:
                nested.append(signal.SIGTERM)
                handler(signal.SIGTERM, None)
            return real()
        monkeypatch.setattr(files.time, "monotonic", clock)
        handler(signal.SIGTERM, None)
        monkeypatch.undo()
        assert nested and stop == [signal.SIGTERM]  # one request, and this process still runs


# -----------------------------------------------------------------------------
# 8. Sizes that cannot fit


def test_a_model_too_wide_for_any_machine_is_refused_before_allocating(tmp_path, capfd):
    line = train_refusal(capfd, "--tiny-width", "131072", "--out", str(tmp_path / "out"))
    assert line.startswith("error: --tiny-width 131072: the model has ") and line.endswith("lower --tiny-width 131072")
    assert " TiB for its weights, gradients, AdamW moments and EMA/anchor copies, more than the " in line
    assert not (tmp_path / "out").exists()


def test_a_batch_too_large_is_refused_before_the_first_forward(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(files, "available_memory", lambda device: (4 * 2 ** 30, "host memory"))
    monkeypatch.setattr(DLLMJEPA, "forward", lambda *a, **k: pytest.fail("a forward ran"))
    line = train_refusal(capfd, "--batch-size", "200000", "--canvas", "fixed", "--out", str(tmp_path / "out"))
    assert line.startswith("error: --batch-size 200000: a micro-batch of 200000 rows x 32 tokens needs at least "), line
    assert "more than the 4.0 GiB free in host memory; lower --batch-size to about " in line
    fits = int(line.split("lower --batch-size to about ")[1].split()[0])
    assert 1000 < fits < 200000


def fake_cgroup(root: Path, version: str, limit: int | str, usage: int) -> Path:
    """A cgroup mount as the kernel shows it: v2's memory.max/current or v1's memory/ hierarchy."""
    folder, (limit_name, usage_name) = ((root, ("memory.max", "memory.current")) if version == "v2" else
                                        (root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / limit_name).write_text(f"{limit}\n")
    (folder / usage_name).write_text(f"{usage}\n")
    return root


@settings(max_examples=30, deadline=None)
@given(version=st.sampled_from(["v1", "v2"]), limit=st.integers(0, 2 ** 40), usage=st.integers(0, 2 ** 40))
def test_host_memory_is_the_smaller_of_free_ram_and_the_cgroups_limit(tmp_path_factory, version, limit, usage):
    root = fake_cgroup(tmp_path_factory.mktemp("cgroup"), version, limit, usage)
    ram, _ = files.available_memory("cpu", cgroup=tmp_path_factory.mktemp("none"))
    free, where = files.available_memory("cpu", cgroup=root)
    allowed = max(0, limit - usage)
    if allowed < ram / 2:  # free RAM moves between two readings on a shared machine: compare far from it
        assert (free, where) == (allowed, "host memory (this process's cgroup limit)")
    elif allowed > 2 * ram:
        assert where == "host memory" and free < allowed


def test_no_cgroup_limit_leaves_free_ram(tmp_path):
    assert files.available_memory("cpu", cgroup=tmp_path / "none")[0] > 0
    for root in (fake_cgroup(tmp_path / "v2", "v2", "max", 5), fake_cgroup(tmp_path / "v1", "v1", 2 ** 63 - 4096, 5)):
        free, where = files.available_memory("cpu", cgroup=root)
        assert 0 < free < 2 ** 62 and where == "host memory"


def test_a_model_past_the_cgroups_limit_is_refused_before_allocating(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(files, "CGROUP", fake_cgroup(tmp_path / "cgroup", "v1", 2 ** 30 + 2 ** 16, 2 ** 30))
    line = train_refusal(capfd, "--out", str(tmp_path / "out"))
    assert line.startswith("error: --tiny-width "), line
    assert "more than the 64.0 KiB free in host memory (this process's cgroup limit)" in line, line


@pytest.mark.parametrize("flag", ["--predictor-depth", "--predictor-mult"])
def test_a_predictor_past_the_limit_is_blamed_on_its_flag(tmp_path, capfd, monkeypatch, flag):
    """The model's training state alone (about 1 MiB) fits in 3 MiB; with 64 predictor layers,
    or layers 64 times as wide, it does not: the line names that flag, not --tiny-width."""
    monkeypatch.setattr(files, "CGROUP", fake_cgroup(tmp_path / "cgroup", "v2", 2 ** 30 + 3 * 2 ** 20, 2 ** 30))
    line = train_refusal(capfd, flag, "64", "--out", str(tmp_path / "out"))
    assert line.startswith(f"error: {flag} 64: the model has "), line
    assert line.endswith(f"more than the 3.0 MiB free in host memory (this process's cgroup limit): lower {flag} 64"), line


def test_batch_size_200000_is_refused_on_this_machine(tmp_path, capfd):
    """Without stand-ins: the default tiny model, 200000 rows of 32 tokens, needs over 100 GB."""
    free, _ = files.available_memory("cpu")
    if not free or free > 150 * 10 ** 9:
        pytest.skip(f"{free} bytes free: enough that the lower bound would not refuse")
    with pytest.raises(SystemExit) as e:
        train.main(["--batch-size", "200000", "--builtin-size", "400", "--no-progress", "--out", str(tmp_path / "o")])
    assert str(e.value.code).startswith("error: --batch-size 200000: a micro-batch of 200000 rows x ")


def test_ordinary_sizes_are_not_refused(tmp_path):
    args = parse_args(SMALL + ["--out", str(tmp_path)])[1]
    preflight.check_fits(args)  # no ValueError


@pytest.mark.parametrize("where, error, flag", [
    ("forward", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity"),
     "lower --batch-size 8 (--grad-accum keeps the global batch), or --seq-len 32, or add --activation-checkpointing"),
    ("optimizer", RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 40000000000 bytes. Error code 12"),
     "lower --tiny-width 32 (or --tiny-layers)"),
])
def test_a_caught_out_of_memory_error_is_one_line_naming_the_flag(tmp_path, capfd, monkeypatch, where, error, flag):
    def out_of_memory(*args, **kwargs):
        raise error
    if where == "forward":
        monkeypatch.setattr(DLLMJEPA, "forward", out_of_memory)
    else:
        monkeypatch.setattr(train, "make_optimizer", out_of_memory)
    with contextlib.redirect_stdout(io.StringIO()):
        line = train_refusal(capfd, "--out", str(tmp_path / "out"), "--steps", "2")
    what = ("CUDA out of memory, tried to allocate 2.00 GiB" if where == "forward"
            else "can't allocate memory, tried to allocate 37.3 GiB")
    assert line == f"error: out of memory ({what}): {flag}", line


@pytest.mark.parametrize("where, extra, culprit", [
    ("forward", ["--seq-len", "4096"], "--seq-len 4096"),  # attention's T x T scores, not the batch
    ("optimizer", ["--grad-accum", "65536"], "--grad-accum 65536"),  # the global batch's row indices
    ("optimizer", ["--predictor-depth", "64"], "--predictor-depth 64"),
    ("optimizer", ["--tiny-layers", "64"], "--tiny-layers 64"),
    ("optimizer", ["--tiny-width", "256", "--tiny-layers", "64"], "--tiny-layers 64 or --tiny-width 256"),
])
def test_the_out_of_memory_line_names_the_flags_that_dominate_the_estimate(tmp_path, capfd, monkeypatch, where,
                                                                           extra, culprit):
    """The line used to blame --batch-size (in a forward) or --tiny-width (elsewhere) whatever
    made the run large."""
    def out_of_memory(*args, **kwargs):
        raise MemoryError()
    monkeypatch.setattr(*((DLLMJEPA, "forward") if where == "forward" else (train, "make_optimizer")), out_of_memory)
    with contextlib.redirect_stdout(io.StringIO()):
        line = train_refusal(capfd, "--out", str(tmp_path / "out"), "--steps", "2", *extra)
    assert line == f"error: out of memory (MemoryError): lower {culprit} (the largest part of the memory this run " \
                   "needs)", line


def test_other_runtime_errors_pass_through(monkeypatch, tmp_path):
    monkeypatch.setattr(train, "make_optimizer", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(RuntimeError, match="a bug"):
        train.main(SMALL + ["--out", str(tmp_path / "out"), "--steps", "1"])


def test_a_stopped_rank_ends_the_run_with_one_line_not_a_hang(tmp_path):
    """Rank 1 is stopped (SIGSTOP: a hung node) after a few steps. Rank 0 waits in the next
    collective for --collective-timeout (6 s here), then stops with one line; before the flag,
    gloo's default (30 minutes) held it, and NCCL's watchdog ended it with a trace."""
    flags = ["--tiny-width", "32", "--tiny-layers", "2", "--seq-len", "32", "--builtin-size", "400",
             "--batch-size", "4", "--steps", "400", "--no-progress", "--final-eval", "0",
             "--collective-timeout", "0.1", "--out", str(tmp_path / "run")]
    procs = two_ranks(lambda rank: [sys.executable, str(ROOT / "train.py"), *flags])
    try:
        log, deadline = tmp_path / "run" / "log.jsonl", time.time() + 120
        while (not log.exists() or len(log.read_text().splitlines()) < 5) and time.time() < deadline:
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.time()
        output = procs[0].communicate(timeout=90)[0]
        assert procs[0].returncode == 1, output[-3000:]
        assert time.time() - stopped < 60
        last = output.strip().splitlines()[-1]
        assert last.startswith("error: rank 0: another process did not join a collective within "
                               "--collective-timeout 0.1 minutes"), output[-3000:]
    finally:
        for proc in procs:
            proc.kill()


def test_collective_timeout_must_be_positive(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--collective-timeout", "0"])
    assert e.value.code == 2 and "--collective-timeout 0.0: must be > 0 (minutes)" in capsys.readouterr().err
