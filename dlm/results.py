"""
Results: the protocol's numbers, from the files its processes wrote, as tables and plots.

For scripts/experiments.py's last stage (results.md):
- `measurements`: one model's numbers, from its evaluate.py outputs and train.py's log;
- `summarise`: the per-block drift as scalar columns;
- `task_table`: one Markdown table per task, mean ± sample std over seeds (the paper's format);
- `comparisons`: each method minus diffusion, paired by seed, with its standard error;
- `plot_metrics`, `mean_report`: the headline metrics as points with seed error bars, and the
  drift averaged over seeds for tasks.drift.plot_drift.
"""

import json
import math
import statistics
from pathlib import Path


def measurements(run_dir: Path, task: str, mmlu_shots: int) -> dict:
    """One model's numbers, from its evaluate.py outputs (and, for a fine-tune, train.py's log)."""
    read = lambda name: json.loads((run_dir / "eval" / f"{name}.json").read_text())
    scalars = lambda scores: {k: v for k, v in scores.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("n", "prompts_cut")}
    result = scalars(read(task))
    if (run_dir / "eval" / f"{task}_test.json").is_file():
        result |= {f"test_{k}": v for k, v in scalars(read(f"{task}_test")).items()}
    result["mmlu_0shot"] = read("mmlu_0shot")["accuracy"]
    few = read(f"mmlu_{mmlu_shots}shot")
    result[f"mmlu_{mmlu_shots}shot"] = few["accuracy"]
    result["mmlu_shots_used"] = few["mean_shots_used"]  # fewer when the context cannot hold them
    probe = read("probe")
    result["probe_loss"] = probe["probe_loss"]
    if "weight_distance" in probe:  # a fine-tune: drift from the base, and the run's own record
        result |= {k: probe[k] for k in ("weight_distance", "cka", "forgetting")}
        result["train_seconds"] = float((run_dir / "seconds.txt").read_text())
        result |= last_held_out(run_dir)
    return result


def last_held_out(run_dir: Path) -> dict:
    """From a run's held-out evaluations (train.py's log): the collapse check of the last one
    (the effective rank of the pooled context embeddings of held-out rows) and, when the row
    logged it (--grad-cosine), the cosine between the diffusion and JEPA gradients averaged
    over the evaluations after step 0 (one evaluation's cosine is noisy)."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    held_out = [row["held_out"] | {"step": row["step"]} for row in rows if "held_out" in row]
    cosines = [h["grad_cosine"] for h in held_out if h["step"] > 0 and "grad_cosine" in h]
    return {"embedding_rank": held_out[-1]["embedding_rank"]} | (
        {"grad_cosine": sum(cosines) / len(cosines)} if cosines else {})


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
    metric = [(f"{split}{key}", f"{name} {header}", scale, digits) for split, name in (("", "dev"), ("test_", "test"))
              for key, header, scale, digits in metric]
    return metric + [("answer_loss", "answer loss ↓", 1, 3), ("answer_accuracy", "answer token acc. % ↑", 100, 1),
                     ("probe_loss", "Wikitext probe ↓", 1, 3),
                     ("forgetting", "forgetting ↓", 1, 3), ("mmlu_0shot", "MMLU 0-shot %", 100, 1),
                     (f"mmlu_{shots}shot", f"MMLU {shots}-shot %", 100, 1),
                     ("mean_weight_distance", "weight dist. all blocks", 1, 4),
                     ("mid_weight_distance", "weight dist. middle blocks", 1, 4),
                     ("mean_cka", "CKA to base", 1, 4), ("embedding_rank", "embedding eff. rank", 1, 1),
                     ("grad_cosine", "grad. cosine JEPA/diffusion (mean)", 1, 3),
                     ("train_seconds", "train s", 1, 1)]


def summarise(run: dict) -> dict:
    """Scalar columns derived from a run's per-layer drift ("block 0", "block 1", ...)."""
    out = dict(run)
    if "weight_distance" in run:
        blocks = [v for k, v in run["weight_distance"].items() if k.startswith("block ")]
        n = len(blocks)
        middle = blocks[n // 4: n - n // 4] or blocks
        out["mean_weight_distance"] = sum(blocks) / n
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
    """Each method minus diffusion (the baseline) per metric, paired by seed: the mean of the
    per-seed differences and its standard error, so a reader sees at once which gaps exceed seed
    noise. Every method's list holds the same seeds in the same order (experiments.py builds
    them so); pairing removes what two runs of one seed share (the order of the training batches)."""
    if "diffusion" not in runs:
        return []
    lines = []
    for other in [m for m in runs if m != "diffusion"]:
        parts = []
        for key, header, scale, digits in columns(task, shots)[:-1]:
            diffs = [(r[key] - d[key]) * scale for r, d in zip(runs[other], runs["diffusion"]) if key in r and key in d]
            if not diffs:
                continue
            diff = sum(diffs) / len(diffs)
            se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
            flag = " (beyond 2 s.e.)" if se > 0 and abs(diff) > 2 * se else ""
            parts.append(f"{header.rstrip(' ↑↓')}: {diff:+.{digits}f} ± {se:.{digits}f}{flag}")
        lines.append(f"- {other} − diffusion: " + "; ".join(parts))
    return lines


def plot_metrics(task: str, base: dict, runs: dict[str, list[dict]], shots: int, path: Path):
    """Bars with seed error bars for the headline metrics, the base as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [c for c in columns(task, shots) if c[0] in ("accuracy", "exact_match", "test_accuracy",
                                                        "test_exact_match", "answer_loss", "probe_loss", "mmlu_0shot")
            and all(c[0] in r for rows in runs.values() for r in rows)]  # no test split: no test columns
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
    """Per-layer drift averaged over seeds, in tasks.drift.plot_drift's format."""
    groups = results[0]["weight_distance"]
    return {"weight_distance": {g: sum(r["weight_distance"][g] for r in results) / len(results) for g in groups},
            "cka": [sum(r["cka"][i] for r in results) / len(results) for i in range(len(results[0]["cka"]))]}
