"""
The DLLM-JEPA paper's experiments from one command: at CPU scale with a tiny model, or the
paper's protocol on LLaDA-8B / Dream-7B with GPUs.

    python -m scripts.experiments --smoke                     # the whole CPU pipeline in about two minutes
    python -m scripts.experiments                             # the CPU-scale protocol (README: its time on 2 cores)
    python -m scripts.experiments --tasks nl-rx-synth gsm8k --methods diffusion dllm-jepa --seeds 0 1 2 3 4
    python -m scripts.experiments --profile llada-8b --dry-run    # the GPU protocol: every command, and GPU-hours
    python -m scripts.experiments --profile llada-8b              # run it (8 GPUs per fine-tune, torchrun)

What the paper does with LLaDA-8B / Dream-7B (PAPER.md), as stages:
1. data: the tasks' train and dev splits, carved with a fixed seed (identical for every method
   and seed), WikiText-2's held-out text and an MMLU subset, written to --out/data; every file
   read and checked before anything trains;
2. a base: the hub model itself (GPU profiles), or at CPU scale a new tiny model with a BPE
   tokenizer learned on the run's text, diffusion-pre-trained on 90% of WikiText-2 (the last
   10% is the held-out probe text, so forgetting and drift from the base mean something);
3. fine-tuning from the base with each method (diffusion, dllm-jepa, l2-anchor, two-pass by
   default; `"dllm-jepa wide-pair"` adds the second reading of Wide-t) x seeds x tasks: every
   run is `train.py` in its own process
   (`torchrun` when a profile uses several processes), --jobs at a time;
4. evaluation of the base and of every fine-tuned model, each measurement one `evaluate.py`
   process (torchrun too): the task metric on sampler answers with the answer tokens' loss and
   teacher-forced accuracy, the held-out Wikitext probe and forgetting (probe - base's), MMLU
   zero- and few-shot, per-layer weight distance and CKA to the base;
5. results.md: one table per task, mean ± std over seeds per cell (the paper's format), each
   method minus diffusion with its standard error, results.json, a drift and a metric plot.

Every stage is cached in --out (a finished run or measurement is not redone), so an
interrupted run resumes, a fine-tune from its last checkpoint; a signal stops every process it
started (each train.py saves first), and a SIGKILL of this one takes them down too (the
runner: dlm/jobs.py; the tables and plots: dlm/results.py). Every
train.py command is checked by train.py's own flag checks before the first runs; --dry-run
prints the commands and, for a GPU profile, an estimate of the GPU-hours. Data come from a
local folder in the layout of docs/datasets.md: The local folder (--data-dir,
default data/; `python -m scripts.prepare --out data` writes it from the hub).
"""

import argparse
import contextlib
import csv
import io
import inspect
import json
import math
import os
import random
import re
import shlex
import signal
import statistics
import sys
import textwrap
import time
import tokenize
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from dlm.flags import Parser  # imports no torch: --help and a mistyped flag answer at once

TASKS = ("nl-rx-synth", "nl-rx-turk", "gsm8k", "spider", "django")

# -----------------------------------------------------------------------------
# Configurations


@dataclass
class Profile:
    """Sizes of one protocol run. `cpu` is the default command (README.md: its time on 2 CPU
    cores); `gentle` fine-tunes the same base 300 steps at lr 1e-4, nearer the paper's regime;
    `smoke` checks the pipeline end to end in a couple of minutes (its numbers mean nothing);
    `llada-8b` / `dream-7b` are the paper's protocol on GPUs (PAPER.md: full
    fine-tuning, 2 epochs, lr 1e-5, 8 GPUs, GSM8K 4-shot; the rest is ours and says so)."""
    # the base
    model: str = ""                # hub id or folder to fine-tune; "": a new tiny model pre-trained here
    params: float = 0.0            # the model's parameters, for the GPU-hours estimate (0: a tiny model)
    tiny_width: int = 128          # the tiny model's hidden size
    tiny_layers: int = 4           # the tiny model's blocks
    merges: int = 2000             # BPE merges learned on the run's text (0: one token per byte)
    base_steps: int = 600          # steps of diffusion pre-training on WikiText-2
    base_batch: int = 32           # rows per pre-training step
    base_lr: float = 1e-3          # pre-training peak lr
    seq_len: int = 128             # tokens of the pre-training windows and the probe's
    # fine-tuning (train.py flags)
    task_seq_len: int = 48         # longest fine-tuning canvas (prompt + answer + EOS padding)
    steps: int = 2000              # fine-tuning steps per run (when epochs is 0)
    epochs: float = 0.0            # > 0: steps = epochs over the training rows at the global batch
    batch_size: int = 32           # rows per micro-batch per process
    grad_accum: int = 1            # micro-batches per optimizer step
    lr: float = 1e-3               # fine-tuning peak lr (the base is tiny: 1e-5 would barely move it)
    loss_weight: str = "flat"      # train.py --loss-weight, for the base and every run
    dtype: str = "float32"         # train.py / evaluate.py --dtype
    activation_checkpointing: bool = False  # recompute block activations (saves memory)
    nproc: int = 1                 # processes per fine-tune and per evaluation (> 1: torchrun)
    # data
    n_train: int = 6000            # training examples carved per task (at most)
    n_dev: int = 200               # dev examples, generated and scored: defaults are chosen on these
    n_test: int = 0                # test examples carved from the end of the training file, disjoint from
                                   # train and dev, scored and reported; nothing is tuned on them. 0 by default
                                   # so that the default command keeps to 45 minutes on 2 cores; the README's
                                   # reported table is a --n-test 1000 run (the training rows stay the same)
    system_prompt: bool = False    # keep NL-RX's constant system turn (30% of a tiny row)
    # evaluation
    gen_length: int = 0            # sampler canvas; 0: the trained one (task_seq_len minus the longest prompt)
    block_length: int = 0          # sampler block size; 0: one block (gen_length)
    gen_steps: int = 0             # sampler steps; 0: one token per step (gen_length)
    task_shots: int = 0            # few-shot exemplars in task prompts (from the task's train split)
    probe_windows: int = 32        # Wikitext probe: windows x seq_len tokens, grid of t
    probe_grid: int = 8            # the probe's masking rates t (midpoints of equal bins)
    mmlu_questions: int = 200      # a fixed random subset of the MMLU test files
    mmlu_shots: int = 5            # MMLU's few-shot exemplars (zero-shot is measured too)


GPU = dict(params=8.0e9, seq_len=1024, task_seq_len=1024, epochs=2.0, batch_size=4, lr=1e-5,
           loss_weight="inverse-t", dtype="bfloat16", activation_checkpointing=True, nproc=8, n_train=10 ** 6,
           n_dev=1000, n_test=0, gen_length=256, block_length=8, gen_steps=256, task_shots=4, probe_windows=64,
           mmlu_questions=1000)  # n_test 0: no default was tuned at this scale, so its dev split is unseen
PROFILES = {
    "cpu": Profile(),
    # the paper's regime is a gentle fine-tune of a strong base; the gentlest here that still learns the task
    # (docs/measurements.md: forgetting still about the base's probe loss again, but a third of cpu's)
    "gentle": Profile(lr=1e-4, steps=300),
    "smoke": Profile(tiny_width=32, tiny_layers=2, merges=200, base_steps=40, base_batch=8, seq_len=96,
                     task_seq_len=64, steps=12, batch_size=8, n_train=200, n_dev=8, n_test=8, probe_windows=4,
                     probe_grid=2, mmlu_questions=8, mmlu_shots=1),
    # LLaDA's GSM8K sampler (gen 256, block 8, steps 256: 78.6 published) for every task
    "llada-8b": Profile(model="GSAI-ML/LLaDA-8B-Instruct", **GPU),
    "dream-7b": Profile(model="Dream-org/Dream-v0-Instruct-7B", **(GPU | {"params": 7.6e9})),
}
DEFAULT_TASKS = {"cpu": ["nl-rx-synth"], "gentle": ["nl-rx-synth"], "smoke": ["nl-rx-synth"],
                 "llada-8b": ["gsm8k", "nl-rx-synth", "spider", "django"],
                 "dream-7b": ["gsm8k", "nl-rx-synth", "spider", "django"]}

# What each row of the tables runs: train.py flags on top of the shared ones (--row adds more).
RUNS = {
    "diffusion": ["--method", "diffusion"],
    "dllm-jepa": ["--method", "dllm-jepa", "--views", "wide-range"],
    "dllm-jepa wide-pair": ["--method", "dllm-jepa", "--views", "wide-pair"],
    "l2-anchor": ["--method", "l2-anchor"],
    "two-pass": ["--method", "two-pass", "--views", "wide-range"],
}
METHODS = tuple(RUNS)
# The paper's comparison. The wide-pair reading is a row on request: it was measured once (3 seeds,
# docs/measurements.md: it cannot generate) and its 3 fine-tunes would put the CPU run past 45 minutes.
DEFAULT_METHODS = ["diffusion", "dllm-jepa", "l2-anchor", "two-pass"]
# A step's cost in forward passes (F: backward = 2F; a no-grad target pass 1F), for ordering and the estimate.
COST = {"diffusion": 3, "dllm-jepa": 4, "two-pass": 6, "l2-anchor": 3}


def table_rows(methods: list[str], extra: list[str]) -> dict[str, list[str]]:
    """The rows of the tables: each --methods name with its RUNS flags, then each --row
    "NAME=FLAGS" (train.py flags, after the shared ones, so they win)."""
    rows = {m: RUNS[m] for m in methods}
    for spec in extra:
        name, _, flags = spec.partition("=")
        name = name.strip()
        if not flags.strip() or not re.fullmatch(r"[\w.+-]+( [\w.+-]+)*", name) or name in rows:
            raise ValueError(f"--row {spec!r}: give NAME=FLAGS with a new name of letters, digits, '.+-_' and "
                             "spaces, e.g. --row 'jepa-mid=--method dllm-jepa --embed-layer 2'")
        rows[name] = shlex.split(flags)
    return rows


def step_cost(flags: list[str]) -> int:
    """COST of the --method a row's flags name (train.py's default, dllm-jepa, when none)."""
    method = flags[flags.index("--method") + 1] if "--method" in flags[:-1] else "dllm-jepa"
    return COST.get(method, COST["dllm-jepa"])

# -----------------------------------------------------------------------------
# Command line (parsed before the stages' imports load torch: --help and a mistyped flag answer at once)


def field_comments(cls) -> dict[str, str]:
    """Each field of a dataclass with its comment in the source: the comment on the field's line
    and the comment lines indented under it. Profile's comments are the one place its fields are
    explained; the override flags' help reads them here."""
    names, comments, name = {f.name for f in fields(cls)}, {}, None
    for token in tokenize.generate_tokens(io.StringIO(textwrap.dedent(inspect.getsource(cls))).readline):
        (row, column), text = token.start, token.string
        if token.type == tokenize.NAME and column == 4 and text in names:  # a field: `    name: type = ...`
            name, line, comments[text] = text, row, ""
        elif token.type == tokenize.COMMENT and name and (row == line or column > 4):  # its line, or under it
            comments[name] = f"{comments[name]} {text.lstrip('#').strip()}".strip()
        elif token.type == tokenize.COMMENT:  # a section's comment, flush with the fields
            name = None
    return comments


def yes_no(text: str) -> bool:
    """A yes/no override; anything else is refused, never read as "no"."""
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not yes/no (also true/false, 1/0)")


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("what to run")
    g.add_argument("--profile", default="cpu", choices=list(PROFILES),
                   help="cpu: tiny model, 2-core CPU; gentle: cpu's base fine-tuned gently (lr 1e-4, 300 steps); "
                        "llada-8b / dream-7b: the paper's protocol on GPUs")
    g.add_argument("--smoke", action="store_true", help="the smoke profile: check the CPU pipeline in ~2 minutes")
    g.add_argument("--tasks", nargs="+", default=None, choices=TASKS,
                   help="default: nl-rx-synth (cpu, smoke); gsm8k nl-rx-synth spider django (GPU profiles)")
    g.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=METHODS,
                   help='table rows; "dllm-jepa wide-pair" (quoted) adds the fixed 0.1 / 0.9 reading of Wide-t')
    g.add_argument("--row", action="append", default=[], metavar="NAME=FLAGS",
                   help="a further row: train.py flags for its fine-tunes, which win over the shared ones, e.g. "
                        "--row 'jepa-mid=--method dllm-jepa --embed-layer 2' (repeatable)")
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="fine-tuning seeds of every row")
    g.add_argument("--dry-run", action="store_true", help="read and check the data, print every command (and "
                   "for a GPU profile the GPU-hours estimate), run nothing")
    g = p.add_argument_group("data, output and processes")
    g.add_argument("--data-dir", default="data", help="folder in the layout of docs/datasets.md: The local folder "
                   "(wikitext2/, mmlu/, nl-rx-synth/, gsm8k/, ...); `python -m scripts.prepare --out data` writes it "
                   "from the hub")
    g.add_argument("--prepare", action="store_true", help="first download into --data-dir each dataset the run "
                   "needs that it lacks (prepare.py, from the hub: needs network)")
    g.add_argument("--out", default="runs/experiments", help="output folder (cached stages are reused)")
    g.add_argument("--jobs", type=int, default=None,
                   help="processes at a time (default: 1 for a GPU profile, else min(2, CPU cores))")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: cores / jobs)")
    g = p.add_argument_group("overrides of the profile", "each field of experiments.Profile (its meaning "
                             "is the field's comment there), with its value in the cpu and llada-8b profiles")
    cpu, gpu, meaning = asdict(PROFILES["cpu"]), asdict(PROFILES["llada-8b"]), field_comments(Profile)
    for name, default in cpu.items():
        g.add_argument(f"--{name.replace('_', '-')}", default=None,
                       help=f"{meaning[name]} (cpu {default!r}, llada-8b {gpu[name]!r})".replace("%", "%%"),
                       type=yes_no if isinstance(default, bool) else type(default),
                       metavar="yes|no" if isinstance(default, bool) else None)
    args = p.parse_args(argv)
    for flag in ("jobs", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)}: must be >= 1")
    return args


if __name__ == "__main__":
    parse_args()

import tiny_model
from dlm import checkpoints, data, files
from dlm.jobs import Job, Stopped, program, run_jobs, stopped_by_signals
from dlm.results import comparisons, mean_report, measurements, plot_metrics, summarise, task_table
from tasks import check_references, load_items
from tasks.common import Item
from tasks.drift import plot_drift
from tasks.mmlu import Question, load_mmlu
from tasks.spider import load_spider

# -----------------------------------------------------------------------------
# Stage 1: data


def shuffled(rows: list, seed: int = 0) -> list:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def require(path: Path) -> Path:
    if not path.exists():
        raise ValueError(f"{path} is missing: point --data-dir at a folder in the layout of "
                         "docs/datasets.md: The local folder (wikitext2/, mmlu/, and one folder per task: "
                         "nl-rx-synth/, gsm8k/, ...)")
    return path


def carve(items: list[Item], n_train: int, n_dev: int, n_test: int, source: Path):
    """(train, dev, test) from one file's shuffled items: dev first and test last, so neither
    depends on n_train, and train (the items between) stays the same whatever n_test is, as long
    as the file holds all three."""
    if len(items) <= n_dev + n_test:
        raise ValueError(f"{source}: {len(items)} examples leave none to train on after the {n_dev} dev and "
                         f"{n_test} test examples; give a smaller --n-dev or --n-test")
    return items[n_dev:len(items) - n_test][:n_train], items[:n_dev], items[len(items) - n_test:]


def task_splits(task: str, data_dir: Path, profile: Profile):
    """(train, dev, test items) of a task from the --data-dir layout. Dev splits are carved
    from train (fixed seed) where the folder gives none; GSM8K uses test_dev.jsonl and Django
    its dev files. The test split is always carved from the end of the training file."""
    n_train, n_dev, n_test = profile.n_train, profile.n_dev, profile.n_test
    if task.startswith("nl-rx"):
        path = require(data_dir / task / f"{task.split('-')[-1]}_train.jsonl")
        items = shuffled(load_items(task, path))
        if not profile.system_prompt:
            items = [replace(i, prompt=[m for m in i.prompt if m["role"] != "system"]) for i in items]
        return carve(items, n_train, n_dev, n_test, path)
    if task == "gsm8k":
        path = require(data_dir / "gsm8k" / "train.jsonl")
        train, _, test = carve(shuffled(load_items(task, path)), n_train, 0, n_test, path)
        dev_path = require(data_dir / "gsm8k" / "test_dev.jsonl")
        dev = load_items(task, dev_path)[:n_dev]
        check_references(task, dev, dev_path)  # a reference with no number would fail at scoring
        check_references(task, test, path)
        return train, dev, test
    if task == "spider":
        path = require(data_dir / "spider" / "train_spider.json")
        return carve(shuffled(load_spider(path, require(data_dir / "spider" / "tables.json"))),
                     n_train, n_dev, n_test, path)
    if task == "django":
        path = require(data_dir / "django" / "train.anno")
        train, _, test = carve(shuffled(load_items(task, path)), n_train, 0, n_test, path)
        return train, load_items(task, require(data_dir / "django" / "dev.anno"))[:n_dev], test
    raise ValueError(f"unknown task {task!r}: choose from {TASKS}")


def wikitext_split(data_dir: Path) -> tuple[str, str]:
    """WikiText-2's validation text: first 90% of lines to pre-train the base, last 10%
    held out for the probe and CKA (never trained on)."""
    lines = data.read_text(require(data_dir / "wikitext2" / "valid.txt")).splitlines(keepends=True)
    cut = int(len(lines) * 0.9)
    return "".join(lines[:cut]), "".join(lines[cut:])


def mmlu_subset(data_dir: Path, n: int) -> list[Question]:
    return shuffled(load_mmlu(require(data_dir / "mmlu" / "test")))[:n]


def write_mmlu(folder: Path, questions: list[Question], split: str):
    """Questions as per-subject CSVs in the layout tasks.mmlu reads (header, answer 0-3)."""
    folder.mkdir(parents=True, exist_ok=True)
    by_subject = {}
    for q in questions:
        by_subject.setdefault(q.subject, []).append(q)
    for subject, rows in by_subject.items():
        with (folder / f"{subject}_{split}.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
            writer.writerows([q.question, *q.choices, q.answer] for q in rows)


@dataclass
class Inputs:
    """Everything the protocol reads from --data-dir, read and checked before any training."""
    pretrain_text: str
    heldout_text: str
    splits: dict                # task -> (train items, dev items, test items)
    mmlu: list
    mmlu_dev: list
    tokenizer: object = None    # a new tiny base's: byte-level BPE learned on the pre-training and training text
    gen_lengths: dict = field(default_factory=dict)  # task -> {"dev": its sampler canvas, "test": ...}


def read_inputs(data_dir: Path, tasks: list[str], profile: Profile) -> Inputs:
    """Read every file the run needs, so a missing or bad one stops it in seconds, not after
    the base's pre-training. For a new tiny base the tokenizer is learned here (deterministic:
    same files, same merges) from the pre-training text and the tasks' training rows, never
    from held-out text, and the probe windows are cut with it as a check."""
    pretrain, heldout = wikitext_split(data_dir)
    splits = {task: task_splits(task, data_dir, profile) for task in tasks}
    inputs = Inputs(pretrain, heldout, splits, mmlu_subset(data_dir, profile.mmlu_questions),
                    load_mmlu(require(data_dir / "mmlu" / "dev")))
    if not profile.model:
        corpus = pretrain.splitlines() + [message["content"] for train, *_ in splits.values() for item in train
                                          for message in item.prompt + [{"content": item.reference}]]
        inputs.tokenizer = tiny_model.make_tokenizer(corpus, profile.merges)
        data.text_rows(heldout, inputs.tokenizer, profile.seq_len,
                       f"{data_dir / 'wikitext2' / 'valid.txt'} (its held-out last 10%)", max_rows=profile.probe_windows)
    for task, (_, *held_out) in splits.items():
        inputs.gen_lengths[task] = {split: gen_length(profile, inputs.tokenizer, task, split, items)
                                    for split, items in zip(("dev", "test"), held_out) if items}
    return inputs


def gen_length(profile: Profile, tokenizer, task: str, split: str, items: list[Item]) -> int:
    """The sampler canvas of a split: --gen-length, or the canvas of training as train.py's final
    generation has it (--task-seq-len minus the split's longest prompt)."""
    if profile.gen_length:
        return profile.gen_length
    longest = max(len(data.prompt_ids(tokenizer, item.prompt)) for item in items)
    if profile.task_seq_len - longest < 1:
        raise ValueError(f"{task}: a {split} prompt of {longest} tokens leaves no answer room in "
                         f"--task-seq-len {profile.task_seq_len}; give a larger --task-seq-len")
    return profile.task_seq_len - longest


def fetch_missing(data_dir: Path, names: list[str]):
    """--prepare: the datasets --data-dir lacks, written in its layout from the hub."""
    from scripts import prepare
    for name in names:
        if not (data_dir / name).is_dir():
            counts = prepare.prepare(name, data_dir)
            print(f"{name}: {data_dir / name}/ " + ", ".join(f"{file} {n}" for file, n in counts.items()), flush=True)


def new_base(path: Path, tokenizer, profile: Profile) -> Path:
    """A randomly initialised tiny model with the run's tokenizer, saved for train.py --model."""
    if not (path / "config.json").is_file():
        import torch
        from transformers.utils import logging
        logging.disable_progress_bar()  # the runner's output: a line per stage
        torch.manual_seed(0)
        model = tiny_model.make_tiny_model(tokenizer, **tiny_model.shape(profile.tiny_width, profile.tiny_layers,
                                                                          profile.seq_len))
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def write_data(out: Path, inputs: Inputs) -> Path:
    """The run's data, as the train.py and evaluate.py processes read them -> the data folder."""
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wikitext_pretrain.txt").write_text(inputs.pretrain_text, encoding="utf-8")
    (folder / "wikitext_heldout.txt").write_text(inputs.heldout_text, encoding="utf-8")
    for task, splits in inputs.splits.items():
        for split, items in zip(("train", "dev", "test"), splits):
            if items:
                rows = [data.chat_row(item.prompt, item.reference) for item in items]
                data.write_jsonl(folder / task / f"{split}.jsonl", rows)
    write_mmlu(folder / "mmlu_test", inputs.mmlu, "test")
    write_mmlu(folder / "mmlu_dev", inputs.mmlu_dev, "dev")
    return folder

# -----------------------------------------------------------------------------
# Stage 2: the plan, every training and evaluation as one command


def fine_tune_steps(profile: Profile, n_rows: int) -> int:
    if profile.epochs <= 0:
        return profile.steps
    return max(1, math.ceil(n_rows * profile.epochs / (profile.batch_size * profile.grad_accum * profile.nproc)))


def train_job(name: str, out: Path, argv: list[str], after: list[str]) -> Job:
    return Job(name, "train.py", argv + ["--out", str(out), "--no-progress"], out / "seconds.txt",
               out / "train.log", after)


def base_job(profile: Profile, init: Path, text: Path, out: Path) -> Job:
    return train_job("base", out, [
        "--model", str(init), "--data", str(text), "--method", "diffusion", "--steps", str(profile.base_steps),
        "--batch-size", str(profile.base_batch), "--seq-len", str(profile.seq_len), "--lr", str(profile.base_lr),
        "--loss-weight", profile.loss_weight, "--seed", "0", "--eval-every", str(profile.base_steps),
        "--save-every", str(profile.base_steps), "--keep", "1", "--eval-batches", "2"], [])


def finetune_job(profile: Profile, base: str, folder: Path, task: str, method: str, flags: list[str], seed: int,
                 steps: int, out: Path, after: list[str]) -> Job:
    argv = ["--model", base, "--data", str(folder / "train.jsonl"), "--eval-data", str(folder / "dev.jsonl"),
            "--steps", str(steps), "--batch-size", str(profile.batch_size),
            "--grad-accum", str(profile.grad_accum), "--seq-len", str(profile.task_seq_len), "--lr", str(profile.lr),
            "--loss-weight", profile.loss_weight, "--dtype", profile.dtype, "--seed", str(seed),
            "--eval-every", str(steps), "--save-every", str(steps), "--keep", "1", "--eval-batches", "2",
            "--final-eval", "0"]
    if profile.activation_checkpointing:
        argv.append("--activation-checkpointing")
    return train_job(f"{task} / {method} / seed {seed}", out, argv + flags, after)


def eval_jobs(profile: Profile, model: str, name: str, out: Path, folder: Path, task: str, gen_lengths: dict,
              base: str | None, after: list[str], model_level: bool = True) -> list[Job]:
    """The measurements of one model, each an evaluate.py process writing out/eval/*.json:
    the task's on the dev split and on the test split (`TASK_test`), then (model_level) MMLU
    and the probe: for the base (base=None) the probe, for a fine-tuned model the drift report,
    which holds its probe and forgetting too."""
    common = ["--model", model, "--dtype", profile.dtype, "--no-progress"]
    probe = ["--probe-seq-len", str(profile.seq_len), "--probe-windows", str(profile.probe_windows),
             "--probe-grid", str(profile.probe_grid)]
    shots = ["--shots", str(profile.task_shots), "--fewshot-data", str(folder / task / "train.jsonl")] \
        if profile.task_shots else []
    heldout = str(folder / "wikitext_heldout.txt")

    def scored(split, n):  # the task metric on a split, with the sampler on that split's canvas
        gen = gen_lengths[split]
        return ["--task", task, "--data", str(folder / task / f"{split}.jsonl"), "--gen-length", str(gen),
                "--block-length", str(profile.block_length or gen), "--steps", str(profile.gen_steps or gen),
                *shots, *probe, "--batch-size", str(min(n, 50))]
    measurements = {task: scored("dev", profile.n_dev)} | ({f"{task}_test": scored("test", profile.n_test)}
                                                           if "test" in gen_lengths else {})
    if model_level:
        measurements |= {
            "mmlu_0shot": ["--task", "mmlu", "--data", str(folder / "mmlu_test"), "--batch-size", "16"],
            f"mmlu_{profile.mmlu_shots}shot": ["--task", "mmlu", "--data", str(folder / "mmlu_test"), "--batch-size",
                                               "16", "--shots", str(profile.mmlu_shots), "--fewshot-data",
                                               str(folder / "mmlu_dev")],
            "probe": ["--task", "probe", "--data", heldout, *probe] if base is None else
                     ["--task", "drift", "--base", base, "--data", heldout, *probe]}
    return [Job(f"{name}: {what}", "scripts.evaluate", common + argv + ["--out", str(out / "eval" / f"{what}.json")],
                out / "eval" / f"{what}.json", out / "eval" / f"{what}.log", after)
            for what, argv in measurements.items()]


def make_plan(profile: Profile, inputs: Inputs, tasks: list[str], rows: dict[str, list[str]], seeds: list[int],
              out: Path) -> list[Job]:
    """Every process of the protocol, in order, each naming the jobs it waits for. rows: table_rows."""
    folder = out / "data"
    jobs, base, after = [], profile.model, []
    if not profile.model:  # stage 2 at CPU scale: pre-train the new tiny base
        jobs.append(base_job(profile, out / "init", folder / "wikitext_pretrain.txt", out / "base"))
        base, after = str(out / "base" / "final"), ["base"]
    for i, task in enumerate(tasks):
        jobs += eval_jobs(profile, base, "base", out / "base", folder, task, inputs.gen_lengths[task], None, after,
                          model_level=i == 0)
    for task in tasks:
        steps = fine_tune_steps(profile, len(inputs.splits[task][0]))
        # the costliest rows first: --jobs at a time finish together, no long run left alone at the end
        for name, flags in sorted(rows.items(), key=lambda row: -step_cost(row[1])):
            for seed in seeds:
                run_dir = out / task / name / f"seed{seed}"
                job = finetune_job(profile, base, folder / task, task, name, flags, seed, steps, run_dir, after)
                jobs += [job] + eval_jobs(profile, str(run_dir / "final"), job.name, run_dir, folder, task,
                                          inputs.gen_lengths[task], base, after + [job.name])
    return jobs

# -----------------------------------------------------------------------------
# Stage 3: running the plan (dlm/jobs.py runs it; here, how each process starts and, for a
# GPU profile's --dry-run, what the plan would cost)


def launcher(profile: Profile) -> list[str]:
    """How each train.py / evaluate.py starts: torchrun (one node, a free port each) when a
    profile uses several processes per job, else plain python."""
    if profile.nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(profile.nproc)]
    return [sys.executable]


# Assumptions of the GPU-hours estimate: an H100 SXM's dense bf16 peak (NVIDIA's datasheet),
# and the fraction of it we expect (model FLOPs utilisation), lower for generation.
PEAK_FLOPS, MFU_TRAIN, MFU_GENERATE = 989e12, 0.40, 0.30
# What every job costs besides FLOPs, measured on the 2-core CPU machine (docs/evaluation.md has
# the code) and scaled by bytes: a process start (python importing torch, transformers, peft), a
# model load (backbones.load_backbone of a bf16 save_pretrained folder, a process's first load)
# and a checkpoint write (dcp.save of the fp32 training state), each while the job's GPUs wait.
# The machine was shared (load average about 5); a GPU node's disks differ: an order of
# magnitude, not a forecast.
START_S, LOAD_S_PER_GB, WRITE_S_PER_GB = 14.0, 1.1, 5.9
# The fast sampler the plan also prices: --threshold FAST_THRESHOLD, which on the CPU profile's
# NL-RX-SYNTH model took FAST_FEWER times fewer forwards per answer than the exact sampler
# (scripts/bench_sampler.py --fast, docs/evaluation.md); not measured on LLaDA or Dream.
FAST_THRESHOLD, FAST_FEWER = 0.9, 2.09


def checkpoint_bytes(profile: Profile, flags: list[str]) -> float:
    """One fine-tune's writes: its last checkpoint (fp32 master weights and two AdamW moments,
    plus a fp32 EMA target or anchor copy where the method has one) and the bf16 export."""
    method = flags[flags.index("--method") + 1]
    copies = (method == "dllm-jepa" and "online" not in flags) + (method == "l2-anchor")
    return profile.params * (12 + 4 * copies + 2)


def gpu_hours(profile: Profile, inputs: Inputs, tasks: list[str], rows: dict[str, list[str]],
              seeds: list[int], plan: list[Job]) -> list[str]:
    """An estimate of the GPU-hours of a GPU profile: training 2N FLOPs per token per
    forward-equivalent (COST: 3 for diffusion, 4 for dllm-jepa, 6 for two-pass) on full
    canvases; generation one forward over prompt + canvas per sampler step (prompt tokens
    estimated as characters / 4, with the few-shot exemplars), with the exact sampler and with
    --threshold FAST_THRESHOLD side by side; MMLU and the probe likewise; and what FLOPs leave
    out: every job's process starts and model loads, every fine-tune's checkpoint writes, each
    holding the job's GPUs (measured on CPU, scaled: START_S, LOAD_S_PER_GB, WRITE_S_PER_GB)."""
    forward = 2 * profile.params  # FLOPs per token of one forward
    lines, total, generation = [], 0.0, 0.0
    chars = lambda item: sum(len(m["content"]) for m in item.prompt)
    for task in tasks:
        train, dev, test = inputs.splits[task]
        steps = fine_tune_steps(profile, len(train))
        tokens = steps * profile.batch_size * profile.grad_accum * profile.nproc * profile.task_seq_len
        training = sum(step_cost(f) for f in rows.values()) * len(seeds) * forward * tokens / (PEAK_FLOPS * MFU_TRAIN)
        example = statistics.mean(chars(i) + len(i.reference) for i in train[:500])
        prompt = statistics.mean(chars(i) for i in dev) / 4 + profile.task_shots * example / 4
        gen = inputs.gen_lengths[task]["dev"]
        scored = len(dev) + len(test)
        per_model = scored * (profile.gen_steps or gen) * (prompt + gen) * forward / (PEAK_FLOPS * MFU_GENERATE)
        models = len(rows) * len(seeds) + 1
        lines.append(f"  {task}: {len(train)} training rows, {steps} steps per fine-tune ({len(rows) * len(seeds)} "
                     f"runs): {training / 3600:.1f} GPU-h training; {scored} dev/test items x {profile.gen_steps or gen} "
                     f"sampler steps over ~{prompt + gen:.0f} tokens: {per_model / 3600:.1f} GPU-h per model, "
                     f"{models * per_model / 3600:.1f} for {models} models "
                     f"({models * per_model / FAST_FEWER / 3600:.1f} with --threshold {FAST_THRESHOLD})")
        total += training
        generation += models * per_model
    models = len(tasks) * len(rows) * len(seeds) + 1
    mmlu = profile.mmlu_questions * 120 * (2 + profile.mmlu_shots) * forward  # ~120 tokens a question
    probe = profile.probe_windows * profile.probe_grid * profile.seq_len * 2 * forward  # drift scores the base too
    other = models * (mmlu + probe) / (PEAK_FLOPS * MFU_GENERATE)
    total += other
    lines.append(f"  MMLU and the probe: {other / 3600:.1f} GPU-h for {models} models")
    gb = profile.params * 2 / 1e9  # the bf16 weights every process loads
    loads = sum(1 + ("--base" in job.argv) for job in plan)  # drift loads the base too
    starting = profile.nproc * (len(plan) * START_S + loads * gb * LOAD_S_PER_GB)
    writes = sum(checkpoint_bytes(profile, flags) for flags in rows.values()) * len(seeds) * len(tasks) / 1e9
    writing = profile.nproc * writes * WRITE_S_PER_GB
    total += starting + writing
    lines.append(f"  process starts and model loads: {len(plan)} jobs x {profile.nproc} processes, each starting "
                 f"({START_S:.0f} s) and loading the {gb:.0f} GB of weights ({loads} loads, {LOAD_S_PER_GB} s/GB), "
                 f"holding the job's GPUs: {starting / 3600:.1f} GPU-h")
    lines.append(f"  checkpoint writes: {writes:.0f} GB over {len(rows) * len(seeds) * len(tasks)} fine-tunes (fp32 "
                 f"weights, 2 AdamW moments, an EMA or anchor copy where the method has one, a bf16 export) at "
                 f"{WRITE_S_PER_GB} s/GB: {writing / 3600:.1f} GPU-h")
    lines.append("  starts, loads and writes: measured on the 2-core CPU machine and scaled by bytes "
                 "(docs/evaluation.md); a GPU node's disks are likely faster")
    exact, fast = total + generation, total + generation / FAST_FEWER
    lines.append(f"total: about {exact / 3600:.0f} GPU-hours ({exact / 3600 / max(profile.nproc, 1):.0f} hours "
                 f"on {profile.nproc} GPUs) with the exact sampler, which the paper's numbers need; about "
                 f"{fast / 3600:.0f} with --threshold {FAST_THRESHOLD} ({FAST_FEWER:.1f}x fewer forwards per answer, "
                 f"as measured on the CPU profile's model, not on this one). Assuming {PEAK_FLOPS / 1e12:.0f} TFLOP/s "
                 f"per GPU (H100 bf16 dense) at {MFU_TRAIN:.0%} MFU training and {MFU_GENERATE:.0%} generating: an "
                 "estimate, not a measurement")
    return lines

# -----------------------------------------------------------------------------
# Stage 4: results.md (dlm/results.py reads the measurements and makes the tables and plots)


def describe(profile: Profile, name: str, rows: dict[str, list[str]], seeds: list[int], tasks: dict,
             steps: dict) -> str:
    """The setup paragraph of results.md."""
    if profile.model:
        model = (f"{profile.model}, fine-tuned {profile.epochs:g} epochs ({', '.join(f'{t}: {s} steps' for t, s in steps.items())}) "
                 f"on {profile.nproc} processes (torchrun), {profile.dtype}, lr {profile.lr}, batch {profile.batch_size} "
                 f"per process, canvases up to {profile.task_seq_len} tokens, {profile.loss_weight} loss weight")
        sampler = (f"gen length {profile.gen_length}, block {profile.block_length}, {profile.gen_steps} steps, "
                   f"{profile.task_shots}-shot")
    else:
        model = (f"Tiny model ({profile.tiny_width} wide, {profile.tiny_layers} blocks, byte-level BPE with "
                 f"{profile.merges} merges learned on the training text), pre-trained {profile.base_steps} steps on "
                 f"90% of WikiText-2 (valid), then fine-tuned {profile.steps} steps per run (lr {profile.lr}, batch "
                 f"{profile.batch_size}, canvases up to {profile.task_seq_len} tokens, {profile.loss_weight} loss weight)")
        sampler = f"the canvas of training: {profile.task_seq_len} tokens minus the longest prompt, one block, one token per step"
    return (f"Profile `{name}`. {model}; seeds {seeds}. Rows: "
            + "; ".join(f"{m} = `{shlex.join(flags)}`" for m, flags in rows.items())
            + ". Cells: mean ± sample std over seeds.\n\n"
            f"Columns: the task metric on greedy LLaDA-sampler answers of the dev split ({profile.n_dev} examples at "
            f"most; {sampler}), on which defaults are chosen, and of the test split ({profile.n_test} examples carved "
            "from the end of the training file, disjoint from train and dev; nothing is tuned on it); answer loss = diffusion loss of the reference answers and answer token acc. = "
            "teacher-forced argmax accuracy on them (fixed masks); Wikitext probe = LLaDA's pre-training loss on the "
            f"held-out 10% ({profile.probe_windows} windows x {profile.seq_len} tokens, {profile.probe_grid} grid points "
            f"of t, fixed masks); forgetting = probe - base's; MMLU on {profile.mmlu_questions} test questions (chance "
            "25%); weight distance = ||W - W_base|| / ||W_base|| per block (middle = the central half of the blocks); "
            "CKA = linear CKA of block outputs with the base's on held-out text; embedding eff. rank = the effective "
            "rank of the pooled context embeddings of held-out rows at the end of training (the paper's collapse "
            "check); grad. cosine = the cosine between the backbone gradients of the diffusion loss and of lambda x "
            "JEPA, summed over held-out batches, averaged over the held-out evaluations (rows run with train.py "
            "--grad-cosine); train s = wall-clock seconds of the fine-tune.")


def write_report(out: Path, profile: Profile, setup: str, tables: dict, elapsed: float, at_once: int, threads: int,
                 reused: int):
    reuse = f"; {reused} finished processes of earlier runs in this folder were reused, not timed" if reused else ""
    lines = ["# DLLM-JEPA experiments", "",
             f"One command: `python -m scripts.experiments {' '.join(sys.argv[1:])}`, {elapsed / 60:.1f} minutes "
             f"({at_once} processes at a time, {threads} thread{'s' * (threads != 1)} each{reuse}). {setup}", ""]
    for task, table in tables.items():
        lines += [f"## {task}", "", table["markdown"], "",
                  f"MMLU {profile.mmlu_shots}-shot prompts held {table['shots_used']:.1f} exemplars on average "
                  "(fewer when the model's context cannot hold them all).", "",
                  "Differences (each method minus diffusion, ± the standard error over seeds):", "",
                  *table["comparisons"], "",
                  f"![metrics]({table['metrics_plot']}) ![drift]({table['drift_plot']})", ""]
    files.atomic_write_text(out / "results.md", "\n".join(lines))

# -----------------------------------------------------------------------------
# The command line


def check_profile(profile: Profile):
    """Refuse bad overrides of the data, sampler, probe and MMLU sizes now, in one line, not
    after the base has been pre-trained. The training flags are train.py's to check."""
    for name in ("n_train", "n_dev", "mmlu_questions", "probe_windows", "probe_grid", "nproc"):
        if getattr(profile, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} {getattr(profile, name)}: must be >= 1")
    for name in ("n_test", "mmlu_shots", "task_shots", "gen_length", "block_length", "gen_steps"):
        if getattr(profile, name) < 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} {getattr(profile, name)}: must be >= 0")
    if profile.loss_weight not in ("inverse-t", "flat"):
        raise SystemExit(f"error: --loss-weight {profile.loss_weight}: 'inverse-t' or 'flat'")
    for name in ("batch_size", "grad_accum"):  # the fine-tunes' step count divides by them
        if getattr(profile, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} {getattr(profile, name)}: must be >= 1")
    if problem := profile.model and checkpoints.model_folder_problem(profile.model):
        raise SystemExit(f"error: {problem}")


def check_plan(plan: list["Job"], profile: Profile):
    """Every job's flags through its own command's parser and checks, no file read: train.py's
    (dlm/flags.py, preflight.check_settings; a new tiny base's shape too) and evaluate.py's
    (its parser and bounds, the sampler's flags), so an override that a job would refuse stops
    the run now in one line naming the job, not after the base's pre-training or a fine-tune."""
    from dlm import flags, preflight
    from dlm.sampler import check_settings
    from scripts import evaluate
    from tasks import GENERATION_TASKS

    def train_checks(argv):
        parser, args = flags.parse_args(argv)
        preflight.check_settings(parser, args)

    def evaluate_checks(argv):
        parser, args = evaluate.parse_args(argv)
        if args.task in GENERATION_TASKS:
            try:
                check_settings(evaluate.sampler_arguments(args, None))  # the jobs give their canvas
            except ValueError as e:
                parser.error(str(e))
    shape = [] if profile.model else [("the new tiny base", "train.py", ["--tiny-width", str(profile.tiny_width),
                                                                         "--tiny-layers", str(profile.tiny_layers)])]
    for name, script, argv in shape + [(job.name, job.script, job.argv) for job in plan]:
        refusal = io.StringIO()
        try:
            with contextlib.redirect_stderr(refusal):
                (train_checks if script == "train.py" else evaluate_checks)(argv)
        except SystemExit:
            line = (refusal.getvalue().strip().splitlines() or ["its flags are refused"])[-1]
            command = "train.py" if script == "train.py" else "evaluate.py"
            raise ValueError(f"{name}: {command} would refuse it: {line.split('error: ', 1)[-1]}") from None


def check_output(args):
    """--out, before anything is read or trained (ValueError, one line naming the flags): never
    the --data-dir, inside it or around it (the stages write data/ and results there), nor inside a
    model folder or a run's checkpoint; no file in the way, and a place that accepts a new file."""
    files.check_name(args.out, "--out")
    problem = (files.output_overlap(args.out, "--out", [("--data-dir", args.data_dir)])
               or checkpoints.inside_other_files(args.out, "--out"))
    if problem:
        raise ValueError(problem)
    files.check_writable(args.out, "--out")


def main(argv=None) -> Path | None:
    args = parse_args(argv)
    try:
        with stopped_by_signals():
            check_output(args)
            return run(args)
    except (ValueError, OSError) as e:  # bad data or flags: one line naming them, not a traceback
        raise SystemExit(f"error: {e}") from None
    except Stopped as e:
        print(f"stopped by {e}: finished stages are kept and an interrupted fine-tune continues from its last "
              "checkpoint: run the same command again to resume", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.Signals[str(e)].value) from None


def run(args) -> Path | None:
    """The whole protocol -> the path of results.md (None for --dry-run)."""
    t0 = time.time()
    name = "smoke" if args.smoke else args.profile
    profile = replace(PROFILES[name], **{k: v for k, v in vars(args).items()
                                         if k in asdict(PROFILES[name]) and v is not None})
    check_profile(profile)
    tasks = args.tasks or DEFAULT_TASKS[name]
    rows = table_rows(args.methods, args.row)
    at_once = args.jobs or (1 if profile.model else min(2, os.cpu_count() or 1))
    threads = args.threads or max(1, (os.cpu_count() or 1) // at_once)
    data_dir, out = Path(args.data_dir), Path(args.out)
    settings = {"profile": asdict(profile), "data_dir": str(data_dir.resolve()), "tasks": sorted(tasks)}
    if (out / "profile.json").is_file() and json.loads((out / "profile.json").read_text()) != settings:
        raise SystemExit(f"error: {out} holds runs made with other settings (see {out / 'profile.json'}); "
                         "its cached stages would be reused: choose a new --out")
    if args.prepare:
        fetch_missing(data_dir, ["wikitext2", "mmlu", *tasks])
    inputs = read_inputs(data_dir, tasks, profile)       # 1. every input, checked
    plan = make_plan(profile, inputs, tasks, rows, args.seeds, out)
    check_plan(plan, profile)
    if args.dry_run:
        for job in plan:
            print(f"# {job.name}\nOMP_NUM_THREADS={job.threads or threads} "
                  + " ".join(launcher(profile) + program(job) + job.argv))
        if profile.model:
            print("\n".join(gpu_hours(profile, inputs, tasks, rows, args.seeds, plan)))
        return None
    out.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(out / "profile.json", json.dumps(settings, indent=1))
    write_data(out, inputs)
    if not profile.model:                                 # 2. the tiny base: a new model, pre-trained in the plan
        new_base(out / "init", inputs.tokenizer, profile)
        plan[0].threads = args.threads or os.cpu_count()  # it runs alone: every core
    reused = sum(job.done.is_file() for job in plan)
    run_jobs(plan, launcher(profile), at_once, threads, t0)        # 3-4. fine-tunes and evaluations
    tables, everything, steps = {}, {}, {}                # 5. tables
    for task in tasks:
        base_eval = measurements(out / "base", task, profile.mmlu_shots)
        runs = {method: [summarise(measurements(out / task / method / f"seed{seed}", task, profile.mmlu_shots))
                         for seed in args.seeds] for method in rows}
        steps[task] = fine_tune_steps(profile, len(inputs.splits[task][0]))
        markdown = task_table(task, base_eval, runs, profile.mmlu_shots)
        metrics_plot, drift_plot = f"{task}_metrics.png", f"{task}_drift.png"
        plot_metrics(task, base_eval, runs, profile.mmlu_shots, out / metrics_plot)
        plot_drift({m: mean_report(r) for m, r in runs.items()}, out / drift_plot,
                   f"{task}: drift from the base, mean over seeds")
        tables[task] = {"markdown": markdown, "comparisons": comparisons(runs, task, profile.mmlu_shots),
                        "shots_used": base_eval["mmlu_shots_used"],
                        "metrics_plot": metrics_plot, "drift_plot": drift_plot}
        everything[task] = {"base": base_eval, "runs": runs}
        print(f"\n## {task}\n{markdown}\n", flush=True)
    files.atomic_write_text(out / "results.json", files.strict_json(everything, indent=1))
    setup = describe(profile, name, rows, args.seeds, tasks, steps)
    write_report(out, profile, setup, tables, time.time() - t0, at_once, threads, reused)
    print(f"[{time.time() - t0:5.0f}s] done: {out / 'results.md'}")
    return out / "results.md"


if __name__ == "__main__":
    main()
