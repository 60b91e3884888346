"""
The DLLM-JEPA paper's experiments at CPU scale, from one command.

    python experiments.py --smoke          # the whole pipeline in about two minutes
    python experiments.py                  # the CPU-scale protocol (about 20 minutes on 2 cores)
    python experiments.py --tasks nl-rx-synth gsm8k --methods diffusion dllm-jepa --seeds 0 1 2 3 4

What the paper does with LLaDA-8B / Dream-7B, done here with the tiny model of tiny_model.py:
1. a *pre-trained* base: diffusion pre-training of a new tiny model on plain text (the first
   90% of WikiText-2 from a local file); the last 10% is the held-out probe text, so
   "forgetting" and "drift from the base" mean something,
2. fine-tuning from that base with each method (diffusion, dllm-jepa, l2-anchor, two-pass)
   x seeds x tasks, all through train.py (one code path with the real runs),
3. evaluation of the base and of every fine-tuned model (evaluate.py): the task metric on
   generated answers (and the diffusion loss of the reference answers, which still moves
   when a tiny model's exact match is 0), the held-out Wikitext probe and forgetting
   (probe - base's), MMLU zero- and few-shot, per-layer weight distance and CKA to the base,
4. results.md: one table per task, mean ± std over seeds per cell (the paper's format),
   the same numbers in results.json, a drift plot and a metric plot per task.

Every stage is cached in --out (a finished run is not redone), so an interrupted run resumes.
Data come from a local folder in the layout README.md describes (--data-dir, default data/); the
splits are carved with a fixed seed, identical for every method and seed. Every file is read
and checked before any training: a bad one stops the run at once, in one line.
"""

import argparse
import contextlib
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import data
import distributed
import evaluate as E
import tiny_model

TASKS = ("nl-rx-synth", "nl-rx-turk", "gsm8k", "spider", "django")

# -----------------------------------------------------------------------------
# Configurations


@dataclass
class Profile:
    """Sizes of one protocol run. `full` is the default command (README.md: its time on 2 CPU
    cores); `smoke` checks the pipeline end to end in a couple of minutes (its numbers mean
    nothing)."""
    tiny_width: int = 128          # the tiny model's hidden size
    tiny_layers: int = 4
    merges: int = 2000             # BPE merges learned on the run's text (0: one token per byte)
    base_steps: int = 600          # diffusion pre-training on WikiText-2
    base_batch: int = 32
    base_lr: float = 1e-3
    seq_len: int = 128             # pre-training windows and the probe's
    task_seq_len: int = 64         # longest fine-tuning canvas (prompt + answer + EOS padding)
    steps: int = 3000              # fine-tuning steps per run
    batch_size: int = 32
    lr: float = 1e-3               # fine-tuning peak lr (the base is tiny: 1e-5 would barely move it)
    loss_weight: str = "flat"      # train.py --loss-weight, for the base and every run
    n_train: int = 6000            # training examples carved per task
    n_dev: int = 200               # dev examples, generated and scored
    probe_windows: int = 32        # Wikitext probe: windows x seq_len tokens, grid of t
    probe_grid: int = 8
    mmlu_questions: int = 200      # a fixed random subset of the MMLU test files
    mmlu_shots: int = 5
    system_prompt: bool = False    # keep NL-RX's constant system turn (30% of a tiny row)


PROFILES = {
    "full": Profile(),
    "smoke": Profile(tiny_width=32, tiny_layers=2, merges=200, base_steps=40, base_batch=8, seq_len=96,
                     task_seq_len=64, steps=12, batch_size=8, n_train=200, n_dev=8, probe_windows=4,
                     probe_grid=2, mmlu_questions=8, mmlu_shots=1),
}

# What each row of the tables runs: train.py flags on top of the shared ones.
RUNS = {
    "diffusion": ["--method", "diffusion"],
    "dllm-jepa": ["--method", "dllm-jepa", "--views", "wide-range"],
    "dllm-jepa wide-pair": ["--method", "dllm-jepa", "--views", "wide-pair"],
    "l2-anchor": ["--method", "l2-anchor"],
    "two-pass": ["--method", "two-pass", "--views", "wide-range"],
}
METHODS = tuple(RUNS)

# -----------------------------------------------------------------------------
# Stage 1: data


def shuffled(rows: list, seed: int = 0) -> list:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def write_jsonl(path: Path, items: list[E.Item]):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps({"messages": item.prompt + [{"role": "assistant", "content": item.reference}]}) + "\n")


def require(path: Path) -> Path:
    if not path.exists():
        raise ValueError(f"{path} is missing: point --data-dir at a folder in the layout README.md "
                         "describes (wikitext2/, mmlu/, and one folder per task: nl-rx-synth/, gsm8k/, ...)")
    return path


def carve(items: list[E.Item], n_train: int, n_dev: int, source: Path):
    """(train, dev) from one file's shuffled items: dev first, so it never depends on n_train."""
    if len(items) <= n_dev:
        raise ValueError(f"{source}: {len(items)} examples leave none to train on after the "
                         f"{n_dev} dev examples; give a smaller --n-dev")
    return items[n_dev:n_dev + n_train], items[:n_dev]


def task_splits(task: str, data_dir: Path, n_train: int, n_dev: int, system_prompt: bool):
    """(train items, dev items) of a task from the --data-dir layout. Dev splits are carved
    from train (fixed seed) where the folder gives none; GSM8K uses test_dev.jsonl and Django
    its dev files."""
    if task.startswith("nl-rx"):
        path = require(data_dir / task / f"{task.split('-')[-1]}_train.jsonl")
        items = shuffled(E.load_items(task, path))
        if not system_prompt:
            items = [replace(i, prompt=[m for m in i.prompt if m["role"] != "system"]) for i in items]
        return carve(items, n_train, n_dev, path)
    if task == "gsm8k":
        train = shuffled(E.load_items(task, require(data_dir / "gsm8k" / "train.jsonl")))
        dev_path = require(data_dir / "gsm8k" / "test_dev.jsonl")
        dev = E.load_items(task, dev_path)[:n_dev]
        E.check_references(task, dev, dev_path)  # a reference with no number would fail at scoring
        return train[:n_train], dev
    if task == "spider":
        path = require(data_dir / "spider" / "train_spider.json")
        return carve(shuffled(E.load_spider(path, require(data_dir / "spider" / "tables.json"))),
                     n_train, n_dev, path)
    if task == "django":
        train = shuffled(E.load_items(task, require(data_dir / "django" / "train.anno")))
        return train[:n_train], E.load_items(task, require(data_dir / "django" / "dev.anno"))[:n_dev]
    raise ValueError(f"unknown task {task!r}: choose from {TASKS}")


def wikitext_split(data_dir: Path) -> tuple[str, str]:
    """WikiText-2's validation text: first 90% of lines to pre-train the base, last 10%
    held out for the probe and CKA (never trained on)."""
    lines = data.read_text(require(data_dir / "wikitext2" / "valid.txt")).splitlines(keepends=True)
    cut = int(len(lines) * 0.9)
    return "".join(lines[:cut]), "".join(lines[cut:])


def mmlu_subset(data_dir: Path, n: int) -> list[E.Question]:
    return shuffled(E.load_mmlu(require(data_dir / "mmlu" / "test")))[:n]


@dataclass
class Inputs:
    """Everything the protocol reads from --data-dir, read and checked before any training."""
    pretrain_text: str
    heldout_text: str
    windows: torch.Tensor       # the held-out probe windows, (N, seq_len) tokens
    splits: dict                # task -> (train items, dev items)
    mmlu: list
    mmlu_dev: list
    tokenizer: object           # the base's: byte-level BPE learned on the pre-training and training text


def read_inputs(data_dir: Path, tasks: list[str], profile: Profile) -> Inputs:
    """Read every file the run needs, so a missing or bad one stops it in seconds, not after
    the base's pre-training. The tokenizer is learned here (deterministic: same files, same
    merges) from the pre-training text and the tasks' training rows, never from held-out
    text; the probe windows are cut with it."""
    pretrain, heldout = wikitext_split(data_dir)
    splits = {task: task_splits(task, data_dir, profile.n_train, profile.n_dev, profile.system_prompt)
              for task in tasks}
    corpus = pretrain.splitlines() + [message["content"] for train, _ in splits.values() for item in train
                                      for message in item.prompt + [{"content": item.reference}]]
    tokenizer = tiny_model.make_tokenizer(corpus, profile.merges)
    windows = data.text_rows(heldout, tokenizer, profile.seq_len,
                             f"{data_dir / 'wikitext2' / 'valid.txt'} (its held-out last 10%)",
                             max_rows=profile.probe_windows)
    return Inputs(pretrain, heldout, windows, splits, mmlu_subset(data_dir, profile.mmlu_questions),
                  E.load_mmlu(require(data_dir / "mmlu" / "dev")), tokenizer)


def new_base(path: Path, tokenizer, profile: Profile) -> Path:
    """A randomly initialised tiny model with the run's tokenizer, saved for train.py --model."""
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        model = tiny_model.make_tiny_model(tokenizer, hidden_size=profile.tiny_width,
                                           num_hidden_layers=profile.tiny_layers,
                                           intermediate_size=round(profile.tiny_width * 8 / 3 / 32) * 32,
                                           max_position_embeddings=max(512, profile.seq_len))
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path

# -----------------------------------------------------------------------------
# Stage 2: training, through train.py


def train_run(out: Path, argv: list[str]) -> tuple[Path, float]:
    """train.main in this process, its log in out/train.log -> (final model, seconds taken).
    Skipped when out/seconds.txt says a previous call finished."""
    import train
    done = out / "seconds.txt"
    if not done.is_file():
        out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        with (out / "train.log").open("w") as log, contextlib.redirect_stdout(log):
            train.main(argv + ["--out", str(out), "--no-progress"])
        done.write_text(f"{time.time() - started:.1f}")
    return out / "final", float(done.read_text())


def base_argv(profile: Profile, init: Path, text: Path, seed: int) -> list[str]:
    return ["--model", str(init), "--data", str(text), "--method", "diffusion", "--steps", str(profile.base_steps),
            "--batch-size", str(profile.base_batch), "--seq-len", str(profile.seq_len),
            "--lr", str(profile.base_lr), "--loss-weight", profile.loss_weight, "--seed", str(seed),
            "--eval-every", str(profile.base_steps), "--save-every", str(profile.base_steps), "--keep", "1",
            "--eval-batches", "2"]


def finetune_argv(profile: Profile, base: Path, train_file: Path, dev_file: Path, method: str,
                  seed: int) -> list[str]:
    return ["--model", str(base), "--data", str(train_file), "--eval-data", str(dev_file), *RUNS[method],
            "--steps", str(profile.steps), "--batch-size", str(profile.batch_size),
            "--seq-len", str(profile.task_seq_len), "--lr", str(profile.lr), "--loss-weight", profile.loss_weight,
            "--seed", str(seed), "--eval-every", str(profile.steps), "--save-every", str(profile.steps),
            "--keep", "1", "--eval-batches", "2", "--final-eval", "0"]

# -----------------------------------------------------------------------------
# Stage 3: evaluation


def evaluate_model(path: Path, task: str, dev: list[E.Item], ctx: dict, base=None) -> dict:
    """Every measurement of one checkpoint (base=None: the base itself, no drift)."""
    from backbones import load_backbone
    backbone = load_backbone(str(path))
    profile: Profile = ctx["profile"]
    # the canvas every fine-tuning run trains on (the base too is scored on it): --task-seq-len
    # minus the longest prompt, one block, one token per step, as train.py's final generation
    sampler = E.canvas_for(backbone, dev, {"gen_length": None, "block_length": None, "steps": None},
                           profile.task_seq_len)
    generation = E.evaluate_generation(backbone, task, dev, sampler, batch_size=min(len(dev), 50),
                                       probe=ctx["probe"])
    result = {k: v for k, v in generation.items() if k not in ("task", "n", "sampler", "prompts_cut")}
    result["probe_loss"] = E.diffusion_probe(backbone, ctx["windows"], ctx["probe"])["probe_loss"]
    result["mmlu_0shot"] = E.mmlu_accuracy(backbone, ctx["mmlu"], batch_size=16)["accuracy"]
    few = E.mmlu_accuracy(backbone, ctx["mmlu"], profile.mmlu_shots, ctx["mmlu_dev"], batch_size=16)
    result[f"mmlu_{profile.mmlu_shots}shot"] = few["accuracy"]
    result["mmlu_shots_used"] = few["mean_shots_used"]  # fewer when the context cannot hold them
    if base is not None:
        result["weight_distance"] = E.weight_drift(backbone, base)
        result["cka"] = E.representation_drift(backbone, base, ctx["windows"], max_tokens=2048)
    return result


def embedding_rank(run_dir: Path) -> float:
    """The collapse check of a run's last held-out evaluation (train.py logs it): the effective
    rank of the pooled context embeddings of held-out rows."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [row for row in rows if "held_out" in row][-1]["held_out"]["embedding_rank"]


def cached(path: Path, compute) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.write_text(distributed.strict_json(result, indent=1))
    return result

# -----------------------------------------------------------------------------
# Stage 4: tables and plots


def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """"12.34 ± 0.56": mean and sample standard deviation over seeds ("12.34" for one seed)."""
    values = [v * scale for v in values]
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def columns(task: str, shots: int) -> list[tuple[str, str, float, int]]:
    """(result key, header, scale, digits) of a task's table; ↑/↓ mark the better direction."""
    metric = [("accuracy", "GSM8K acc. % ↑", 100, 1)] if task == "gsm8k" else [("exact_match", "EM % ↑", 100, 1)]
    if task.startswith("nl-rx"):
        metric.append(("regex_equivalence", "regex equiv. % ↑", 100, 1))
    return metric + [("answer_loss", "answer loss ↓", 1, 3), ("answer_accuracy", "answer token acc. % ↑", 100, 1),
                     ("probe_loss", "Wikitext probe ↓", 1, 3),
                     ("forgetting", "forgetting ↓", 1, 3), ("mmlu_0shot", "MMLU 0-shot %", 100, 1),
                     (f"mmlu_{shots}shot", f"MMLU {shots}-shot %", 100, 1),
                     ("mean_weight_distance", "weight dist. all blocks", 1, 4),
                     ("mid_weight_distance", "weight dist. middle blocks", 1, 4),
                     ("mean_cka", "CKA to base", 1, 4), ("embedding_rank", "embedding eff. rank", 1, 1),
                     ("train_seconds", "train s", 1, 1)]


def summarise(run: dict, n_blocks: int) -> dict:
    """Scalar columns derived from a run's per-layer drift."""
    out = dict(run)
    if "weight_distance" in run:
        blocks = [run["weight_distance"][f"block {i}"] for i in range(n_blocks)]
        middle = blocks[n_blocks // 4: n_blocks - n_blocks // 4] or blocks
        out["mean_weight_distance"] = sum(blocks) / len(blocks)
        out["mid_weight_distance"] = sum(middle) / len(middle)
        out["mean_cka"] = sum(run["cka"][1:]) / len(run["cka"][1:])
    return out


def task_table(task: str, base: dict, runs: dict[str, list[dict]], shots: int) -> str:
    """A Markdown table: the base in the first row, then one row per method, mean ± std."""
    cols = columns(task, shots)
    lines = ["| method | " + " | ".join(header for _, header, _, _ in cols) + " |",
             "|---|" + "---|" * len(cols)]
    rows = [("base (pre-trained)", [base])] + list(runs.items())
    for name, results in rows:
        cells = []
        for key, _, scale, digits in cols:
            values = [r[key] for r in results if key in r]
            cells.append(mean_std(values, scale, digits) if values else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparisons(runs: dict[str, list[dict]], task: str, shots: int) -> list[str]:
    """Each method minus diffusion (the baseline) per metric, with the seeds' standard error
    of that difference, so a reader sees at once which gaps exceed seed noise."""
    if "diffusion" not in runs:
        return []
    lines = []
    for other in [m for m in runs if m != "diffusion"]:
        parts = []
        for key, header, scale, digits in columns(task, shots)[:-1]:
            a = [r[key] * scale for r in runs[other] if key in r]
            b = [r[key] * scale for r in runs["diffusion"] if key in r]
            if not a or not b:
                continue
            diff = sum(a) / len(a) - sum(b) / len(b)
            se = math.sqrt(sum(statistics.variance(x) / len(x) for x in (a, b) if len(x) > 1))
            flag = " (beyond 2 s.e.)" if se > 0 and abs(diff) > 2 * se else ""
            parts.append(f"{header.rstrip(' ↑↓')}: {diff:+.{digits}f} ± {se:.{digits}f}{flag}")
        lines.append(f"- {other} − diffusion: " + "; ".join(parts))
    return lines


def plot_metrics(task: str, base: dict, runs: dict[str, list[dict]], shots: int, path: Path):
    """Bars with seed error bars for the headline metrics, the base as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [c for c in columns(task, shots) if c[0] in ("accuracy", "exact_match", "answer_loss",
                                                        "probe_loss", "mmlu_0shot")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2))
    names = list(runs)
    for ax, (key, header, scale, _) in zip(axes, keys):
        values = [[r[key] * scale for r in runs[m]] for m in names]
        means = [sum(v) / len(v) for v in values]
        errors = [statistics.stdev(v) if len(v) > 1 else 0 for v in values]
        ax.errorbar(range(len(names)), means, yerr=errors, fmt="o", capsize=4)  # points: small gaps stay visible
        if key in base:
            ax.axhline(base[key] * scale, ls="--", color="gray", label="base")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_title(header, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{task}: mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mean_report(results: list[dict]) -> dict:
    """Per-layer drift averaged over seeds, in evaluate.plot_drift's format."""
    groups = results[0]["weight_distance"]
    return {"weight_distance": {g: sum(r["weight_distance"][g] for r in results) / len(results) for g in groups},
            "cka": [sum(r["cka"][i] for r in results) / len(results) for i in range(len(results[0]["cka"]))]}


def write_report(out: Path, profile: Profile, args, tables: dict, elapsed: float):
    lines = ["# DLLM-JEPA at CPU scale", "",
             f"One command: `python experiments.py {' '.join(sys.argv[1:])}`, {elapsed / 60:.1f} minutes. "
             f"Tiny model ({profile.tiny_width} wide, {profile.tiny_layers} blocks, byte-level BPE with "
             f"{profile.merges} merges learned on the training text), pre-trained {profile.base_steps} steps on "
             f"90% of WikiText-2 (valid), then fine-tuned {profile.steps} steps per run (lr {profile.lr}, batch "
             f"{profile.batch_size}, canvases up to {profile.task_seq_len} tokens, {profile.loss_weight} loss "
             f"weight), seeds {args.seeds}. Rows: " + "; ".join(f"{m} = `{' '.join(RUNS[m])}`" for m in args.methods)
             + ". Cells: mean ± sample std over seeds.", "",
             "Columns: the task metric on greedy LLaDA-sampler answers of the dev split "
             f"({profile.n_dev} examples; the canvas of training: {profile.task_seq_len} tokens minus the longest "
             "prompt, one block, one token per step); answer loss = diffusion loss of the reference answers and "
             "answer token acc. = teacher-forced argmax accuracy on them (fixed masks); Wikitext probe = LLaDA's pre-training loss on the held-out 10% "
             f"({profile.probe_windows} windows x {profile.seq_len} tokens, {profile.probe_grid} "
             "grid points of t, fixed masks); forgetting = probe - base's; MMLU on "
             f"{profile.mmlu_questions} test questions (chance 25%); weight distance = "
             "||W - W_base|| / ||W_base|| per block (middle = the central half of the blocks); "
             "CKA = linear CKA of block outputs with the base's on held-out text; embedding eff. rank = the "
             "effective rank of the pooled context embeddings of held-out rows at the end of training (the "
             "paper's collapse check).", ""]
    for task, table in tables.items():
        lines += [f"## {task}", "", table["markdown"], "",
                  f"MMLU {profile.mmlu_shots}-shot prompts held {table['shots_used']:.1f} exemplars on average "
                  "(fewer when the model's context cannot hold them all).", "",
                  "Differences (each method minus diffusion, ± the standard error over seeds):", "",
                  *table["comparisons"], "",
                  f"![metrics]({table['metrics_plot']}) ![drift]({table['drift_plot']})", ""]
    (out / "results.md").write_text("\n".join(lines), encoding="utf-8")

# -----------------------------------------------------------------------------
# The protocol


def yes_no(text: str) -> bool:
    """A yes/no override; anything else is refused, never read as "no"."""
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not yes/no (also true/false, 1/0)")


def check_profile(profile: Profile):
    """Refuse bad overrides of the data, sampler, probe and MMLU sizes now, in one line, not
    after the base has been pre-trained. The training flags are train.py's to check."""
    for field in ("n_train", "n_dev", "mmlu_questions", "probe_windows", "probe_grid"):
        if getattr(profile, field) < 1:
            raise SystemExit(f"error: --{field.replace('_', '-')} {getattr(profile, field)}: must be >= 1")
    if profile.mmlu_shots < 0:
        raise SystemExit(f"error: --mmlu-shots {profile.mmlu_shots}: must be >= 0")
    if profile.loss_weight not in ("inverse-t", "flat"):
        raise SystemExit(f"error: --loss-weight {profile.loss_weight}: 'inverse-t' or 'flat'")


def check_output(args):
    """--out, before anything is read or trained (ValueError, one line naming the flags): never
    the --data-dir, inside it or around it (the stages write data/ and results there), nor inside a
    model folder or a run's checkpoint; no file in the way, and a place that accepts a new file."""
    problem = (distributed.output_overlap(args.out, "--out", [("--data-dir", args.data_dir)])
               or distributed.inside_other_files(args.out, "--out"))
    if problem:
        raise ValueError(problem)
    distributed.check_writable(args.out, "--out")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--smoke", action="store_true", help="tiny sizes: check the pipeline in ~2 minutes")
    g.add_argument("--tasks", nargs="+", default=["nl-rx-synth"], choices=TASKS)
    g.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    g = p.add_argument_group("data and output")
    g.add_argument("--data-dir", default="data",
                   help="folder in the layout README.md describes (wikitext2/, mmlu/, nl-rx-synth/, gsm8k/, ...)")
    g.add_argument("--out", default="runs/experiments", help="output folder (cached stages are reused)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g = p.add_argument_group("overrides of the profile", "each field of experiments.Profile, where its "
                             "meaning is commented; the help shows its value in the full and smoke profiles")
    full, smoke = asdict(PROFILES["full"]), asdict(PROFILES["smoke"])
    for field, default in full.items():
        g.add_argument(f"--{field.replace('_', '-')}", default=None, help=f"full {default}, smoke {smoke[field]}",
                       type=yes_no if isinstance(default, bool) else type(default))
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    try:
        check_output(args)
        return run(args)
    except (ValueError, OSError) as e:  # bad data or flags: one line naming them, not a traceback
        raise SystemExit(f"error: {e}") from None


def run(args) -> Path:
    """The whole protocol -> the path of results.md."""
    t0 = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = PROFILES["smoke" if args.smoke else "full"]
    profile = replace(profile, **{k: v for k, v in vars(args).items() if k in asdict(profile) and v is not None})
    check_profile(profile)
    data_dir, out = Path(args.data_dir), Path(args.out)
    settings = {"profile": asdict(profile), "data_dir": str(data_dir.resolve()), "tasks": sorted(args.tasks)}
    if (out / "profile.json").is_file() and json.loads((out / "profile.json").read_text()) != settings:
        raise SystemExit(f"error: {out} holds runs made with other settings (see {out / 'profile.json'}); "
                         "its cached stages would be reused: choose a new --out")
    inputs = read_inputs(data_dir, args.tasks, profile)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(settings, indent=1))

    # 1-2. data, and the pre-trained base
    pretrain_text = out / "data" / "wikitext_pretrain.txt"
    pretrain_text.parent.mkdir(parents=True, exist_ok=True)
    pretrain_text.write_text(inputs.pretrain_text, encoding="utf-8")
    (out / "data" / "wikitext_heldout.txt").write_text(inputs.heldout_text, encoding="utf-8")  # for the record
    for task, (train_items, dev) in inputs.splits.items():
        write_jsonl(out / "data" / task / "train.jsonl", train_items)
        write_jsonl(out / "data" / task / "dev.jsonl", dev)
    print(f"[{time.time() - t0:5.0f}s] pre-training the base ({profile.base_steps} steps)", flush=True)
    init = new_base(out / "init", inputs.tokenizer, profile)
    base_path, _ = train_run(out / "base", base_argv(profile, init, pretrain_text, seed=0))
    from backbones import load_backbone
    base = load_backbone(str(base_path))
    probe = E.ProbeConfig(profile.seq_len, profile.probe_windows, profile.probe_grid)
    ctx = {"profile": profile, "probe": probe, "windows": inputs.windows, "mmlu": inputs.mmlu,
           "mmlu_dev": inputs.mmlu_dev}
    n_blocks = len(base.blocks)

    tables, everything = {}, {}
    for task, (_, dev) in inputs.splits.items():
        task_dir = out / "data" / task
        base_eval = cached(out / "base" / f"eval_{task}.json",
                           lambda: evaluate_model(base_path, task, dev, ctx))
        runs = {}
        for method in args.methods:
            for seed in args.seeds:
                run_dir = out / task / method / f"seed{seed}"
                print(f"[{time.time() - t0:5.0f}s] {task} / {method} / seed {seed}", flush=True)
                final, seconds = train_run(run_dir, finetune_argv(profile, base_path, task_dir / "train.jsonl",
                                                                  task_dir / "dev.jsonl", method, seed))

                def measure():
                    result = evaluate_model(final, task, dev, ctx, base)
                    return result | {"forgetting": result["probe_loss"] - base_eval["probe_loss"],
                                     "train_seconds": seconds, "embedding_rank": embedding_rank(run_dir)}
                runs.setdefault(method, []).append(summarise(cached(run_dir / "eval.json", measure), n_blocks))
        markdown = task_table(task, base_eval, runs, profile.mmlu_shots)
        metrics_plot, drift_plot = f"{task}_metrics.png", f"{task}_drift.png"
        plot_metrics(task, base_eval, runs, profile.mmlu_shots, out / metrics_plot)
        E.plot_drift({m: mean_report(r) for m, r in runs.items()}, out / drift_plot,
                     f"{task}: drift from the base, mean over seeds")
        tables[task] = {"markdown": markdown, "comparisons": comparisons(runs, task, profile.mmlu_shots),
                        "shots_used": base_eval["mmlu_shots_used"],
                        "metrics_plot": metrics_plot, "drift_plot": drift_plot}
        everything[task] = {"base": base_eval, "runs": runs}
        print(f"\n## {task}\n{markdown}\n", flush=True)

    (out / "results.json").write_text(distributed.strict_json(everything, indent=1))
    write_report(out, profile, args, tables, time.time() - t0)
    print(f"[{time.time() - t0:5.0f}s] done: {out / 'results.md'}")
    return out / "results.md"


if __name__ == "__main__":
    main()
