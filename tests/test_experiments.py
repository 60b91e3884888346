"""The experiment runner: its table format, and the whole pipeline on a tiny made-up corpus."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiny_model
from dlm import checkpoints
from dlm.backbones import load_backbone
from dlm.results import comparisons, mean_std, task_table
from dlm.jobs import ROOT
from scripts import experiments as X


def test_mean_std_format():
    assert mean_std([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    assert mean_std([0.5, 0.7], scale=100, digits=1) == "60.0 ± 14.1"
    assert mean_std([0.25]) == "0.25"  # one seed: no spread to report


def test_task_table_layout():
    base = {"exact_match": 0.1, "regex_equivalence": 0.2, "probe_loss": 3.0}
    runs = {"diffusion": [{"exact_match": 0.2, "probe_loss": 3.1, "forgetting": 0.1},
                          {"exact_match": 0.4, "probe_loss": 3.3, "forgetting": 0.3}]}
    lines = task_table("nl-rx-synth", base, runs, shots=5).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:6] == ["method", "dev EM % ↑", "dev regex equiv. % ↑", "test EM % ↑", "test regex equiv. % ↑",
                          "answer loss ↓"]
    assert "MMLU 5-shot %" in header
    assert lines[1] == "|---|" + "---|" * (len(header) - 1)
    base_row = [c.strip() for c in lines[2].strip("|").split("|")]
    assert base_row[:3] == ["base (pre-trained)", "10.0", "20.0"] and base_row[header.index("forgetting ↓")] == "–"
    row = [c.strip() for c in lines[3].strip("|").split("|")]
    assert row[0] == "diffusion" and row[1] == "30.0 ± 14.1"
    assert row[header.index("Wikitext probe ↓")] == "3.200 ± 0.141"


def test_comparisons_pair_the_runs_by_seed():
    # per-seed differences -1.0, -0.9, -1.1: mean -1.0, s.e. 0.1 / sqrt(3) = 0.058, beyond 2 s.e.;
    # unpaired, the seeds' spread (std 0.66 and 0.72) would hide the gap (s.e. 0.56)
    runs = {"dllm-jepa": [{"probe_loss": 1.0}, {"probe_loss": 1.5}, {"probe_loss": 2.3}],
            "diffusion": [{"probe_loss": 2.0}, {"probe_loss": 2.4}, {"probe_loss": 3.4}]}
    line, = comparisons(runs, "django", shots=5)
    assert line.startswith("- dllm-jepa − diffusion: Wikitext probe: -1.000 ± 0.058 (beyond 2 s.e.)")
    one_seed = {"dllm-jepa": [{"probe_loss": 1.0}], "diffusion": [{"probe_loss": 2.0}]}
    assert comparisons(one_seed, "django", shots=5) == ["- dllm-jepa − diffusion: Wikitext probe: -1.000 ± 0.000"]


@pytest.fixture
def data_dir(tmp_path):
    """Files in the --data-dir layout, made up and tiny."""
    root = tmp_path / "data"
    (root / "nl-rx-synth").mkdir(parents=True)
    words = ["dog", "truck", "ring", "lake"]
    with (root / "nl-rx-synth" / "synth_train.jsonl").open("w") as f:
        for i in range(40):
            w = words[i % 4]
            f.write(json.dumps({"messages": [
                {"role": "system", "content": "Convert natural language to regular expression."},
                {"role": "user", "content": f"lines with {w}"},
                {"role": "assistant", "content": f".*{w}.*"}]}) + "\n")
    (root / "wikitext2").mkdir()
    (root / "wikitext2" / "valid.txt").write_text(
        "\n".join(f" = Section {i} = \n the quick brown fox jumps over the lazy dog {i} times ." for i in range(60)))
    for split in ("test", "dev"):
        (root / "mmlu" / split).mkdir(parents=True)
        (root / "mmlu" / split / f"toy_{split}.csv").write_text(
            "question,choice0,choice1,choice2,choice3,answer\n2+2?,3,4,5,6,1\n1+1?,2,3,4,5,0\n")
    return root


def test_pipeline_end_to_end(data_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["--smoke", "--data-dir", str(data_dir), "--out", str(out), "--methods", "diffusion", "dllm-jepa",
            "--seeds", "0", "1", "--base-steps", "2", "--steps", "2", "--seq-len", "64", "--n-train", "16",
            "--n-dev", "2", "--probe-windows", "2", "--mmlu-questions", "2", "--threads", "1"]
    report = X.main(argv)
    text = report.read_text()
    assert "## nl-rx-synth" in text and "| base (pre-trained) |" in text
    assert "| diffusion | 0.0 ± 0.0 |" in text and "| dllm-jepa |" in text
    assert "- dllm-jepa − diffusion:" in text
    assert "reused" not in text  # every process ran in this call: its minutes are the whole protocol's
    for png in ("nl-rx-synth_metrics.png", "nl-rx-synth_drift.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    results = json.loads((out / "results.json").read_text())
    runs = results["nl-rx-synth"]["runs"]
    assert [len(runs[m]) for m in ("diffusion", "dllm-jepa")] == [2, 2]
    assert {"answer_loss", "answer_accuracy", "probe_loss", "forgetting", "mmlu_0shot", "weight_distance", "cka",
            "embedding_rank", "test_exact_match", "test_answer_accuracy"} <= set(runs["diffusion"][0])
    assert json.loads((out / "nl-rx-synth" / "diffusion" / "seed0" / "eval" / "nl-rx-synth_test.json").read_text())["n"] == 8
    assert runs["dllm-jepa"][0]["embedding_rank"] >= 1
    # the probe windows were cut before training with the run's tokenizer: the base saved the same one,
    # with merges learned on the training text (fewer tokens than bytes)
    heldout = (out / "data" / "wikitext_heldout.txt").read_text()
    ids = lambda tok: tok(heldout, add_special_tokens=False)["input_ids"]
    base_tokenizer = load_backbone(str(out / "base" / "final")).tokenizer
    profile = X.Profile(**json.loads((out / "profile.json").read_text())["profile"])
    assert ids(base_tokenizer) == ids(X.read_inputs(data_dir, ["nl-rx-synth"], profile).tokenizer)
    assert len(ids(base_tokenizer)) < len(ids(tiny_model.make_tokenizer()))
    train_log = out / "nl-rx-synth" / "diffusion" / "seed0" / "train.log"
    stamp = train_log.stat().st_mtime_ns
    X.main(argv)  # a second call reuses every finished stage, and its report says its time is not theirs
    assert train_log.stat().st_mtime_ns == stamp
    # base + its 5 measurements (dev, test, MMLU 0/1-shot, probe) + 2 methods x 2 seeds x (fine-tune + 5)
    reused = "30 finished processes of earlier runs in this folder were reused, not timed"
    assert reused in (out / "results.md").read_text()
    with pytest.raises(SystemExit, match="other settings"):  # never mix caches of two profiles
        X.main(argv + ["--lr", "1e-2"])


def test_missing_data_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="wikitext2/valid.txt is missing"):
        X.main(["--smoke", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])


GSM8K_TRAIN = '{"question": "1+1?", "answer": "2 #### 2"}\n'


@pytest.mark.parametrize("files, flags, match", [
    ({"wikitext2/valid.txt": b"caf\xe9\n"}, [], r"wikitext2/valid.txt: not UTF-8 text at line 1 \(byte 0xe9"),
    ({}, ["--seq-len", "512"], r"valid.txt \(its held-out last 10%\): \d+ tokens, fewer than one row of "
                               r"--seq-len 512; give more text or a smaller --seq-len"),
    ({"nl-rx-synth/synth_train.jsonl": b'{"prompt": "q", "answer": "a"}\nnot json\n'}, [],
     r"synth_train.jsonl:2: invalid JSON"),
    ({}, ["--n-dev", "32"], r"synth_train.jsonl: 40 examples leave none to train on after the 32 dev and 8 "
                            r"test examples; give a smaller --n-dev or --n-test"),
    ({}, ["--tasks", "nl-rx-synth", "gsm8k"], r"gsm8k/train.jsonl is missing: point --data-dir at"),
    ({"gsm8k/train.jsonl": GSM8K_TRAIN.encode(),
      "gsm8k/test_dev.jsonl": b'{"question": "q", "answer": "Janet has 16 ducks"}\n'}, ["--tasks", "gsm8k", "--n-test", "0"],
     r"test_dev.jsonl item 0: the GSM8K reference 'Janet has 16 ducks' has no '#### answer'"),
    ({"mmlu/dev/toy_dev.csv": b"2+2?,3,4,5,6,E\n"}, [], r"toy_dev.csv row 1: answer 'E' is neither 0-3 nor A-D"),
], ids=["wikitext-not-utf8", "heldout-too-short", "task-bad-json", "n-dev-too-large", "task-file-missing",
        "gsm8k-bad-reference", "mmlu-bad-answer"])
def test_bad_data_is_refused_in_one_line_before_any_training(data_dir, tmp_path, monkeypatch, files, flags, match):
    """Every file is read and checked before the base's pre-training: run_jobs must never be
    reached, and nothing is written to --out."""
    for name, content in files.items():
        (data_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (data_dir / name).write_bytes(content)

    def no_training(*args):
        raise AssertionError("training started before the data were checked")
    monkeypatch.setattr(X, "run_jobs", no_training)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        X.main(["--smoke", "--data-dir", str(data_dir), "--out", str(out), "--seq-len", "64", "--n-train", "16",
                "--n-dev", "2", "--probe-windows", "2", "--mmlu-questions", "2"] + flags)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    assert re.search(match, message), message
    assert not out.exists()


@pytest.mark.parametrize("flags,match", [
    (["--n-dev", "0"], "error: --n-dev 0: must be >= 1"),
    (["--n-train", "0"], "error: --n-train 0: must be >= 1"),
    (["--mmlu-questions", "0"], "error: --mmlu-questions 0: must be >= 1"),
    (["--loss-weight", "uniform"], "error: --loss-weight uniform: 'inverse-t' or 'flat'"),
])
def test_bad_overrides_fail_before_anything_runs(tmp_path, flags, match):
    """The data folder is empty: an error about the flags proves they were checked first."""
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=match):
        X.main(["--smoke", "--data-dir", str(tmp_path / "empty"), "--out", str(out)] + flags)
    assert not out.exists()


def test_test_split_is_carved_from_the_end_and_leaves_train_as_it_was():
    """dev first, test last, train between: adding a test split moves no training row as long as
    the file holds all three, and the three never share an item."""
    items = list(range(100))
    train, dev, test = X.carve(items, 60, 10, 0, "f")
    train2, dev2, test2 = X.carve(items, 60, 10, 25, "f")
    assert train2 == train == list(range(10, 70)) and dev2 == dev == list(range(10))
    assert test2 == list(range(75, 100)) and not set(test2) & (set(train2) | set(dev2))
    train3, _, test3 = X.carve(items, 60, 10, 40, "f")  # the file cannot hold all three: train gives way
    assert train3 == list(range(10, 60)) and not set(test3) & set(train3)


def test_rows_add_train_flags_that_win_over_the_shared_ones(data_dir, tmp_path, capsys):
    X.main(["--smoke", "--dry-run", "--data-dir", str(data_dir), "--out", str(tmp_path / "out"), "--methods",
            "diffusion", "--row", "jepa-mid=--method dllm-jepa --embed-layer 1 --eval-every 3", "--seeds", "0",
            "--n-train", "16", "--n-dev", "2", "--probe-windows", "2", "--mmlu-questions", "2", "--seq-len", "64"])
    commands = [line for line in capsys.readouterr().out.splitlines() if " train.py " in line]
    row = next(c for c in commands if "/jepa-mid/" in c)
    assert "--eval-every 12 --save-every 12 --keep 1 --eval-batches 2 --final-eval 0 --method dllm-jepa " \
           "--embed-layer 1 --eval-every 3 --out" in row  # after the shared --eval-every 12: it wins
    assert "--eval-every 12 " in row
    assert commands.index(row) < commands.index(next(c for c in commands if "/diffusion/" in c))  # costlier first
    for bad in ("jepa-mid", "=--lr 1", "a/b=--lr 1", "diffusion=--lr 1"):
        with pytest.raises(ValueError, match="--row"):
            X.table_rows(["diffusion"], [bad])


def test_yes_no_overrides(capsys):
    assert X.parse_args(["--system-prompt", "Yes"]).system_prompt is True
    assert X.parse_args(["--system-prompt", "0"]).system_prompt is False
    with pytest.raises(SystemExit):
        X.parse_args(["--system-prompt", "maybe"])  # was: False
    assert "--system-prompt: 'maybe' is not yes/no" in capsys.readouterr().err


@pytest.fixture
def tiny_hub_model(tmp_path):
    """A saved tiny model standing in for LLaDA-8B in the GPU profile's plan."""
    import torch
    torch.manual_seed(0)
    tokenizer = tiny_model.make_tokenizer()
    path = tmp_path / "tiny-llada"
    tiny_model.make_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=2, intermediate_size=64).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_gpu_profile_dry_run_prints_the_torchrun_plan_and_gpu_hours(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert X.main(["--profile", "llada-8b", "--dry-run", "--tasks", "nl-rx-synth", "--n-dev", "4",
                   "--data-dir", str(data_dir), "--out", str(out)]) is None
    text = capsys.readouterr().out
    commands = [line for line in text.splitlines() if "OMP_NUM_THREADS" in line]
    # 1 base x (task, MMLU 0/5-shot, probe) + 4 methods x 3 seeds x (fine-tune + 4 measurements)
    assert len(commands) == 4 + 12 * 5
    assert not any("wide-pair" in c for c in commands)  # that reading is a row on request only
    first_train = next(c for c in commands if " train.py " in c)
    assert "-m torch.distributed.run --standalone --nproc_per_node 8 train.py --model GSAI-ML/LLaDA-8B-Instruct" \
        in first_train
    # 36 training rows, 2 epochs, global batch 4 x 8 -> 3 steps; the paper's lr and precision
    for flag in ("--steps 3 ", "--lr 1e-05 ", "--dtype bfloat16 ", "--activation-checkpointing", "--loss-weight inverse-t"):
        assert flag in first_train + " ", flag
    assert any("-m scripts.evaluate --model GSAI-ML/LLaDA-8B-Instruct" in c and "--shots 4" in c and "--gen-length 256" in c
               for c in commands)
    assert re.search(r"total: about \d+ GPU-hours \(\d+ hours on 8 GPUs\) with the exact sampler, which the "
                     r"paper's numbers need; about \d+ with --threshold 0.9", text)
    # 64 jobs of 8 processes, each loading the 16 GB bf16 weights, the 12 drift jobs the base too
    starts = 8 * (64 * X.START_S + (64 + 12) * 16 * X.LOAD_S_PER_GB) / 3600
    assert "64 jobs x 8 processes" in text and "(76 loads," in text
    assert re.search(rf"holding the job's GPUs: {starts:.1f} GPU-h", text)
    # per fine-tune 8e9 x (12 + 2) bytes, + 4 for the EMA target (dllm-jepa) and the anchor (l2-anchor): x 3 seeds
    written = 3 * 8e9 * (14 + 18 + 14 + 18) / 1e9
    assert f"checkpoint writes: {written:.0f} GB over 12 fine-tunes" in text
    assert re.search(rf"at {X.WRITE_S_PER_GB} s/GB: {8 * written * X.WRITE_S_PER_GB / 3600:.1f} GPU-h", text)
    assert not out.exists()  # a dry run writes nothing


def test_gpu_profile_runs_end_to_end_on_cpu_under_torchrun(data_dir, tiny_hub_model, tmp_path):
    """The llada-8b plan itself (torchrun, 2 processes per job, gloo), a tiny model in LLaDA's place."""
    out = tmp_path / "out"
    report = X.main(["--profile", "llada-8b", "--model", str(tiny_hub_model), "--nproc", "2", "--dtype", "float32",
                     "--tasks", "nl-rx-synth", "--methods", "dllm-jepa", "--seeds", "0", "--n-train", "16",
                     "--n-dev", "2", "--epochs", "1", "--task-seq-len", "64", "--seq-len", "32", "--gen-length", "8",
                     "--block-length", "8", "--gen-steps", "8", "--task-shots", "1", "--probe-windows", "2",
                     "--probe-grid", "2", "--mmlu-questions", "2", "--mmlu-shots", "1",
                     "--data-dir", str(data_dir), "--out", str(out), "--threads", "1"])
    text = report.read_text()
    assert "Profile `llada-8b`" in text and "on 2 processes (torchrun)" in text and "| dllm-jepa |" in text
    run = json.loads((out / "results.json").read_text())["nl-rx-synth"]["runs"]["dllm-jepa"][0]
    assert {"exact_match", "answer_loss", "probe_loss", "forgetting", "mmlu_1shot", "cka"} <= set(run)
    task = json.loads((out / "nl-rx-synth" / "dllm-jepa" / "seed0" / "eval" / "nl-rx-synth.json").read_text())
    assert task["processes"] == 2 and task["n"] == 2
    config = json.loads((out / "nl-rx-synth" / "dllm-jepa" / "seed0" / "config.json").read_text())
    assert config["world_size"] == 2 and config["args"]["activation_checkpointing"]


SMALL = ["--smoke", "--n-train", "16", "--n-dev", "2", "--probe-windows", "2", "--mmlu-questions", "2", "--seq-len", "64"]


@settings(max_examples=12, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(override=st.one_of(
    st.tuples(st.sampled_from(["--steps", "--base-steps", "--base-batch", "--tiny-layers"]),
              st.integers(-10 ** 30, 0).map(str)),
    st.tuples(st.sampled_from(["--lr", "--base-lr"]),
              st.one_of(st.floats(max_value=0.0), st.sampled_from([math.nan, math.inf])).map(str)),
    st.tuples(st.just("--tiny-width"), st.integers(1, 10 ** 6).filter(lambda w: w % 8).map(str)),
    st.tuples(st.just("--seeds"), st.one_of(st.integers(max_value=-1), st.integers(min_value=2 ** 27)).map(str))))
def test_an_override_a_job_would_refuse_stops_the_dry_run_in_one_line(data_dir, tmp_path, override):
    """The plan's every train.py command goes through train.py's own checks before anything runs:
    a dry run that passes is a run whose jobs accept their flags."""
    flag, value = override
    with pytest.raises(SystemExit) as e:
        X.main(SMALL + ["--dry-run", "--data-dir", str(data_dir), "--out", str(tmp_path / "out"), f"{flag}={value}"])
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    assert "train.py would refuse it" in message or flag in message, message
    assert {"--seeds": "--seed", "--base-lr": "--lr", "--base-steps": "--steps",
            "--base-batch": "--batch-size"}.get(flag, flag) in message, message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, refusal", [
    (["--gen-length", "12", "--block-length", "8"], "--gen-length 12 is not a multiple of --block-length 8"),
    (["--gen-length", "16", "--gen-steps", "100"], "--steps 100: more sampler steps than the 16 masks of --gen-length"),
])
def test_an_override_an_evaluation_would_refuse_stops_the_dry_run(data_dir, tmp_path, overrides, refusal):
    """evaluate.py's jobs are checked too (its parser, bounds and sampler): before, a dry run
    passed and the real run failed at the first evaluation, after the base and a fine-tune."""
    with pytest.raises(SystemExit) as e:
        X.main(SMALL + ["--dry-run", "--data-dir", str(data_dir), "--out", str(tmp_path / "out"), *overrides])
    message = str(e.value.code)
    assert message.startswith("error: ") and ": evaluate.py would refuse it: " in message and "\n" not in message
    assert refusal in message, message
    assert not (tmp_path / "out").exists()


def test_a_missing_model_folder_is_one_line(data_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --model \S+/missing: no such folder"):
        X.main(SMALL + ["--dry-run", "--data-dir", str(data_dir), "--out", str(tmp_path / "out"),
                        "--model", str(tmp_path / "missing")])


def start_runner(argv: list[str]) -> subprocess.Popen:
    """`python -m scripts.experiments ARGV` from the repository root, stderr captured."""
    return subprocess.Popen([sys.executable, "-m", "scripts.experiments", *argv], cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ | {"OMP_NUM_THREADS": "1"})


def wait_until(condition, timeout: float = 600, every: float = 0.05) -> bool:
    """Whether condition() held within timeout: polled, so an idle machine waits no longer than it
    must and a loaded one (the suite beside a long experiment) gets a generous deadline."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()


def training_child(runner: subprocess.Popen, log: Path, timeout: float = 600) -> psutil.Process:
    """The runner's train.py process, once it has logged a training step (inside the loop, where a
    SIGTERM makes it save a checkpoint before it stops)."""
    def trained_a_step():
        assert runner.poll() is None, runner.stderr.read()
        return log.is_file() and any(is_step_row(line) for line in log.read_text().splitlines())
    assert wait_until(trained_a_step, timeout), "train.py logged no step in time"
    return next(p for p in psutil.Process(runner.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline()))


def is_step_row(line: str) -> bool:
    """A whole log.jsonl row of a training step (step 0's row is the held-out evaluation)."""
    try:
        row = json.loads(line)
    except ValueError:  # a row still being written
        return False
    return isinstance(row, dict) and row.get("step", 0) >= 1 and "loss" in row


def gone(process: psutil.Process, timeout: float = 600) -> bool:
    """Whether the process has ended (a zombie no parent reaps counts) within timeout."""
    def ended():
        try:
            return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    return wait_until(ended, timeout)


# long enough to be interrupted; one fine-tune
INTERRUPTED = SMALL + ["--base-steps", "200", "--steps", "2", "--methods", "diffusion", "--seeds", "0",
                       "--threads", "1", "--jobs", "1"]


def test_ctrl_c_stops_the_children_in_one_line_and_the_rerun_continues_the_checkpoint(data_dir, tmp_path,
                                                                                     monkeypatch):
    """SIGINT: one line, no traceback; train.py gets one SIGTERM, saves and stops (the folder then
    holds a checkpoint and no finished run); the same command again continues that checkpoint
    (train.py --resume auto) where it used to refuse the folder (the rerun is cut after that job)."""
    out = tmp_path / "out"
    argv = INTERRUPTED + ["--data-dir", str(data_dir), "--out", str(out)]
    runner = start_runner(argv)
    child = training_child(runner, out / "base" / "log.jsonl")
    runner.send_signal(signal.SIGINT)
    assert runner.wait(timeout=120) == 128 + signal.SIGINT
    stderr = runner.stderr.read()
    assert "Traceback" not in stderr and stderr.strip().splitlines() == [stderr.strip()], stderr
    assert stderr.startswith("stopped by SIGINT: ") and "run the same command again" in stderr, stderr
    assert gone(child)
    assert "stopped by signal 15 after step" in (out / "base" / "train.log").read_text()
    assert list((out / "base" / "checkpoints").glob("step_*")) and not (out / "base" / "seconds.txt").exists()
    run_jobs = X.run_jobs

    def the_interrupted_job_only(jobs, *args):
        run_jobs(jobs[:1], *args)
        raise KeyError("cut")
    monkeypatch.setattr(X, "run_jobs", the_interrupted_job_only)
    with pytest.raises(KeyError, match="cut"):
        X.main(argv)
    assert (out / "base" / "seconds.txt").is_file() and (out / "base" / "final" / "config.json").is_file()
    train_log = (out / "base" / "train.log").read_text()
    assert "stopped by signal 15" in train_log and "resuming from" in train_log  # the first output kept
    rows = [json.loads(line) for line in (out / "base" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, 201))  # each step once, as uninterrupted


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_a_sigkilled_runner_takes_its_children_down(data_dir, tmp_path):
    """SIGKILL of experiments.py alone runs no handler: the kernel sends its train.py SIGTERM
    (PR_SET_PDEATHSIG), which saves a checkpoint and stops: nothing is left running."""
    out = tmp_path / "out"
    runner = start_runner(INTERRUPTED + ["--data-dir", str(data_dir), "--out", str(out)])
    child = training_child(runner, out / "base" / "log.jsonl")
    runner.kill()
    runner.wait()
    assert gone(child), "train.py outlived the runner"
    assert checkpoints.latest_checkpoint(out / "base" / "checkpoints"), "train.py stopped without its checkpoint"
