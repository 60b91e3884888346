"""
evaluate.py under torchrun: 2 processes on CPU (gloo) score exactly what 1 process scores, give
the same answers in the same order, and rank 0 alone prints and writes the results; a bad
--data is one line and no hang; the progress bar.

    python -m pytest tests/test_evaluate_distributed.py -q

Each 2-process run is a real `torchrun --nproc_per_node 2` (about 8 s on 2 cores); the
1-process twin runs in this process (evaluate.main, the same code with no process group). The
item counts are odd on purpose: 9 items in batches of 2 are 5 batches, 3 on rank 0 and 2 on
rank 1, so uneven shares and the gathering back into order are exercised.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tasks.common
import tiny_model
from scripts import evaluate as E

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("cab", "bead", "fig", "hide", "jam", "kale", "lid", "mode", "nib")
TIMING = ("generation_s", "tokens_per_s", "processes")  # what may differ between 1 and 2 processes


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A freshly initialised tiny model (save_pretrained folder) and one small input per task."""
    root = tmp_path_factory.mktemp("evaldist")
    torch.manual_seed(0)
    tok = tiny_model.make_tokenizer()
    model = tiny_model.make_tiny_model(tok, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=128)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "rows.jsonl").write_text("".join(json.dumps({"prompt": f"reverse {w}", "answer": w[::-1]}) + "\n"
                                             for w in WORDS))
    (root / "mmlu").mkdir()
    header = "question,choice0,choice1,choice2,choice3,answer\n"
    (root / "mmlu" / "algebra_test.csv").write_text(header + "".join(
        f"What is {i} + {i}?,{2 * i},{2 * i + 1},{i},{3 * i},{i % 4}\n" for i in range(5)))
    (root / "mmlu" / "history_test.csv").write_text(header + "".join(
        f"Who came {i}th?,Ann,Bob,Cy,Di,{(i + 1) % 4}\n" for i in range(4)))
    (root / "held.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    (root / "bad.jsonl").write_text('{"prompt": "q", "answer": "a"}\n{not json\n')
    return root


def torchrun(tmp_path, *flags, timeout=120):
    """scripts/evaluate.py under `torchrun --standalone --nproc_per_node 2`, OMP_NUM_THREADS=1 per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "scripts.evaluate", "--no-progress", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path)


def one_and_two(files, tmp_path, flags) -> tuple[dict, dict, subprocess.CompletedProcess]:
    """The results of 1 process (in this one) and of 2 (torchrun), each written to --out."""
    one = E.main([*flags, "--no-progress", "--out", str(tmp_path / "one" / "results.json")])
    assert json.loads((tmp_path / "one" / "results.json").read_text())["processes"] == 1
    run = torchrun(tmp_path, *flags, "--out", str(tmp_path / "two" / "results.json"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["results.json"]  # no leftover temporary file
    assert run.stdout.count("results: ") == 1 and run.stdout.count('"task": ') == 1, run.stdout  # rank 0 alone
    assert "[rank1]" not in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["processes"] == 2
    return json.loads(json.dumps(one)), two, run  # one through JSON too: the same types as the file's


def same_scores(one: dict, two: dict):
    assert {k: v for k, v in one.items() if k not in TIMING} == {k: v for k, v in two.items() if k not in TIMING}


def test_generation_two_processes_answer_and_score_as_one(files, tmp_path):
    """Sampling at temperature 1 with random remasking: the answers differ item to item, and
    each batch's draws come from its own seed, so they match only if every item is answered
    with its own batch's generator and gathered back in order."""
    flags = ["--model", str(files / "model"), "--task", "exact", "--data", str(files / "rows.jsonl"),
             "--gen-length", "8", "--block-length", "4", "--steps", "8", "--batch-size", "2",
             "--temperature", "1.0", "--remasking", "random", "--seed", "3"]
    one, two, _ = one_and_two(files, tmp_path, flags)
    predictions = [a["prediction"] for a in one["answers"]]
    assert len(set(predictions)) > 3  # varied answers: the order check below means something
    assert [a["prediction"] for a in two["answers"]] == predictions
    assert [a["reference"] for a in two["answers"]] == [w[::-1] for w in WORDS]
    same_scores(one, two)  # exact match, answer loss and accuracy (the sharded probe masks), sampler
    assert two["tokens_per_s"] > 0 and two["tokens_per_s"] == pytest.approx(9 * 8 / two["generation_s"])


def test_fast_sampler_two_processes_answer_as_one(files, tmp_path):
    """--threshold and --prefix-cache under torchrun: each process runs as many steps as its own
    batches need (no collective inside generation), and the answers and scores are one process's."""
    flags = ["--model", str(files / "model"), "--task", "exact", "--data", str(files / "rows.jsonl"),
             "--gen-length", "8", "--block-length", "4", "--batch-size", "2", "--threshold", "0.05",
             "--prefix-cache"]
    one, two, _ = one_and_two(files, tmp_path, flags)
    assert two["sampler"]["threshold"] == 0.05 and two["sampler"]["prefix_cache"] is True
    assert two["sampler"]["steps"] is None
    assert [a["prediction"] for a in two["answers"]] == [a["prediction"] for a in one["answers"]]
    same_scores(one, two)


def test_mmlu_two_processes_score_as_one(files, tmp_path):
    flags = ["--model", str(files / "model"), "--task", "mmlu", "--data", str(files / "mmlu"), "--batch-size", "2"]
    one, two, _ = one_and_two(files, tmp_path, flags)
    assert len(two["answers"]) == two["n"] == 9 and set(two["by_subject"]) == {"algebra", "history"}
    assert [a["prediction"] for a in two["answers"]] == [a["prediction"] for a in one["answers"]]
    same_scores(one, two)


def test_probe_and_forgetting_two_processes_score_as_one(files, tmp_path):
    """7 windows in batches of 2, 3 grid points: each window's masks are drawn from the whole
    (windows, length) grid on every process, so rank 1 scores its windows on one process's masks."""
    flags = ["--model", str(files / "model"), "--task", "probe", "--data", str(files / "held.txt"),
             "--probe-seq-len", "32", "--probe-windows", "7", "--probe-grid", "3", "--batch-size", "2",
             "--base", str(files / "model")]
    one, two, _ = one_and_two(files, tmp_path, flags)
    assert two["windows"] == 7 and len(two["per_t"]) == 3 and two["forgetting"] == 0
    same_scores(one, two)


def test_bad_data_under_torchrun_is_one_line_and_no_hang(files, tmp_path):
    """Every rank reads --data before the model loads and stops at the same point; rank 0 prints
    the line, the others nothing (torchrun then adds its own summary, which names no error line)."""
    out = tmp_path / "results.json"
    run = torchrun(tmp_path, "--model", str(files / "model"), "--task", "exact", "--data",
                   str(files / "bad.jsonl"), "--out", str(out), timeout=90)
    output = run.stdout + run.stderr
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert run.returncode != 0 and len(lines) == 1, output[-4000:]
    assert lines[0].startswith(f"error: {files / 'bad.jsonl'}:2: invalid JSON"), lines
    assert "[rank0]: Traceback" not in output and "[rank1]: Traceback" not in output and not out.exists()


class Recorder:
    """Stands in for tqdm: keeps what the bar was told."""
    bars = []

    def __init__(self, **kwargs):
        self.kwargs, self.n, self.updates = kwargs, 0, []
        Recorder.bars.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, k):
        self.updates.append(k)
        self.n += k


def test_progress_bar_on_stderr_unless_no_progress(files, capsys, monkeypatch):
    """One process: a tqdm bar on stderr with its items/s; none with --no-progress; and the bar
    advances per batch (9 questions in batches of 2: 2, 2, 2, 2, 1), not only at the end."""
    flags = ["--model", str(files / "model"), "--task", "mmlu", "--data", str(files / "mmlu"), "--batch-size", "2"]
    E.main(flags)
    err = capsys.readouterr().err
    assert "mmlu: 100%" in err and "9/9" in err and "item/s" in err, err
    E.main(flags + ["--no-progress"])
    assert "item/s" not in capsys.readouterr().err
    monkeypatch.setattr(tasks.common, "tqdm", Recorder)
    Recorder.bars = []
    E.main(flags)
    bar, = Recorder.bars
    assert bar.updates == [2, 2, 2, 2, 1] and bar.kwargs["total"] == 9 and bar.kwargs["unit"] == "item"


def test_rank0_bar_counts_its_share_times_the_world_size(monkeypatch):
    """Under torchrun rank 0's bar counts its own items times the number of processes, capped
    at the total; the other ranks show none."""
    monkeypatch.setattr(tasks.common, "tqdm", Recorder)
    Recorder.bars = []
    with tasks.common.progress_bar(tasks.common.Shard(0, 2, True), 9, "x") as advance:
        for k in (2, 2, 1):
            advance(k)
    with tasks.common.progress_bar(tasks.common.Shard(1, 2, True), 9, "x") as advance:
        advance(2)
    bar, = Recorder.bars
    assert bar.updates == [4, 4, 1] and bar.n == 9
